"""Edits for tests/test_large.py's ranks tests, run as one process or under `mlx.launch`:
MODEL OUT CASE... (MODEL: the tiny fixture with its controlnets/ and kontext-model/) ->
OUT/CASE.npy (final latents), OUT/CASE.png and OUT/CASE.json (the `windows` and `ranks`
metadata), written by rank 0 only, so every rank count's results can be compared with one
process's. Cases: inpaint, outpaint, inpaint_controlnet, outpaint_controlnet (windowed,
4+ windows), kontext_cfg (true CFG without windows: branches split), kontext_cfg_windows
(true CFG with a mask: windows split). Not collected by pytest."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mlx_edit.conditioning.controlnet import ControlNetSpec
from mlx_edit.editing.fill import FluxFill
from mlx_edit.editing.kontext import FluxKontext
from mlx_edit.sampling.ranks import rank_group

model, out, cases = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
w, h = 512, 288
img = Image.fromarray((np.indices((h, w, 3)).sum(0) % 251).astype(np.uint8))
mask = np.zeros((h, w), np.float32)
mask[:, : w // 2] = 1
fast = dict(steps=2, seed=3, max_sequence_length=16)
tiled = dict(tile_mode="on", max_model_pixels=256 * 256, window_batch=1, **fast)
net = [ControlNetSpec(model / "controlnets" / "union", img, "canny", scale=0.8)]
cfg = dict(negative_prompt="y", true_cfg_scale=2.0)
fill = FluxFill.from_pretrained(model) if any("paint" in c for c in cases) else None
kontext = FluxKontext.from_pretrained(model / "kontext-model") \
    if any("kontext" in c for c in cases) else None
jobs = {
    "inpaint": lambda: fill.inpaint_job(img, mask, "x", crop_to_mask=False, **tiled),
    "outpaint": lambda: fill.outpaint_job(img, "x", right=128, **tiled),
    "inpaint_controlnet": lambda: fill.inpaint_job(img, mask, "x", crop_to_mask=False,
                                                   controlnets=net, **tiled),
    "outpaint_controlnet": lambda: fill.outpaint_job(img, "x", right=128, controlnets=net,
                                                     **tiled),
    "kontext_cfg": lambda: kontext.edit_job(img.resize((256, 144)), "x", auto_resize=False,
                                            **cfg, **fast),
    "kontext_cfg_windows": lambda: kontext.edit_job(
        img, "x", mask=mask, keep_size=True, auto_resize=False, **cfg, **tiled),
}
ranks = rank_group()
for case in cases:
    job = jobs[case]()
    pipe = kontext if case.startswith("kontext") else fill
    result = pipe.run(job, "windows" in case or not case.startswith("kontext"))[0]
    if ranks is None or ranks.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / f"{case}.npy", np.asarray(job.latents))
        result.save(out / f"{case}.png")
        (out / f"{case}.json").write_text(json.dumps(
            {k: job.metadata.get(k) for k in ("windows", "ranks")}))
