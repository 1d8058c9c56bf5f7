"""The parity harness itself: the reference dumper's CLI and file, and `mlx-edit parity`.

A reference made by scripts/parity_reference.py (run as a subprocess, like a user on a
CUDA box would) must pass `parity` on the same tiny checkpoint, row by row; a reference
with one tensor tampered with must make the command fail (exit 1) on that row.
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (first: loads OpenBLAS before mlx)

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from mlx_edit.parity import compare, parity_command, psnr, read_reference

pytestmark = pytest.mark.parity

COMPONENT_KEYS = ["clip.pooled", "t5.hidden", "vae.encode_mean", "vae.decode",
                  "transformer.forward"]


@pytest.fixture(scope="module")
def tiny_ref(tiny_ckpt, tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("harness") / "ref.safetensors"
    cmd = [sys.executable, str(repo_root / "scripts" / "parity_reference.py"),
           "--model", str(tiny_ckpt), "--out", str(out), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _invoke(ref, model, *extra):
    return CliRunner().invoke(parity_command, [str(ref), "--model", str(model), *extra])


def _result_lines(output: str) -> dict[str, str]:
    """component -> its table line (lines after the dashed rule, before the summary)."""
    lines = output.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("---")) + 1
    return {ln.split()[0]: ln for ln in lines[start:] if ln and "passed in" not in ln}


def test_reference_file_contents(tiny_ref):
    arrays, meta = read_reference(tiny_ref)
    for key in ("device", "dtype", "torch", "diffusers", "transformers", "size", "steps",
                "guidance", "prompt", "max_sequence_length"):
        assert meta[key], key
    assert meta["dtype"] == "float32" and meta["size"] == "64x48" and meta["steps"] == "2"
    cases = json.loads(meta["cases"])
    assert [c["strength"] for c in cases] == [1.0, 0.5]
    assert arrays["input.image"].shape == (48, 64, 3) and arrays["input.image"].dtype == np.uint8
    assert set(np.unique(arrays["input.mask"])) == {0, 255}
    assert arrays["input.clip_ids"].shape == (1, 77)
    assert arrays["input.t5_ids"].shape == (1, int(meta["max_sequence_length"]))
    assert arrays["pipeline.noise"].shape == (1, 12, 64)
    assert arrays["transformer.forward"].shape == (1, 12, 64)
    for key in COMPONENT_KEYS + ["pipeline.latents.step0", "pipeline.latents.step1",
                                 "pipeline.image", "pipeline_strength50.latents.step0"]:
        assert np.isfinite(arrays[key]).all() and np.abs(arrays[key]).max() > 0, key


def test_parity_command_passes(tiny_ref, tiny_ckpt):
    result = _invoke(tiny_ref, tiny_ckpt)
    assert result.exit_code == 0, result.output
    rows = _result_lines(result.output)
    expected = ["tokens.clip", "tokens.t5", *COMPONENT_KEYS, "pipeline.latents.step0",
                "pipeline.latents.step1", "pipeline.image", "pipeline_strength50.latents.step0",
                "pipeline_strength50.image"]
    assert list(rows) == expected
    for line in rows.values():
        assert line.endswith("pass"), line
    assert "PSNR>=40" in rows["pipeline.image"]
    assert "FAIL" not in result.output


def _tampered(tiny_ref, tmp_path, key, change):
    arrays, meta = read_reference(tiny_ref)
    arrays[key] = change(arrays[key].copy())
    out = tmp_path / "tampered.safetensors"
    save_file(arrays, str(out), meta)
    return out


def _bump_one(a):
    a.flat[a.size // 2] += 2e-3 * np.abs(a).max()  # rel 2e-3: over 1e-4 and 1e-3
    return a


@pytest.mark.parametrize("key, change", [
    ("transformer.forward", _bump_one),
    ("pipeline.latents.step1", _bump_one),
    ("pipeline.image", lambda a: a + 0.05),  # PSNR 10 log10(4 / 0.0025) = 32 dB < 40
])
def test_tampered_reference_fails(tiny_ref, tiny_ckpt, tmp_path, key, change):
    result = _invoke(_tampered(tiny_ref, tmp_path, key, change), tiny_ckpt)
    assert result.exit_code == 1, result.output
    rows = _result_lines(result.output)
    assert "FAIL" in rows[key], rows[key]
    assert [k for k, ln in rows.items() if "FAIL" in ln] == [key]
    assert f"FAILED: {key}" in result.output


def test_tolerance_scale_loosens(tiny_ref, tiny_ckpt, tmp_path):
    ref = _tampered(tiny_ref, tmp_path, "transformer.forward", _bump_one)
    assert _invoke(ref, tiny_ckpt, "--tolerance-scale", "100").exit_code == 0


def test_not_a_reference_is_an_error(tiny_ckpt, tmp_path):
    bogus = tmp_path / "bogus.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, str(bogus))
    result = _invoke(bogus, tiny_ckpt)
    assert result.exit_code == 1 and "not an mlx-edit parity reference" in result.output


def test_compare_and_psnr():
    ref = np.array([[1.0, -2.0], [0.5, 4.0]], np.float32)
    row = compare("x", ref + np.float32(4e-4), ref, 1e-4)
    assert math.isclose(row.rel, 1e-4, rel_tol=1e-3) and math.isclose(row.max_abs, 4e-4,
                                                                       rel_tol=1e-3)
    assert not compare("x", ref + np.float32(1e-3), ref, 1e-4).passed
    assert not compare("x", ref[:1], ref, 1e-4).passed  # shape mismatch
    assert not compare("x", np.full_like(ref, np.nan), ref, None).passed
    assert psnr(ref, ref) == math.inf
    assert math.isclose(psnr(ref + 0.02, ref), 40.0, rel_tol=1e-5)
