"""mlx-edit SAM 3 folders: a transformers `Sam3Model` folder (or an earlier mlx-edit SAM 3
folder) converted to our names in the precisions measured harmless (float32, float16),
and that precision policy (benchmarks/bench_sam3_quantize.py, benchmarks/RESULTS.md).

The folder (read back by `weights/sam3.py`'s `mlx` format): `model.safetensors` with each
sub-model's parameters under its prefix (`sam3.MLX_PREFIXES`: `vision.`, `text.`,
`heads.`), the source's config.json marked `_mlx_edit_version`, and the source's other
small files (tokenizer, preprocessor_config.json) copied.

Precision policy: a reduced precision is offered only when the masks it gives stayed
within `MIN_IOU` of float32's (`PRECISION_IOU`, min over queries and photos); anything
else is refused with the measurement quoted (`Sam3PrecisionRefused`), before any work.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_edit import __version__
from mlx_edit.weights.core import WeightLoadError, read_config
from mlx_edit.weights.quantize import MLX_LAYOUT_KEY
from mlx_edit.weights.sam import SamQuantizationRefused
from mlx_edit.weights.sam3 import MLX_PREFIXES, load_sam3_heads, load_sam3_text, load_sam3_vision
from mlx_edit.weights.save import (
    ShardWriter,
    check_dest,
    folder_bytes,
    publish,
    remove_stale_temps,
    temp_folder_for,
    write_json,
)

# The Linears a quantization would cover: those of the transformer layers of the three
# sub-models (nearly all the bytes); the FPN neck, the box/score/mask heads, projections,
# convolutions, embeddings and norms stay in full precision.
SAM3_QUANTIZED_PREFIXES = ("backbone.layers.", "text_model.encoder.layers.",
                           "geometry_encoder.layers.", "detr_encoder.layers.",
                           "detr_decoder.layers.")


def sam3_quantizable(model: nn.Module, group_size: int) -> list[tuple[str, nn.Linear]]:
    """(path, layer) of the Linears of a SAM 3 sub-model (vision, text or heads) that the
    policy covers (`SAM3_QUANTIZED_PREFIXES`, input width a multiple of `group_size`)."""
    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    return [(p, m) for p, m in leaves
            if isinstance(m, nn.Linear) and p.startswith(SAM3_QUANTIZED_PREFIXES)
            and m.weight.shape[-1] % group_size == 0]


# Thresholded-mask IoU and score deltas vs float32 (benchmarks/bench_sam3_quantize.py:
# random weights, the released config at 504 px, skimage photos, one phrase each, every
# query's mask at the photo's size): precision -> (preset, group size or None, mean IoU,
# min IoU, max score delta). Offered when min IoU >= MIN_IOU.
PRECISION_IOU: dict[str | int, tuple] = {
    "float16": ("sam3-504", None, 0.9997, 0.9951, 9.3e-5),
    "bfloat16": ("sam3-504", None, 0.9974, 0.9697, 1.0e-3),
    8: ("sam3-504", 64, 0.9951, 0.9247, 5.9e-4),
    4: ("sam3-504", 64, 0.9677, 0.6391, 1.5e-2),
}
MIN_IOU = 0.99


class Sam3PrecisionRefused(SamQuantizationRefused):
    """A precision that measurably changes SAM 3's masks (`PRECISION_IOU`)."""


def _offered() -> list[str]:
    return ["float32"] + [str(k) for k, v in PRECISION_IOU.items()
                          if isinstance(k, str) and v[3] >= MIN_IOU]


def check_sam3_precision(dtype: str, bits: int | None = None, group_size: int = 64) -> str:
    """The measured note for converting SAM 3 to `dtype` (float32/float16/bfloat16) or
    to `bits`; Sam3PrecisionRefused quoting the measurement when it changes the masks
    (or was not measured)."""
    if bits is not None:
        measured = PRECISION_IOU.get(bits)
        if measured is None or group_size > measured[1]:
            raise Sam3PrecisionRefused(
                f"SAM 3 quantization to {bits} bits with groups of {group_size} is not "
                "measured; convert without --quantize (--dtype float16 halves the size)")
        key, what = bits, f"at {bits} bits"
        other = "convert without --quantize (--dtype float16 halves the size)"
    elif dtype == "float32":
        return "float32"
    else:
        key, what, other = dtype, f"in {dtype}", "use --dtype " + " or ".join(_offered())
    preset, _, mean, low, delta = PRECISION_IOU.get(key, (None, None, 0.0, 0.0, 0.0))
    if preset is None:
        raise Sam3PrecisionRefused(f"SAM 3 {what} is not measured; {other}")
    note = (f"mask IoU vs float32 {mean:.3f} mean, {low:.3f} min, scores within "
            f"{delta:.0e} ({preset}, random weights)")
    if low < MIN_IOU:
        raise Sam3PrecisionRefused(f"SAM 3 {what} changes its masks: {note}, below the "
                                   f"{MIN_IOU} this converter requires; {other}")
    return note


def is_sam3_source(source: str | Path) -> bool:
    """Whether `source` is a local SAM 3 image-model folder: config.json with model_type
    `sam3` (transformers or mlx-edit layout). Only config.json is read."""
    path = Path(str(source)).expanduser()
    try:
        return (path / "config.json").is_file() and read_config(path).get("model_type") == "sam3"
    except WeightLoadError:
        return False


def save_sam3(vision: nn.Module, text_encoder: nn.Module, heads: nn.Module, folder: Path,
              config: dict) -> None:
    """Write the three sub-models (our names, each under its `MLX_PREFIXES` prefix) as
    `folder`/model.safetensors and `config` (a transformers Sam3Config dict) marked
    `_mlx_edit_version` as its config.json: an mlx-edit SAM 3 folder, less the tokenizer
    and preprocessor files."""
    writer = ShardWriter(folder)
    for kind, model in (("sam3_vision", vision), ("sam3_text", text_encoder),
                        ("sam3_heads", heads)):
        for key, value in tree_flatten(model.parameters()):
            writer.add(MLX_PREFIXES[kind] + key, value)
    writer.close()
    write_json(folder / "config.json", {**config, MLX_LAYOUT_KEY: __version__})


def _write(folder: Path, source: Path, dtype: mx.Dtype) -> None:
    """`source` loaded in `dtype` and written by `save_sam3`, its small files copied."""
    save_sam3(load_sam3_vision(source, dtype), load_sam3_text(source, dtype),
              load_sam3_heads(source, dtype), folder, read_config(source))
    for extra in sorted(source.iterdir()):
        if extra.is_file() and extra.suffix in (".json", ".txt") and extra.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copyfile(extra, folder / extra.name)


def convert_sam3(source: str | Path, dest: str | Path, dtype: mx.Dtype = mx.float16,
                 bits: int | None = None, group_size: int = 64, *, overwrite: bool = False,
                 log=None) -> dict:
    """Convert the SAM 3 folder `source` (transformers Sam3Model or mlx-edit) into the
    mlx-edit folder `dest` (module doc), floating tensors in `dtype` (float32, float16;
    others as `check_sam3_precision` says), written next to `dest` and renamed into place
    when complete (the arguments of `sam.convert_sam`).
    `log`: a callable for the one-line summary. Returns {"format", "kind", "source",
    "dtype", "bits", "group_size", "bytes", "iou"}. Raises Sam3PrecisionRefused (a
    precision `check_sam3_precision` refuses; any `bits`), FileExistsError (dest in the
    way), WeightLoadError (not a SAM 3 folder, missing or mis-shaped tensors)."""
    name = str(dtype).split(".")[-1]
    note = check_sam3_precision(name, bits, group_size)
    if bits is not None:  # none measured harmless: quantized SAM 3 folders are not written
        raise Sam3PrecisionRefused(f"SAM 3 quantization is not supported ({note})")
    source, dest, t0 = Path(source).expanduser(), Path(dest).expanduser(), time.perf_counter()
    check_dest(dest, overwrite)
    if not is_sam3_source(source):
        raise WeightLoadError(f"{source}: not a SAM 3 folder (config.json with model_type sam3)")
    remove_stale_temps(dest)
    tmp = temp_folder_for(dest)
    try:
        _write(tmp, source, dtype)
        publish(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    size = folder_bytes(dest)
    if log is not None:
        log(f"wrote SAM 3 {dest}: {name} ({note}), {size / 1e6:.1f} MB, "
            f"{time.perf_counter() - t0:.1f} s")
    return {"format": "mlx-edit", "kind": "text-segmenter", "source": str(source),
            "dtype": name, "bits": bits, "group_size": group_size, "bytes": size, "iou": note}
