"""One windowed outpaint split over mlx.launch ranks (issue 31): per step, the windows each
rank evaluates, the bytes each rank sends into the exchange (`all_gather`: every rank
receives every rank's) and the seconds spent in it vs
in the windows' compute. Run as one process, or under
`mlx.launch --backend ring -n N --python "$(which python)" benchmarks/bench_ranks.py MODEL`.
Prints one JSON line per rank. MODEL: a model folder (the tiny fixture:
scripts/make_mlx_checkpoint.py); then optionally W H RIGHT BUDGET STEPS (the photo's size,
the px outpainted on the right, the window budget in px, steps; default 1280 720 512
65536 4)."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import json
import sys
import time

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_edit.editing.fill import FluxFill
from mlx_edit.sampling.ranks import rank_group, share

W, H, RIGHT, BUDGET, STEPS = (list(map(int, sys.argv[2:7])) or [1280, 720, 512, 256 * 256, 4])
calls = {"n": 0, "bytes": 0, "s": 0.0}
all_gather = mx.distributed.all_gather


def timed_all_gather(x, *args, **kwargs):  # what ranks.all_gather calls
    mx.eval(x)  # the windows' compute finishes first: the exchange alone is timed
    t = time.perf_counter()
    y = all_gather(x, *args, **kwargs)
    mx.eval(y)
    calls["s"] += time.perf_counter() - t
    calls["n"] += 1
    calls["bytes"] += x.nbytes
    return y


mx.distributed.all_gather = timed_all_gather
pipe = FluxFill.from_pretrained(sys.argv[1])
img = Image.fromarray((np.indices((H, W, 3)).sum(0) % 251).astype(np.uint8))
job = pipe.outpaint_job(img, "x", right=RIGHT, tile_mode="on", max_model_pixels=BUDGET,
                        steps=STEPS, seed=3, max_sequence_length=16)
t = time.perf_counter()
for _ in pipe.steps(job):
    pass
denoise = time.perf_counter() - t
ranks = rank_group()
rank, size = (0, 1) if ranks is None else (ranks.rank(), ranks.size())
print(json.dumps({
    "ranks": size, "rank": rank, "windows": job.windows.count,
    "windows_per_rank": [len(s) for s in share(job.windows.count, size)],
    "canvas_tokens": int(np.prod(job.windows.grid)), "steps": STEPS,
    "exchanges_per_step": calls["n"] / STEPS, "bytes_per_step": calls["bytes"] / STEPS,
    "exchange_s_per_step": round(calls["s"] / STEPS, 4),
    "compute_s_per_step": round((denoise - calls["s"]) / STEPS, 4),
    "denoise_s": round(denoise, 3)}), flush=True)
