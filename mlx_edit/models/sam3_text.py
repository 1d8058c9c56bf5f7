"""SAM 3 text encoder: the CLIP text tower (`clip.CLIPTextModel`, causal, padding-masked)
and a Linear to the detector's width, applied to every token.

Reference: transformers `models/sam3/modeling_sam3.py` (`Sam3Model.__init__`:
`text_encoder = CLIPTextModelWithProjection`, `text_projection`;
`Sam3Model.get_text_features`: `text_projection(text_encoder(...).last_hidden_state)`).
CLIP's own pooled projection (`text_encoder.text_projection`) is not used by SAM 3; the
weight loader drops it (`weights/sam3.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlx_edit.models.clip import CLIPTextConfig, CLIPTextModel
from mlx_edit.models.config import known_fields, sub_config


@dataclass
class Sam3TextConfig(CLIPTextConfig):
    """The CLIP `text_config` of a Sam3Config (defaults: facebook/sam3, the init values of
    transformers' Sam3Config) plus `d_model`, the DETR encoder's `hidden_size`."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    max_position_embeddings: int = 32
    hidden_act: str = "gelu"
    d_model: int = 256

    @classmethod
    def from_dict(cls, d: dict) -> Sam3TextConfig:
        """From a Sam3Config (`text_config` + `detr_encoder_config.hidden_size`), a
        Sam3VideoConfig (`detector_config`) or a flat dict of our fields; unknown keys
        are ignored."""
        d = sub_config(d, "detector_config")
        kw = known_fields(cls, sub_config(d, "text_config"))
        detr = d.get("detr_encoder_config") or {}
        if "hidden_size" in detr:
            kw["d_model"] = detr["hidden_size"]
        return cls(**kw)


class Sam3TextEncoder(nn.Module):
    """`text_model` (CLIP text tower) + `text_projection` (hidden_size -> d_model).

    `__call__(input_ids (B, L) int32, attention_mask (B, L) or None)` returns
    `(last_hidden_state (B, L, hidden_size), text_features (B, L, d_model))`: transformers'
    `get_text_features(...).last_hidden_state` and `.pooler_output`. L <= 32 (the position
    table; ValueError beyond). Padding positions get values too; SAM 3 masks them later.
    """

    def __init__(self, config: Sam3TextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextModel(config)
        self.text_projection = nn.Linear(config.hidden_size, config.d_model)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None
                 ) -> tuple[mx.array, mx.array]:
        hidden, _ = self.text_model(input_ids, attention_mask)
        return hidden, self.text_projection(hidden)
