"""--weighted_captions: upstream's prompt-weight rules, per-token T5 weights, and the mean-keeping rescale.

Expected weights are written from the rules ((x) x1.1, [x] /1.1, (x:w) xw, nesting multiplies), expected
tensors from the formula out = h * w * mean(h) / mean(h * w); the trainer-level checks (cache separation)
are in test_guidance_bypass_and_model_type.py.
"""
from __future__ import annotations

import pytest
import torch

from library import flux_loading as fl
from library import flux_tokenizers as ft
from library.prompt_weights import apply_token_weights, parse_weighted, token_weights
from library.text_encoding import FluxTextEncoder

UP = 1.1


@pytest.mark.parametrize("caption, expected", [
    ("a red car", [("a red car", 1.0)]),
    ("a (red) car", [("a ", 1.0), ("red", UP), (" car", 1.0)]),
    ("[dim] light", [("dim", 1 / UP), (" light", 1.0)]),
    ("((deep)) [[faint]]", [("deep", UP * UP), (" ", 1.0), ("faint", 1 / UP / UP)]),
    ("(big:1.5) dog", [("big", 1.5), (" dog", 1.0)]),
    ("((cat:1.5) hat)", [("cat", 1.5 * UP), (" hat", UP)]),
    ("(neg:-0.5)", [("neg", -0.5)]),
    ("(open ended", [("open ended", UP)]),  # an unclosed bracket weighs to the end
    ("[open (both", [("open ", 1 / UP), ("both", UP / UP)]),  # both brackets unclosed: x1.1 then /1.1
    ("\\(not weighted\\) \\[x\\] a\\\\b", [("(not weighted) [x] a\\b", 1.0)]),
    ("stray) and ]", [("stray) and ]", 1.0)]),  # unmatched closers are text
    ("ratio 3:2, label:1.3) x", [("ratio 3:2, label:1.3) x", 1.0)]),  # `:w)` with no open `(` is text
    ("(a: b)", [("a: b", UP)]),  # not `:number)`: the colon is text
    ("(a:1.2.3)", [("a:1.2.3", UP)]),  # not a number: text, and `)` closes with x1.1
    ("", [("", 1.0)]),
])
def test_parser_follows_upstream_rules(caption, expected):
    runs = parse_weighted(caption)
    assert [text for text, _ in runs] == [text for text, _ in expected]
    assert [w for _, w in runs] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_upstream_documented_example():
    runs = parse_weighted("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    assert runs == [("a ", 1.0), ("house", pytest.approx(1.3 * UP * UP)), (" ", UP), ("on", pytest.approx(1.0)),
                    (" a ", UP), ("hill", pytest.approx(0.5 * UP)), (", sun, ", UP),
                    ("sky", pytest.approx(UP ** 4)), (".", UP)]


def test_token_weights_from_character_offsets():
    plain = "a big cat"
    chars = [1.0, 1.0, 2.0, 2.0, 2.0, 1.0, 3.0, 3.0, 3.0]
    # tokens: "a", " big" (leading space ignored), "ca" + "t" split mid-word, special token, a span of spaces
    offsets = [(0, 1), (1, 5), (6, 8), (8, 9), (0, 0), (5, 6)]
    assert token_weights(offsets, plain, chars) == [1.0, 2.0, 3.0, 3.0, 1.0, 1.0]
    mixed = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 4.0, 6.0]
    assert token_weights([(6, 9)], plain, mixed) == [4.0]  # a token over differently weighted characters: mean


def test_apply_token_weights_keeps_the_mean():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],
                           [[1.0, -1.0], [2.0, 0.5], [0.0, 3.0]],
                           [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    weights = torch.tensor([[1.0, 2.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    out = apply_token_weights(hidden, weights)
    # caption 0: mean 21/6 = 3.5; weighted [[1,2],[6,8],[5,6]] has mean 28/6; scale 3.5 / (28/6) = 0.75
    assert torch.allclose(out[0], torch.tensor([[0.75, 1.5], [4.5, 6.0], [3.75, 4.5]]), atol=1e-6)
    assert torch.equal(out[1], hidden[1])  # all weights 1: unchanged, bit for bit
    assert torch.equal(out[2], torch.zeros(3, 2))  # mean 0 after weighting: no rescale exists, none applied
    assert out[0].mean().item() == pytest.approx(hidden[0].mean().item())
    half = apply_token_weights(hidden.to(torch.bfloat16), weights)
    assert half.dtype == torch.bfloat16  # computed in float32, returned in the states' dtype


@pytest.fixture(scope="module")
def encoders(tiny_models):
    cache = tiny_models["tokenizer_cache_dir"]
    parts = (ft.load_clip_tokenizer(cache), ft.load_t5_tokenizer(cache),
             fl.load_clip_l(tiny_models["clip_l"], dtype=torch.float32),
             fl.load_t5xxl(tiny_models["t5xxl"], dtype=torch.float32))
    return (FluxTextEncoder(*parts, t5_max_length=24, apply_t5_attn_mask=False),
            FluxTextEncoder(*parts, t5_max_length=24, apply_t5_attn_mask=False, weighted_captions=True))


def test_weighted_tokens_are_the_plain_captions_tokens(encoders):
    plain_enc, weighted_enc = encoders
    tokens = weighted_enc.tokenize(["tok, (red:2) cat", "[dim] light"])
    plain = plain_enc.tokenize(["tok, red cat", "dim light"])
    assert torch.equal(tokens["clip_ids"], plain["clip_ids"]) and torch.equal(tokens["t5_ids"], plain["t5_ids"])
    t5 = weighted_enc.t5_tokenizer
    pieces = t5.convert_ids_to_tokens(tokens["t5_ids"][0].tolist())
    for piece, weight in zip(pieces, tokens["t5_weights"][0].tolist()):
        # every piece of "red" weighs 2 (the tiny tokenizer may split words); the rest, EOS and padding 1
        assert weight == pytest.approx(2.0 if piece.strip("\u2581") in ("red", "r", "e", "d", "re", "ed") else 1.0)
    assert 2.0 in tokens["t5_weights"][0].tolist()
    assert tokens["t5_weights"][1].tolist().count(pytest.approx(1 / UP)) >= 1
    assert "t5_weights" not in plain_enc.tokenize(["tok, (red:2) cat"])


def test_weighted_encode_weights_t5_and_reads_clip_without_syntax(encoders):
    plain_enc, weighted_enc = encoders
    weighted = weighted_enc.encode(["tok, (red:2) cat"])
    plain = plain_enc.encode(["tok, red cat"])
    assert torch.equal(weighted["l_pooled"], plain["l_pooled"])  # CLIP-L: the caption with the syntax removed
    weights = weighted_enc.tokenize(["tok, (red:2) cat"])["t5_weights"]
    assert torch.allclose(weighted["t5_out"], apply_token_weights(plain["t5_out"], weights), atol=1e-6)
    assert not torch.allclose(weighted["t5_out"], plain["t5_out"])
    assert weighted["t5_out"].mean().item() == pytest.approx(plain["t5_out"].mean().item(), rel=1e-4, abs=1e-6)
    literal = plain_enc.encode(["tok, (red:2) cat"])  # without the flag the brackets are just text
    assert not torch.equal(literal["l_pooled"], plain["l_pooled"])
    # a caption without weight syntax encodes exactly as without the flag
    same = weighted_enc.encode(["tok, red cat"])
    assert all(torch.equal(same[k], plain[k]) for k in plain)
