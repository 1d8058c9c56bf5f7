"""FLUX.2 transformer parity against diffusers' Flux2Transformer2DModel (float32, CPU):
forward with reference tokens, BFL single files, quantized loading and conversion."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_edit.weights.core import WeightLoadError
from mlx_edit.weights.flux2 import load_flux2_transformer

pytestmark = pytest.mark.parity
torch = pytest.importorskip("torch")  # the parity extra: every test here uses it

# Widths are multiples of 64 so the quantization policy has layers to quantize.
TINY = dict(
    in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=4, joint_attention_dim=64, timestep_guidance_channels=32,
    mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, guidance_embeds=True,
)

# BFL names (flux2/src/flux2/model.py) -> diffusers names, written here from diffusers'
# `convert_flux2_transformer_checkpoint_to_diffusers`; `bfl_state_dict` checks it against
# that converter. (BFL key, diffusers keys, op): "qkv" = diffusers' q, k, v concatenated;
# "swap" = the two halves exchanged (BFL's final modulation is [shift; scale]).
_BFL_BLOCK = [
    ("img_attn.qkv.weight", ("attn.to_q", "attn.to_k", "attn.to_v"), "qkv"),
    ("txt_attn.qkv.weight", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "qkv"),
    ("img_attn.norm.query_norm.scale", "attn.norm_q", ""),
    ("img_attn.norm.key_norm.scale", "attn.norm_k", ""),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q", ""),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k", ""),
    ("img_attn.proj.weight", "attn.to_out.0", ""),
    ("txt_attn.proj.weight", "attn.to_add_out", ""),
    ("img_mlp.0.weight", "ff.linear_in", ""),
    ("img_mlp.2.weight", "ff.linear_out", ""),
    ("txt_mlp.0.weight", "ff_context.linear_in", ""),
    ("txt_mlp.2.weight", "ff_context.linear_out", ""),
]
_BFL_SINGLE = [
    ("linear1.weight", "attn.to_qkv_mlp_proj", ""),
    ("linear2.weight", "attn.to_out", ""),
    ("norm.query_norm.scale", "attn.norm_q", ""),
    ("norm.key_norm.scale", "attn.norm_k", ""),
]
_BFL_TOP = [
    ("img_in.weight", "x_embedder", ""),
    ("txt_in.weight", "context_embedder", ""),
    ("time_in.in_layer.weight", "time_guidance_embed.timestep_embedder.linear_1", ""),
    ("time_in.out_layer.weight", "time_guidance_embed.timestep_embedder.linear_2", ""),
    ("guidance_in.in_layer.weight", "time_guidance_embed.guidance_embedder.linear_1", ""),
    ("guidance_in.out_layer.weight", "time_guidance_embed.guidance_embedder.linear_2", ""),
    ("double_stream_modulation_img.lin.weight", "double_stream_modulation_img.linear", ""),
    ("double_stream_modulation_txt.lin.weight", "double_stream_modulation_txt.linear", ""),
    ("single_stream_modulation.lin.weight", "single_stream_modulation.linear", ""),
    ("final_layer.adaLN_modulation.1.weight", "norm_out.linear", "swap"),
    ("final_layer.linear.weight", "proj_out", ""),
]


def build_reference(cfg, seed=0):
    """diffusers' model, its constant tensors (RMSNorm weights at 1) perturbed so a
    swapped or dropped norm weight shows."""
    from conftest import import_script
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(**cfg).eval()
    assert import_script("make_tiny_checkpoint").perturb_constant_tensors(model, seed)
    return model


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def make_inputs(cfg, guidance: bool, batch=2, n_txt=7, seed=1):
    """Target tokens (3x4 grid) then two references (2x3, 4x2) with the ids diffusers'
    klein pipeline builds (`_prepare_latent_ids`, `_prepare_image_ids`: time 10, 20;
    `_prepare_text_ids`)."""
    from diffusers import Flux2KleinPipeline as P

    g = np.random.default_rng(seed)
    c = cfg["in_channels"]
    target = torch.zeros(batch, c, 3, 4)
    refs = [torch.zeros(1, c, 2, 3), torch.zeros(1, c, 4, 2)]
    txt = g.standard_normal((batch, n_txt, cfg["joint_attention_dim"])).astype(np.float32)
    ref_ids = P._prepare_image_ids(refs).repeat(batch, 1, 1)
    img_ids = torch.cat([P._prepare_latent_ids(target), ref_ids], dim=1)
    assert sorted(set(img_ids[0, :, 0].tolist())) == [0, 10, 20]  # the time offsets
    n = img_ids.shape[1]
    return dict(
        img=g.standard_normal((batch, n, c)).astype(np.float32),
        img_ids=img_ids.numpy().astype(np.float32),
        txt=txt,
        txt_ids=P._prepare_text_ids(torch.from_numpy(txt)).numpy().astype(np.float32),
        timestep=np.array([0.7, 0.25][:batch], np.float32),
        guidance=np.array([4.0, 1.5][:batch], np.float32) if guidance else None,
    )


def run_reference(model, x):
    t = {k: None if v is None else torch.from_numpy(v) for k, v in x.items()}
    with torch.no_grad():
        return model(hidden_states=t["img"], encoder_hidden_states=t["txt"],
                     timestep=t["timestep"], img_ids=t["img_ids"], txt_ids=t["txt_ids"],
                     guidance=t["guidance"], return_dict=False)[0].numpy()


def run_ours(model, x):
    a = {k: None if v is None else mx.array(v) for k, v in x.items()}
    return np.array(model(a["img"], a["img_ids"], a["txt"], a["txt_ids"], a["timestep"],
                          a["guidance"]))


def save_diffusers(model, folder):
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module", params=[True, False], ids=["guidance", "no_guidance"])
def tiny(request, tmp_path_factory):
    cfg = {**TINY, "guidance_embeds": request.param}
    model = build_reference(cfg)
    folder = save_diffusers(model, tmp_path_factory.mktemp("flux2") / "transformer")
    return cfg, model, folder


def test_forward_with_references_matches_diffusers(tiny):
    cfg, ref, folder = tiny
    x = make_inputs(cfg, guidance=cfg["guidance_embeds"])
    ours = load_flux2_transformer(folder, mx.float32)
    expected = run_reference(ref, x)
    out = run_ours(ours, x)
    assert out.shape == expected.shape == (2, x["img"].shape[1], cfg["in_channels"])
    assert rel_err(out, expected) <= 1e-4
    # ids given once (N, 4) give the same result as batched (B, N, 4)
    one = {**x, "img_ids": x["img_ids"][0], "txt_ids": x["txt_ids"][0]}
    np.testing.assert_array_equal(run_ours(ours, one), out)


@pytest.mark.parametrize("tiny", [False], ids=["no_guidance"], indirect=True)
def test_guidance_refused_without_embedding(tiny):
    cfg, _, folder = tiny
    assert not cfg["guidance_embeds"]
    x = make_inputs(cfg, guidance=True)
    with pytest.raises(ValueError, match="no guidance embedding"):
        run_ours(load_flux2_transformer(folder, mx.float32), x)


def bfl_state_dict(model) -> dict:
    """The model's weights under BFL's names, checked against diffusers' own BFL ->
    diffusers converter (so this test-side table cannot be wrong the same way ours is)."""
    from diffusers.loaders.single_file_utils import (
        convert_flux2_transformer_checkpoint_to_diffusers as to_diffusers,
    )

    sd = model.state_dict()
    rows = [(k, d, op) for k, d, op in _BFL_TOP if f"{d}.weight" in sd]
    rows += [(f"double_blocks.{i}.{k}", tuple(f"transformer_blocks.{i}.{n}" for n in d)
              if op == "qkv" else f"transformer_blocks.{i}.{d}", op)
             for i in range(model.config.num_layers) for k, d, op in _BFL_BLOCK]
    rows += [(f"single_blocks.{i}.{k}", f"single_transformer_blocks.{i}.{d}", op)
             for i in range(model.config.num_single_layers) for k, d, op in _BFL_SINGLE]
    bfl = {}
    for key, src, op in rows:
        if op == "qkv":
            bfl[key] = torch.cat([sd[f"{s}.weight"] for s in src])
        elif op == "swap":
            bfl[key] = torch.cat(sd[f"{src}.weight"].chunk(2)[::-1])
        else:
            bfl[key] = sd[f"{src}.weight"]
    back = to_diffusers({k: v.clone() for k, v in bfl.items()})
    assert sorted(back) == sorted(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    return bfl


def params(model) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_bfl_file_loads_bit_identical(tiny, tmp_path):
    from safetensors.torch import save_file

    cfg, ref, folder = tiny
    bfl = bfl_state_dict(ref)
    path = tmp_path / "flux-2-tiny.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in bfl.items()}, str(path))
    expected = params(load_flux2_transformer(folder, mx.float32))
    got = load_flux2_transformer(path, mx.float32, config={"axes_dims_rope": [4, 4, 4, 4]})
    assert got.config == load_flux2_transformer(folder, mx.float32).config
    loaded = params(got)
    assert sorted(loaded) == sorted(expected)
    for k in expected:
        np.testing.assert_array_equal(loaded[k], expected[k], err_msg=k)


def test_bfl_file_strict(tiny, tmp_path):
    from safetensors.torch import save_file

    _, ref, _ = tiny
    bfl = bfl_state_dict(ref)
    del bfl["single_blocks.1.linear2.weight"]
    path = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(path))
    with pytest.raises(WeightLoadError, match="single_blocks.1.linear2.weight"):
        load_flux2_transformer(path, mx.float32, config={"axes_dims_rope": [4, 4, 4, 4]})


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_load_and_conversion(tiny, tmp_path, bits):
    """quantize=bits follows the transformer policy (embedders and final layer full), stays
    close to float32, and an `mlx-edit convert`-style folder reloads to the same model."""
    from mlx_edit.weights.convert import ComponentSource, convert_component
    from mlx_edit.weights.loader import open_checkpoint
    from mlx_edit.weights.quantize import quantized_layers

    cfg, ref, folder = tiny
    x = make_inputs(cfg, guidance=cfg["guidance_embeds"])
    full = run_ours(load_flux2_transformer(folder, mx.float32), x)
    model = load_flux2_transformer(folder, mx.float32, quantize=bits)
    done = {p for p, _ in quantized_layers(model)}
    assert "double_mod_img" in done and "single_blocks.1.linear2" in done
    assert "double_blocks.0.txt_mlp.fc2" in done
    assert not any(p.startswith(("img_in", "txt_in", "time_in", "guidance_in", "final_layer"))
                   for p in done)
    out = run_ours(model, x)
    assert rel_err(out, full) <= {8: 2e-3, 4: 3e-2}[bits]  # measured 3e-4, 5.5e-3

    ckpt = open_checkpoint("flux2_transformer", folder)
    src = ComponentSource("transformer", folder, ckpt.spec.model_class(ckpt.config),
                          ckpt.tensors, ckpt.rules, ckpt.config_dict)
    convert_component(src, tmp_path / "q", mx.float32, bits)
    again = load_flux2_transformer(tmp_path / "q")
    assert {p for p, _ in quantized_layers(again)} == done
    np.testing.assert_array_equal(run_ours(again, x), out)


def test_wide_forward_with_references_matches_diffusers(tmp_path):
    """klein 4B's widths (hidden 3072, 24 heads, Qwen3 width 7680, SwiGLU 3x) with one
    block of each kind (scripts/klein_fixtures.py preset `wide`): the forward with two
    references, float32, within the tiny test's tolerance."""
    from conftest import import_script

    cfg = dict(import_script("klein_fixtures").PRESETS["wide"]["transformer"])
    ref = build_reference(cfg)
    x = make_inputs(cfg, guidance=False, batch=1, n_txt=5)
    expected = run_reference(ref, x)
    ours = load_flux2_transformer(save_diffusers(ref, tmp_path / "transformer"), mx.float32)
    del ref
    out = run_ours(ours, x)
    assert out.shape == expected.shape == (1, x["img"].shape[1], 128)
    assert rel_err(out, expected) <= 1e-4
