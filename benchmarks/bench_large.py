"""A large edit two ways: shrunk to the model-size budget (tile_mode off) vs tiled
denoising at full resolution (tile_mode on, MultiDiffusion windows): time, MLX peak
memory per phase and the generated-resolution ratio.

    python benchmarks/bench_large.py --model DIR [--size 4096x2304] [--steps 2]
        [--edit inpaint|outpaint] [--right 1024] [--max-model-pixels 1048576]
        [--max-sequence-length 32] [--modes off,on]

The photo is scikit-image's astronaut upscaled (Lanczos) to --size. inpaint: a mask
covering the right half; outpaint: --right px added on the right. The generated ratio is
generated pixels / output pixels in the edited window: the model canvas area over the
window's area when the window is shrunk, 1.0 when it is denoised at its own resolution
(read from the output's metadata: model_size, crop_box, windows). Peaks are MLX's
(`denoise.Phase`: reset at each phase, resident weights included). Last line:
`large WxH <edit>: off X s peak P GB ratio R; on ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: mlx_edit -> OpenBLAS before mlx)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data  # noqa: E402

from mlx_edit.editing.pipeline import FluxFill  # noqa: E402


def generated_ratio(info: dict) -> float:
    """Generated pixels / output pixels in the edited window, from an output's metadata."""
    mw, mh = json.loads(info["model_size"])
    x0, y0, x1, y1 = json.loads(info["crop_box"])
    return min(1.0, mw * mh / ((x1 - x0) * (y1 - y0)))


def run(pipe: FluxFill, edit: str, image: Image.Image, mode: str, args) -> dict:
    opts = dict(steps=args.steps, seed=0, max_sequence_length=args.max_sequence_length,
                tile_mode=mode, max_model_pixels=args.max_model_pixels)
    t0 = time.perf_counter()
    if edit == "outpaint":
        out = pipe.outpaint(image, "a wide landscape", right=args.right, **opts)[0]
    else:
        w, h = image.size
        mask = np.zeros((h, w), np.float32)
        mask[:, w // 2:] = 1
        out = pipe.inpaint(image, mask, "a spaceship interior", **opts)[0]
    wall = time.perf_counter() - t0
    s = pipe.last_stats
    windows = out.info.get("windows")
    return {"mode": mode, "wall_s": wall, "denoise_s": s["denoise_s"],
            "vae_s": s["vae_encode_s"] + s["vae_decode_s"],
            "denoise_peak_gb": s["denoise_peak_gb"],
            "peak_gb": max(v for k, v in s.items() if k.endswith("_peak_gb")),
            "model_size": out.info["model_size"], "crop_box": out.info["crop_box"],
            "windows": windows, "ratio": generated_ratio(out.info)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--size", default="4096x2304")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--edit", choices=("inpaint", "outpaint"), default="inpaint")
    p.add_argument("--right", type=int, default=1024)
    p.add_argument("--max-model-pixels", type=int, default=1024 * 1024)
    p.add_argument("--max-sequence-length", type=int, default=32)
    p.add_argument("--modes", default="off,on")
    args = p.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    print("\n".join(common.machine_header(" ".join(sys.argv))), flush=True)
    image = Image.fromarray(data.astronaut()).resize((w, h), Image.LANCZOS)
    pipe = FluxFill.from_pretrained(args.model)
    rows = []
    for mode in args.modes.split(","):
        row = run(pipe, args.edit, image, mode, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"large {args.size} {args.edit}: " + "; ".join(
        f"{r['mode']} {r['wall_s']:.1f} s (denoise {r['denoise_s']:.1f} s) peak "
        f"{r['peak_gb']:.2f} GB (denoise {r['denoise_peak_gb']:.2f}) ratio {r['ratio']:.2f}"
        for r in rows))


if __name__ == "__main__":
    main()
