"""Progress for every phase (mlx_edit.progress): the events one edit sends, counted per
phase on the tiny fixture (no timings asserted), the CLI's bars and phase line, and the
stats that account for the wall time. Small photos, 1-2 steps."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

from collections import defaultdict

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage import data

from mlx_edit.cli.main import main
from mlx_edit.cli.progress import PhaseBars, phase_line
from mlx_edit.editing.pipeline import FluxFill
from mlx_edit.progress import PHASE_KEYS, phase_seconds, reporting
from mlx_edit.editing.segment import Points

FAST = dict(steps=2, seed=3, max_sequence_length=16)


class Recorder:
    """A progress callback that wants every phase: (phase, done, total) in order."""

    wants_phases = True

    def __init__(self):
        self.events: list[tuple[str, int, int]] = []

    def __call__(self, done, total, phase="denoise"):
        self.events.append((phase, done, total))

    def per_phase(self) -> dict[str, list[tuple[int, int]]]:
        out = defaultdict(list)
        for phase, done, total in self.events:
            out[phase].append((done, total))
        return out


def photo(w: int, h: int) -> Image.Image:
    return Image.fromarray(data.astronaut()).resize((w, h), Image.LANCZOS)


def test_every_phase_of_a_windowed_two_pass_click_edit_reports(tiny_mlx, tiny_sam_mlx):
    """Model load, SAM, text encoding, VAE tiles, windows x steps and the second pass
    each send events in order; the counts match the work (tiles, windows x steps)."""
    rec = Recorder()
    with reporting(rec):
        pipe = FluxFill.from_pretrained(tiny_mlx)
    pipe.models.tile_threshold_gb = 0.0  # every VAE pass in tiles (each reports)
    out = pipe.inpaint(photo(512, 288), [Points(((256, 144),))], "a hat", progress=rec,
                       segment_model=str(tiny_sam_mlx), grow_mask=24, detail_pass=0.5,
                       max_model_pixels=256 * 256, tile_overlap=32, crop_to_mask=False,
                       **FAST)[0]
    seen = rec.per_phase()
    names = [p for p, _, _ in rec.events]
    order = ["load", "segment", "text_encode", "vae_encode", "denoise", "vae_decode",
             "paste_back", "refine text_encode", "refine vae_encode", "refine denoise",
             "refine vae_decode", "refine paste_back"]
    assert [names.index(p) for p in order] == sorted(names.index(p) for p in order), names
    assert {"load_transformer", "load_vae"} <= set(seen)  # each model's weights
    windows = eval(out.info["windows"])["count"]  # the refined run's (noqa: S307)
    assert windows > 1
    done, total = seen["refine denoise"][-1]  # windows x steps (strength 0.5: 1 step)
    assert done == total and total % windows == 0
    for phase in ("vae_encode", "vae_decode", "refine vae_encode", "refine vae_decode"):
        done, total = seen[phase][-1]
        assert total >= 1 and done == total, (phase, seen[phase])  # every tile counted
    # the stats time each phase (SAM included) and add both passes
    stats = pipe.last_stats
    assert {"segment_s", "text_encode_s", "vae_encode_s", "denoise_s", "vae_decode_s",
            "paste_back_s", "load_s"} <= set(stats)
    assert phase_seconds(stats) == pytest.approx(sum(stats[k] for k in PHASE_KEYS if k in stats))


def test_untiled_vae_pass_reports_per_layer_and_is_unchanged(tiny_mlx):
    """A whole-image VAE pass reports after each block layer; its values are the plain
    pass's exactly."""
    import mlx.core as mx

    from mlx_edit.editing.tiling import decode_auto

    pipe = FluxFill.from_pretrained(tiny_mlx)
    z = mx.random.normal((1, 8, 12, pipe.vae_config.latent_channels), key=mx.random.key(0))
    rec = Recorder()
    with reporting(rec):
        got = decode_auto(pipe.vae, z, threshold_gb=100.0)
    steps = rec.per_phase()["vae_decode"]
    assert steps[0] == (0, steps[-1][1]) and steps[-1][0] == steps[-1][1] > 3
    np.testing.assert_array_equal(np.array(got), np.array(pipe.vae.decode(z)))


def test_phase_line_accounts_for_the_wall_time():
    stats = {"load_s": 1.0, "segment_s": 28.0, "text_encode_s": 0.5, "vae_encode_s": 2.0,
             "denoise_s": 4.0, "step_s": 2.0, "vae_decode_s": 3.0, "paste_back_s": 0.25,
             "denoise_peak_gb": 0.5}
    line = phase_line(stats, wall_s=40.0)
    assert "segment 28.0s" in line and "denoise 4.0s (2.00 s/step)" in line
    assert "other 1.2s  = total 40.0s" in line and "peak 0.50 GB" in line


def test_phase_bars_open_one_bar_per_phase(capsys):
    import io

    out = io.StringIO()
    bars = PhaseBars(file=out, delay=0)
    for event in [(0, 0, "load"), (0, 0, "vae_encode"), (0, 3, "vae_encode"),
                  (1, 3, "vae_encode"), (3, 3, "vae_encode"), (0, 4, "denoise"),
                  (4, 4, "denoise"), (0, 2, "vae_encode"), (2, 2, "vae_encode")]:
        bars(event[0], event[1], phase=event[2])
        opened = bars.bar
    bars.close()
    text = out.getvalue()
    assert text.count("vae_encode") >= 2 and "denoise: 100%" in text and "3/3" in text
    assert opened.total == 2  # a restarted count is a new bar


def test_cli_reports_every_phase_and_the_total(tmp_path, tiny_mlx, monkeypatch):
    import mlx_edit.cli.progress

    monkeypatch.setattr(mlx_edit.cli.progress, "BAR_DELAY_S", 0)  # the tiny phases are quick
    img, mask = tmp_path / "p.png", tmp_path / "m.png"
    photo(96, 64).save(img)
    m = np.zeros((64, 96), np.uint8)
    m[16:48, 32:64] = 255
    Image.fromarray(m).save(mask)
    r = CliRunner().invoke(main, [str(a) for a in (
        "inpaint", "--model", tiny_mlx, "--image", img, "--mask", mask, "--prompt", "x",
        "--steps", "2", "--seed", "1", "--max-sequence-length", "16", "-o",
        tmp_path / "o.png")])
    assert r.exit_code == 0, r.output
    for phase in ("load", "text_encode", "vae_encode", "denoise", "vae_decode", "paste_back"):
        assert f"{phase}:" in r.output, phase
    last = r.output.strip().splitlines()[-1]
    assert "vae-enc" in last and "paste" in last and "= total" in last


def test_a_bar_without_events_is_redrawn():
    """A long phase with no event (a model load, a big VAE layer) is redrawn by the
    heartbeat thread, so its line keeps showing the phase and its elapsed time."""
    import io
    import time

    out = io.StringIO()
    bars = PhaseBars(file=out, heartbeat=0.05, delay=0)
    bars(0, 0, phase="load_transformer")
    drawn = out.getvalue().count("load_transformer")
    end = time.time() + 30  # a bound, not a timing: the redraw normally comes in 0.05 s
    while out.getvalue().count("load_transformer") == drawn and time.time() < end:
        time.sleep(0.05)
    bars.close()
    assert out.getvalue().count("load_transformer") > drawn
