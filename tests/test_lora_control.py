"""BFL control LoRAs (FLUX.1-Canny/Depth-dev-lora layout) on a FLUX.1-dev base: the model
becomes the 128-channel control variant; parity with diffusers (FluxLoraLoaderMixin, as
FluxControlPipeline.load_lora_weights) for the transformer and a full Canny restyle;
unloading restores the base exactly.

diffusers' converter (`_convert_bfl_flux_control_lora_to_diffusers`) hard-codes FLUX.1's
19 double and 38 single blocks and splits linear1 at 3072/12288: the file diffusers reads
is padded with rank-1 entries for the blocks our small models lack (diffusers ignores
modules the model lacks), and the tiny-width models have no single block; the
single-block path is checked at FLUX.1 width (slow test).
"""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import json

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from skimage import data

torch = pytest.importorskip("torch")  # the reference side: diffusers on torch (parity extra)

from test_flux import build_reference, make_inputs, rel_err, run_ours, run_reference  # noqa: E402
from test_lora import Host, _pair, _save, bfl_modules, fresh_reference  # noqa: E402

from mlx_edit.imaging.images import InputError  # noqa: E402
from mlx_edit.models import lora as L  # noqa: E402
from mlx_edit.weights.core import WeightLoadError  # noqa: E402
from mlx_edit.weights.flux import load_transformer  # noqa: E402
from mlx_edit.weights.lora import LoadedLoRA, load_lora_file, sync  # noqa: E402

TOL = 1e-4
# A FLUX.1-dev base (64 input channels), double blocks only (see the module docstring).
DEV = dict(in_channels=64, out_channels=64, num_layers=2, num_single_layers=0,
           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
           pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
CONTROL = dict(DEV, in_channels=128)
FULL_DOUBLE, FULL_SINGLE, FULL_HIDDEN = 19, 38, 3072


FINAL_MOD = "final_layer.adaLN_modulation.1"


def control_lora(ours, seed, rank=4, std=0.1, in_channels=128):
    """BFL control LoRA names for `ours`: lora_A / lora_B / lora_B.bias on every linear,
    img_in reading `in_channels`, full QK-norm scales (BFL src/flux/modules/lora.py).

    diffusers' converter swaps the halves of the final modulation's lora_A (rank axis) as
    well as lora_B's [shift; scale] rows, which changes B @ A (the bug of diffusers issue
    13998 in another converter); BFL swaps nothing (its layout) and we swap B's rows only.
    So that both sides agree, that A's two rank halves are equal here;
    `test_final_modulation_follows_bfl` checks our swap alone."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for name, (out, inp) in sorted(bfl_modules(ours).items()):
        inp = in_channels if name == "img_in" else inp
        a, b = _pair(g, out, inp, rank, std)
        if name == FINAL_MOD:
            a = torch.cat([a[: rank // 2]] * 2)
        sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = a, b
        sd[f"{name}.lora_B.bias"] = torch.randn(out, generator=g) * std
    head = ours.config.attention_head_dim
    norms = [f"double_blocks.{i}.{s}_attn.norm" for i in range(len(ours.double_blocks))
             for s in ("img", "txt")]
    norms += [f"single_blocks.{i}.norm" for i in range(len(ours.single_blocks))]
    for n in norms:
        for kind in ("query_norm", "key_norm"):
            sd[f"{n}.{kind}.scale"] = 1.0 + 0.5 * torch.randn(head, generator=g)
    return sd


def padded(sd, double, single):
    """`sd` plus rank-1 entries for blocks [double, 19) and [single, 38), which diffusers'
    converter requires and then finds no module for."""
    out = dict(sd)
    z = torch.zeros

    def pair(name, rows):
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = z(1, 1), z(rows, 1)

    for i in range(double, FULL_DOUBLE):
        for s in ("img", "txt"):
            for m in ("mod.lin", "attn.proj", "mlp.0", "mlp.2"):
                pair(f"double_blocks.{i}.{s}_{m}", 1)
            pair(f"double_blocks.{i}.{s}_attn.qkv", 3)
            for kind in ("query_norm", "key_norm"):
                out[f"double_blocks.{i}.{s}_attn.norm.{kind}.scale"] = z(1)
    for i in range(single, FULL_SINGLE):
        pair(f"single_blocks.{i}.modulation.lin", 1)
        pair(f"single_blocks.{i}.linear1", 3 * FULL_HIDDEN + 4 * FULL_HIDDEN)
        pair(f"single_blocks.{i}.linear2", 1)
        for kind in ("query_norm", "key_norm"):
            out[f"single_blocks.{i}.norm.{kind}.scale"] = z(1)
    return out


def files(tmp_path, ours, seed=7, **kw):
    """(our file, diffusers' padded file) of one random control LoRA."""
    sd = control_lora(ours, seed, **kw)
    n_double, n_single = len(ours.double_blocks), len(ours.single_blocks)
    ref_sd = padded({k: v.clone() for k, v in sd.items()}, n_double, n_single)
    return (_save(sd, tmp_path / "control.safetensors"),
            _save(ref_sd, tmp_path / "control_padded.safetensors"))


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora_dev")
    build_reference(DEV).save_pretrained(folder, safe_serialization=True)
    return folder


def _apply(model, path, scale, name="c"):
    loras = {name: LoadedLoRA(load_lora_file(path), str(path), scale)}
    sync(model, loras)
    return loras


@pytest.mark.parity
def test_control_lora_matches_diffusers_and_unloads_exactly(dev, tmp_path):
    ours = load_transformer(dev, mx.float32)
    ours_file, ref_file = files(tmp_path, ours)
    lora = load_lora_file(ours_file)
    assert lora.formats == ("bfl",) and lora.widths == {"img_in": 128} and len(lora.norms) == 8
    x64, x = make_inputs(DEV), make_inputs(CONTROL)
    base = run_ours(ours, x64)
    ref = fresh_reference(dev)
    Host(ref).load({ref_file: 0.8})
    assert ref.config.in_channels == 128  # diffusers widened x_embedder too
    want = run_reference(ref, x)
    loras = _apply(ours, ours_file, 0.8)
    assert ours.config.in_channels == 128
    assert rel_err(run_ours(ours, x), want) <= TOL
    L.set_scales(ours, {"c": 0.0})  # norms replaced, widened, no low-rank update
    assert rel_err(run_ours(ours, x), want) > 1e-2  # the adapters matter
    fused = load_transformer(dev, mx.float32)
    sync(fused, loras)
    L.fuse(fused)
    assert rel_err(run_ours(fused, x), want) <= TOL
    sync(ours, {})
    assert ours.config.in_channels == 64 and ours.img_in.weight.shape[1] == 64
    assert np.array_equal(run_ours(ours, x64), base)  # widened img_in and norms restored


@pytest.mark.parity
def test_control_lora_with_a_style_lora_in_either_order(dev, tmp_path):
    """A plain LoRA's 64-input img_in A is zero-padded on the widened layer (diffusers
    _maybe_expand_lora_state_dict); loading order does not matter; unloading the control
    LoRA leaves the style LoRA on the 64-channel base."""
    from test_lora import diffusers_lora

    ours = load_transformer(dev, mx.float32)
    ours_file, ref_file = files(tmp_path, ours)
    style = _save(diffusers_lora(fresh_reference(dev), 3, alpha=8), tmp_path / "style.safetensors")
    ref = fresh_reference(dev)
    Host(ref).load({ref_file: 0.7, style: 0.5})
    x, x64 = make_inputs(CONTROL), make_inputs(DEV)
    want = run_reference(ref, x)
    c, s = (LoadedLoRA(load_lora_file(p), str(p), w) for p, w in ((ours_file, 0.7), (style, 0.5)))
    sync(ours, {"s": s})
    style_only = run_ours(ours, x64)
    sync(ours, {"s": s, "c": c})  # the control LoRA second: everything is rebuilt
    assert rel_err(run_ours(ours, x), want) <= TOL
    sync(ours, {"s": s})
    assert ours.config.in_channels == 64
    assert np.array_equal(run_ours(ours, x64), style_only)


def test_accepted_widths_follow_the_folder_class():
    """FluxFill takes FLUX.1-dev (64, a base for control LoRAs) but not a Kontext folder
    (also 64); FluxKontext keeps taking any 64-channel folder."""
    from mlx_edit.variants import accepted_in_channels

    fill = ("fill", "control", "dev")
    assert accepted_in_channels(*fill, pipeline_class="FluxPipeline") == (384, 128, 64)
    assert accepted_in_channels(*fill, pipeline_class="FluxKontextPipeline") == (384, 128)
    assert accepted_in_channels("kontext", pipeline_class="FluxPipeline") == (64,)


def test_control_lora_problems_change_nothing(dev, tmp_path):
    ours = load_transformer(dev, mx.float32)
    sd = control_lora(ours, 1)
    sd["double_blocks.0.img_attn.norm.query_norm.scale"] = torch.ones(3)  # wrong width
    sd["double_blocks.5.txt_attn.norm.key_norm.scale"] = torch.ones(16)  # no such block
    path = _save(sd, tmp_path / "bad.safetensors")
    x = make_inputs(DEV)
    base = run_ours(ours, x)
    with pytest.raises(WeightLoadError, match=r"double_blocks\.5\.txt_attn\.norm_k\.weight \(no "
                       r"such parameter.*img_attn\.norm_q\.weight \(file \(3,\), model \(16,\)\)"):
        _apply(ours, path, 1.0)
    assert np.array_equal(run_ours(ours, x), base) and not L.lora_layers(ours)
    sd = control_lora(ours, 1)
    sd["txt_in.lora_A.weight"] = torch.zeros(4, 48)  # a layer that cannot be widened
    with pytest.raises(WeightLoadError, match="txt_in"):
        load_lora_file(_save(sd, tmp_path / "wide_txt.safetensors")).updates(ours)
    from mlx_edit.weights.lora import baker

    with pytest.raises(WeightLoadError, match="cannot be baked by convert"):
        baker(ours, [(_save(control_lora(ours, 1), tmp_path / "c.safetensors"), 1.0)])


def test_final_modulation_follows_bfl(dev, tmp_path):
    """BFL's final adaLN modulation rows are [shift; scale], ours [scale; shift]: our
    update is B @ A with B's rows (and the bias) swapped, A untouched."""
    ours = load_transformer(dev, mx.float32)
    sd = control_lora(ours, 2, in_channels=64)
    g = torch.Generator().manual_seed(9)
    sd[f"{FINAL_MOD}.lora_A.weight"] = torch.randn(sd[f"{FINAL_MOD}.lora_A.weight"].shape,
                                                   generator=g)
    a, b, bias = (sd[f"{FINAL_MOD}.lora_{k}"].numpy() for k in ("A.weight", "B.weight", "B.bias"))
    update = load_lora_file(_save(sd, tmp_path / "c.safetensors")).updates(ours)[
        "final_layer.modulation"]
    half = b.shape[0] // 2
    swap = np.concatenate([np.arange(half, 2 * half), np.arange(half)])
    np.testing.assert_allclose((update.a @ update.b).T, (b @ a)[swap], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(update.bias, bias[swap])


# ------------------------------------------------------------------ pipeline


@pytest.fixture(scope="module")
def dev_ckpt(tmp_path_factory, import_script):
    """The tiny checkpoint (torch-free) with dev-model/: FLUX.1-dev's layout, built without
    single blocks (module docstring)."""
    out = tmp_path_factory.mktemp("ckpt-dev") / "tiny"
    script = import_script("make_mlx_checkpoint")
    script.build(out, "tiny")
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    script.write_variant_model(out, dict(cfg, num_single_layers=0), "dev-model", seed=50)
    return out / "dev-model"


W, H = 128, 96
PROMPT = "a bronze statue of an astronaut"


@pytest.mark.parity
def test_canny_restyle_with_control_lora_matches_diffusers(dev_ckpt, tmp_path):
    """FluxFill on FLUX.1-dev + the control LoRA vs diffusers' FluxControlPipeline with
    it loaded: every step's latents and the decoded image (PSNR >= 40 dB)."""
    import test_restyle as R

    from mlx_edit.conditioning.bfl_control import bfl_conditioner
    from mlx_edit.conditioning.controlnet import preprocess
    from mlx_edit.editing.fill import FluxFill

    pipe = FluxFill.from_pretrained(dev_ckpt, mx.float32)
    assert pipe.variant == "dev"
    photo = Image.fromarray(data.astronaut()).resize((W, H), Image.LANCZOS)
    with pytest.raises(InputError, match="restyle needs .*or FLUX.1-dev with a BFL control"):
        pipe.restyle(photo, None, PROMPT, steps=1)
    ours_file, ref_file = files(tmp_path, pipe.transformer, std=0.2)
    pipe.load_lora(ours_file, 0.9)
    assert pipe.variant == "control" and pipe.transformer.config.in_channels == 128
    noise = np.random.default_rng(3).standard_normal((1, 48, 64)).astype(np.float32)
    ones = np.ones((H, W), np.float32)
    job = pipe.prepare(photo, ones, ones, PROMPT, steps=3, guidance=30.0, seed=0,
                       num_images=1, strength=1.0, crop_to_mask=None, prompt_2=None,
                       max_sequence_length=32, noise=mx.array(noise),
                       conditioning=bfl_conditioner(photo, "canny"))
    ours = [np.array(latents) for _, latents in pipe.steps(job)]
    image = np.array(pipe.decode(job.latents, W, H))
    control = preprocess(photo, "canny", canny_low=50, canny_high=200).convert("RGB")
    ref_steps, ref_image = _reference(dev_ckpt, R, ref_file, control, noise, 3)
    errs = [rel_err(a, b) for a, b in zip(ours, ref_steps)]
    assert len(errs) == 3 and max(errs) <= 1e-3, errs
    assert R.psnr(image, ref_image) >= 40.0
    pipe.unload_loras()
    assert pipe.variant == "dev" and pipe.transformer.config.in_channels == 64


def _reference(ckpt, R, lora_file, control, noise, steps):
    """diffusers FluxControlPipeline on the dev folder with the LoRA loaded at 0.9."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    ref = diffusers.FluxControlPipeline.from_pretrained(ckpt)
    ref.load_lora_weights(str(lora_file), adapter_name="c")
    ref.set_adapters(["c"], [0.9])
    ref.set_progress_bar_config(disable=True)
    out = []

    def on_step(_pipe, i, t, kwargs):
        out.append(kwargs["latents"].numpy().copy())
        return {}

    noise = torch.from_numpy(noise)
    with R._deterministic(ref._unpack_latents(noise, H, W, ref.vae_scale_factor)), \
            torch.no_grad():
        latents = ref(prompt=PROMPT, control_image=control, height=H, width=W,
                      num_inference_steps=steps, guidance_scale=30.0, max_sequence_length=32,
                      output_type="latent", callback_on_step_end=on_step, latents=noise,
                      return_dict=False)[0]
        z = ref._unpack_latents(latents, H, W, ref.vae_scale_factor)
        z = z / ref.vae.config.scaling_factor + ref.vae.config.shift_factor
        image = ref.vae.decode(z, return_dict=False)[0].permute(0, 2, 3, 1).numpy()
    return out, image


# ------------------------------------------------------------------ FLUX.1 width

# One single block at FLUX.1's width (diffusers splits linear1 at 3072/12288), no double.
WIDE_DEV = dict(in_channels=64, out_channels=64, num_layers=0, num_single_layers=1,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=64,
                pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


@pytest.mark.parity
@pytest.mark.slow
def test_control_lora_single_block_at_flux_width_matches_diffusers(tmp_path):
    folder = tmp_path / "wide_dev"
    build_reference(WIDE_DEV).save_pretrained(folder, safe_serialization=True)
    ours = load_transformer(folder, mx.float32)
    ours_file, ref_file = files(tmp_path, ours, rank=2, std=0.02)
    x = make_inputs(dict(WIDE_DEV, in_channels=128), batch=1)
    ref = fresh_reference(folder)
    Host(ref).load({ref_file: 0.8})
    want = run_reference(ref, x)
    del ref
    _apply(ours, ours_file, 0.8)
    assert rel_err(run_ours(ours, x), want) <= TOL


# ------------------------------------------------------------------ CLI, quantized


@pytest.fixture(scope="module")
def dev_mlx(tmp_path_factory, import_script):
    """The tiny checkpoint with --extras dev-model (torch-free build)."""
    out = tmp_path_factory.mktemp("mlx-dev") / "tiny"
    return import_script("make_mlx_checkpoint").build(out, "tiny", extras=("dev-model",))


def test_cli_restyle_with_a_control_lora_on_dev(dev_mlx, tmp_path):
    from click.testing import CliRunner

    from mlx_edit.cli.main import main

    model = dev_mlx / "dev-model"
    lora = _save(control_lora(load_transformer(model / "transformer", mx.float32), 5, std=0.2),
                 tmp_path / "canny.safetensors")
    Image.fromarray(data.astronaut()).resize((W, H)).save(tmp_path / "photo.png")
    base = ["restyle", "--model", str(model), "--image", str(tmp_path / "photo.png"),
            "--prompt", PROMPT, "--steps", "2", "--seed", "3", "--output",
            str(tmp_path / "out.png")]
    r = CliRunner().invoke(main, base)
    assert r.exit_code != 0 and "FLUX.1-dev with a BFL control LoRA" in r.output, r.output
    r = CliRunner().invoke(main, [*base, "--lora", f"{lora}:0.9"])
    assert r.exit_code == 0, r.output
    out = Image.open(tmp_path / "out.png")
    assert out.size == (W, H) and "canny.safetensors" in out.info["loras"]


def test_control_lora_on_a_quantized_dev_model(dev_mlx, tmp_path):
    """q8: the control LoRA applies (img_in and norms stay float, adapters sit on the
    quantized layers) and unloading restores the quantized base exactly."""
    import mlx.nn as nn

    from mlx_edit.editing.fill import FluxFill

    pipe = FluxFill.from_pretrained(dev_mlx / "dev-model", mx.float32, quantize=8)
    cfg = dict(DEV, joint_attention_dim=pipe.transformer_config.joint_attention_dim,
               pooled_projection_dim=pipe.transformer_config.pooled_projection_dim)
    x64, x = make_inputs(cfg), make_inputs(dict(cfg, in_channels=128))
    base = run_ours(pipe.transformer, x64)
    assert isinstance(pipe.transformer.double_blocks[0].img_mlp.fc2, nn.QuantizedLinear)
    lora = control_lora(load_transformer(dev_mlx / "dev-model" / "transformer", mx.float32), 6)
    pipe.load_lora(_save(lora, tmp_path / "c.safetensors"), 0.8)
    assert pipe.variant == "control"
    assert any(isinstance(m.base, nn.QuantizedLinear) for _, m in L.lora_layers(pipe.transformer))
    assert np.isfinite(run_ours(pipe.transformer, x)).all()
    pipe.unload_loras()
    assert np.array_equal(run_ours(pipe.transformer, x64), base)
