"""Shared helpers for the benchmarks: machine facts, BLAS check, GEMM ceiling, timing.

Import this module first in a benchmark (it imports mlx_edit, which loads OpenBLAS before
mlx on Linux). Timings are medians after warm-up; on a shared machine run them when it
is quiet and read the load averages printed in the header.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import mlx_edit  # noqa: F401  (first: OpenBLAS before mlx)
from mlx_edit import _blas

import mlx.core as mx

REPO_ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux) or platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """`git rev-parse --short HEAD` (+ '-dirty' when the tree has changes), or 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def blas_notice() -> str:
    """Which BLAS MLX's CPU matmul uses here: OpenBLAS config and threads, or a warning."""
    if sys.platform != "linux":
        return "BLAS: platform default (Accelerate on macOS)"
    if not _blas.OPENBLAS:
        return "BLAS: OpenBLAS NOT loaded (MLX's reference BLAS: expect ~1 GFLOP/s)"
    try:
        lib = ctypes.CDLL(_blas.OPENBLAS)
        lib.openblas_get_config.restype = ctypes.c_char_p
        config = lib.openblas_get_config().decode()
        return f"BLAS: {_blas.OPENBLAS} ({config}), {lib.openblas_get_num_threads()} threads"
    except (OSError, AttributeError):
        return f"BLAS: {_blas.OPENBLAS}"


def machine_header(command: str | None = None) -> list[str]:
    """Lines for the top of a benchmark report (date, machine, commit, versions, load)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    lines = [
        f"date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"machine: {cpu_model()}, nproc {os.cpu_count()}, {platform.system()} "
        f"{platform.machine()}, MLX device {mx.default_device()}",
        f"commit: {git_commit()}  mlx {mx.__version__}  python {platform.python_version()}",
        blas_notice(),
        "load average (1/5/15 min): " + " ".join(f"{x:.2f}" for x in load),
    ]
    if command:
        lines.append(f"command: {command}")
    return lines


def median_time(fn: Callable[[], object], reps: int = 3, warmup: int = 1) -> list[float]:
    """Wall seconds of `fn()` (which must evaluate its result) for each of `reps` runs after
    `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def med(times: Sequence[float]) -> float:
    return statistics.median(times)


def mlx_gemm_rate(m: int, k: int, n: int, dtype=mx.float32, reps: int = 3) -> float:
    """GFLOP/s of an MLX (m x k) @ (k x n) matmul, median of `reps` after one warm-up."""
    a = mx.random.normal((m, k)).astype(dtype)
    b = mx.random.normal((k, n)).astype(dtype)
    mx.eval(a, b)
    times = median_time(lambda: mx.eval(a @ b), reps=reps, warmup=1)
    return 2 * m * k * n / med(times) / 1e9


def torch_gemm_rate(m: int, k: int, n: int, dtype: str = "float32", reps: int = 3) -> float:
    """GFLOP/s of the same matmul in torch (current thread count)."""
    import torch

    dt = getattr(torch, dtype)
    a, b = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
    with torch.no_grad():
        times = median_time(lambda: a @ b, reps=reps, warmup=1)
    return 2 * m * k * n / med(times) / 1e9


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """A plain fixed-width table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def peak_gb() -> float:
    return mx.get_peak_memory() / 1e9


def process_rss_gb() -> float:
    """Peak resident set size of this process (GB), Linux/macOS."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1e9 if sys.platform == "darwin" else 1e6)
