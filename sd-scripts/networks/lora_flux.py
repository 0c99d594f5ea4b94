"""Kohya-format LoRA for a diffusers FluxTransformer2DModel and (optionally) a CLIP-L text encoder.

Responsibilities: map sd-scripts' BFL-named LoRA modules (`lora_unet_double_blocks_0_img_attn_qkv`, ...)
onto the diffusers Linear layers they correspond to, hook those layers' outputs, and expose a
`LoRANetwork` whose `state_dict()` is exactly the kohya file layout (`.lora_down.weight`,
`.lora_up.weight`, `.alpha`). Fused BFL projections (qkv, single-block linear1) keep one shared
down matrix; their up matrix is split by rows across the separate diffusers projections.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from library import flux_convert
from library.errors import BadFileError

logger = logging.getLogger(__name__)

UNET_PREFIX = "lora_unet"
TE1_PREFIX = "lora_te1"

# LoRA name suffix (the BFL module path with `_` for `.`) -> diffusers module paths inside
# `transformer_blocks.{i}` / `single_transformer_blocks.{i}`, in the row order of the fused BFL weight
# (qkv = cat(q, k, v); linear1 = cat(q, k, v, mlp_in)). The key converter's tables, so the two never disagree.
DOUBLE_TARGETS = {bfl.replace(".", "_"): paths for bfl, paths in flux_convert.DOUBLE_BLOCK_LINEARS.items()}
SINGLE_TARGETS = {bfl.replace(".", "_"): paths for bfl, paths in flux_convert.SINGLE_BLOCK_LINEARS.items()}
# CLIP-L: every Linear inside each encoder layer's attention and MLP.
TE_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")

TRAIN_BLOCKS = ("all", "single", "double")
# --network_args keys upstream lora_flux understands but this trainer does not implement. A value that is
# upstream's no-op default is accepted silently (so a copied command line still runs); anything else is refused.
_UPSTREAM_ONLY_ARGS = (
    "split_qkv", "train_t5xxl", "img_attn_dim", "txt_attn_dim", "img_mlp_dim", "txt_mlp_dim", "img_mod_dim",
    "txt_mod_dim", "single_dim", "single_mod_dim", "in_dims", "train_double_block_indices",
    "train_single_block_indices", "conv_dim", "conv_alpha",
    "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "network_reg_dims",
    "network_reg_lrs", "ggpo_beta", "ggpo_sigma",
)
_NOOP_VALUES = {"", "none", "false", "0", "0.0", "all"}


class LoRAWeightsError(BadFileError):
    """A LoRA weights file does not fit the network (missing/extra/mis-shaped key)."""


@dataclass(frozen=True)
class _Target:
    """One diffusers Linear driven by (a row slice of) a kohya LoRA module."""

    module: nn.Linear
    row_start: int
    row_end: int


class LoRAModule(nn.Module):
    """One kohya LoRA module: `lora_down` (rank x in), `lora_up` (out x rank, zero init), buffer `alpha`.

    `out` is the summed out_features of all diffusers Linears it drives (fused BFL layers).
    """

    def __init__(self, name: str, in_features: int, out_features: int, rank: int, alpha: float | None,
                 multiplier: float = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, num_targets: int = 1):
        super().__init__()
        self.lora_name = name
        self.rank = int(rank)
        self.lora_down = nn.Linear(in_features, self.rank, bias=False)
        self.lora_up = nn.Linear(self.rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        if alpha is None or float(alpha) == 0.0:
            alpha = float(self.rank)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.multiplier = float(multiplier)
        self.dropout = float(dropout) if dropout else 0.0
        self.rank_dropout = float(rank_dropout) if rank_dropout else 0.0
        self.module_dropout = float(module_dropout) if module_dropout else 0.0
        self.num_targets = int(num_targets)  # diffusers Linears sharing this module's down projection
        self._shared = None  # (input key, h, scale, slices left) while one forward's slices are served
        self._alpha_value = float(alpha)
        # A state dict load (accelerate resume, load_weights) may change alpha; keep the cached float in sync
        # so the hot path never reads a device tensor.
        self.register_load_state_dict_post_hook(_refresh_alpha_after_load)

    def _refresh_alpha(self) -> None:
        value = float(self.alpha.detach().float().cpu())
        self._alpha_value = value if value != 0.0 else float(self.rank)

    @property
    def scale(self) -> float:
        return self.multiplier * self._alpha_value / self.rank

    @property
    def drops(self) -> bool:
        return self.training and bool(self.dropout or self.rank_dropout or self.module_dropout)

    def delta(self, x: torch.Tensor, row_start: int, row_end: int) -> torch.Tensor | None:
        """LoRA output rows [row_start, row_end) for input x, computed in x's dtype (None: module dropped)."""
        up = self.lora_up.weight[row_start:row_end].to(dtype=x.dtype)
        if self.drops:
            h, scale = self._dropped_down(x)
            return None if h is None else nn.functional.linear(h, up) * scale
        h = nn.functional.linear(x, self.lora_down.weight.to(dtype=x.dtype))
        return nn.functional.linear(h, up) * self.scale

    def _dropped_down(self, x: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """Upstream's training-time dropouts, drawn once per forward and shared by all slices of a fused module
        (upstream computes one down projection for q, k, v together): module_dropout skips the module
        (CPU draw), network_dropout drops down-projection features, rank_dropout zeroes whole ranks per sample
        and rescales by 1 / (1 - rank_dropout). Draws use the global RNG, which the trainer seeds per step."""
        key = (x.data_ptr(), tuple(x.shape), x.device)
        if self._shared is not None and self._shared[0] == key:
            _, h, scale, left = self._shared
            self._shared = (key, h, scale, left - 1) if left > 1 else None
            return h, scale
        h, scale = None, self.scale
        if not (self.module_dropout and torch.rand(1) < self.module_dropout):
            h = nn.functional.linear(x, self.lora_down.weight.to(dtype=x.dtype))
            if self.dropout:
                h = nn.functional.dropout(h, p=self.dropout)
            if self.rank_dropout:
                mask = torch.rand((h.size(0), self.rank), device=h.device) > self.rank_dropout
                if h.dim() == 3:
                    mask = mask.unsqueeze(1)
                h = h * mask.to(h.dtype)
                scale = scale / (1.0 - self.rank_dropout)
        self._shared = (key, h, scale, self.num_targets - 1) if self.num_targets > 1 else None
        return h, scale


def _refresh_alpha_after_load(module: LoRAModule, _incompatible_keys) -> None:
    module._refresh_alpha()  # a module-level function (not a lambda) keeps the network picklable


class LoRANetwork(nn.Module):
    """Container whose children are LoRAModules named exactly like kohya's keys (so state_dict() = file)."""

    def __init__(self, unet_specs: dict[str, tuple[_Target, ...]], te_specs: dict[str, tuple[_Target, ...]], *,
                 dims: dict[str, int], alphas: dict[str, float | None], multiplier: float = 1.0,
                 dropout: float | None = None, verbose: bool = False, rank_dropout: float | None = None,
                 module_dropout: float | None = None):
        super().__init__()
        self.multiplier = float(multiplier)
        self._targets: dict[str, tuple[_Target, ...]] = {}
        self._hooks: dict[str, list] = {}
        self.unet_module_names: list[str] = []
        self.te_module_names: list[str] = []
        for names, specs in ((self.unet_module_names, unet_specs), (self.te_module_names, te_specs)):
            for name, targets in specs.items():
                in_features = targets[0].module.in_features
                out_features = targets[-1].row_end
                mod = LoRAModule(name, in_features, out_features, dims[name], alphas.get(name),
                                 multiplier=multiplier, dropout=dropout, rank_dropout=rank_dropout,
                                 module_dropout=module_dropout, num_targets=len(targets))
                self.add_module(name, mod)
                self._targets[name] = targets
                names.append(name)
        logger.info("LoRA network: %d transformer modules, %d text encoder modules",
                    len(self.unet_module_names), len(self.te_module_names))
        if verbose:
            for name in self.unet_module_names + self.te_module_names:
                mod = self.get_submodule(name)
                logger.info("  %s: in %d out %d rank %d alpha %g", name, mod.lora_down.in_features,
                            mod.lora_up.out_features, mod.rank, mod._alpha_value)

    # ----- applying -------------------------------------------------------------------------------------
    @property
    def is_te_trained(self) -> bool:
        return bool(self.te_module_names)

    def lora_modules(self) -> Iterable[LoRAModule]:
        for name in self.unet_module_names + self.te_module_names:
            yield self.get_submodule(name)

    def apply_to(self, text_encoders=None, flux=None, apply_text_encoder: bool = True, apply_unet: bool = True):
        """Hook the diffusers Linears. Idempotent. Dropping a side removes its modules from the network
        (and so from state_dict), like upstream dropping its lists."""
        del text_encoders, flux  # targets were resolved at construction; kept for the upstream signature
        if not apply_text_encoder:
            self._drop(self.te_module_names)
        if not apply_unet:
            self._drop(self.unet_module_names)
        for name in self.unet_module_names + self.te_module_names:
            if name in self._hooks:
                continue
            lora = self.get_submodule(name)
            self._hooks[name] = [
                t.module.register_forward_hook(_make_hook(lora, t.row_start, t.row_end), with_kwargs=True)
                for t in self._targets[name]
            ]

    def _drop(self, names: list[str]) -> None:
        for name in list(names):
            for handle in self._hooks.pop(name, []):
                handle.remove()
            delattr(self, name)
            del self._targets[name]
        names.clear()

    def remove_hooks(self) -> None:
        """Detach from the base models (for tests and for sampling a base model afterwards)."""
        for handles in self._hooks.values():
            for handle in handles:
                handle.remove()
        self._hooks.clear()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        for lora in self.lora_modules():
            lora.multiplier = self.multiplier

    # ----- training helpers -----------------------------------------------------------------------------
    def get_trainable_params(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr) -> list[dict]:
        """Param groups (each with "lr"): CLIP-L modules first, then transformer modules; empty groups dropped.
        `text_encoder_lr` may be a float or upstream's list [clip_l_lr, t5_lr]."""
        if isinstance(text_encoder_lr, (list, tuple)):
            text_encoder_lr = text_encoder_lr[0] if text_encoder_lr else None
        groups = []
        for names, lr in ((self.te_module_names, text_encoder_lr), (self.unet_module_names, unet_lr)):
            params = [p for n in names for p in self.get_submodule(n).parameters()]
            if params:
                groups.append({"params": params, "lr": float(lr if lr is not None else default_lr)})
        return groups

    def prepare_grad_etc(self, text_encoder=None, unet=None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder=None, unet=None) -> None:
        self.train()

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device=None) -> tuple[int, float, float]:
        """--scale_weight_norms: shrink each module whose effective delta (scale * up @ down) has a Frobenius
        norm above `max_norm_value`, splitting the factor evenly between up and down.
        Returns (modules scaled, mean norm after, max norm after)."""
        del device
        scaled, norms = 0, []
        for lora in self.lora_modules():
            up, down = lora.lora_up.weight, lora.lora_down.weight
            norm = (up.float() @ down.float()).norm() * abs(lora._alpha_value / lora.rank)
            if norm > max_norm_value:
                factor = float(max_norm_value / norm) ** 0.5
                up.mul_(factor)
                down.mul_(factor)
                norm = norm * factor * factor
                scaled += 1
            norms.append(float(norm))
        if not norms:
            return 0, 0.0, 0.0
        return scaled, sum(norms) / len(norms), max(norms)

    # ----- saving / loading -----------------------------------------------------------------------------
    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The kohya file content: contiguous CPU tensors, optionally cast to `dtype`."""
        out = {}
        for key, value in self.state_dict().items():
            value = value.detach().to("cpu")
            if dtype is not None:
                value = value.to(dtype)
            out[key] = value.contiguous()
        return out

    def load_weights(self, path_or_sd, *, strict: bool = True) -> tuple[list[str], list[str]]:
        """Load a kohya LoRA (path to .safetensors / .pt, or a dict); returns (missing, unexpected) keys.

        strict: any missing or extra key is an error naming it. strict=False (upstream's --network_weights)
        loads the keys both sides have; shape mismatches are errors either way."""
        if isinstance(path_or_sd, (str, os.PathLike)):
            source = os.fspath(path_or_sd)
        else:
            source = getattr(path_or_sd, "source", "<state dict>")
        sd = _read_weights(path_or_sd)
        own = self.state_dict()
        missing = sorted(set(own) - set(sd))
        extra = sorted(set(sd) - set(own))
        if not strict:
            sd = {k: v for k, v in sd.items() if k in own}
        if strict and missing:
            raise LoRAWeightsError(f"{source}: missing LoRA key {missing[0]!r} ({len(missing)} missing in all); "
                                   "the file was made for a different network (check --network_dim, "
                                   "--network_args train_blocks and --network_train_unet_only)")
        if strict and extra:
            raise LoRAWeightsError(f"{source}: unexpected LoRA key {extra[0]!r} ({len(extra)} extra in all); "
                                   "the file was made for a different network or model")
        for key, value in sd.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise LoRAWeightsError(f"{source}: key {key!r} has shape {tuple(value.shape)}, the network expects "
                                       f"{tuple(own[key].shape)} (different --network_dim or model size)")
        self.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=strict)
        return missing, extra


def _make_hook(lora: LoRAModule, row_start: int, row_end: int):
    def hook(_module, args, kwargs, output):
        x = args[0] if args else kwargs["input"]
        delta = lora.delta(x, row_start, row_end)
        return output if delta is None else output + delta.to(output.dtype)

    return hook


def _read_weights(path_or_sd) -> dict[str, torch.Tensor]:
    if isinstance(path_or_sd, dict):
        return dict(path_or_sd)
    path = os.fspath(path_or_sd)
    if not os.path.isfile(path):
        raise LoRAWeightsError(f"{path}: LoRA weights file not found (check --network_weights / the path)")
    if path.endswith((".safetensors", ".sft")):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


# ----- target discovery ---------------------------------------------------------------------------------
def _linear(root: nn.Module, path: str, owner: str) -> nn.Linear:
    try:
        mod = root.get_submodule(path)
    except AttributeError as exc:
        raise ValueError(f"FLUX transformer has no module {owner}.{path}; is this a diffusers "
                         "FluxTransformer2DModel?") from exc
    if not isinstance(mod, nn.Linear):
        raise ValueError(f"{owner}.{path} is {type(mod).__name__}, expected a Linear layer")
    return mod


def _targets_for(block: nn.Module, owner: str, paths: tuple[str, ...]) -> tuple[_Target, ...]:
    targets, row = [], 0
    in_features = None
    for path in paths:
        mod = _linear(block, path, owner)
        if in_features is not None and mod.in_features != in_features:
            raise ValueError(f"{owner}: fused LoRA parts disagree on input size ({path})")
        in_features = mod.in_features
        targets.append(_Target(mod, row, row + mod.out_features))
        row += mod.out_features
    return tuple(targets)


def flux_lora_targets(flux: nn.Module, train_blocks: str = "all") -> dict[str, tuple[_Target, ...]]:
    """kohya name -> diffusers Linears, for every block of `flux` (sizes read from the modules)."""
    if getattr(flux, "transformer_blocks", None) is None or getattr(flux, "single_transformer_blocks", None) is None:
        raise ValueError("LoRA: the FLUX model must be a diffusers FluxTransformer2DModel "
                         "(transformer_blocks / single_transformer_blocks)")
    specs: dict[str, tuple[_Target, ...]] = {}
    if train_blocks in ("all", "double"):
        for i, block in enumerate(flux.transformer_blocks):
            _refuse_fused(block, f"transformer_blocks.{i}")
            for suffix, paths in DOUBLE_TARGETS.items():
                specs[f"{UNET_PREFIX}_double_blocks_{i}_{suffix}"] = _targets_for(block, f"transformer_blocks.{i}", paths)
    if train_blocks in ("all", "single"):
        for i, block in enumerate(flux.single_transformer_blocks):
            _refuse_fused(block, f"single_transformer_blocks.{i}")
            for suffix, paths in SINGLE_TARGETS.items():
                specs[f"{UNET_PREFIX}_single_blocks_{i}_{suffix}"] = _targets_for(
                    block, f"single_transformer_blocks.{i}", paths)
    return specs


def _refuse_fused(block: nn.Module, owner: str) -> None:
    # After fuse_qkv_projections() diffusers calls to_qkv instead of to_q/to_k/to_v, so hooks would never fire.
    if getattr(getattr(block, "attn", None), "fused_projections", False):
        raise ValueError(f"{owner}: QKV projections are fused; call unfuse_qkv_projections() before adding LoRA")


def clip_lora_targets(clip: nn.Module) -> dict[str, tuple[_Target, ...]]:
    """kohya `lora_te1_text_model_encoder_layers_{i}_...` -> CLIP-L Linears (with or without a text_model wrapper)."""
    layers_root = getattr(clip, "text_model", clip)
    encoder = getattr(layers_root, "encoder", None)
    if encoder is None or not hasattr(encoder, "layers"):
        raise ValueError("LoRA: text encoder 1 must be a transformers CLIPTextModel (encoder.layers missing)")
    specs = {}
    for i, layer in enumerate(encoder.layers):
        for path in TE_TARGETS:
            name = f"{TE1_PREFIX}_text_model_encoder_layers_{i}_{path.replace('.', '_')}"
            mod = _linear(layer, path, f"encoder.layers.{i}")
            specs[name] = (_Target(mod, 0, mod.out_features),)
    return specs


# ----- factories (upstream signatures) ------------------------------------------------------------------
DROPOUT_ARGS = ("rank_dropout", "module_dropout")


def dropout_args(kwargs: dict) -> dict[str, float | None]:
    """rank_dropout / module_dropout from --network_args (a probability in [0, 1); None when absent)."""
    result: dict[str, float | None] = {}
    for key in DROPOUT_ARGS:
        text = "" if kwargs.get(key) is None else str(kwargs[key]).strip()
        if text.lower() in ("", "none"):
            result[key] = None
            continue
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"network_args: {key}={kwargs[key]!r} is not a number") from None
        if not 0.0 <= value < 1.0:
            raise ValueError(f"network_args: {key}={value} must be at least 0 and below 1")
        result[key] = value or None
    return result


def _parse_network_args(kwargs: dict) -> tuple[str, bool]:
    train_blocks, verbose = "all", False
    dropout_args(kwargs)  # validates
    for key, value in kwargs.items():
        text = "" if value is None else str(value).strip()
        if key in DROPOUT_ARGS:
            continue
        if key == "train_blocks":
            train_blocks = (text or "all").lower()
            if train_blocks not in TRAIN_BLOCKS:
                raise ValueError(f"network_args: train_blocks={value!r} is invalid; use one of {', '.join(TRAIN_BLOCKS)}")
        elif key == "verbose":
            verbose = text.lower() == "true"
        elif key in _UPSTREAM_ONLY_ARGS:
            if text.lower() not in _NOOP_VALUES:
                raise ValueError(f"network_args: {key} is not supported by this trainer (remove '{key}={value}' "
                                 "from --network_args)")
        else:
            raise ValueError(f"network_args: unknown key {key!r}; this trainer understands train_blocks=all|single|"
                             "double, rank_dropout, module_dropout and verbose=True")
    return train_blocks, verbose


def parse_network_args(kwargs: dict) -> tuple[str, bool]:
    """(train_blocks, verbose) from --network_args strings; ValueError naming a bad or unsupported key."""
    return _parse_network_args(kwargs)


def _clip_of(text_encoders):
    if text_encoders is None:
        return None
    if isinstance(text_encoders, (list, tuple)):
        return text_encoders[0] if text_encoders else None
    return text_encoders


def create_network(multiplier, network_dim, network_alpha, vae, text_encoders, flux, neuron_dropout=None,
                   **kwargs) -> LoRANetwork:
    """Upstream-compatible factory. `kwargs` are the --network_args strings. CLIP-L modules are created
    when a CLIP model is given; `apply_to(apply_text_encoder=False)` drops them (--network_train_unet_only)."""
    del vae
    train_blocks, verbose = _parse_network_args(kwargs)
    rank = int(network_dim) if network_dim is not None else 4
    alpha = float(network_alpha) if network_alpha is not None else 1.0
    if rank <= 0:
        raise ValueError(f"--network_dim must be a positive integer, got {network_dim!r}")
    unet_specs = flux_lora_targets(flux, train_blocks)
    clip = _clip_of(text_encoders)
    te_specs = clip_lora_targets(clip) if clip is not None else {}
    names = list(unet_specs) + list(te_specs)
    return LoRANetwork(unet_specs, te_specs, dims={n: rank for n in names}, alphas={n: alpha for n in names},
                       multiplier=multiplier, dropout=neuron_dropout, verbose=verbose, **dropout_args(kwargs))


def create_network_from_weights(multiplier, file, vae, text_encoders, flux, weights_sd=None, **kwargs):
    """Build a network shaped like a kohya file (rank/alpha per module from the file) and load it.
    Returns `(network, weights_sd)` like upstream. Keys the models have no module for are an error."""
    del vae
    _, verbose = _parse_network_args({k: v for k, v in kwargs.items() if k in ("verbose",)})
    if weights_sd is None:
        weights_sd = _read_weights(file)
    source = str(file) if file is not None else "<state dict>"
    dims, alphas = {}, {}
    for key, value in weights_sd.items():
        name, _, leaf = key.partition(".")
        if leaf == "lora_down.weight":
            dims[name] = int(value.shape[0])
        elif leaf == "alpha":
            alphas[name] = float(value.float())
    available = flux_lora_targets(flux, "all") if flux is not None else {}
    clip = _clip_of(text_encoders)
    available_te = clip_lora_targets(clip) if clip is not None else {}
    unknown = sorted(n for n in dims if n not in available and n not in available_te)
    if unknown:
        raise LoRAWeightsError(f"{source}: LoRA module {unknown[0]!r} has no matching layer in the loaded models "
                               f"({len(unknown)} unmatched); the file is for a different model")
    unet_specs = {n: t for n, t in available.items() if n in dims}
    te_specs = {n: t for n, t in available_te.items() if n in dims}
    network = LoRANetwork(unet_specs, te_specs, dims=dims, alphas=alphas, multiplier=multiplier, verbose=verbose)
    to_load = _WithSource(weights_sd, source)
    for name in dims:
        if name not in alphas:  # upstream treats a missing alpha as alpha = rank
            to_load[f"{name}.alpha"] = torch.tensor(float(dims[name]))
    network.load_weights(to_load)
    return network, weights_sd


class _WithSource(dict):
    """A loaded state dict that remembers its file name for error messages."""

    def __init__(self, sd: dict, source: str):
        super().__init__(sd)
        self.source = source
