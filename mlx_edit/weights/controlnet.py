"""FLUX ControlNet weights: diffusers folders, XLabs x-flux single files, our MLX folders.

Formats (detected from the tensor names):
- diffusers `FluxControlNetModel` folders (config.json + safetensors): InstantX Canny /
  Union, Shakker-Labs Union Pro (2.0), XLabs' `*-diffusers` repos. Blocks and embedders use
  the transformer's names (`DIFFUSERS_RULES`), plus `controlnet_*` and `input_hint_block.*`.
- XLabs x-flux single files (`flux-canny-controlnet-v3.safetensors`, no config): BFL names
  (`BFL_RULES`) plus `controlnet_blocks.N`, `pos_embed_input` and
  `input_hint_block.{0,2,...,14}` (x-flux src/flux/controlnet.py: an nn.Sequential of
  convs at even indices, SiLUs at odd ones, the same numbering as diffusers' SD ControlNet
  converter in loaders/single_file_utils.py convert_controlnet_checkpoint).
- our MLX folders: config.json + `model.safetensors` with our names (`save_controlnet`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_edit.models.controlnet import ControlNetConfig, FluxControlNet
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
from mlx_edit.weights.flux import BFL_PREFIXES, BFL_RULES, DIFFUSERS_RULES, MLX_RULES, _count
from mlx_edit.weights.sources import is_repo_id

_HINT = "input_hint_block."
# diffusers ControlNetConditioningEmbedding name -> x-flux nn.Sequential index.
XLABS_HINT_INDEX = {"conv_in": 0, **{f"blocks.{i}": 2 * i + 2 for i in range(6)}, "conv_out": 14}

_CONTROL_COMMON = (
    rename("controlnet_blocks.{i}.{p}", "controlnet_blocks.{i}.{p}"),
    rename("controlnet_single_blocks.{i}.{p}", "controlnet_single_blocks.{i}.{p}"),
)

CONTROLNET_DIFFUSERS_RULES: tuple[Rule, ...] = DIFFUSERS_RULES + _CONTROL_COMMON + (
    rename("controlnet_x_embedder.{p}", "controlnet_x_embedder.{p}"),
    rename("controlnet_mode_embedder.weight", "mode_embedder.weight"),
    Rule(_HINT + "{name}.weight", (_HINT + "{name}.weight",), "conv"),
    Rule(_HINT + "blocks.{i}.weight", (_HINT + "blocks.{i}.weight",), "conv"),
    rename(_HINT + "{name}.bias", _HINT + "{name}.bias"),
    rename(_HINT + "blocks.{i}.bias", _HINT + "blocks.{i}.bias"),
)

XLABS_RULES: tuple[Rule, ...] = BFL_RULES + _CONTROL_COMMON + (
    rename("pos_embed_input.{p}", "controlnet_x_embedder.{p}"),
) + tuple(
    rule
    for ours, idx in XLABS_HINT_INDEX.items()
    for rule in (Rule(f"{_HINT}{ours}.weight", (f"{_HINT}{idx}.weight",), "conv"),
                 rename(f"{_HINT}{idx}.bias", f"{_HINT}{ours}.bias"))
)

CONTROLNET_MLX_RULES = MLX_RULES


def detect_format(keys) -> str:
    """'diffusers', 'xlabs' or 'mlx' from a ControlNet checkpoint's tensor names."""
    keys = set(keys)
    if "x_embedder.weight" in keys and any(k.startswith("controlnet_") for k in keys):
        return "diffusers"
    if "pos_embed_input.weight" in keys:
        return "xlabs"
    if "controlnet_x_embedder.weight" in keys or "controlnet_x_embedder.scales" in keys:
        return "mlx"
    raise WeightLoadError(
        "not a FLUX ControlNet checkpoint: found neither diffusers (x_embedder + "
        "controlnet_*), XLabs x-flux (pos_embed_input) nor mlx-edit names"
    )


def infer_xlabs_config(tensors: dict, axes_dims_rope=None) -> ControlNetConfig:
    """A ControlNetConfig from the tensor shapes of an x-flux file (which has no config).

    axes_dims_rope: needed only when head_dim != 128 (ValueError otherwise).
    """
    head_dim = tensors["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    hidden, in_channels = tensors["img_in.weight"].shape
    if axes_dims_rope is None:
        if head_dim != 128:
            raise ValueError(f"head_dim {head_dim}: pass axes_dims_rope for this XLabs file")
        axes_dims_rope = (16, 56, 56)
    hint = tensors[f"{_HINT}14.weight"].shape[0]
    return ControlNetConfig.from_dict({
        "in_channels": in_channels,
        "num_layers": _count(tensors, r"double_blocks\.(\d+)\."),
        "num_single_layers": _count(tensors, r"single_blocks\.(\d+)\."),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": tensors["txt_in.weight"].shape[1],
        "pooled_projection_dim": tensors["vector_in.in_layer.weight"].shape[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in tensors,
        "axes_dims_rope": axes_dims_rope,
        "conditioning_embedding_channels": hint,
        "patch_size": math.isqrt(in_channels // hint),
    })


def resolve_controlnet(repo_or_path: str | Path) -> Path:
    """A local ControlNet folder or file: the path itself, or a Hugging Face snapshot of
    the repo's root config.json and safetensors files (a ControlNet repo holds only it).

    Raises WeightLoadError for a missing path that is not a repo id, or a failed download.
    """
    path = Path(str(repo_or_path)).expanduser()
    if path.exists():
        return path
    name = str(repo_or_path)
    if not is_repo_id(name):
        raise WeightLoadError(f"{name}: no such ControlNet folder or file, and not a repo id")
    from huggingface_hub import snapshot_download  # network code only when needed

    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json"]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # hub errors are many; the message names the cause
        raise WeightLoadError(f"could not download ControlNet {name} ({type(e).__name__}: {e})") from e


def _checkpoint_files(path: Path) -> list[Path]:
    if path.is_file() or (path / "config.json").is_file():
        return safetensors_files(path)
    files = sorted(path.glob("*.safetensors"))
    if len(files) > 1:  # e.g. several x-flux versions in one folder: the user must choose
        names = ", ".join(f.name for f in files)
        raise WeightLoadError(f"{path}: several ControlNet files ({names}); pass one file")
    return safetensors_files(path)


def load_controlnet(
    repo_or_path: str | Path, dtype: mx.Dtype | None = None, *, config: dict | None = None
) -> FluxControlNet:
    """Load a FLUX ControlNet from a repo id, a diffusers folder, an x-flux single file
    (or a folder holding one) or an mlx-edit folder.

    dtype: None -> bfloat16 on GPU, float32 on CPU. config: overrides (x-flux files with
    head_dim != 128 need {"axes_dims_rope": [...]}).
    Raises WeightLoadError (unreadable, missing/unexpected/mis-shaped tensors, not a
    ControlNet), ValueError (inconsistent config).
    """
    path = resolve_controlnet(repo_or_path)
    tensors = open_tensors(_checkpoint_files(path), strip_prefixes=BFL_PREFIXES)
    fmt = detect_format(tensors)
    if fmt == "xlabs":
        cfg = infer_xlabs_config(tensors, (config or {}).get("axes_dims_rope"))
    else:
        folder = path if path.is_dir() else path.parent
        cfg = ControlNetConfig.from_dict({**read_config(folder), **(config or {})})
    rules = {"diffusers": CONTROLNET_DIFFUSERS_RULES, "xlabs": XLABS_RULES,
             "mlx": CONTROLNET_MLX_RULES}[fmt]
    return load_into(FluxControlNet(cfg), tensors, rules, dtype or default_dtype(),
                     name=f"ControlNet ({path})")


def save_controlnet(model: FluxControlNet, folder: str | Path) -> Path:
    """Write `model` as an mlx-edit folder: config.json (diffusers field names) and
    model.safetensors with our tensor names. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"_class_name": "FluxControlNetModel", "_mlx_edit_format": "mlx",
           **{k: v for k, v in vars(model.config).items()}}
    cfg["axes_dims_rope"] = list(cfg["axes_dims_rope"])
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return folder
