"""Cost of the finite / floating-point check at weight load (mlx_edit.weights.core
`evaluate_finite`, issue 30): the transformer of a checkpoint folder loaded with the
check and without it (`all_finite` patched to pass), rows interleaved round by round.

    MLX_EDIT_WIDE_CKPT=/work/fixtures/wide python benchmarks/bench_load_check.py \
        [--dtypes float32,bfloat16] [--quantize 8] [--reps 3]

Reported per dtype: median load seconds with and without the check and the overhead.
The check adds one pass over each evaluated tensor in memory (`all_finite`: a BLAS dot
product for float32, exponent bits for float16/bfloat16; the data is read from disk
once); with --quantize, the float parameters of each quantized layer.
Last line: `load check overhead: X% (float32)`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: mlx_edit -> OpenBLAS before mlx)

import mlx.core as mx  # noqa: E402

from mlx_edit.weights import core  # noqa: E402
from mlx_edit.weights.flux import load_transformer  # noqa: E402


def timed_load(folder: Path, dtype, quantize: int | None, check: bool) -> float:
    original = core.all_finite
    if not check:
        core.all_finite = lambda array: True
    try:
        t0 = time.perf_counter()
        model = load_transformer(folder, dtype, quantize=quantize)
        mx.eval(model.parameters())
        seconds = time.perf_counter() - t0
    finally:
        core.all_finite = original
    del model
    mx.clear_cache()
    return seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=os.environ.get("MLX_EDIT_WIDE_CKPT"))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--quantize", type=int, default=None)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    if not a.ckpt:
        sys.exit("give --ckpt or set MLX_EDIT_WIDE_CKPT")
    folder = Path(a.ckpt) / "transformer"
    print("\n".join(common.machine_header(" ".join(sys.argv))))
    timed_load(folder, mx.float32, a.quantize, True)  # warm the page cache
    first = None
    for name in a.dtypes.split(","):
        dtype = getattr(mx, name)
        runs = {True: [], False: []}
        for _ in range(a.reps):
            for check in (True, False):
                runs[check].append(timed_load(folder, dtype, a.quantize, check))
        on, off = statistics.median(runs[True]), statistics.median(runs[False])
        overhead = 100 * (on / off - 1)
        first = first or (name, overhead)
        q = f" q{a.quantize}" if a.quantize else ""
        print(f"{name}{q}: load {off:.2f}s without the check, {on:.2f}s with it "
              f"({overhead:+.1f}%)")
    print(f"load check overhead: {first[1]:.1f}% ({first[0]})")


if __name__ == "__main__":
    main()
