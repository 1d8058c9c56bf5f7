"""`mlx-edit batch` throughput: edits per minute for one process vs two ranks
(`mlx.launch --backend ring -n 2` on this machine), and with vs without the prompt cache.

    python benchmarks/bench_batch.py --model DIR [--preset tiny|wide] [--edits 8]
        [--prompts 2] [--size 256x256] [--steps 2] [--max-sequence-length 64]

DIR: a FLUX.1 Fill folder (with --preset and no DIR, built first, as bench_pipeline.py).
The manifest has --edits inpaint lines on scikit-image's astronaut (resized to --size),
cycling through --prompts distinct prompts. Each setting is one `mlx-edit batch` run in
fresh processes into a fresh folder, timed from start to exit (model loading included:
it is part of a batch's cost): "no cache" (--no-prompt-cache: each distinct prompt
encoded once per process), "cache cold" (an empty cache folder: encoded and stored),
"cache warm" (the same folder again: T5 and CLIP never loaded), "2 ranks, warm" (two
ranks share the lines and the warm cache). Per setting: wall seconds, edits per minute,
and the summed text-encoding and denoising seconds from results.jsonl. Last line:
`batch N edits WxH: 1 process X/min, cache warm Y/min (text A s -> B s), 2 ranks Z/min`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: mlx_edit -> OpenBLAS before mlx)

import numpy as np  # noqa: E402

from bench_pipeline import ensure_model, inputs  # noqa: E402

LAUNCH = "from mlx_edit.cli import main; main()"


def write_manifest(folder: Path, edits: int, prompts: int, size: tuple[int, int],
                   steps: int, msl: int) -> Path:
    from PIL import Image

    image, mask = inputs(*size)
    image.save(folder / "photo.png")
    Image.fromarray((mask * 255).astype(np.uint8)).save(folder / "mask.png")
    rows = [{"id": f"e{i}", "image": "photo.png", "mask": "mask.png", "seed": i,
             "prompt": f"a red helmet, style {i % prompts}", "steps": steps,
             "max_sequence_length": msl} for i in range(edits)]
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(cmd_args: list[str], ranks: int, port: int) -> float:
    """Wall seconds of one `mlx-edit batch` run (1 process or `ranks` under mlx.launch)."""
    env = {**os.environ, "PYTHONPATH": str(common.REPO_ROOT)}
    if ranks == 1:
        cmd = [sys.executable, "-c", LAUNCH, *cmd_args]
    else:
        cmd = ["mlx.launch", "--backend", "ring", "-n", str(ranks), "--starting-port",
               str(port), "--python", sys.executable, "--", "-c", LAUNCH, *cmd_args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"batch failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return wall


def summed(out: Path, key: str) -> float:
    recs = [json.loads(t) for t in (out / "results.jsonl").read_text().splitlines()]
    return sum(r["stats"].get(key, 0.0) for r in recs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--preset", choices=("tiny", "small", "wide"))
    ap.add_argument("--edits", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--size", default="256x256")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--max-sequence-length", type=int, default=64)
    args = ap.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    print("\n".join(common.machine_header(" ".join(["python"] + sys.argv))))
    root = ensure_model(args.model, args.preset)
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    try:
        manifest = write_manifest(work, args.edits, args.prompts, size, args.steps,
                                  args.max_sequence_length)
        cache = work / "cache"
        settings = [("no cache", 1, ["--no-prompt-cache"]),
                    ("cache cold", 1, ["--prompt-cache", str(cache)]),
                    ("cache warm", 1, ["--prompt-cache", str(cache)]),
                    ("2 ranks, warm", 2, ["--prompt-cache", str(cache)])]
        rows, rate = [], {}
        for i, (name, ranks, extra) in enumerate(settings):
            out = work / f"out{i}"
            wall = run(["batch", str(manifest), "--output-dir", str(out), "--model", str(root),
                        *extra], ranks, 20000 + os.getpid() % 20000)
            rate[name] = args.edits / wall * 60
            text, denoise = summed(out, "text_encode_s"), summed(out, "denoise_s")
            rate[name + " text"] = text
            rows.append([name, ranks, f"{wall:.1f}", f"{rate[name]:.1f}", f"{text:.2f}",
                         f"{denoise:.2f}"])
        print(common.table(rows, ["setting", "ranks", "wall s", "edits/min", "text s (sum)",
                                  "denoise s (sum)"]))
        print(f"batch {args.edits} edits {size[0]}x{size[1]}: 1 process "
              f"{rate['no cache']:.1f}/min, cache warm {rate['cache warm']:.1f}/min (text "
              f"{rate['no cache text']:.2f} s -> {rate['cache warm text']:.2f} s), 2 ranks "
              f"{rate['2 ranks, warm']:.1f}/min")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
