"""A whole inpaint, phase by phase: seconds and MLX peak memory (GB) per phase.

    python benchmarks/bench_pipeline.py --model DIR --size 1024x1024 --steps 2
        [--dtype float32|bfloat16] [--quantize 4|8] [--preset wide] [--low-memory]

DIR: a FLUX.1 Fill folder (e.g. `python scripts/make_tiny_checkpoint.py DIR --preset
wide`); with --preset and no existing DIR, the fixture is built into DIR first. The edit
inpaints a centred rectangle of a real photo (scikit-image's astronaut, resized to the
size) without crop-to-mask, so the model canvas is exactly --size. Phases (FluxFill's own
`load_stats` / `last_stats`, recorded by `denoise.Phase`: the peak is reset at the start
of each phase and includes the resident weights): load, text encode, VAE encode, each
denoising step, VAE decode. The memory estimate (mlx_edit.editing.memory) for the same run is
printed next to it (FluxFill checks it before the edit). The pipeline's VAE goes through
`tiling.encode_auto/decode_auto`: untiled, the CPU backend needs ~35 kB per pixel to
decode (37 GB at 1024x1024). --low-memory runs `FluxFill(low_memory=True)`: each phase
loads its model (the reload seconds are listed as load_<model>) and frees it. Last line: `pipeline <size>: load X s, text Y s, ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: mlx_edit -> OpenBLAS before mlx)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from mlx_edit.editing import memory  # noqa: E402
from mlx_edit.editing.pipeline import FluxFill  # noqa: E402

PHASES = ("load", "text_encode", "vae_encode", "denoise", "vae_decode")


def ensure_model(path: Path, preset: str | None) -> Path:
    if (path / "model_index.json").is_file() or not preset:
        return path
    sys.path.insert(0, str(common.REPO_ROOT / "scripts"))
    import make_tiny_checkpoint

    print(f"building the {preset} fixture into {path} ...", flush=True)
    return make_tiny_checkpoint.build(path, preset)


def inputs(width: int, height: int) -> tuple[Image.Image, np.ndarray]:
    import skimage.data

    image = Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.BICUBIC)
    mask = np.zeros((height, width), dtype=np.float32)
    mask[height // 4 : 3 * height // 4, width // 3 : 2 * width // 3] = 1.0
    return image, mask


def configs(root: Path) -> dict:
    def read(name: str) -> dict:
        path = root / name / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    return {"transformer": read("transformer"), "vae": read("vae"),
            "clip": read("text_encoder"), "t5": read("text_encoder_2")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--preset", choices=("tiny", "small", "wide"))
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"))
    ap.add_argument("--quantize", type=int, choices=(4, 8))
    ap.add_argument("--prompt", default="a red helmet")
    ap.add_argument("--low-memory", action="store_true")
    args = ap.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    print("\n".join(common.machine_header(" ".join(["python"] + sys.argv))))
    root = ensure_model(args.model, args.preset)
    dtype = getattr(mx, args.dtype) if args.dtype else None

    pipe = FluxFill.from_pretrained(root, dtype=dtype, quantize=args.quantize,
                                low_memory=args.low_memory)
    image, mask = inputs(width, height)
    step_times, last = [], [time.perf_counter()]

    def progress(i, total):
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    # The progress callback starts counting at the first step: reset the clock there.
    orig_steps = pipe.steps

    def steps(job):
        last[0] = time.perf_counter()
        yield from orig_steps(job)

    pipe.steps = steps
    pipe.inpaint(image, mask, args.prompt, steps=args.steps, seed=0, crop_to_mask=False,
                 feather=0, progress=progress)
    stats = pipe.last_stats
    rows = []
    for phase in PHASES:
        secs = stats.get(f"{phase}_s")
        peak = stats.get(f"{phase}_peak_gb")
        if secs is not None:
            rows.append([phase, f"{secs:.2f}", f"{peak:.2f}" if peak is not None else "-"])
    for key in sorted(k for k in stats if k.startswith("load_") and k.endswith("_s") and k != "load_s"):
        rows.append([key[:-2], f"{stats[key]:.2f}", ""])  # low-memory reloads
    for i, t in enumerate(step_times):
        rows.append([f"  step {i + 1}", f"{t:.2f}", ""])
    print(common.table(rows, ["phase", "seconds", "MLX peak GB (incl. weights)"]))
    dt = pipe.dtype
    est = memory.estimate(width, height, 1, str(dt).split(".")[-1], args.quantize,
                          **configs(root))
    print("memory estimate (mlx_edit.editing.memory) for this run:")
    print(memory.summary(est))
    print(f"process peak RSS: {common.process_rss_gb():.2f} GB")
    key = "peak_low_memory" if args.low_memory else "peak"
    mode = ", low memory" if args.low_memory else ""
    print(f"pipeline {width}x{height} ({str(dt).split('.')[-1]}{mode}): load "
          f"{stats['load_s']:.1f} s, text {stats['text_encode_s']:.1f} s, VAE encode "
          f"{stats['vae_encode_s']:.1f} s, step {stats['step_s']:.1f} s, VAE decode "
          f"{stats['vae_decode_s']:.1f} s; peak {max(stats[f'{p}_peak_gb'] for p in PHASES):.2f}"
          f" GB (estimate {est[key]:.2f} GB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
