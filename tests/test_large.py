"""Large canvases through the pipeline and the CLI (mlx_edit.editing.large, tiled denoising):
one window equals the plain edit exactly, outside-mask pixels stay exact with several
windows, a 4K outpaint's strip is generated at its own resolution, and the CLI runs
windowed edits in bounded memory. Tiny fixture, 2 steps, short T5 sequences; the
"large" photos are skimage photos upscaled, with a small model-size budget so the
windows stay cheap on the CPU (the geometry is the same as a 4K photo under 1 MP)."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage import data

from mlx_edit.editing import large
from mlx_edit.cli import main
from mlx_edit.imaging.images import InputError
from mlx_edit.options import EditOptions
from mlx_edit.editing.pipeline import FluxFill

FAST = dict(steps=2, seed=3, max_sequence_length=16)
BUDGET = 256 * 256  # the smallest budget: 16 x 16 token windows


class Stop(InputError):
    """Raised once the test has seen the planned windows."""


@pytest.fixture(scope="module")
def pipe(tiny_mlx):
    return FluxFill.from_pretrained(tiny_mlx)


def photo(w: int, h: int) -> Image.Image:
    return Image.fromarray(data.astronaut()).resize((w, h), Image.LANCZOS)


def half_mask(w: int, h: int) -> np.ndarray:
    m = np.zeros((h, w), np.float32)
    m[:, : w // 2] = 1
    return m


def test_one_window_covering_the_canvas_equals_the_plain_edit(pipe):
    img, mask = photo(160, 96), half_mask(160, 96)
    plain = pipe.inpaint(img, mask, "x", tile_mode="off", **FAST)[0]
    one = pipe.inpaint(img, mask, "x", tile_mode="on", **FAST)[0]
    assert json.loads(one.info["windows"].replace("'", '"'))["count"] == 1
    assert "windows" not in plain.info  # None is not recorded
    np.testing.assert_array_equal(np.asarray(one), np.asarray(plain))


def test_windowed_inpaint_keeps_outside_pixels_and_full_resolution(pipe):
    img, mask = photo(512, 288), half_mask(512, 288)
    out = pipe.inpaint(img, mask, "x", tile_mode="on", max_model_pixels=BUDGET,
                       tile_overlap=64, crop_to_mask=False, **FAST)[0]
    info = out.info
    windows = json.loads(info["windows"].replace("'", '"'))
    assert windows["count"] > 1 and windows["size"][0] * windows["size"][1] <= BUDGET
    assert json.loads(info["model_size"]) == [512, 288]  # the photo's own resolution
    _, blend = pipe.edit_masks(mask, EditOptions())
    keep = blend == 0
    np.testing.assert_array_equal(np.asarray(out)[keep], np.asarray(img)[keep])
    assert not np.array_equal(np.asarray(out)[~keep], np.asarray(img)[~keep])


def test_4k_outpaint_strip_is_generated_at_full_resolution(pipe, monkeypatch):
    """The model canvas of a 3840x2160 outpaint by 1024 px is the edit window at its own
    pixel count (windows of ~1 MP), where tile_mode off shrinks it to ~1 MP."""
    seen = []
    real = large.job_windows

    def record(p, plan, o, keep=None, *references):
        seen.append((plan, real(p, plan, o, keep, *references)))
        raise Stop("seen")
    monkeypatch.setattr(large, "job_windows", record)
    img = Image.new("RGB", (3840, 2160), (90, 120, 150))
    for mode in ("on", "off"):
        with pytest.raises(Stop):
            pipe.outpaint(img, "x", right=1024, tile_mode=mode, **FAST)
    (tiled, windows), (shrunk, none) = seen
    x0, y0, x1, y1 = tiled.box
    assert x1 == 3840 + 1024 and x1 - x0 >= 1024 + 32  # the strip and its seam band
    assert not tiled.resized and tiled.model_size == (-(-(x1 - x0) // 16) * 16,
                                                      -(-(y1 - y0) // 16) * 16)
    assert large.generated_ratio(tiled, windows) == 1.0
    gh, gw = tiled.model_size[1] // 16, tiled.model_size[0] // 16
    assert windows.grid == (gh, gw) and windows.count > 4
    assert windows.tokens <= 1024 * 1024 // 256 and windows.tokens > 0.9 * 4096
    np.testing.assert_allclose(windows.coverage()[windows.covered], 1.0, atol=1e-6)
    assert windows.covered[:, -1024 // 16:].all()  # the strip; windows far from it skipped
    assert none is None and shrunk.box == tiled.box and shrunk.resized
    assert large.generated_ratio(shrunk, none) < 0.4  # what windows avoid


def test_auto_falls_back_to_shrinking_with_a_step_cache():
    o = EditOptions(cache="fbc:0.1")
    assert not large.tiles_allowed(o)
    with pytest.raises(InputError, match="tile_mode on cannot run with a step cache"):
        EditOptions(cache="fbc:0.1", tile_mode="on")
    with pytest.raises(InputError, match="tile_mode must be one of"):
        EditOptions(tile_mode="always")
    with pytest.raises(InputError, match="max_model_pixels"):
        EditOptions(max_model_pixels=100)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    photo(512, 288).save(folder / "big.jpg", quality=92)
    Image.fromarray((half_mask(512, 288) * 255).astype(np.uint8)).save(folder / "half.png")
    return folder


@pytest.mark.parametrize("command", ["outpaint", "inpaint"])
def test_cli_windowed_edits_run_in_bounded_memory(tiny_mlx, big, tmp_path, command):
    out = tmp_path / "out.png"
    extra = ["--right", "256"] if command == "outpaint" else ["--mask", big / "half.png",
                                                             "--no-crop-to-mask"]
    r = CliRunner().invoke(main, [
        command, "--model", str(tiny_mlx), "--image", str(big / "big.jpg"), "--prompt", "x",
        "--tile-mode", "on", "--max-model-pixels", str(BUDGET), "--steps", "2",
        "--max-sequence-length", "16", "--seed", "1", "--output", str(out), "--metadata",
        *map(str, extra)])
    assert r.exit_code == 0, r.output
    meta = json.loads(out.with_suffix(".json").read_text())
    windows = meta["windows"]  # the sidecar keeps JSON values
    assert windows["count"] > 1
    assert Image.open(out).size == ((512 + 256) if command == "outpaint" else 512, 288)
    # one window batch + the canvas latents: far under a GB with the tiny model
    assert meta["stats"]["denoise_peak_gb"] < 0.5


def test_detail_pass_refines_the_shrunk_edit_at_full_resolution(pipe):
    img, mask = photo(512, 288), half_mask(512, 288)
    out = pipe.inpaint(img, mask, "x", max_model_pixels=BUDGET, detail_pass=0.4, **FAST)[0]
    info = out.info
    first = json.loads(info["first_pass_model_size"])
    assert first[0] * first[1] <= 1.1 * BUDGET  # the first pass was shrunk
    assert json.loads(info["model_size"]) == [512, 288]  # the refinement was not
    assert float(info["detail_pass"]) == 0.4 and float(info["strength"]) == 0.4
    assert json.loads(info["windows"].replace("'", '"'))["count"] > 1
    _, blend = pipe.edit_masks(mask, EditOptions())
    keep = blend == 0
    np.testing.assert_array_equal(np.asarray(out)[keep], np.asarray(img)[keep])


def test_two_pass_options():
    assert large.refine_strength(EditOptions()) is None
    assert large.refine_strength(EditOptions(global_pass=True)) == 0.5
    assert large.refine_strength(EditOptions(global_pass=True, detail_pass=0.3)) == 0.3
    first = large.first_pass(EditOptions(global_pass=True, detail_pass=0.3))
    assert (first.tile_mode, first.detail_pass, first.global_pass) == ("off", 0.0, False)
    with pytest.raises(InputError, match="need tile_mode auto or on"):
        EditOptions(detail_pass=0.3, tile_mode="off")


def test_cli_global_pass_outpaint(tiny_mlx, big, tmp_path):
    out = tmp_path / "out.png"
    r = CliRunner().invoke(main, [
        "outpaint", "--model", str(tiny_mlx), "--image", str(big / "big.jpg"), "--prompt",
        "x", "--right", "256", "--global-pass", "--max-model-pixels", str(BUDGET),
        "--steps", "2", "--max-sequence-length", "16", "--seed", "1", "--output", str(out),
        "--metadata"])
    assert r.exit_code == 0, r.output
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["global_pass"] is True and meta["detail_pass"] == 0.5
    assert Image.open(out).size == (768, 288)
    orig = np.asarray(Image.open(big / "big.jpg").convert("RGB"))
    np.testing.assert_array_equal(np.asarray(Image.open(out))[:, :512 - 32], orig[:, :512 - 32])


@pytest.fixture(scope="module")
def kontext(tmp_path_factory, import_script):
    from mlx_edit.editing.kontext import FluxKontext

    out = tmp_path_factory.mktemp("kontext") / "tiny"
    ckpt = import_script("make_mlx_checkpoint").build(out, "tiny", extras=("kontext-model",))
    return FluxKontext.from_pretrained(ckpt / "kontext-model")


def test_kontext_with_a_mask_uses_windows_and_keeps_outside_pixels(kontext):
    img, mask = photo(512, 288), half_mask(512, 288)
    out = kontext.edit(img, "x", mask=mask, keep_size=True, auto_resize=False,
                       max_model_pixels=BUDGET, **FAST)[0]
    assert json.loads(out.info["windows"].replace("'", '"'))["count"] > 1
    assert json.loads(out.info["model_size"]) == [512, 288]
    _, blend = kontext.edit_masks(mask, EditOptions())
    keep = blend == 0
    np.testing.assert_array_equal(np.asarray(out)[keep], np.asarray(img)[keep])
    unmasked = kontext.edit(img, "x", keep_size=True, auto_resize=False,
                            max_model_pixels=BUDGET, **FAST)[0]
    assert "windows" not in unmasked.info  # auto: an instruction edit is not split


def test_memory_estimate_counts_one_window_batch_plus_the_canvas():
    from mlx_edit.editing import memory
    from mlx_edit.models.flux import FluxConfig

    cfg, size = FluxConfig(), 4  # FLUX.1 Fill, float32
    whole = memory.estimate(4096, 2304)
    tiled = [memory.estimate(4096, 2304, window=(4080, k)) for k in (1, 2)]
    canvas = memory.canvas_latents_gb(256 * 144, cfg, 1, size)
    for k, est in zip((1, 2), tiled):
        want = memory.transformer_activation_gb(4080 + 512, cfg, k, size) + canvas
        assert est["activations_denoise"] == pytest.approx(want)
    assert tiled[0]["activations_denoise"] < tiled[1]["activations_denoise"] \
        < whole["activations_denoise"] / 10
    assert canvas < 0.1  # latents, noise, conditioning, accumulator: ~10 MB per MP


def _launch(n: int, script: str, *args, env: dict | None = None, timeout: int = 300):
    """`mlx.launch --backend ring -n n` of tests/`script` on localhost (a port of its own:
    agents share this machine), or the script alone for n = 0; the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": str(Path(mlx_edit.__file__).parents[1]), **(env or {})}
    port = 20000 + (os.getpid() * 7 + n * 101 + len(args)) % 20000
    launch = [] if n == 0 else ["mlx.launch", "--backend", "ring", "-n", str(n),
                                "--starting-port", str(port), "--python"]
    return subprocess.run([*launch, sys.executable, str(Path(__file__).with_name(script)),
                           *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


EDITS = ("inpaint", "outpaint", "inpaint_controlnet", "outpaint_controlnet", "kontext_cfg",
         "kontext_cfg_windows")


@pytest.fixture(scope="module")
def one_process(import_script, tmp_path_factory):
    """tests/ranks_edits.py's edits in one process: the results ranks must equal."""
    model = tmp_path_factory.mktemp("ranks") / "tiny"
    import_script("make_mlx_checkpoint").build(model, "tiny",
                                               extras=("controlnet", "kontext-model"))
    out = model.parent / "one"
    r = _launch(0, "ranks_edits.py", model, out, *EDITS)
    assert r.returncode == 0, r.stderr
    return model, out


def _same(one: Path, many: Path, case: str) -> dict:
    """Rank 0's latents and PNG of `case` equal one process's bit for bit; its metadata."""
    a, b = (np.load(d / f"{case}.npy") for d in (one, many))
    assert np.array_equal(a, b), (case, np.abs(a - b).max() / np.abs(a).max())
    assert np.array_equal(*(np.asarray(Image.open(d / f"{case}.png")) for d in (one, many)))
    assert json.loads((one / f"{case}.json").read_text())["ranks"] is None
    return json.loads((many / f"{case}.json").read_text())


@pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch not installed")
def test_three_ranks_give_one_process_results(one_process, tmp_path):
    """`mlx.launch -n 3`: inpaint and outpaint with and without ControlNet, Kontext true
    CFG with windows (4 windows split 2+1+1; each rank both branches of its windows) and
    without (the branches split; rank 2 idle): the latents and PNGs of one process, bit
    for bit (each rank's updates gathered and added in window order; window_batch 1: a
    batch of other windows rounds its matrix products otherwise)."""
    model, one = one_process
    r = _launch(3, "ranks_edits.py", model, tmp_path, *EDITS)
    assert r.returncode == 0, r.stdout + r.stderr
    for case in EDITS:
        meta = _same(one, tmp_path, case)["ranks"]
        if case == "kontext_cfg":
            assert meta == {"count": 3, "split": "true_cfg",
                            "per_rank": ["prompt", "negative_prompt", ""]}
        else:
            assert meta == {"count": 3, "split": "windows", "per_rank": [2, 1, 1]}


@pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch not installed")
def test_two_ranks_split_true_cfg_and_windows(one_process, tmp_path):
    """`mlx.launch -n 2`: true CFG's branches on two ranks (conditional on rank 0,
    unconditional on rank 1) and a windowed inpaint (2+2): one process's results."""
    model, one = one_process
    r = _launch(2, "ranks_edits.py", model, tmp_path, "kontext_cfg", "inpaint")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _same(one, tmp_path, "kontext_cfg")["ranks"]["per_rank"] == ["prompt",
                                                                        "negative_prompt"]
    assert _same(one, tmp_path, "inpaint")["ranks"]["per_rank"] == [2, 2]


def _errors(text: str) -> list[str]:
    """The one-line errors in `text` (the ranks' stderr, progress bars interleaved)."""
    return re.findall(r"Error: [^\r\n]*", text)


@pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch not installed")
@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_lost_rank_ends_the_windowed_edit_without_output(tiny_mlx, big, tmp_path, mode):
    """Rank 1 dies at its first exchange, or hangs at its second (tests/ranks_die.py):
    rank 0 ends with one line, status 2 (the ring's lost connection; the watchdog after
    MLX_EDIT_RANK_TIMEOUT plus twice its own step; or mlx.launch's SIGTERM once rank 1
    exited), within the timeout, and no output is written. (mlx.launch itself exits 0,
    and its notes of the ranks' statuses race with its SIGTERM: not asserted.)"""
    out = tmp_path / "out.png"
    env = {"RANKS_DIE_MODE": mode, "RANKS_DIE_AT": "1" if mode == "die" else "2",
           "MLX_EDIT_RANK_TIMEOUT": "3"}
    r = _launch(2, "ranks_die.py", "outpaint", "--model", tiny_mlx, "--image",
                big / "big.jpg", "--right", "256", "--prompt", "x", "--tile-mode", "on",
                "--max-model-pixels", BUDGET, "--steps", "3", "--max-sequence-length", "16",
                "--output", out, env=env, timeout=120)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    errors = _errors(r.stderr)
    want = "another rank of the run ended" if mode == "die" else "no answer from the other"
    first = [e for e in errors if e.startswith("Error: rank 0: ")]
    assert len(first) == 1 and want in first[0], r.stderr  # rank 0: one line
