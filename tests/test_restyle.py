"""Restyle with the BFL control models (FLUX.1-Canny/Depth-dev, in_channels 128) against
diffusers' FluxControlPipeline / FluxControlImg2ImgPipeline, the variant checks, the
`mlx-edit restyle` command; ControlNets converted by `mlx-edit convert` and quantized with
the pipeline's --quantize. Fixture: the tiny checkpoint with `--extras controlnet,
control-model` (control-model/ has FLUX.1-Canny-dev's layout).
"""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import contextlib
import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import import_script
from mlx.utils import tree_flatten
from PIL import Image, ImageFilter
from skimage import data

from mlx_edit.imaging import masks
from mlx_edit.cli import main
from mlx_edit.conditioning.bfl_control import bfl_conditioner
from mlx_edit.conditioning.fill import fill_conditioner
from mlx_edit.conditioning.controlnet import (
    ControlNetSpec,
    prepare_controls,
    preprocess,
)
from mlx_edit.imaging.images import InputError, to_array
from mlx_edit.sampling.latents import image_ids, token_grid
from mlx_edit.editing.pipeline import FluxFill
from mlx_edit.weights.quantize import quantized_layers
from mlx_edit.weights import controlnet as cw
from mlx_edit.weights.core import WeightLoadError
from mlx_edit.weights.flux import load_transformer

W, H = 128, 96  # an 8 x 6 token grid
PROMPT = "a bronze statue of an astronaut"


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def psnr(a, b) -> float:
    """PSNR in dB of two images in [-1, 1] (peak 1 on the [0, 1] scale)."""
    mse = float(np.mean(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) / 2) ** 2))
    return 10 * np.log10(1.0 / mse)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Built torch-free (scripts/make_mlx_checkpoint.py); diffusers loads it for parity."""
    out = tmp_path_factory.mktemp("ckpt-restyle") / "tiny"
    return import_script("make_mlx_checkpoint").build(
        out, "tiny", extras=("controlnet", "control-model"))


@pytest.fixture(scope="module")
def pipe(ckpt):
    return FluxFill.from_pretrained(ckpt / "control-model", mx.float32)


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(data.astronaut()).resize((W, H), Image.LANCZOS)


def _rect_mask(size, box):
    m = np.zeros(size[::-1], np.float32)
    m[box[1]:box[3], box[0]:box[2]] = 1.0
    return m


# ------------------------------------------------------------------ parity


@contextlib.contextmanager
def _deterministic(unpacked_noise):
    """diffusers' control pipelines with the VAE posterior mode and injected noise."""
    from diffusers.models.autoencoders import vae as dvae
    from diffusers.pipelines.flux import pipeline_flux_control_img2img as pci

    def fixed(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(unpacked_noise.shape), shape
        return unpacked_noise.to(dtype=dtype)

    sample, randn = dvae.DiagonalGaussianDistribution.sample, pci.randn_tensor
    dvae.DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mode()
    pci.randn_tensor = fixed
    try:
        yield
    finally:
        dvae.DiagonalGaussianDistribution.sample, pci.randn_tensor = sample, randn


def _reference(ckpt, image, control, noise, strength, steps, guidance):
    """Per-step latents and the decoded image (B, H, W, 3) of diffusers' pipeline."""
    import diffusers
    import torch

    diffusers.utils.logging.set_verbosity_error()
    ref = diffusers.FluxControlPipeline.from_pretrained(ckpt / "control-model")
    ref.set_progress_bar_config(disable=True)
    steps_out = []

    def on_step(_pipe, i, t, kwargs):
        steps_out.append(kwargs["latents"].numpy().copy())
        return {}

    noise = torch.from_numpy(noise)
    if strength == 1.0:
        run, kw = ref, dict(latents=noise)
    else:
        run = diffusers.FluxControlImg2ImgPipeline(**ref.components)
        run.set_progress_bar_config(disable=True)
        kw = dict(image=image, strength=strength)
    with _deterministic(ref._unpack_latents(noise, H, W, ref.vae_scale_factor)), \
            torch.no_grad():
        latents = run(prompt=PROMPT, control_image=control, height=H, width=W,
                      num_inference_steps=steps, guidance_scale=guidance,
                      max_sequence_length=32, output_type="latent",
                      callback_on_step_end=on_step, return_dict=False, **kw)[0]
        z = ref._unpack_latents(latents, H, W, ref.vae_scale_factor)
        z = z / ref.vae.config.scaling_factor + ref.vae.config.shift_factor
        image = ref.vae.decode(z, return_dict=False)[0].permute(0, 2, 3, 1).numpy()
    return steps_out, image


@pytest.mark.parity
@pytest.mark.parametrize("strength, control_type", [(1.0, "canny"), (0.6, "depth")])
def test_restyle_matches_diffusers_control_pipelines(pipe, ckpt, photo, strength,
                                                     control_type):
    """Our prepare -> steps -> decode with the BFL control conditioning vs diffusers'
    FluxControlPipeline (strength 1) / FluxControlImg2ImgPipeline (strength < 1), float32,
    same noise, posterior mode on both sides; canny computed by us (BFL thresholds) and
    given to diffusers as the control image, depth a ready-made map."""
    if control_type == "canny":
        ours_control = photo
        ref_control = preprocess(photo, "canny", canny_low=50, canny_high=200)
    else:
        ours_control = ref_control = photo.convert("L").filter(ImageFilter.GaussianBlur(3))
    noise = np.random.default_rng(3).standard_normal((1, 48, 64)).astype(np.float32)
    ones = np.ones((H, W), np.float32)
    job = pipe.prepare(photo, ones, ones, PROMPT, steps=3, guidance=30.0, seed=0,
                       num_images=1, strength=strength, crop_to_mask=None, prompt_2=None,
                       max_sequence_length=32, noise=mx.array(noise),
                       conditioning=bfl_conditioner(ours_control, control_type))
    ours = [np.array(latents) for _, latents in pipe.steps(job)]
    image = np.array(pipe.decode(job.latents, W, H))
    ref_steps, ref_image = _reference(ckpt, photo, ref_control.convert("RGB"), noise,
                                      strength, 3, 30.0)
    assert len(ours) == len(ref_steps) == (3 if strength == 1.0 else 2)
    errs = [rel_err(a, b) for a, b in zip(ours, ref_steps)]
    assert max(errs) <= 1e-3, errs
    assert psnr(image, ref_image) >= 40.0


# ------------------------------------------------------------------ API


def test_restyle_whole_image_and_masked_region(pipe, photo):
    odd = Image.fromarray(data.astronaut()).resize((131, 97), Image.LANCZOS)
    whole = pipe.restyle(odd, None, PROMPT, steps=2, seed=1)[0]
    assert whole.size == odd.size
    assert whole.info["mode"] == "restyle" and whole.info["guidance"] == "30.0"
    assert np.abs(np.asarray(whole, float) - np.asarray(odd, float)).mean() > 2.0
    again = pipe.restyle(odd, odd, PROMPT, steps=2, seed=1)[0]  # control None = the image
    assert np.array_equal(np.asarray(again), np.asarray(whole))

    mask = _rect_mask(photo.size, (30, 20, 90, 70))
    depth = photo.convert("L").filter(ImageFilter.GaussianBlur(3))
    out = pipe.restyle(photo, depth, PROMPT, control_type="depth", mask=mask, steps=2,
                       strength=0.8, seed=2, num_images=2)
    keep = masks.blend_mask(mask, 0, 8) == 0
    for img in out:
        a = np.asarray(img).astype(int)
        assert img.info["guidance"] == "10.0" and img.info["masked"] == "True"
        assert np.array_equal(a[keep], np.asarray(photo).astype(int)[keep])
        assert np.abs(a - np.asarray(photo, int))[mask.astype(bool)].mean() > 1.0
    assert not np.array_equal(np.asarray(out[0]), np.asarray(out[1]))


def test_variant_checks(pipe, ckpt, photo, tmp_path):
    assert pipe.variant == "control"
    mask = _rect_mask(photo.size, (30, 20, 90, 70))
    with pytest.raises(InputError, match="inpaint needs a FLUX.1 Fill model"):
        pipe.inpaint(photo, mask, PROMPT, steps=1)
    with pytest.raises(InputError, match="outpaint needs a FLUX.1 Fill model"):
        pipe.outpaint(photo, PROMPT, left=16, steps=1)
    with pytest.raises(InputError, match="depth needs --control-image"):
        pipe.restyle(photo, None, PROMPT, control_type="depth", steps=1)
    with pytest.raises(InputError, match="control_type must be one of canny, depth, none"):
        pipe.restyle(photo, photo, PROMPT, control_type="pose", steps=1)
    fill = FluxFill.from_pretrained(ckpt, mx.float32)
    assert fill.variant == "fill"
    with pytest.raises(InputError, match="restyle needs a FLUX.1 Canny or Depth"):
        fill.restyle(photo, None, PROMPT, steps=1)
    ones = np.ones((H, W), np.float32)  # the Fill conditioning on a control transformer
    with pytest.raises(InputError, match="conditioning has 320 channels.*takes 64"):
        pipe.prepare(photo, ones, ones, PROMPT, steps=1, guidance=30.0, seed=0, num_images=1,
                     strength=1.0, crop_to_mask=None, prompt_2=None, max_sequence_length=32,
                     conditioning=fill_conditioner)
    with pytest.raises(InputError, match="conditioning has 0 channels.*takes 64"):
        pipe.prepare(photo, ones, ones, PROMPT, steps=1, guidance=30.0, seed=0, num_images=1,
                     strength=1.0, crop_to_mask=None, prompt_2=None, max_sequence_length=32)
    dev = json.loads((ckpt / "transformer" / "config.json").read_text())
    shutil.copytree(ckpt, tmp_path / "dev", symlinks=True)
    (tmp_path / "dev" / "transformer" / "config.json").write_text(
        json.dumps(dict(dev, in_channels=64)))
    index = json.loads((ckpt / "model_index.json").read_text())  # 64 channels of Kontext:
    (tmp_path / "dev" / "model_index.json").unlink()  # refused (dev: test_lora_control.py)
    (tmp_path / "dev" / "model_index.json").write_text(
        json.dumps(dict(index, _class_name="FluxKontextPipeline")))
    with pytest.raises(WeightLoadError, match=r"Kontext transformer \(in_channels 64\); "
                                            "inpaint/outpaint needs a FLUX.1 Fill model"):
        FluxFill.from_pretrained(tmp_path / "dev", mx.float32)
    bfl = load_transformer(ckpt / "control-model" / "flux1-canny-dev.safetensors", mx.float32,
                           expect_in_channels=128, config={"axes_dims_rope": [4, 4, 8]})
    assert bfl.config.in_channels == 128


def test_cli_restyle(ckpt, photo, tmp_path, monkeypatch):
    photo.save(tmp_path / "photo.png")
    Image.fromarray((_rect_mask(photo.size, (30, 20, 90, 70)) * 255).astype(np.uint8)).save(
        tmp_path / "mask.png")
    run = lambda *a: CliRunner().invoke(main, [str(x) for x in a])  # noqa: E731
    assert "--control-type" in run("restyle", "--help").output
    base = ("restyle", "--model", ckpt / "control-model", "--image", tmp_path / "photo.png",
            "--prompt", PROMPT, "--steps", 2, "--seed", 3)
    r = run(*base, "--mask", tmp_path / "mask.png", "--output", tmp_path / "a.png")
    assert r.exit_code == 0, r.output
    res = Image.open(tmp_path / "a.png")
    assert res.size == photo.size and res.text["guidance"] == "30.0"
    keep = masks.blend_mask(_rect_mask(photo.size, (30, 20, 90, 70)), 0, 8) == 0
    assert np.array_equal(np.asarray(res.convert("RGB"))[keep], np.asarray(photo)[keep])
    # the BFL single file (flux1-canny-dev.safetensors) gives the same edit as the folder;
    # the tiny head_dim (16) needs its RoPE axes: BFL files carry no config
    import mlx_edit.weights.flux as wf

    infer = wf.infer_bfl_config
    monkeypatch.setattr(wf, "infer_bfl_config", lambda t, axes=None: infer(t, (4, 4, 8)))
    r = run(*base, "--mask", tmp_path / "mask.png", "--output", tmp_path / "b.png",
            "--transformer", ckpt / "control-model" / "flux1-canny-dev.safetensors")
    monkeypatch.undo()
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), np.asarray(res))
    r = run(*base, "--control-type", "depth", "--control-image", tmp_path / "photo.png",
            "--strength", 0.7, "--output", tmp_path / "c.png")
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "c.png").text["guidance"] == "10.0"
    bad = run(*base, "--control-type", "depth", "--output", tmp_path / "d.png")
    assert bad.exit_code == 2 and "needs --control-image" in bad.output
    bad = run("restyle", "--model", ckpt, "--image", tmp_path / "photo.png", "--prompt", "x",
              "--steps", 1, "--output", tmp_path / "e.png")
    assert bad.exit_code == 2 and "restyle needs a FLUX.1 Canny or Depth" in bad.output
    bad = run(*base, "--control-image", tmp_path / "photo.png", "--output",
              tmp_path / "photo.png", "--overwrite")
    assert bad.exit_code == 2 and "input" in bad.output
    bad = run("inpaint", "--model", ckpt / "control-model", "--image", tmp_path / "photo.png",
              "--mask", tmp_path / "mask.png", "--prompt", "x", "--steps", 1, "--output",
              tmp_path / "f.png")
    assert bad.exit_code == 2 and "inpaint needs a FLUX.1 Fill model" in bad.output


# ------------------------------------------------------------------ ControlNets: quantize


def test_controlnets_are_quantized_with_the_pipeline(ckpt, photo):
    """FluxFill.from_pretrained(..., quantize=8): the ControlNets an edit loads are quantized
    the same way (bit for bit quantize-at-load), not left in full precision."""
    fill = FluxFill.from_pretrained(ckpt, mx.float32, quantize=8)
    union = ckpt / "controlnets" / "union"
    mask = _rect_mask(photo.size, (30, 20, 90, 70))
    job = fill.prepare(photo, mask, masks.blend_mask(mask, 0, 8), PROMPT, steps=2,
                       guidance=30.0, seed=0, num_images=1, strength=1.0, crop_to_mask=None,
                       prompt_2=None, max_sequence_length=32)
    assert job.plan.model_size == (W, H) and not job.plan.resized
    spec = ControlNetSpec(union, photo, "canny", scale=0.8)
    fn = prepare_controls(fill.job_context(job), [spec])[0][0]
    latents = mx.random.normal(job.latents.shape, key=mx.random.key(1))
    t = mx.array([0.6])
    got = fn(latents, t, 0)
    cond = fill.encode_image(to_array(preprocess(photo, "canny")))
    ids = image_ids(*token_grid(H, W))
    q8 = cw.load_controlnet(union, mx.float32, quantize=8)
    full = cw.load_controlnet(union, mx.float32)
    assert quantized_layers(q8) and not quantized_layers(full)

    def residuals(model):
        r = model(latents, ids, job.embeds.txt, t, job.embeds.pooled, mx.array([30.0]),
                  cond=cond, mode=0, scale=0.8)
        return [np.array(a) for a in r.double + r.single]

    ours, want, unquantized = [np.array(a) for a in got.double + got.single], \
        residuals(q8), residuals(full)
    assert all(np.array_equal(a, b) for a, b in zip(ours, want))
    assert max(rel_err(a, b) for a, b in zip(ours, unquantized)) > 1e-6


# ------------------------------------------------------------------ ControlNets: convert


def _params(model):
    return dict(tree_flatten(model.parameters()))


def _same(a, b) -> bool:
    pa, pb = _params(a), _params(b)
    return pa.keys() == pb.keys() and all(
        pa[k].dtype == pb[k].dtype and mx.array_equal(pa[k], pb[k]).item() for k in pa)


def test_convert_controlnet_cli(ckpt, tmp_path):
    """`mlx-edit convert` on a ControlNet: q8 (group 32: tiny widths) loads back bit for bit
    as quantize-at-load; x-flux files need --transformer-config for a small head_dim;
    pipeline-only options and re-quantizing a quantized folder are usage errors."""
    src = ckpt / "controlnets" / "union"
    run = lambda *a: CliRunner().invoke(main, ["convert", *map(str, a)])  # noqa: E731
    r = run(src, tmp_path / "q8", "--dtype", "float32", "-q", 8, "--group-size", 32)
    assert r.exit_code == 0, r.output
    assert "wrote ControlNet" in r.output and "8-bit (group 32)" in r.output
    cfg = json.loads((tmp_path / "q8" / "config.json").read_text())
    assert cfg["_class_name"] == "FluxControlNetModel"
    assert (cfg["quantization"]["bits"], cfg["quantization"]["group_size"]) == (8, 32)
    loaded = cw.load_controlnet(tmp_path / "q8", mx.float32)
    assert isinstance(loaded.controlnet_blocks[0], nn.QuantizedLinear)
    assert isinstance(loaded.controlnet_x_embedder, nn.Linear)
    assert _same(loaded, cw.load_controlnet(src, mx.float32, quantize=8, group_size=32))

    r = run(tmp_path / "q8", tmp_path / "q4", "-q", 4)
    assert r.exit_code == 2 and "already quantized to 8 bits" in r.output
    r = run(src, tmp_path / "v", "--vae", ckpt / "vae")
    assert r.exit_code == 2 and "is a ControlNet: --vae" in r.output
    xflux = ckpt / "controlnets" / "xlabs-flux-controlnet.safetensors"
    r = run(xflux, tmp_path / "xl")
    assert r.exit_code == 2 and "axes_dims_rope" in r.output and "--transformer-config" in r.output
    (tmp_path / "rope.json").write_text(json.dumps({"axes_dims_rope": [4, 4, 8]}))
    r = run(xflux, tmp_path / "xl", "--dtype", "float32", "--transformer-config",
            tmp_path / "rope.json")
    assert r.exit_code == 0, r.output
    want = cw.load_controlnet(xflux, mx.float32, config={"axes_dims_rope": [4, 4, 8]})
    assert _same(cw.load_controlnet(tmp_path / "xl", mx.float32), want)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders


def test_damaged_converted_controlnet_is_refused(ckpt, tmp_path):
    dest = cw.convert_controlnet(ckpt / "controlnets" / "instantx", tmp_path / "q8",
                                 mx.float32, bits=8, group_size=32)
    shard = dest / "model.safetensors"
    tensors = dict(mx.load(str(shard)))
    for dropped, message in (("controlnet_x_embedder.bias", "missing: controlnet_x_embedder.bias"),
                             ("controlnet_blocks.1.scales", "controlnet_blocks.1 is not quantized")):
        mx.save_safetensors(str(shard), {k: v for k, v in tensors.items() if k != dropped})
        with pytest.raises(WeightLoadError, match=message):
            cw.load_controlnet(dest, mx.float32)
    mx.save_safetensors(str(shard), tensors)
    cfg = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, "quantization": {
        **cfg["quantization"], "bits": 4}}))
    with pytest.raises(WeightLoadError, match="records 4-bit .* stored at 8 bits"):
        cw.load_controlnet(dest, mx.float32)


def test_controlnet_source_detection(ckpt, tmp_path, monkeypatch):
    import huggingface_hub

    nets = ckpt / "controlnets"
    xflux = nets / "xlabs-flux-controlnet.safetensors"
    for source in (nets / "union", nets / "xlabs", xflux):
        assert cw.is_controlnet_source(source), source
    for source in (ckpt, ckpt / "transformer", ckpt / "flux1-fill-dev.safetensors",
                   ckpt / "control-model", tmp_path / "missing", "not a repo"):
        assert not cw.is_controlnet_source(source), source
    (tmp_path / "one").mkdir()
    shutil.copy(xflux, tmp_path / "one")
    assert cw.is_controlnet_source(tmp_path / "one")
    repo = "XLabs-AI/flux-controlnet-canny-v3"  # the hub is asked for the file list only
    for files, want in ((["flux-canny-controlnet-v3.safetensors", "README.md"], True),
                        (["model_index.json", "transformer/config.json"], False),
                        (None, False)):
        monkeypatch.setattr(cw, "_root_files_of_repo", lambda name, f=files: f)
        assert cw.is_controlnet_source(repo) is want, files
    monkeypatch.setattr(cw, "_root_files_of_repo",
                        lambda name: ["config.json", "diffusion_pytorch_model.safetensors"])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda name, filename: str(nets / "union" / filename))
    assert cw.is_controlnet_source("InstantX/FLUX.1-dev-Controlnet-Union")
