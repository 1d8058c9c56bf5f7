"""Key map for the SAM 3 detector heads (models/sam3_heads.py) in the transformers
`Sam3Model` layout: names are transformers' own; convolutions go OIHW -> OHWI and the
mask decoder's 1x1 convolutions (run as Linears) are squeezed to (out, in).

`HEAD_PREFIXES` are the checkpoint key prefixes the heads own; the vision and text
encoders' keys are the backbone loader's (weights/sam3.py).
"""

from __future__ import annotations

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
