"""SAM 3 vision backbone + neck and text encoder against transformers' Sam3Model.

One random `tiny` Sam3Model per session (scripts/sam3_fixtures.py), written as a
transformers folder and, for the vision and text tensors, as a Meta-named file; we load
both with `load_sam3_vision` / `load_sam3_text`, transformers keeps its own module. Pixels:
skimage's astronaut resized as Sam3ImageProcessor does (bilinear to the square input,
rescale 1/255, mean = std = 0.5; the processor itself needs torchvision, which is not
installed, so its documented steps are applied with PIL). Tokens: transformers' CLIP
tokenizer called as Sam3Processor calls it (padding="max_length", max_length=32) on the
fixture's tokenizer files. Metric: max|ours - ref| / max|ref| in float32 <= 1e-4.
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from PIL import Image
from skimage import data

from mlx_edit.editing.text import Sam3Tokenizer
from mlx_edit.weights.core import WeightLoadError
from mlx_edit.weights.sam3 import load_sam3_text, load_sam3_vision
from conftest import import_script

pytestmark = pytest.mark.parity
torch = pytest.importorskip("torch")
fx = import_script("sam3_fixtures")

PHRASES = ["the red car", "all the people", "a dog", "Sky!", "zebra-striped umbrella, left",
           "an astronaut in a white suit holding a helmet near a flag on a sunny day"]


def rel(ours, ref) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.abs(np.asarray(ours, dtype=np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def sam3(tmp_path_factory):
    """(transformers model, its folder, a Meta-named file of its vision + text tensors)."""
    from safetensors.numpy import save_file

    model = fx.make_model("tiny", seed=0)
    folder = fx.write_folder(model, tmp_path_factory.mktemp("sam3") / "tiny")
    meta = folder.parent / "sam3_meta.safetensors"
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    save_file(fx.meta_state_dict(state), str(meta))
    return model, folder, meta


def sam3_pixels(size: int) -> np.ndarray:
    """(1, size, size, 3) float32: Sam3ImageProcessor's steps on the astronaut photo."""
    img = Image.fromarray(data.astronaut()).resize((size, size), Image.BILINEAR)
    return ((np.asarray(img, np.float32) / 255.0 - 0.5) / 0.5)[None]


def test_vision_features_match_transformers(sam3):
    model, folder, _ = sam3
    ours = load_sam3_vision(folder, mx.float32)
    pixels = sam3_pixels(ours.config.backbone_config.image_size)
    with torch.no_grad():
        ref = model.vision_encoder(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    out = ours(mx.array(pixels))
    hidden = np.array(out.last_hidden_state)
    assert rel(hidden.reshape(1, -1, hidden.shape[-1]), ref.last_hidden_state) <= 1e-4
    assert len(out.fpn_hidden_states) == len(ref.fpn_hidden_states) == 4
    for level, (f, r) in enumerate(zip(out.fpn_hidden_states, ref.fpn_hidden_states)):
        r = r.permute(0, 2, 3, 1).numpy()
        assert f.shape == r.shape, level
        assert rel(f, r) <= 1e-4, level
    for p, r in zip(out.fpn_position_encoding, ref.fpn_position_encoding):
        assert rel(p[0], r[0].permute(1, 2, 0)) <= 1e-5


def test_tokenization_matches_sam3_processor(sam3):
    from transformers import CLIPTokenizerFast

    _, folder, _ = sam3
    ref = CLIPTokenizerFast.from_pretrained(folder)(
        PHRASES, return_tensors="np", padding="max_length", max_length=32)
    ids, mask = Sam3Tokenizer.from_folder(folder).with_mask(PHRASES)
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])


def test_text_features_match_transformers(sam3):
    model, folder, _ = sam3
    ids, mask = Sam3Tokenizer.from_folder(folder).with_mask(PHRASES)
    with torch.no_grad():
        ref = model.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                      attention_mask=torch.from_numpy(mask).long())
    hidden, features = load_sam3_text(folder, mx.float32)(mx.array(ids), mx.array(mask))
    assert features.shape == (len(PHRASES), 32, model.config.detr_encoder_config.hidden_size)
    assert rel(hidden, ref.last_hidden_state) <= 1e-4
    assert rel(features, ref.pooler_output) <= 1e-4


@pytest.mark.parametrize("dtype, tol", [(mx.float16, 3e-3), (mx.bfloat16, 3e-2)])
def test_half_precision_stays_close(sam3, dtype, tol):
    """Loaded in float16 / bfloat16 (measured: ~1e-3 / ~8e-3 on the tiny model)."""
    model, folder, _ = sam3
    pixels = sam3_pixels(84)
    ids, mask = Sam3Tokenizer.from_folder(folder).with_mask(PHRASES)
    with torch.no_grad():
        ref = model.vision_encoder(torch.from_numpy(pixels).permute(0, 3, 1, 2))
        ref_text = model.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                           attention_mask=torch.from_numpy(mask).long())
    out = load_sam3_vision(folder, dtype)(mx.array(pixels))
    for f, r in zip(out.fpn_hidden_states, ref.fpn_hidden_states):
        assert f.dtype == dtype and rel(f.astype(mx.float32), r.permute(0, 2, 3, 1)) <= tol
    _, features = load_sam3_text(folder, dtype)(mx.array(ids), mx.array(mask))
    assert features.dtype == dtype
    assert rel(features.astype(mx.float32), ref_text.pooler_output) <= tol


@pytest.mark.parametrize("load", [load_sam3_vision, load_sam3_text])
def test_meta_names_load_identical_parameters(sam3, load):
    model, folder, meta = sam3
    from_hf = load(folder, mx.float32)
    from_meta = load(meta, mx.float32, config=model.config.to_dict())
    a, b = dict(tree_flatten(from_hf.parameters())), dict(tree_flatten(from_meta.parameters()))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)


def test_loading_is_strict(sam3, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, _, meta = sam3
    tensors = load_file(str(meta))
    missing = "detector.backbone.vision_backbone.trunk.blocks.0.attn.proj.weight"
    del tensors[missing]
    tensors["detector.backbone.vision_backbone.trunk.blocks.0.attn.extra"] = np.zeros(2, np.float32)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightLoadError, match=r"attention\.o_proj\.weight|attn\.extra"):
        load_sam3_vision(tmp_path / "bad.safetensors", mx.float32,
                         config=fx.sam3_config("tiny"))


@pytest.mark.slow
def test_real_widths_match_transformers(tmp_path):
    """facebook/sam3's vision and text widths (2 layers each, 504 px): head dim 64, the
    24-token windows padded, the 24 x 24 table tiled, 1024 -> 256 FPN, 1024-wide CLIP."""
    model = fx.make_model("real-widths-2-layers", seed=1)
    folder = fx.write_folder(model, tmp_path / "wide")
    pixels = sam3_pixels(504)
    ids, mask = Sam3Tokenizer.from_folder(folder).with_mask(PHRASES[:2])
    with torch.no_grad():
        ref = model.vision_encoder(torch.from_numpy(pixels).permute(0, 3, 1, 2))
        ref_text = model.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                           attention_mask=torch.from_numpy(mask).long())
    out = load_sam3_vision(folder, mx.float32)(mx.array(pixels))
    for f, r in zip(out.fpn_hidden_states, ref.fpn_hidden_states):
        assert rel(f, r.permute(0, 2, 3, 1)) <= 1e-4
    _, features = load_sam3_text(folder, mx.float32)(mx.array(ids), mx.array(mask))
    assert rel(features, ref_text.pooler_output) <= 1e-4
