"""Packing, position ids and Fill conditioning vs diffusers' FluxFillPipeline."""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import types

import mlx.core as mx
import numpy as np
import pytest

from mlx_edit.sampling.latents import (
    fill_conditioning,
    image_ids,
    model_input,
    pack_latents,
    pack_mask,
    scale_latents,
    text_ids,
    token_grid,
    unpack_latents,
    unscale_latents,
)

SCALING, SHIFT = 0.3611, 0.1159  # FLUX VAE scaling_factor, shift_factor
B, H_PX, W_PX = 2, 384, 640  # non-square: a 48x80 latent grid, 24x40 tokens


@pytest.fixture(scope="module")
def ref():
    import torch
    from diffusers.pipelines.flux.pipeline_flux_fill import FluxFillPipeline

    return types.SimpleNamespace(torch=torch, Pipe=FluxFillPipeline)


def nchw_to_nhwc(t) -> mx.array:
    return mx.array(t.permute(0, 2, 3, 1).contiguous().numpy())


def rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parity
@pytest.mark.parametrize("channels,h,w", [(16, 48, 80), (2, 6, 4), (16, 2, 2)])
def test_pack_matches_diffusers(ref, channels, h, w):
    torch = ref.torch
    x = torch.randn(B, channels, h, w, generator=torch.Generator().manual_seed(0))
    want = ref.Pipe._pack_latents(x, B, channels, h, w).numpy()
    got = np.array(pack_latents(nchw_to_nhwc(x)))
    assert got.shape == (B, (h // 2) * (w // 2), 4 * channels)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parity
@pytest.mark.parametrize("vae_scale_factor,h_px,w_px,channels", [(8, H_PX, W_PX, 64), (1, 6, 4, 8)])
def test_unpack_matches_diffusers(ref, vae_scale_factor, h_px, w_px, channels):
    torch = ref.torch
    h, w = h_px // vae_scale_factor, w_px // vae_scale_factor
    packed = torch.randn(
        B, (h // 2) * (w // 2), channels, generator=torch.Generator().manual_seed(1)
    )
    want = ref.Pipe._unpack_latents(packed, h_px, w_px, vae_scale_factor)  # (B, C, h, w)
    got = unpack_latents(mx.array(packed.numpy()), h_px, w_px, vae_scale_factor)
    assert got.shape == (B, h, w, channels // 4)
    np.testing.assert_array_equal(np.array(got), want.permute(0, 2, 3, 1).numpy())


def test_pack_unpack_roundtrip():
    x = mx.array(rng().standard_normal((3, 48, 80, 16)).astype(np.float32))
    packed = pack_latents(x)
    assert packed.shape == (3, 960, 64)
    np.testing.assert_array_equal(np.array(unpack_latents(packed, H_PX, W_PX)), np.array(x))
    # channel = 4c + 2ph + pw, token = row * (W/2) + col
    assert packed[1, 5 * 40 + 7, 4 * 3 + 2 * 1 + 0].item() == x[1, 11, 14, 3].item()


def test_pack_errors():
    with pytest.raises(ValueError):
        pack_latents(mx.zeros((1, 5, 4, 16)))
    with pytest.raises(ValueError):
        pack_latents(mx.zeros((5, 4, 16)))
    with pytest.raises(ValueError):
        unpack_latents(mx.zeros((1, 100, 64)), H_PX, W_PX)
    with pytest.raises(ValueError):
        unpack_latents(mx.zeros((1, 960, 62)), H_PX, W_PX)


@pytest.mark.parity
@pytest.mark.parametrize("h_tok,w_tok", [(24, 40), (64, 64), (1, 3)])
def test_image_ids_match_diffusers(ref, h_tok, w_tok):
    torch = ref.torch
    want = ref.Pipe._prepare_latent_image_ids(B, h_tok, w_tok, "cpu", torch.float32).numpy()
    got = image_ids(h_tok, w_tok)
    assert got.dtype == mx.float32 and got.shape == (h_tok * w_tok, 3)
    np.testing.assert_array_equal(np.array(got), want)


def test_text_ids_and_token_grid():
    t = text_ids(512)
    assert t.dtype == mx.float32 and t.shape == (512, 3) and not mx.any(t).item()
    assert token_grid(H_PX, W_PX) == (24, 40)
    assert token_grid(32, 32, vae_scale_factor=1) == (16, 16)
    for size in ((384, 648), (0, 16), (24, 32)):
        with pytest.raises(ValueError):
            token_grid(*size)


def reference_fill(ref, mask, masked_latents):
    """Run FluxFillPipeline.prepare_mask_latents with a stub self.

    masked_latents has latent_channels channels, so prepare_mask_latents skips the VAE
    encode (its `masked_image.shape[1] == num_channels_latents` branch) and only scales,
    packs and folds: exactly the code under test.
    """
    stub = types.SimpleNamespace(
        vae_scale_factor=8,
        vae=types.SimpleNamespace(
            config=types.SimpleNamespace(shift_factor=SHIFT, scaling_factor=SCALING)
        ),
        _pack_latents=ref.Pipe._pack_latents,
    )
    b, c = masked_latents.shape[:2]
    h_px, w_px = mask.shape[-2:]
    return ref.Pipe.prepare_mask_latents(
        stub, mask, masked_latents, b, c, 1, h_px, w_px, ref.torch.float32, "cpu", None
    )


@pytest.mark.parity
@pytest.mark.parametrize("h_px,w_px", [(H_PX, W_PX), (32, 16)])
def test_fill_conditioning_matches_prepare_mask_latents(ref, h_px, w_px):
    torch = ref.torch
    g = torch.Generator().manual_seed(2)
    # soft random mask (not binarized) so that any channel misorder shows
    mask = torch.rand(B, 1, h_px, w_px, generator=g)
    z = torch.randn(B, 16, h_px // 8, w_px // 8, generator=g)  # raw VAE latents
    want_mask, want_img = reference_fill(ref, mask, z)
    want = torch.cat((want_img, want_mask), dim=-1).numpy()  # pipeline_flux_fill.py step 6

    got_mask = pack_mask(mx.array(mask[:, 0].numpy()))
    got_img = pack_latents(scale_latents(nchw_to_nhwc(z), SCALING, SHIFT))
    got = fill_conditioning(got_img, got_mask)
    n = (h_px // 16) * (w_px // 16)
    assert got_mask.shape == (B, n, 256) and got.shape == (B, n, 320)
    np.testing.assert_array_equal(np.array(got_mask), want_mask.numpy())
    err = np.abs(np.array(got) - want).max() / np.abs(want).max()
    assert err <= 1e-6, err
    # (B, H, W, 1) masks are accepted too
    np.testing.assert_array_equal(
        np.array(pack_mask(mx.array(mask.permute(0, 2, 3, 1).numpy()))), want_mask.numpy()
    )


def test_pack_mask_channel_order():
    # one pixel at (dy, dx) inside the (ph, pw) latent of token (r, c)
    r, c, ph, pw, dy, dx = 1, 2, 1, 0, 3, 5
    m = np.zeros((1, 48, 64), np.float32)
    m[0, (2 * r + ph) * 8 + dy, (2 * c + pw) * 8 + dx] = 1.0
    packed = np.array(pack_mask(mx.array(m)))
    assert packed.shape == (1, 12, 256)
    nz = np.argwhere(packed)
    assert nz.tolist() == [[0, r * 4 + c, (8 * dy + dx) * 4 + 2 * ph + pw]]
    with pytest.raises(ValueError):
        pack_mask(mx.zeros((1, 40, 64)))
    with pytest.raises(ValueError):
        pack_mask(mx.zeros((40, 64)))


@pytest.mark.parity
def test_model_input_matches_pipeline_concat(ref):
    torch = ref.torch
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(B, 960, 64, generator=g)
    cond = torch.randn(B, 960, 320, generator=g)
    want = torch.cat((latents, cond), dim=2).numpy()  # the transformer's hidden_states
    got = model_input(mx.array(latents.numpy()), mx.array(cond.numpy()))
    assert got.shape == (B, 960, 384)
    np.testing.assert_array_equal(np.array(got), want)
    # a single conditioning broadcasts over the batch
    one = model_input(mx.array(latents.numpy()), mx.array(cond[:1].numpy()))
    np.testing.assert_array_equal(np.array(one[1, :, 64:]), cond[0].numpy())


def test_concat_shape_errors():
    with pytest.raises(ValueError):
        fill_conditioning(mx.zeros((2, 10, 64)), mx.zeros((2, 11, 256)))
    with pytest.raises(ValueError):
        model_input(mx.zeros((2, 10, 64)), mx.zeros((3, 10, 320)))
    assert model_input(mx.zeros((2, 10, 8)), mx.zeros((2, 10, 12))).shape == (2, 10, 20)


def test_scale_unscale():
    z = mx.array(rng(4).standard_normal((1, 6, 4, 16)).astype(np.float32))
    s = scale_latents(z, SCALING, SHIFT)
    np.testing.assert_allclose(np.array(s), (np.array(z) - SHIFT) * SCALING, rtol=1e-6)
    np.testing.assert_allclose(np.array(unscale_latents(s, SCALING, SHIFT)), np.array(z), atol=1e-6)
