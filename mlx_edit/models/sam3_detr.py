"""SAM 3 DETR-style detector heads in MLX: the fusion encoder, the query decoder with box
refinement and the presence token, and the text-query dot-product scoring.

Reference: transformers `models/sam3/modeling_sam3.py` (Sam3DetrEncoder(Layer),
Sam3DetrDecoder(Layer), Sam3DotProductScoring, Sam3SinePositionEmbedding.encode_boxes,
Sam3MLP, Sam3DecoderMLP) and "SAM 3: Segment Anything with Concepts" (Meta 2025).

Image tokens are the finest-but-one FPN level flattened row-major, (B, H*W, C); prompt
tokens are the projected text features, with the geometry encoder's box tokens appended
when there are exemplar boxes, (B, T, C) with a key-padding mask (B, T) (True = valid).
Boxes are (cx, cy, w, h) in [0, 1] of the square model input. All LayerNorms use torch's
default eps 1e-5 (transformers builds them without `layer_norm_eps`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlx_edit.models.config import known_fields
from mlx_edit.models.layers import activation
from mlx_edit.models.sam import Attention
from mlx_edit.models.sam_hiera import LayerNorm

NORM_EPS = 1e-5  # torch nn.LayerNorm default, used by every SAM 3 head
PRESENCE_CLAMP = 10.0  # Sam3DetrDecoder.clamp_presence_logit_max_val
SCORE_CLAMP = 12.0  # Sam3DotProductScoring.clamp_max_val


@dataclass
class DetrEncoderConfig:
    """transformers `Sam3DETREncoderConfig` (also the base of the other head configs)."""

    hidden_size: int = 256
    num_layers: int = 6
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    hidden_act: str = "relu"

    @classmethod
    def from_dict(cls, d: dict):
        """From a `config.json` sub-dict; unknown keys ignored, missing ones default."""
        return cls(**known_fields(cls, d or {}))


@dataclass
class DetrDecoderConfig(DetrEncoderConfig):
    """transformers `Sam3DETRDecoderConfig`."""

    num_queries: int = 200


def key_padding_mask(valid: mx.array | None) -> mx.array | None:
    """(B, T) bool (True = valid token) -> (B, 1, 1, T) attention mask, or None."""
    return None if valid is None else valid[:, None, None, :]


def inverse_sigmoid(x: mx.array, eps: float = 1e-3) -> mx.array:
    """log(x / (1 - x)) with x clipped to [0, 1] and both terms to >= eps (transformers)."""
    x = mx.clip(x, 0.0, 1.0)
    return mx.log(mx.maximum(x, eps) / mx.maximum(1.0 - x, eps))


def cxcywh_to_xyxy(boxes: mx.array) -> mx.array:
    """(..., 4) centre/size boxes -> (..., 4) corner boxes (x0, y0, x1, y1)."""
    c, s = boxes[..., :2], boxes[..., 2:]
    return mx.concatenate([c - 0.5 * s, c + 0.5 * s], axis=-1)


def sine_features(x: mx.array, num_features: int, temperature: float = 10000.0) -> mx.array:
    """(...,) coordinates in [0, 1] -> (..., num_features): interleaved sin/cos of
    2 pi x / temperature^(2 floor(i/2) / num_features) (Sam3SinePositionEmbedding)."""
    i = mx.arange(num_features) // 2
    dim_t = temperature ** (2 * i.astype(mx.float32) / num_features)
    pos = (x * (2 * math.pi))[..., None] / dim_t
    return mx.stack([mx.sin(pos[..., 0::2]), mx.cos(pos[..., 1::2])], axis=-1).reshape(
        *x.shape, num_features)


def encode_boxes(boxes: mx.array, num_features: int) -> mx.array:
    """(B, Q, 4) cxcywh -> (B, Q, 4 num_features), order (y, x, w, h) as transformers."""
    cx, cy, w, h = (boxes[..., i] for i in range(4))
    return mx.concatenate([sine_features(v, num_features) for v in (cy, cx, w, h)], axis=-1)


class FeedForward(nn.Module):
    """Sam3MLP: fc1, activation, fc2 (hidden -> intermediate -> hidden)."""

    def __init__(self, cfg: DetrEncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class DecoderMLP(nn.Module):
    """Sam3DecoderMLP: 2 or 3 Linears `layer1..3` with ReLU between them."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, num_layers: int):
        super().__init__()
        dims = [dim_in] + [hidden] * (num_layers - 1) + [dim_out]
        for n in range(num_layers):
            setattr(self, f"layer{n + 1}", nn.Linear(dims[n], dims[n + 1]))
        self.num_layers = num_layers

    def __call__(self, x: mx.array) -> mx.array:
        for n in range(1, self.num_layers + 1):
            x = getattr(self, f"layer{n}")(x)
            if n < self.num_layers:
                x = nn.relu(x)
        return x


class PromptLayer(nn.Module):
    """Pre-norm block: self-attention, cross-attention, MLP. Sam3DetrEncoderLayer (image
    tokens attend to prompt tokens) and Sam3GeometryEncoderLayer (box tokens attend to
    image tokens) share it; they differ in where the position encoding and masks go."""

    def __init__(self, cfg: DetrEncoderConfig):
        super().__init__()
        self.layer_norm1 = LayerNorm(cfg.hidden_size, NORM_EPS)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, NORM_EPS)
        self.cross_attn = Attention(cfg)
        self.layer_norm3 = LayerNorm(cfg.hidden_size, NORM_EPS)
        self.mlp = FeedForward(cfg)

    def __call__(self, x, self_pos, self_mask, memory, memory_pos, memory_mask) -> mx.array:
        """x (B, N, C); self_pos added to self-attention queries/keys (or None);
        memory (B, M, C), memory_pos added to its keys (or None); masks as `key_padding_mask`."""
        h = self.layer_norm1(x)
        qk = h if self_pos is None else h + self_pos
        x = x + self.self_attn(qk, qk, h, self_mask)
        key = memory if memory_pos is None else memory + memory_pos
        x = x + self.cross_attn(self.layer_norm2(x), key, memory, memory_mask)
        return x + self.mlp(self.layer_norm3(x))


class DetrEncoder(nn.Module):
    """Sam3DetrEncoder: image tokens fused with prompt tokens."""

    def __init__(self, cfg: DetrEncoderConfig):
        super().__init__()
        self.layers = [PromptLayer(cfg) for _ in range(cfg.num_layers)]

    def __call__(self, image: mx.array, image_pos: mx.array, prompt: mx.array,
                 prompt_valid: mx.array | None) -> mx.array:
        """image/image_pos (B, HW, C), prompt (B, T, C), prompt_valid (B, T) -> (B, HW, C)."""
        mask = key_padding_mask(prompt_valid)
        for layer in self.layers:
            image = layer(image, image_pos, None, prompt, None, mask)
        return image


class DecoderLayer(nn.Module):
    """Sam3DetrDecoderLayer: post-norm self-attention, text and image cross-attention, MLP."""

    def __init__(self, cfg: DetrDecoderConfig):
        super().__init__()
        for name in ("self_attn", "text_cross_attn", "vision_cross_attn"):
            setattr(self, name, Attention(cfg))
            setattr(self, f"{name}_layer_norm", LayerNorm(cfg.hidden_size, NORM_EPS))
        self.mlp = FeedForward(cfg)
        self.mlp_layer_norm = LayerNorm(cfg.hidden_size, NORM_EPS)

    def __call__(self, x, query_pos, text, text_mask, image, image_pos, rpb) -> mx.array:
        """x (B, 1+Q, C) presence token first; query_pos (B, Q, C); rpb (B, heads, 1+Q, HW)."""
        pos = mx.pad(query_pos, [(0, 0), (1, 0), (0, 0)])
        q = x + pos
        x = self.self_attn_layer_norm(x + self.self_attn(q, q, x))
        x = self.text_cross_attn_layer_norm(x + self.text_cross_attn(x + pos, text, text,
                                                                     text_mask))
        attn = self.vision_cross_attn(x + pos, image + image_pos, image, rpb)
        x = self.vision_cross_attn_layer_norm(x + attn)
        return self.mlp_layer_norm(x + self.mlp(x))


def log_deltas(deltas: mx.array) -> mx.array:
    """sign(8d) log2(|8d| + 1) / 3: the decoder's log-scale box offsets."""
    d = deltas * 8
    return mx.sign(d) * mx.log2(mx.abs(d) + 1.0) / math.log2(8)


class DetrDecoder(nn.Module):
    """Sam3DetrDecoder: learned queries refine reference boxes layer by layer; a presence
    token says whether the prompt is in the image at all."""

    def __init__(self, cfg: DetrDecoderConfig):
        super().__init__()
        c, heads = cfg.hidden_size, cfg.num_attention_heads
        self.cfg = cfg
        self.layers = [DecoderLayer(cfg) for _ in range(cfg.num_layers)]
        self.output_layer_norm = LayerNorm(c, NORM_EPS)
        self.box_head = DecoderMLP(c, c, 4, 3)
        self.query_embed = nn.Embedding(cfg.num_queries, c)
        self.reference_points = nn.Embedding(cfg.num_queries, 4)
        self.presence_token = nn.Embedding(1, c)
        self.presence_head = DecoderMLP(c, c, 1, 3)
        self.presence_layer_norm = LayerNorm(c, NORM_EPS)
        self.ref_point_head = DecoderMLP(2 * c, c, c, 2)
        self.box_rpb_embed_x = DecoderMLP(2, c, heads, 2)
        self.box_rpb_embed_y = DecoderMLP(2, c, heads, 2)

    def box_bias(self, boxes: mx.array, height: int, width: int) -> mx.array:
        """Box relative position bias: (B, Q, 4) cxcywh -> (B, heads, 1+Q, H*W), a zero
        row first for the presence token."""
        b, q = boxes.shape[:2]
        xyxy = cxcywh_to_xyxy(boxes)
        ys = mx.arange(height, dtype=mx.float32) / height
        xs = mx.arange(width, dtype=mx.float32) / width
        dy = ys[None, None, :, None] - xyxy[:, :, None, 1::2]  # (B, Q, H, 2)
        dx = xs[None, None, :, None] - xyxy[:, :, None, 0::2]  # (B, Q, W, 2)
        by = self.box_rpb_embed_y(log_deltas(dy))  # (B, Q, H, heads)
        bx = self.box_rpb_embed_x(log_deltas(dx))  # (B, Q, W, heads)
        rpb = (by[:, :, :, None] + bx[:, :, None]).reshape(b, q, height * width, -1)
        return mx.pad(rpb.transpose(0, 3, 1, 2), [(0, 0), (0, 0), (1, 0), (0, 0)])

    def __call__(self, image, image_pos, size: tuple[int, int], prompt, prompt_valid):
        """image/image_pos (B, HW, C) encoder output, size (H, W), prompt (B, T, C),
        prompt_valid (B, T) or None -> (queries (B, Q, C) normed last-layer states,
        boxes (B, Q, 4) cxcywh in [0, 1], presence_logits (B, 1))."""
        b = image.shape[0]
        c = self.cfg.hidden_size
        queries = mx.broadcast_to(self.query_embed.weight, (b, *self.query_embed.weight.shape))
        boxes = mx.sigmoid(mx.broadcast_to(self.reference_points.weight, (b, queries.shape[1], 4)))
        x = mx.concatenate([mx.broadcast_to(self.presence_token.weight, (b, 1, c)), queries], 1)
        text_mask = key_padding_mask(prompt_valid)
        for layer in self.layers:
            query_pos = self.ref_point_head(encode_boxes(boxes, c // 2))
            x = layer(x, query_pos, prompt, text_mask, image, image_pos,
                      self.box_bias(boxes, *size))
            queries = self.output_layer_norm(x[:, 1:])
            boxes = mx.sigmoid(self.box_head(queries) + inverse_sigmoid(boxes))
        presence = self.presence_head(self.presence_layer_norm(x[:, :1]))[..., 0]
        return queries, boxes, mx.clip(presence, -PRESENCE_CLAMP, PRESENCE_CLAMP)


class DotProductScoring(nn.Module):
    """Sam3DotProductScoring: per-query logits = <query_proj(q), text_proj(mean prompt)>
    / sqrt(C), clamped to +-12."""

    def __init__(self, cfg: DetrDecoderConfig):
        super().__init__()
        c = cfg.hidden_size
        self.text_mlp = DecoderMLP(c, cfg.intermediate_size, c, 2)
        self.text_mlp_out_norm = LayerNorm(c, NORM_EPS)
        self.text_proj = nn.Linear(c, c)
        self.query_proj = nn.Linear(c, c)

    def __call__(self, queries: mx.array, prompt: mx.array,
                 prompt_valid: mx.array | None) -> mx.array:
        """queries (B, Q, C), prompt (B, T, C), prompt_valid (B, T) -> logits (B, Q)."""
        text = self.text_mlp_out_norm(self.text_mlp(prompt) + prompt)
        if prompt_valid is None:
            pooled = text.mean(axis=1)
        else:
            w = prompt_valid.astype(text.dtype)[..., None]
            pooled = (text * w).sum(axis=1) / mx.maximum(w.sum(axis=1), 1.0)
        t = self.text_proj(pooled)  # (B, C)
        logits = (self.query_proj(queries) @ t[:, :, None])[..., 0] / math.sqrt(t.shape[-1])
        return mx.clip(logits, -SCORE_CLAMP, SCORE_CLAMP)
