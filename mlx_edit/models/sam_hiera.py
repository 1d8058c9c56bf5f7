"""SAM 2.1 image encoder: the Hiera backbone and its FPN neck, in MLX (NHWC).

Reference: transformers `models/sam2/modeling_sam2.py` (Sam2HieraDetModel,
Sam2MultiScaleBlock, Sam2MultiScaleAttention, Sam2VisionNeck) and the papers
"Hiera" (Ryali et al. 2023), "Window attention is bugged" (Bolya et al. 2023, the
background + window position embedding) and "SAM 2" (Ravi et al. 2024).

Hiera is a ViT in four stages; the first block of stages 1.. pools its queries 2x2 (max
pool) so the token grid halves and the width grows. Blocks attend inside square windows
(zero-padded to a multiple of the window) except the `global_attention_blocks`. The neck
projects every stage to `fpn_hidden_size` with 1x1 convolutions and adds nearest-upsampled
coarser levels into the levels listed in `fpn_top_down_levels`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_edit.models.config import known_fields
from mlx_edit.models.layers import activation


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with affine weight/bias (torch nn.LayerNorm numerics).

    The mean is removed before mx.fast.layer_norm: MLX's CPU kernel computes the variance
    in one pass, which loses precision when |mean| >> std (see layers.layer_norm)."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        x = x - x.mean(axis=-1, keepdims=True)
        return mx.fast.layer_norm(x, self.weight, self.bias, self.eps)


@dataclass
class HieraConfig:
    """transformers `Sam2HieraDetConfig` (defaults: sam2.1-hiera-tiny)."""

    hidden_size: int = 96
    num_channels: int = 3
    patch_kernel_size: list = field(default_factory=lambda: [7, 7])
    patch_stride: list = field(default_factory=lambda: [4, 4])
    patch_padding: list = field(default_factory=lambda: [3, 3])
    query_stride: list = field(default_factory=lambda: [2, 2])
    window_positional_embedding_background_size: list = field(default_factory=lambda: [7, 7])
    num_query_pool_stages: int = 3
    blocks_per_stage: list = field(default_factory=lambda: [1, 2, 7, 2])
    embed_dim_per_stage: list = field(default_factory=lambda: [96, 192, 384, 768])
    num_attention_heads_per_stage: list = field(default_factory=lambda: [1, 2, 4, 8])
    window_size_per_stage: list = field(default_factory=lambda: [8, 4, 14, 7])
    global_attention_blocks: list = field(default_factory=lambda: [5, 7, 9])
    mlp_ratio: float = 4.0
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, d: dict) -> HieraConfig:
        """Build from a `backbone_config` dict; unknown keys are ignored. Scalars given for
        the [h, w] pairs (transformers accepts both) become pairs."""
        kw = known_fields(cls, d)
        for name in ("patch_kernel_size", "patch_stride", "patch_padding", "query_stride"):
            if isinstance(kw.get(name), int):
                kw[name] = [kw[name], kw[name]]
        return cls(**kw)


@dataclass
class VisionConfig:
    """transformers `Sam2VisionConfig`: the backbone plus the FPN neck."""

    backbone: HieraConfig = field(default_factory=HieraConfig)
    backbone_channel_list: list = field(default_factory=lambda: [768, 384, 192, 96])
    fpn_hidden_size: int = 256
    fpn_top_down_levels: list = field(default_factory=lambda: [2, 3])
    num_feature_levels: int = 3

    @classmethod
    def from_dict(cls, d: dict) -> VisionConfig:
        kw = known_fields(cls, d)
        kw["backbone"] = HieraConfig.from_dict(d.get("backbone_config") or {})
        return cls(**kw)


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) float64 matrix of torch's bicubic resize along one axis
    (align_corners=False, A=-0.75, edge-clamped taps; aten upsample_bicubic2d)."""
    a = -0.75
    m = np.zeros((size_out, size_in))
    scale = size_in / size_out
    for i in range(size_out):
        src = (i + 0.5) * scale - 0.5
        base = math.floor(src)
        t = src - base
        taps = (((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
                ((a + 2) * t - (a + 3)) * t * t + 1,
                ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1)
        taps = (*taps, 1.0 - sum(taps))
        for k, w in enumerate(taps):
            m[i, min(max(base - 1 + k, 0), size_in - 1)] += w
    return m


def max_pool(x: mx.array, stride: list | None) -> mx.array:
    """2-D max pool with kernel = stride (floor mode) of (B, H, W, C); None: identity."""
    if not stride:
        return x
    sh, sw = stride
    b, h, w, c = x.shape
    x = x[:, : h // sh * sh, : w // sw * sw]
    return x.reshape(b, h // sh, sh, w // sw, sw, c).max(axis=(2, 4))


def window_partition(x: mx.array, size: int) -> tuple[mx.array, tuple[int, int]]:
    """(B, H, W, C) -> (B * nWin, size, size, C) zero-padded windows, and the padded (H, W)."""
    b, h, w, c = x.shape
    ph, pw = (-h) % size, (-w) % size
    if ph or pw:
        x = mx.pad(x, [(0, 0), (0, ph), (0, pw), (0, 0)])
    hp, wp = h + ph, w + pw
    x = x.reshape(b, hp // size, size, wp // size, size, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, size, size, c), (hp, wp)


def window_unpartition(x: mx.array, size: int, padded: tuple[int, int],
                       hw: tuple[int, int]) -> mx.array:
    """Inverse of `window_partition`: (B * nWin, size, size, C) -> (B, H, W, C)."""
    hp, wp = padded
    b = x.shape[0] // ((hp // size) * (wp // size))
    x = x.reshape(b, hp // size, wp // size, size, size, -1).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, -1)[:, : hw[0], : hw[1]]


class FeedForward(nn.Module):
    """transformers Sam2FeedForward: proj_in, (num_layers - 2) x layers, proj_out."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, num_layers: int,
                 act: str = "relu", sigmoid_output: bool = False):
        super().__init__()
        self.proj_in = nn.Linear(dim_in, hidden)
        self.layers = [nn.Linear(hidden, hidden) for _ in range(num_layers - 2)]
        self.proj_out = nn.Linear(hidden, dim_out)
        self.act = activation(act)
        self.sigmoid_output = sigmoid_output

    def __call__(self, x: mx.array) -> mx.array:
        x = self.act(self.proj_in(x))
        for layer in self.layers:
            x = self.act(layer(x))
        x = self.proj_out(x)
        return mx.sigmoid(x) if self.sigmoid_output else x


class MultiScaleAttention(nn.Module):
    """Attention over (B, H, W, dim) windows with optional query pooling -> (B, H', W', dim_out)."""

    def __init__(self, dim: int, dim_out: int, heads: int, query_stride: list | None):
        super().__init__()
        self.heads = heads
        self.query_stride = query_stride
        self.qkv = nn.Linear(dim, 3 * dim_out)
        self.proj = nn.Linear(dim_out, dim_out)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.heads, -1)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.query_stride:
            q = max_pool(q.reshape(b, h, w, -1), self.query_stride)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.heads, -1)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(b, h, w, -1))


class MultiScaleBlock(nn.Module):
    """One Hiera block: (B, H, W, dim) -> (B, H', W', dim_out); window or global attention."""

    def __init__(self, cfg: HieraConfig, stage: int, index: int, total_index: int):
        super().__init__()
        first = stage > 0 and index == 0  # a stage's first block keeps the previous width
        self.dim = cfg.embed_dim_per_stage[stage - 1 if first else stage]
        self.dim_out = cfg.embed_dim_per_stage[stage]
        window = cfg.window_size_per_stage[stage - 1 if first else stage]
        self.window_size = 0 if total_index in cfg.global_attention_blocks else window
        pooled = 0 < stage <= cfg.num_query_pool_stages and index == 0
        self.query_stride = list(cfg.query_stride) if pooled else None
        eps = cfg.layer_norm_eps
        self.layer_norm1 = LayerNorm(self.dim, eps)
        self.attn = MultiScaleAttention(self.dim, self.dim_out,
                                        cfg.num_attention_heads_per_stage[stage], self.query_stride)
        self.layer_norm2 = LayerNorm(self.dim_out, eps)
        self.mlp = FeedForward(self.dim_out, int(self.dim_out * cfg.mlp_ratio), self.dim_out, 2,
                               cfg.hidden_act)
        if self.dim != self.dim_out:
            self.proj = nn.Linear(self.dim, self.dim_out)

    def __call__(self, x: mx.array) -> mx.array:
        residual = x
        x = self.layer_norm1(x)
        if self.dim != self.dim_out:
            residual = max_pool(self.proj(x), self.query_stride)
        size = self.window_size
        if size > 0:
            x, padded = window_partition(x, size)
        x = self.attn(x)
        if size > 0:
            if self.query_stride:  # the windows shrank with the pooled queries
                size //= self.query_stride[0]
                hh, ww = residual.shape[1:3]
                padded = (hh + (-hh) % size, ww + (-ww) % size)
            x = window_unpartition(x, size, padded, residual.shape[1:3])
        x = residual + x
        return x + self.mlp(self.layer_norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: HieraConfig):
        super().__init__()
        self.projection = nn.Conv2d(cfg.num_channels, cfg.hidden_size, tuple(cfg.patch_kernel_size),
                                    stride=tuple(cfg.patch_stride),
                                    padding=tuple(cfg.patch_padding))

    def __call__(self, x: mx.array) -> mx.array:
        return self.projection(x)


class HieraBackbone(nn.Module):
    """Sam2HieraDetModel: pixels (B, H, W, C) NHWC -> one (B, h_s, w_s, dim_s) map per stage."""

    def __init__(self, cfg: HieraConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        bg = cfg.window_positional_embedding_background_size
        win = cfg.window_size_per_stage[0]
        self.pos_embed = mx.zeros((1, cfg.hidden_size, *bg))  # torch layout (1, C, h, w)
        self.pos_embed_window = mx.zeros((1, cfg.hidden_size, win, win))
        self.blocks = []
        total = 0
        for stage, count in enumerate(cfg.blocks_per_stage):
            for index in range(count):
                self.blocks.append(MultiScaleBlock(cfg, stage, index, total))
                total += 1
        self.stage_ends = [int(e) for e in np.cumsum(cfg.blocks_per_stage) - 1]

    def position_embedding(self, h: int, w: int) -> mx.array:
        """(1, h, w, C): the background embedding bicubic-resized to (h, w) plus the window
        embedding tiled over it (h, w must be multiples of the first window size)."""
        pe = self.pos_embed[0].transpose(1, 2, 0)  # (bh, bw, C)
        my = mx.array(bicubic_matrix(pe.shape[0], h), dtype=pe.dtype)
        mx_ = mx.array(bicubic_matrix(pe.shape[1], w), dtype=pe.dtype)
        pe = mx.einsum("yi,ijc,xj->yxc", my, pe, mx_)
        win = self.pos_embed_window[0].transpose(1, 2, 0)
        reps = (h // win.shape[0], w // win.shape[1], 1)
        return (pe + mx.tile(win, reps))[None]

    def __call__(self, pixels: mx.array) -> list[mx.array]:
        x = self.patch_embed(pixels)
        x = x + self.position_embedding(*x.shape[1:3])
        stages = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                stages.append(x)
        return stages


class VisionNeck(nn.Module):
    """Sam2VisionNeck: stage maps (high -> low resolution) -> FPN maps (high -> low), each
    (B, h, w, fpn_hidden_size). Lateral 1x1 convolutions are Linears (same numerics)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.convs = [nn.Linear(c, cfg.fpn_hidden_size) for c in cfg.backbone_channel_list]
        self.top_down = list(cfg.fpn_top_down_levels)
        self.levels = cfg.num_feature_levels

    def __call__(self, stages: list[mx.array]) -> list[mx.array]:
        n = len(self.convs) - 1
        outs, prev = [], None
        for i in range(n, -1, -1):  # coarse to fine
            lateral = self.convs[n - i](stages[i])
            if i in self.top_down and i != n:
                up = mx.repeat(mx.repeat(prev, 2, axis=1), 2, axis=2)  # nearest, x2
                prev = lateral + up
            else:
                prev = lateral
            outs.append(prev)
        return outs[-self.levels:][::-1]


class VisionEncoder(nn.Module):
    """Sam2VisionModel: pixels (B, H, W, 3) normalised -> FPN maps, high to low resolution."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.backbone = HieraBackbone(cfg.backbone)
        self.neck = VisionNeck(cfg)

    def __call__(self, pixels: mx.array) -> list[mx.array]:
        return self.neck(self.backbone(pixels))
