"""`mlx-edit inpaint --blend poisson --color-match histogram --soft-mask` end to end on a
real photo (skimage astronaut) with the tiny random checkpoint."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage import data

from mlx_edit.cli import main
from mlx_edit.imaging.images import InputError
from mlx_edit.imaging.masks import blend_mask

pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.astronaut()).resize((203, 171)).save(d / "astronaut.png")
    mask = np.zeros((171, 203), np.uint8)
    mask[40:110, 60:100] = 255  # full strength
    mask[40:110, 100:150] = 80  # a third: changes only late in the schedule
    Image.fromarray(mask).save(d / "soft.png")
    return d


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parity  # the fixture's ranker/ is built by transformers
def test_inpaint_poisson_histogram_soft_mask_ranked(tiny_ckpt, photos, tmp_path):
    """The issue's command: 3 candidates, CLIP-ranked by the fixture's ranker/, best 2 kept."""
    common = ["inpaint", "--model", tiny_ckpt, "--image", photos / "astronaut.png",
              "--mask", photos / "soft.png", "--prompt", "a red hat", "--steps", 3,
              "--seed", 2, "--feather", 4, "--num-images", 3,
              "--blend", "poisson", "--color-match", "histogram"]
    r = invoke(*common, "--soft-mask", "--rank", "clip", "--keep-best", 2,
               "--output", tmp_path / "soft.png")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "soft-2.png").exists()  # --keep-best 2 of 3
    r = invoke(*common, "--output", tmp_path / "hard.png")
    assert r.exit_code == 0, r.output
    src = np.asarray(Image.open(photos / "astronaut.png").convert("RGB"))
    mask = np.asarray(Image.open(photos / "soft.png"), np.float32) / 255
    outside = blend_mask((mask > 0).astype(np.float32), 0, 4) == 0
    grey = mask == 80 / 255  # only the soft mask lets the grey area change
    scores, seeds = [], set()
    for i in range(2):
        soft = Image.open(tmp_path / f"soft-{i}.png")
        meta = soft.text
        assert (meta["blend"], meta["color_match"], meta["soft_mask"]) == (
            "poisson", "histogram", "True")
        assert (meta["rank_method"], meta["rank"]) == ("clip", str(i + 1))
        assert meta["rank_model"] == str(tiny_ckpt / "ranker")
        scores.append(float(meta["rank_score"]))
        seed = int(meta["seed"])
        seeds.add(seed)
        a = np.asarray(soft.convert("RGB"))
        assert a.shape == src.shape and np.array_equal(a[outside], src[outside])
        assert not np.array_equal(a[mask > 0], src[mask > 0])
        hard = Image.open(tmp_path / f"hard-{seed - 2}.png")
        assert hard.text["soft_mask"] == "False" and "rank" not in hard.text
        assert not np.array_equal(a[grey], np.asarray(hard.convert("RGB"))[grey])
    assert scores[0] >= scores[1] and len(seeds) == 2 and seeds <= {2, 3, 4}


def test_bad_method_is_a_usage_error(tiny_mlx, photos, tmp_path):
    r = CliRunner().invoke(main, ["inpaint", "--model", str(tiny_mlx), "--image",
                                  str(photos / "astronaut.png"), "--mask",
                                  str(photos / "soft.png"), "--prompt", "x",
                                  "--blend", "laplace", "--output", str(tmp_path / "o.png")])
    assert r.exit_code == 2 and "laplace" in r.output
    r = CliRunner().invoke(main, ["inpaint", "--model", str(tiny_mlx), "--image",
                                  str(photos / "astronaut.png"), "--mask",
                                  str(photos / "soft.png"), "--prompt", "x",
                                  "--keep-best", "1", "--output", str(tmp_path / "o.png")])
    assert r.exit_code == 2 and "--keep-best needs rank clip" in r.output
    assert not (tmp_path / "o.png").exists()


def test_api_defaults_and_validation(tiny_mlx, photos):
    from mlx_edit.options import default
    from mlx_edit.editing.pipeline import FluxFill

    assert (default("color_match"), default("blend")) == ("mean-std", "feather")
    pipe = FluxFill.from_pretrained(tiny_mlx)
    with pytest.raises(InputError, match="color_match must be one of"):
        pipe.inpaint(photos / "astronaut.png", photos / "soft.png", "x", color_match="lab")
    with pytest.raises(InputError, match="rank must be clip"):
        pipe.inpaint(photos / "astronaut.png", photos / "soft.png", "x", rank="aesthetic")


def test_seam_fix_redraws_only_a_band(tiny_mlx, photos):
    """--seam-fix: a second low-strength pass over a band around the blend boundary; outside
    the first blend and the band's own blend the photo stays exact."""
    from mlx_edit.imaging.blend import seam_band
    from mlx_edit.editing.pipeline import FluxFill

    pipe = FluxFill.from_pretrained(tiny_mlx)
    path, mask_path = photos / "astronaut.png", photos / "soft.png"
    kw = dict(steps=4, seed=5, feather=4, color_match="none")
    plain = pipe.inpaint(path, mask_path, "a hat", **kw)[0]
    fixed = pipe.inpaint(path, mask_path, "a hat", seam_fix=6, **kw)[0]
    assert fixed.info["seam_fix"] == "6.0" and fixed.info["strength"] == "1.0"
    src = np.asarray(Image.open(path).convert("RGB"))
    mask = np.asarray(Image.open(mask_path), np.float32) / 255
    weights = blend_mask(mask, 0, 4)
    band = seam_band(weights, 6)
    a, p = np.asarray(fixed.convert("RGB")), np.asarray(plain.convert("RGB"))
    keep = (weights == 0) & (blend_mask(band, 0, 2) == 0)
    assert np.array_equal(a[keep], src[keep])
    core = (weights == 1) & (blend_mask(band, 0, 2) == 0)  # the edit away from the seam
    assert core.any() and np.array_equal(a[core], p[core])
    assert not np.array_equal(a[band > 0], p[band > 0])
