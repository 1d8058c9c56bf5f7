"""Meta's original SAM 2.1 names (`sam2.1_hiera_*.pt` state dicts as safetensors).

The transformers-layout fixture (`tiny_sam_mlx`) is renamed to Meta's names by the inverse
of the mapping transformers documents in models/sam2/convert_sam2_to_hf.py
(KEYS_TO_MODIFY_MAPPING and replace_keys). `documented_forward` restates that mapping
here, independently of mlx_edit/weights/sam_meta.py, and checks the inverse key by key;
the renamed file must then load into exactly the same model. No torch needed.
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)

import re
import shutil
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file

from mlx_edit.weights.core import WeightLoadError
from mlx_edit.weights.sam import is_sam_source, load_sam

# transformers' KEYS_TO_MODIFY_MAPPING entries that concern the image model, in its order
# (each applied as a substring replacement, one after the other).
DOCUMENTED = (
    ("iou_prediction_head.layers.0", "iou_prediction_head.proj_in"),
    ("iou_prediction_head.layers.1", "iou_prediction_head.layers.0"),
    ("iou_prediction_head.layers.2", "iou_prediction_head.proj_out"),
    ("mask_decoder.output_upscaling.0", "mask_decoder.upscale_conv1"),
    ("mask_decoder.output_upscaling.1", "mask_decoder.upscale_layer_norm"),
    ("mask_decoder.output_upscaling.3", "mask_decoder.upscale_conv2"),
    ("mask_downscaling.0", "mask_embed.conv1"),
    ("mask_downscaling.1", "mask_embed.layer_norm1"),
    ("mask_downscaling.3", "mask_embed.conv2"),
    ("mask_downscaling.4", "mask_embed.layer_norm2"),
    ("mask_downscaling.6", "mask_embed.conv3"),
    ("point_embeddings", "point_embed"),
    ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    ("sam_prompt_encoder", "prompt_encoder"),
    ("sam_mask_decoder", "mask_decoder"),
    ("image_encoder.neck", "vision_encoder.neck"),
    ("image_encoder", "vision_encoder.backbone"),
    ("patch_embed.proj", "patch_embed.projection"),
    ("no_mem_embed", "no_memory_embedding"),
    (".norm", ".layer_norm"),
    ("trunk.", ""),
    ("out_proj", "o_proj"),
)
TWO_LAYER = (r"vision_encoder\.backbone\.blocks\.\d+\.mlp\.", r"mask_decoder\.transformer\.layers\.\d+\.mlp\.")
THREE_LAYER = (r"mask_decoder\.pred_obj_score_head\.", r".*\.output_hypernetworks_mlps\.\d+\.")


def documented_forward(key: str) -> str:
    """A Meta key -> transformers' key, as replace_keys does."""
    for old, new in DOCUMENTED:
        if old in key:
            key = key.replace(old, new)
    for prefix in TWO_LAYER:
        if re.match(prefix + r"layers\.\d+", key):
            key = key.replace("mlp.layers.0", "mlp.proj_in").replace("mlp.layers.1", "mlp.proj_out")
    for prefix in THREE_LAYER:
        m = re.match(prefix + r"layers\.(\d+)", key)
        if m:
            i = m.group(1)
            key = key.replace(f"layers.{i}", {"0": "proj_in", "1": "layers.0", "2": "proj_out"}[i])
    if re.match(r"vision_encoder\.neck\.convs\.\d+\.conv", key):
        key = key.replace(".conv.", ".")
    return key


# Our inverse: transformers' key -> Meta's (ordered regex substitutions).
INVERSE = (
    (r"^vision_encoder\.backbone\.", "image_encoder.trunk."),
    (r"^vision_encoder\.neck\.convs\.(\d+)\.", r"image_encoder.neck.convs.\1.conv."),
    (r"^prompt_encoder\.", "sam_prompt_encoder."),
    (r"^mask_decoder\.", "sam_mask_decoder."),
    (r"^no_memory_embedding$", "no_mem_embed"),
    (r"patch_embed\.projection", "patch_embed.proj"),
    (r"shared_embedding\.positional_embedding", "pe_layer.positional_encoding_gaussian_matrix"),
    (r"mask_embed\.conv1", "mask_downscaling.0"), (r"mask_embed\.layer_norm1", "mask_downscaling.1"),
    (r"mask_embed\.conv2", "mask_downscaling.3"), (r"mask_embed\.layer_norm2", "mask_downscaling.4"),
    (r"mask_embed\.conv3", "mask_downscaling.6"),
    (r"upscale_conv1", "output_upscaling.0"), (r"upscale_layer_norm", "output_upscaling.1"),
    (r"upscale_conv2", "output_upscaling.3"),
    (r"\.layer_norm(\d)\.", r".norm\1."), (r"\.layer_norm_final_attn\.", ".norm_final_attn."),
    (r"\.o_proj\.", ".out_proj."),
    (r"mlp\.proj_in\.", "mlp.layers.0."), (r"mlp\.proj_out\.", "mlp.layers.1."),
    (r"(head|mlps\.\d+)\.layers\.0\.", r"\1.layers.1."),
    (r"(head|mlps\.\d+)\.proj_in\.", r"\1.layers.0."),
    (r"(head|mlps\.\d+)\.proj_out\.", r"\1.layers.2."),
)


def meta_name(key: str) -> str:
    for pattern, repl in INVERSE:
        key = re.sub(pattern, repl, key)
    return key


def to_meta(tensors: dict) -> dict:
    """transformers-layout tensors -> Meta's: renamed, the point-embedding table split into
    its four embeddings, the image positional embedding left out (Meta stores it once)."""
    out = {}
    for key, value in tensors.items():
        if key == "shared_image_embedding.positional_embedding":
            continue
        if key == "prompt_encoder.point_embed.weight":
            for i in range(value.shape[0]):
                out[f"sam_prompt_encoder.point_embeddings.{i}.weight"] = np.ascontiguousarray(value[i:i + 1])
            continue
        meta = meta_name(key)
        assert documented_forward(meta) == key, (key, meta, documented_forward(meta))
        out[meta] = value
    return out


def params(model) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_meta_names_load_exactly_as_the_transformers_layout(tiny_sam_mlx, tmp_path):
    tensors = load_file(str(tiny_sam_mlx / "model.safetensors"))
    # Meta stores the Fourier matrix once; released transformers checkpoints hold it twice,
    # equal (the fixture's two differ, to catch miswiring in parity tests)
    tensors["shared_image_embedding.positional_embedding"] = \
        tensors["prompt_encoder.shared_embedding.positional_embedding"]
    hf = tmp_path / "hf"
    shutil.copytree(tiny_sam_mlx, hf)
    save_file(tensors, str(hf / "model.safetensors"))
    meta = to_meta(tensors)
    assert any(k.startswith("image_encoder.trunk.blocks.") for k in meta)
    assert "sam_mask_decoder.transformer.norm_final_attn.weight" in meta
    meta["memory_encoder.out_proj.weight"] = np.zeros((2, 2), np.float32)  # video-only: dropped
    meta["maskmem_tpos_enc"] = np.zeros((7, 1, 1, 4), np.float32)
    folder = tmp_path / "meta"
    folder.mkdir()
    save_file(meta, str(folder / "sam2.1_hiera_tiny.safetensors"))
    shutil.copy(tiny_sam_mlx / "config.json", folder / "config.json")  # tiny is no released size
    assert is_sam_source(folder) and is_sam_source(folder / "sam2.1_hiera_tiny.safetensors")
    ref, ours = load_sam(hf), load_sam(folder / "sam2.1_hiera_tiny.safetensors")
    a, b = params(ref), params(ours)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    x = mx.random.normal((1, 256, 256, 3), key=mx.random.key(1))
    ea, eb = ref.image_embeddings(x), ours.image_embeddings(x)
    pts, lab = mx.array([[[[100.0, 80.0]]]]), mx.array([[[1]]])
    for u, v in zip(ref.decode(ea, pts, lab), ours.decode(eb, pts, lab)):
        assert np.array_equal(np.array(u), np.array(v))
    # `mlx-edit convert` takes the Meta file too
    from mlx_edit.weights.convert import convert_checkpoint

    convert_checkpoint(folder / "sam2.1_hiera_tiny.safetensors", tmp_path / "conv", dtype="float32")
    c = params(load_sam(tmp_path / "conv"))
    assert all(np.array_equal(a[k], c[k]) for k in a)
    # strict: a missing Meta tensor is named in our names
    meta.pop("sam_mask_decoder.iou_token.weight")
    save_file(meta, str(folder / "sam2.1_hiera_tiny.safetensors"))
    with pytest.raises(WeightLoadError, match="missing: mask_decoder.iou_token.weight"):
        load_sam(folder)


def test_meta_file_without_config_is_refused_for_unreleased_sizes(tiny_sam_mlx, tmp_path):
    meta = to_meta(load_file(str(tiny_sam_mlx / "model.safetensors")))
    path = tmp_path / "odd.safetensors"
    save_file(meta, str(path))
    with pytest.raises(WeightLoadError, match="width 16 with 7 blocks is none of the released"):
        load_sam(path)


@pytest.mark.parametrize("preset", ["hiera-tiny", "hiera-small", "hiera-base-plus", "hiera-large"])
def test_meta_config_of_released_sizes(preset, import_script):
    """A Meta file carries no config: the released size is read off the Hiera width and
    block count and must give the config transformers' converter uses."""
    from mlx_edit.models.sam import SamConfig
    from mlx_edit.weights.sam_meta import meta_config

    want = SamConfig.from_dict(import_script("sam_fixtures").sam_config(preset))
    backbone = want.vision.backbone
    shapes = {"image_encoder.trunk.patch_embed.proj.weight": (backbone.hidden_size, 3, 7, 7)}
    shapes.update({f"image_encoder.trunk.blocks.{i}.norm1.weight": (1,)
                   for i in range(sum(backbone.blocks_per_stage))})
    tensors = {k: SimpleNamespace(shape=s) for k, s in shapes.items()}
    assert SamConfig.from_dict(meta_config(tensors, preset)) == want
