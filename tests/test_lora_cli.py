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
def loras(tiny_ckpt, tmp_path_factory):
    cfg = FluxConfig.from_dict(read_config(tiny_ckpt / "transformer"))
    d = tmp_path_factory.mktemp("loras")
    return _lora(d / "a.safetensors", cfg, False, 1), _lora(d / "b.safetensors", cfg, True, 2)


def test_cli_inpaint_with_two_loras(tiny_ckpt, photos, loras, tmp_path):  # noqa: F811
    outs = []
    for name, extra in (("base", []), ("lora", ["--lora", f"{loras[0]}:0.8",
                                                "--lora", f"{loras[1]}:0.5"])):
        out = tmp_path / f"{name}.png"
        r = invoke("inpaint", "--model", tiny_ckpt, "--image", photos / "astronaut.png",
                   "--mask", photos / "mask.png", "--prompt", "a red hat", "--steps", 2,
                   "--seed", 3, "--output", out, *extra)
        assert r.exit_code == 0, r.output
        outs.append(Image.open(out))
    a, b = (np.asarray(o.convert("RGB"), np.float32) for o in outs)
    assert np.abs(a[70:130, 110:180] - b[70:130, 110:180]).max() > 1  # the LoRAs act
    assert np.array_equal(a[:40], b[:40])  # outside the mask the photo is kept
    assert "a.safetensors" in outs[1].info["loras"] and "0.5" in outs[1].info["loras"]
    assert "loras" not in outs[0].info


def test_cli_bad_lora_is_a_usage_error(tiny_ckpt, photos, tmp_path):  # noqa: F811
    bad = tmp_path / "bad.safetensors"
    mx.save_safetensors(str(bad), {"lora_unet_down_blocks_0_proj_in.lora_down.weight":
                                   mx.zeros((4, 8))})
    r = invoke("inpaint", "--model", tiny_ckpt, "--image", photos / "astronaut.png",
               "--mask", photos / "mask.png", "--prompt", "x", "--steps", 1,
               "--output", tmp_path / "o.png", "--lora", f"{bad}:0.7")
    assert r.exit_code == 2 and "lora_unet_down_blocks_0_proj_in" in r.output
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("low_memory", [False, True])
def test_api_load_rescale_unload(tiny_ckpt, loras, low_memory):
    from mlx_edit.pipeline import FluxFill

    pipe = FluxFill.from_pretrained(tiny_ckpt, mx.float32, low_memory=low_memory)
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


def test_api_lora_for_a_missing_layer_is_refused(tiny_ckpt, tmp_path):
    from mlx_edit.pipeline import FluxFill

    path = tmp_path / "deep.safetensors"
    mx.save_safetensors(str(path), {
        "transformer.transformer_blocks.40.attn.to_q.lora_A.weight": mx.zeros((4, 32)),
        "transformer.transformer_blocks.40.attn.to_q.lora_B.weight": mx.zeros((32, 4))})
    pipe = FluxFill.from_pretrained(tiny_ckpt, mx.float32)
    with pytest.raises(WeightLoadError, match="double_blocks.40.img_attn.qkv"):
        pipe.load_lora(path)
    assert not pipe.loras and not L.lora_layers(pipe.transformer)
