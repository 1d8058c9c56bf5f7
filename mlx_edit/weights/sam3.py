"""Key maps and loaders for SAM 3's image model, one spec kind per sub-model
(`weights/specs.py`): `sam3_vision` (ViT + FPN neck, `models/sam3_vision.py`) and
`sam3_text` (CLIP text tower + projection, `models/sam3_text.py`) and `sam3_heads` (geometry
encoder, DETR encoder/decoder, scoring, mask decoder: `models/sam3_heads.py`).

Two checkpoint layouts, each a whole-model file from which a kind selects its tensors:
- transformers `Sam3Model` folders (facebook/sam3: `config.json` + `model.safetensors`;
  a `Sam3VideoModel` folder's `detector_model.` prefix is stripped): separate q/k/v,
  fused here; convolutions OIHW -> OHWI, the FPN's 1x1 convs squeezed to Linears.
- Meta's original names (github facebookresearch/sam3, `detector.` prefix of the released
  checkpoint stripped, `tracker.` tensors not selected), as transformers'
  `convert_sam3_to_hf.py` maps them: fused `attn.qkv` / `in_proj_*`, `pos_embed` with a
  class-token row (dropped), the FPN as `convs.N.{dconv_2x2[_0|_1],conv_1x1,conv_3x3}`.
  These files carry no config.json: the config is the released one (the dataclass
  defaults) updated by the `config` argument.
- mlx-edit SAM 3 folders (`weights/sam3_convert.py`, `mlx-edit convert`): our names and
  layouts under one prefix per sub-model (`MLX_PREFIXES`), the transformers config.json
  marked `_mlx_edit_version`; recognised by that marker, loaded by prefix renames only.
Not weights, dropped by name: CLIP's own pooled projection (unused by SAM 3), the
`position_ids` buffer and Meta's precomputed RoPE `freqs_cis`. Anything else missing,
unexpected or mis-shaped is a WeightLoadError (`core.load_into`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx

from mlx_edit.models.sam3_heads import Sam3Heads
from mlx_edit.models.sam3_text import Sam3TextEncoder
from mlx_edit.models.sam3_vision import Sam3VisionModel
from mlx_edit.weights import loader
from mlx_edit.weights.core import Rule, rename
from mlx_edit.weights.sources import download, local_or_remote
from mlx_edit.weights.text import CLIP_TEXT_RULES

WRAPPER_PREFIXES = ("detector.", "detector_model.")  # Meta release, transformers video model

HF_VISION, META_VISION = "vision_encoder.", "backbone.vision_backbone."
META_TRUNK, META_CONVS = META_VISION + "trunk.", META_VISION + "convs.{n}."
HF_TEXT, META_TEXT = "text_encoder.", "backbone.language_backbone."
META_CLIP = META_TEXT + "encoder."

# mlx-edit folders: our names under one prefix per kind (none is a transformers or Meta one)
MLX_PREFIXES = {"sam3_vision": "vision.", "sam3_text": "text.", "sam3_heads": "heads."}

VISION_SELECT = (HF_VISION, META_TRUNK, META_VISION + "convs.", MLX_PREFIXES["sam3_vision"])
TEXT_SELECT = (HF_TEXT, "text_projection.", META_TEXT, MLX_PREFIXES["sam3_text"])
NOT_WEIGHTS = ("text_encoder.text_projection.weight", META_CLIP + "text_projection",
               "text_encoder.text_model.embeddings.position_ids")
_WB = ("weight", "bias")


def _layer_renames(src: str, dst: str, names: dict[str, str]) -> tuple[Rule, ...]:
    """Weight and bias renames `src.{name}.p` -> `dst.{ours}.p` for each name pair."""
    return tuple(rename(f"{src}.{a}.{p}", f"{dst}.{b}.{p}") for a, b in names.items() for p in _WB)


_HF_LAYER, _META_BLOCK, _LAYER = (HF_VISION + "backbone.layers.{n}",
                                  META_TRUNK + "blocks.{n}", "backbone.layers.{n}")
_LAYER_PARTS = ("layer_norm1", "layer_norm2", "attention.o_proj", "mlp.fc1", "mlp.fc2")

VISION_HF_RULES: tuple[Rule, ...] = (
    Rule("backbone.patch_embed.weight",
         (HF_VISION + "backbone.embeddings.patch_embeddings.projection.weight",), "conv"),
    rename(HF_VISION + "backbone.embeddings.position_embeddings", "backbone.position_embeddings"),
    *_layer_renames(HF_VISION + "backbone", "backbone", {"layer_norm": "layer_norm"}),
    *(Rule(f"{_LAYER}.attention.qkv.{p}",
           tuple(f"{_HF_LAYER}.attention.{x}_proj.{p}" for x in "qkv"), "concat") for p in _WB),
    *_layer_renames(_HF_LAYER, _LAYER, {m: m for m in _LAYER_PARTS}),
    rename(HF_VISION + "neck.fpn_layers.{n}.scale_layers.{rest}", "neck.{n}.scale_layers.{rest}"),
    Rule("neck.{n}.proj1.weight", (HF_VISION + "neck.fpn_layers.{n}.proj1.weight",), "conv1x1"),
    Rule("neck.{n}.proj2.weight", (HF_VISION + "neck.fpn_layers.{n}.proj2.weight",), "conv"),
    *(rename(HF_VISION + f"neck.fpn_layers.{{n}}.{m}.bias", f"neck.{{n}}.{m}.bias")
      for m in ("proj1", "proj2")),
)

VISION_META_RULES: tuple[Rule, ...] = (
    Rule("backbone.patch_embed.weight", (META_TRUNK + "patch_embed.proj.weight",), "conv"),
    Rule("backbone.position_embeddings", (META_TRUNK + "pos_embed",), "drop_cls"),
    *_layer_renames(META_TRUNK[:-1], "backbone", {"ln_pre": "layer_norm"}),
    *_layer_renames(_META_BLOCK, _LAYER, {
        "norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "attention.qkv",
        "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}),
    *_layer_renames(META_CONVS[:-1], "neck.{n}", {
        "dconv_2x2_0": "scale_layers.0", "dconv_2x2_1": "scale_layers.2",
        "dconv_2x2": "scale_layers.0"}),
    Rule("neck.{n}.proj1.weight", (META_CONVS + "conv_1x1.weight",), "conv1x1"),
    Rule("neck.{n}.proj2.weight", (META_CONVS + "conv_3x3.weight",), "conv"),
    rename(META_CONVS + "conv_1x1.bias", "neck.{n}.proj1.bias"),
    rename(META_CONVS + "conv_3x3.bias", "neck.{n}.proj2.bias"),
)


def _prefixed(rules: tuple[Rule, ...], src: str, dst: str) -> tuple[Rule, ...]:
    """`rules` with `src` prepended to every source and `dst` to every target."""
    return tuple(Rule(dst + r.target, tuple(src + s for s in r.sources), r.op) for r in rules)


_META_RES, _CLIP_LAYER = META_CLIP + "transformer.resblocks.{n}", "text_model.encoder.layers.{n}"

TEXT_HF_RULES: tuple[Rule, ...] = (
    *_prefixed(CLIP_TEXT_RULES, HF_TEXT + "text_model.", "text_model."),
    *(rename(f"text_projection.{p}", f"text_projection.{p}") for p in _WB),
)

TEXT_META_RULES: tuple[Rule, ...] = (
    rename(META_CLIP + "token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    rename(META_CLIP + "positional_embedding", "text_model.embeddings.position_embedding.weight"),
    *_layer_renames(META_CLIP[:-1], "text_model", {"ln_final": "final_layer_norm"}),
    *(rename(f"{_META_RES}.attn.in_proj_{p}", f"{_CLIP_LAYER}.self_attn.qkv_proj.{p}")
      for p in _WB),
    *_layer_renames(_META_RES, _CLIP_LAYER, {
        "attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}),
    *(rename(f"{META_TEXT}resizer.{p}", f"text_projection.{p}") for p in _WB),
)


# what a SAM 3 hub repo (facebook/sam3) holds that TextSegmenter reads
SAM3_FILES = ("config.json", "model.safetensors", "preprocessor_config.json",
              "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
              "special_tokens_map.json")


def resolve_sam3(repo_or_path: str | Path) -> Path:
    """A local SAM 3 folder: the path itself or a hub snapshot of a repo id (only
    `SAM3_FILES`). Raises WeightLoadError for a missing path or a failed download."""
    path, remote = local_or_remote(repo_or_path)
    if not remote:
        return path
    return download(str(repo_or_path), list(SAM3_FILES), what="SAM 3",
                    hint="; pass a local folder instead")


def selector(prefixes: tuple[str, ...]):
    """A `Spec.select` keeping the tensors under `prefixes` (names unchanged), less the
    non-weights (`NOT_WEIGHTS`, Meta's `attn.freqs_cis`)."""
    def select(tensors: dict) -> dict:
        return {k: v for k, v in tensors.items() if k.startswith(prefixes)
                and k not in NOT_WEIGHTS and not k.endswith(".attn.freqs_cis")}
    return select


def mlx_rules(kind: str) -> tuple[Rule, ...]:
    """The key map of an mlx-edit SAM 3 folder for `kind`: its prefix dropped."""
    return (rename(MLX_PREFIXES[kind] + "{rest}", "{rest}"),)


def has_prefix(prefix: str):
    """A `Format.detect` matching when a tensor name starts with `prefix`."""
    return lambda names, _config: any(n.startswith(prefix) for n in names)


def load_sam3_vision(path: str | Path, dtype: mx.Dtype | None = None, *,
                     config=None) -> Sam3VisionModel:
    """The SAM 3 vision backbone + neck of a transformers Sam3Model folder or a Meta-named
    safetensors file (module doc); config: overrides (a dict like config.json's) or a
    Sam3VisionConfig. Raises WeightLoadError (see `loader.load`)."""
    return loader.load("sam3_vision", path, dtype, config=config)


def load_sam3_text(path: str | Path, dtype: mx.Dtype | None = None, *,
                   config=None) -> Sam3TextEncoder:
    """The SAM 3 text encoder (CLIP tower + projection) of the same files as
    `load_sam3_vision`; config: overrides or a Sam3TextConfig. Raises WeightLoadError."""
    return loader.load("sam3_text", path, dtype, config=config)


# ---- heads (models/sam3_heads.py) -------------------------------------------------------
# transformers' names are ours: convolutions go OIHW -> OHWI and the mask decoder's 1x1
# convolutions (run as Linears) are squeezed to (out, in). Meta's names are renamed to
# transformers' by `select_heads` before the rules (their fused attention `in_proj_*`
# tensors split into q/k/v), so both formats share SAM3_HEAD_RULES.
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
META_HEAD_SIGN = "transformer.decoder."  # a Meta file (transformers says detr_decoder.)
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


def select_heads(tensors: dict) -> dict:
    """A `Spec.select` for the heads: their tensors of a whole-model file, Meta-named ones
    (`META_HEAD_SOURCES`) renamed to ours first (`meta_head_tensors`)."""
    if any(k.startswith(META_HEAD_SIGN) for k in tensors):
        tensors = meta_head_tensors(tensors)
    return {k: v for k, v in tensors.items()
            if k.startswith((*HEAD_PREFIXES, MLX_PREFIXES["sam3_heads"]))}


def load_sam3_heads(path: str | Path, dtype: mx.Dtype | None = None, *,
                    config=None) -> Sam3Heads:
    """The SAM 3 detector heads (geometry encoder, DETR encoder/decoder, scoring, mask
    decoder) of a transformers Sam3Model folder or a Meta-named file; config: overrides
    or a Sam3HeadsConfig. Raises WeightLoadError (see `loader.load`)."""
    return loader.load("sam3_heads", path, dtype, config=config)
