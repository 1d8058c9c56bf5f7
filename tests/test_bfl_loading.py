"""BFL single files (flux1-fill-dev.safetensors) load to the same model as diffusers folders.

The fixture's BFL file is proven against diffusers' own BFL->diffusers converter in
tests/test_fixtures.py (the converted file equals the diffusers state dict exactly), so
equal parameters here close the chain: our BFL path == diffusers' BFL path.
"""

import mlx_edit  # noqa: F401

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_edit.weights.core import WeightLoadError
from mlx_edit.weights.flux import load_transformer

pytestmark = pytest.mark.parity


def params(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def assert_same(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert np.array_equal(pa[k], pb[k]), k


def test_tiny_bfl_file_equals_diffusers_folder(tiny_ckpt):
    ref = load_transformer(tiny_ckpt / "transformer", mx.float32)
    axes = list(ref.config.axes_dims_rope)
    ours = load_transformer(tiny_ckpt / "flux1-fill-dev.safetensors", mx.float32,
                            config={"axes_dims_rope": axes})
    assert ours.config == ref.config
    assert_same(ours, ref)


def test_comfyui_prefixed_file(tiny_ckpt, tmp_path):
    tensors = mx.load(str(tiny_ckpt / "flux1-fill-dev.safetensors"))
    prefixed = tmp_path / "comfy.safetensors"
    mx.save_safetensors(str(prefixed), {f"model.diffusion_model.{k}": v for k, v in tensors.items()})
    ref = load_transformer(tiny_ckpt / "transformer", mx.float32)
    ours = load_transformer(prefixed, mx.float32,
                            config={"axes_dims_rope": list(ref.config.axes_dims_rope)})
    assert_same(ours, ref)


def test_bfl_file_head_dim_needs_axes(tiny_ckpt):
    with pytest.raises(ValueError, match="axes_dims_rope"):
        load_transformer(tiny_ckpt / "flux1-fill-dev.safetensors", mx.float32)


def test_damaged_bfl_file_is_reported(tiny_ckpt, tmp_path):
    tensors = dict(mx.load(str(tiny_ckpt / "flux1-fill-dev.safetensors")))
    tensors.pop("double_blocks.0.img_attn.qkv.weight")
    tensors["single_blocks.0.linear1.weight"] = tensors["single_blocks.0.linear1.weight"][:-1]
    bad = tmp_path / "bad.safetensors"
    mx.save_safetensors(str(bad), tensors)
    with pytest.raises(WeightLoadError) as e:
        load_transformer(bad, mx.float32, config={"axes_dims_rope": [4, 4, 8]})
    assert "double_blocks.0.img_attn.qkv.weight" in str(e.value)
    assert "single_blocks.0.linear1.weight" in str(e.value)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((tiny_ckpt / "flux1-fill-dev.safetensors").read_bytes()[:5000])
    with pytest.raises(WeightLoadError, match="truncated|not a readable"):
        load_transformer(truncated, mx.float32, config={"axes_dims_rope": [4, 4, 8]})


@pytest.mark.slow
def test_wide_bfl_file_equals_diffusers_folder(wide_ckpt):
    ref = load_transformer(wide_ckpt / "transformer", mx.float32)
    ours = load_transformer(wide_ckpt / "flux1-fill-dev.safetensors", mx.float32)
    assert ours.config == ref.config
    assert_same(ours, ref)
