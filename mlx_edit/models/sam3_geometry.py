"""SAM 3 geometry (prompt) encoder in MLX: exemplar boxes -> prompt tokens.

Reference: transformers `models/sam3/modeling_sam3.py` (Sam3GeometryEncoder,
Sam3GeometryEncoderLayer) and torchvision's `ops.roi_align` (aligned=False,
sampling_ratio=-1: an adaptive ceil(roi / output) grid of bilinear samples per bin,
samples outside [-1, size] count as zero). transformers' SAM 3 takes boxes only (no
points); each box becomes one token from a direct projection of its coordinates, its
ROI-pooled image features and a sine encoding of its centre, plus a positive/negative
label embedding; a CLS token follows the valid boxes, and the tokens attend to each other
and to the image. Boxes are (cx, cy, w, h) in [0, 1]; images are NHWC.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_edit.models.sam3_detr import (
    NORM_EPS,
    DetrEncoderConfig,
    PromptLayer,
    cxcywh_to_xyxy,
    key_padding_mask,
    sine_features,
)
from mlx_edit.models.sam_hiera import LayerNorm


@dataclass
class GeometryEncoderConfig(DetrEncoderConfig):
    """transformers `Sam3GeometryEncoderConfig`."""

    num_layers: int = 3
    roi_size: int = 7


def _roi_axis(starts: np.ndarray, ends: np.ndarray, size: int, bins: int) -> np.ndarray:
    """(K,) ROI bounds along one axis in feature cells -> (K, bins, size) weights: each
    bin's mean over its adaptive grid of samples of the bilinear interpolation weights."""
    extent = np.maximum(ends - starts, 1.0)
    step = extent / bins
    grid = np.maximum(np.ceil(extent / bins), 1).astype(np.int64)
    out = np.zeros((len(starts), bins, size), np.float64)
    for k in range(len(starts)):
        i = np.arange(grid[k])
        pos = starts[k] + np.arange(bins)[:, None] * step[k] + (i + 0.5) * step[k] / grid[k]
        inside = (pos >= -1.0) & (pos <= size)
        pos = np.clip(pos, 0.0, None)
        low = np.minimum(np.floor(pos).astype(np.int64), size - 1)
        high = np.minimum(low + 1, size - 1)
        frac = np.where(low >= size - 1, 0.0, pos - low)
        rows = np.broadcast_to(np.arange(bins)[:, None], pos.shape)
        np.add.at(out[k], (rows, low), (1.0 - frac) * inside / grid[k])
        np.add.at(out[k], (rows, high), frac * inside / grid[k])
    return out


def roi_align(features: mx.array, boxes: np.ndarray, output_size: int) -> mx.array:
    """torchvision `roi_align(features, boxes, output_size)` with spatial_scale 1,
    sampling_ratio -1, aligned False. Bilinear sampling and the bin means separate per
    axis, so each ROI is Ay @ F @ Ax^T.

    features (B, H, W, C); boxes (B, N, 4) float x0, y0, x1, y1 in feature cells (host
    array: the adaptive grid depends on box sizes) -> (B, N, out, out, C) float32.
    """
    b, h, w, _ = features.shape
    flat = boxes.reshape(-1, 4).astype(np.float64)
    ay = _roi_axis(flat[:, 1], flat[:, 3], h, output_size).reshape(b, -1, output_size, h)
    ax = _roi_axis(flat[:, 0], flat[:, 2], w, output_size).reshape(b, -1, output_size, w)
    ay, ax = mx.array(ay.astype(np.float32)), mx.array(ax.astype(np.float32))
    rows = mx.einsum("bnph,bhwc->bnpwc", ay, features)
    return mx.einsum("bnqw,bnpwc->bnpqc", ax, rows)


def append_cls(tokens: mx.array, valid: mx.array, cls: mx.array) -> tuple[mx.array, mx.array]:
    """Insert `cls` (C,) right after each row's valid tokens (transformers'
    `concat_padded_sequences`): tokens (B, N, C), valid (B, N) right-padded ->
    (B, N+1, C), (B, N+1)."""
    b, n, c = tokens.shape
    count = valid.astype(mx.int32).sum(axis=1, keepdims=True)  # (B, 1)
    pos = mx.arange(n + 1)[None]
    padded = mx.pad(tokens, [(0, 0), (0, 1), (0, 0)])
    out = mx.where((pos == count)[..., None], cls, padded)
    return out, pos < count + 1


class GeometryEncoder(nn.Module):
    """Sam3GeometryEncoder: (box, label) prompts -> prompt tokens for the detector."""

    def __init__(self, cfg: GeometryEncoderConfig):
        super().__init__()
        c = cfg.hidden_size
        self.cfg = cfg
        self.label_embed = nn.Embedding(2, c)
        self.cls_embed = nn.Embedding(1, c)
        self.boxes_direct_project = nn.Linear(4, c)
        self.boxes_pool_project = nn.Conv2d(c, c, cfg.roi_size)
        self.boxes_pos_enc_project = nn.Linear(c + 2, c)
        self.vision_layer_norm = LayerNorm(c, NORM_EPS)
        self.final_proj = nn.Linear(c, c)
        self.prompt_layer_norm = LayerNorm(c, NORM_EPS)
        self.layers = [PromptLayer(cfg) for _ in range(cfg.num_layers)]
        self.output_layer_norm = LayerNorm(c, NORM_EPS)

    def embed_boxes(self, boxes: mx.array, labels: mx.array, features: mx.array) -> mx.array:
        """boxes (B, N, 4) cxcywh, labels (B, N) int 0/1, features (B, H, W, C) normed
        -> (B, N, C): direct + ROI-pooled + centre-encoded + label embeddings."""
        b, n = boxes.shape[:2]
        h, w, c = features.shape[1:]
        r = self.cfg.roi_size
        corners = np.array(cxcywh_to_xyxy(boxes) * mx.array([w, h, w, h], mx.float32))
        pooled = roi_align(features, corners, r).reshape(b * n, r, r, c)
        pooled = self.boxes_pool_project(pooled.astype(features.dtype)).reshape(b, n, c)
        cx, cy, bw, bh = (boxes[..., i] for i in range(4))
        half = c // 2
        coords = mx.concatenate([sine_features(cy, half), sine_features(cx, half),
                                 bh[..., None], bw[..., None]], axis=-1)
        return (self.label_embed.weight[labels] + self.boxes_direct_project(boxes) + pooled
                + self.boxes_pos_enc_project(coords))

    def __call__(self, boxes: mx.array, labels: mx.array, valid: mx.array,
                 features: mx.array, pos: mx.array) -> tuple[mx.array, mx.array]:
        """boxes (B, N, 4) cxcywh in [0, 1], labels (B, N) int (1 positive, 0 negative),
        valid (B, N) bool right-padded, features/pos (B, H, W, C) the FPN level the
        detector uses -> tokens (B, N+1, C), valid (B, N+1) (CLS after the valid boxes)."""
        b, h, w, c = features.shape
        tokens = self.embed_boxes(boxes, labels, self.vision_layer_norm(features))
        tokens, valid = append_cls(tokens, valid, self.cls_embed.weight[0])
        tokens = self.prompt_layer_norm(self.final_proj(tokens))
        image, image_pos = features.reshape(b, h * w, c), pos.reshape(b, h * w, c)
        mask = key_padding_mask(valid)
        for layer in self.layers:
            tokens = layer(tokens, None, mask, image, image_pos, None)
        return self.output_layer_norm(tokens), valid

