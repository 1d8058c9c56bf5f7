"""What a conditioner may know of an edit: `ConditioningContext`.

Conditioners (ControlNet, BFL control, Fill, IP-Adapter, Redux, Kontext references) turn
their inputs into prepared values — channels concatenated to the latents, sequence tokens
with their position ids, residual hooks, attention keys/values — before the denoise loop.
They see this context, never the pipeline: the pipeline builds it, calls them and attaches
what they return to its `EditJob`. So nothing under `mlx_edit/conditioning/` imports
`mlx_edit.editing.pipeline`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np

from mlx_edit.imaging.stitch import CropPlan
from mlx_edit.models.flux import FluxConfig
from mlx_edit.models.vae import VAEConfig
from mlx_edit.sampling.denoise import PromptEmbeds

# (H, W, 3) float32 pixels in [-1, 1] -> scaled, packed latents (1, N, 64) (VAE posterior
# mode, tiled when large), in the pipeline's dtype.
ImageEncoder = Callable[[np.ndarray], mx.array]


@dataclass(frozen=True)
class ConditioningContext:
    """The edit as conditioners see it.

    dtype: the models' dtype; quantize: bits for models loaded by a conditioner (None:
    full precision). transformer / vae: their configs (no weights needed).
    encode_image: the pipeline's VAE encoder (`ImageEncoder`).
    plan: the crop plan of the edit (original size, window, model canvas size).
    inner: for an outpaint, the original's box on the extended canvas (else None).
    embeds: the prompt embeddings; guidance: the edit's guidance; num_steps: denoising
    steps; batch_size: images denoised together (num_images). The last four are set by
    `for_loop` once the prompt is encoded and the schedule is known.
    """

    dtype: mx.Dtype
    quantize: int | None
    transformer: FluxConfig
    vae: VAEConfig
    encode_image: ImageEncoder
    plan: CropPlan
    inner: tuple[int, int, int, int] | None = None
    embeds: PromptEmbeds | None = None
    guidance: float = 0.0
    num_steps: int = 0
    batch_size: int = 1

    @property
    def latent_channels(self) -> int:
        """Channels of a packed latent token (2x2 patches of the VAE latents: 64)."""
        return 4 * self.vae.latent_channels

    def for_loop(self, embeds: PromptEmbeds, guidance: float, num_steps: int,
                 batch_size: int) -> ConditioningContext:
        """This context with the loop's values (prompt, guidance, steps, batch) set."""
        return replace(self, embeds=embeds, guidance=guidance, num_steps=num_steps,
                       batch_size=batch_size)


# A channel conditioner: (context, canvas pixels (H, W, 3) in [-1, 1], binary model mask
# (H, W)) -> (1, N, K) concatenated after the noisy latents (Fill: K 320, control: 64).
Conditioner = Callable[[ConditioningContext, np.ndarray, np.ndarray], mx.array]
