"""Running a prepared EditJob (mlx_edit.sampling.denoise) on a pipeline's models: the
denoise loop with its stats, then decoding and paste-back; and the canvas regions a
windowed or 1:1 edit must encode and decode exactly (the rest is skipped).

Functions of what they use: `models` is the pipeline's mlx_edit.editing.components.Models
(family, transformer and VAE on demand, decode, configs). `FluxPipeline.steps` / `finish`
delegate here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_edit.editing import large
from mlx_edit.editing.tiling import decode_reach, dilate
from mlx_edit.imaging.images import from_array, to_array
from mlx_edit.imaging.stitch import CropPlan, crop_for_model, stitch_back
from mlx_edit.progress import Phase
from mlx_edit.sampling.cache import cache_metadata
from mlx_edit.sampling.denoise import EditJob, denoise
from mlx_edit.sampling.latents import image_ids, token_grid

if TYPE_CHECKING:
    from mlx_edit.editing.components import Models

# px around the blend that a decode must reproduce exactly: paste-back reads the blend,
# colour match a RING_PX (16) ring outside it, Poisson the blend's border
DECODE_CONTEXT = 64


def denoise_job(models: Models, job: EditJob) -> Iterator[tuple[int, mx.array]]:
    """Run the denoise loop for `job`, yielding (step, latents); keeps the last latents.

    With low_memory the transformer is loaded first (`load_transformer_s`) and freed
    when the loop ends or the generator is closed; after a completed loop the job's
    ControlNets are dropped too (decoding does not need them)."""
    w, h = job.plan.model_size
    ids = image_ids(*token_grid(h, w), models.family.id_axes)
    with models.components.using("transformer", job.stats):
        t0 = time.perf_counter()
        mx.reset_peak_memory()
        for i, latents in denoise(models.transformer, job.latents, job.conditioning, ids,
                                  job.embeds, job.sigmas, job.guidance,
                                  controls=job.controls, ip=job.ip, tokens=job.tokens,
                                  token_ids=job.token_ids, after_step=job.after_step,
                                  negative=job.negative,
                                  true_cfg_scale=job.true_cfg_scale, hook=job.hook,
                                  cache=job.cache, stats=job.stats, windows=job.windows,
                                  reference_kv=job.reference_kv):
            job.latents = latents
            yield i, latents
        if job.windows is not None and not job.windows.covered.all():
            source = job.source if job.source is not None else \
                job.conditioning[..., : job.latents.shape[-1]]  # Fill: masked image's
            job.latents = large.fill_uncovered(job.latents, job.windows, source)
        n = len(job.sigmas) - 1
        job.stats["denoise_s"] = time.perf_counter() - t0
        job.stats["step_s"] = job.stats["denoise_s"] / n
        job.stats["denoise_peak_gb"] = mx.get_peak_memory() / 1e9
        job.metadata.update(cache_metadata(job.cache, job.stats))
        if models.low_memory:
            job.controls = ()


def finish_job(models: Models, job: EditJob, paste_back: bool = True) -> list[Image.Image]:
    """Decode the job's latents and map them back into the original image.

    With paste_back, pixels where the blend is 0 are the original's exactly; without
    it the whole model window replaces the original (outside the window it stays).
    Each returned image carries its metadata in `.info` (str values).
    """
    w, h = job.plan.model_size
    with models.components.using("vae", job.stats), Phase(job.stats, "vae_decode"):
        needed, fill = decode_region(job) if paste_back else (None, None)
        images = []
        for b in range(job.latents.shape[0]):  # one at a time: decode memory is large
            px = models.decode(job.latents[b : b + 1], w, h, needed, fill)
            mx.eval(px)
            images.append(from_array(np.array(px[0])))
    blend = job.blend
    if not paste_back:
        blend = np.zeros_like(job.blend)
        x0, y0, x1, y1 = job.plan.box
        blend[y0:y1, x0:x1] = 1.0
    out = []
    with Phase(job.stats, "paste_back"):
        for seed, edited in zip(job.seeds, images):
            result = stitch_back(job.original, edited, job.plan, blend,
                                 **(job.paste if paste_back else {}))
            meta = {**job.metadata, "seed": seed, "paste_back": paste_back}
            result.info.update({k: str(v) for k, v in meta.items() if v is not None})
            out.append(result)
    return out


def decode_region(job: EditJob) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(needed, fill) of a 1:1 plan's decode: the canvas pixels within DECODE_CONTEXT
    px of the blend (all that paste-back, colour match and Poisson read) and the
    canvas's own pixels in [-1, 1] for the VAE tiles that reach none of them; (None,
    None) for a resized plan (its canvas is model-size: decoded whole)."""
    if job.plan.resized:
        return None, None
    canvas, blend = crop_for_model(job.original, job.blend, job.plan, binarize=False)
    return dilate(blend > 0, DECODE_CONTEXT), to_array(canvas).astype(np.float32)


def encode_region(models: Models, image: Image.Image, blend: np.ndarray, plan: CropPlan,
                  windows: large.Windows | None) -> np.ndarray | None:
    """(h, w) bool latent pixels of the canvas that an encode must give exactly when
    windows were skipped: the windows' tokens, and the tiles the decode will run
    (`tiling.decode_reach` of `decode_region`); None (all) otherwise."""
    if windows is None or windows.covered.all() or plan.resized:
        return None
    cfg = models.vae_config
    f = cfg.scale_factor
    _, canvas_blend = crop_for_model(image, blend, plan, binarize=False)
    reach = decode_reach(dilate(canvas_blend > 0, DECODE_CONTEXT), cfg, models.dtype.size,
                         models.tile_threshold_gb)  # the decode's tiles
    h, w = reach.shape
    reach = reach.reshape(h // f, f, w // f, f).any(axis=(1, 3))
    per_token = large.TOKEN_PX // f  # latent pixels per packed token side
    covered = np.kron(windows.covered, np.ones((per_token, per_token), bool))
    return reach | covered
