"""FLUX.1 Kontext (mlx_edit/editing/kontext.py, conditioning/kontext.py) against diffusers'
FluxKontextPipeline on the tiny fixture's `kontext-model/` (FLUX.1-Kontext-dev layout),
float32 on the CPU, same injected noise, VAE posterior mode on both sides: per-step
latents <= 1e-4 relative... checked at 1e-3 per step as the Fill pipeline (accumulated
rounding), the final image PSNR >= 40 dB; plus the resolution rules, the offset layout
of several references and the BFL file.
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from skimage import data

from mlx_edit.conditioning.kontext import (
    offset_layout,
    preferred_size,
    reference_ids,
    reference_size,
)
from mlx_edit.imaging.images import InputError
from mlx_edit.editing.kontext import FluxKontext, output_size
from mlx_edit.editing.pipeline import FluxFill
from mlx_edit.weights.core import WeightLoadError

PROMPT = "make the astronaut's suit red"
W, H = 128, 96  # target; the reference is snapped to a ~1 MP preferred resolution


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 10 * np.log10(4.0 / max(mse, 1e-20))  # images in [-1, 1]: peak-to-peak 2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, import_script):
    # torch-free builder (mlx-edit's own models); diffusers loads the same folder
    out = tmp_path_factory.mktemp("kontext") / "tiny"
    return import_script("make_mlx_checkpoint").build(out, "tiny", extras=("kontext-model",))


@pytest.fixture(scope="module")
def pipe(ckpt):
    return FluxKontext.from_pretrained(ckpt / "kontext-model", mx.float32)


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(data.astronaut()).crop((0, 40, 300, 240))  # 300x200: 1.5


def test_preferred_resolution_and_sizes():
    assert preferred_size(300, 200) == (1248, 832)
    assert preferred_size(100, 100) == (1024, 1024)
    assert preferred_size(200, 1000) == (672, 1568)
    assert reference_size(300, 200, auto_resize=False) == (288, 192)
    with pytest.raises(InputError, match="smaller than 16"):
        reference_size(10, 40, auto_resize=False)
    ref = Image.new("RGB", (300, 200))
    assert output_size(ref, None, None) == (1248, 832)
    assert output_size(ref, 200, None) == (192, 128)
    assert output_size(ref, 100, 70) == (96, 64)


def test_offset_layout_keeps_the_canvas_square():
    # a wide reference, then another: below it; then a tall one: to the right
    assert offset_layout([(4, 8), (4, 8), (10, 2)]) == [(0, 0), (4, 0), (0, 8)]
    ids = np.array(reference_ids(2, 3, row=4, col=1))
    assert ids.shape == (6, 3) and (ids[:, 0] == 1).all()
    assert ids[:, 1].tolist() == [4, 4, 4, 5, 5, 5] and ids[:, 2].tolist() == [1, 2, 3] * 2


def _diffusers(ckpt):
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    ref = diffusers.FluxKontextPipeline.from_pretrained(ckpt / "kontext-model")
    ref.set_progress_bar_config(disable=True)
    return ref


def _run_reference(ref, image, noise, steps, guidance, **kw):
    """diffusers' per-step latents and decoded image, posterior mode, injected noise."""
    import torch
    from diffusers.models.autoencoders import vae as dvae

    out = []

    def on_step(_pipe, i, t, kwargs):
        out.append(kwargs["latents"].numpy().copy())
        return {}

    sample = dvae.DiagonalGaussianDistribution.sample
    dvae.DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mode()
    try:
        with torch.no_grad():
            latents = ref(image=image, prompt=PROMPT, height=H, width=W, max_area=W * H,
                          num_inference_steps=steps, guidance_scale=guidance,
                          latents=torch.from_numpy(noise), max_sequence_length=32,
                          output_type="latent", callback_on_step_end=on_step,
                          return_dict=False, **kw)[0]
            z = ref._unpack_latents(latents, H, W, ref.vae_scale_factor)
            z = z / ref.vae.config.scaling_factor + ref.vae.config.shift_factor
            decoded = ref.vae.decode(z, return_dict=False)[0].permute(0, 2, 3, 1).numpy()
    finally:
        dvae.DiagonalGaussianDistribution.sample = sample
    return out, decoded


@pytest.mark.parity
@pytest.mark.parametrize("auto_resize, cfg", [(True, 1.0), (False, 2.0)])
def test_edit_matches_diffusers(pipe, ckpt, photo, auto_resize, cfg):
    """One non-square reference (snapped to 1248x832, or floored to 288x192), 3 steps;
    true CFG (scale 2, a negative prompt) on the second case."""
    negative = "blurry, low quality" if cfg > 1 else None
    noise = np.random.default_rng(1).standard_normal((1, (W // 16) * (H // 16), 64))
    noise = noise.astype(np.float32)
    job = pipe.prepare(
        photo.resize((W, H)), np.ones((H, W), np.float32), np.ones((H, W), np.float32),
        PROMPT, steps=3, guidance=2.5, seed=0, num_images=1, strength=1.0,
        crop_to_mask=False, prompt_2=None, max_sequence_length=32, noise=mx.array(noise),
        references=[photo], reference_resize=auto_resize, negative_prompt=negative,
        true_cfg_scale=cfg)
    ref_w, ref_h = (1248, 832) if auto_resize else (288, 192)
    assert job.tokens.shape == (1, (ref_w // 16) * (ref_h // 16), 64)
    ours = [np.array(latents) for _, latents in pipe.steps(job)]
    image = np.array(pipe.decode(job.latents, W, H))
    ref_steps, ref_image = _run_reference(_diffusers(ckpt), photo, noise, 3, 2.5,
                                          _auto_resize=auto_resize, negative_prompt=negative,
                                          true_cfg_scale=cfg)
    errs = [rel_err(a, b) for a, b in zip(ours, ref_steps, strict=True)]
    assert max(errs) <= 1e-3, errs
    assert psnr(image, ref_image) >= 40.0


@pytest.mark.parity
def test_two_references_match_diffusers_transformer(pipe, ckpt, photo):
    """Two references in the offset layout: our loop vs diffusers' transformer called on
    the same concatenated tokens and ids (diffusers' pipeline takes one reference)."""
    import torch
    from diffusers import FluxTransformer2DModel

    second = Image.fromarray(data.coffee())
    noise = np.random.default_rng(2).standard_normal((1, (W // 16) * (H // 16), 64))
    noise = noise.astype(np.float32)
    ones = np.ones((H, W), np.float32)
    job = pipe.prepare(photo.resize((W, H)), ones, ones, PROMPT, steps=2, guidance=2.5,
                       seed=0, num_images=1, strength=1.0, crop_to_mask=False,
                       prompt_2=None, max_sequence_length=32, noise=mx.array(noise),
                       references=[photo, second], reference_resize=False)
    # 288x192 -> 18x12 tokens at (0, 0); 600x400 -> 592x400 -> 37x25 tokens: below it
    ids = np.array(job.token_ids)
    assert ids.shape == (18 * 12 + 37 * 25, 3) and (ids[:, 0] == 1).all()
    assert ids[18 * 12, 1:].tolist() == [12, 0]
    ours = [np.array(latents) for _, latents in pipe.steps(job)][-1]

    model = FluxTransformer2DModel.from_pretrained(ckpt / "kontext-model" / "transformer")
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # noqa: E731
    from mlx_edit.sampling.latents import image_ids

    img_ids = torch.cat([t(image_ids(H // 16, W // 16)), t(job.token_ids)])
    latents, tokens = torch.from_numpy(noise), t(job.tokens)
    txt, pooled = t(job.embeds.txt), t(job.embeds.pooled)
    with torch.no_grad():
        for i in range(len(job.sigmas) - 1):
            v = model(hidden_states=torch.cat([latents, tokens], 1), encoder_hidden_states=txt,
                      pooled_projections=pooled, timestep=torch.tensor([float(job.sigmas[i])]),
                      img_ids=img_ids, txt_ids=torch.zeros(txt.shape[1], 3),
                      guidance=torch.tensor([2.5]), return_dict=False)[0]
            dt = float(job.sigmas[i + 1]) - float(job.sigmas[i])
            latents = latents + dt * v[:, : latents.shape[1]]
    assert rel_err(ours, latents.numpy()) <= 1e-4


@pytest.mark.parity
def test_bfl_file_loads_like_the_folder(ckpt):
    from mlx.utils import tree_flatten

    from mlx_edit.weights.flux import load_transformer

    folder = FluxKontext.from_pretrained(ckpt / "kontext-model", mx.float32)
    # BFL files carry no config: tiny head_dim 16 needs its RoPE axes given
    bfl = load_transformer(ckpt / "kontext-model" / "flux1-kontext-dev.safetensors",
                           mx.float32, expect_in_channels=64,
                           config={"axes_dims_rope": [4, 4, 8]})
    assert bfl.config.in_channels == 64 and bfl.config.guidance_embeds
    a = dict(tree_flatten(folder.transformer.parameters()))
    b = dict(tree_flatten(bfl.parameters()))
    assert a.keys() == b.keys()
    assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)


def test_edit_end_to_end_and_variant_checks(pipe, ckpt, photo):
    out = pipe.edit(photo, PROMPT, steps=1, width=W, height=H, auto_resize=False,
                    max_sequence_length=32, num_images=2, seed=3)
    assert [im.size for im in out] == [(W, H)] * 2
    assert out[0].info["mode"] == "edit" and out[1].info["seed"] == "4"
    kept = pipe.edit(photo, PROMPT, steps=1, width=W, height=H, auto_resize=False,
                     max_sequence_length=32, keep_size=True)
    assert kept[0].size == photo.size and kept[0].info["keep_size"] == "True"
    with pytest.raises(WeightLoadError, match="FLUX.1 Kontext transformer .in_channels 64.; "
                       "inpaint/outpaint needs a FLUX.1 Fill model"):
        FluxFill.from_pretrained(ckpt / "kontext-model", mx.float32)
    with pytest.raises(WeightLoadError, match="FLUX.1 Fill transformer .in_channels 384.; "
                       "edit needs a FLUX.1 Kontext model"):
        FluxKontext.from_pretrained(ckpt, mx.float32)


@pytest.mark.parity
def test_kontext_inpaint_matches_diffusers(pipe, ckpt, photo):
    """Kontext with a mask at strength 0.8 (5 steps: 4 run) vs diffusers'
    FluxKontextInpaintPipeline: the source kept outside the mask at every step, the image
    itself as the reference; same noise, posterior mode. Inputs sized so that no side
    resamples them (288x192, a 16-px-aligned rectangle)."""
    import diffusers
    import torch
    from diffusers.models.autoencoders import vae as dvae
    from diffusers.pipelines.flux import pipeline_flux_kontext_inpaint as pki

    w, h = 288, 192
    image = photo.resize((w, h), Image.LANCZOS)
    mask = np.zeros((h, w), np.float32)
    mask[48:144, 96:208] = 1.0
    noise = np.random.default_rng(4).standard_normal((1, (w // 16) * (h // 16), 64))
    noise = noise.astype(np.float32)
    job = pipe.prepare(
        image, mask, mask, PROMPT, steps=5, guidance=2.5, seed=0, num_images=1, strength=0.8,
        crop_to_mask=False, prompt_2=None, max_sequence_length=32, noise=mx.array(noise),
        references=[image], reference_resize=False, keep_source=True)
    ours = [np.array(latents) for _, latents in pipe.steps(job)]
    ours_image = np.array(pipe.decode(job.latents, w, h))

    diffusers.utils.logging.set_verbosity_error()
    base = _diffusers(ckpt)
    ref = diffusers.FluxKontextInpaintPipeline(**base.components)
    ref.set_progress_bar_config(disable=True)
    unpacked = ref._unpack_latents(torch.from_numpy(noise), h, w, ref.vae_scale_factor)
    steps_out = []

    def on_step(_pipe, i, t, kwargs):
        steps_out.append(kwargs["latents"].numpy().copy())
        return {}

    randn, sample = pki.randn_tensor, dvae.DiagonalGaussianDistribution.sample
    pki.randn_tensor = lambda shape, **kw: unpacked.clone()
    dvae.DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mode()
    try:
        with torch.no_grad():
            latents = ref(image=image, mask_image=Image.fromarray((mask * 255).astype(np.uint8)),
                          prompt=PROMPT, strength=0.8, num_inference_steps=5,
                          guidance_scale=2.5, max_sequence_length=32, _auto_resize=False,
                          output_type="latent", callback_on_step_end=on_step,
                          return_dict=False)[0]
            z = ref._unpack_latents(latents, h, w, ref.vae_scale_factor)
            z = z / ref.vae.config.scaling_factor + ref.vae.config.shift_factor
            ref_image = ref.vae.decode(z, return_dict=False)[0].permute(0, 2, 3, 1).numpy()
    finally:
        pki.randn_tensor, dvae.DiagonalGaussianDistribution.sample = randn, sample
    assert len(ours) == len(steps_out) == 4
    errs = [rel_err(a, b) for a, b in zip(ours, steps_out, strict=True)]
    assert max(errs) <= 1e-3, errs
    assert psnr(ours_image, ref_image) >= 40.0


def test_kontext_mask_keeps_the_photo_outside(pipe, photo):
    mask = np.zeros(photo.size[::-1], np.uint8)
    mask[60:140, 100:200] = 255
    for keep in (True, False):
        out = pipe.edit(photo, PROMPT, mask=mask, steps=2, strength=0.9, auto_resize=False,
                        max_sequence_length=32, keep_size=keep, feather=4)[0]
        base = photo if keep else photo.convert("RGB").resize((288, 192), Image.LANCZOS)
        m = mask if keep else np.asarray(Image.fromarray(mask).resize((288, 192)))
        assert out.size == base.size and out.info["masked"] == "True"
        far = np.ones(m.shape, bool)
        ys, xs = np.nonzero(m)
        far[max(ys.min() - 12, 0):ys.max() + 12, max(xs.min() - 12, 0):xs.max() + 12] = False
        assert np.array_equal(np.asarray(out)[far], np.asarray(base.convert("RGB"))[far])


def test_kontext_mask_from_words_keeps_the_photo_outside(pipe, photo, tiny_sam3_mlx):
    """edit with mask_text (SAM 3 from text_segment_model): the mask is every instance of
    the phrase; with keep_size the pixels away from it are the photo's exactly."""
    from mlx_edit.editing.text_segment import TextSegmenter
    from mlx_edit.imaging.masks import blend_mask

    want, _ = TextSegmenter.from_pretrained(tiny_sam3_mlx).masks(photo, "a person", "all", 0.0)
    out = pipe.edit(photo, PROMPT, steps=1, max_sequence_length=32, auto_resize=False,
                    keep_size=True, feather=4, mask_text="a person", mask_threshold=0.0,
                    text_segment_model=str(tiny_sam3_mlx))[0]
    assert out.info["masked"] == "True" and out.info["mask_text"] == "a person"
    far = blend_mask(want[0].astype(np.float32), 12, 0) == 0
    assert far.any() and np.array_equal(np.asarray(out)[far],
                                        np.asarray(photo.convert("RGB"))[far])


def test_edit_cli_end_to_end(ckpt, photo, tmp_path):
    """`mlx-edit edit` on a real photo: the size asked for, --keep-size, a second
    reference and a mask; bad input is one line with exit status 2 and writes nothing."""
    from click.testing import CliRunner

    from mlx_edit.cli import main

    src, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    photo.save(src)
    m = np.zeros(photo.size[::-1], np.uint8)
    m[50:150, 80:220] = 255
    Image.fromarray(m).save(mask)
    base = ["edit", "--model", str(ckpt / "kontext-model"), "-i", str(src),
            "--instruction", PROMPT, "--steps", "1", "--max-sequence-length", "32",
            "--no-auto-resize", "--seed", "5"]
    run = CliRunner().invoke
    r = run(main, [*base, "--width", "96", "--height", "64", "-o", str(tmp_path / "a.png")])
    assert r.exit_code == 0, r.output
    out = Image.open(tmp_path / "a.png")
    assert out.size == (96, 64) and out.info["mode"] == "edit" and out.info["seed"] == "5"
    r = run(main, [*base, "-i", str(src), "--mask", str(mask), "--keep-size",
                   "-o", str(tmp_path / "b.png")])
    assert r.exit_code == 0, r.output
    kept = Image.open(tmp_path / "b.png")
    assert kept.size == photo.size and kept.info["references"] == "2"
    before = sorted(p.name for p in tmp_path.iterdir())
    for bad in (["--steps", "0"], ["--true-cfg-scale", "0.5"], ["--width", "8"],
                ["-o", str(src), "--overwrite"]):
        r = run(main, [*base, *bad])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, (bad, r.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_kontext_soft_mask_and_colour_match(pipe, photo):
    """Kontext with a grey-level mask: differential diffusion (the soft-mask hook replaces
    the keep-source blend), colour-matched paste-back; outside the mask the photo stays."""
    mask = np.zeros(photo.size[::-1], np.uint8)
    mask[60:140, 100:160] = 255
    mask[60:140, 160:220] = 90
    out = pipe.edit(photo, PROMPT, mask=mask, soft_mask=True, color_match="histogram",
                    steps=3, auto_resize=False, max_sequence_length=32, keep_size=True,
                    feather=4)[0]
    assert out.info["soft_mask"] == "True" and out.info["color_match"] == "histogram"
    far = np.ones(mask.shape, bool)
    far[40:160, 80:240] = False
    assert np.array_equal(np.asarray(out)[far], np.asarray(photo.convert("RGB"))[far])
