"""What the entry points actually build (issue 13 item 7): the model mask, the blend mask
with the full feather radius, the crop window's context margin around a large mask, the
text lengths, and the CLI's options equal to the library's. Each test stops the edit at
the first expensive step (a sentinel) and compares what reached it with what the
documented rules give, so a mis-wired pipeline (half the feather, no crop margin, a
dropped option) fails here even when every core function is right."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mlx_edit.cli import main
from mlx_edit.cli.main import mode_fields
from mlx_edit.imaging import masks
from mlx_edit.imaging.images import InputError
from mlx_edit.imaging.stitch import outpaint_canvas
from mlx_edit.options import FIELDS, EditOptions, default
from mlx_edit.editing.pipeline import FluxFill


class Stop(InputError):
    """Raised where the test has seen what it needs (an InputError: the CLI exits 2)."""


@pytest.fixture(scope="module")
def pipe(tiny_mlx):
    return FluxFill.from_pretrained(tiny_mlx)


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(2)
    return Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))


def _mask(shape, box):
    m = np.zeros(shape, np.float32)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 1
    return m


@pytest.fixture
def seen_prepare(monkeypatch):
    """FluxFill.prepare records its arguments, then stops."""
    seen = {}

    def prepare(self, image, model_mask, blend, prompt, options=None, **kw):
        seen.update(image=image, model_mask=model_mask, blend=blend, prompt=prompt,
                    options=options, **kw)
        raise Stop("seen")
    monkeypatch.setattr(FluxFill, "prepare", prepare)
    return seen


def test_inpaint_builds_grown_model_mask_and_full_feather_blend(pipe, photo, seen_prepare):
    mask = _mask((96, 128), (40, 30, 80, 60))
    with pytest.raises(Stop):
        pipe.inpaint(photo, mask, "x", grow_mask=5, feather=7, steps=3)
    assert np.array_equal(seen_prepare["model_mask"], masks.grow_mask(mask, 5))
    assert np.array_equal(seen_prepare["blend"], masks.blend_mask(mask, 5, 7))
    # the blend reaches past the grown mask by the whole feather (not half of it)
    grown = masks.grow_mask(mask, 5) > 0
    assert (seen_prepare["blend"][grown] == 1).all()
    reach = np.argwhere(seen_prepare["blend"][45] > 0)[:, 0]
    assert reach.min() <= 40 - 5 - 7 and reach.max() >= 80 + 5 + 7 - 1
    opts = seen_prepare["options"]
    assert (opts.steps, opts.grow_mask, opts.feather, opts.guidance) == (3, 5, 7, 30.0)


def test_restyle_with_mask_builds_the_same_masks(pipe, photo, seen_prepare, monkeypatch):
    monkeypatch.setattr(type(pipe.models), "variant", property(lambda self: "control"))
    mask = _mask((96, 128), (10, 10, 50, 40))
    with pytest.raises(Stop):
        pipe.restyle(photo, None, "x", mask=mask, grow_mask=3, feather=6)
    assert np.array_equal(seen_prepare["model_mask"], masks.grow_mask(mask, 3))
    assert np.array_equal(seen_prepare["blend"], masks.blend_mask(mask, 3, 6))
    assert seen_prepare["options"].guidance == 30.0 and callable(seen_prepare["conditioning"])
    with pytest.raises(Stop):
        pipe.restyle(photo, photo, "x", control_type="depth")
    assert seen_prepare["options"].guidance == 10.0  # BFL's depth default
    assert (seen_prepare["blend"] == 1).all()  # no mask: the whole image


def test_outpaint_builds_the_documented_canvas(pipe, photo, seen_prepare):
    with pytest.raises(Stop):
        pipe.outpaint(photo, "x", left=16, bottom=8, overlap=12)
    canvas, model_mask, blend = outpaint_canvas(photo, 16, 0, 0, 8, overlap=12)
    assert seen_prepare["image"].size == canvas.size == (128 + 16, 96 + 8)
    assert np.array_equal(seen_prepare["model_mask"], model_mask)
    assert np.array_equal(seen_prepare["blend"], blend)


def test_large_mask_gets_a_context_margin(pipe, monkeypatch):
    """A large photo with a large mask: the model window holds the mask's bbox plus
    max(64, half its longer side) of context on each side (clamped to the photo)."""
    import mlx_edit.editing.large as pl  # where the pipeline's crop plan is made

    plans = []
    real = pl.plan_crop
    monkeypatch.setattr(pl, "plan_crop", lambda *a, **k: plans.append(real(*a, **k)) or plans[-1])
    monkeypatch.setattr(type(pipe.models), "memory_estimate",
                        lambda self, *a, **k: (_ for _ in ()).throw(Stop("planned")))
    image = Image.new("RGB", (3000, 2000), (90, 120, 150))
    mask = _mask((2000, 3000), (1200, 800, 1800, 1200))  # 600 x 400
    with pytest.raises(Stop):
        pipe.inpaint(image, mask, "x", feather=0)
    x0, y0, x1, y1 = plans[-1].box
    margin = 0.5 * 600
    assert x0 <= 1200 - margin and x1 >= 1800 + margin
    assert y0 <= 800 - margin and y1 >= 1200 + margin
    assert plans[-1].cropped


def test_text_lengths_reach_the_encoders(pipe, photo, monkeypatch):
    seen = {}

    def encode(self, prompt, prompt_2=None, max_sequence_length=512):
        seen.update(prompt=prompt, prompt_2=prompt_2, length=max_sequence_length)
        raise Stop("encoded")
    with monkeypatch.context() as m:
        m.setattr(type(pipe.prompts), "encode", encode)
        with pytest.raises(Stop):
            pipe.inpaint(photo, _mask((96, 128), (0, 0, 64, 64)), "a cat", prompt_2="a dog",
                         max_sequence_length=77)
    assert seen == {"prompt": "a cat", "prompt_2": "a dog", "length": 77}
    embeds = pipe.encode_prompt("a cat", max_sequence_length=24)
    assert embeds.txt.shape[1] == 24 and embeds.pooled.shape[0] == 1


@pytest.mark.parametrize("command", ["inpaint", "outpaint", "restyle"])
def test_cli_defaults_are_the_librarys(command):
    params = {p.name: p for p in main.commands[command].params}
    fields = mode_fields(command)
    assert fields and all(f in params for f in fields)
    for name in fields:
        want = None if name == "seed" else default(name)  # the CLI's seed is random
        assert params[name].default == want, name
        assert FIELDS[name][1] in (params[name].help or ""), name


@pytest.fixture
def seen_cli(monkeypatch, tiny_mlx):
    """`mlx-edit` runs up to the edit call and records what it passes."""
    seen = {}

    class Recorder:
        def __getattr__(self, mode):
            def edit(*args, progress=None, **kw):
                seen.update(mode=mode, args=args, **kw)
                raise Stop("recorded")
            return edit
    monkeypatch.setattr(FluxFill, "from_pretrained", classmethod(lambda cls, *a, **k: Recorder()))
    return seen


def test_cli_builds_the_librarys_options(seen_cli, tmp_path, photo):
    photo.save(tmp_path / "p.png")
    Image.fromarray((_mask((96, 128), (10, 10, 60, 60)) * 255).astype(np.uint8)).save(
        tmp_path / "m.png")
    base = ["--image", str(tmp_path / "p.png"), "--prompt", "x", "--output",
            str(tmp_path / "o.png")]
    for mode, extra in (("inpaint", ["--mask", str(tmp_path / "m.png")]),
                        ("outpaint", ["--left", "8"]), ("restyle", [])):
        r = CliRunner().invoke(main, [mode, *base, *extra])
        assert r.exit_code == 2 and "recorded" in r.output, r.output
        opts = seen_cli["args"][-1]
        assert isinstance(opts, EditOptions) and seen_cli["mode"] == mode
        assert opts == EditOptions.from_dict(
            {"seed": opts.seed, **({"left": 8} if mode == "outpaint" else {})}, mode)
    r = CliRunner().invoke(main, ["inpaint", *base, "--mask", str(tmp_path / "m.png"),
                                  "--grow-mask", "3", "--feather", "5", "--no-paste-back",
                                  "-n", "2", "--seed", "11", "--max-sequence-length", "64"])
    opts = seen_cli["args"][-1]
    assert (opts.grow_mask, opts.feather, opts.paste_back, opts.num_images, opts.seed,
            opts.max_sequence_length) == (3, 5, False, 2, 11, 64)
    assert not (tmp_path / "o-0.png").exists()
