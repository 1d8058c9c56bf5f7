"""`mlx-edit ARGS` under mlx.launch where rank 1 dies (os._exit) at its first all_sum,
mid-denoise: for tests/test_large.py's dead-rank test. Not collected by pytest."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import os

import mlx.core as mx

from mlx_edit.cli import main

all_sum = mx.distributed.all_sum


def dying_all_sum(x, *args, **kwargs):
    if mx.distributed.init().rank() == 1:
        os._exit(9)
    return all_sum(x, *args, **kwargs)


mx.distributed.all_sum = dying_all_sum
main()
