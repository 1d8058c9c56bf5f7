"""Does a lower precision change SAM 3's masks? Mask IoU and score deltas vs float32.

    python benchmarks/bench_sam3_quantize.py [--preset sam3-504] [--folder SAM3_FOLDER]
        [--group-size 64] [--photos astronaut:a person,coffee:a cup,chelsea:a cat]
        [--variants f16-weights,bf16-weights,f16,bf16,q8,q4]

The model is a random-weight transformers `Sam3Model` of scripts/sam3_fixtures.py's
`--preset` (`sam3-504`: the released facebook/sam3 config, every layer, at 504 px instead
of 1008 so that seven runs per photo fit in minutes on a CPU), or `--folder`. No released
weights can be downloaded here. Variants, each against the float32 model:
- `f16-weights`, `bf16-weights`: every floating parameter rounded to that dtype, float32
  compute (what a converted folder gives when loaded on the CPU, whose default is float32);
- `f16`, `bf16`: loaded and computed in that dtype (what Metal's default bfloat16 does);
- `q8`, `q4`: the Linears of `weights/sam3_convert.sam3_quantizable` rounded by MLX's
  affine quantization (`mx.dequantize(mx.quantize(w))`, float32 compute: the same
  rounded weights as a QuantizedLinear).
For each photo (skimage) and phrase, every query's mask (mask probability > 0.5, resized
to the photo's size as `post_process_instances` does) is compared with float32's: IoU
(intersection / union; 1 when both are empty), and each query's score (sigmoid(logit) *
sigmoid(presence)): the largest absolute delta, and how many queries changed side of the
0.3 instance threshold. Random weights give logits near 0 over large areas, so small
errors flip more pixels than trained weights would: read the IoU as pessimistic. The
last line is the summary that `weights/sam3_convert.PRECISION_IOU` records.
"""

from __future__ import annotations

import common  # noqa: F401  (first: OpenBLAS before mlx)

import argparse
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map
from skimage import data

from common import REPO_ROOT, machine_header, table

from mlx_edit.editing.text_segment import SCORE_THRESHOLD, TextSegmenter, post_process_instances
from mlx_edit.weights.sam3_convert import sam3_quantizable

VARIANTS = ("f16-weights", "bf16-weights", "f16", "bf16", "q8", "q4")


def round_weights(seg: TextSegmenter, dtype: mx.Dtype) -> None:
    """Every floating parameter of `seg` rounded to `dtype` and back, in place."""
    for model in (seg.vision, seg.text_encoder, seg.heads):
        model.update(tree_map(lambda a: a.astype(dtype).astype(a.dtype)
                              if mx.issubdtype(a.dtype, mx.floating) else a,
                              model.parameters()))
        mx.eval(model.parameters())


def fake_quantize(seg: TextSegmenter, bits: int, group_size: int) -> int:
    """Round the policy's Linears of `seg` to `bits` in place; returns how many."""
    n = 0
    for model in (seg.vision, seg.text_encoder, seg.heads):
        for _, layer in sam3_quantizable(model, group_size):
            layer.weight = mx.dequantize(*mx.quantize(layer.weight, group_size, bits),
                                         group_size, bits)
            n += 1
        mx.eval(model.parameters())
    return n


DTYPES = {"f16": mx.float16, "bf16": mx.bfloat16}


def variant(folder: Path, name: str, group_size: int) -> tuple[TextSegmenter, str]:
    """(the segmenter of variant `name`, what was changed)."""
    if name in DTYPES:
        return TextSegmenter.from_pretrained(folder, DTYPES[name]), "all"
    seg = TextSegmenter.from_pretrained(folder, mx.float32)
    if name.endswith("-weights"):
        round_weights(seg, DTYPES[name.removesuffix("-weights")])
        return seg, "all"
    return seg, f"{fake_quantize(seg, int(name[1:]), group_size)} Linears"


def outputs(seg: TextSegmenter, photo: np.ndarray, phrase: str) -> tuple[np.ndarray, np.ndarray]:
    """(scores (Q,), masks (Q, H, W) bool at the photo's size) of every query, in order."""
    seg.set_image(photo)
    out = seg.run(phrase)
    found = post_process_instances(out, threshold=-1.0, sizes=[photo.shape[:2]],
                                   order="query")[0]
    return found.scores, found.masks


def ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-mask IoU of two (Q, H, W) bool stacks (1 where both are empty)."""
    union = np.logical_or(a, b).sum((1, 2))
    inter = np.logical_and(a, b).sum((1, 2))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def photos(spec: str) -> list[tuple[str, np.ndarray, str]]:
    out = []
    for item in spec.split(","):
        name, _, phrase = item.partition(":")
        out.append((name, getattr(data, name)(), phrase or "an object"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="sam3-504")
    ap.add_argument("--folder", help="an existing Sam3Model folder instead of --preset")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--photos", default="astronaut:a person,coffee:a cup,chelsea:a cat")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    print("\n".join(machine_header(" ".join(["python", *sys.argv]))), flush=True)
    shots = photos(args.photos)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder) if args.folder else None
        if folder is None:
            sys.path.insert(0, str(REPO_ROOT / "scripts"))
            import sam3_fixtures as fx3

            folder = fx3.build_sam3(Path(tmp) / "sam3", args.preset, seed=0)
        ref_seg = TextSegmenter.from_pretrained(folder, mx.float32)
        t0 = time.perf_counter()
        ref = [outputs(ref_seg, p, phrase) for _, p, phrase in shots]
        print(f"float32: {(time.perf_counter() - t0) / len(shots):.1f} s per photo", flush=True)
        del ref_seg
        rows, summary = [], []
        for name in args.variants.split(","):
            seg, changed = variant(folder, name, args.group_size)
            got = [outputs(seg, p, phrase) for _, p, phrase in shots]
            del seg
            iou = np.concatenate([ious(m, r[1]) for (_, m), r in zip(got, ref)])
            delta = max(float(np.abs(s - r[0]).max()) for (s, _), r in zip(got, ref))
            flips = sum(int(((s > SCORE_THRESHOLD) != (r[0] > SCORE_THRESHOLD)).sum())
                        for (s, _), r in zip(got, ref))
            rows.append([name, changed, f"{iou.mean():.4f}", f"{iou.min():.4f}",
                         f"{delta:.1e}", flips, len(iou)])
            summary.append(f"{name} mean {iou.mean():.4f} min {iou.min():.4f} "
                           f"score {delta:.1e}")
            print(rows[-1], flush=True)
    print(table(rows, ["variant", "changed", "mean IoU", "min IoU", "max score delta",
                       "threshold flips", "masks"]))
    print(f"sam3 precision vs float32 ({args.folder or args.preset}, group {args.group_size}): "
          + "; ".join(summary))


if __name__ == "__main__":
    main()
