"""A ConditioningContext for conditioner tests that run without a pipeline."""

from __future__ import annotations

import mlx.core as mx

from mlx_edit.conditioning.context import ConditioningContext
from mlx_edit.imaging.stitch import CropPlan
from mlx_edit.models.flux import FluxConfig
from mlx_edit.models.vae import VAEConfig


def _no_vae(pixels):
    raise AssertionError("this conditioner should not encode images")


def make_context(transformer: FluxConfig, *, dtype=mx.float32, vae: VAEConfig | None = None,
                 encode_image=_no_vae, size=(64, 64), **loop) -> ConditioningContext:
    """A context for a `size` canvas edited whole; `loop`: embeds, guidance, num_steps,
    batch_size."""
    plan = CropPlan(size, (0, 0, *size), size, False)
    return ConditioningContext(dtype, None, transformer, vae or VAEConfig(), encode_image,
                               plan, **loop)
