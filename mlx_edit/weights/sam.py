"""Key map and loader for SAM 2.1 image models in the transformers `Sam2Model` layout
(facebook/sam2.1-hiera-{tiny,small,base-plus,large}: `config.json` + `model.safetensors`).

Our parameter names are transformers' own; the rules only change layouts: convolution
weights OIHW -> OHWI, and the 1x1 convolutions we run as Linears (FPN laterals, the
decoder's `conv_s0/conv_s1`) squeezed to (out, in). The released checkpoints are shared
with `Sam2VideoModel`, so they also hold the video-memory modules; those are dropped by
an explicit table (transformers' `Sam2PreTrainedModel._keys_to_ignore_on_load_unexpected`).
Anything else missing, unexpected or mis-shaped is a WeightLoadError.

Also read: Meta's original names (weights/sam_meta.py) and mlx-edit SAM folders, which
`convert_sam` (`mlx-edit convert`) writes: our names, float16/bfloat16, config.json marked
`_mlx_edit_version`. Quantization (`sam_quantizable`: the Hiera blocks' and the two-way
transformer's Linears) is offered only at bit widths whose masks measured unchanged
(`QUANTIZATION_IOU`); a quantized folder loads quantized (`apply_recorded_quantization`).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_edit.models.sam import SamConfig, SamModel
from mlx_edit.weights import sam_meta
from mlx_edit.weights.core import (
    Rule,
    WeightLoadError,
    load_into,
    open_tensors,
    read_config,
    rename,
    safetensors_files,
)
from mlx_edit import __version__
from mlx_edit.weights.quantize import (
    IDENTITY_RULES,
    MLX_LAYOUT_KEY,
    MODE,
    apply_recorded_quantization,
    describe_quantization,
    is_mlx_layout,
)
from mlx_edit.weights.save import (
    ShardWriter,
    check_dest,
    folder_bytes,
    publish,
    remove_stale_temps,
    temp_folder_for,
    write_json,
)
from mlx_edit.weights.sources import download, local_or_remote

SAM_RULES: tuple[Rule, ...] = (
    Rule("vision_encoder.backbone.patch_embed.projection.weight",
         ("vision_encoder.backbone.patch_embed.projection.weight",), "conv"),
    Rule("vision_encoder.neck.convs.{n}.weight", ("vision_encoder.neck.convs.{n}.weight",),
         "conv1x1"),
    Rule("mask_decoder.conv_{s}.weight", ("mask_decoder.conv_{s}.weight",), "conv1x1"),
    Rule("prompt_encoder.mask_embed.conv{n}.weight",
         ("prompt_encoder.mask_embed.conv{n}.weight",), "conv"),
    rename("{rest}", "{rest}"),
)

# Video-only tensors of the released checkpoints (memory encoder/attention, object pointers).
SAM_DROP = re.compile(
    r"^(memory_.*|mask_downsample.*|object_pointer_proj.*|"
    r"temporal_positional_encoding_projection_layer.*|no_memory_positional_encoding|"
    r"no_object_pointer|occlusion_spatial_embedding_parameter)$"
)

SAM_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def resolve_sam(repo_or_path: str | Path) -> Path:
    """A local SAM 2.1 folder: the path itself or a hub snapshot of a repo id (only
    `SAM_FILES` are fetched). Raises WeightLoadError for a missing path or failed download."""
    path, remote = local_or_remote(repo_or_path)
    if not remote:
        return path
    return download(str(repo_or_path), list(SAM_FILES), what="SAM 2.1",
                    hint="; pass a local folder instead")


def sam_config(repo_or_path: str | Path) -> dict:
    """The config.json of a SAM 2.1 checkpoint (`resolve_sam`); WeightLoadError."""
    return _sam_json(resolve_sam(repo_or_path))


def _sam_json(folder: Path) -> dict:
    """read_config, naming what a SAM 2.1 folder without its config.json lacks."""
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise WeightLoadError(f"{folder}: a SAM 2.1 folder needs its config.json next to "
                              "model.safetensors (as in facebook/sam2.1-hiera-*): copy the "
                              "one of the same model size")
    return read_config(folder)


def open_sam(folder: Path, name: str) -> tuple[dict, dict, tuple[Rule, ...]]:
    """(config, lazy tensors, key map) of a SAM 2.1 checkpoint: a transformers or mlx-edit
    folder, or Meta's original names (a .safetensors file or a folder holding one; config
    from config.json next to it, else `sam_meta.meta_config`). Video-only tensors are
    dropped. Raises WeightLoadError (no safetensors/config, not SAM 2, unknown size)."""
    tensors = open_tensors(safetensors_files(folder))
    if sam_meta.is_meta(tensors):
        where = folder if folder.is_dir() else folder.parent
        config = read_config(where) if (where / "config.json").is_file() \
            else sam_meta.meta_config(tensors, name)
        return config, sam_meta.meta_tensors(tensors), sam_meta.META_RULES
    config = _sam_json(folder)
    if config.get("model_type") not in (None, "sam2", "sam2_video"):
        raise WeightLoadError(f"{folder}: model_type {config.get('model_type')!r} is not "
                              "a SAM 2 checkpoint (sam2)")
    tensors = {k: v for k, v in tensors.items() if not SAM_DROP.match(k)}
    return config, tensors, IDENTITY_RULES if is_mlx_layout(config) else SAM_RULES


def load_sam(repo_or_path: str | Path, dtype: mx.Dtype | None = None) -> SamModel:
    """Load a SAM 2.1 image model from a transformers folder, a hub repo id, Meta's
    original names (weights/sam_meta.py) or an mlx-edit folder (`convert_sam`: our names,
    maybe quantized, built quantized before loading).

    dtype: None computes in float32 (SAM is small; masks are thresholded logits, so
    reduced precision is not the default; a half-precision folder is cast up). Raises
    WeightLoadError (no config/safetensors, missing, unexpected or mis-shaped keys, a
    quantization record that disagrees with the tensors).
    """
    folder = resolve_sam(repo_or_path)
    name = f"SAM 2.1 ({folder})"
    config, tensors, rules = open_sam(folder, name)
    model = SamModel(SamConfig.from_dict(config))
    if is_mlx_layout(config):
        apply_recorded_quantization(model, config, tensors, name=name)
    load_into(model, tensors, rules, mx.float32 if dtype is None else dtype, name=name)
    model.eval()
    return model


# Quantizable layers: the Linears of the Hiera blocks and of the decoder's two-way
# transformer (nearly all the bytes); the FPN neck, the decoder's heads and every
# convolution/embedding stay in full precision.
SAM_QUANTIZED_PREFIXES = ("vision_encoder.backbone.blocks.", "mask_decoder.transformer.")


def sam_quantizable(model: nn.Module, group_size: int) -> list[tuple[str, nn.Linear]]:
    """(path, layer) of the Linears the quantization policy covers (`SAM_QUANTIZED_PREFIXES`,
    input width a multiple of `group_size`)."""
    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    return [(p, m) for p, m in leaves
            if isinstance(m, nn.Linear) and p.startswith(SAM_QUANTIZED_PREFIXES)
            and m.weight.shape[-1] % group_size == 0]


def is_sam_source(source: str | Path) -> bool:
    """Whether `source` is a local SAM 2 checkpoint: a folder whose config.json has
    model_type sam2 / sam2_video (transformers or mlx-edit layout), or Meta's original
    names (a .safetensors file, or a folder of them without config.json). Only config.json
    or the safetensors headers are read."""
    path = Path(str(source)).expanduser()
    try:
        if (path / "config.json").is_file():
            return read_config(path).get("model_type") in ("sam2", "sam2_video")
        if path.suffix == ".safetensors" or (path.is_dir() and any(path.glob("*.safetensors"))):
            return sam_meta.is_meta(open_tensors(safetensors_files(path)))
    except WeightLoadError:
        pass
    return False


def quantize_sam(model: SamModel, bits: int, group_size: int) -> dict:
    """Quantize `model` in place by the policy (`sam_quantizable`); returns the config's
    quantization record (every other quantizable layer listed as skipped)."""
    chosen = {p for p, _ in sam_quantizable(model, group_size)}
    nn.quantize(model, group_size, bits, mode=MODE,
                class_predicate=lambda path, m: path in chosen)
    return describe_quantization(model)


def save_sam(model: SamModel, folder: Path, config: dict) -> None:
    """Write `model` (our names, quantized or not) and `config` plus the mlx-edit marker and
    quantization record as config.json into `folder`."""
    record = describe_quantization(model)
    writer = ShardWriter(folder)
    for key, value in tree_flatten(model.parameters()):
        writer.add(key, value)
    writer.close()
    config = {k: v for k, v in config.items() if k not in (MLX_LAYOUT_KEY, "quantization")}
    config[MLX_LAYOUT_KEY] = __version__
    if record is not None:
        config["quantization"] = record
    write_json(folder / "config.json", config)


class SamQuantizationRefused(ValueError):
    """Quantization that measurably changes SAM's masks (`QUANTIZATION_IOU`)."""


# Mask IoU of quantized vs float32 SAM (benchmarks/bench_sam_quantize.py: random weights at
# the sam2.1-hiera-tiny config, 1024 px, skimage photos, 9 clicks + 2 boxes each; see
# benchmarks/RESULTS.md): bits -> (preset, group size, mean IoU, min IoU). A width is
# offered when its min IoU >= MIN_IOU, at that group size or a finer one; none is today.
QUANTIZATION_IOU = {8: ("hiera-tiny", 64, 0.9843, 0.5746), 4: ("hiera-tiny", 64, 0.8470, 0.0360)}
MIN_IOU = 0.98


def check_sam_bits(bits: int, group_size: int = 64) -> str:
    """The measured IoU note for `bits` when it is offered; SamQuantizationRefused (quoting
    the measurement) otherwise."""
    preset, group, mean, low = QUANTIZATION_IOU.get(bits, (None, 0, 0.0, 0.0))
    if preset is None or group_size > group:
        raise SamQuantizationRefused(
            f"SAM 2.1 quantization to {bits} bits with groups of {group_size} is not measured; "
            f"measured: {', '.join(f'{b} bits (group {v[1]})' for b, v in QUANTIZATION_IOU.items())}")
    note = f"mask IoU vs float32 {mean:.3f} mean, {low:.3f} min ({preset}, random weights)"
    if low < MIN_IOU:
        offered = [b for b, v in QUANTIZATION_IOU.items() if v[3] >= MIN_IOU]
        other = f" or --quantize {offered[0]}" if offered else ""
        raise SamQuantizationRefused(
            f"SAM 2.1 at {bits} bits changes its masks: {note}, below the {MIN_IOU} this "
            f"converter requires; convert without --quantize{other} (--dtype float16 or "
            "bfloat16 halves the size)")
    return note


def convert_sam(source: str | Path, dest: str | Path, dtype: mx.Dtype = mx.bfloat16,
                bits: int | None = None, group_size: int = 64, *, overwrite: bool = False,
                log=None) -> dict:
    """Convert the SAM 2.1 checkpoint `source` (transformers folder or repo id, Meta's names,
    an mlx-edit SAM folder) into the mlx-edit folder `dest`: our names, floating tensors in
    `dtype`, config.json with the mlx-edit marker (and quantization record), the
    preprocessor_config.json. Written next to `dest` and renamed into place when complete.
    bits: only where `QUANTIZATION_IOU` says it is harmless (`check_sam_bits`). `log`: a
    callable for the one-line summary. Returns {"format", "kind", "source", "dtype",
    "bits", "group_size", "bytes", "iou"}. Raises FileExistsError (dest in the way),
    SamQuantizationRefused (refused bits, an already quantized source), WeightLoadError."""
    note = check_sam_bits(bits, group_size) if bits is not None else None
    dest, t0 = Path(dest).expanduser(), time.perf_counter()
    check_dest(dest, overwrite)
    folder = resolve_sam(source)
    config = open_sam(folder, f"SAM 2.1 ({folder})")[0]
    if (config.get("quantization") or {}).get("bits"):
        raise SamQuantizationRefused(f"{folder} is already quantized: convert from the float "
                                     "checkpoint")
    model = load_sam(folder, dtype)
    if bits is not None:
        quantize_sam(model, bits, group_size)
    remove_stale_temps(dest)
    tmp = temp_folder_for(dest)
    try:
        save_sam(model, tmp, config)
        proc = (folder if folder.is_dir() else folder.parent) / "preprocessor_config.json"
        if proc.is_file():
            shutil.copyfile(proc, tmp / proc.name)
        publish(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    size, name = folder_bytes(dest), str(dtype).split(".")[-1]
    if log is not None:
        precision = f"{bits}-bit (group {group_size}; {note})" if bits else name
        log(f"wrote SAM 2.1 {dest}: {precision}, {size / 1e6:.1f} MB, "
            f"{time.perf_counter() - t0:.1f} s")
    return {"format": "mlx-edit", "kind": "segmenter", "source": str(source), "dtype": name,
            "bits": bits, "group_size": group_size, "bytes": size, "iou": note}
