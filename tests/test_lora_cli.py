"""LoRAs through the Python API and `mlx-edit inpaint --lora`, end to end on a real photo
with the tiny checkpoint."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from test_cli import invoke, photos  # noqa: F401  (fixture)

from mlx_edit.imaging.images import InputError
from mlx_edit.models import lora as L
from mlx_edit.models.flux import FluxConfig
from mlx_edit.weights.core import WeightLoadError, read_config


def _lora(path, cfg: FluxConfig, kohya: bool, seed: int):
    """A random rank-4 LoRA on block 0's attention and single block 0 (input projection)."""
    rng = np.random.default_rng(seed)
    h, mlp = cfg.hidden_size, cfg.mlp_hidden
    if kohya:  # BFL names with '_', lora_down/lora_up, alpha
        mods = {"lora_unet_double_blocks_0_img_attn_qkv": (3 * h, h),
                "lora_unet_single_blocks_0_linear1": (3 * h + mlp, h)}
        roles = ("lora_down", "lora_up")
    else:  # diffusers names: separate q, k, v folded into our fused layer
        mods = {f"transformer.transformer_blocks.0.attn.to_{c}": (h, h) for c in "qkv"}
        mods["transformer.single_transformer_blocks.0.proj_mlp"] = (mlp, h)
        roles = ("lora_A", "lora_B")
    tensors = {}
    for m, (out, inp) in mods.items():
        tensors[f"{m}.{roles[0]}.weight"] = rng.standard_normal((4, inp)) * 0.3
        tensors[f"{m}.{roles[1]}.weight"] = rng.standard_normal((out, 4)) * 0.3
        if kohya:
            tensors[f"{m}.alpha"] = np.array(8.0)
    mx.save_safetensors(str(path), {k: mx.array(v.astype(np.float32)) for k, v in tensors.items()})
    return path


@pytest.fixture(scope="module")
def loras(tiny_mlx, tmp_path_factory):
    cfg = FluxConfig.from_dict(read_config(tiny_mlx / "transformer"))
    d = tmp_path_factory.mktemp("loras")
    return _lora(d / "a.safetensors", cfg, False, 1), _lora(d / "b.safetensors", cfg, True, 2)


def test_cli_inpaint_with_two_loras(tiny_mlx, photos, loras, tmp_path):  # noqa: F811
    outs = []
    for name, extra in (("base", []), ("lora", ["--lora", f"{loras[0]}:0.8",
                                                "--lora", f"{loras[1]}:0.5"])):
        out = tmp_path / f"{name}.png"
        r = invoke("inpaint", "--model", tiny_mlx, "--image", photos / "astronaut.png",
                   "--mask", photos / "mask.png", "--prompt", "a red hat", "--steps", 2,
                   "--seed", 3, "--output", out, *extra)
        assert r.exit_code == 0, r.output
        outs.append(Image.open(out))
    a, b = (np.asarray(o.convert("RGB"), np.float32) for o in outs)
    assert np.abs(a[70:130, 110:180] - b[70:130, 110:180]).max() > 1  # the LoRAs act
    assert np.array_equal(a[:40], b[:40])  # outside the mask the photo is kept
    assert "a.safetensors" in outs[1].info["loras"] and "0.5" in outs[1].info["loras"]
    assert "loras" not in outs[0].info


def test_cli_bad_lora_is_a_usage_error(tiny_mlx, photos, tmp_path):  # noqa: F811
    bad = tmp_path / "bad.safetensors"
    mx.save_safetensors(str(bad), {"lora_unet_down_blocks_0_proj_in.lora_down.weight":
                                   mx.zeros((4, 8))})
    r = invoke("inpaint", "--model", tiny_mlx, "--image", photos / "astronaut.png",
               "--mask", photos / "mask.png", "--prompt", "x", "--steps", 1,
               "--output", tmp_path / "o.png", "--lora", f"{bad}:0.7")
    assert r.exit_code == 2 and "lora_unet_down_blocks_0_proj_in" in r.output
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("low_memory", [False, True])
def test_api_load_rescale_unload(tiny_mlx, loras, low_memory):
    from mlx_edit.editing.pipeline import FluxFill

    pipe = FluxFill.from_pretrained(tiny_mlx, mx.float32, low_memory=low_memory)
    base = pipe.transformer.double_blocks[0].img_attn.qkv
    assert pipe.load_lora(loras[0], 0.8) == "a"
    assert pipe.load_lora(loras[1], 0.5, name="style") == "style"
    model = pipe.transformer
    assert L.adapter_names(model) == ["a", "style"] and L.scale_of(model, "a") == pytest.approx(0.8)
    pipe.set_lora_scales({"style": -1.0})
    assert L.scale_of(pipe.transformer, "style") == -1.0
    with pytest.raises(InputError, match="no LoRA named nope"):
        pipe.set_lora_scales({"nope": 1.0})
    with pytest.raises(InputError, match="already loaded"):
        pipe.load_lora(loras[0], name="a")
    pipe.unload_loras(["a"])
    assert L.adapter_names(pipe.transformer) == ["style"]
    pipe.unload_loras()
    assert not L.lora_layers(pipe.transformer)
    if not low_memory:  # the very same base layer object is back
        assert pipe.transformer.double_blocks[0].img_attn.qkv is base


def test_api_lora_for_a_missing_layer_is_refused(tiny_mlx, tmp_path):
    from mlx_edit.editing.pipeline import FluxFill

    path = tmp_path / "deep.safetensors"
    mx.save_safetensors(str(path), {
        "transformer.transformer_blocks.40.attn.to_q.lora_A.weight": mx.zeros((4, 32)),
        "transformer.transformer_blocks.40.attn.to_q.lora_B.weight": mx.zeros((32, 4))})
    pipe = FluxFill.from_pretrained(tiny_mlx, mx.float32)
    with pytest.raises(WeightLoadError, match="double_blocks.40.img_attn.qkv"):
        pipe.load_lora(path)
    assert not pipe.loras and not L.lora_layers(pipe.transformer)


def test_convert_bakes_loras(tiny_mlx, loras, tmp_path):
    """`mlx-edit convert --lora a:0.8 --lora b:0.5` equals the unfused LoRAs on the
    source, records them, and refuses a LoRA for the wrong model before writing."""
    import json

    from click.testing import CliRunner

    from mlx_edit.cli.convert import convert_command
    from mlx_edit.weights.flux import load_transformer
    from mlx_edit.weights.lora import load_lora_file

    out = tmp_path / "baked"
    r = CliRunner().invoke(convert_command, [str(tiny_mlx), str(out), "--dtype", "float32",
                                             "--lora", f"{loras[0]}:0.8",
                                             "--lora", f"{loras[1]}:0.5"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    assert cfg["baked_loras"] == [[str(loras[0]), 0.8], [str(loras[1]), 0.5]]
    baked = load_transformer(out / "transformer", mx.float32)
    ref = load_transformer(tiny_mlx / "transformer", mx.float32)
    for i, (path, scale) in enumerate(zip(loras, (0.8, 0.5))):
        L.attach(ref, f"l{i}", load_lora_file(path).updates(ref), scale)
    g = np.random.default_rng(0)
    cfgm = ref.config
    x = [mx.array(g.standard_normal((1, 8, cfgm.in_channels)).astype(np.float32)),
         mx.array(np.stack([np.zeros(8), np.arange(8) // 4, np.arange(8) % 4], 1)),
         mx.array(g.standard_normal((1, 3, cfgm.joint_attention_dim)).astype(np.float32)),
         mx.zeros((3, 3)), mx.array([0.5]),
         mx.array(g.standard_normal((1, cfgm.pooled_projection_dim)).astype(np.float32)),
         mx.array([30.0])]
    want, got = np.array(ref(*x)), np.array(baked(*x))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()

    wrong = tmp_path / "wrong.safetensors"
    mx.save_safetensors(str(wrong), {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight":
                                     mx.zeros((4, 7)),
                                     "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight":
                                     mx.zeros((cfgm.hidden_size, 4))})
    r = CliRunner().invoke(convert_command, [str(tiny_mlx), str(tmp_path / "no"), "--lora",
                                             str(wrong)])
    assert r.exit_code == 2 and "double_blocks.0.img_attn.proj" in r.output
    assert not (tmp_path / "no").exists()


def test_cli_kontext_edit_with_a_lora(tmp_path, import_script):
    """`mlx-edit edit --lora`: FluxKontext shares the pipeline's LoRA support."""
    from PIL import Image as PILImage
    from skimage import data

    from test_cli import invoke as run

    ckpt = import_script("make_mlx_checkpoint").build(tmp_path / "k", "tiny",
                                                      extras=("kontext-model",))
    model = ckpt / "kontext-model"
    cfg = FluxConfig.from_dict(read_config(model / "transformer"))
    lora = _lora(tmp_path / "k.safetensors", cfg, True, 4)
    src = tmp_path / "photo.png"
    PILImage.fromarray(data.astronaut()).crop((0, 40, 300, 240)).save(src)
    outs = []
    for name, extra in (("base", []), ("lora", ["--lora", f"{lora}:0.9"])):
        out = tmp_path / f"{name}.png"
        r = run("edit", "--model", model, "-i", src, "--instruction", "make it red",
                "--steps", 1, "--max-sequence-length", 32, "--no-auto-resize",
                "--width", 96, "--height", 64, "--seed", 5, "-o", out, *extra)
        assert r.exit_code == 0, r.output
        outs.append(PILImage.open(out))
    a, b = (np.asarray(o.convert("RGB"), np.float32) for o in outs)
    assert np.abs(a - b).max() > 1 and "k.safetensors" in outs[1].info["loras"]
