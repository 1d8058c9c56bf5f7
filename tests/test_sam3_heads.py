"""SAM 3 detector heads (geometry encoder, DETR encoder/decoder, scoring, presence, mask
decoder) against transformers' Sam3Model on the same random weights.

A small Sam3Model is built by transformers (seeded, float32, cheap); its own vision
features (`get_vision_features`) and projected text features feed both the reference
forward and our `Sam3Heads`, so this test is independent of the backbone port. Metric:
max|ours - ref| / max|ref| <= 1e-4 for per-query boxes, logits, scores, presence and mask
logits; masks thresholded at 0 also IoU >= 0.99. Prompts: text only, and text + exemplar
boxes (one positive, one negative, and a padded slot). Heads at tiny widths, and once at
facebook/sam3's head widths (256, 200 queries, 6 + 6 + 3 layers; `slow`, ~10 s) on an
8 x 8 grid.

torchvision is not installed here, and transformers' geometry encoder calls
`torchvision.ops.roi_align`; the reference gets `reference_roi_align` below, a per-sample
loop written from torchvision's CPU kernel (roi_align_kernel.cpp: aligned=False,
adaptive sampling grid, samples outside [-1, size] are zero), independent of our
vectorised `roi_align`, which is also compared with it directly.
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)

import math
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

pytestmark = pytest.mark.parity
torch = pytest.importorskip("torch")

TOL, IOU_MIN = 1e-4, 0.99
TEXT_LEN = 32


def rel_err(ours, ref) -> float:
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref.detach().numpy() if hasattr(ref, "detach") else ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def iou(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def _bilinear(feat, y, x):
    """torchvision's bilinear_interpolate for one sample: feat (C, H, W)."""
    _, h, w = feat.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return torch.zeros(feat.shape[0], dtype=feat.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    return (hy * hx * feat[:, y0, x0] + hy * lx * feat[:, y0, x1]
            + ly * hx * feat[:, y1, x0] + ly * lx * feat[:, y1, x1])


def reference_roi_align(features, boxes, output_size):
    """torchvision.ops.roi_align(features (B, C, H, W), [boxes (N, 4)] * B, output_size)."""
    out = []
    for b, rois in enumerate(boxes):
        for x0, y0, x1, y1 in rois.tolist():
            rw, rh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
            bw, bh = rw / output_size, rh / output_size
            gw, gh = math.ceil(rw / output_size), math.ceil(rh / output_size)
            pooled = torch.zeros(features.shape[1], output_size, output_size)
            for ph in range(output_size):
                for pw in range(output_size):
                    acc = 0
                    for iy in range(gh):
                        y = y0 + ph * bh + (iy + 0.5) * bh / gh
                        for ix in range(gw):
                            x = x0 + pw * bw + (ix + 0.5) * bw / gw
                            acc = acc + _bilinear(features[b], y, x)
                    pooled[:, ph, pw] = acc / max(gh * gw, 1)
            out.append(pooled)
    return torch.stack(out)


def small_config(heads: str = "tiny"):
    """A small Sam3Config: tiny vision and text towers; heads "tiny" (width 32) or
    "real" (facebook/sam3's head configs: width 256, 8 heads, 200 queries, 6 + 6 + 3
    layers) on an 8 x 8 grid."""
    from transformers import Sam3Config

    width = 32 if heads == "tiny" else 256
    vit = dict(model_type="sam3_vit_model", hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=2, image_size=112, patch_size=14,
               window_size=4, global_attn_indexes=[1], pretrain_image_size=56)
    text = dict(model_type="clip_text_model", vocab_size=1000, hidden_size=32,
                intermediate_size=64, projection_dim=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=TEXT_LEN,
                bos_token_id=998, eos_token_id=999, pad_token_id=999)
    vision = dict(backbone_config=vit, fpn_hidden_size=width,
                  backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]])
    if heads == "real":
        return Sam3Config(vision_config=vision, text_config=text)
    w = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64)
    return Sam3Config(
        vision_config=vision, text_config=text,
        geometry_encoder_config=dict(w, num_layers=2, roi_size=3),
        detr_encoder_config=dict(w, num_layers=2),
        detr_decoder_config=dict(w, num_layers=3, num_queries=12),
        mask_decoder_config=dict(hidden_size=32, num_upsampling_stages=3,
                                 num_attention_heads=4))


def _randomise(model):
    """Random weights everywhere (transformers' init zeroes biases, sets norms to 1, and
    leaves some heads near zero): N(0, 0.2^2 * 32 / fan_in), norms around 1, seeded."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 32
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 * math.sqrt(32 / fan_in))
            if "layer_norm" in name or "norm" in name.split(".")[-2]:
                p.add_(1.0 if name.endswith("weight") else 0.0)


@pytest.fixture(scope="module")
def pair(request):
    from transformers import Sam3Model
    from transformers.models.sam3 import modeling_sam3

    from mlx_edit.models.sam3_heads import Sam3Heads, Sam3HeadsConfig

    torch.manual_seed(0)
    cfg = small_config(getattr(request, "param", "tiny"))
    ref = Sam3Model(cfg).eval()
    _randomise(ref)
    ours = Sam3Heads(Sam3HeadsConfig.from_dict(cfg.to_dict()))
    load_heads(ours, {k: mx.array(v.numpy()) for k, v in ref.state_dict().items()})
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(1, 3, 112, 112, generator=g)
    ids = torch.randint(0, 998, (1, TEXT_LEN), generator=g)
    mask = torch.zeros(1, TEXT_LEN, dtype=torch.long)
    mask[:, :6] = 1
    with torch.no_grad():
        vision = ref.get_vision_features(pixels)
        text = ref.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    with pytest.MonkeyPatch.context() as mp:  # transformers' box path calls torchvision
        mp.setattr(modeling_sam3, "torchvision", raising=False,
                   value=SimpleNamespace(ops=SimpleNamespace(roi_align=reference_roi_align)))
        yield SimpleNamespace(ref=ref, ours=ours, vision=vision, ids=ids, mask=mask, text=text)


def load_heads(model, tensors: dict):
    """Strictly load the heads' tensors of a whole-model (or Meta-named) state dict."""
    from mlx_edit.weights.core import load_into
    from mlx_edit.weights.sam3 import SAM3_HEAD_RULES, select_heads

    return load_into(model, select_heads(tensors), SAM3_HEAD_RULES, None)


def nhwc(tensors):
    return [mx.array(t.permute(0, 2, 3, 1).numpy()) for t in tensors]


BOXES = [[0.45, 0.5, 0.5, 0.6], [0.2, 0.25, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0]]
LABELS = [1, 0, -10]


def run_both(pair, boxes=None, labels=None):
    kw = {}
    if boxes is not None:
        kw = dict(input_boxes=torch.tensor([boxes]), input_boxes_labels=torch.tensor([labels]))
    with torch.no_grad():
        ref = pair.ref(vision_embeds=pair.vision, input_ids=pair.ids,
                       attention_mask=pair.mask, **kw)
    ours = pair.ours(nhwc(pair.vision.fpn_hidden_states[:-1]),
                     nhwc(pair.vision.fpn_position_encoding[:-1]),
                     mx.array(pair.text.numpy()), mx.array(pair.mask.numpy().astype(bool)),
                     None if boxes is None else mx.array(np.array([boxes], np.float32)),
                     None if labels is None else mx.array(np.array([labels], np.int32)))
    return ref, ours


@pytest.mark.parametrize("pair", ["tiny", pytest.param("real", marks=pytest.mark.slow)],
                         indirect=True, ids=["tiny", "real-width"])
@pytest.mark.parametrize("prompt", ["text", "text+boxes"])
def test_heads_match_transformers(pair, prompt):
    boxes, labels = (BOXES, LABELS) if prompt == "text+boxes" else (None, None)
    ref, ours = run_both(pair, boxes, labels)
    ref_scores = ref.pred_logits.sigmoid() * ref.presence_logits.sigmoid()
    errors = {
        "boxes": rel_err(ours.boxes, ref.pred_boxes),
        "logits": rel_err(ours.logits, ref.pred_logits),
        "scores": rel_err(ours.scores, ref_scores),
        "presence": rel_err(ours.presence_logits, ref.presence_logits),
        "masks": rel_err(ours.masks, ref.pred_masks),
        "semantic": rel_err(ours.semantic[..., 0], ref.semantic_seg[:, 0]),
    }
    assert max(errors.values()) <= TOL, errors
    ious = [iou(a, b) for a, b in zip(np.array(ours.masks[0]), ref.pred_masks[0].numpy())]
    assert min(ious) >= IOU_MIN, ious


def test_exemplar_boxes_change_the_detections(pair):
    _, text_only = run_both(pair)
    _, with_boxes = run_both(pair, BOXES, LABELS)
    assert rel_err(with_boxes.logits, np.array(text_only.logits)) > 1e-2


def test_roi_align_matches_torchvision_kernel():
    from mlx_edit.models.sam3_geometry import roi_align

    rng = np.random.default_rng(0)
    feats = rng.standard_normal((2, 5, 9, 7)).astype(np.float32)  # (B, C, H, W)
    boxes = np.array([[[0.3, 0.2, 5.9, 8.7], [2.0, 1.0, 2.4, 1.5], [-0.5, 3.0, 6.9, 9.0]],
                      [[1.1, 0.0, 4.0, 8.0], [6.5, 8.5, 7.0, 9.0], [0.0, 0.0, 7.0, 9.0]]],
                     np.float32)
    ref = reference_roi_align(torch.from_numpy(feats), list(torch.from_numpy(boxes)), 3)
    ours = roi_align(mx.array(feats.transpose(0, 2, 3, 1)), boxes, 3)
    ours = np.array(ours).reshape(6, 3, 3, 5).transpose(0, 3, 1, 2)
    assert rel_err(ours, ref) <= 1e-5


def reference_post_process(monkeypatch):
    """transformers' Sam3ImageProcessor.post_process_instance_segmentation (its module
    imports torchvision's batched_nms at the top, unused there: stubbed for the import)."""
    import sys
    import types

    boxes_mod = types.ModuleType("torchvision.ops.boxes")
    boxes_mod.batched_nms = None
    for name, mod in (("torchvision", types.ModuleType("torchvision")),
                      ("torchvision.ops", types.ModuleType("torchvision.ops")),
                      ("torchvision.ops.boxes", boxes_mod)):
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, mod)
    from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor

    return Sam3ImageProcessor.post_process_instance_segmentation


@pytest.mark.parametrize("prompt", ["text", "text+boxes"])
def test_post_processing_matches_transformers(pair, prompt, monkeypatch):
    from mlx_edit.editing.text_segment import post_process_instances

    post = reference_post_process(monkeypatch)
    boxes, labels = (BOXES, LABELS) if prompt == "text+boxes" else (None, None)
    ref, ours = run_both(pair, boxes, labels)
    threshold = float(np.median(np.array(ours.scores)))  # random weights: keep about half
    size = (75, 90)
    expected = post(None, ref, threshold=threshold, target_sizes=[size])[0]
    found = post_process_instances(ours, threshold=threshold, sizes=[size], order="query")[0]
    assert 0 < len(found.scores) == len(expected["scores"])
    assert 0.05 < expected["masks"].float().mean() < 0.95  # masks with content and edges
    assert rel_err(found.scores, expected["scores"]) <= TOL
    assert rel_err(found.boxes, expected["boxes"]) <= TOL
    ious = [iou(a, b) for a, b in zip(found.masks, expected["masks"].numpy())]
    assert min(ious) >= IOU_MIN, ious


# transformers' names -> Meta's, written from convert_sam3_to_hf.py's table read
# backwards (the fused in_proj_* tensors are rebuilt by `to_meta`).
TO_META = (
    (r"geometry_encoder\.layers\.(\d+)\.cross_attn\.", r"geometry_encoder.encode.\1.cross_attn_image."),
    (r"geometry_encoder\.layers\.(\d+)\.self_attn\.", r"geometry_encoder.encode.\1.self_attn."),
    (r"geometry_encoder\.layers\.(\d+)\.mlp\.fc(\d)\.", r"geometry_encoder.encode.\1.linear\2."),
    (r"geometry_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"geometry_encoder.encode.\1.norm\2."),
    (r"geometry_encoder\.vision_layer_norm\.", "geometry_encoder.img_pre_norm."),
    (r"geometry_encoder\.prompt_layer_norm\.", "geometry_encoder.norm."),
    (r"geometry_encoder\.output_layer_norm\.", "geometry_encoder.encode_norm."),
    (r"detr_encoder\.layers\.(\d+)\.cross_attn\.", r"transformer.encoder.layers.\1.cross_attn_image."),
    (r"detr_encoder\.layers\.(\d+)\.mlp\.fc(\d)\.", r"transformer.encoder.layers.\1.linear\2."),
    (r"detr_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"transformer.encoder.layers.\1.norm\2."),
    (r"detr_encoder\.", "transformer.encoder."),
    (r"detr_decoder\.presence_head\.layer(\d)\.", "transformer.decoder.presence_token_head.layers.{0}."),
    (r"detr_decoder\.presence_layer_norm\.", "transformer.decoder.presence_token_out_norm."),
    (r"detr_decoder\.output_layer_norm\.", "transformer.decoder.norm."),
    (r"detr_decoder\.box_head\.layer(\d)\.", "transformer.decoder.bbox_embed.layers.{0}."),
    (r"detr_decoder\.ref_point_head\.layer(\d)\.", "transformer.decoder.ref_point_head.layers.{0}."),
    (r"detr_decoder\.box_rpb_embed_x\.layer(\d)\.", "transformer.decoder.boxRPB_embed_x.layers.{0}."),
    (r"detr_decoder\.box_rpb_embed_y\.layer(\d)\.", "transformer.decoder.boxRPB_embed_y.layers.{0}."),
    (r"detr_decoder\.layers\.(\d+)\.text_cross_attn\.", r"transformer.decoder.layers.\1.ca_text."),
    (r"detr_decoder\.layers\.(\d+)\.vision_cross_attn\.", r"transformer.decoder.layers.\1.cross_attn."),
    (r"detr_decoder\.layers\.(\d+)\.mlp\.fc(\d)\.", r"transformer.decoder.layers.\1.linear\2."),
    (r"detr_decoder\.layers\.(\d+)\.vision_cross_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm1."),
    (r"detr_decoder\.layers\.(\d+)\.text_cross_attn_layer_norm\.", r"transformer.decoder.layers.\1.catext_norm."),
    (r"detr_decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm2."),
    (r"detr_decoder\.layers\.(\d+)\.mlp_layer_norm\.", r"transformer.decoder.layers.\1.norm3."),
    (r"detr_decoder\.", "transformer.decoder."),
    (r"dot_product_scoring\.text_mlp\.layer(\d)\.", "dot_prod_scoring.prompt_mlp.layers.{0}."),
    (r"dot_product_scoring\.text_mlp_out_norm\.", "dot_prod_scoring.prompt_mlp.out_norm."),
    (r"dot_product_scoring\.text_proj\.", "dot_prod_scoring.prompt_proj."),
    (r"dot_product_scoring\.query_proj\.", "dot_prod_scoring.hs_proj."),
    (r"mask_decoder\.mask_embedder\.", "segmentation_head.mask_predictor.mask_embed."),
    (r"mask_decoder\.instance_projection\.", "segmentation_head.instance_seg_head."),
    (r"mask_decoder\.semantic_projection\.", "segmentation_head.semantic_seg_head."),
    (r"mask_decoder\.prompt_cross_attn_norm\.", "segmentation_head.cross_attn_norm."),
    (r"mask_decoder\.prompt_cross_attn\.", "segmentation_head.cross_attend_prompt."),
    (r"mask_decoder\.", "segmentation_head."),
)


def to_meta(state: dict) -> dict:
    import re

    out = {}
    for key, value in state.items():
        for pattern, target in TO_META:
            m = re.match(pattern, key)
            if m:
                if "{0}" in target:  # Meta counts MLP layers from 0
                    target = target.format(int(m.group(1)) - 1)
                key = m.expand(target) + key[m.end():]
                break
        key = key.replace(".o_proj.", ".out_proj.")
        out[key] = value
    for key in [k for k in out if ".q_proj." in k]:
        leaf = key.rsplit(".", 1)[1]
        parts = [out.pop(key.replace(".q_proj.", f".{x}_proj.")) for x in "qkv"]
        out[key.replace(f"q_proj.{leaf}", f"in_proj_{leaf}")] = np.concatenate(parts)
    out["transformer.decoder.instance_query_embed.weight"] = np.zeros((2, 3), np.float32)
    return out


def test_meta_named_heads_load_identical_parameters(pair):
    from mlx_edit.models.sam3_heads import Sam3Heads

    state = {k: v.numpy() for k, v in pair.ref.state_dict().items()
             if k.startswith(("geometry_encoder.", "detr_", "mask_decoder.", "dot_product"))}
    meta = to_meta(state)
    assert any(".in_proj_weight" in k for k in meta) and "transformer.decoder.norm.weight" in meta
    ours = Sam3Heads(pair.ours.config)
    load_heads(ours, {k: mx.array(v) for k, v in meta.items()})
    expected = dict(tree_flatten(pair.ours.parameters()))
    for name, value in tree_flatten(ours.parameters()):
        assert np.array_equal(np.array(value), np.array(expected[name])), name
