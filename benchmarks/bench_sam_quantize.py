"""Does quantizing SAM 2.1 change its masks? Mask IoU of 8/4-bit weights vs float32.

    python benchmarks/bench_sam_quantize.py [--preset hiera-tiny] [--group-size 64]
        [--photos astronaut,coffee,chelsea]

The model is the preset of scripts/sam_fixtures.py with random weights (built torch-free
by make_mlx_checkpoint.write_segmenter: no released weights can be downloaded here), in
float32. Each variant quantizes the Linear layers that `mlx-edit convert` would (input
width a multiple of the group size; convolutions, embeddings and norms stay float) with
MLX's affine quantization and runs them dequantized (`mx.dequantize(mx.quantize(w))`:
the same rounded weights as a QuantizedLinear, float32 matmuls, so the CPU backend's slow
quantized kernels do not matter). For each real photo (skimage) and prompt (a 3 x 3 grid
of single clicks, best of the multimask output, and two boxes), the image-sized mask of
`Segmenter.best_mask` is compared with the float32 one: IoU (intersection / union).
Random weights give masks whose logits sit near 0 over large areas, so small weight
errors flip more pixels than trained weights would: read the IoU as a pessimistic
figure. The last line is the summary that `mlx-edit convert` quotes.
"""

from __future__ import annotations

import common  # noqa: F401  (first: OpenBLAS before mlx)

import argparse
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from skimage import data

from common import REPO_ROOT, machine_header, table

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import make_mlx_checkpoint as mmc  # noqa: E402

from mlx_edit.editing.segment import Segmenter  # noqa: E402
from mlx_edit.weights.sam import load_sam, sam_quantizable  # noqa: E402


def fake_quantize(model: nn.Module, bits: int, group_size: int) -> int:
    """Round every quantizable Linear weight of `model` to `bits` in place; returns the
    number of layers rounded."""
    n = 0
    for _, layer in sam_quantizable(model, group_size):
        w, s, b = mx.quantize(layer.weight, group_size, bits)
        layer.weight = mx.dequantize(w, s, b, group_size, bits)
        n += 1
    mx.eval(model.parameters())
    return n


def prompts(h: int, w: int) -> list[dict]:
    clicks = [dict(points=[(w * fx / 4, h * fy / 4)]) for fy in (1, 2, 3) for fx in (1, 2, 3)]
    boxes = [dict(boxes=[(w * 0.2, h * 0.15, w * 0.7, h * 0.8)]),
             dict(boxes=[(w * 0.5, h * 0.4, w * 0.95, h * 0.95)])]
    return clicks + boxes


def masks_for(seg: Segmenter, photo: np.ndarray) -> list[np.ndarray]:
    seg.set_image(photo)
    return [seg.best_mask(**p) for p in prompts(*photo.shape[:2])]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="hiera-tiny")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--photos", default="astronaut,coffee,chelsea")
    args = ap.parse_args()
    print("\n".join(machine_header(" ".join(["python", *sys.argv]))))
    photos = {name: getattr(data, name)() for name in args.photos.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        folder = mmc.write_segmenter(Path(tmp) / "sam", args.preset, seed=0)
        ref = {k: masks_for(Segmenter(load_sam(folder)), p) for k, p in photos.items()}
        rows, summary = [], []
        for bits in (8, 4):
            model = load_sam(folder)
            layers = fake_quantize(model, bits, args.group_size)
            seg = Segmenter(model)
            scores = [iou(m, r) for k, p in photos.items()
                      for m, r in zip(masks_for(seg, p), ref[k])]
            rows.append([f"q{bits}", args.group_size, layers, f"{np.mean(scores):.4f}",
                         f"{np.min(scores):.4f}", len(scores)])
            summary.append(f"q{bits} mean {np.mean(scores):.3f} min {np.min(scores):.3f}")
    print(table(rows, ["bits", "group", "layers", "mean IoU", "min IoU", "masks"]))
    print(f"sam quantization IoU vs float32 ({args.preset}, group {args.group_size}): "
          + "; ".join(summary))


if __name__ == "__main__":
    main()
