"""SAM 2.1 on MLX vs transformers: image-embedding time and per-prompt decode time.

    python benchmarks/bench_segment.py [--presets hiera-tiny,hiera-large] [--reps 3]

For each preset (scripts/sam_fixtures.py: `tiny`, `hiera-tiny|small|base-plus|large`, the
released image encoders with random weights) the same weights run through
`SamModel.image_embeddings` (MLX, float32) and transformers' `Sam2Model.get_image_embeddings`
(torch, float32) on skimage's astronaut at the model's input size (1024 px for the released
configs), then one decode per prompt (one click, multimask) on both. Reports medians
after `--warmup` untimed runs (default 1), the ratio MLX/transformers (< 1: MLX faster), the embedding's relative
error, and MLX's peak memory. The last line is the summary the smoke test reads.
"""

from __future__ import annotations

import common  # noqa: F401  (first: OpenBLAS before mlx)

import argparse
import sys
import tempfile

import mlx.core as mx
import numpy as np
import torch
from PIL import Image
from skimage import data

from common import REPO_ROOT, machine_header, med, median_time, peak_gb, table

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import sam_fixtures as fx  # noqa: E402

from mlx_edit.weights.sam import load_sam  # noqa: E402


def bench_preset(preset: str, reps: int, warmup: int = 1) -> list:
    ref = fx.make_model(preset)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = load_sam(tmp)
    size = ours.cfg.image_size
    photo = Image.fromarray(data.astronaut()).resize((size, size), Image.BILINEAR)
    x = ((np.asarray(photo, np.float32) / 255 - fx.IMAGENET_MEAN) / fx.IMAGENET_STD)
    pixels = x.astype(np.float32)[None]
    pixels_t = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    point = np.array([[[[0.45 * size, 0.25 * size]]]], np.float32)

    last = {}  # the timed runs' outputs: no extra (slow, at large sizes) run to compare them

    def ours_embed():
        last["ours"] = emb = ours.image_embeddings(mx.array(pixels))
        mx.eval(emb.embedding, emb.high_res)

    def ref_embed():
        with torch.no_grad():
            last["ref"] = ref.get_image_embeddings(pixels_t)

    mx.reset_peak_memory()
    t_ours = median_time(ours_embed, reps, warmup)
    t_ref = median_time(ref_embed, reps, warmup)
    emb, ref_emb = last["ours"], last["ref"]
    err = float(np.abs(np.array(emb.embedding) - ref_emb[-1].permute(0, 2, 3, 1).numpy()).max()
                / ref_emb[-1].abs().max())

    def ours_decode():
        mx.eval(ours.decode(emb, points=mx.array(point), labels=mx.ones((1, 1, 1), mx.int32)))

    def ref_decode():
        with torch.no_grad():
            ref(image_embeddings=ref_emb, input_points=torch.from_numpy(point),
                input_labels=torch.ones((1, 1, 1), dtype=torch.long))

    d_ours = median_time(ours_decode, max(reps, 5))
    d_ref = median_time(ref_decode, max(reps, 5))
    return [preset, size, f"{med(t_ours):.3f}", f"{med(t_ref):.3f}",
            f"{med(t_ours) / med(t_ref):.2f}", f"{1e3 * med(d_ours):.1f}",
            f"{1e3 * med(d_ref):.1f}", f"{med(d_ours) / med(d_ref):.2f}", f"{err:.1e}",
            f"{peak_gb():.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="hiera-tiny",
                        help="comma-separated: tiny, " + ", ".join(fx.PRESETS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed embedding runs per side first (0 for the large sizes)")
    args = parser.parse_args()
    print("\n".join(machine_header(" ".join(["python", *sys.argv]))))
    print(f"torch threads: {torch.get_num_threads()}")
    rows = [bench_preset(p, args.reps, args.warmup) for p in args.presets.split(",")]
    print(table(rows, ["preset", "px", "embed mlx s", "embed torch s", "ratio",
                       "decode mlx ms", "decode torch ms", "ratio", "emb rel err",
                       "mlx peak GB"]))
    print("segment ratios mlx/transformers: " + "; ".join(
        f"{r[0]} embed {r[4]} decode {r[7]}" for r in rows))


if __name__ == "__main__":
    main()
