"""Image/mask I/O (mlx_edit.imaging.images), mask ops (mlx_edit.imaging.masks), geometry (mlx_edit.imaging.stitch).

Fast, no torch: real photos from skimage.data plus synthetic images.
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (first, per project rule)

import io
import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image, ImageCms
from skimage import data as skdata

from mlx_edit.imaging.images import (
    EmptyMaskError,
    InputError,
    InputNotFoundError,
    OutputExistsError,
    from_array,
    load_image,
    load_mask,
    save_json_sidecar,
    save_png,
    sidecar_path,
    to_array,
)
from mlx_edit.imaging.masks import binarize_mask, blend_mask, feather_mask, grow_mask, mask_bbox
from mlx_edit.imaging.stitch import (
    crop_for_model,
    outpaint_canvas,
    pad_to_multiple,
    paste_back,
    plan_crop,
    stitch_back,
    unpad,
)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skdata.astronaut())


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    return Image.fromarray(skdata.coffee())


def _rect_mask(w: int, h: int, box: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros((h, w), np.float32)
    m[box[1] : box[3], box[0] : box[2]] = 1
    return m


# ---------------------------------------------------------------- loading


def test_exif_orientation_6_is_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)  # stored: left half red
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    Image.fromarray(a).save(path, exif=exif.tobytes(), quality=95)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (20, 40)
    b = np.asarray(img).astype(int)
    assert b[:18, :, 0].mean() > 200 and b[:18, :, 2].mean() < 60  # left went to the top
    assert b[22:, :, 2].mean() > 200 and b[22:, :, 0].mean() < 60


def test_alpha_modes_composite_on_white():
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[..., 3] = [[0, 255, 128], [255, 255, 255]]
    out = np.asarray(load_image(Image.fromarray(rgba, "RGBA"))).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 20, 30]
    assert np.all(np.abs(out[0, 2] - (np.array([10, 20, 30]) * 128 + 255 * 127) / 255) <= 1)
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    assert np.asarray(load_image(la))[0, 0].tolist() == [255, 255, 255]
    black = load_image(Image.fromarray(rgba, "RGBA"), background=(0, 0, 0))
    assert np.asarray(black)[0, 0].tolist() == [0, 0, 0]


def test_palette_cmyk_gray_modes(coffee):
    p = coffee.convert("P")
    assert np.array_equal(np.asarray(load_image(p)), np.asarray(p.convert("RGB")))
    pt = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    pt.putpalette([200, 0, 0, 0, 200, 0] + [0] * 762)
    pt.info["transparency"] = 0
    assert np.asarray(load_image(pt)).tolist() == [[[255, 255, 255], [0, 200, 0]]]
    assert load_image(coffee.convert("CMYK")).mode == "RGB"
    g = load_image(coffee.convert("L"))
    a = np.asarray(g)
    assert g.mode == "RGB" and np.array_equal(a[..., 0], a[..., 2])


def test_16bit_scaled_with_rounding(tmp_path):
    v = np.array([[0, 257, 32767, 32896, 65535]], np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(v).save(path)
    img = load_image(path)
    assert np.asarray(img)[0, :, 0].tolist() == [0, 1, 127, 128, 255]
    i32 = Image.fromarray(v.astype(np.int32), "I")
    assert np.asarray(load_image(i32))[0, :, 1].tolist() == [0, 1, 127, 128, 255]


def test_load_errors(tmp_path):
    with pytest.raises(InputNotFoundError, match="not found") as e:
        load_image(tmp_path / "nope.png")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(InputError, match="bad.png"):
        load_image(bad)
    with pytest.raises(InputError, match="directory"):
        load_mask(tmp_path)


def test_icc_profile_kept_and_written(tmp_path, coffee):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = tmp_path / "icc.png"
    coffee.save(src, icc_profile=icc)
    img = load_image(src)
    assert img.info["icc_profile"] == icc
    out = save_png(img, tmp_path / "out.png")
    assert Image.open(out).info["icc_profile"] == icc


# ---------------------------------------------------------------- masks


def test_load_mask_sources(tmp_path):
    m = np.zeros((10, 12), np.uint8)
    m[2:5, 3:7] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    got = load_mask(tmp_path / "m.png", (12, 10))
    assert got.dtype == np.float32 and got.shape == (10, 12)
    assert np.array_equal(got, m / 255.0)
    red = np.zeros((10, 12, 3), np.uint8)
    red[2:5, 3:7, 0] = 255  # a red stroke counts as white
    assert np.array_equal(load_mask(red), m / 255.0)
    layer = np.zeros((10, 12, 4), np.uint8)
    layer[..., :3] = 40  # uniform colour: the alpha is the mask
    layer[..., 3] = m
    assert np.array_equal(load_mask(Image.fromarray(layer, "RGBA")), m / 255.0)
    assert np.array_equal(load_mask(m > 0), m / 255.0)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        load_mask(m.astype(np.float32) * 2.0)


def test_mask_resize_warns_with_both_sizes():
    m = np.zeros((50, 100), np.float32)
    m[10:40, 20:80] = 1
    with pytest.warns(UserWarning, match=r"100x50.*200x100"):
        got = load_mask(m, (200, 100))
    assert got.shape == (100, 200)
    assert got[50, 100] == 1 and got[5, 5] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_mask(m, (100, 50))  # same size: no warning


def test_empty_mask_is_an_error():
    with pytest.raises(EmptyMaskError, match="empty"):
        load_mask(np.full((8, 8), 0.49, np.float32))
    assert issubclass(EmptyMaskError, InputError)


def test_binarize_rule():
    m = np.array([0.0, 0.4999, 0.5, 0.7, 1.0], np.float32)
    assert binarize_mask(m).tolist() == [0, 0, 1, 1, 1]


def test_grow_is_exact_disc_dilation():
    rng = np.random.default_rng(0)
    m = (rng.random((45, 60)) > 0.996).astype(np.float32)
    m[0, 0] = m[44, 59] = 1  # corners: clipping at the border
    yy, xx = np.mgrid[:45, :60]
    for px in (0, 1, 2.5, 6):
        ref = np.zeros(m.shape, bool)
        for y, x in zip(*np.nonzero(m)):
            ref |= (yy - y) ** 2 + (xx - x) ** 2 <= px * px
        assert np.array_equal(grow_mask(m, px), ref), px
    with pytest.raises(ValueError):
        grow_mask(m, -1)


def test_feather_properties():
    m = _rect_mask(80, 60, (20, 15, 50, 40))
    m[0:10, 70:80] = 1  # touches the border
    f = feather_mask(m, 6)
    assert f.dtype == np.float32 and f.min() >= 0 and f.max() <= 1
    assert np.all(f[grow_mask(m, 6 * np.sqrt(2) + 1) == 0] == 0)  # exactly 0 beyond reach
    assert f[27, 35] == 1.0 and f[0, 79] == 1.0  # deep inside / border corner stay 1
    assert 0.4 < f[27, 20] < 0.6  # the edge sits mid-ramp
    assert np.allclose(f[:, 20:50], f[:, 20:50][:, ::-1], atol=1e-6)  # symmetric
    assert np.array_equal(feather_mask(m, 0), m)


def test_blend_mask_is_one_on_grown_mask_and_zero_far_away():
    m = _rect_mask(120, 100, (50, 40, 60, 55))
    b = blend_mask(m, grow_px=8, feather_px=4)
    assert np.all(b[grow_mask(m, 8) == 1] == 1.0)
    assert np.all(b[grow_mask(m, 8 + 2.9 * 4 + 1) == 0] == 0.0)
    assert 0 < b[47, 71] < 1


def test_grow_and_feather_fast_on_4k():
    import time

    m = np.zeros((2160, 3840), np.float32)
    m[900:1300, 1500:2300] = 1
    t = time.perf_counter()
    b = blend_mask(m, 32, 16)
    assert time.perf_counter() - t < 10.0
    assert mask_bbox(b > 0)[0] < 1500 - 32


# ---------------------------------------------------------------- padding and arrays


def test_pad_and_unpad_identity_odd_size(astronaut):
    img = astronaut.resize((333, 517))
    padded, pad = pad_to_multiple(img, 16)
    assert padded.size == (336, 528) and pad == (3, 11)
    a = np.asarray(padded)
    assert np.array_equal(a[:517, 333:], np.repeat(a[:517, 332:333], 3, axis=1))  # edge
    assert np.array_equal(np.asarray(unpad(padded, pad)), np.asarray(img))
    m = np.ones((517, 333), np.float32)
    pm, mpad = pad_to_multiple(m, 16)
    assert pm.shape == (528, 336) and mpad == pad and pm[520:, :].max() == 0
    assert np.array_equal(unpad(pm, mpad), m)


def test_to_from_array(coffee):
    x = to_array(coffee)
    assert x.dtype == np.float32 and x.shape == (400, 600, 3)
    assert np.array_equal(x, np.asarray(coffee, np.float32) / 255.0 * 2.0 - 1.0)
    assert np.array_equal(np.asarray(from_array(x)), np.asarray(coffee))
    assert np.asarray(from_array(np.array([[[-2.0, 0.0, 0.5]]]))).tolist() == [[[0, 128, 191]]]
    with pytest.raises(ValueError, match="NaN"):
        from_array(np.full((2, 2, 3), np.nan))


# ---------------------------------------------------------------- paste-back and crop


def test_paste_back_exact_outside_blend(astronaut, coffee):
    o = astronaut
    e = coffee.resize(o.size)
    b = np.zeros((512, 512), np.float32)
    b[100:200, 100:200] = 1
    b[100:200, 200:210] = np.linspace(0.95, 0.05, 10)
    b[300, 300] = 0.5
    out = np.asarray(paste_back(o, e, b))
    oa, ea = np.asarray(o), np.asarray(e)
    assert np.array_equal(out[b == 0], oa[b == 0])
    assert np.array_equal(out[b == 1], ea[b == 1])
    mid = np.rint(oa[300, 300] * 0.5 + ea[300, 300] * 0.5)
    assert np.array_equal(out[300, 300], mid.astype(np.uint8))
    with pytest.raises(ValueError):
        paste_back(o, e, b[:10])


def test_plan_crop_small_mask_on_large_image():
    m = _rect_mask(4000, 3000, (2900, 2700, 3100, 2950))
    plan = plan_crop((4000, 3000), m)
    x0, y0, x1, y1 = plan.box
    assert plan.cropped and plan.resized
    assert 0 <= x0 <= 2900 - 64 and 3100 + 64 <= x1 <= 4000
    assert 0 <= y0 <= 2700 - 64 and 2950 + 48 <= y1 <= 3000  # clamped at the bottom
    mw, mh = plan.model_size
    assert mw % 16 == 0 and mh % 16 == 0
    assert abs(mw * mh / 1024**2 - 1) < 0.1
    ww, wh = plan.window_size
    assert abs((ww / wh) / (mw / mh) - 1) < 0.01  # no distortion
    with pytest.raises(EmptyMaskError):
        plan_crop((4000, 3000), np.zeros((3000, 4000), np.float32))


def test_plan_crop_rules():
    m = _rect_mask(800, 600, (10, 10, 700, 500))  # large mask, small image: 1:1
    plan = plan_crop((800, 600), m)
    assert not plan.cropped and not plan.resized and plan.model_size == (800, 608)
    full = plan_crop((4000, 3000), np.ones((3000, 4000), np.float32))
    assert not full.cropped and full.resized and abs(np.prod(full.model_size) / 2**20 - 1) < 0.1
    none = plan_crop((4000, 3000), np.ones((3000, 4000), np.float32), None)
    assert none.model_size == (4000, 3008) and not none.resized
    thin = plan_crop((4000, 3000), _rect_mask(4000, 3000, (100, 0, 110, 3000)))
    ww, wh = thin.window_size
    assert max(ww / wh, wh / ww) <= 2.0 + 1e-6


def test_crop_and_stitch_back(coffee):
    big = coffee.resize((4000, 3000), Image.LANCZOS)
    user = _rect_mask(4000, 3000, (1500, 1200, 1700, 1400))
    mask, blend = grow_mask(user, 8), blend_mask(user, 8, 8)
    plan = plan_crop(big.size, blend)
    canvas, model_mask = crop_for_model(big, mask, plan)
    assert canvas.size == plan.model_size and model_mask.shape == plan.model_size[::-1]
    assert set(np.unique(model_mask)) <= {0.0, 1.0}
    edited = Image.fromarray(255 - np.asarray(canvas))  # a stand-in "model"
    out = np.array(stitch_back(big, edited, plan, blend))
    ref = np.array(big)
    x0, y0, x1, y1 = plan.box
    win = (slice(y0, y1), slice(x0, x1))
    zero = blend[win] == 0
    assert zero.any() and np.array_equal(out[win][zero], ref[win][zero])
    out[win] = ref[win] = 0
    assert np.array_equal(out, ref)  # outside the window: bit-identical
    out, ref = np.asarray(stitch_back(big, edited, plan, blend)), np.asarray(big)
    inner = (slice(1200, 1400), slice(1500, 1700))  # blend 1: inverted, up to the resize
    assert np.abs(out[inner].astype(int) - (255 - ref[inner].astype(int))).mean() < 0.5
    same = np.asarray(stitch_back(big, canvas, plan, blend))
    assert np.abs(same[inner].astype(int) - ref[inner].astype(int)).mean() < 0.5


def test_crop_for_model_unresized_roundtrip_is_exact(astronaut):
    img = astronaut.resize((333, 517))
    m = _rect_mask(333, 517, (100, 100, 200, 300))
    plan = plan_crop(img.size, m)
    assert not plan.resized and plan.model_size == (336, 528)
    canvas, mm = crop_for_model(img, m, plan)
    assert mm[:517, :333].sum() == m.sum() and mm[517:].max() == 0
    out = stitch_back(img, canvas, plan, blend_mask(m, 4, 4))
    assert np.array_equal(np.asarray(out), np.asarray(img))


# ---------------------------------------------------------------- outpaint


def test_outpaint_geometry(coffee):
    o = outpaint_canvas(coffee, left=0, right=96, top=40, bottom=0, overlap=16)
    canvas, mask, blend = o
    assert canvas.size == (696, 440) and mask.shape == blend.shape == (440, 696)
    c = np.asarray(canvas)
    assert np.array_equal(c[40:, :600], np.asarray(coffee))  # original at (left, top)
    assert mask[:40].min() == 1 and mask[:, 600:].min() == 1 and blend[:, 600:].min() == 1
    assert mask[40:56, :584].min() == 1 and mask[40:, 584:600].min() == 1  # overlap bands
    assert mask[56:, :584].max() == 0 and blend[56:, :584].max() == 0
    assert mask[200, :10].max() == 0 and mask[-1, 300] == 0  # left/bottom not expanded
    band = blend[200, 584:600]
    assert np.all((band > 0) & (band < 1)) and np.all(np.diff(band) > 0)
    assert np.array_equal(mask, (blend > 0).astype(np.float32))
    out = np.asarray(paste_back(canvas, Image.new("RGB", canvas.size, (1, 2, 3)), blend))
    assert np.array_equal(out[56:, :584], np.asarray(coffee)[16:, :584])
    assert np.all(out[:, 600:] == (1, 2, 3))


def test_outpaint_fill_and_errors(astronaut):
    black = np.asarray(outpaint_canvas(astronaut, left=8, fill="black").canvas)
    assert black[:, :8].max() == 0
    edge = np.asarray(outpaint_canvas(astronaut, left=8).canvas)
    assert np.array_equal(edge[:, 0], np.asarray(astronaut)[:, 0])
    with pytest.raises(InputError, match="at least one"):
        outpaint_canvas(astronaut)
    with pytest.raises(InputError, match=">= 0"):
        outpaint_canvas(astronaut, left=-4, right=10)


# ---------------------------------------------------------------- writing


def test_save_png_metadata_and_refusals(tmp_path, astronaut):
    path = tmp_path / "out.png"
    meta = {"prompt": "a café", "seed": 7, "params": {"steps": 28, "guidance": 30.0}}
    save_png(astronaut, path, meta)
    back = Image.open(path)
    assert back.text["prompt"] == "a café" and json.loads(back.text["seed"]) == 7
    assert json.loads(back.text["params"]) == meta["params"]
    assert np.array_equal(np.asarray(back), np.asarray(astronaut))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_png(astronaut, path, meta)
    save_png(Image.new("RGB", (4, 4)), path, overwrite=True)
    assert Image.open(path).size == (4, 4)
    src = tmp_path / "in.png"
    astronaut.save(src)
    with pytest.raises(InputError, match="input"):
        save_png(astronaut, tmp_path / "." / "in.png", overwrite=True, protect=[src])
    with pytest.raises(InputError, match="does not exist"):
        save_png(astronaut, tmp_path / "missing" / "x.png")
    with pytest.raises(InputError, match="key"):
        save_png(astronaut, tmp_path / "k.png", {"": 1})


def test_save_png_failure_leaves_nothing(tmp_path):
    before = io.BytesIO()
    Image.new("RGB", (3, 3), (9, 9, 9)).save(before, format="PNG")
    keep = tmp_path / "keep.png"
    keep.write_bytes(before.getvalue())
    bad = Image.new("CMYK", (8, 8))  # PNG cannot store CMYK: the save raises mid-write
    with pytest.raises(OSError):
        save_png(bad, tmp_path / "new.png")
    with pytest.raises(OSError):
        save_png(bad, keep, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["keep.png"]
    assert keep.read_bytes() == before.getvalue()


def test_json_sidecar(tmp_path):
    png = tmp_path / "a.png"
    side = sidecar_path(png)
    assert side.name == "a.json"
    save_json_sidecar(side, {"prompt": "x", "path": tmp_path, "n": 3})
    assert json.loads(side.read_text()) == {"prompt": "x", "path": str(tmp_path), "n": 3}
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_json_sidecar(side, {})
    save_json_sidecar(side, {"v": 2}, overwrite=True)
    assert json.loads(side.read_text()) == {"v": 2}
    assert sorted(os.listdir(tmp_path)) == ["a.json"]
