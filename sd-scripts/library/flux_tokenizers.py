"""CLIP-L and T5 tokenizers for FLUX, found without any network access.

Lookup order, CLIP: `<cache_dir>/openai_clip-vit-large-patch14`, a warm Hugging Face cache, then the
CLIP BPE vocabulary shipped inside the open_clip wheel (same ids as openai/clip-vit-large-patch14).
T5: `<cache_dir>/google_t5-v1_1-xxl`, then a warm Hugging Face cache. Otherwise
`TokenizerNotFoundError`, which tells the user how to use `--tokenizer_cache_dir`.
"""
from __future__ import annotations

import gzip
import importlib.util
import logging
from pathlib import Path

from library.errors import BadFileError

logger = logging.getLogger(__name__)

CLIP_HUB_ID = "openai/clip-vit-large-patch14"
T5_HUB_ID = "google/t5-v1_1-xxl"
CLIP_DIRNAME = "openai_clip-vit-large-patch14"  # upstream's --tokenizer_cache_dir layout: id with / -> _
T5_DIRNAME = "google_t5-v1_1-xxl"
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
_CLIP_BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
_CLIP_NUM_MERGES = 49152 - 256 - 2  # vocab size 49408 = 2*256 byte tokens + merges + 2 specials


class TokenizerNotFoundError(BadFileError, RuntimeError):
    """No tokenizer files were found locally."""


def _not_found(what: str, hub_id: str, dirname: str, cache_dir) -> TokenizerNotFoundError:
    where = f"{cache_dir}/{dirname}" if cache_dir else f"<dir>/{dirname}"
    cls = "CLIPTokenizer" if "clip" in dirname else "T5TokenizerFast"
    return TokenizerNotFoundError(
        f"{what} tokenizer not found offline (looked in {where} and the Hugging Face cache for {hub_id}); "
        f"this trainer never downloads. Pass --tokenizer_cache_dir DIR where DIR/{dirname} holds the tokenizer "
        f"files. To make it on a machine with network: python -c \"from transformers import {cls}; "
        f"{cls}.from_pretrained('{hub_id}').save_pretrained('DIR/{dirname}')\" and copy DIR over.")


# transformers 5 silently returns an empty tokenizer for a folder or hub id without tokenizer files,
# so a folder is only used when one of these is present.
_CLIP_FILES = ("tokenizer.json", "vocab.json")
_T5_FILES = ("tokenizer.json", "spiece.model")


def _usable_dir(path: Path, needed: tuple[str, ...]) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in needed)


def _from_hf_cache(cls, hub_id: str, needed: tuple[str, ...] = _T5_FILES):
    """A tokenizer from an already-populated Hugging Face cache; never downloads."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(hub_id, local_files_only=True))
    except Exception as e:  # any failure here just means "not cached"
        logger.debug("no cached %s: %s", hub_id, e)
        return None
    if not _usable_dir(folder, needed):
        return None
    return cls.from_pretrained(str(folder), local_files_only=True)


def _from_cache_dir(cls, cache_dir, dirname: str, needed: tuple[str, ...]):
    if not cache_dir:
        return None
    folder = Path(cache_dir) / dirname
    if folder.is_dir() and not _usable_dir(folder, needed):
        logger.warning("%s exists but holds none of %s; ignoring it", folder, ", ".join(needed))
        return None
    return cls.from_pretrained(str(folder), local_files_only=True) if folder.is_dir() else None


def _byte_tokens() -> list[str]:
    """GPT-2/CLIP byte alphabet in vocabulary order: printable bytes stand for themselves and come
    first; every other byte gets a code point from 256 up, appended in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    rest = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(rest))]


def open_clip_bpe_path() -> Path | None:
    """The CLIP BPE file inside the installed open_clip package, located without importing it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / _CLIP_BPE_NAME
    return path if path.is_file() else None


def clip_vocab_and_merges(bpe_gz: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Rebuild CLIP's vocab.json/merges.txt content from the gzipped BPE merge list."""
    lines = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + _CLIP_NUM_MERGES]]
    # Order matters: byte tokens, then their end-of-word forms, then merges, then the two specials.
    chars = _byte_tokens()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer_from_bpe(bpe_gz: Path | None = None):
    from transformers import CLIPTokenizer

    bpe_gz = bpe_gz or open_clip_bpe_path()
    if bpe_gz is None:
        return None
    vocab, merges = clip_vocab_and_merges(bpe_gz)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = CLIP_MAX_LENGTH
    return tok


def load_clip_tokenizer(cache_dir: str | Path | None = None):
    """CLIP-L tokenizer (model_max_length 77), offline."""
    from transformers import CLIPTokenizer

    tok = (_from_cache_dir(CLIPTokenizer, cache_dir, CLIP_DIRNAME, _CLIP_FILES)
           or _from_hf_cache(CLIPTokenizer, CLIP_HUB_ID, _CLIP_FILES) or build_clip_tokenizer_from_bpe())
    if tok is None:
        raise _not_found("CLIP-L", CLIP_HUB_ID, CLIP_DIRNAME, cache_dir)
    tok.model_max_length = CLIP_MAX_LENGTH  # without it pipelines overflow computing max_length
    return tok


def load_t5_tokenizer(cache_dir: str | Path | None = None):
    """T5-XXL tokenizer (model_max_length 512), offline."""
    from transformers import T5TokenizerFast

    tok = (_from_cache_dir(T5TokenizerFast, cache_dir, T5_DIRNAME, _T5_FILES)
           or _from_hf_cache(T5TokenizerFast, T5_HUB_ID, _T5_FILES))
    if tok is None:
        raise _not_found("T5-XXL", T5_HUB_ID, T5_DIRNAME, cache_dir)
    tok.model_max_length = T5_MAX_LENGTH
    return tok
