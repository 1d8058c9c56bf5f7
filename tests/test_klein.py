"""FLUX.2 [klein] pipelines (mlx_edit/editing/klein.py) against diffusers' Flux2KleinPipeline and
Flux2KleinInpaintPipeline on the tiny klein fixture built by diffusers
(scripts/klein_fixtures.build_diffusers), float32 on the CPU, the same initial noise on
both sides: the latents after every step <= 1e-3 relative (as the FLUX.1 pipeline parity
tests, tests/test_parity_pipeline.py), the decoded image PSNR >= 40 dB. Cases: one
reference, two references (the second centre-cropped to 16 px), one reference with true
CFG on a Base (non-distilled) folder, and inpainting with a reference at strength 0.6.
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from skimage import data

from mlx_edit.editing.klein import FluxKlein
from mlx_edit.parity import TOLERANCES, compare, psnr

pytestmark = pytest.mark.parity
torch = pytest.importorskip("torch")

PROMPT = "put a red hat on the astronaut"
W, H = 128, 96  # the first image's size: the output's
SEQ = 64  # Qwen3 tokens (diffusers' default 512 would only pad more)
F32 = TOLERANCES["float32"]  # per-step latents 1e-3 relative, image PSNR 40 dB


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, import_script):
    out = tmp_path_factory.mktemp("klein") / "tiny"
    return import_script("klein_fixtures").build_diffusers(out, "tiny")


@pytest.fixture(scope="module")
def base_ckpt(ckpt, tmp_path_factory):
    """The same weights as a klein Base folder (is_distilled false: true CFG)."""
    out = tmp_path_factory.mktemp("klein-base") / "tiny"
    shutil.copytree(ckpt, out)
    index = json.loads((out / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps({**index, "is_distilled": False}))
    return out


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(data.astronaut()).resize((W, H), Image.LANCZOS)


@pytest.fixture(scope="module")
def second():
    return Image.fromarray(data.coffee()).resize((150, 100), Image.LANCZOS)  # crop: 144x96


def _noise(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, (W // 16) * (H // 16), 128)).astype(np.float32)


def _nchw(noise: np.ndarray):
    """Packed (1, N, 128) -> diffusers' unpacked (1, 128, H/16, W/16) tensor."""
    return torch.from_numpy(noise.reshape(1, H // 16, W // 16, 128).transpose(0, 3, 1, 2)
                            .copy())


def _ours(pipe, job):
    steps = [np.array(latents) for _, latents in pipe.steps(job)]
    return steps, np.array(pipe.decode(job.latents, W, H))


def _reference(cls, folder, **kw):
    """diffusers' per-step latents (callback) and its image decoded from the final
    latents (NHWC, [-1, 1])."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    ref = getattr(diffusers, cls).from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    out = []

    def on_step(_pipe, i, t, kwargs):
        out.append(kwargs["latents"].numpy().copy())
        return {}

    with torch.no_grad():
        z = ref(prompt=PROMPT, max_sequence_length=SEQ, output_type="latent",
                callback_on_step_end=on_step, return_dict=False, **kw)[0]
        image = ref.vae.decode(z, return_dict=False)[0].permute(0, 2, 3, 1).numpy()
    return out, image


def _check(ours, ref):
    """The harness's comparison (mlx_edit.parity, as `mlx-edit parity` and
    tests/test_parity_pipeline.py): every step's latents and the image within float32's
    tolerances."""
    (steps, image), (ref_steps, ref_image) = ours, ref
    rows = [compare(f"latents.step{i}", a, b, F32.step)
            for i, (a, b) in enumerate(zip(steps, ref_steps, strict=True))]
    print("per-step rel errors", [f"{r.rel:.1e}" for r in rows], "PSNR",
          f"{psnr(image, ref_image):.1f} dB")
    assert all(r.passed for r in rows), rows
    assert psnr(image, ref_image) >= F32.psnr_db


@pytest.mark.parametrize("refs", [1, 2])
def test_edit_matches_diffusers(ckpt, photo, second, refs):
    images = [photo, second][:refs]
    noise = _noise(refs)
    pipe = FluxKlein.from_pretrained(ckpt, mx.float32)
    job = pipe.edit_job(images, PROMPT, steps=3, seed=0, max_sequence_length=SEQ,
                        noise=mx.array(noise))
    grids = [(6, 8), (6, 9)][:refs]  # 128x96 and the cropped 144x96, in tokens
    assert job.tokens.shape == (1, sum(h * w for h, w in grids), 128)
    ids = np.array(job.token_ids)
    assert sorted(set(ids[:, 0].tolist())) == [10.0, 20.0][:refs]
    _check(_ours(pipe, job), _reference("Flux2KleinPipeline", ckpt, image=images,
                                        num_inference_steps=3, latents=_nchw(noise)))


def test_base_edit_true_cfg_matches_diffusers(base_ckpt, photo):
    """klein Base: guidance 2.5 is the true-CFG scale against an empty prompt."""
    noise = _noise(3)
    pipe = FluxKlein.from_pretrained(base_ckpt, mx.float32)
    assert pipe.variant == "klein-base"
    job = pipe.edit_job([photo], PROMPT, steps=2, guidance=2.5, seed=0,
                        max_sequence_length=SEQ, noise=mx.array(noise))
    assert job.negative is not None and job.true_cfg_scale == 2.5
    _check(_ours(pipe, job), _reference("Flux2KleinPipeline", base_ckpt, image=[photo],
                                        num_inference_steps=2, guidance_scale=2.5,
                                        latents=_nchw(noise)))


def test_inpaint_with_reference_matches_diffusers(ckpt, photo, second, monkeypatch):
    """strength 0.6 of 4 steps (3 run): the start mixes the photo's latents with the
    noise; after each step the latents outside the mask are the photo's re-noised."""
    from diffusers.pipelines.flux2 import pipeline_flux2_klein_inpaint as module

    noise = _noise(4)
    mask = np.zeros((H, W), np.float32)
    mask[24:72, 40:104] = 1.0
    pipe = FluxKlein.from_pretrained(ckpt, mx.float32)
    job = pipe.inpaint_job(photo, mask, PROMPT, reference=second, steps=4, strength=0.6,
                           seed=0, max_sequence_length=SEQ, crop_to_mask=False,
                           noise=mx.array(noise))
    assert job.tokens.shape == (1, 6 * 8 + 6 * 9, 128)  # the photo, then the reference
    # diffusers draws its noise inside; hand it ours (same shape, NCHW)
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: _nchw(noise))
    _check(_ours(pipe, job), _reference(
        "Flux2KleinInpaintPipeline", ckpt, image=photo, image_reference=second,
        mask_image=Image.fromarray((mask * 255).astype(np.uint8)), strength=0.6,
        num_inference_steps=4))


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory, import_script):
    """Preset `wide` (klein 4B's transformer widths with one block of each kind, the real
    FLUX.2 VAE, Qwen3-4B widths with 2 layers; ~3.2 GB float32), built once, or the folder
    MLX_EDIT_KLEIN_WIDE_CKPT names; removed after the module."""
    import os
    from pathlib import Path

    given = os.environ.get("MLX_EDIT_KLEIN_WIDE_CKPT")
    if given:
        yield Path(given)
        return
    out = tmp_path_factory.mktemp("klein-wide") / "wide"
    yield import_script("klein_fixtures").build_diffusers(out, "wide")
    shutil.rmtree(out, ignore_errors=True)


def test_wide_edit_and_inpaint_match_diffusers(wide_ckpt, photo, second, monkeypatch,
                                               import_script):
    """At the real widths: an edit with two references, then an inpaint with a reference
    (2 steps each, the tolerances of the tiny cases)."""
    from diffusers.pipelines.flux2 import pipeline_flux2_klein_inpaint as module

    layers = import_script("klein_fixtures").out_layers("wide")  # diffusers is told them

    pipe = FluxKlein.from_pretrained(wide_ckpt, mx.float32)
    noise = _noise(5)
    job = pipe.edit_job([photo, second], PROMPT, steps=2, seed=0, max_sequence_length=SEQ,
                        noise=mx.array(noise))
    _check(_ours(pipe, job), _reference("Flux2KleinPipeline", wide_ckpt,
                                        image=[photo, second], num_inference_steps=2,
                                        latents=_nchw(noise), text_encoder_out_layers=layers))
    mask = np.zeros((H, W), np.float32)
    mask[16:80, 32:112] = 1.0
    noise = _noise(6)
    job = pipe.inpaint_job(photo, mask, PROMPT, reference=second, steps=2, strength=1.0,
                           seed=0, max_sequence_length=SEQ, crop_to_mask=False,
                           noise=mx.array(noise))
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: _nchw(noise))
    _check(_ours(pipe, job), _reference(
        "Flux2KleinInpaintPipeline", wide_ckpt, image=photo, image_reference=second,
        mask_image=Image.fromarray((mask * 255).astype(np.uint8)), strength=1.0,
        num_inference_steps=2, text_encoder_out_layers=layers))
