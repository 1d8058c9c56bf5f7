"""Test helpers that need no pipeline: a ConditioningContext for conditioner tests, a
random tiny FLUX transformer for loop/step tests."""

from __future__ import annotations

import mlx.core as mx

from mlx_edit.conditioning.context import ConditioningContext
from mlx_edit.imaging.stitch import CropPlan
from mlx_edit.models.flux import FluxConfig, FluxTransformer
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


def random_transformer(config: dict, n_keys: int = 8):
    """(FluxTransformer built from `config` with MLX random weights (seed 0), an iterator of
    `n_keys` PRNG keys (seed 1) for the test's inputs)."""
    mx.random.seed(0)
    model = FluxTransformer(FluxConfig.from_dict(config))
    mx.eval(model.parameters())
    return model, iter(mx.random.split(mx.random.key(1), n_keys))
