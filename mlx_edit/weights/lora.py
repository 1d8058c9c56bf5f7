"""FLUX LoRA files: read, detect the naming, convert to updates of OUR layers.

Every LoRA format diffusers' `FluxLoraLoaderMixin.lora_state_dict` (FLUX.1) and
`Flux2LoraLoaderMixin.lora_state_dict` (FLUX.2) read (`loaders/lora_pipeline.py`,
`loaders/lora_conversion_utils.py`) is one naming scheme below, a table of (module name
pattern in the file -> our layer, output offset); FLUX.1 and FLUX.2 tables sit side by
side (their layer paths differ only where the models do, and `LoRAFile.updates` names
any layer a model lacks):

- ``diffusers``: PEFT names `transformer.transformer_blocks.N.attn.to_q.lora_A.weight`
  / `lora_B`, optional `.alpha` or PEFT metadata (`lora_adapter_metadata`);
- ``kohya``: `lora_unet_double_blocks_N_img_attn_qkv.lora_down.weight` / `lora_up` /
  `.alpha` (BFL module names with '_'), and kohya's `lora_transformer_*` (diffusers
  module names with '_');
- ``bfl``: BFL module names with `diffusion_model.` (ComfyUI; ai-toolkit's FLUX.2
  files, which may also name blocks as diffusers does), `base_model.model.` (fal
  Kontext) or no prefix, `lora_down/lora_up` or `lora_A/lora_B`;
- ``xlabs``: `double_blocks.N.processor.qkv_lora1.down.weight` (1 = image stream,
  2 = text), `single_blocks.N.processor.proj_lora.up.weight`.

LoKr files (FLUX.2; diffusers `_convert_lycoris_flux2_lokr_to_diffusers`,
`_convert_non_diffusers_flux2_lokr_to_diffusers`, `_convert_non_diffusers_lokr_to_diffusers`)
use the same tables with `.lokr_w1`/`.lokr_w1_a`/`_b`/`.lokr_w2`/`_a`/`_b` (+ `.alpha`)
tensors: ``lycoris`` (`lycoris_transformer_blocks_N_attn_to_q`, diffusers names with '_'),
ai-toolkit under ``bfl`` (`diffusion_model.double_blocks.N.img_attn.qkv`) and SimpleTuner
under ``diffusers`` (bare `transformer_blocks.N.attn.to_q`). Each module becomes a
`KronPart` (w1 with alpha/rank folded in when a factor is a product, as diffusers'
`_bake_lokr_alpha_`); a Kronecker delta cannot be split, so BFL's fused qkv is one part
of our fused layer and diffusers' separate q, k, v are parts at their row offsets.

BFL names address our fused layers whole (our layout is BFL's). diffusers' separate q, k,
v (and the single block's proj_mlp) become parts at their row offset, which
`mlx_edit.models.lora.combine` merges exactly. alpha/rank (PEFT: lora_alpha/r) is folded
into B. BFL control LoRAs (FLUX.1-Canny/Depth-dev-lora) also carry QK-norm scales and an
`img_in` LoRA of 128 inputs: `mlx_edit.weights.lora_control`. CLIP-L LoRAs (kohya
`lora_te1_*`, PEFT `text_encoder.*`) apply to the CLIP text tower:
`mlx_edit.weights.lora_text`. T5 LoRAs are not applied: a warning says so, as do DoRA
scales and the diff keys diffusers also drops. Any other key is an error naming it.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_edit.models.lora import (
    KronPart,
    KronUpdate,
    LayerUpdate,
    Part,
    check_targets,
    combine,
    find_layer,
    kron_update,
    linear_shape,
)
from mlx_edit.weights import lora_control as control
from mlx_edit.weights import lora_text as text
from mlx_edit.weights.core import WeightLoadError
from mlx_edit.weights.lora_control import effective_config  # noqa: F401  (pipeline's config)
from mlx_edit.weights.lora_sources import check_scale, default_name, locate, split_spec  # noqa: F401

_D, _S = "double_blocks.{i}.", "single_blocks.{i}."
_T, _ST = "transformer_blocks.{i}.", "single_transformer_blocks.{i}."

# (module in the file, our layer, output offset in units of the hidden size)
BFL_NAMES: tuple[tuple[str, str, int], ...] = (
    ("img_in", "img_in", 0), ("txt_in", "txt_in", 0),
    *((f"{e}.{n}", f"{e}.{n}", 0) for e in ("time_in", "vector_in", "guidance_in")
      for n in ("in_layer", "out_layer")),
    (_D + "{s}_mod.lin", _D + "{s}_mod", 0),
    (_D + "{s}_attn.qkv", _D + "{s}_attn.qkv", 0),
    (_D + "{s}_attn.proj", _D + "{s}_attn.proj", 0),
    (_D + "{s}_mlp.0", _D + "{s}_mlp.fc1", 0),
    (_D + "{s}_mlp.2", _D + "{s}_mlp.fc2", 0),
    (_S + "modulation.lin", _S + "modulation", 0),
    (_S + "linear1", _S + "linear1", 0),
    (_S + "linear2", _S + "linear2", 0),
    ("final_layer.linear", "final_layer.linear", 0),
    ("final_layer.adaLN_modulation.1", "final_layer.modulation", 0),  # rows swapped below
)
# BFL's final modulation is [shift; scale], ours (diffusers') [scale; shift]: B rows swap.
SWAPPED = ("final_layer.adaLN_modulation.1",)

# diffusers names FLUX.1 (FluxTransformer2DModel) and FLUX.2 (Flux2Transformer2DModel) share
_DIFFUSERS_COMMON: tuple[tuple[str, str, int], ...] = (
    ("x_embedder", "img_in", 0), ("context_embedder", "txt_in", 0),
    *((_T + f"attn.to_{c}", _D + "img_attn.qkv", k) for k, c in enumerate("qkv")),
    *((_T + f"attn.add_{c}_proj", _D + "txt_attn.qkv", k) for k, c in enumerate("qkv")),
    (_T + "attn.to_out.0", _D + "img_attn.proj", 0),
    (_T + "attn.to_add_out", _D + "txt_attn.proj", 0),
    ("norm_out.linear", "final_layer.modulation", 0),
    ("proj_out", "final_layer.linear", 0),
)


def _embedders(prefix: str, names) -> tuple[tuple[str, str, int], ...]:
    """`{prefix}.{d}_embedder.linear_1/2` -> `{o}_in.in_layer/out_layer` for (d, o) in names."""
    return tuple((f"{prefix}.{d}_embedder.linear_{n}", f"{o}_in.{layer}", 0) for d, o in names
                 for n, layer in ((1, "in_layer"), (2, "out_layer")))


DIFFUSERS_NAMES: tuple[tuple[str, str, int], ...] = (
    *_DIFFUSERS_COMMON,
    *_embedders("time_text_embed", (("timestep", "time"), ("guidance", "guidance"),
                                    ("text", "vector"))),
    (_T + "norm1.linear", _D + "img_mod", 0),
    (_T + "norm1_context.linear", _D + "txt_mod", 0),
    (_T + "ff.net.0.proj", _D + "img_mlp.fc1", 0),
    (_T + "ff.net.2", _D + "img_mlp.fc2", 0),
    (_T + "ff_context.net.0.proj", _D + "txt_mlp.fc1", 0),
    (_T + "ff_context.net.2", _D + "txt_mlp.fc2", 0),
    (_ST + "norm.linear", _S + "modulation", 0),
    *((_ST + f"attn.to_{c}", _S + "linear1", k) for k, c in enumerate("qkv")),
    (_ST + "proj_mlp", _S + "linear1", 3),
    (_ST + "proj_out", _S + "linear2", 0),
)

# FLUX.2 (mlx_edit/models/flux2.py): BFL names share BFL_NAMES (its blocks are named as
# FLUX.1's) plus the model-wide modulations below; diffusers' names differ from FLUX.1's
# past the common ones (`time_guidance_embed`, the shared modulations, `ff.linear_in`,
# the single blocks' fused `attn.to_qkv_mlp_proj`).
FLUX2_BFL_NAMES: tuple[tuple[str, str, int], ...] = (
    ("double_stream_modulation_{s}.lin", "double_mod_{s}", 0),
    ("single_stream_modulation.lin", "single_mod", 0),
)

FLUX2_DIFFUSERS_NAMES: tuple[tuple[str, str, int], ...] = (
    *_DIFFUSERS_COMMON,
    *_embedders("time_guidance_embed", (("timestep", "time"), ("guidance", "guidance"))),
    ("double_stream_modulation_{s}.linear", "double_mod_{s}", 0),
    ("single_stream_modulation.linear", "single_mod", 0),
    (_T + "ff.linear_in", _D + "img_mlp.fc1", 0),
    (_T + "ff.linear_out", _D + "img_mlp.fc2", 0),
    (_T + "ff_context.linear_in", _D + "txt_mlp.fc1", 0),
    (_T + "ff_context.linear_out", _D + "txt_mlp.fc2", 0),
    (_ST + "attn.to_qkv_mlp_proj", _S + "linear1", 0),
    (_ST + "attn.to_out", _S + "linear2", 0),
)

XLABS_NAMES: tuple[tuple[str, str, int], ...] = (
    (_D + "processor.qkv_lora1", _D + "img_attn.qkv", 0),
    (_D + "processor.qkv_lora2", _D + "txt_attn.qkv", 0),
    (_D + "processor.proj_lora1", _D + "img_attn.proj", 0),
    (_D + "processor.proj_lora2", _D + "txt_attn.proj", 0),
    (_S + "processor.qkv_lora", _S + "linear1", 0),
    (_S + "processor.proj_lora", _S + "linear2", 0),
)


@dataclass(frozen=True)
class Scheme:
    """A naming scheme: module-name prefixes, the name table, and the separator."""

    name: str
    prefixes: tuple[str, ...]
    table: tuple[tuple[str, str, int], ...]
    sep: str = "."


_BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "")

SCHEMES: tuple[Scheme, ...] = (
    Scheme("xlabs", ("diffusion_model.", ""), XLABS_NAMES),
    Scheme("diffusers", ("transformer.", ""), DIFFUSERS_NAMES),
    Scheme("diffusers", ("transformer.", ""), FLUX2_DIFFUSERS_NAMES),
    Scheme("kohya", ("lora_unet_",), BFL_NAMES + FLUX2_BFL_NAMES, "_"),
    Scheme("kohya", ("lora_transformer_",), DIFFUSERS_NAMES, "_"),
    Scheme("bfl", _BFL_PREFIXES, BFL_NAMES + FLUX2_BFL_NAMES),
    # ai-toolkit FLUX.2 files may carry diffusers block names under BFL prefixes
    # (diffusers `_convert_non_diffusers_flux2_lora_to_diffusers`)
    Scheme("bfl", _BFL_PREFIXES[:3], FLUX2_DIFFUSERS_NAMES),
    # LyCORIS LoKr on FLUX.2: diffusers module names with '_' (diffusers
    # `_convert_lycoris_flux2_lokr_to_diffusers`)
    Scheme("lycoris", ("lycoris_",), FLUX2_DIFFUSERS_NAMES, "_"),
    Scheme("kohya", text.KOHYA_PREFIXES, text.CLIP_NAMES, "_"),
    Scheme("diffusers", text.PEFT_PREFIXES, text.CLIP_NAMES),
)

# Tensor-name endings -> role. `.down/.up.weight` are XLabs'.
ROLES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "a"), (".lora_B.weight", "b"), (".lora_B.bias", "bias"),
    (".lora_down.weight", "a"), (".lora_up.weight", "b"),
    (".down.weight", "a"), (".up.weight", "b"), (".alpha", "alpha"),
    *((f".lokr_{w}", w) for w in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")),
)
KRON_ROLES = ("w1", "w1_a", "w2", "w2_a")

# Keys we knowingly do not apply (warned about, not errors): T5 LoRAs (kohya lora_te3_
# (lora_te2_ in older files), diffusers text_encoder_2, ComfyUI text_encoders.), DoRA
# magnitudes and the weight/bias diffs diffusers' kohya converter also drops.
IGNORED: tuple[tuple[str, str], ...] = (
    (r"^text_encoders\.clip_l\.", "ComfyUI-named CLIP-L LoRA (diffusers drops them too)"),
    (r"^(lora_te[23]_|text_encoder_2\.|text_encoders\.)", "T5 text-encoder LoRA"),
    (r"\.dora_scale$", "DoRA magnitude"),
    (r"\.diff(_b)?$", "weight diff"),
    (r"position_embedding|text_projection", "text-encoder embedding"),
)


def _regex(pattern: str, sep: str) -> re.Pattern:
    out = re.escape(pattern.replace(".", sep))
    out = out.replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{s\}", "(?P<s>img|txt)")
    return re.compile(out + r"\Z")


_COMPILED = [(s, [(_regex(src, s.sep), dst, off, src in SWAPPED) for src, dst, off in s.table])
             for s in SCHEMES]


def resolve_module(module: str) -> tuple[str, str, int, bool] | None:
    """(scheme name, our layer path, offset in hidden units, rows swapped) of a file's
    module name, or None."""
    for scheme, rules in _COMPILED:
        for prefix in scheme.prefixes:
            if not module.startswith(prefix):
                continue
            rest = module[len(prefix):]
            for regex, dst, offset, swap in rules:
                m = regex.match(rest)
                if m:
                    return scheme.name, dst.format(**m.groupdict()), offset, swap
    return None


def _split_role(key: str) -> tuple[str, str] | None:
    for suffix, role in ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _peft_scaling(metadata: Mapping[str, str], prefix: str = "transformer."):
    """module -> PEFT lora_alpha/r from diffusers' `lora_adapter_metadata` (its entries for
    the component `prefix`: "transformer." (also unprefixed entries) or "text_encoder."),
    or None."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    cfg = {k.removeprefix(prefix): v for k, v in json.loads(raw).items()
           if k.startswith(prefix) or prefix == "transformer."}
    if "lora_alpha" not in cfg:
        return None

    def pick(module, pattern_key, default):
        for pat, value in (cfg.get(pattern_key) or {}).items():
            if module == pat or module.endswith("." + pat):
                return value
        return default

    return lambda module, rank: pick(module, "alpha_pattern", cfg["lora_alpha"]) / pick(
        module, "rank_pattern", cfg.get("r", rank))


@dataclass
class LoRAFile:
    """A converted LoRA: parts per our layer path, the naming found, ignored keys, and
    a control LoRA's QK-norm replacements {our parameter path: values}."""

    parts: dict[str, list[Part]]
    formats: tuple[str, ...]
    ignored: dict[str, list[str]]
    norms: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def widths(self) -> dict[str, int]:
        """{widenable layer (img_in): input width its LoRA reads} (lora_control)."""
        return control.input_widths(self.parts)

    @property
    def updates_transformer(self) -> bool:
        """Whether it changes the FLUX transformer (False: a CLIP-only LoRA)."""
        return bool(self.norms or text.split_parts(self.parts)[0])

    @property
    def text_parts(self) -> dict[str, list[Part]]:
        """Parts of CLIP text-encoder layers (lora_text), by our CLIP layer path."""
        return text.split_parts(self.parts)[1]

    @property
    def structural(self) -> bool:
        """Whether applying it may change the model beyond adapters (norms, widening)."""
        return bool(self.norms or self.widths)

    @property
    def parameter_count(self) -> int:
        """LoRA parameters once applied (upper bound: stacked downs are counted per part)."""
        return sum(p.size for parts in self.parts.values() for p in parts)

    def updates(self, model) -> dict[str, LayerUpdate]:
        """Exact per-layer updates of the FLUX transformer `model` (see models/lora.combine).

        Raises WeightLoadError naming every layer the model lacks or that does not fit.
        """
        return _updates(model, text.split_parts(self.parts)[0])

    def text_updates(self, clip) -> dict[str, LayerUpdate]:
        """Exact per-layer updates of the CLIP text tower `clip` (WeightLoadError as
        `updates`)."""
        return _updates(clip, self.text_parts)


def _updates(model, all_parts: Mapping[str, list[Part]]) -> dict[str, LayerUpdate]:
    """Per-layer updates of `model` from parts by layer path (see LoRAFile.updates)."""
    hidden = model.config.hidden_size
    shaped = {p: _layer_shape(model, p) for p in all_parts}
    missing = [f"{p} (no such layer in this model)" for p, s in shaped.items() if s is None]
    if missing:
        raise WeightLoadError("LoRA targets layers this model lacks (a LoRA for another "
                              "FLUX model?): " + "; ".join(missing))
    updates = {}
    for path, parts in all_parts.items():
        out, inp = shaped[path]
        try:
            updates[path] = _layer_update(path, parts, hidden, inp, out)
        except ValueError as e:
            raise WeightLoadError(f"LoRA for {path}: {e}") from None
    problems = check_targets(model, updates)
    if problems:
        raise WeightLoadError("LoRA does not fit this model: " + "; ".join(problems))
    return updates


def _layer_update(path: str, parts: list, hidden: int, inp: int,
                  out: int) -> LayerUpdate | KronUpdate:
    """One layer's update from its parts (offsets in hidden units); ValueError when they
    do not fit or mix LoRA and LoKr."""
    kron = [p for p in parts if isinstance(p, KronPart)]
    if kron and len(kron) != len(parts):
        raise ValueError("LoRA and LoKr parts on one layer")
    if kron:
        return kron_update([KronPart(p.offset * hidden, p.w1, p.w2) for p in kron], inp, out)
    placed = [Part(p.offset * hidden, control.pad_inputs(p.a, path, inp), p.b, p.bias)
              for p in parts]
    return combine(placed, placed[0].a.shape[1], out)


def _layer_shape(model, path: str) -> tuple[int, int] | None:
    try:
        layer = find_layer(model, path)[2]
        return linear_shape(getattr(layer, "base", layer))
    except (KeyError, AttributeError, IndexError):
        return None


def _group(tensors: Mapping[str, np.ndarray]) -> tuple[dict, dict, list[str]]:
    """Group keys by module: ({module: {role: (key, array)}}, ignored {reason: keys},
    unknown keys)."""
    modules: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    ignored: dict[str, list[str]] = {}
    unknown = []
    for key, value in tensors.items():
        reason = next((why for pat, why in IGNORED if re.search(pat, key)), None)
        if reason:
            ignored.setdefault(reason, []).append(key)
            continue
        split = _split_role(key)
        if split is None:
            unknown.append(key)
            continue
        modules.setdefault(split[0], {})[split[1]] = (key, value)
    return modules, ignored, unknown


# Whole kinds of file we recognise but cannot apply: (key pattern, why / what to do).
UNSUPPORTED: tuple[tuple[str, str], ...] = (
    (r"\.hada_w1_a$", "a LyCORIS LoHa file, not supported (mlx-edit applies LoRA and "
     "LoKr adapters)"),
    (r"\.lokr_t2$", "a LyCORIS LoKr with a Tucker (conv) factor, not supported"),
    (r"lora_magnitude_vector", "a DoRA adapter (magnitude vectors), not supported"),
)


def _refuse_unsupported(tensors: Mapping[str, np.ndarray], name: str) -> None:
    for pattern, why in UNSUPPORTED:
        hits = [k for k in tensors if re.search(pattern, k)]
        if hits:
            raise WeightLoadError(f"{name}: {why} (e.g. {hits[0]})")


def _factor(roles, fmt: str, module: str, path: str, rank: int, scaling) -> float:
    """alpha/rank of one module: its `.alpha` tensor, else PEFT metadata (diffusers names,
    per component: `scaling` {prefix: _peft_scaling}), else 1."""
    if "alpha" in roles:
        return float(np.asarray(roles["alpha"]).reshape(-1)[0]) / rank
    prefix = text.TEXT if path.startswith(text.TEXT) else "transformer."
    if fmt == "diffusers" and scaling[prefix] is not None:
        return scaling[prefix](module.removeprefix(prefix), rank)
    return 1.0


def _factor_matrix(roles, w: str) -> tuple[np.ndarray | None, int | None]:
    """LoKr factor `w` ("w1"/"w2"): the full matrix or the product w_a @ w_b, and the rank
    of that product (None when full); (None, None) when absent or half given."""
    if w in roles:
        return roles[w].astype(np.float32), None
    if f"{w}_a" in roles and f"{w}_b" in roles:
        a, b = roles[f"{w}_a"].astype(np.float32), roles[f"{w}_b"].astype(np.float32)
        if a.ndim == 2 and b.ndim == 2 and a.shape[1] == b.shape[0]:
            return a @ b, b.shape[0]
    return None, None


def _kron_part(module: str, roles, offset: int, swap: bool) -> KronPart | str:
    """A LoKr module's KronPart, or a string naming what is wrong with it. alpha/rank
    scales w1 when a factor is a product (rank: w2's, else w1's), else nothing
    (diffusers `_bake_lokr_alpha_`, PEFT LoKr scaling)."""
    (w1, r1), (w2, r2) = _factor_matrix(roles, "w1"), _factor_matrix(roles, "w2")
    if w1 is None or w2 is None or w1.ndim != 2 or w2.ndim != 2 or \
            set(roles) - {"w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "alpha"}:
        return f"{module} (LoKr factors {sorted(roles)})"
    rank = r2 or r1
    if rank and "alpha" in roles:
        w1 = w1 * (float(np.asarray(roles["alpha"]).reshape(-1)[0]) / rank)
    if swap:  # BFL's [shift; scale] rows: the halves of w1's rows (l even)
        if w1.shape[0] % 2:
            return f"{module} (LoKr on BFL's final modulation with odd w1 rows {w1.shape})"
        w1 = np.concatenate(np.split(w1, 2)[::-1])
    return KronPart(offset, w1, w2)


def convert(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None,
            *, name: str = "LoRA") -> LoRAFile:
    """Convert a LoRA state dict (numpy arrays) to parts of our layers (FLUX transformer
    paths, CLIP paths under `lora_text.TEXT`) and a control LoRA's QK-norm values.

    Raises WeightLoadError naming keys that map nowhere, modules missing A or B, and
    mis-shaped pairs. Warns (UserWarning) about ignored key kinds (module docstring).
    """
    _refuse_unsupported(tensors, name)
    norms, tensors = control.split_norms(tensors)
    modules, ignored, unknown = _group(tensors)
    scaling = {p: _peft_scaling(metadata or {}, p) for p in ("transformer.", text.TEXT)}
    parts: dict[str, list[Part]] = {}
    formats = set()
    bad = list(unknown)
    for module, named in modules.items():
        target = resolve_module(module)
        if target is None:
            bad.extend(key for key, _ in named.values())
            continue
        roles = {role: value for role, (_, value) in named.items()}
        fmt, path, offset, swap = target
        formats.add(fmt)
        if any(r in roles for r in KRON_ROLES):
            part = _kron_part(module, roles, offset, swap)
            if isinstance(part, str):
                bad.append(part)
            else:
                parts.setdefault(path, []).append(part)
            continue
        if "a" not in named or "b" not in named:
            bad.extend(key for key, _ in named.values())
            continue
        a, b = roles["a"].astype(np.float32), roles["b"].astype(np.float32)
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)  # conv-shaped (r, in, 1, 1)
        rank = a.shape[0]
        if b.shape[1] != rank:
            bad.append(f"{module} (A {a.shape}, B {b.shape})")
            continue
        factor = _factor(roles, fmt, module, path, rank, scaling)
        bias = roles.get("bias")
        b = b * factor
        bias = None if bias is None else bias.astype(np.float32) * factor
        if swap:
            b = np.concatenate(np.split(b, 2)[::-1])
            bias = None if bias is None else np.concatenate(np.split(bias, 2)[::-1])
        parts.setdefault(path, []).append(Part(offset, a, b, bias))
    if bad:
        raise WeightLoadError(f"{name}: {len(bad)} LoRA keys map to no FLUX transformer layer "
                              f"(or lack their A/B pair): {', '.join(sorted(bad)[:8])}"
                              + (" ..." if len(bad) > 8 else ""))
    if not parts:
        raise WeightLoadError(f"{name}: no FLUX transformer or CLIP LoRA weights found")
    for reason, keys in ignored.items():
        warnings.warn(f"{name}: ignoring {len(keys)} {reason} keys (not applied), "
                      f"e.g. {keys[0]}", stacklevel=2)
    return LoRAFile(parts, tuple(sorted(formats)), ignored, norms)


def load_lora_file(source: str | Path, weight_name: str | None = None) -> LoRAFile:
    """Read and convert a LoRA (see `locate`, `convert`). Tensors of any float dtype
    (bf16 included) are read with mx.load and converted to float32."""
    path = locate(source, weight_name)
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise WeightLoadError(f"{path}: not a readable safetensors file ({e})") from e
    arrays = {k: np.array(v.astype(mx.float32)) for k, v in tensors.items()}
    return convert(arrays, metadata, name=str(source))


@dataclass
class LoadedLoRA:
    """A LoRA a pipeline holds: its converted file, where it came from, its strength."""

    file: LoRAFile
    source: str
    scale: float


def sync(model, loras: Mapping[str, LoadedLoRA], *, check_only: bool = False) -> None:
    """Make the adapters on `model` exactly `loras` (attach new ones, drop removed ones,
    set every scale). When the LoRAs with structural changes (control LoRAs: widened
    img_in, replaced norms; lora_control) differ from those applied, everything is
    undone exactly and rebuilt: structure first, in order, then every adapter. Raises
    WeightLoadError as `LoRAFile.updates` and for changes the model cannot take.
    check_only: compute the updates but attach nothing (a lazy probe model: no copies)."""
    from mlx_edit.models import lora as adapters
    from mlx_edit.models import lora_control as structure

    loras = {n: lora for n, lora in loras.items() if lora.file.updates_transformer}
    applied = adapters.adapter_names(model)
    structural = [n for n, lora in loras.items() if lora.file.structural]
    if structure.owners(model) != structural:
        adapters.remove(model)
        structure.restore(model)
        applied = []
        for n in structural:
            widths, norms = loras[n].file.widths, loras[n].file.norms
            try:
                structure.apply(model, n, widths, norms)
            except ValueError as e:
                raise WeightLoadError(f"LoRA {n}: {e}") from None
    stale = [n for n in applied if n not in loras]
    if stale:
        adapters.remove(model, stale)
    for name, lora in loras.items():
        if name not in applied:
            updates = lora.file.updates(model)
            if not check_only:
                adapters.attach(model, name, updates, lora.scale)
    if check_only:
        return
    changed = {n: lora.scale for n, lora in loras.items()
               if adapters.scale_of(model, n) != np.float32(lora.scale)}  # stored as float32
    if changed:
        adapters.set_scales(model, changed)


def baker(model, loras: Sequence[tuple[str | Path, float]]):
    """`adjust(key, value) -> value` that adds the LoRAs (scaled) to the float tensors of
    `model`'s layers as a converter streams them (`mlx-edit convert --lora`), and the
    record [[source, scale], ...] to store in the config. The LoRAs are read and checked
    against `model` (its structure, before quantization) first: WeightLoadError as
    `load_lora_file` / `LoRAFile.updates`, before anything is written."""
    deltas: dict[str, list[tuple[LayerUpdate, float]]] = {}
    for source, scale in loras:
        lora = load_lora_file(source)
        if lora.norms:
            raise WeightLoadError(f"{source}: a BFL control LoRA (it widens img_in and replaces "
                                  "QK norms) cannot be baked by convert: load it with --lora")
        if lora.text_parts:
            warnings.warn(f"{source}: its CLIP text-encoder LoRA is not baked (convert bakes "
                          "the transformer only); load the file with --lora to apply it",
                          stacklevel=2)
        for path, update in lora.updates(model).items():
            deltas.setdefault(path, []).append((update, float(scale)))

    def adjust(key: str, value: mx.array) -> mx.array:
        layer, _, leaf = key.rpartition(".")
        if layer not in deltas or leaf not in ("weight", "bias"):
            return value
        total = value.astype(mx.float32)
        for update, scale in deltas[layer]:
            if leaf == "weight":
                total = total + scale * mx.array(update.dense())
            elif update.bias is not None:  # LoKr updates have none
                total = total + scale * mx.array(update.bias)
        return total.astype(value.dtype)

    return adjust, [[str(s), float(c)] for s, c in loras]
