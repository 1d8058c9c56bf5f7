"""Colour-matched paste-back and Poisson blending (mlx_edit.imaging.blend) on real photos.

The cases and metrics are benchmarks/bench_blend.py's (imported), at a reduced size: a
scikit-image photo, another photo drawn into an elliptical mask, a +12 Lab b* cast over
the whole "generated" image; CIEDE2000 in rings around the boundary and the gradient of
the colour error across it.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("cv2")
pytest.importorskip("skimage")

from mlx_edit.imaging.blend import (  # noqa: E402
    blend_images,
    color_match,
    lab_to_rgb,
    outside_ring,
    poisson_blend,
    rgb_to_lab,
)
from mlx_edit.imaging.images import InputError  # noqa: E402
from mlx_edit.imaging.masks import blend_mask  # noqa: E402
from mlx_edit.imaging.stitch import plan_crop, stitch_back  # noqa: E402


@pytest.fixture(scope="module")
def bench(repo_root):
    spec = importlib.util.spec_from_file_location(
        "bench_blend", repo_root / "benchmarks" / "bench_blend.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_blend"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def case(bench):
    """chelsea (451x300) with astronaut drawn into the ellipse, +12 b* cast."""
    src = bench.photo("chelsea", headroom=32)
    return bench.make_case(src, bench.photo("astronaut", src.shape[1::-1], 32), cast=12.0)


def test_color_match_cuts_ring_ciede2000(bench, case):
    plain = bench.measure(bench.paste(case, "none", "feather", 8), case)
    assert plain["dE_in"] > 3.0  # the cast is visible to begin with
    for method in ("mean-std", "histogram"):
        matched = bench.measure(bench.paste(case, method, "feather", 8), case)
        for ring in ("dE_in", "dE_out"):
            assert matched[ring] <= 0.4 * plain[ring], (method, ring, matched, plain)


def test_poisson_cuts_seam_gradient_vs_hard_paste(bench, case):
    hard = bench.measure(bench.paste(case, "none", "feather", 0), case)
    poisson = bench.measure(bench.paste(case, "none", "poisson", 8), case)
    assert poisson["seam_grad"] <= 0.5 * hard["seam_grad"], (poisson, hard)


@pytest.mark.parametrize("cm", ["none", "mean-std", "histogram"])
@pytest.mark.parametrize("method", ["feather", "poisson"])
def test_outside_blend_exact_in_every_mode(bench, case, cm, method):
    weights = blend_mask(case.mask, 4, 8)
    out = np.asarray(blend_images(case.source, case.generated, weights,
                                  color_match_method=cm, method=method))
    keep = weights == 0
    assert np.array_equal(out[keep], case.source[keep])
    assert not np.array_equal(out[weights == 1], case.source[weights == 1])


@pytest.mark.parametrize("method", ["feather", "poisson"])
def test_stitch_back_crop_to_mask_exact_outside(bench, method):
    """Through crop-to-mask (window resized for the model and back), a mask touching the
    image border, odd sizes: exact outside the blend."""
    src = bench.photo("coffee")[:, :597]  # odd width
    h, w = src.shape[:2]
    mask = np.zeros((h, w), np.float32)
    mask[:90, 400:520] = 1.0  # touches the top border
    weights = blend_mask(mask, 4, 6)
    plan = plan_crop((w, h), weights, 128 * 128)
    assert plan.resized and plan.cropped
    generated = Image.fromarray(bench.photo("astronaut", plan.model_size))
    out = np.asarray(stitch_back(Image.fromarray(src), generated, plan, weights,
                                 color_match="histogram", method=method))
    assert out.shape == src.shape
    keep = weights == 0
    assert np.array_equal(out[keep], src[keep])


def test_color_match_fixes_a_cast_exactly_where_it_can(bench):
    """A pure b* cast on in-gamut colours is undone to within rounding."""
    src = bench.photo("rocket", (160, 120), headroom=32)
    case = bench.make_case(src, src, cast=12.0)  # "generated" = source + cast
    weights = blend_mask(case.mask, 0, 4)
    fixed = color_match(case.source, case.generated, weights, "mean-std")
    sel = weights > 0
    err = np.abs(fixed[sel].astype(int) - case.source[sel].astype(int))
    assert err.mean() < 1.0 and np.array_equal(fixed[~sel], case.generated[~sel])


def test_ring_and_degenerate_cases(case):
    weights = blend_mask(case.mask, 0, 4)
    ring = outside_ring(weights, 5)
    assert ring.any() and not (ring & (weights > 0)).any()
    whole = np.ones(case.mask.shape, np.float32)  # nothing left to measure the shift on
    with pytest.warns(UserWarning, match="colour match skipped"):
        out = color_match(case.source, case.generated, whole, "mean-std")
    assert np.array_equal(out, case.generated)
    empty = np.zeros(case.mask.shape, bool)
    assert np.array_equal(poisson_blend(case.source, case.generated, empty), case.generated)


def test_bad_method_names(case):
    with pytest.raises(InputError, match="color match must be one of"):
        blend_images(case.source, case.generated, case.mask, color_match_method="lab")
    with pytest.raises(InputError, match="blend must be one of"):
        blend_images(case.source, case.generated, case.mask, method="laplacian")


def test_missing_opencv_names_the_extra(monkeypatch, case):
    """Only Poisson needs OpenCV: colour matching (the default) works without it."""
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 -> ImportError
    with pytest.raises(InputError, match=r"mlx-edit\[blend\]"):
        poisson_blend(case.source, case.generated, case.mask > 0)
    color_match(case.source, case.generated, blend_mask(case.mask, 0, 4), "histogram")


def test_lab_matches_skimage():
    from skimage.color import rgb2lab

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (4096, 3), dtype=np.uint8)
    rgb[:8] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255],
               [1, 1, 1], [10, 200, 30], [128, 128, 128]]
    ours = rgb_to_lab(rgb)
    ref = rgb2lab(rgb[None].astype(np.float64) / 255.0)[0]
    # skimage's D65 white (0.95047, 1, 1.08883) is the rounded one; ours is the matrix's
    # own white (grey stays at a = b = 0): they differ by < 5e-3 in a/b.
    assert np.abs(ours - ref).max() < 1e-2
    assert np.array_equal(lab_to_rgb(ours), rgb)  # the round trip is exact in 8 bits


def test_seam_band_straddles_the_boundary():
    from mlx_edit.imaging.blend import seam_band

    m = np.zeros((40, 50), np.float32)
    m[10:30, 15:35] = 1.0
    band = seam_band(m, 3)
    assert band[20, 15] == 1 and band[20, 12] == 1 and band[20, 17] == 1  # both sides
    assert band[20, 25] == 0 and band[20, 5] == 0  # deep inside, far outside
    with pytest.raises(ValueError):
        seam_band(m, 0)


def test_bench_blend_main_runs(bench, capsys):
    """The benchmark script end to end at a small size (its summary line)."""
    bench.main(["--size", "96", "--feather", "4"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("lowest dE in: ")


def test_mean_std_scaling_is_bounded():
    """A flat edited ring against a busy original ring: the std ratio is clipped to
    STD_RATIO (2x at most), as documented, instead of scaling the edit by ~50x."""
    from mlx_edit.imaging.blend import STD_RATIO

    rng = np.random.default_rng(0)
    h = w = 64
    blend = np.zeros((h, w), np.float32)
    blend[24:40, 24:40] = 1
    original = rng.integers(60, 200, (h, w, 3), dtype=np.uint8)  # busy everywhere
    edited = np.full((h, w, 3), 128, np.uint8)
    edited += rng.integers(0, 2, (h, w, 3), dtype=np.uint8)  # nearly flat ring
    out = color_match(original, edited, blend, "mean-std")
    ring, sel = outside_ring(blend), blend > 0
    lo, le, x = rgb_to_lab(original[ring]), rgb_to_lab(edited[ring]), rgb_to_lab(edited[sel])
    ratio = np.clip(lo.std(0) / np.maximum(le.std(0), 1e-3), *STD_RATIO)
    assert ratio.max() == STD_RATIO[1]  # the case does hit the bound
    want = lab_to_rgb((x - le.mean(0)) * ratio + lo.mean(0))
    assert np.array_equal(out[sel], want)


def test_histogram_map_continues_past_the_ring_range():
    """Quantile matching shifts values below / above the ring's range by the end offsets
    (new colours are moved, not flattened onto the ring's extremes)."""
    from mlx_edit.imaging.blend import _quantile_map

    src, ref = np.linspace(10, 20, 101), np.linspace(30, 40, 101)  # ref = src + 20
    x = np.array([0.0, 5.0, 10.0, 15.0, 20.0, 25.0])
    assert np.allclose(_quantile_map(x, src, ref), x + 20)
