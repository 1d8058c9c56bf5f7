"""SAM 3 detector heads in MLX: from FPN features and prompt tokens to per-query boxes,
scores, a presence score and masks (transformers `Sam3Model.forward` after the vision and
text encoders).

Reference: transformers `models/sam3/modeling_sam3.py` (Sam3Model.forward). Parameter
names are transformers' (`geometry_encoder.*`, `detr_encoder.*`, `detr_decoder.*`,
`mask_decoder.*`, `dot_product_scoring.*`), so the key map (weights/sam3.py) only changes
convolution layouts. The parts: sam3_geometry.py (exemplar boxes), sam3_detr.py (fusion
encoder, query decoder, scoring), sam3_masks.py (pixel decoder and masks).

Inputs: `levels`, `levels_pos` the first three FPN levels and their sine position
encodings (the encodings may have batch 1), (B, H_i, W_i, C) fine first (transformers' `fpn_hidden_states[:-1]`, NHWC);
`text` (B, T, C) the projected text features (`get_text_features().pooler_output`) with
`text_valid` (B, T) bool (the tokenizer's attention mask); optional exemplar `boxes`
(B, N, 4) cxcywh in [0, 1] and `box_labels` (B, N) int: 1 positive, 0 negative, -10 padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from mlx_edit.models.sam3_detr import (
    DetrDecoder,
    DetrDecoderConfig,
    DetrEncoder,
    DetrEncoderConfig,
    DotProductScoring,
    cxcywh_to_xyxy,
)
from mlx_edit.models.sam3_geometry import GeometryEncoder, GeometryEncoderConfig
from mlx_edit.models.sam3_masks import MaskDecoder, MaskDecoderConfig

PAD_BOX_LABEL = -10  # transformers' padding label for boxes


@dataclass
class Sam3HeadsConfig:
    """The head sub-configs of transformers `Sam3Config`."""

    geometry_encoder: GeometryEncoderConfig = field(default_factory=GeometryEncoderConfig)
    detr_encoder: DetrEncoderConfig = field(default_factory=DetrEncoderConfig)
    detr_decoder: DetrDecoderConfig = field(default_factory=DetrDecoderConfig)
    mask_decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)

    @classmethod
    def from_dict(cls, d: dict) -> Sam3HeadsConfig:
        """From a Sam3 `config.json` dict (`*_config` sub-dicts; unknown keys ignored; a
        Sam3VideoModel's `detector_config` is read in its place)."""
        d = d.get("detector_config") or d
        return cls(GeometryEncoderConfig.from_dict(d.get("geometry_encoder_config")),
                   DetrEncoderConfig.from_dict(d.get("detr_encoder_config")),
                   DetrDecoderConfig.from_dict(d.get("detr_decoder_config")),
                   MaskDecoderConfig.from_dict(d.get("mask_decoder_config")))


@dataclass
class Sam3Outputs:
    """Raw detector outputs (transformers `Sam3ImageSegmentationOutput`, last layer).

    masks (B, Q, H_0, W_0) logits at the finest FPN level; boxes (B, Q, 4) x0, y0, x1, y1
    in [0, 1]; logits (B, Q) per-query text-match logits; presence_logits (B, 1);
    semantic (B, H_0, W_0, 1) logits."""

    masks: mx.array
    boxes: mx.array
    logits: mx.array
    presence_logits: mx.array
    semantic: mx.array

    @property
    def scores(self) -> mx.array:
        """(B, Q) sigmoid(logits) * sigmoid(presence): the post-processing's scores."""
        return mx.sigmoid(self.logits) * mx.sigmoid(self.presence_logits)


def join_prompts(text, text_valid, geo, geo_valid):
    """Text tokens then geometry tokens, with their masks (a missing mask = all valid)."""
    if geo is None:
        return text, text_valid
    if text_valid is None:
        text_valid = mx.ones(text.shape[:2], dtype=mx.bool_)
    return mx.concatenate([text, geo], 1), mx.concatenate([text_valid, geo_valid], 1)


class Sam3Heads(nn.Module):
    """Everything of transformers' Sam3Model after the vision and text encoders."""

    def __init__(self, cfg: Sam3HeadsConfig):
        super().__init__()
        self.config = cfg
        self.geometry_encoder = GeometryEncoder(cfg.geometry_encoder)
        self.detr_encoder = DetrEncoder(cfg.detr_encoder)
        self.detr_decoder = DetrDecoder(cfg.detr_decoder)
        self.mask_decoder = MaskDecoder(cfg.mask_decoder)
        self.dot_product_scoring = DotProductScoring(cfg.detr_decoder)

    def encode_boxes(self, boxes, box_labels, feature, feature_pos):
        """Exemplar boxes -> (tokens (B, N+1, C), valid (B, N+1)), or (None, None)."""
        if boxes is None or boxes.size == 0:
            return None, None
        if box_labels is None:
            box_labels = mx.ones(boxes.shape[:2], dtype=mx.int32)
        valid = box_labels != PAD_BOX_LABEL
        labels = mx.where(valid, box_labels, 0).astype(mx.int32)
        return self.geometry_encoder(boxes, labels, valid, feature, feature_pos)

    def __call__(self, levels: list[mx.array], levels_pos: list[mx.array], text: mx.array,
                 text_valid: mx.array | None = None, boxes: mx.array | None = None,
                 box_labels: mx.array | None = None) -> Sam3Outputs:
        """See the module docstring for the inputs; -> Sam3Outputs."""
        levels_pos = [mx.broadcast_to(p, lv.shape) for p, lv in zip(levels_pos, levels)]
        feature, feature_pos = levels[-1], levels_pos[-1]
        b, h, w, c = feature.shape
        geo, geo_valid = self.encode_boxes(boxes, box_labels, feature, feature_pos)
        prompt, valid = join_prompts(text, text_valid, geo, geo_valid)
        pos = feature_pos.reshape(b, h * w, c)
        image = self.detr_encoder(feature.reshape(b, h * w, c), pos, prompt, valid)
        queries, pred_boxes, presence = self.detr_decoder(image, pos, (h, w), prompt, valid)
        logits = self.dot_product_scoring(queries, prompt, valid)
        masks, semantic = self.mask_decoder(queries, levels, image, prompt, valid)
        return Sam3Outputs(masks, cxcywh_to_xyxy(pred_boxes), logits, presence, semantic)
