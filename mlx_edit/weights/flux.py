"""FLUX transformer weights: key maps (diffusers, BFL, ours) and the loader.

Sources: diffusers `scripts/convert_flux_to_diffusers.py` and
`loaders/single_file_utils.py` (convert_flux_transformer_checkpoint_to_diffusers) for the
BFL <-> diffusers names; our layout is BFL's fused one with our own short names.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx

from mlx_edit import variants
from mlx_edit.models.flux import FluxConfig, FluxTransformer
from mlx_edit.weights.quantize import apply_recorded_quantization, quantize_transformer, read_record
from mlx_edit.weights.core import (
    Rule,
    WeightLoadError,
    default_dtype,
    load_into,
    open_tensors,
    read_config,
    rename,
    safetensors_files,
)

_T, _S = "transformer_blocks.{i}.", "single_transformer_blocks.{i}."
_D, _SB = "double_blocks.{i}.", "single_blocks.{i}."

DIFFUSERS_RULES: tuple[Rule, ...] = (
    rename("x_embedder.{p}", "img_in.{p}"),
    rename("context_embedder.{p}", "txt_in.{p}"),
    rename("time_text_embed.timestep_embedder.linear_1.{p}", "time_in.in_layer.{p}"),
    rename("time_text_embed.timestep_embedder.linear_2.{p}", "time_in.out_layer.{p}"),
    rename("time_text_embed.guidance_embedder.linear_1.{p}", "guidance_in.in_layer.{p}"),
    rename("time_text_embed.guidance_embedder.linear_2.{p}", "guidance_in.out_layer.{p}"),
    rename("time_text_embed.text_embedder.linear_1.{p}", "vector_in.in_layer.{p}"),
    rename("time_text_embed.text_embedder.linear_2.{p}", "vector_in.out_layer.{p}"),
    rename(_T + "norm1.linear.{p}", _D + "img_mod.{p}"),
    rename(_T + "norm1_context.linear.{p}", _D + "txt_mod.{p}"),
    Rule(_D + "img_attn.qkv.{p}", tuple(_T + f"attn.to_{c}.{{p}}" for c in "qkv"), "concat"),
    Rule(_D + "txt_attn.qkv.{p}", tuple(_T + f"attn.add_{c}_proj.{{p}}" for c in "qkv"), "concat"),
    rename(_T + "attn.norm_q.weight", _D + "img_attn.norm_q.weight"),
    rename(_T + "attn.norm_k.weight", _D + "img_attn.norm_k.weight"),
    rename(_T + "attn.norm_added_q.weight", _D + "txt_attn.norm_q.weight"),
    rename(_T + "attn.norm_added_k.weight", _D + "txt_attn.norm_k.weight"),
    rename(_T + "attn.to_out.0.{p}", _D + "img_attn.proj.{p}"),
    rename(_T + "attn.to_add_out.{p}", _D + "txt_attn.proj.{p}"),
    rename(_T + "ff.net.0.proj.{p}", _D + "img_mlp.fc1.{p}"),
    rename(_T + "ff.net.2.{p}", _D + "img_mlp.fc2.{p}"),
    rename(_T + "ff_context.net.0.proj.{p}", _D + "txt_mlp.fc1.{p}"),
    rename(_T + "ff_context.net.2.{p}", _D + "txt_mlp.fc2.{p}"),
    rename(_S + "norm.linear.{p}", _SB + "modulation.{p}"),
    Rule(
        _SB + "linear1.{p}",
        tuple(_S + f"attn.to_{c}.{{p}}" for c in "qkv") + (_S + "proj_mlp.{p}",),
        "concat",
    ),
    rename(_S + "attn.norm_q.weight", _SB + "norm_q.weight"),
    rename(_S + "attn.norm_k.weight", _SB + "norm_k.weight"),
    rename(_S + "proj_out.{p}", _SB + "linear2.{p}"),
    rename("norm_out.linear.{p}", "final_layer.modulation.{p}"),
    rename("proj_out.{p}", "final_layer.linear.{p}"),
)

BFL_RULES: tuple[Rule, ...] = (
    rename("img_in.{p}", "img_in.{p}"),
    rename("txt_in.{p}", "txt_in.{p}"),
    rename("time_in.{l}.{p}", "time_in.{l}.{p}"),
    rename("guidance_in.{l}.{p}", "guidance_in.{l}.{p}"),
    rename("vector_in.{l}.{p}", "vector_in.{l}.{p}"),
    rename(_D + "img_mod.lin.{p}", _D + "img_mod.{p}"),
    rename(_D + "txt_mod.lin.{p}", _D + "txt_mod.{p}"),
    rename(_D + "{s}_attn.qkv.{p}", _D + "{s}_attn.qkv.{p}"),
    rename(_D + "{s}_attn.norm.query_norm.scale", _D + "{s}_attn.norm_q.weight"),
    rename(_D + "{s}_attn.norm.key_norm.scale", _D + "{s}_attn.norm_k.weight"),
    rename(_D + "{s}_attn.proj.{p}", _D + "{s}_attn.proj.{p}"),
    rename(_D + "{s}_mlp.0.{p}", _D + "{s}_mlp.fc1.{p}"),
    rename(_D + "{s}_mlp.2.{p}", _D + "{s}_mlp.fc2.{p}"),
    rename(_SB + "modulation.lin.{p}", _SB + "modulation.{p}"),
    rename(_SB + "linear1.{p}", _SB + "linear1.{p}"),
    rename(_SB + "linear2.{p}", _SB + "linear2.{p}"),
    rename(_SB + "norm.query_norm.scale", _SB + "norm_q.weight"),
    rename(_SB + "norm.key_norm.scale", _SB + "norm_k.weight"),
    Rule("final_layer.modulation.{p}", ("final_layer.adaLN_modulation.1.{p}",), "swap"),
    rename("final_layer.linear.{p}", "final_layer.linear.{p}"),
)

# Our own MLX folders (written by `mlx-edit convert`) already use our names.
MLX_RULES: tuple[Rule, ...] = (rename("{rest}", "{rest}"),)

BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def detect_format(keys) -> str:
    """'diffusers', 'bfl' or 'mlx' from the tensor names of a transformer checkpoint."""
    keys = set(keys)
    if "x_embedder.weight" in keys:
        return "diffusers"
    if "final_layer.adaLN_modulation.1.weight" in keys:
        return "bfl"
    if "final_layer.modulation.weight" in keys or "final_layer.modulation.scales" in keys:
        return "mlx"
    raise WeightLoadError(
        "not a FLUX transformer checkpoint: found neither diffusers (x_embedder.*), "
        "BFL (img_in.*, final_layer.adaLN_modulation.*) nor mlx-edit names"
    )


def _count(keys, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.match(k))})


def infer_bfl_config(tensors: dict, axes_dims_rope=None) -> FluxConfig:
    """A FluxConfig from the tensor shapes of a BFL single file (which carries no config).

    RoPE axes cannot be read from the weights: (16, 56, 56) is used for head_dim 128,
    otherwise `axes_dims_rope` must be given (ValueError).
    """
    head_dim = tensors["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    hidden = tensors["img_in.weight"].shape[0]
    if axes_dims_rope is None:
        if head_dim != 128:
            raise ValueError(f"head_dim {head_dim}: pass axes_dims_rope for this BFL file")
        axes_dims_rope = (16, 56, 56)
    return FluxConfig.from_dict(
        {
            "in_channels": tensors["img_in.weight"].shape[1],
            "out_channels": tensors["final_layer.linear.weight"].shape[0],
            "num_layers": _count(tensors, r"double_blocks\.(\d+)\."),
            "num_single_layers": _count(tensors, r"single_blocks\.(\d+)\."),
            "attention_head_dim": head_dim,
            "num_attention_heads": hidden // head_dim,
            "joint_attention_dim": tensors["txt_in.weight"].shape[1],
            "pooled_projection_dim": tensors["vector_in.in_layer.weight"].shape[1],
            "guidance_embeds": "guidance_in.in_layer.weight" in tensors,
            "axes_dims_rope": axes_dims_rope,
        }
    )


def describe_variant(cfg: FluxConfig) -> str:
    """Human name of a FLUX transformer variant from its config (mlx_edit.variants)."""
    return variants.describe(cfg.in_channels, cfg.guidance_embeds)


def _open(path: str | Path, expect_in_channels, config: dict | None):
    """(lazy tensors, format, config.json dict, FluxConfig) of a transformer checkpoint,
    its kind checked (see `load_transformer`); only file headers are read."""
    path = Path(path)
    if not path.exists():
        raise WeightLoadError(f"{path}: no such transformer file or folder")
    tensors = open_tensors(safetensors_files(path), strip_prefixes=BFL_PREFIXES)
    fmt = detect_format(tensors)
    cfg_dict = read_config(path) if fmt != "bfl" and path.is_dir() else {}
    if fmt == "bfl":
        cfg = infer_bfl_config(tensors, (config or {}).get("axes_dims_rope"))
    else:
        cfg = FluxConfig.from_dict({**cfg_dict, **(config or {})})
    accepted = (expect_in_channels,) if isinstance(expect_in_channels, int) \
        else tuple(expect_in_channels or ())
    if accepted and cfg.in_channels not in accepted:
        wanted = " or ".join(str(c) for c in accepted)
        raise WeightLoadError(
            f"{path}: found a {describe_variant(cfg)} transformer (x_embedder in_channels "
            f"{cfg.in_channels}) where in_channels {wanted} is needed"
        )
    return tensors, fmt, cfg_dict, cfg


def read_transformer_config(
    path: str | Path,
    *,
    expect_in_channels: int | tuple[int, ...] | None = None,
    config: dict | None = None,
) -> tuple[FluxConfig, int | None]:
    """(config, stored bits) of the transformer `load_transformer(path, ...)` would load,
    without loading it: only config.json and the safetensors headers are read. Stored
    bits: the recorded quantization of an mlx-edit folder, None for full precision.
    Raises WeightLoadError as `load_transformer` does for a missing path, the wrong kind
    or a malformed quantization record (tensor-level checks happen at load)."""
    _, _, cfg_dict, cfg = _open(path, expect_in_channels, config)
    record = read_record(cfg_dict, f"transformer ({path})")
    return cfg, record["bits"] if record else None


def load_transformer(
    path: str | Path,
    dtype: mx.Dtype | None = None,
    *,
    expect_in_channels: int | tuple[int, ...] | None = None,
    config: dict | None = None,
    quantize: int | None = None,
) -> FluxTransformer:
    """Load a FLUX transformer from a diffusers `transformer/` folder, one of our MLX
    folders, or a BFL single file (`flux1-fill-dev.safetensors`, with or without the
    `model.diffusion_model.` prefix).

    dtype: parameters' dtype (None: bfloat16 on GPU, float32 on CPU).
    expect_in_channels: e.g. 384 for Fill, or a tuple of accepted values ((384, 128):
    Fill or Canny/Depth); a checkpoint of another kind raises WeightLoadError naming the
    variant found. `config` overrides the folder's config
    (needed only for BFL files with head_dim != 128: {"axes_dims_rope": [...]}).
    quantize: 4 or 8 quantizes at load by the package policy (`quantize_transformer`)
    layer by layer, so full precision is never resident beyond one layer; a folder
    already quantized is kept as stored (with a warning if its bits differ).
    Raises WeightLoadError for unreadable files and for missing, unexpected or
    mis-shaped tensors (listed in the message); ValueError for unsupported bits.
    """
    tensors, fmt, cfg_dict, cfg = _open(path, expect_in_channels, config)
    name = f"transformer ({path})"
    model = FluxTransformer(cfg)
    rules = {"diffusers": DIFFUSERS_RULES, "bfl": BFL_RULES, "mlx": MLX_RULES}[fmt]
    if fmt == "mlx":  # a quantized mlx-edit folder: build the quantized structure first
        apply_recorded_quantization(model, cfg_dict, tensors, name=name)
    return load_into(model, tensors, rules, dtype or default_dtype(), name=name,
                     quantize=(lambda m: quantize_transformer(m, quantize)) if quantize else None)
