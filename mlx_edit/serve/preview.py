"""Step previews: a running edit's latents as a small JPEG, cheap enough for every step.

Latent previews as ComfyUI and diffusers' callbacks draw them: a linear map of each
latent pixel's channels to RGB, no VAE decode. Instead of a published matrix for one
VAE, the map (16 -> 3 plus a bias) is fitted by least squares to the pipeline's own VAE
once (one encode of a 128 px synthetic colour chart), so it fits any checkpoint,
random-weight fixtures included. What is projected is the step's estimate of the clean
image, x0 = x_k - sigma_k * v, with v the step's flow-matching velocity recovered from
two consecutive latents (exact for the Euler step; a keep-source hook makes it
approximate); the first step shows x_1 itself. Only the first image of a batch, only the
model canvas (the crop window around the mask, or the outpaint canvas).
"""

from __future__ import annotations

import base64
import io
import weakref

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_edit.sampling.latents import unpack_latents

CHART_PX = 128  # the calibration chart: 16 x 16 latent pixels, one VAE encode


def chart(seed: int = 0) -> np.ndarray:
    """A synthetic colour chart (CHART_PX, CHART_PX, 3) in [-1, 1], four quadrants:
    smooth random colour blobs, flat random patches, a grey ramp, saturated primaries, so
    every colour direction is present."""
    g, q = np.random.default_rng(seed), CHART_PX // 2
    low = g.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    blobs = np.asarray(Image.fromarray(low).resize((q, q), Image.BICUBIC), np.float32)
    blobs = blobs / 127.5 - 1
    patches = np.kron(g.uniform(-1, 1, (4, 4, 3)), np.ones((q // 4, q // 4, 1)))
    ramp = np.broadcast_to(np.linspace(-1, 1, q)[None, :, None], (q, q, 3))
    primaries = np.kron(np.sign(g.uniform(-1, 1, (4, 4, 3))), np.ones((q // 4, q // 4, 1)))
    top, bottom = np.concatenate([blobs, patches], 1), np.concatenate([ramp, primaries], 1)
    return np.concatenate([top, bottom], 0).astype(np.float32)


def fit_projection(encode) -> np.ndarray:
    """(C + 1, 3) float32 least-squares map [latent channels, 1] -> RGB in [-1, 1].

    encode: pixels (H, W, 3) in [-1, 1] -> packed scaled latents (1, N, 4C), the
    pipeline's `encode_image` (called once, on `chart()`)."""
    px = chart()
    z = np.array(unpack_latents(encode(px).astype(mx.float32), CHART_PX, CHART_PX)[0])
    f = CHART_PX // z.shape[0]
    rgb = px.reshape(z.shape[0], f, z.shape[1], f, 3).mean(axis=(1, 3))
    x = z.reshape(-1, z.shape[-1])
    x = np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1)
    m, *_ = np.linalg.lstsq(x, rgb.reshape(-1, 3), rcond=None)
    return m.astype(np.float32)


def to_jpeg(rgb: np.ndarray, max_side: int) -> tuple[str, tuple[int, int]]:
    """(H, W, 3) in [-1, 1] -> ("data:image/jpeg;base64,...", (width, height)), scaled
    down to at most `max_side` px on its longer side (never up)."""
    img = Image.fromarray(np.clip((rgb + 1) * 127.5, 0, 255).round().astype(np.uint8))
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode(), img.size


class Previewer:
    """Step previews of the jobs of any pipeline; `for_job(pipe, report, every,
    max_side)` is the `progress` a pipeline's `run` calls with the job (`wants_job`).
    Each pipeline's fitted map is kept as long as the pipeline lives (weakly keyed: an
    evicted pipeline takes its map along)."""

    def __init__(self):
        self._maps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def projection(self, pipe) -> np.ndarray:
        """The (C + 1, 3) map of `pipe` (a FluxPipeline), fitted with its VAE on first use
        (on the calling thread: the worker)."""
        if pipe not in self._maps:
            with pipe.components.using("vae"):
                self._maps[pipe] = fit_projection(pipe.encode_image)
        return self._maps[pipe]

    def image(self, pipe, latents: mx.array, size: tuple[int, int]) -> np.ndarray:
        """Packed latents (B, N, 4C) of a `size` = (width, height) px canvas -> image 0's
        preview (h, w, 3) in [-1, 1], one pixel per latent pixel (1/8 of the canvas)."""
        z = np.array(unpack_latents(latents[:1].astype(mx.float32), size[1], size[0])[0])
        m = self.projection(pipe)
        return z @ m[:-1] + m[-1]

    def for_job(self, pipe, report, every: int, max_side: int):
        """A `progress(step, total, job)` (with `wants_job`, and `wants_phases` when
        `report` has it: other phases are passed on) for an edit on `pipe`: calls
        `report(step, total, phase=..., **preview)` every step, preview = {"preview": data URL,
        "preview_size": [w, h]} every `every` denoise steps and at the last one, else {}.
        `step` / `total` may count windows x steps (tiled runs): the denoise step is
        derived from their ratio."""
        prev: dict = {}

        def progress(step: int, total: int, job=None, phase: str = "denoise") -> None:
            if job is None:  # another phase (mlx_edit.progress): passed on as it is
                report(step, total, phase=phase)
                return
            n = len(job.sigmas) - 1
            done = step * n // total  # denoise steps done; latents at sigmas[done]
            extra, s = {}, float(job.sigmas[done])
            if every and (done % every == 0 or done == n):
                x = job.latents
                if "x" in prev:  # x0 = x_k - s_k * v, v from the last two latents
                    x = x - s * (x - prev["x"]) / (s - prev["s"])
                url, (w, h) = to_jpeg(self.image(pipe, x, job.plan.model_size), max_side)
                extra = {"preview": url, "preview_size": [w, h]}
            prev.update(x=job.latents, s=s)
            report(step, total, phase=phase, **extra)
        progress.wants_job = True
        progress.wants_phases = getattr(report, "wants_phases", False)
        return progress
