"""`mlx-edit ARGS` under mlx.launch where rank 1 fails at its exchange number
RANKS_DIE_AT (default 1), mid-denoise: RANKS_DIE_MODE=die (default) exits there
(os._exit), hang sleeps there for good (as if hung in its
own work: its watchdog off); for tests/test_large.py's lost-rank tests. Not
collected by pytest."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import os
import time

import mlx.core as mx

from mlx_edit.cli import main

all_gather = mx.distributed.all_gather
calls = [0]


def failing_all_gather(x, *args, **kwargs):
    calls[0] += 1
    if mx.distributed.init().rank() == 1 and calls[0] == int(os.environ.get("RANKS_DIE_AT", 1)):
        if os.environ.get("RANKS_DIE_MODE", "die") == "die":
            os._exit(9)
        time.sleep(3600)
    return all_gather(x, *args, **kwargs)


mx.distributed.all_gather = failing_all_gather
if os.environ.get("MLX_RANK") == "1":  # hung in its own work: rank 1's watchdog stays away
    os.environ["MLX_EDIT_RANK_TIMEOUT"] = "3600"
main()
