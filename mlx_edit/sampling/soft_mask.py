"""Soft masks: differential diffusion, a per-pixel edit strength from a grey-level mask.

Differential Diffusion (Levin & Fried 2023, "Differential Diffusion: Giving Each Pixel
Its Strength"; ComfyUI comfy_extras/nodes_differential_diffusion.py with the inpaint
sampler's latent replacement, comfy/samplers.py KSamplerX0Inpaint): before step i, at
noise level sigma_i, every token whose mask value is below the step's threshold

    threshold_i = (sigma_i - sigma_end) / (sigma_0 - sigma_end)      (1 at the first step)

is replaced by the source latents re-noised to sigma_i with the run's own noise,
(1 - sigma_i) x_src + sigma_i * noise. A token of strength m is thus held to the source
until the threshold drops below m and is denoised freely for the rest: m = 1 changes as
a full edit, m = 0 stays the re-noised source at every step, values between change
progressively less. ComfyUI's sigma_end is max(model sigma_min, last sigma); FLUX's
schedule ends at 0, so here it is the last sigma.

Pure functions (numpy for the mask, mlx for latents); `soft_mask_hook` packages them as
the denoise loop's per-step hook (`mlx_edit.sampling.denoise.denoise(hook=...)`).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np

from mlx_edit.sampling.sampler import noise_latents

# (step index, packed latents at sigmas[i]) -> the latents the step runs on.
StepHook = Callable[[int, mx.array], mx.array]


def step_thresholds(sigmas: np.ndarray) -> np.ndarray:
    """float32 (n,) thresholds for the n steps of `sigmas` (n + 1,), decreasing from 1.

    threshold_i = (sigma_i - sigma_n) / (sigma_0 - sigma_n); all ones when sigma_0 ==
    sigma_n (no denoising range: nothing is released early).
    """
    s = np.asarray(sigmas, dtype=np.float64)
    span = s[0] - s[-1]
    if span <= 0:
        return np.ones(len(s) - 1, np.float32)
    return ((s[:-1] - s[-1]) / span).astype(np.float32)


def token_strength(mask: np.ndarray, patch: int = 16) -> np.ndarray:
    """Pixel mask (H, W) in [0, 1] -> per-token strength (N,) float32, N = (H/p)(W/p).

    Each packed token covers a `patch` x `patch` pixel block (2x2 latents of the 8x VAE:
    16 px for FLUX); its strength is the block's mean. Token order is row-major over the
    (H/p, W/p) grid, as `mlx_edit.sampling.latents.pack_latents`.
    Raises ValueError unless H and W are positive multiples of `patch`.
    """
    m = np.clip(np.asarray(mask, dtype=np.float32), 0.0, 1.0)
    h, w = m.shape
    if h <= 0 or w <= 0 or h % patch or w % patch:
        raise ValueError(f"soft mask size {h}x{w} px must be a positive multiple of {patch}")
    blocks = m.reshape(h // patch, patch, w // patch, patch)
    return blocks.mean(axis=(1, 3)).reshape(-1).astype(np.float32)


def replace_held(latents: mx.array, renoised_source: mx.array, strength: mx.array,
                 threshold: float) -> mx.array:
    """Tokens with strength < threshold take `renoised_source`, the others keep `latents`.

    latents (B, N, C); renoised_source (1|B, N, C); strength (N,). Returns (B, N, C) in
    the latents' dtype.
    """
    held = (strength < threshold)[None, :, None]
    return mx.where(held, renoised_source.astype(latents.dtype), latents)


def soft_mask_hook(source: mx.array, noise: mx.array, strength: np.ndarray,
                   sigmas: np.ndarray) -> StepHook:
    """The per-step hook of differential diffusion.

    source: packed clean source latents (1, N, C); noise: the run's initial noise
    (B, N, C) (the same draw the free tokens start from); strength: (N,) from
    `token_strength`; sigmas: (n + 1,) the run's schedule. hook(i, latents) returns the
    latents with held tokens replaced by noise_latents(source, noise, sigmas[i]).
    Raises ValueError when the token counts disagree.
    """
    if source.shape[1] != noise.shape[1] or len(strength) != source.shape[1]:
        raise ValueError(f"soft mask: {len(strength)} mask tokens, source {source.shape}, "
                         f"noise {noise.shape}")
    thresholds = step_thresholds(sigmas)
    s = mx.array(np.asarray(strength, np.float32))

    def hook(i: int, latents: mx.array) -> mx.array:
        renoised = noise_latents(source.astype(latents.dtype), noise, float(sigmas[i]))
        return replace_held(latents, renoised, s, float(thresholds[i]))

    return hook
