"""Load OpenBLAS globally before MLX on Linux.

MLX's Linux CPU wheel links a reference BLAS (about 1.3 GFLOP/s for float32 matmul on
our machines); OpenBLAS loaded with RTLD_GLOBAL before `mlx.core` is imported makes it
about 100x faster (benchmarks/RESULTS.md: ~210 GFLOP/s with it on a 2-core machine).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_CANDIDATES = ("libopenblas.so.0", "libopenblas.so", "libopenblas64_.so.0")


def load_openblas() -> str | None:
    """Load OpenBLAS with RTLD_GLOBAL; return the library name or None.

    Does nothing on macOS (MLX uses Accelerate/Metal there), when `mlx.core` is already
    imported (too late to help), or when MLX_EDIT_NO_OPENBLAS=1. Prints a one-line notice
    to stderr when no OpenBLAS is found on Linux.
    """
    if sys.platform != "linux" or os.environ.get("MLX_EDIT_NO_OPENBLAS") == "1":
        return None
    if "mlx.core" in sys.modules:
        return None
    names = list(_CANDIDATES)
    found = ctypes.util.find_library("openblas")
    if found:
        names.append(found)
    for name in names:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            return name
        except OSError:
            continue
    if os.environ.get("MLX_EDIT_QUIET_BLAS") != "1":
        print(
            "mlx-edit: OpenBLAS not found; MLX's CPU matmul will be ~100x slower "
            "(install it: apt-get install libopenblas0-pthread)",
            file=sys.stderr,
        )
    return None


OPENBLAS = load_openblas()
