"""Key map for the SAM 3 detector heads (models/sam3_heads.py) in the transformers
`Sam3Model` layout: names are transformers' own; convolutions go OIHW -> OHWI and the
mask decoder's 1x1 convolutions (run as Linears) are squeezed to (out, in).

`HEAD_PREFIXES` are the checkpoint key prefixes the heads own; the vision and text
encoders' keys are the backbone loader's (weights/sam3.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import mlx.core as mx

from mlx_edit.models.sam3_heads import Sam3Heads
from mlx_edit.weights.core import Rule, load_into, rename

HEAD_PREFIXES = ("geometry_encoder.", "detr_encoder.", "detr_decoder.", "mask_decoder.",
                 "dot_product_scoring.")

SAM3_HEAD_RULES: tuple[Rule, ...] = (
    Rule("geometry_encoder.boxes_pool_project.weight",
         ("geometry_encoder.boxes_pool_project.weight",), "conv"),
    Rule("mask_decoder.pixel_decoder.conv_layers.{n}.weight",
         ("mask_decoder.pixel_decoder.conv_layers.{n}.weight",), "conv"),
    Rule("mask_decoder.{p}_projection.weight", ("mask_decoder.{p}_projection.weight",),
         "conv1x1"),
    rename("{rest}", "{rest}"),
)


def head_tensors(tensors: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """The entries of a Sam3Model checkpoint that belong to the heads."""
    return {k: v for k, v in tensors.items() if k.startswith(HEAD_PREFIXES)}


def load_heads(model: Sam3Heads, tensors: Mapping[str, mx.array],
               dtype: mx.Dtype | None = None) -> Sam3Heads:
    """Load the heads' entries of `tensors` into `model` strictly (WeightLoadError names
    missing, unexpected or mis-shaped keys); other prefixes are left to their loaders."""
    return load_into(model, head_tensors(tensors), SAM3_HEAD_RULES, dtype, name="SAM 3 heads")


# Meta's original names (facebookresearch sam3 checkpoints) of the head tensors -> ours,
# as transformers' converter renames them (models/sam3/convert_sam3_to_hf.py,
# ORIGINAL_TO_CONVERTED_KEY_MAPPING, head sections); applied in order, first match wins.
# Attention modules there are torch MultiheadAttention: fused `in_proj_*` tensors are split
# into q/k/v by `meta_head_tensors`.
_GEO, _ENC, _DEC = r"geometry_encoder\.", r"transformer\.encoder\.", r"transformer\.decoder\."


def _mlp(source: str, target: str, layers: int) -> tuple[tuple[str, str], ...]:
    """Meta's MLP `layers.0..` -> Sam3DecoderMLP `layer1..`."""
    return tuple((f"{source}layers\\.{n}\\.", f"{target}.layer{n + 1}.") for n in range(layers))


META_HEAD_NAMES: tuple[tuple[str, str], ...] = (
    (_GEO + r"encode\.(\d+)\.cross_attn_image\.", r"geometry_encoder.layers.\1.cross_attn."),
    (_GEO + r"encode\.(\d+)\.self_attn\.", r"geometry_encoder.layers.\1.self_attn."),
    (_GEO + r"encode\.(\d+)\.linear(\d)\.", r"geometry_encoder.layers.\1.mlp.fc\2."),
    (_GEO + r"encode\.(\d+)\.norm(\d)\.", r"geometry_encoder.layers.\1.layer_norm\2."),
    (_GEO + r"img_pre_norm\.", "geometry_encoder.vision_layer_norm."),
    (_GEO + r"norm\.", "geometry_encoder.prompt_layer_norm."),
    (_GEO + r"encode_norm\.", "geometry_encoder.output_layer_norm."),
    (_ENC + r"layers\.(\d+)\.cross_attn_image\.", r"detr_encoder.layers.\1.cross_attn."),
    (_ENC + r"layers\.(\d+)\.(self_attn|cross_attn)\.", r"detr_encoder.layers.\1.\2."),
    (_ENC + r"layers\.(\d+)\.linear(\d)\.", r"detr_encoder.layers.\1.mlp.fc\2."),
    (_ENC + r"layers\.(\d+)\.norm(\d)\.", r"detr_encoder.layers.\1.layer_norm\2."),
    (_DEC + r"(query_embed|reference_points|presence_token)\.", r"detr_decoder.\1."),
    *_mlp(_DEC + r"presence_token_head\.", "detr_decoder.presence_head", 3),
    (_DEC + r"presence_token_out_norm\.", "detr_decoder.presence_layer_norm."),
    (_DEC + r"norm\.", "detr_decoder.output_layer_norm."),
    *_mlp(_DEC + r"bbox_embed\.", "detr_decoder.box_head", 3),
    *_mlp(_DEC + r"ref_point_head\.", "detr_decoder.ref_point_head", 2),
    *_mlp(_DEC + r"boxRPB_embed_x\.", "detr_decoder.box_rpb_embed_x", 2),
    *_mlp(_DEC + r"boxRPB_embed_y\.", "detr_decoder.box_rpb_embed_y", 2),
    (_DEC + r"layers\.(\d+)\.self_attn\.", r"detr_decoder.layers.\1.self_attn."),
    (_DEC + r"layers\.(\d+)\.ca_text\.", r"detr_decoder.layers.\1.text_cross_attn."),
    (_DEC + r"layers\.(\d+)\.cross_attn\.", r"detr_decoder.layers.\1.vision_cross_attn."),
    (_DEC + r"layers\.(\d+)\.linear(\d)\.", r"detr_decoder.layers.\1.mlp.fc\2."),
    (_DEC + r"layers\.(\d+)\.norm1\.", r"detr_decoder.layers.\1.vision_cross_attn_layer_norm."),
    (_DEC + r"layers\.(\d+)\.catext_norm\.", r"detr_decoder.layers.\1.text_cross_attn_layer_norm."),
    (_DEC + r"layers\.(\d+)\.norm2\.", r"detr_decoder.layers.\1.self_attn_layer_norm."),
    (_DEC + r"layers\.(\d+)\.norm3\.", r"detr_decoder.layers.\1.mlp_layer_norm."),
    *_mlp(r"dot_prod_scoring\.prompt_mlp\.", "dot_product_scoring.text_mlp", 2),
    (r"dot_prod_scoring\.prompt_mlp\.out_norm\.", "dot_product_scoring.text_mlp_out_norm."),
    (r"dot_prod_scoring\.prompt_proj\.", "dot_product_scoring.text_proj."),
    (r"dot_prod_scoring\.hs_proj\.", "dot_product_scoring.query_proj."),
    (r"segmentation_head\.pixel_decoder\.", "mask_decoder.pixel_decoder."),
    (r"segmentation_head\.(?:mask_predictor\.)?mask_embed\.", "mask_decoder.mask_embedder."),
    (r"segmentation_head\.instance_seg_head\.", "mask_decoder.instance_projection."),
    (r"segmentation_head\.semantic_seg_head\.", "mask_decoder.semantic_projection."),
    (r"segmentation_head\.cross_attend_prompt\.", "mask_decoder.prompt_cross_attn."),
    (r"segmentation_head\.cross_attn_norm\.", "mask_decoder.prompt_cross_attn_norm."),
    (_GEO, "geometry_encoder."),  # label/cls embeddings, box projections: same names
)
# Meta tensors transformers' Sam3Model has no module for (the converter leaves them out).
META_HEAD_DROP = re.compile(r"transformer\.decoder\.instance_")
META_HEAD_SOURCES = re.compile(r"geometry_encoder\.|transformer\.|dot_prod_scoring\.|"
                               r"segmentation_head\.")


def meta_head_name(key: str) -> str:
    """A Meta head key -> ours (the first matching META_HEAD_NAMES row; `out_proj` ->
    `o_proj`); a key no row matches is returned unchanged (the strict load names it)."""
    for pattern, target in META_HEAD_NAMES:
        m = re.match(pattern, key)
        if m:
            rest = key[m.end():]
            if rest.startswith("out_proj."):
                rest = "o_proj." + rest[len("out_proj."):]
            return m.expand(target) + rest
    return key


def meta_head_tensors(tensors: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """The head tensors of a Meta-named state dict (any prefix such as `detector.`
    already stripped) under our names; fused attention `in_proj_*` tensors are split into
    q/k/v_proj as transformers' converter does (split_qkv)."""
    out = {}
    for key, value in tensors.items():
        if not META_HEAD_SOURCES.match(key) or META_HEAD_DROP.match(key):
            continue
        stem, _, leaf = meta_head_name(key).rpartition(".")
        if leaf in ("in_proj_weight", "in_proj_bias"):
            for proj, part in zip("qkv", mx.split(value, 3, axis=0)):
                out[f"{stem}.{proj}_proj.{leaf[len('in_proj_'):]}"] = part
        else:
            out[f"{stem}.{leaf}"] = value
    return out
