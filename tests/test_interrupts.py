"""Interrupted runs leave nothing half-done (issue 13 item 6): `mlx-edit convert` and
`mlx-edit inpaint` stopped with SIGINT (Ctrl-C: exit 130, one line) or SIGKILL at a point
in the middle of their work leave no DEST / output file, and the input folder is as it
was. Each run is a subprocess slowed down by a small wrapper so the signal lands mid-way."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# Runs `mlx-edit ARGS`, slowed at one point: $SLOW = "convert" (each tensor written) or
# "inpaint" (each denoise step); a marker file says the slow part has started.
WRAPPER = """
import os, sys, time
import mlx_edit
from mlx_edit.cli import main
marker = os.environ["MARKER"]
def mark():
    open(marker, "a").close()
    time.sleep(0.2)
if os.environ["SLOW"] == "convert":
    from mlx_edit.weights import save
    add = save.ShardWriter.add
    def slow_add(self, key, value):
        mark()
        add(self, key, value)
    save.ShardWriter.add = slow_add
else:
    from mlx_edit.editing.pipeline import FluxFill
    steps = FluxFill.steps
    def slow_steps(self, job):
        for item in steps(self, job):
            mark()
            yield item
    FluxFill.steps = slow_steps
sys.argv = ["mlx-edit", *sys.argv[1:]]
main()
"""


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "dir" for p in sorted(folder.rglob("*"))}


def _interrupt(tmp_path: Path, slow: str, args: list, sig: int) -> subprocess.CompletedProcess:
    marker = tmp_path / f"started-{slow}-{sig}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MARKER": str(marker), "SLOW": slow,
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the run ended before the slow part: {proc.returncode} {err}")
        time.sleep(0.05)
    time.sleep(0.3)  # well inside the slow part
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    marker.unlink()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_convert_publishes_nothing(tiny_mlx, tmp_path, sig):
    work = tmp_path / "work"
    work.mkdir()
    before = _tree(tiny_mlx)
    r = _interrupt(tmp_path, "convert", ["convert", tiny_mlx, work / "dest", "--dtype",
                                         "float32"], sig)
    if sig == signal.SIGINT:
        assert r.returncode == 130
        assert r.stderr.strip().splitlines()[-1] == "Error: interrupted"
        assert "Traceback" not in r.stderr
        assert os.listdir(work) == []  # the temp folder is cleaned up too
    else:
        assert r.returncode == -signal.SIGKILL
        assert not (work / "dest").exists()  # only a hidden temp folder may stay
        assert all(n.startswith(".dest.converting-") for n in os.listdir(work))
    assert _tree(tiny_mlx) == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_inpaint_writes_nothing(tiny_mlx, tmp_path, sig):
    work = tmp_path / "work"
    work.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(work / "p.png")
    mask = np.zeros((48, 64), np.uint8)
    mask[10:30, 20:40] = 255
    Image.fromarray(mask).save(work / "m.png")
    (work / "o.png").write_bytes(b"an older result")
    before = _tree(work)
    r = _interrupt(tmp_path, "inpaint", [
        "inpaint", "--model", tiny_mlx, "--image", work / "p.png", "--mask", work / "m.png",
        "--prompt", "x", "--steps", "40", "--output", work / "o.png", "--overwrite",
        "--metadata"], sig)
    if sig == signal.SIGINT:
        assert r.returncode == 130 and "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines()[-1].endswith("Error: interrupted"), repr(r.stderr)
    else:
        assert r.returncode == -signal.SIGKILL
    assert _tree(work) == before  # neither o.png nor o.json replaced, no temp file left
