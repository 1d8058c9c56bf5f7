"""`mlx-edit batch` throughput: edits per minute for one process vs two ranks
(`mlx.launch --backend ring -n 2` on this machine), with vs without the prompt cache, and
real batches (lines denoised together, mlx_edit.batch_groups) vs one line at a time.

    python benchmarks/bench_batch.py --model DIR [--preset tiny|wide] [--edits 8]
        [--prompts 2] [--size 256x256] [--steps 2] [--max-sequence-length 64]
        [--only "SETTING;SETTING"]

DIR: a FLUX.1 Fill folder (with --preset and no DIR, built first, as bench_pipeline.py).
The manifest has --edits inpaint lines on scikit-image's astronaut (resized to --size),
cycling through --prompts distinct prompts, one seed each. Each setting is one `mlx-edit
batch` run in fresh processes into a fresh folder, timed from start to exit (model
loading included: it is part of a batch's cost). Settings, in this order (SETTINGS):
"alone" is `--batch-size 1`, "grouped" the default real batches; "no cache" is
--no-prompt-cache (each distinct prompt encoded once per process), "cache cold" an empty
cache folder (encoded and stored), "cache warm" the same folder again (T5 and CLIP never
loaded); "2 ranks" share the lines. Per setting: wall seconds, edits per minute, and the
summed text-encoding, VAE (encode + decode) and denoising seconds from results.jsonl (a
grouped line's denoise_s is its share of its group's). Last line: `batch N edits WxH:
alone X/min, grouped Y/min, cache warm Z/min (text A s -> B s), 2 ranks W/min`.
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


def summed(out: Path, *keys: str) -> float:
    recs = [json.loads(t) for t in (out / "results.jsonl").read_text().splitlines()]
    return sum(r["stats"].get(k, 0.0) for r in recs for k in keys)


ALONE, NO_CACHE, CACHE = ["--batch-size", "1"], ["--no-prompt-cache"], ["CACHE"]
# (name, ranks, options); "CACHE" stands for --prompt-cache and the run's one folder
# (empty for the first setting using it: cold before warm).
SETTINGS = [("alone, no cache", 1, ALONE + NO_CACHE), ("grouped, no cache", 1, NO_CACHE),
            ("grouped, cache cold", 1, CACHE), ("grouped, cache warm", 1, CACHE),
            ("alone, cache warm", 1, ALONE + CACHE),
            ("2 ranks, alone, no cache", 2, ALONE + NO_CACHE),
            ("2 ranks, grouped, cache warm", 2, CACHE)]


def measure(settings, manifest: Path, root: Path, work: Path, edits: int) -> dict:
    """{setting: (ranks, wall s, edits/min, text s, vae s, denoise s)}."""
    cache, port, out = work / "cache", 20000 + os.getpid() % 20000, {}
    for i, (name, ranks, extra) in enumerate(settings):
        extra = [a for x in extra for a in (["--prompt-cache", str(cache)] if x == "CACHE"
                                            else [x])]
        folder = work / f"out{i}"
        wall = run(["batch", str(manifest), "--output-dir", str(folder), "--model", str(root),
                    *extra], ranks, port)
        out[name] = (ranks, wall, edits / wall * 60, summed(folder, "text_encode_s"),
                     summed(folder, "vae_encode_s", "vae_decode_s"),
                     summed(folder, "denoise_s"))
        print(f"  {name}: " + ", ".join(f"{v:.2f}" for v in out[name][1:]), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--preset", choices=("tiny", "small", "wide"))
    ap.add_argument("--edits", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--size", default="256x256")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--max-sequence-length", type=int, default=64)
    ap.add_argument("--only", default=None, help="setting names separated by ; (all)")
    args = ap.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    only = None if args.only is None else [n.strip() for n in args.only.split(";")]
    settings = [s for s in SETTINGS if only is None or s[0] in only]
    if only is not None and len(settings) != len(only):
        raise SystemExit(f"--only: unknown setting among {only}; known: "
                         + "; ".join(s[0] for s in SETTINGS))
    print("\n".join(common.machine_header(" ".join(["python"] + sys.argv))))
    root = ensure_model(args.model, args.preset)
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    try:
        manifest = write_manifest(work, args.edits, args.prompts, size, args.steps,
                                  args.max_sequence_length)
        res = measure(settings, manifest, root, work, args.edits)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(common.table([[n, r[0], *(f"{v:.2f}" for v in r[1:])] for n, r in res.items()],
                       ["setting", "ranks", "wall s", "edits/min", "text s (sum)",
                        "vae s (sum)", "denoise s (sum)"]))
    rate = {n: f"{r[2]:.1f}/min" for n, r in res.items()}
    text = {n: f"{r[3]:.2f} s" for n, r in res.items()}
    print(f"batch {args.edits} edits {size[0]}x{size[1]}: alone "
          f"{rate.get('alone, no cache')}, grouped {rate.get('grouped, no cache')}, cache "
          f"warm {rate.get('grouped, cache warm')} (text {text.get('grouped, no cache')} -> "
          f"{text.get('grouped, cache warm')}), 2 ranks {rate.get('2 ranks, alone, no cache')}"
          f" / {rate.get('2 ranks, grouped, cache warm')} (alone, no cache / grouped, warm)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
