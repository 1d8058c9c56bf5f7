"""LoRA application without the reference: strict key handling (nothing half-applied),
exact fused-layer combination, kohya names equal to diffusers names, quantized models."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_edit.models import lora as L
from mlx_edit.models.flux import FluxConfig, FluxTransformer
from mlx_edit.weights.core import WeightLoadError
from mlx_edit.weights.lora import load_lora_file
from mlx_edit.weights.quantize import quantize_transformer

# Every Linear input width a multiple of 64, so q4/q8 quantize every block layer.
CFG = dict(in_channels=64, out_channels=64, num_layers=2, num_single_layers=2,
           attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
           pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(8, 12, 12))


def model(seed=0):
    mx.random.seed(seed)
    m = FluxTransformer(FluxConfig.from_dict(CFG))
    mx.eval(m.parameters())
    return m


def inputs(seed=1, n=12, n_txt=5):
    g = np.random.default_rng(seed)
    ids = np.concatenate([np.zeros((n, 1)), np.stack([np.arange(n) // 4, np.arange(n) % 4], 1)], 1)
    return [mx.array(v.astype(np.float32)) for v in (
        g.standard_normal((1, n, 64)), ids, g.standard_normal((1, n_txt, 64)),
        np.zeros((n_txt, 3)), np.array([0.6]), g.standard_normal((1, 64)), np.array([3.5]))]


def run(m, x):
    return np.array(m(*x))


def save(tmp_path, name, arrays):
    path = tmp_path / name
    rng = np.random.default_rng(len(name))
    mx.save_safetensors(str(path), {k: mx.array(v if isinstance(v, np.ndarray) else
                                                rng.standard_normal(v).astype(np.float32) * 0.1)
                                    for k, v in arrays.items()})
    return path


def pair(prefix, out, inp, rank=4, down="lora_A", up="lora_B"):
    return {f"{prefix}.{down}.weight": (rank, inp), f"{prefix}.{up}.weight": (out, rank)}


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_combine_is_exact_for_shared_and_stacked_downs():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 8)).astype(np.float32)
    parts = [L.Part(0, a, rng.standard_normal((4, 3)).astype(np.float32)),
             L.Part(8, a.copy(), rng.standard_normal((4, 3)).astype(np.float32))]
    dense = np.zeros((12, 8), np.float32)
    for p in parts:
        dense[p.offset:p.offset + 4] = p.b @ p.a
    shared = L.combine(parts, 8, 12)
    assert shared.a.shape == (8, 3)  # one down matrix when every part shares it
    np.testing.assert_allclose((shared.a @ shared.b).T, dense, atol=1e-6)
    parts[1].a = rng.standard_normal((2, 8)).astype(np.float32)
    parts[1].b = rng.standard_normal((4, 2)).astype(np.float32)
    dense[8:12] = parts[1].b @ parts[1].a
    stacked = L.combine(parts, 8, 12)
    assert stacked.a.shape == (8, 5)
    np.testing.assert_allclose((stacked.a @ stacked.b).T, dense, atol=1e-6)
    with pytest.raises(ValueError, match="overlap"):
        L.combine([parts[0], L.Part(2, a, parts[0].b)], 8, 12)


@pytest.mark.parametrize("keys, match", [
    ({**pair("lora_unet_down_blocks_0_attentions_0_proj_in", 64, 64, down="lora_down",
             up="lora_up")}, "lora_unet_down_blocks_0_attentions_0_proj_in"),
    ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (4, 64)},
     "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"),
    ({**pair("transformer.transformer_blocks.0.attn.to_q", 64, 64),
      "transformer.transformer_blocks.0.attn.weird": (3,)}, "attn.weird"),
])
def test_damaged_or_foreign_keys_are_named(tmp_path, keys, match):
    path = save(tmp_path, "bad.safetensors", keys)
    with pytest.raises(WeightLoadError, match=match) as err:
        load_lora_file(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("keys, match", [
    (pair("transformer.transformer_blocks.7.attn.to_q", 64, 64), "double_blocks.7.img_attn.qkv"),
    (pair("double_blocks.1.img_attn.proj", 64, 96), "double_blocks.1.img_attn.proj"),
])
def test_lora_the_model_cannot_take_changes_nothing(tmp_path, keys, match):
    keys = {**pair("transformer.transformer_blocks.0.attn.to_k", 64, 64), **keys}
    m, x = model(), inputs()
    before = run(m, x)
    with pytest.raises(WeightLoadError, match=match):
        L.attach(m, "x", load_lora_file(save(tmp_path, "a.safetensors", keys)).updates(m), 1.0)
    assert not L.lora_layers(m)
    assert np.array_equal(run(m, x), before)


def test_t5_keys_warn_and_the_rest_applies(tmp_path):
    keys = {**pair("lora_unet_double_blocks_0_img_attn_proj", 64, 64, down="lora_down",
                   up="lora_up"),
            **pair("lora_te1_text_model_encoder_layers_0_mlp_fc1", 64, 32, down="lora_down",
                   up="lora_up"),
            **pair("lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0", 64, 32,
                   down="lora_down", up="lora_up")}
    with pytest.warns(UserWarning, match="ignoring 2 T5 text-encoder"):
        f = load_lora_file(save(tmp_path, "te.safetensors", keys))
    assert list(f.parts) == ["double_blocks.0.img_attn.proj",
                             "text_encoder.encoder.layers.0.mlp.fc1"]  # CLIP: lora_text


def test_kohya_names_equal_diffusers_names(tmp_path):
    """The same factors under kohya (fused, BFL order) and diffusers names (split, our
    order) give the same model, embedders and the swapped final modulation included;
    diffusers itself drops kohya's embedder / final-layer entries (see test_lora.py)."""
    rng = np.random.default_rng(3)
    h, kohya, diff = 64, {}, {}
    for src, dst, out, inp in (("img_in", "x_embedder", h, 64),
                               ("time_in_in_layer", "time_text_embed.timestep_embedder.linear_1",
                                h, 256),
                               ("double_blocks_1_txt_attn_qkv", None, 3 * h, h),
                               ("final_layer_adaLN_modulation_1", "norm_out.linear", 2 * h, h)):
        a = rng.standard_normal((4, inp)).astype(np.float32) * 0.1
        b = rng.standard_normal((out, 4)).astype(np.float32) * 0.1
        kohya.update({f"lora_unet_{src}.lora_down.weight": a, f"lora_unet_{src}.lora_up.weight": b,
                      f"lora_unet_{src}.alpha": np.array(8.0, np.float32)})
        b = b * 2  # alpha / rank folded in on the diffusers side
        if dst is None:
            for c, rows in zip(("q", "k", "v"), np.split(b, 3)):
                diff[f"transformer.transformer_blocks.1.attn.add_{c}_proj.lora_A.weight"] = a
                diff[f"transformer.transformer_blocks.1.attn.add_{c}_proj.lora_B.weight"] = rows
            continue
        if dst == "norm_out.linear":
            b = np.concatenate(np.split(b, 2)[::-1])
        diff.update({f"transformer.{dst}.lora_A.weight": a, f"transformer.{dst}.lora_B.weight": b})
    x, outs = inputs(), []
    for name, keys in (("k.safetensors", kohya), ("d.safetensors", diff)):
        m = model()
        L.attach(m, "l", load_lora_file(save(tmp_path, name, keys)).updates(m), 0.7)
        outs.append(run(m, x))
    assert rel(outs[0], run(model(), x)) > 1e-2
    assert rel(outs[0], outs[1]) <= 1e-5


# Measured: the q8 delta is within 0.5% of the float delta, q4 within 7.4% (the LoRA
# output flows through quantized layers downstream); tolerances relative to max|delta|.
@pytest.mark.parametrize("bits, tol", [(8, 1e-2), (4, 1.5e-1)])
def test_quantized_lora_delta_matches_float(tmp_path, bits, tol):
    keys = {}
    for i in range(2):
        keys.update(pair(f"transformer.transformer_blocks.{i}.attn.to_q", 64, 64))
        keys.update(pair(f"transformer.single_transformer_blocks.{i}.proj_mlp", 256, 64))
        keys.update(pair(f"transformer.single_transformer_blocks.{i}.proj_out", 64, 320))
    f = load_lora_file(save(tmp_path, "q.safetensors", keys))
    x, deltas = inputs(), []
    for q in (None, bits):
        m = model()
        if q:
            quantize_transformer(m, q)
        base = run(m, x)
        params = dict(tree_flatten(m.parameters()))
        L.attach(m, "l", f.updates(m), 0.8)
        deltas.append(run(m, x) - base)
        if q:
            with pytest.raises(ValueError, match="quantized"):
                L.fuse(m)
        L.remove(m)
        assert np.array_equal(run(m, x), base)  # unloading restores the base exactly
        assert all(v is params[k] for k, v in tree_flatten(m.parameters()))
    assert rel(deltas[1], deltas[0]) <= tol, rel(deltas[1], deltas[0])


@pytest.mark.parametrize("key, match", [
    ("transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector", "DoRA"),
    ("lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a", "LoHa"),
    ("lycoris_transformer_blocks_0_attn_to_q.lokr_t2", "Tucker"),
])
def test_unsupported_kinds_are_named(tmp_path, key, match):
    keys = {**pair("double_blocks.0.img_attn.qkv", 192, 64), key: (32,)}
    with pytest.raises(WeightLoadError, match=match):
        load_lora_file(save(tmp_path, "u.safetensors", keys))


def test_memory_estimate_counts_lora_parameters():
    from mlx_edit.editing import memory

    base = memory.estimate(1024, 1024, dtype="bfloat16", quantize=4)
    with_lora = memory.estimate(1024, 1024, dtype="bfloat16", quantize=4, lora_params=10**9)
    assert with_lora["weights_lora"] == pytest.approx(2.0)  # bf16 even on a q4 model
    assert with_lora["peak"] == pytest.approx(base["peak"] + 2.0)
    assert with_lora["peak_low_memory"] >= base["peak_low_memory"] + 2.0 - 1e-9
    assert "weights_lora" not in base


def test_hub_sources_go_through_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub

    from mlx_edit.weights.lora import locate, split_spec

    files = {"owner/one": ["README.md", "style.safetensors"],
             "owner/two": ["a.safetensors", "b.safetensors"]}
    calls = []
    monkeypatch.setattr(huggingface_hub, "model_info", lambda repo: SimpleNamespace(
        siblings=[SimpleNamespace(rfilename=f) for f in files[repo]]))

    def download(repo, allow_patterns, local_files_only=False):
        calls.append((repo, *allow_patterns))
        for name in allow_patterns:
            (tmp_path / name).touch()
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert locate("owner/one") == tmp_path / "style.safetensors"
    assert locate("owner/two:b.safetensors") == tmp_path / "b.safetensors"
    assert locate("owner/two", weight_name="a.safetensors") == tmp_path / "a.safetensors"
    assert calls == [("owner/one", "style.safetensors"), ("owner/two", "b.safetensors"),
                     ("owner/two", "a.safetensors")]
    with pytest.raises(WeightLoadError, match="several .safetensors files.*owner/two:FILE"):
        locate("owner/two")
    with pytest.raises(WeightLoadError, match="no such LoRA file"):
        locate(str(tmp_path / "missing.safetensors"))
    assert split_spec("owner/two:b.safetensors:0.5") == ("owner/two:b.safetensors", 0.5)
    assert split_spec("style.safetensors") == ("style.safetensors", None)
    assert split_spec("dir/style.safetensors:-1") == ("dir/style.safetensors", -1.0)
