"""A windowed inpaint for tests/test_large.py's ranks test, run as one process or under
`mlx.launch`: MODEL OUT -> OUT/latents.npy and OUT/out.png (rank 0 only), so every
rank's result can be compared with one process's. Not collected by pytest."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mlx_edit.editing.fill import FluxFill
from mlx_edit.sampling.tiles import rank_group

model, out = Path(sys.argv[1]), Path(sys.argv[2])
w, h = 512, 288
img = Image.fromarray((np.indices((h, w, 3)).sum(0) % 251).astype(np.uint8))
mask = np.zeros((h, w), np.float32)
mask[:, : w // 2] = 1
pipe = FluxFill.from_pretrained(model)
job = pipe.inpaint_job(img, mask, "x", tile_mode="on", max_model_pixels=256 * 256,
                       crop_to_mask=False, steps=2, seed=3, max_sequence_length=16)
result = pipe.run(job)[0]
ranks = rank_group()
if ranks is None or ranks.rank() == 0:
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "latents.npy", np.asarray(job.latents))
    result.save(out / "out.png")
    (out / "windows.json").write_text(json.dumps(job.metadata["windows"]))
