"""FLUX.1 Fill's conditioning: the masked image's latents and the packed mask (320 channels).

diffusers FluxFillPipeline.prepare_mask_latents (pipelines/flux/pipeline_flux_fill.py) and
BFL src/flux/sampling.py prepare_fill, with the VAE posterior mode instead of a sample.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_edit.conditioning.context import ConditioningContext
from mlx_edit.sampling.latents import fill_conditioning, pack_mask


def fill_conditioner(ctx: ConditioningContext, pixels: np.ndarray, mask: np.ndarray
                     ) -> mx.array:
    """A `Conditioner`: pixels (H, W, 3) in [-1, 1] with the masked area zeroed (grey in
    [0, 1] terms), encoded, + the mask (H, W) packed 8x8 per latent pixel then 2x2 per
    token -> (1, N, 64 + 256) in the pipeline's dtype."""
    masked = ctx.encode_image(pixels * (1.0 - mask[..., None]))
    return fill_conditioning(masked, pack_mask(mx.array(mask)[None]))
