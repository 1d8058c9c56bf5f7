"""Soft masks (differential diffusion, mlx_edit.sampling.soft_mask) in the one denoise loop.

A small random-weight transformer (MLX init, float32) runs the real `denoise` loop with the
soft-mask hook; at every step the tokens of strength 0 must be exactly the source latents
re-noised to that step's sigma, and tokens are released as the threshold passes them.
"""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest

from mlx_edit.models.flux import FluxConfig, FluxTransformer
from mlx_edit.sampling.denoise import PromptEmbeds, denoise
from mlx_edit.sampling.latents import image_ids, pack_latents
from mlx_edit.sampling.sampler import noise_latents
from mlx_edit.sampling.soft_mask import (
    replace_held,
    soft_mask_hook,
    step_thresholds,
    token_strength,
)

CFG = dict(in_channels=384, out_channels=64, num_layers=1, num_single_layers=1,
           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
           pooled_projection_dim=24, axes_dims_rope=(4, 6, 6))
SIGMAS = np.array([1.0, 0.8, 0.55, 0.3, 0.1, 0.0], dtype=np.float32)
HT, WT = 3, 4  # token grid


def test_thresholds_decrease_from_one():
    t = step_thresholds(SIGMAS)
    assert t.shape == (5,) and t[0] == 1.0
    assert np.all(np.diff(t) < 0) and t[-1] > 0  # strength 0 is held at every step
    img2img = np.array([0.6, 0.4, 0.2, 0.0])  # strength < 1: the range is renormalised
    np.testing.assert_allclose(step_thresholds(img2img), [1.0, 2 / 3, 1 / 3])
    assert np.array_equal(step_thresholds(np.array([0.5, 0.5])), [1.0])


def test_token_strength_is_block_mean_in_pack_order():
    rng = np.random.default_rng(0)
    mask = rng.random((HT * 16, WT * 16)).astype(np.float32)
    s = token_strength(mask)
    assert s.shape == (HT * WT,)
    # the same reduction through pack_latents: 8x8 means as a 1-channel latent, packed 2x2
    lat = mask.reshape(HT * 2, 8, WT * 2, 8).mean(axis=(1, 3))[None, :, :, None]
    packed = np.array(pack_latents(mx.array(lat)))[0].mean(axis=-1)
    np.testing.assert_allclose(s, packed, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="multiple of 16"):
        token_strength(mask[:40])


def test_replace_held_selects_tokens():
    lat, src = mx.zeros((2, 3, 4)), mx.ones((1, 3, 4))
    out = np.array(replace_held(lat, src, mx.array([0.0, 0.5, 1.0]), 0.6))
    assert np.array_equal(out[:, :, 0], [[1, 1, 0], [1, 1, 0]])


def test_strength_zero_tokens_equal_renoised_source_every_step():
    mx.random.seed(0)
    model = FluxTransformer(FluxConfig.from_dict(CFG))
    mx.eval(model.parameters())
    keys = iter(mx.random.split(mx.random.key(1), 6))
    n, b = HT * WT, 2
    noise = mx.random.normal((b, n, 64), key=next(keys))
    source = mx.random.normal((1, n, 64), key=next(keys))
    cond = mx.random.normal((1, n, 320), key=next(keys))
    embeds = PromptEmbeds(mx.random.normal((1, 5, 48), key=next(keys)),
                          mx.random.normal((1, 24), key=next(keys)))
    strength = np.linspace(0.0, 1.0, n).astype(np.float32)
    strength[:3] = 0.0
    strength[-2:] = 1.0
    inner = soft_mask_hook(source, noise, strength, SIGMAS)
    seen = []

    def hook(i, latents):
        out = inner(i, latents)
        seen.append((np.array(latents), np.array(out)))
        return out

    steps = list(denoise(model, noise, cond, image_ids(HT, WT), embeds, SIGMAS, 30.0,
                         hook=hook, compile=False))
    assert len(seen) == len(steps) == len(SIGMAS) - 1
    thresholds = step_thresholds(SIGMAS)
    for i, (before, after) in enumerate(seen):
        renoised = np.array(noise_latents(source, noise, float(SIGMAS[i])))
        renoised = np.broadcast_to(renoised, before.shape)
        held = strength < thresholds[i]
        assert np.array_equal(after[:, strength == 0], renoised[:, strength == 0])
        assert np.array_equal(after[:, held], renoised[:, held])
        assert np.array_equal(after[:, ~held], before[:, ~held])  # free tokens untouched
        if i > 0:  # full-strength tokens evolve with the model, never reset to the source
            assert not np.allclose(after[:, strength == 1], renoised[:, strength == 1])
    # without the hook the loop is unchanged: a zero-strength-free mask is a no-op
    plain = list(denoise(model, noise, cond, image_ids(HT, WT), embeds, SIGMAS, 30.0,
                         compile=False))[-1][1]
    ones = soft_mask_hook(source, noise, np.ones(n, np.float32), SIGMAS)
    same = list(denoise(model, noise, cond, image_ids(HT, WT), embeds, SIGMAS, 30.0,
                        hook=ones, compile=False))[-1][1]
    assert np.array_equal(np.array(plain), np.array(same))
