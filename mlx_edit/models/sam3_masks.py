"""SAM 3 mask decoder in MLX: prompt cross-attention on the encoder's image tokens, a
small FPN pixel decoder, and per-query masks as dot products with pixel embeddings.

Reference: transformers `models/sam3/modeling_sam3.py` (Sam3MaskDecoder,
Sam3PixelDecoder, Sam3MaskEmbedder). Layout is NHWC. The pixel decoder starts from the
coarsest level (the DETR encoder's output in place of the last FPN level), upsamples it
nearest to the next finer level, adds it, then conv3x3 -> GroupNorm(8) -> ReLU; the masks
come out at the finest FPN level (4x the ViT grid: 288 x 288 for a 1008 px input).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_edit.models.config import known_fields
from mlx_edit.models.layers import GroupNorm
from mlx_edit.models.sam import Attention
from mlx_edit.models.sam3_detr import NORM_EPS, key_padding_mask
from mlx_edit.models.sam_hiera import LayerNorm

GROUPS = 8  # Sam3PixelDecoder's GroupNorm groups


@dataclass
class MaskDecoderConfig:
    """transformers `Sam3MaskDecoderConfig`."""

    hidden_size: int = 256
    num_upsampling_stages: int = 3
    num_attention_heads: int = 8

    @classmethod
    def from_dict(cls, d: dict) -> MaskDecoderConfig:
        """From a `config.json` sub-dict; unknown keys ignored, missing ones default."""
        return cls(**known_fields(cls, d or {}))


def resize_nearest(x: mx.array, height: int, width: int) -> mx.array:
    """(B, h, w, C) -> (B, height, width, C) as torch `interpolate(mode="nearest")`
    (source index floor(dst * in / out))."""
    def index(n_in, n_out):
        src = np.floor(np.arange(n_out) * np.float32(n_in / n_out)).astype(np.int64)
        return mx.array(np.minimum(src, n_in - 1))

    return x[:, index(x.shape[1], height)][:, :, index(x.shape[2], width)]


class PixelDecoder(nn.Module):
    """Sam3PixelDecoder: coarse-to-fine FPN over (B, H_i, W_i, C) levels (fine first)."""

    def __init__(self, cfg: MaskDecoderConfig):
        super().__init__()
        c, n = cfg.hidden_size, cfg.num_upsampling_stages
        self.conv_layers = [nn.Conv2d(c, c, 3, padding=1) for _ in range(n)]
        self.norms = [GroupNorm(GROUPS, c, 1e-5) for _ in range(n)]

    def __call__(self, levels: list[mx.array]) -> mx.array:
        """levels fine -> coarse, (B, H_i, W_i, C) -> (B, H_0, W_0, C)."""
        x = levels[-1]
        for conv, norm, skip in zip(self.conv_layers, self.norms, reversed(levels[:-1])):
            x = resize_nearest(x, skip.shape[1], skip.shape[2]) + skip
            x = nn.relu(norm(conv(x)))
        return x


class MaskEmbedder(nn.Module):
    """Sam3MaskEmbedder: three Linears with ReLU between them, (B, Q, C) -> (B, Q, C)."""

    def __init__(self, cfg: MaskDecoderConfig):
        super().__init__()
        self.layers = [nn.Linear(cfg.hidden_size, cfg.hidden_size) for _ in range(3)]

    def __call__(self, x: mx.array) -> mx.array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = nn.relu(x)
        return x


class MaskDecoder(nn.Module):
    """Sam3MaskDecoder: per-query mask logits and a semantic (one-channel) map."""

    def __init__(self, cfg: MaskDecoderConfig):
        super().__init__()
        c = cfg.hidden_size
        self.pixel_decoder = PixelDecoder(cfg)
        self.mask_embedder = MaskEmbedder(cfg)
        self.instance_projection = nn.Linear(c, c)  # a 1x1 convolution in transformers
        self.semantic_projection = nn.Linear(c, 1)
        self.prompt_cross_attn = Attention(cfg)
        self.prompt_cross_attn_norm = LayerNorm(c, NORM_EPS)

    def __call__(self, queries: mx.array, levels: list[mx.array], image: mx.array,
                 prompt: mx.array, prompt_valid: mx.array | None) -> tuple[mx.array, mx.array]:
        """queries (B, Q, C) decoder output; levels: the FPN levels (B, H_i, W_i, C), fine
        first, whose last one the encoder consumed; image (B, H*W, C) encoder output on
        that level; prompt (B, T, C), prompt_valid (B, T) ->
        (mask logits (B, Q, H_0, W_0), semantic logits (B, H_0, W_0, 1))."""
        attn = self.prompt_cross_attn(self.prompt_cross_attn_norm(image), prompt, prompt,
                                      key_padding_mask(prompt_valid))
        image = image + attn
        b, h, w, c = levels[-1].shape
        pixels = self.pixel_decoder([*levels[:-1], image.reshape(b, h, w, c)])
        instance = self.instance_projection(pixels)  # (B, H0, W0, C)
        embed = self.mask_embedder(queries)
        masks = mx.einsum("bqc,bhwc->bqhw", embed, instance)
        return masks, self.semantic_projection(pixels)
