"""`mlx-edit inpaint|outpaint` end to end on real photos, with a tiny random checkpoint."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage import data

from mlx_edit.cli import main
from mlx_edit.imaging.masks import blend_mask


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    # Odd, non-multiple-of-16 sizes: the output must keep them exactly.
    astronaut = Image.fromarray(data.astronaut()).resize((301, 257))
    astronaut.save(d / "astronaut.png")
    coffee = Image.fromarray(data.coffee()).crop((0, 0, 250, 190))
    coffee.save(d / "coffee.jpg", quality=95)
    mask = np.zeros((257, 301), np.uint8)
    mask[60:140, 100:190] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(np.zeros((257, 301), np.uint8)).save(d / "empty.png")
    return d


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_inpaint_end_to_end(tiny_mlx, photos, tmp_path):
    out = tmp_path / "out.png"
    r = invoke("inpaint", "--model", tiny_mlx, "--image", photos / "astronaut.png",
               "--mask", photos / "mask.png", "--prompt", "a red hat", "--steps", 2,
               "--seed", 1, "--grow-mask", 4, "--feather", 6, "--output", out, "--metadata")
    assert r.exit_code == 0, r.output
    src = Image.open(photos / "astronaut.png").convert("RGB")
    res = Image.open(out)
    assert res.size == src.size
    text = res.text
    assert text["prompt"] == "a red hat" and text["seed"] == "1" and text["steps"] == "2"
    assert text["guidance"] == "30.0" and text["mlx_edit_version"] == mlx_edit.__version__
    assert text["model"] == str(tiny_mlx)
    # Pixels outside the grown + feathered mask are the input's, bit for bit.
    mask = np.asarray(Image.open(photos / "mask.png"), np.float32) / 255
    outside = blend_mask(mask, 4, 6) == 0
    a, b = np.asarray(res.convert("RGB")), np.asarray(src)
    assert outside.sum() > 0.5 * outside.size
    assert np.array_equal(a[outside], b[outside])
    assert not np.array_equal(a[mask > 0], b[mask > 0])  # something was painted
    sidecar = json.loads((tmp_path / "out.json").read_text())
    assert sidecar["seed"] == 1 and "denoise_s" in sidecar["stats"]


def test_outpaint_end_to_end(tiny_mlx, photos, tmp_path):
    out = tmp_path / "wider.png"
    r = invoke("outpaint", "--model", tiny_mlx, "--image", photos / "coffee.jpg",
               "--prompt", "a kitchen table", "--left", 40, "--bottom", 23, "--steps", 2,
               "--seed", 3, "--overlap", 16, "--output", out)
    assert r.exit_code == 0, r.output
    src = np.asarray(Image.open(photos / "coffee.jpg").convert("RGB"))
    res = np.asarray(Image.open(out).convert("RGB"))
    assert res.shape == (190 + 23, 250 + 40, 3)
    # The original, away from the regenerated seam band, is untouched.
    inner = res[0 : 190 - 16, 40 + 16 :]
    assert np.array_equal(inner, src[0 : 190 - 16, 16:])


def test_batch_writes_numbered_outputs(tiny_mlx, photos, tmp_path):
    out = tmp_path / "many.png"
    r = invoke("inpaint", "--model", tiny_mlx, "--image", photos / "astronaut.png",
               "--mask", photos / "mask.png", "--prompt", "x", "--steps", 1, "--seed", 7,
               "--num-images", 2, "--output", out)
    assert r.exit_code == 0, r.output
    seeds = [Image.open(tmp_path / f"many-{i}.png").text["seed"] for i in range(2)]
    assert seeds == ["7", "8"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "missing.png", "--mask", "mask.png"], "image file not found"),
        (["--image", "notes.txt", "--mask", "mask.png"], "image"),
        (["--image", "astronaut.png", "--mask", "empty.png"], "mask is empty"),
        (["--image", "astronaut.png", "--mask", "mask.png", "--steps", "0"], "--steps"),
        (["--image", "astronaut.png", "--mask", "mask.png", "--strength", "1.5"], "--strength"),
    ],
)
def test_inpaint_bad_input_is_a_usage_error(tiny_mlx, photos, tmp_path, args, message):
    (photos / "notes.txt").write_text("not an image")
    args = [str(photos / a) if a.endswith((".png", ".txt")) else a for a in args]
    out = tmp_path / "never.png"
    r = invoke("inpaint", "--model", tiny_mlx, "--prompt", "x", "--output", out, *args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not out.exists()


def test_outpaint_without_expansion_is_a_usage_error(tiny_mlx, photos, tmp_path):
    r = invoke("outpaint", "--model", tiny_mlx, "--image", photos / "coffee.jpg",
               "--prompt", "x", "--output", tmp_path / "o.png")
    assert r.exit_code == 2 and "at least one of left/right/top/bottom > 0" in r.output


def test_existing_output_and_input_are_never_overwritten(tiny_mlx, photos, tmp_path):
    out = tmp_path / "exists.png"
    out.write_bytes(b"keep me")
    r = invoke("inpaint", "--model", tiny_mlx, "--image", photos / "astronaut.png",
               "--mask", photos / "mask.png", "--prompt", "x", "--output", out)
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert out.read_bytes() == b"keep me"
    src = photos / "astronaut.png"
    before = src.read_bytes()
    r = invoke("inpaint", "--model", tiny_mlx, "--image", src, "--mask", photos / "mask.png",
               "--prompt", "x", "--output", src, "--overwrite")
    assert r.exit_code == 2 and "input" in r.output
    assert src.read_bytes() == before


def test_model_without_fill_transformer_is_named(photos, tmp_path):
    r = invoke("inpaint", "--model", tmp_path, "--image", photos / "astronaut.png",
               "--mask", photos / "mask.png", "--prompt", "x", "--output", tmp_path / "o.png")
    assert r.exit_code == 2 and "transformer" in r.output


def test_prompt_over_the_token_limit(tiny_mlx, photos, tmp_path):
    r = invoke("inpaint", "--model", tiny_mlx, "--image", photos / "astronaut.png",
               "--mask", photos / "mask.png", "--prompt", "word " * 600, "--steps", 1,
               "--output", tmp_path / "o.png")
    assert r.exit_code == 2 and "T5 tokens" in r.output
    assert not (tmp_path / "o.png").exists()


def tiny_axes(infer):
    return lambda tensors, axes=None: infer(tensors, (4, 4, 8))


def test_bfl_single_file_transformer_gives_the_same_edit(tiny_mlx, photos, tmp_path,
                                                         monkeypatch):
    """--transformer flux1-fill-dev.safetensors (BFL layout) == the diffusers folder."""
    import mlx_edit.weights.flux as wf

    outs = []
    for extra in ([], ["--transformer", tiny_mlx / "flux1-fill-dev.safetensors"]):
        out = tmp_path / f"o{len(outs)}.png"
        if extra:  # the tiny head_dim (16) needs its RoPE axes: BFL files carry no config
            monkeypatch.setattr(wf, "infer_bfl_config", tiny_axes(wf.infer_bfl_config))
        r = invoke("inpaint", "--model", tiny_mlx, "--image", photos / "astronaut.png",
                   "--mask", photos / "mask.png", "--prompt", "x", "--steps", 1, "--seed", 2,
                   "--output", out, *extra)
        assert r.exit_code == 0, r.output
        outs.append(np.asarray(Image.open(out)))
    assert np.array_equal(outs[0], outs[1])


def test_memory_estimate_refuses_before_any_work(tiny_mlx, photos, tmp_path, monkeypatch):
    """An edit whose estimate exceeds the machine's memory is refused with the options
    that would fit, before the prompt is encoded; nothing is written."""
    import mlx_edit.editing.memory as memory

    monkeypatch.setattr(memory, "available_memory", lambda: int(0.05e9))
    out = tmp_path / "never.png"
    r = invoke("inpaint", "--model", tiny_mlx, "--image", photos / "astronaut.png",
               "--mask", photos / "mask.png", "--prompt", "x", "--steps", 1, "--output", out)
    assert r.exit_code == 2, r.output
    assert "needs about" in r.output and "GB" in r.output
    assert not out.exists()


def test_keep_best_prints_only_the_written_paths(tiny_mlx, photos, tmp_path, monkeypatch):
    """--num-images 3 --rank clip --keep-best 2: two PNGs written, and only those printed
    (the ranker is stubbed: its CLIP is a parity fixture)."""
    import mlx_edit.editing.ranking
    import mlx_edit.weights.ranker

    def best(images, prompt, blend, *, keep_best=None, **kw):
        return images[::-1][:keep_best]
    monkeypatch.setattr(mlx_edit.editing.ranking, "rank_candidates", best)
    # the ranker folder is checked before the edit (issue 30): stubbed with the ranking
    monkeypatch.setattr(mlx_edit.weights.ranker, "resolve_ranker", lambda *a: tmp_path)
    monkeypatch.setattr(mlx_edit.weights.ranker, "check_ranker_folder", lambda folder: None)
    r = invoke("inpaint", "--model", tiny_mlx, "--image", photos / "astronaut.png",
               "--mask", photos / "mask.png", "--prompt", "x", "--steps", 1, "--seed", 3,
               "-n", 3, "--rank", "clip", "--keep-best", 2, "--output", tmp_path / "o.png")
    assert r.exit_code == 0, r.output
    printed = [line for line in r.stdout.splitlines() if line.endswith(".png")]
    assert printed == [str(tmp_path / "o-0.png"), str(tmp_path / "o-1.png")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o-0.png", "o-1.png"]


def test_edit_with_a_fill_model_names_the_kontext_model(tiny_mlx, photos, tmp_path):
    r = invoke("edit", "--model", tiny_mlx, "--image", photos / "astronaut.png",
               "--instruction", "x", "--output", tmp_path / "o.png")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert ("holds a FLUX.1 Fill transformer" in r.output and "edit needs a FLUX.1 Kontext "
            "model (black-forest-labs/FLUX.1-Kontext-dev)" in r.output), r.output
