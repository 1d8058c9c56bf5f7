"""Quantization policy (mlx_edit/quantize.py): skip rules, records, recorded rebuild.

Models are built lazily (MLX evaluates nothing until asked), so even the full FLUX.1
Fill shapes are checked here without allocating them.
"""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import warnings

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlx_edit.weights import quantize as q
from mlx_edit.models.clip import CLIPTextConfig, CLIPTextModel
from mlx_edit.models.flux import FluxConfig, FluxTransformer
from mlx_edit.models.t5 import T5Config, T5Encoder
from mlx_edit.weights.core import WeightLoadError

SMALL_FLUX = dict(num_layers=2, num_single_layers=1, attention_head_dim=64,
                  num_attention_heads=2, joint_attention_dim=128, pooled_projection_dim=64,
                  axes_dims_rope=(16, 24, 24))
SMALL_T5 = dict(vocab_size=100, d_model=128, d_kv=32, d_ff=96, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8)

TRANSFORMER_KEPT = {
    "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
    "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer",
    "final_layer.linear", "final_layer.modulation",
}


def layer_kinds(model):
    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    return {p: type(m).__name__ for p, m in leaves}


def test_transformer_policy_keeps_sensitive_layers():
    model = FluxTransformer(FluxConfig.from_dict(SMALL_FLUX))
    record = q.quantize_transformer(model, 4)
    assert record == {"bits": 4, "group_size": 64, "mode": "affine",
                      "skipped": sorted(TRANSFORMER_KEPT)}
    kinds = layer_kinds(model)
    for path in TRANSFORMER_KEPT:
        assert kinds[path] == "Linear", path
    quantized = sorted(p for p, k in kinds.items() if k == "QuantizedLinear")
    # every attention / MLP / modulation linear of every block
    per_double = {"img_mod", "txt_mod", "img_attn.qkv", "img_attn.proj", "txt_attn.qkv",
                  "txt_attn.proj", "img_mlp.fc1", "img_mlp.fc2", "txt_mlp.fc1", "txt_mlp.fc2"}
    expected = [f"double_blocks.{i}.{n}" for i in range(2) for n in per_double]
    expected += [f"single_blocks.0.{n}" for n in ("modulation", "linear1", "linear2")]
    assert quantized == sorted(expected)
    assert model.double_blocks[0].img_attn.qkv.bits == 4
    assert model.img_in.weight.dtype == mx.float32  # the forward reads its dtype


def test_t5_policy_and_width_rule():
    # d_ff 96 is not a multiple of 64: `wo` (input d_ff) stays, `wi_0/wi_1` (input 128) go
    model = T5Encoder(T5Config.from_dict(SMALL_T5))
    record = q.quantize_t5(model, 8)
    kinds = layer_kinds(model)
    assert record["skipped"] == sorted(
        ["shared", "relative_attention_bias", "blocks.0.ff.wo", "blocks.1.ff.wo"])
    assert kinds["blocks.0.attn.qkv"] == kinds["blocks.1.ff.wi_0"] == "QuantizedLinear"
    assert kinds["shared"] == "Embedding"
    reason = q.skip_reason("text_encoder_2", "blocks.0.ff.wo", nn.Linear(96, 128), 64)
    assert "input width 96 is not a multiple of the group size 64" in reason
    # the same layer fits group 32
    assert q.skip_reason("text_encoder_2", "blocks.0.ff.wo", nn.Linear(96, 128), 32) is None


def test_clip_quantized_only_on_request():
    bits = q.component_bits(4)
    assert bits == {"transformer": 4, "vae": None, "text_encoder": None, "text_encoder_2": 4}
    bits = q.component_bits(4, {"text_encoder": 8, "transformer": None})
    assert bits == {"transformer": None, "vae": None, "text_encoder": 8, "text_encoder_2": 4}
    clip = CLIPTextModel(CLIPTextConfig.from_dict(dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)))
    record = q.quantize_component(clip, "text_encoder", 8)
    assert record["skipped"] == ["embeddings.position_embedding", "embeddings.token_embedding"]
    with pytest.raises(ValueError, match="unknown component 'unet'"):
        q.component_bits(4, {"unet": 4})
    with pytest.raises(ValueError, match="bits must be one of"):
        q.quantize_component(clip, "text_encoder", 7)
    with pytest.raises(ValueError, match="already quantized"):
        q.quantize_component(clip, "text_encoder", 8)


@pytest.mark.parametrize("text, expected", [
    ("transformer=4,text_encoder_2=8", {"transformer": 4, "text_encoder_2": 8}),
    (" vae=none , text_encoder=8 ", {"vae": None, "text_encoder": 8}),
])
def test_parse_component_bits(text, expected):
    assert q.parse_component_bits(text) == expected


@pytest.mark.parametrize("text, match", [
    ("unet=4", "unknown component 'unet'"),
    ("transformer=7", "bits must be one of"),
    ("transformer", "expected COMPONENT=BITS"),
])
def test_parse_component_bits_errors(text, match):
    with pytest.raises(ValueError, match=match):
        q.parse_component_bits(text)


def test_recorded_quantization_rebuilds_structure_without_allocating():
    # real FLUX widths, 2 + 2 blocks: ~1.6 GB in float32 if it were ever evaluated
    cfg = FluxConfig.from_dict(dict(num_layers=2, num_single_layers=2))
    mx.eval(mx.zeros(1))
    before = mx.get_active_memory()
    reference = FluxTransformer(cfg)
    record = q.quantize_transformer(reference, 4, group_size=128)
    rebuilt = FluxTransformer(cfg)
    assert q.apply_recorded_quantization(rebuilt, {"quantization": record}) == record
    shapes = {k: (v.shape, v.dtype) for k, v in tree_flatten(reference.parameters())}
    assert shapes == {k: (v.shape, v.dtype) for k, v in tree_flatten(rebuilt.parameters())}
    assert mx.get_active_memory() - before < 10**6
    full = FluxTransformer(cfg)
    assert q.model_nbytes(rebuilt, mx.bfloat16) < 0.32 * q.model_nbytes(full, mx.bfloat16)


def test_full_fill_sizes_from_config():
    # FLUX.1 Fill transformer: 11.9 B parameters, 23.8 GB in bf16 (computed, not allocated)
    full = FluxTransformer(FluxConfig())
    bf16 = q.model_nbytes(full, mx.bfloat16)
    assert 23.5e9 < bf16 < 24.0e9
    q.quantize_transformer(full, 4)
    assert 0.25 * bf16 < q.model_nbytes(full, mx.bfloat16) < 0.30 * bf16


def test_check_tensors_disagreement():
    model = T5Encoder(T5Config.from_dict(SMALL_T5))
    record = q.quantize_t5(model, 4)
    tensors = dict(tree_flatten(model.parameters()))
    layers = [p for p, _ in q.quantizable_layers(T5Encoder(T5Config.from_dict(SMALL_T5)))]
    q.check_tensors(record, layers, tensors, "t5")  # consistent: no error
    with pytest.raises(WeightLoadError, match="records 8-bit .* stored at 4 bits"):
        q.check_tensors({**record, "bits": 8}, layers, tensors, "t5")
    with pytest.raises(WeightLoadError, match="records no quantization"):
        q.check_tensors(None, layers, tensors, "t5")
    with pytest.raises(WeightLoadError, match="skips unknown layers: nope"):
        q.check_tensors({**record, "skipped": [*record["skipped"], "nope"]}, layers, tensors, "t5")
    with pytest.raises(WeightLoadError, match="unsupported quantization bits=7"):
        q.read_record({"quantization": {**record, "bits": 7}}, "t5")


def test_quantize_at_load_of_quantized_model_warns():
    model = T5Encoder(T5Config.from_dict(SMALL_T5))
    q.quantize_t5(model, 4)
    with pytest.warns(UserWarning, match="already quantized at 4 bits; quantize=8 is ignored"):
        record = q.quantize_t5(model, 8)
    assert record["bits"] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert q.quantize_t5(model, 4)["bits"] == 4
