"""Key maps and loaders for SAM 3's image model, one spec kind per sub-model
(`weights/specs.py`): `sam3_vision` (ViT + FPN neck, `models/sam3_vision.py`) and
`sam3_text` (CLIP text tower + projection, `models/sam3_text.py`). The heads (geometry
encoder, DETR encoder/decoder, mask decoder, scoring) add their kinds beside these.

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
Not weights, dropped by name: CLIP's own pooled projection (unused by SAM 3), the
`position_ids` buffer and Meta's precomputed RoPE `freqs_cis`. Anything else missing,
unexpected or mis-shaped is a WeightLoadError (`core.load_into`).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from mlx_edit.models.sam3_text import Sam3TextEncoder
from mlx_edit.models.sam3_vision import Sam3VisionModel
from mlx_edit.weights import loader
from mlx_edit.weights.core import Rule, rename
from mlx_edit.weights.text import CLIP_TEXT_RULES

WRAPPER_PREFIXES = ("detector.", "detector_model.")  # Meta release, transformers video model

HF_VISION, META_VISION = "vision_encoder.", "backbone.vision_backbone."
META_TRUNK, META_CONVS = META_VISION + "trunk.", META_VISION + "convs.{n}."
HF_TEXT, META_TEXT = "text_encoder.", "backbone.language_backbone."
META_CLIP = META_TEXT + "encoder."

VISION_SELECT = (HF_VISION, META_TRUNK, META_VISION + "convs.")
TEXT_SELECT = (HF_TEXT, "text_projection.", META_TEXT)
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


def selector(prefixes: tuple[str, ...]):
    """A `Spec.select` keeping the tensors under `prefixes` (names unchanged), less the
    non-weights (`NOT_WEIGHTS`, Meta's `attn.freqs_cis`)."""
    def select(tensors: dict) -> dict:
        return {k: v for k, v in tensors.items() if k.startswith(prefixes)
                and k not in NOT_WEIGHTS and not k.endswith(".attn.freqs_cis")}
    return select


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
