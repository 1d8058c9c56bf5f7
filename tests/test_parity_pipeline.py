"""Full-pipeline parity: mlx-edit's FluxFill against diffusers' FluxFillPipeline.

Both sides run float32 on the CPU from the same random-weight checkpoint, with the same
injected initial noise and the VAE posterior mode (scripts/parity_reference.py). Checked:
the latents after every Euler step (relative error <= 1e-3) and the decoded image
(PSNR >= 40 dB), at strength 1 and below 1 (img2img mixing of the image latents), for a
batch of 1 and of 2 (two injected noises, diffusers' num_images_per_prompt=2).
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (first: loads OpenBLAS before mlx)

import pytest

from mlx_edit.parity import TOLERANCES, Row, run_parity
from mlx_edit.sampling.sampler import start_index

pytestmark = pytest.mark.parity
F32 = TOLERANCES["float32"]


def _pipeline_rows(import_script, model, out, **kwargs) -> dict[str, Row]:
    ref = import_script("parity_reference").dump(model, out, components=False, **kwargs)
    rows = run_parity(ref, model, components=False)
    return {r.component: r for r in rows}


def _check_case(rows: dict[str, Row], name: str, steps: int, strength: float, batch: int):
    n = steps - start_index(steps, strength)
    step_keys = [f"{name}.latents.step{i}" for i in range(n)]
    assert set(step_keys) | {f"{name}.image"} <= set(rows), sorted(rows)
    for key in step_keys:
        row = rows[key]
        assert row.shape[0] == batch and row.shape[-1] == 64
        assert row.rel <= 1e-3, (key, row.rel)
        assert row.passed, row
    image = rows[f"{name}.image"]
    assert image.shape[0] == batch and image.shape[-1] == 3
    assert image.psnr >= 40.0, (name, image.psnr)
    assert image.passed, image


def test_tolerances_are_the_stated_ones():
    assert (F32.component, F32.step, F32.psnr_db) == (1e-4, 1e-3, 40.0)


@pytest.fixture(scope="module")
def tiny_single(tiny_ckpt, tmp_path_factory, import_script):
    out = tmp_path_factory.mktemp("parity") / "single.safetensors"
    return _pipeline_rows(import_script, tiny_ckpt, out, steps=2, strengths=(1.0, 0.5))


@pytest.fixture(scope="module")
def tiny_batch2(tiny_ckpt, tmp_path_factory, import_script):
    # non-square, 3 steps: strength 0.6 starts at the second sigma and runs 2 steps
    out = tmp_path_factory.mktemp("parity") / "batch2.safetensors"
    return _pipeline_rows(import_script, tiny_ckpt, out, size=(48, 80), steps=3,
                          strengths=(1.0, 0.6), num_images=2, guidance=3.5, seed=7)


def test_tiny_strength_1(tiny_single):
    _check_case(tiny_single, "pipeline", 2, 1.0, 1)


def test_tiny_img2img_strength_below_1(tiny_single):
    _check_case(tiny_single, "pipeline_strength50", 2, 0.5, 1)


def test_tiny_batch_2(tiny_batch2):
    _check_case(tiny_batch2, "pipeline", 3, 1.0, 2)
    _check_case(tiny_batch2, "pipeline_strength60", 3, 0.6, 2)


@pytest.mark.slow
def test_wide_pipeline(wide_ckpt, tmp_path, import_script):
    # real FLUX widths (3072 hidden, full VAE, CLIP-L, 4096-wide T5), T5 length 128
    rows = _pipeline_rows(import_script, wide_ckpt, tmp_path / "wide.safetensors",
                          steps=2, strengths=(1.0, 0.5), max_sequence_length=128)
    _check_case(rows, "pipeline", 2, 1.0, 1)
    _check_case(rows, "pipeline_strength50", 2, 0.5, 1)
