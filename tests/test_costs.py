"""Costs that match the words: a small mask on a large photo is one model-size window at
full resolution (stitch.plan_native_window), windows without mask pixels are skipped
(their tokens are the source's), and the VAE decodes only the tiles near the blend
(the rest is the source's pixels) with the result unchanged. Geometry on the real 4K
sizes; the pipeline checks on the tiny fixture (1-2 steps, small photos)."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import json

import numpy as np
import pytest
from PIL import Image
from skimage import data

from mlx_edit.editing import large
from mlx_edit.imaging import masks
from mlx_edit.imaging.stitch import plan_crop, plan_native_window
from mlx_edit.options import EditOptions
from mlx_edit.editing.pipeline import FluxFill
from mlx_edit.progress import reporting

FAST = dict(steps=2, seed=3, max_sequence_length=16)


def _blend(w: int, h: int, box: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros((h, w), np.float32)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 1
    o = EditOptions()
    return masks.edit_masks(m, o.grow_mask, o.feather)[1]


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_800x600_mask_on_a_4k_photo_is_one_window_at_full_resolution(mode):
    """The issue's case: before, a 1648x1456 window in 4 full-resolution windows; now one
    window within the 1 MP budget, 1:1, holding the blend and >= 64 px of context."""
    blend = _blend(3840, 2160, (1500, 800, 2300, 1400))
    o = EditOptions(tile_mode=mode)
    assert plan_crop((3840, 2160), blend, o.max_model_pixels).window_size == (1648, 1454)
    plan = large.edit_plan((3840, 2160), blend, None, None, o)
    w, h = plan.model_size
    assert not plan.resized and w * h <= o.max_model_pixels
    x0, y0, x1, y1 = plan.box
    assert x0 <= 1500 - 64 and y0 <= 800 - 64 and x1 >= 2300 + 64 and y1 >= 1400 + 64
    assert large.windows_for(plan, o) is None or large.windows_for(plan, o).count == 1
    # tile_mode off keeps the shrunk window (its context), as before
    assert large.edit_plan((3840, 2160), blend, None, None, EditOptions(tile_mode="off")).resized


def test_a_mask_too_large_for_one_window_keeps_the_windowed_plan():
    blend = _blend(3840, 2160, (500, 300, 2000, 1800))  # 1500x1500 > 1 MP with context
    assert plan_native_window((3840, 2160), blend, 1024 * 1024) is None
    plan = large.edit_plan((3840, 2160), blend, None, None, EditOptions(tile_mode="on"))
    assert large.windows_for(plan, EditOptions(tile_mode="on")).count > 1


@pytest.fixture(scope="module")
def pipe(tiny_mlx):
    return FluxFill.from_pretrained(tiny_mlx)


def photo(w: int, h: int) -> Image.Image:
    return Image.fromarray(data.astronaut()).resize((w, h), Image.LANCZOS)


def test_windows_without_mask_pixels_are_skipped(pipe):
    """A mask in one corner of a windowed canvas: the windows holding none of its pixels
    are not evaluated (recorded as skipped) and pixels outside the blend stay exact."""
    img = photo(512, 288)
    m = np.zeros((288, 512), np.float32)
    m[16:80, 16:96] = 1
    out = pipe.inpaint(img, m, "x", tile_mode="on", max_model_pixels=256 * 256,
                       tile_overlap=32, crop_to_mask=False, **FAST)[0]
    windows = json.loads(out.info["windows"].replace("'", '"'))
    assert windows["skipped"] > 0 and windows["count"] + windows["skipped"] == \
        windows["grid"][0] * windows["grid"][1]
    assert pipe.last_stats["transformer_evals"] == 2 * windows["count"]
    _, blend = pipe.edit_masks(m, EditOptions())
    keep = blend == 0
    np.testing.assert_array_equal(np.asarray(out)[keep], np.asarray(img)[keep])
    assert not np.array_equal(np.asarray(out)[~keep], np.asarray(img)[~keep])


class Counter:
    wants_phases = True

    def __init__(self):
        self.last: dict[str, tuple[int, int]] = {}

    def __call__(self, done, total, phase="denoise"):
        self.last[phase] = (done, total)


def test_decode_runs_only_tiles_near_the_blend_and_the_result_is_unchanged(
        pipe, monkeypatch):
    """A 1:1 1024x256 canvas decoded in 256 px tiles (5): with a mask at the left only
    the tiles within 64 px of its blend are decoded, the others are the photo's pixels,
    and the output equals the full decode's bit for bit (paste-back and colour match
    read only pixels within 64 px of the blend, which only decoded tiles cover)."""
    from functools import partial

    from mlx_edit.editing import tiling

    img = photo(1024, 256)
    m = np.zeros((256, 1024), np.float32)
    m[64:160, 24:120] = 1
    kw = dict(tile_mode="off", crop_to_mask=False, color_match="mean-std", **FAST)
    monkeypatch.setattr(pipe.models, "tile_threshold_gb", 0.0)  # tiled decode, 256 px tiles:
    monkeypatch.setattr("mlx_edit.editing.components.decode_auto",
                        partial(tiling.decode_auto, budget_gb=0.12))
    skipped = Counter()
    with reporting(skipped):
        got = pipe.inpaint(img, m, "x", **kw)[0]
    monkeypatch.setattr("mlx_edit.editing.running.decode_region", lambda job: (None, None))
    full = Counter()
    with reporting(full):
        want = pipe.inpaint(img, m, "x", **kw)[0]
    (ran, n), (all_ran, tiles) = skipped.last["vae_decode"], full.last["vae_decode"]
    assert ran == n and all_ran == tiles == 5 and 1 <= ran <= 2, (ran, tiles)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_encode_runs_only_tiles_the_windows_and_the_decode_need(pipe, monkeypatch):
    """A windowed 1792x128 canvas (mask at the left) encoded and decoded in small VAE
    tiles: the encode skips the tiles beyond the kept windows and the decode's reach, the decode
    those beyond 64 px of the blend, and the output equals the run that encodes and
    decodes every tile, bit for bit."""
    from functools import partial

    from mlx_edit.editing import tiling

    img = photo(1792, 128)
    m = np.zeros((128, 1792), np.float32)
    m[16:80, 16:96] = 1
    kw = dict(tile_mode="on", max_model_pixels=256 * 256, tile_overlap=32,
              crop_to_mask=False, **FAST)
    monkeypatch.setattr(pipe.models, "tile_threshold_gb", 0.0)
    for name in ("encode_auto", "decode_auto"):  # 256 px tiles
        monkeypatch.setattr(f"mlx_edit.editing.components.{name}",
                            partial(getattr(tiling, name), budget_gb=0.12))
    runs = {}
    for name in ("skipping", "every tile"):
        if name == "every tile":
            monkeypatch.setattr("mlx_edit.editing.running.decode_region", lambda job: (None, None))
            monkeypatch.setattr("mlx_edit.editing.running.encode_region", lambda *a: None)
        counter = Counter()
        with reporting(counter):
            runs[name] = np.asarray(pipe.inpaint(img, m, "x", **kw)[0])
        runs[name + " tiles"] = (counter.last["vae_encode"][1], counter.last["vae_decode"][1])
    (enc, dec), (all_enc, all_dec) = runs["skipping tiles"], runs["every tile tiles"]
    assert 1 <= enc < all_enc and 1 <= dec < all_dec, runs
    np.testing.assert_array_equal(runs["skipping"], runs["every tile"])


def test_a_pass_that_fits_whole_runs_in_tiles_when_a_quarter_can_be_skipped(pipe):
    """decode_auto: a 1536x512 decode fits whole, but with only its left end needed it
    runs the tiles meeting that end (the rest: `fill`), and the needed pixels equal the
    full tiled decode's."""
    import mlx.core as mx

    from mlx_edit.editing import tiling

    z = mx.random.normal((1, 64, 192, pipe.vae_config.latent_channels), key=mx.random.key(1))
    needed = np.zeros((512, 1536), bool)
    needed[:, :200] = True
    fill = np.zeros((512, 1536, 3), np.float32)
    assert tiling.skipped_share(needed, 512 // 8, 8) >= tiling.SKIP_SHARE
    counter = Counter()
    with reporting(counter):
        got = np.array(tiling.decode_auto(pipe.vae, z, threshold_gb=100.0, needed=needed,
                                          fill=fill))
    done, total = counter.last["vae_decode"]
    assert done == total and total >= 1  # the tiles meeting the left end only
    full = np.array(tiling.decode_tiled(pipe.vae, z, tiling.default_tile(4, config=pipe.vae_config)))
    np.testing.assert_array_equal(got[0][needed], full[0][needed])
    assert tiling.skipped_share(None, 64, 8) == 0.0
