"""FLUX transformer weights: key maps (diffusers, BFL, ours), the config of a BFL file
read off its shapes, and `load_transformer` (the "transformer" entry of weights/specs.py).

Sources: diffusers `scripts/convert_flux_to_diffusers.py` and
`loaders/single_file_utils.py` (convert_flux_transformer_checkpoint_to_diffusers) for the
BFL <-> diffusers names; our layout is BFL's fused one with our own short names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx

from mlx_edit import variants
from mlx_edit.models.flux import FluxConfig, FluxTransformer
from mlx_edit.weights import loader
from mlx_edit.weights.core import Rule, WeightLoadError, rename
from mlx_edit.weights.quantize import IDENTITY_RULES, read_record

_T, _S = "transformer_blocks.{i}.", "single_transformer_blocks.{i}."
_D, _SB = "double_blocks.{i}.", "single_blocks.{i}."
# diffusers' time_text_embed.* embedders -> ours (BFL's names)
_EMBEDDERS = {"timestep_embedder": "time_in", "guidance_embedder": "guidance_in",
              "text_embedder": "vector_in"}

DIFFUSERS_RULES: tuple[Rule, ...] = (
    rename("x_embedder.{p}", "img_in.{p}"),
    rename("context_embedder.{p}", "txt_in.{p}"),
    *(rename(f"time_text_embed.{src}.linear_{n}.{{p}}", f"{dst}.{layer}.{{p}}")
      for src, dst in _EMBEDDERS.items() for n, layer in ((1, "in_layer"), (2, "out_layer"))),
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

# BFL's block and final-layer names -> ours: the same in FLUX.1 and FLUX.2 (weights/flux2.py)
BFL_BLOCK_RULES: tuple[Rule, ...] = (
    rename(_D + "{s}_attn.qkv.{p}", _D + "{s}_attn.qkv.{p}"),
    rename(_D + "{s}_attn.norm.query_norm.scale", _D + "{s}_attn.norm_q.weight"),
    rename(_D + "{s}_attn.norm.key_norm.scale", _D + "{s}_attn.norm_k.weight"),
    rename(_D + "{s}_attn.proj.{p}", _D + "{s}_attn.proj.{p}"),
    rename(_D + "{s}_mlp.0.{p}", _D + "{s}_mlp.fc1.{p}"),
    rename(_D + "{s}_mlp.2.{p}", _D + "{s}_mlp.fc2.{p}"),
    rename(_SB + "linear1.{p}", _SB + "linear1.{p}"),
    rename(_SB + "linear2.{p}", _SB + "linear2.{p}"),
    rename(_SB + "norm.query_norm.scale", _SB + "norm_q.weight"),
    rename(_SB + "norm.key_norm.scale", _SB + "norm_k.weight"),
    Rule("final_layer.modulation.{p}", ("final_layer.adaLN_modulation.1.{p}",), "swap"),
    rename("final_layer.linear.{p}", "final_layer.linear.{p}"),
)

BFL_RULES: tuple[Rule, ...] = (
    *(rename(f"{e}.{{rest}}", f"{e}.{{rest}}") for e in ("img_in", "txt_in", *_EMBEDDERS.values())),
    rename(_D + "img_mod.lin.{p}", _D + "img_mod.{p}"),
    rename(_D + "txt_mod.lin.{p}", _D + "txt_mod.{p}"),
    rename(_SB + "modulation.lin.{p}", _SB + "modulation.{p}"),
    *BFL_BLOCK_RULES,
)

# Our own MLX folders (written by `mlx-edit convert`) already use our names.
MLX_RULES: tuple[Rule, ...] = IDENTITY_RULES

BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def detect_format(keys) -> str:
    """'diffusers', 'bfl' or 'mlx' from the tensor names of a transformer checkpoint
    (the formats of `specs.SPECS["transformer"]`); WeightLoadError for none of them."""
    return loader.detect("transformer", set(keys))


def _count(keys, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.match(k))})


def bfl_config_fields(tensors: Mapping, axes_dims_rope=None, what: str = "BFL") -> dict:
    """The config fields of a BFL-layout transformer read off its tensor shapes (BFL and
    x-flux single files carry no config): depth, widths, in_channels, guidance.

    RoPE axes cannot be read from the weights: (16, 56, 56) is used for head_dim 128,
    otherwise `axes_dims_rope` must be given (ValueError naming the `what` file).
    """
    head_dim = tensors["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    hidden, in_channels = tensors["img_in.weight"].shape
    if axes_dims_rope is None:
        if head_dim != 128:
            raise ValueError(f"head_dim {head_dim}: pass axes_dims_rope for this {what} file")
        axes_dims_rope = (16, 56, 56)
    return {
        "in_channels": in_channels,
        "num_layers": _count(tensors, r"double_blocks\.(\d+)\."),
        "num_single_layers": _count(tensors, r"single_blocks\.(\d+)\."),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": tensors["txt_in.weight"].shape[1],
        "pooled_projection_dim": tensors["vector_in.in_layer.weight"].shape[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in tensors,
        "axes_dims_rope": axes_dims_rope,
    }


def infer_bfl_config(tensors: dict, axes_dims_rope=None) -> FluxConfig:
    """A FluxConfig from the tensor shapes of a BFL single file (which carries no config).

    RoPE axes cannot be read from the weights: (16, 56, 56) is used for head_dim 128,
    otherwise `axes_dims_rope` must be given (ValueError).
    """
    out_channels = tensors["final_layer.linear.weight"].shape[0]
    return FluxConfig.from_dict({**bfl_config_fields(tensors, axes_dims_rope),
                                 "out_channels": out_channels})


def describe_variant(cfg: FluxConfig) -> str:
    """Human name of a FLUX transformer variant from its config (mlx_edit.variants)."""
    return variants.describe(cfg.in_channels, cfg.guidance_embeds)


def _check_variant(ckpt: loader.Checkpoint, expect_in_channels) -> None:
    """WeightLoadError naming the variant found unless its in_channels is accepted."""
    cfg = ckpt.config
    accepted = (expect_in_channels,) if isinstance(expect_in_channels, int) \
        else tuple(expect_in_channels or ())
    if accepted and cfg.in_channels not in accepted:
        wanted = " or ".join(str(c) for c in accepted)
        raise WeightLoadError(
            f"{ckpt.path}: found a {describe_variant(cfg)} transformer (x_embedder in_channels "
            f"{cfg.in_channels}) where in_channels {wanted} is needed"
        )


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
    ckpt = loader.open_checkpoint("transformer", path, config)
    _check_variant(ckpt, expect_in_channels)
    record = read_record(ckpt.stored, ckpt.name)
    return ckpt.config, record["bits"] if record else None


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
    return loader.load("transformer", path, dtype, config=config, quantize=quantize,
                       check=lambda ckpt: _check_variant(ckpt, expect_in_channels))
