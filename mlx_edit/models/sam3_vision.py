"""SAM 3 vision backbone: a plain ViT with 2-D axial RoPE, windowed and global attention,
and the FPN neck giving four feature levels (strides patch/4, patch/2, patch, 2 patch).

Reference: transformers `models/sam3/modeling_sam3.py` (Sam3ViTEmbeddings,
Sam3ViTRotaryEmbedding, apply_rotary_pos_emb_2d, Sam3ViTRoPEAttention, Sam3ViTLayer,
Sam3ViTModel, Sam3SinePositionEmbedding, Sam3FPNLayer, Sam3VisionNeck, Sam3VisionModel).
Everything is NHWC. Parameter names are transformers' except where `weights/sam3.py` maps
them: the patch embedding and position table sit on the backbone (`patch_embed`,
`position_embeddings`) and q/k/v are one fused `attention.qkv` (as in Meta's checkpoint).
Shared with SAM 2.1: `sam_hiera.window_partition/unpartition`, `sam.Upsample2x` (the FPN's
2x2 transposed convs, torch layout) and `clip.CLIPMLP`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_edit.models.clip import CLIPMLP
from mlx_edit.models.config import known_fields, sub_config
from mlx_edit.models.sam import Upsample2x
from mlx_edit.models.sam_hiera import max_pool, window_partition, window_unpartition


def _side(value) -> int:
    """A square size given as an int or [h, w]; ValueError for a non-square one."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"only square sizes are supported, got {list(value)}")
        return int(value[0])
    return int(value)


@dataclass
class Sam3ViTConfig:
    """transformers `Sam3ViTConfig` fields we use (defaults: facebook/sam3).
    `rope_theta` is read from `rope_parameters` (axial RoPE only)."""

    hidden_size: int = 1024
    intermediate_size: int = 4736
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 1008
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    window_size: int = 24
    global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    pretrain_image_size: int = 336
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, d: dict) -> Sam3ViTConfig:
        """From a `backbone_config` dict; unknown keys ignored. ValueError: a non-square
        size or a RoPE other than axial."""
        kw = known_fields(cls, d)
        rope = d.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"SAM 3 ViT supports only axial RoPE, got {rope['rope_type']!r}")
        if "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        for k in ("image_size", "patch_size", "pretrain_image_size"):
            if k in kw:
                kw[k] = _side(kw[k])
        if "global_attn_indexes" in kw:
            kw["global_attn_indexes"] = tuple(kw["global_attn_indexes"])
        return cls(**kw)


@dataclass
class Sam3VisionConfig:
    """transformers `Sam3VisionConfig`: the ViT (`backbone_config`) and the FPN neck."""

    backbone_config: Sam3ViTConfig = field(default_factory=Sam3ViTConfig)
    fpn_hidden_size: int = 256
    scale_factors: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)

    @classmethod
    def from_dict(cls, d: dict) -> Sam3VisionConfig:
        """From a Sam3Config (`vision_config`), a Sam3VideoConfig (`detector_config`) or a
        vision config dict; unknown keys ignored."""
        d = sub_config(sub_config(d, "detector_config"), "vision_config")
        kw = known_fields(cls, d)
        kw["backbone_config"] = Sam3ViTConfig.from_dict(d.get("backbone_config") or {})
        if "scale_factors" in kw:
            kw["scale_factors"] = tuple(float(s) for s in kw["scale_factors"])
        return cls(**kw)


@lru_cache(maxsize=8)
def rope_cos_sin(side: int, scale: float, head_dim: int, theta: float) -> tuple[mx.array, mx.array]:
    """Axial 2-D RoPE tables (cos, sin), each (side*side, head_dim) float32, for a
    side x side grid whose positions are (column, row) * `scale`: the first half of the
    head dim rotates by the column, the second by the row, each frequency used for a pair
    of adjacent channels (Sam3ViTRotaryEmbedding, Sam3ViTLayer.precompute_positions)."""
    rows, cols = np.meshgrid(np.arange(side, dtype=np.float32),
                             np.arange(side, dtype=np.float32), indexing="ij")
    half = head_dim // 2
    inv_freq = (1.0 / theta ** (np.arange(0, half, 2, dtype=np.float32) / half)).astype(np.float32)
    pos = [(p.reshape(-1) * np.float32(scale)).astype(np.float32) for p in (cols, rows)]
    freqs = np.concatenate([p[:, None] * inv_freq for p in pos], axis=-1)
    freqs = np.repeat(freqs, 2, axis=-1)
    return mx.array(np.cos(freqs)), mx.array(np.sin(freqs))


def apply_rope_pairwise(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x * cos + rotate(x) * sin with adjacent channel pairs (a, b) -> (-b, a), computed in
    float32 (apply_rotary_pos_emb_2d). x: (..., N, head_dim); cos, sin: (N, head_dim)."""
    xf = x.astype(mx.float32)
    pairs = xf.reshape(*xf.shape[:-1], -1, 2)
    rotated = mx.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xf.shape)
    return (xf * cos + rotated * sin).astype(x.dtype)


class RoPEAttention(nn.Module):
    """Self-attention over a (B, h, w, D) grid with axial RoPE on q and k; fused `qkv`."""

    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dims // num_heads
        self.qkv = nn.Linear(dims, 3 * dims)
        self.o_proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        b, h, w, d = x.shape
        qkv = self.qkv(x.reshape(b, h * w, d)).reshape(b, h * w, 3, self.num_heads, -1)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)
        q, k = apply_rope_pairwise(q, cos, sin), apply_rope_pairwise(k, cos, sin)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, h, w, d))


class ViTLayer(nn.Module):
    """Pre-norm ViT block; windowed attention when `window_size` > 0, else global.
    (B, H, W, D) -> (B, H, W, D)."""

    def __init__(self, c: Sam3ViTConfig, window_size: int):
        super().__init__()
        self.window_size = window_size
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attention = RoPEAttention(c.hidden_size, c.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act)
        grid = window_size or c.image_size // c.patch_size
        self._rope = (grid, c.window_size / grid, c.hidden_size // c.num_attention_heads,
                      c.rope_theta)

    def __call__(self, x: mx.array) -> mx.array:
        cos, sin = rope_cos_sin(*self._rope)
        y = self.layer_norm1(x)
        if self.window_size:
            hw = y.shape[1:3]
            y, padded = window_partition(y, self.window_size)
            y = window_unpartition(self.attention(y, cos, sin), self.window_size, padded, hw)
        else:
            y = self.attention(y, cos, sin)
        x = x + y
        return x + self.mlp(self.layer_norm2(x))


class Sam3ViT(nn.Module):
    """The ViT trunk (Sam3ViTModel): patch embedding (no bias), the pretraining position
    table tiled to the grid, a pre-LayerNorm, then the layers.

    `__call__(pixels (B, S, S, C) normalized, S = image_size)` -> (B, S/p, S/p, D).
    Raises ValueError for another input size (the global layers' RoPE is fixed to it)."""

    def __init__(self, c: Sam3ViTConfig):
        super().__init__()
        self.config = c
        p = c.patch_size
        self.patch_embed = nn.Conv2d(c.num_channels, c.hidden_size, p, stride=p, bias=False)
        n = (c.pretrain_image_size // p) ** 2
        self.position_embeddings = mx.zeros((1, n, c.hidden_size))
        self.layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = [ViTLayer(c, 0 if i in c.global_attn_indexes else c.window_size)
                       for i in range(c.num_hidden_layers)]

    def tiled_positions(self, h: int, w: int) -> mx.array:
        """The (1, side^2, D) position table tiled (not interpolated) to (1, h, w, D)."""
        side = math.isqrt(self.position_embeddings.shape[1])
        table = self.position_embeddings.reshape(1, side, side, -1)
        reps = (1, h // side + 1, w // side + 1, 1)
        return mx.tile(table, reps)[:, :h, :w]

    def __call__(self, pixels: mx.array) -> mx.array:
        s = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1:3] != (s, s):
            raise ValueError(f"SAM 3 pixels must be (B, {s}, {s}, C), got {pixels.shape}")
        x = self.patch_embed(pixels.astype(self.patch_embed.weight.dtype))
        x = self.layer_norm(x + self.tiled_positions(x.shape[1], x.shape[2]).astype(x.dtype))
        for layer in self.layers:
            x = layer(x)
        return x


class FPNLayer(nn.Module):
    """One neck level (Sam3FPNLayer): rescale by 4 (two 2x2 transposed convs with a GELU),
    2, 1 or 0.5 (2x2 max pool), then a 1x1 conv (`proj1`, run as a Linear) and a 3x3 conv
    (`proj2`). (B, H, W, D) -> (B, H*scale, W*scale, fpn_dim)."""

    def __init__(self, dims: int, fpn_dim: int, scale: float):
        super().__init__()
        if scale == 4.0:
            self.scale_layers = [Upsample2x(dims, dims // 2), nn.GELU(),
                                 Upsample2x(dims // 2, dims // 4)]
        elif scale == 2.0:
            self.scale_layers = [Upsample2x(dims, dims // 2)]
        elif scale in (1.0, 0.5):
            self.scale_layers = []
        else:
            raise ValueError(f"SAM 3 FPN scale factor {scale} is not supported (4, 2, 1, 0.5)")
        self.downsample = scale == 0.5
        out = dims // int(scale) if scale > 1 else dims
        self.proj1 = nn.Linear(out, fpn_dim)
        self.proj2 = nn.Conv2d(fpn_dim, fpn_dim, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.scale_layers:
            x = layer(x)
        if self.downsample:
            x = max_pool(x, [2, 2])
        return self.proj2(self.proj1(x))


def sine_position_encoding(h: int, w: int, channels: int, temperature: float = 10000.0
                           ) -> mx.array:
    """DETR's normalized sine encoding of a grid (Sam3SinePositionEmbedding with
    normalize=True, scale 2 pi): (1, h, w, channels), channels = [y half, x half], each
    half alternating sin / cos over frequencies temperature^(2 floor(i/2) / (channels/2))."""
    feats = channels // 2
    dim_t = temperature ** (2 * (np.arange(feats) // 2) / feats)

    def encode(n: int) -> np.ndarray:
        pos = np.arange(1, n + 1, dtype=np.float64) / (n + 1e-6) * 2 * math.pi
        p = pos[:, None] / dim_t
        return np.stack([np.sin(p[:, 0::2]), np.cos(p[:, 1::2])], axis=2).reshape(n, feats)

    y, x = encode(h), encode(w)
    grid = np.concatenate([np.broadcast_to(y[:, None], (h, w, feats)),
                           np.broadcast_to(x[None, :], (h, w, feats))], axis=-1)
    return mx.array(grid[None].astype(np.float32))


@dataclass
class Sam3VisionOutput:
    """last_hidden_state: (B, H, W, D) ViT output, H = W = image_size / patch_size.
    fpn_hidden_states: per scale factor (B, H*s, W*s, fpn_hidden_size).
    fpn_position_encoding: per level (1, H*s, W*s, fpn_hidden_size) float32 (batch-free)."""

    last_hidden_state: mx.array
    fpn_hidden_states: list[mx.array]
    fpn_position_encoding: list[mx.array]


class Sam3VisionModel(nn.Module):
    """Sam3VisionModel: `backbone` (Sam3ViT) and `neck` (FPN levels).

    `__call__(pixels (B, S, S, 3))` -> Sam3VisionOutput; pixels as Sam3ImageProcessor
    gives them (resized to S = image_size, rescaled to [0, 1], normalized with mean = std
    = 0.5) but NHWC. Raises ValueError for another size.
    """

    def __init__(self, config: Sam3VisionConfig):
        super().__init__()
        self.config = config
        c = config.backbone_config
        self.backbone = Sam3ViT(c)
        self.neck = [FPNLayer(c.hidden_size, config.fpn_hidden_size, s)
                     for s in config.scale_factors]

    def __call__(self, pixels: mx.array) -> Sam3VisionOutput:
        x = self.backbone(pixels)
        levels = [layer(x) for layer in self.neck]
        pos = [sine_position_encoding(f.shape[1], f.shape[2], f.shape[3]) for f in levels]
        return Sam3VisionOutput(x, levels, pos)
