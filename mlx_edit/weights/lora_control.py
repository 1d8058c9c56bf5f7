"""What BFL control LoRA files carry besides low-rank pairs: QK-norm scales, and an
`img_in` LoRA wider than FLUX.1-dev's input (128 = 64 latent + 64 control channels).

FLUX.1-Canny-dev-lora / FLUX.1-Depth-dev-lora (BFL `src/flux/modules/lora.py`,
`util.py`): `lora_A`/`lora_B` (with `lora_B.bias`) on every linear, plus
`double_blocks.N.{img,txt}_attn.norm.{query,key}_norm.scale` and
`single_blocks.N.norm.{query,key}_norm.scale` holding full replacement values. diffusers
detects the kind by `query_norm.scale` (`FluxLoraLoaderMixin.lora_state_dict`,
`lora_conversion_utils._convert_bfl_flux_control_lora_to_diffusers`) and also takes the
same norms in its own naming (`_control_lora_supported_norm_keys`: norm_q, norm_k,
norm_added_q, norm_added_k). Applying them is `mlx_edit.models.lora_control`.

One deliberate difference: for `final_layer.adaLN_modulation.1` diffusers' converter
swaps the [shift; scale] halves of lora_A (its rank axis) as well as of lora_B, which
changes B @ A (diffusers issue 13998 reports the same in its sd-scripts converter); we
swap B's rows (and the bias) only, which is what BFL's own LoRA layer computes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

from mlx_edit.models.lora_control import WIDENABLE

_D, _S = "double_blocks.{i}.", "single_blocks.{i}."
_T, _ST = "transformer_blocks.{i}.", "single_transformer_blocks.{i}."

# (norm scale in the file, our parameter): BFL names, then diffusers'.
NORMS: tuple[tuple[str, str], ...] = (
    (_D + "{s}_attn.norm.query_norm.scale", _D + "{s}_attn.norm_q.weight"),
    (_D + "{s}_attn.norm.key_norm.scale", _D + "{s}_attn.norm_k.weight"),
    (_S + "norm.query_norm.scale", _S + "norm_q.weight"),
    (_S + "norm.key_norm.scale", _S + "norm_k.weight"),
    (_T + "attn.norm_q.weight", _D + "img_attn.norm_q.weight"),
    (_T + "attn.norm_k.weight", _D + "img_attn.norm_k.weight"),
    (_T + "attn.norm_added_q.weight", _D + "txt_attn.norm_q.weight"),
    (_T + "attn.norm_added_k.weight", _D + "txt_attn.norm_k.weight"),
    (_ST + "attn.norm_q.weight", _S + "norm_q.weight"),
    (_ST + "attn.norm_k.weight", _S + "norm_k.weight"),
)
PREFIXES = ("transformer.", "model.diffusion_model.", "diffusion_model.", "base_model.model.",
            "")


def _compile(pattern: str) -> re.Pattern:
    out = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile(out.replace(r"\{s\}", "(?P<s>img|txt)") + r"\Z")


_RULES = [(_compile(src), dst) for src, dst in NORMS]


def norm_target(key: str) -> str | None:
    """Our parameter path of a file's QK-norm scale key, or None."""
    for prefix in PREFIXES:
        if key.startswith(prefix):
            for regex, dst in _RULES:
                m = regex.match(key[len(prefix):])
                if m:
                    return dst.format(**m.groupdict())
    return None


def split_norms(tensors: Mapping[str, np.ndarray]
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """({our norm parameter path: float32 values}, the other tensors) of a LoRA file."""
    norms, rest = {}, {}
    for key, value in tensors.items():
        target = norm_target(key)
        if target is None:
            rest[key] = value
        else:
            norms[target] = np.asarray(value, np.float32)
    return norms, rest


def input_widths(parts: Mapping[str, list]) -> dict[str, int]:
    """{widenable layer: the widest LoRA A input} of a file's parts (mlx_edit.models.lora
    Part lists by layer path)."""
    return {path: max(p.in_features for p in parts[path]) for path in WIDENABLE if path in parts}


def pad_inputs(a: np.ndarray, path: str, in_features: int) -> np.ndarray:
    """A (rank, in) zero-padded to `in_features` inputs on a widened layer (diffusers
    `_maybe_expand_lora_state_dict`: a 64-input img_in LoRA on a 128-input model reads
    only the latent channels); other layers and equal widths are returned as they are."""
    if path not in WIDENABLE or a.shape[1] >= in_features:
        return a
    return np.concatenate([a, np.zeros((a.shape[0], in_features - a.shape[1]), a.dtype)], 1)


def effective_config(config, loras: Mapping) -> object:
    """The transformer config once `loras` ({name: LoadedLoRA}) are applied: a control
    LoRA on FLUX.1-dev makes in_channels 128 (the Canny/Depth control variant)."""
    changes = {}
    for path, field in WIDENABLE.items():
        widths = [lora.file.widths.get(path, 0) for lora in loras.values()]
        if max(widths, default=0) > getattr(config, field):
            changes[field] = max(widths)
    return dataclasses.replace(config, **changes) if changes else config
