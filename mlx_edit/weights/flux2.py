"""FLUX.2 transformer weights: key maps (diffusers, BFL, ours), the config of a BFL file
read off its shapes, and `load_flux2_transformer` (the "flux2_transformer" entry of
weights/specs.py).

Sources for the BFL <-> diffusers names (blocks and final layer as FLUX.1's,
`flux.BFL_BLOCK_RULES`): diffusers `loaders/single_file_utils.py`
(`convert_flux2_transformer_checkpoint_to_diffusers`) and BFL `flux2/src/flux2/model.py`.
Our layout is BFL's fused one (mlx_edit/models/flux2.py) with our short names.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx

from mlx_edit.models.flux2 import Flux2Config, Flux2Transformer
from mlx_edit.weights import loader
from mlx_edit.weights.core import Rule, rename
from mlx_edit.weights.flux import BFL_BLOCK_RULES, _count

_T, _S = "transformer_blocks.{i}.", "single_transformer_blocks.{i}."
_D, _SB = "double_blocks.{i}.", "single_blocks.{i}."
_EMBED = "time_guidance_embed."
# the model-wide modulations: diffusers name (BFL's is the same with `.lin`) -> ours
_MODULATIONS = {"double_stream_modulation_img": "double_mod_img",
                "double_stream_modulation_txt": "double_mod_txt",
                "single_stream_modulation": "single_mod"}
# per double-block stream: (diffusers attention prefix, qkv names, norms, out, MLP) -> ours
_STREAMS = {
    "img": ("attn.to_{c}", "attn.norm_q", "attn.norm_k", "attn.to_out.0", "ff"),
    "txt": ("attn.add_{c}_proj", "attn.norm_added_q", "attn.norm_added_k", "attn.to_add_out",
            "ff_context"),
}


def _diffusers_stream(s: str) -> tuple[Rule, ...]:
    qkv, norm_q, norm_k, out, ff = _STREAMS[s]
    return (
        Rule(_D + f"{s}_attn.qkv.{{p}}", tuple(_T + qkv.format(c=c) + ".{p}" for c in "qkv"),
             "concat"),
        rename(_T + norm_q + ".weight", _D + f"{s}_attn.norm_q.weight"),
        rename(_T + norm_k + ".weight", _D + f"{s}_attn.norm_k.weight"),
        rename(_T + out + ".{p}", _D + f"{s}_attn.proj.{{p}}"),
        rename(_T + ff + ".linear_in.{p}", _D + f"{s}_mlp.fc1.{{p}}"),
        rename(_T + ff + ".linear_out.{p}", _D + f"{s}_mlp.fc2.{{p}}"),
    )


DIFFUSERS_RULES: tuple[Rule, ...] = (
    rename("x_embedder.{p}", "img_in.{p}"),
    rename("context_embedder.{p}", "txt_in.{p}"),
    *(rename(f"{_EMBED}{src}.linear_{n}.{{p}}", f"{dst}.{layer}.{{p}}")
      for src, dst in (("timestep_embedder", "time_in"), ("guidance_embedder", "guidance_in"))
      for n, layer in ((1, "in_layer"), (2, "out_layer"))),
    *(rename(f"{src}.linear.{{p}}", f"{dst}.{{p}}") for src, dst in _MODULATIONS.items()),
    *_diffusers_stream("img"),
    *_diffusers_stream("txt"),
    rename(_S + "attn.to_qkv_mlp_proj.{p}", _SB + "linear1.{p}"),
    rename(_S + "attn.to_out.{p}", _SB + "linear2.{p}"),
    rename(_S + "attn.norm_q.weight", _SB + "norm_q.weight"),
    rename(_S + "attn.norm_k.weight", _SB + "norm_k.weight"),
    rename("norm_out.linear.{p}", "final_layer.modulation.{p}"),
    rename("proj_out.{p}", "final_layer.linear.{p}"),
)

BFL_RULES: tuple[Rule, ...] = (
    *(rename(f"{e}.{{rest}}", f"{e}.{{rest}}") for e in ("img_in", "txt_in", "time_in",
                                                         "guidance_in")),
    *(rename(f"{src}.lin.{{p}}", f"{dst}.{{p}}") for src, dst in _MODULATIONS.items()),
    *BFL_BLOCK_RULES,
)

# Tensors that identify each format (specs.FLUX2_TRANSFORMER's `detect`).
DIFFUSERS_SIGN = "double_stream_modulation_img.linear.weight"
BFL_SIGN = "double_stream_modulation_img.lin.weight"


def infer_bfl_config(tensors: Mapping, axes_dims_rope=None) -> Flux2Config:
    """A Flux2Config from the tensor shapes of a BFL single file (which carries no config).

    RoPE axes cannot be read from the weights: (32, 32, 32, 32) is used for head_dim 128,
    otherwise `axes_dims_rope` must be given (ValueError).
    """
    head_dim = tensors["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    hidden, in_channels = tensors["img_in.weight"].shape
    if axes_dims_rope is None:
        if head_dim != 128:
            raise ValueError(f"head_dim {head_dim}: pass axes_dims_rope for this BFL FLUX.2 file")
        axes_dims_rope = (32, 32, 32, 32)
    return Flux2Config.from_dict({
        "in_channels": in_channels,
        "out_channels": tensors["final_layer.linear.weight"].shape[0],
        "num_layers": _count(tensors, r"double_blocks\.(\d+)\."),
        "num_single_layers": _count(tensors, r"single_blocks\.(\d+)\."),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": tensors["txt_in.weight"].shape[1],
        "timestep_guidance_channels": tensors["time_in.in_layer.weight"].shape[1],
        "mlp_ratio": tensors["double_blocks.0.img_mlp.0.weight"].shape[0] / 2 / hidden,
        "guidance_embeds": "guidance_in.in_layer.weight" in tensors,
        "axes_dims_rope": axes_dims_rope,
    })


def load_flux2_transformer(
    path: str | Path,
    dtype: mx.Dtype | None = None,
    *,
    config: dict | None = None,
    quantize: int | None = None,
) -> Flux2Transformer:
    """Load a FLUX.2 transformer from a diffusers `transformer/` folder
    (Flux2Transformer2DModel), one of our MLX folders, or a BFL single file
    (`flux-2-klein-4b.safetensors`, with or without the `model.diffusion_model.` prefix).

    dtype: parameters' dtype (None: bfloat16 on GPU, float32 on CPU). config: overrides
    of the folder's config (a BFL file with head_dim != 128 needs {"axes_dims_rope": ...}).
    quantize: 4 or 8 quantizes at load by the transformer policy
    (`quantize.FULL_PRECISION["transformer"]`: embedders and final layer stay full).
    Raises WeightLoadError for unreadable files and for missing, unexpected or mis-shaped
    tensors (listed in the message); ValueError for unsupported bits.
    """
    return loader.load("flux2_transformer", path, dtype, config=config, quantize=quantize)
