"""Image prompts end to end on real photos: inpaint with an IP-Adapter and/or Redux on the
tiny random FLUX Fill checkpoint plus the image-prompt fixtures, and the CLI options.

The edit goes through `FluxFill.prepare` -> `prepare_ip_adapters` / `prepare_redux` ->
`FluxFill.run`, the path `inpaint(..., ip_adapters=, redux=)` takes once wired.
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)

import json

import click
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage import data

from mlx_edit.imaging import masks
from mlx_edit.cli.errors import OneLineCommand
from mlx_edit.cli.conditioning import (
    conditioning_options,
    parse_ip_adapters,
    parse_redux,
    pop_conditioning,
)
from mlx_edit.conditioning.image_prompts import IPAdapterSpec, ReduxSpec, prepare_redux
from mlx_edit.imaging.images import load_image, load_mask
from mlx_edit.editing.pipeline import FluxFill
from conftest import import_script

fx = import_script("make_mlx_checkpoint")  # torch-free image-prompt fixtures


@pytest.fixture(scope="module")
def setup(tiny_mlx, tmp_path_factory):
    root = tmp_path_factory.mktemp("image-prompts")
    cfg = json.loads((tiny_mlx / "transformer" / "config.json").read_text())
    extras = fx.write_image_prompt_fixtures(root / "extras", cfg, "tiny", seed=3)
    astronaut = Image.fromarray(data.astronaut()).resize((301, 257))
    astronaut.save(root / "astronaut.png")
    Image.fromarray(data.coffee()).save(root / "coffee.jpg", quality=95)
    Image.fromarray(data.chelsea()).save(root / "chelsea.png")
    mask = np.zeros((257, 301), np.uint8)
    mask[60:140, 100:190] = 255
    Image.fromarray(mask).save(root / "mask.png")
    pipe = FluxFill.from_pretrained(tiny_mlx, dtype=mx.float32)
    return pipe, extras, root


def inpaint(pipe, root, ip=(), redux=(), num_images=1, seed=1):
    image = load_image(root / "astronaut.png")
    mask = load_mask(root / "mask.png", image.size)
    blend = masks.blend_mask(mask, 0, 6)
    job = pipe.prepare(image, mask, blend, "a cup of coffee", steps=2, guidance=30.0,
                       seed=seed, num_images=num_images, strength=1.0, crop_to_mask=None,
                       prompt_2=None, max_sequence_length=32, ip_adapters=ip, redux=redux)
    out = pipe.run(job)
    return [np.asarray(im.convert("RGB")) for im in out], blend, job


def test_inpaint_with_ip_adapter_on_photos(setup):
    pipe, extras, root = setup
    base, blend, _ = inpaint(pipe, root)
    ref = root / "coffee.jpg"
    with_ip, _, job = inpaint(pipe, root, [IPAdapterSpec(extras["ip-adapter"], ref, 1.0)])
    zero, _, _ = inpaint(pipe, root, [IPAdapterSpec(extras["ip-adapter"], ref, 0.0)])
    src = np.asarray(load_image(root / "astronaut.png"))
    assert with_ip[0].shape == src.shape
    outside, inside = blend == 0, blend == 1
    assert np.array_equal(with_ip[0][outside], src[outside])  # pasted back exactly
    assert np.abs(with_ip[0][inside].astype(int) - base[0][inside]).mean() > 1.0
    assert np.array_equal(zero[0], base[0])  # scale 0: the adapter adds exactly nothing
    assert len(job.ip) == 1 and len(job.ip[0].k) == len(pipe.transformer.double_blocks)


def test_ip_adapter_and_redux_together_batch_of_two(setup):
    pipe, extras, root = setup
    base, blend, _ = inpaint(pipe, root, num_images=2)
    ip = [IPAdapterSpec(extras["ip-adapter"], [root / "coffee.jpg", root / "chelsea.png"],
                        [0.7])]  # per-block list: the tiny model has 1 double block
    redux = [ReduxSpec(extras["redux"], root / "chelsea.png", 0.8)]
    both, _, job = inpaint(pipe, root, ip, redux, num_images=2)
    assert job.embeds.txt.shape == (1, 32 + 729, 32)
    assert job.ip[0].k[0].shape[0] == 2 and job.ip[0].k[0].shape[2] == 8  # 2 images x 4
    inside = blend == 1
    for a, b in zip(both, base):
        assert np.abs(a[inside].astype(int) - b[inside]).mean() > 1.0
    assert not np.array_equal(both[0], both[1])  # seeds 1 and 2


def test_outpaint_with_redux(setup):
    pipe, extras, root = setup
    from mlx_edit.imaging.stitch import outpaint_canvas

    image = Image.fromarray(data.coffee()).resize((96, 64))
    canvas, model_mask, blend = outpaint_canvas(image, 32, 0, 0, 16, overlap=8)
    job = pipe.prepare(canvas, model_mask, blend, "a table", steps=1, guidance=30.0, seed=0,
                       num_images=1, strength=1.0, crop_to_mask=None, prompt_2=None,
                       max_sequence_length=16)
    job.embeds = prepare_redux(pipe.job_context(job), [ReduxSpec(extras["redux"], root / "astronaut.png")],
                               job.embeds)
    out = np.asarray(pipe.run(job)[0])
    assert out.shape == (64 + 16, 96 + 32, 3)


# ---------------------------------------------------------------- CLI options


@click.command(cls=OneLineCommand)
@conditioning_options
def _command(**opts):
    extra = pop_conditioning(opts)
    assert extra.pop("controlnets") == []
    assert not opts
    click.echo(json.dumps({k: [[str(s.model), str(s.image), getattr(s, "scale", None),
                                getattr(s, "strength", None)] for s in v]
                           for k, v in extra.items()}))


def test_cli_options_pair_adapters_and_images(setup):
    _, _, root = setup
    a, c = str(root / "astronaut.png"), str(root / "coffee.jpg")
    r = CliRunner().invoke(_command, ["--ip-adapter", "A", "--ip-image", a, "--ip-adapter", "B",
                                      "--ip-image", c, "--ip-scale", "0.5",
                                      "--ip-scale", "0,1,0.5", "--redux", "R",
                                      "--redux-image", a, "--redux-image", c,
                                      "--redux-strength", "0.3"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert got["ip_adapters"] == [["A", a, 0.5, None], ["B", c, [0.0, 1.0, 0.5], None]]
    assert got["redux"] == [["R", a, None, 0.3], ["R", c, None, 0.3]]
    one = parse_ip_adapters(["A"], [a, c])  # one adapter, two images: one spec
    assert len(one) == 1 and one[0].image == [a, c] and one[0].scale == 1.0
    r = CliRunner().invoke(_command, ["--help"])
    for name in ("--ip-adapter", "--ip-image", "--ip-scale", "--redux", "--redux-image",
                 "--redux-strength"):
        assert name in r.output


@pytest.mark.parametrize("args, message", [
    (["--ip-adapter", "A"], "--ip-adapter needs at least one --ip-image"),
    (["--ip-image", "{a}"], "--ip-image given without --ip-adapter"),
    (["--ip-adapter", "A", "--ip-adapter", "B", "--ip-image", "{a}"], "2 --ip-adapter for 1"),
    (["--ip-adapter", "A", "--ip-image", "{a}", "--ip-scale", "x"], "expected a number"),
    (["--ip-adapter", "A", "--ip-image", "missing.png"], "--ip-image missing.png does not"),
    (["--ip-adapter", "A", "--ip-image", "{a}", "--ip-scale", "1", "--ip-scale", "2"],
     "--ip-scale given 2 times for 1 --ip-adapter"),
    (["--redux", "R", "--redux-image", "{a}", "--redux-strength", "-1"], ">= 0"),
    (["--redux", "R", "--redux", "S", "--redux", "T", "--redux-image", "{a}",
      "--redux-image", "{a}"], "3 --redux for 2 --redux-image"),
])
def test_cli_option_errors_are_one_line(setup, args, message):
    _, _, root = setup
    args = [x.format(a=root / "astronaut.png") for x in args]
    r = CliRunner().invoke(_command, args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert len(r.output.strip().splitlines()) == 1 and r.output.startswith("Error: ")


def test_parse_redux_defaults():
    assert parse_redux([], []) == []
    with pytest.raises(click.UsageError, match="--redux needs"):
        parse_redux(["R"], [])


def test_cli_inpaint_with_ip_adapter_on_photos(setup, tiny_mlx, tmp_path):
    """mlx-edit inpaint --ip-adapter DIR --ip-image REF: one photo edited, another as reference."""
    from click.testing import CliRunner

    from mlx_edit.cli import main

    _, extras, root = setup
    outs = []
    for scale in ("1.0", "0.0"):
        out = tmp_path / f"ip{scale}.png"
        args = ["inpaint", "--model", tiny_mlx, "--image", root / "astronaut.png", "--mask",
                root / "mask.png", "--prompt", "a cup of coffee", "--steps", 2, "--seed", 1,
                "--max-sequence-length", 32, "--ip-adapter", extras["ip-adapter"],
                "--ip-image", root / "coffee.jpg", "--ip-scale", scale, "--output", out]
        r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        outs.append(np.asarray(Image.open(out).convert("RGB")))
        assert Image.open(out).text["ip_adapters"]
    src = np.asarray(load_image(root / "astronaut.png"))
    mask = load_mask(root / "mask.png", (301, 257))
    outside = masks.blend_mask(mask, 0, 8) == 0
    assert outs[0].shape == src.shape
    assert np.array_equal(outs[0][outside], src[outside])
    assert np.abs(outs[0][mask > 0.5].astype(int) - outs[1][mask > 0.5]).mean() > 1.0
