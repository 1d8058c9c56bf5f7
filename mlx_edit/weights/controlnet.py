"""FLUX ControlNet weights: diffusers folders, XLabs x-flux single files, our MLX folders.

Formats (the "controlnet" entry of weights/specs.py, detected from the tensor names):
- diffusers `FluxControlNetModel` folders (config.json + safetensors): InstantX Canny /
  Union, Shakker-Labs Union Pro (2.0), XLabs' `*-diffusers` repos. Blocks and embedders use
  the transformer's names (`DIFFUSERS_RULES`), plus `controlnet_*` and `input_hint_block.*`.
- XLabs x-flux single files (`flux-canny-controlnet-v3.safetensors`, no config): BFL names
  (`BFL_RULES`) plus `controlnet_blocks.N`, `pos_embed_input` and
  `input_hint_block.{0,2,...,14}` (x-flux src/flux/controlnet.py: an nn.Sequential of
  convs at even indices, SiLUs at odd ones, the same numbering as diffusers' SD ControlNet
  converter in loaders/single_file_utils.py convert_controlnet_checkpoint).
- our MLX folders (`save_controlnet`, `convert_controlnet`): config.json marked with
  `_mlx_edit_version` (+ a `quantization` record) and safetensors with our names, as
  `mlx-edit convert` writes pipeline components (weights/save.py, quantize.py).

Quantization (`quantize_controlnet`): the transformer's policy (attention, MLP and
modulation linears; embedders in full precision) plus `controlnet_x_embedder` (the control
input) kept in full precision; the per-block output projections are quantized.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_edit import __version__
from mlx_edit.models.controlnet import ControlNetConfig, FluxControlNet
from mlx_edit.weights import loader, save
from mlx_edit.weights.core import (
    Rule,
    WeightLoadError,
    open_tensors,
    read_config,
    rename,
    safetensors_files,
)
from mlx_edit.weights.flux import (
    BFL_PREFIXES,
    BFL_RULES,
    DIFFUSERS_RULES,
    MLX_RULES,
    bfl_config_fields,
)
from mlx_edit.weights.quantize import (
    DEFAULT_GROUP_SIZE,
    FULL_PRECISION,
    MLX_LAYOUT_KEY,
    describe_quantization,
    quantize_at_load,
)
from mlx_edit.weights.sources import CONFIG_AND_WEIGHTS, download, is_repo_id, local_or_remote

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


def detect_format(keys, config: dict | None = None) -> str:
    """'diffusers', 'xlabs' or 'mlx' from a ControlNet checkpoint's config / tensor names
    (the formats of `specs.SPECS["controlnet"]`); WeightLoadError for none of them."""
    return loader.detect("controlnet", set(keys), config)


def infer_xlabs_config(tensors: dict, axes_dims_rope=None) -> ControlNetConfig:
    """A ControlNetConfig from the tensor shapes of an x-flux file (which has no config).

    axes_dims_rope: needed only when head_dim != 128 (ValueError otherwise).
    """
    fields = bfl_config_fields(tensors, axes_dims_rope, "XLabs")
    hint = tensors[f"{_HINT}14.weight"].shape[0]
    return ControlNetConfig.from_dict({
        **fields, "conditioning_embedding_channels": hint,
        "patch_size": math.isqrt(fields["in_channels"] // hint),
    })


def resolve_controlnet(repo_or_path: str | Path) -> Path:
    """A local ControlNet folder or file: the path itself, or a Hugging Face snapshot of
    the repo's root config.json and safetensors files (a ControlNet repo holds only it).

    Raises WeightLoadError for a missing path that is not a repo id, or a failed download.
    """
    path, remote = local_or_remote(repo_or_path, "ControlNet")
    if not remote:
        return path
    return download(str(repo_or_path), list(CONFIG_AND_WEIGHTS), "ControlNet")


def _root_files_of_repo(name: str) -> list[str] | None:
    """The file names of a Hugging Face repo (None when the hub cannot be asked)."""
    try:
        from huggingface_hub import list_repo_files

        return list_repo_files(name)
    except Exception:  # offline, gated, unknown: the pipeline path reports the cause
        return None


def _is_controlnet_config(folder: Path) -> bool:
    try:
        return read_config(folder).get("_class_name") == "FluxControlNetModel"
    except WeightLoadError:
        return False


def is_controlnet_source(source: str | Path) -> bool:
    """Whether `source` is a FLUX ControlNet rather than a pipeline or transformer.

    True for: a folder whose config.json is a `FluxControlNetModel` (diffusers, or an
    mlx-edit folder from `save_controlnet`); an x-flux `.safetensors` file
    (`pos_embed_input.*` keys), or a folder holding one without config.json or
    model_index.json; a Hugging Face repo with such a config.json, or with safetensors
    files but neither config.json nor model_index.json at its root (x-flux repos).
    Only the config or the tensor names are read (safetensors are opened lazily).
    """
    path = Path(str(source)).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return _is_controlnet_config(path)
        if (path / "model_index.json").is_file():
            return False
        files = sorted(path.glob("*.safetensors"))
        return len(files) == 1 and is_controlnet_source(files[0])
    if path.is_file():
        if path.suffix != ".safetensors":
            return False
        try:
            keys = open_tensors([path], strip_prefixes=BFL_PREFIXES).keys()
        except WeightLoadError:
            return False
        return "pos_embed_input.weight" in keys
    if not is_repo_id(str(source)):
        return False
    files = _root_files_of_repo(str(source))
    if not files or "model_index.json" in files:
        return False
    if "config.json" in files:
        from huggingface_hub import hf_hub_download

        try:
            return _is_controlnet_config(Path(hf_hub_download(str(source), "config.json")).parent)
        except Exception:  # the download's own error surfaces when the pipeline path runs
            return False
    return any(f.endswith(".safetensors") and "/" not in f for f in files)


def locate(repo_or_path: str | Path) -> tuple[list[Path], Path]:
    """(safetensors files, config folder) of a ControlNet repo id, folder or file (see
    `resolve_controlnet`); a folder without config.json must hold one file.
    Raises WeightLoadError (nothing there, several candidate files, failed download)."""
    path = resolve_controlnet(repo_or_path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir() and ((path / "model_index.json").is_file()
                          or (path / "transformer").is_dir()):
        raise WeightLoadError(f"{path} is a FLUX model folder (model_index.json, "
                              "transformer/), not a ControlNet: give it as --model, and a "
                              "ControlNet folder or file as --controlnet")
    if path.is_dir() and not (path / "config.json").is_file():
        files = sorted(path.glob("*.safetensors"))
        if len(files) > 1:  # e.g. several x-flux versions in one folder: the user must choose
            names = ", ".join(f.name for f in files)
            raise WeightLoadError(f"{path}: several ControlNet files ({names}); pass one file")
    return safetensors_files(path), folder


def load_controlnet(
    repo_or_path: str | Path, dtype: mx.Dtype | None = None, *, config: dict | None = None,
    quantize: int | None = None, group_size: int = DEFAULT_GROUP_SIZE,
) -> FluxControlNet:
    """Load a FLUX ControlNet from a repo id, a diffusers folder, an x-flux single file
    (or a folder holding one) or an mlx-edit folder (quantized or not).

    dtype: None -> bfloat16 on GPU, float32 on CPU. config: overrides (x-flux files with
    head_dim != 128 need {"axes_dims_rope": [...]}). quantize: bits to quantize at load
    (`quantize_controlnet`), layer by layer so full precision is never resident beyond
    one layer; ignored for an already quantized folder (with a warning if bits differ).
    Raises WeightLoadError (unreadable, missing/unexpected/mis-shaped tensors, not a
    ControlNet), ValueError (inconsistent config).
    """
    return loader.load("controlnet", repo_or_path, dtype, config=config, quantize=quantize,
                       group_size=group_size)


# Kept in full precision: the transformer's embedders, and the control input projection.
CONTROLNET_FULL_PRECISION = FULL_PRECISION["controlnet"]


def quantize_controlnet(model: FluxControlNet, bits: int,
                        group_size: int = DEFAULT_GROUP_SIZE) -> dict:
    """Quantize a ControlNet in place (policy in the module doc); returns the record
    ({"bits", "group_size", "mode", "skipped"}). An already quantized model is left as
    is (with a warning if its bits differ). Raises ValueError for unsupported bits /
    group size."""
    return quantize_at_load(model, "controlnet", bits, group_size)


def save_controlnet(model: FluxControlNet, folder: str | Path,
                    max_shard_bytes: int = save.MAX_SHARD_BYTES) -> Path:
    """Write `model` (quantized or not) as an mlx-edit folder: config.json (diffusers field
    names, `_mlx_edit_version`, the quantization record) and sharded safetensors with our
    names. Returns the folder."""
    folder = Path(folder)
    cfg = {"_class_name": "FluxControlNetModel", **vars(model.config), MLX_LAYOUT_KEY: __version__}
    cfg["axes_dims_rope"] = list(cfg["axes_dims_rope"])
    record = describe_quantization(model)
    if record is not None:
        cfg["quantization"] = record
    writer = save.ShardWriter(folder, max_shard_bytes)
    for key, value in tree_flatten(model.parameters()):
        writer.add(key, value)
    writer.close()
    save.write_json(folder / "config.json", cfg)
    return folder


def convert_controlnet(source: str | Path, dest: str | Path, dtype: mx.Dtype = mx.bfloat16,
                       bits: int | None = None, group_size: int = DEFAULT_GROUP_SIZE, *,
                       overwrite: bool = False, config: dict | None = None,
                       max_shard_bytes: int = save.MAX_SHARD_BYTES) -> Path:
    """Convert any ControlNet `load_controlnet` reads into an mlx-edit folder `dest`,
    cast to `dtype` and quantized to `bits` (None: not quantized). Written next to dest
    and renamed into place when complete. Peak memory: the model once (ControlNets are
    at most a few GB). Raises FileExistsError (dest in the way), WeightLoadError."""
    dest = Path(dest)
    save.check_dest(dest, overwrite)
    model = load_controlnet(source, dtype, config=config, quantize=bits, group_size=group_size)
    tmp = save.temp_folder_for(dest)
    try:
        save_controlnet(model, tmp, max_shard_bytes)
        save.publish(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
