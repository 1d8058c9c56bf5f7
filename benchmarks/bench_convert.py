"""Peak memory and time of `mlx-edit convert` on the `wide` fixture (real FLUX widths).

    python benchmarks/bench_convert.py [--source DIR] [--work DIR] [--keep]

SOURCE defaults to $MLX_EDIT_WIDE_CKPT, else a `wide` fixture is built into --work with
scripts/make_tiny_checkpoint.py (~5 GB float32, about a minute). Each conversion runs in
a fresh child process so that its peak RSS (`resource.getrusage`, the whole process:
Python, libraries, MLX buffers and cache) and MLX's peak (`mx.get_peak_memory()`, the
arrays alone) belong to that conversion only. Peaks are reported in bytes and as a
multiple of the largest shard written: streaming means peak ~ one shard + the largest
tensor (plus the process baseline for RSS, measured by a child that only imports).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import mlx_edit
import mlx.core as mx
from mlx_edit.weights import convert as cv, save
from mlx_edit.weights.core import safetensors_files
if sys.argv[1] == "baseline":
    mx.eval(mx.zeros(1))
    print(json.dumps({"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    raise SystemExit
source, dest, dtype, bits, shard = sys.argv[1:6]
bits = int(bits) or None
largest = {"shard": 0, "tensor": 0}
real_close = save.ShardWriter.close
def close(self):
    info = real_close(self)
    largest["shard"] = max(largest["shard"], info["largest_shard"])
    largest["tensor"] = max(largest["tensor"], info["largest_tensor"])
    return info
save.ShardWriter.close = close
# largest source tensor (lazy loads: only headers are read)
src_max = max(a.nbytes for c in ("transformer", "vae", "text_encoder", "text_encoder_2")
              for f in safetensors_files(f"{source}/{c}") for a in mx.load(str(f)).values())
t0 = time.perf_counter()
cv.convert_checkpoint(source, dest, dtype=dtype, quantize=bits, max_shard_bytes=int(shard))
print(json.dumps({
    "seconds": time.perf_counter() - t0,
    "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "mx_peak": mx.get_peak_memory(),
    "largest_shard": largest["shard"], "largest_tensor": largest["tensor"],
    "largest_source_tensor": src_max,
    "bytes": save.folder_bytes(dest),
}))
"""


def run_child(*args: str) -> dict:
    """Run CHILD with `args` in a fresh interpreter; its last stdout line is JSON."""
    res = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if res.returncode:
        raise RuntimeError(f"child failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def wide_source(work: Path) -> Path:
    given = os.environ.get("MLX_EDIT_WIDE_CKPT")
    if given:
        return Path(given)
    out = work / "wide"
    if not (out / "model_index.json").is_file():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_checkpoint.py"),
                        str(out), "--preset", "wide", "--overwrite"], check=True)
    return out


def gb(n: float) -> str:
    return f"{n / 1e9:6.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, help="a wide fixture folder (default: see above)")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the converted folders")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    source = args.source or wide_source(work)
    base = run_child("baseline")["rss"]
    print(f"source {source}; process baseline RSS (imports only) {gb(base)} GB")
    runs = [("bfloat16", 0, 5 * 10**9), ("bfloat16", 4, 5 * 10**9), ("bfloat16", 8, 5 * 10**9),
            ("bfloat16", 0, 512 * 10**6), ("bfloat16", 4, 256 * 10**6)]
    print("GB = 1e9 B. shard: largest shard written; src_t: largest source tensor (float32);"
          " x_shard: peak / shard; x_s+t: peak / (shard + src_t)")
    print("dtype     bits shard_max  out_GB  time_s  shard_GB  src_t_GB  mx_peak_GB  x_shard"
          "  x_s+t  RSS_GB  RSS-base  x_shard  x_s+t")
    for dtype, bits, shard in runs:
        dest = work / f"out-{dtype}-q{bits}-{shard}"
        shutil.rmtree(dest, ignore_errors=True)
        r = run_child(str(source), str(dest), dtype, str(bits), str(shard))
        s, t = r["largest_shard"], r["largest_source_tensor"]
        rss = r["rss"] - base
        print(f"{dtype:9} {bits or '-':>4} {gb(shard)} {gb(r['bytes'])} {r['seconds']:7.1f} "
              f"{gb(s)}    {gb(t)}      {gb(r['mx_peak'])} {r['mx_peak'] / s:8.2f} "
              f"{r['mx_peak'] / (s + t):6.2f} {gb(r['rss'])}  {gb(rss)}  {rss / s:7.2f} "
              f"{rss / (s + t):6.2f}")
        if not args.keep:
            shutil.rmtree(dest, ignore_errors=True)
    if args.work is None and not args.keep and not os.environ.get("MLX_EDIT_WIDE_CKPT") \
            and args.source is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
