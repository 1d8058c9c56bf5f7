"""Tiled VAE encode/decode (mlx_edit/editing/tiling.py): tile grid, blend weights, fidelity, seams.

Random-weight VAEs at a small width keep this fast. Inputs are stationary (random latents,
uniform noise images), so each tile's GroupNorm statistics match the whole image's: what
is left to measure is the tiling itself. Natural-image latents with random weights are
worse (per-tile GroupNorm/attention); see benchmarks/RESULTS.md.
"""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest

from mlx_edit.editing import tiling
from mlx_edit.models.vae import AutoencoderKL, VAEConfig

SMALL = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
SIZE, TILE, OVERLAP = 384, 192, 64  # px: a 3x3 grid of tiles


@pytest.fixture(scope="module")
def vae():
    mx.random.seed(0)
    model = AutoencoderKL(VAEConfig.from_dict(SMALL))
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def latents():
    return mx.random.normal((1, SIZE // 8, SIZE // 8, 16), key=mx.random.key(1))


@pytest.fixture(scope="module")
def decoded(vae, latents):
    """The untiled decode of `latents`, (1, SIZE, SIZE, 3)."""
    return np.array(vae.decode(latents))


def psnr(x, ref) -> float:
    """PSNR in dB with the reference's own value range as the peak."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(10 * np.log10((ref.max() - ref.min()) ** 2 / np.mean((x - ref) ** 2)))


@pytest.mark.parametrize("size,tile,overlap,align", [
    (512, 64, 16, 1), (48, 24, 8, 1), (1000, 512, 128, 8), (4096, 256, 64, 8), (64, 64, 8, 1),
    (40, 64, 8, 1), (1032, 256, 64, 8),
])
def test_tile_starts_cover_with_overlap(size, tile, overlap, align):
    starts = tiling.tile_starts(size, tile, overlap, align)
    assert starts[0] == 0 and all(s % align == 0 for s in starts)
    assert min(starts[-1] + tile, size) == size  # the last tile ends at the border
    assert starts == sorted(set(starts))
    for a, b in zip(starts, starts[1:]):
        assert a + tile - b >= overlap  # neighbours overlap by at least `overlap`


def test_tile_starts_rejects_bad_arguments():
    with pytest.raises(ValueError):
        tiling.tile_starts(100, 32, 32)
    with pytest.raises(ValueError):
        tiling.tile_starts(100, 32, 8, align=8)  # 100 is not a multiple of 8


@pytest.mark.parametrize("blend", tiling.BLENDS)
def test_blend_weights_are_a_smooth_partition_of_unity(blend):
    size, tile = 1000, 256
    starts = tiling.tile_starts(size, tile, 64)
    total = np.zeros(size)
    for s, w in zip(starts, tiling.axis_weights(starts, tile, size, blend)):
        total[s : s + len(w)] += w
        assert w.min() > 0 and w.max() <= 1
        assert np.abs(np.diff(w)).max() <= 2.0 / 64  # no step: ramps over >= 64 samples
    np.testing.assert_allclose(total, 1.0, atol=1e-12)


def test_one_tile_is_the_untiled_pass(vae, latents):
    small = latents[:, :16, :24]
    np.testing.assert_array_equal(np.array(tiling.decode_tiled(vae, small, tile=256)),
                                  np.array(vae.decode(small)))
    images = mx.random.uniform(-1, 1, (1, 64, 128, 3), key=mx.random.key(3))
    np.testing.assert_array_equal(np.array(tiling.encode_tiled(vae, images, tile=128)),
                                  np.array(vae.encode_mean(images)))


def test_tiled_decode_matches_untiled(vae, latents, decoded):
    ref = decoded
    out = np.array(tiling.decode_tiled(vae, latents, tile=TILE, overlap=OVERLAP))
    assert out.shape == ref.shape and out.dtype == np.float32
    assert psnr(out, ref) >= 40.0  # measured 43.6 dB


def test_tiled_encode_matches_untiled(vae):
    images = mx.random.uniform(-1, 1, (1, SIZE, SIZE, 3), key=mx.random.key(2))
    ref = np.array(vae.encode_mean(images))
    out = np.array(tiling.encode_tiled(vae, images, tile=TILE, overlap=OVERLAP))
    assert out.shape == ref.shape
    assert psnr(out, ref) >= 40.0  # measured 41.1 dB


def _seam_spike(img: np.ndarray, ref: np.ndarray) -> float:
    """Largest ratio of one row/column's finite-difference error to its neighbours'
    median: a visible seam is a line where the jump between pixels is wrong."""
    worst = 1.0
    for axis in (0, 1):
        err = np.abs(np.diff(img, axis=axis) - np.diff(ref, axis=axis))
        prof = err.mean(axis=(1, 2) if axis == 0 else (0, 2))
        for c in range(len(prof)):
            near = np.r_[prof[max(0, c - 6) : c], prof[c + 1 : c + 7]]
            worst = max(worst, prof[c] / np.median(near))
    return worst


def _hard_cut(vae, latents) -> np.ndarray:
    # The same tiles pasted without blending, cut in the middle of each overlap.
    t, f = TILE // 8, 8
    starts = tiling.tile_starts(latents.shape[1], t, OVERLAP // 8)
    cuts = [0] + [(a + t + b) // 2 * f for a, b in zip(starts, starts[1:])] + [SIZE]
    out = np.zeros((SIZE, SIZE, 3), np.float32)
    for i, y0 in enumerate(starts):
        for j, x0 in enumerate(starts):
            tile = np.array(vae.decode(latents[:, y0 : y0 + t, x0 : x0 + t]))[0]
            ys, xs = slice(cuts[i], cuts[i + 1]), slice(cuts[j], cuts[j + 1])
            out[ys, xs] = tile[cuts[i] - y0 * f : cuts[i + 1] - y0 * f,
                               cuts[j] - x0 * f : cuts[j + 1] - x0 * f]
    return out


def test_no_seams(vae, latents, decoded):
    ref = decoded[0]
    hard = _seam_spike(_hard_cut(vae, latents), ref)
    assert hard > 1.3  # the check sees a hard cut (measured 1.43)
    for blend in tiling.BLENDS:
        out = np.array(tiling.decode_tiled(vae, latents, TILE, OVERLAP, blend))[0]
        assert _seam_spike(out, ref) < 1.2  # measured 1.12


def test_auto_tiles_only_above_the_budget(vae, latents, decoded):
    # FLUX VAE, float32, CPU (banded passes): 512 px fits the 3 GB budget, 4096 px does not.
    assert not tiling.should_tile(512, 512) and tiling.should_tile(4096, 4096)
    assert tiling.default_tile(4) == 512
    cfg = vae.config  # a narrower VAE: its estimate scales down (32 vs 256 channels)
    assert not tiling.should_tile(SIZE, SIZE, config=cfg)
    np.testing.assert_array_equal(np.array(tiling.decode_auto(vae, latents)), decoded)
    # A smaller budget forces the tiled path, with the largest tile that fits it.
    budget = tiling.vae_activation_gb(192, 192, 4, config=cfg) * 1.01
    assert tiling.default_tile(4, budget, config=cfg) == 192
    out = np.array(tiling.decode_auto(vae, latents, budget_gb=budget))
    assert psnr(out, decoded) >= 40.0
    images = mx.random.uniform(-1, 1, (1, SIZE, SIZE, 3), key=mx.random.key(2))
    enc_budget = tiling.vae_activation_gb(192, 192, 4, decode=False, config=cfg) * 1.01
    assert tiling.should_tile(SIZE, SIZE, 4, enc_budget, decode=False, config=cfg)
    z = tiling.encode_auto(vae, images, budget_gb=enc_budget)
    assert z.shape == (1, SIZE // 8, SIZE // 8, 16) and z.dtype == mx.float32


def test_memory_stays_bounded(vae):
    # Peak MLX memory of a tiled decode does not grow with the image (host accumulators).
    peaks = []
    for size in (256, 512):
        z = mx.random.normal((1, size // 8, size // 8, 16), key=mx.random.key(4))
        mx.eval(z)
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        tiling.decode_tiled(vae, z, tile=128, overlap=32)
        peaks.append(mx.get_peak_memory() - base)
    output_growth = (512**2 - 256**2) * 3 * 4  # the returned array
    assert peaks[1] - peaks[0] <= output_growth * 1.1 + 1e6


@pytest.mark.parametrize("max_bytes", [1, 20_000, 300_000])
def test_banded_pass_equals_the_plain_pass(vae, latents, decoded, max_bytes):
    # Bands of 1 row (max_bytes 1), a few rows, and query blocks in the mid-block
    # attention (48x48 latents: 2304 tokens): GroupNorm and attention still see the
    # whole image, so the result is the plain pass's up to float rounding.
    with vae.banded(max_bytes):
        out = np.array(vae.decode(latents))
        images = mx.random.uniform(-1, 1, (1, SIZE - 8, SIZE, 3), key=mx.random.key(5))
        z = np.array(vae.encode_mean(images))
    assert all(m.max_bytes is None for _, m in vae.named_modules() if hasattr(m, "max_bytes"))
    np.testing.assert_allclose(out, decoded, rtol=0, atol=1e-5)
    np.testing.assert_allclose(z, np.array(vae.encode_mean(images)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("stride,padding,kernel", [(1, 1, 3), (2, 0, 3), (2, 1, 3), (1, 0, 1)])
def test_banded_conv_matches_mlx_conv(stride, padding, kernel):
    from mlx_edit.models.vae import Conv2d

    conv = Conv2d(5, 7, kernel, stride=stride, padding=padding)
    x = mx.random.normal((2, 23, 17, 5), key=mx.random.key(6))
    ref = np.array(conv(x))
    conv.max_bytes = 1  # one output row per band
    np.testing.assert_allclose(np.array(conv(x)), ref, rtol=0, atol=1e-5)


def test_banding_bounds_the_convolution_scratch():
    # MLX's CPU conv unfolds its input (9x for 3x3); in bands only one band's worth.
    from mlx_edit.models.vae import Conv2d

    conv = Conv2d(64, 64, 3, padding=1)
    x = mx.random.normal((1, 256, 256, 64), key=mx.random.key(7))
    mx.eval(conv.parameters(), x)
    peaks = []
    for max_bytes in (None, 2**20):
        conv.max_bytes = max_bytes
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(conv(x))
        peaks.append(mx.get_peak_memory() - base)
    unfolded = 256 * 256 * 9 * 64 * 4  # 151 MB
    assert peaks[0] >= unfolded  # the plain conv holds the unfolded input (measured 1.22x)
    assert peaks[1] <= 0.3 * unfolded  # output + padded copy + one 1 MB band (measured 0.23)


def test_auto_passes_are_banded_on_the_cpu(vae, latents, monkeypatch):
    calls = []
    real = AutoencoderKL.banded

    def spy(self, max_bytes):
        calls.append(max_bytes)
        return real(self, max_bytes)

    monkeypatch.setattr(AutoencoderKL, "banded", spy)
    tiling.decode_auto(vae, latents)
    tiling.encode_tiled(vae, mx.zeros((1, 64, 64, 3)), tile=32, overlap=8)
    assert calls == ([tiling.BAND_BYTES] * 2 if mx.default_device() == mx.cpu else [])
