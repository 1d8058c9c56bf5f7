"""Shared FLUX building blocks: timestep embedding, 3-axis RoPE, attention, embedders.

Reference: diffusers `models/embeddings.py` (Timesteps, get_1d_rotary_pos_embed,
apply_rotary_emb, TimestepEmbedding) and BFL `src/flux/modules/layers.py`, `math.py`.
RoPE tables and timestep embeddings are computed in float32 whatever the model dtype.

On MLX's CPU backend elementwise kernels (softmax's exp, GELU's tanh) run on one thread
per stream while matmuls use every core (BLAS), so `attention` and `gelu_tanh` split
their work over one CPU stream per core (`cpu_streams`); measured in
benchmarks/RESULTS.md. On a GPU they run as one kernel.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def timestep_embedding(t: mx.array, dim: int = 256, max_period: float = 10000.0) -> mx.array:
    """Sinusoidal embedding [cos, sin] of `t` (B,) (already scaled, e.g. sigma*1000).

    Returns (B, dim) float32. diffusers `Timesteps(dim, flip_sin_to_cos=True,
    downscale_freq_shift=0)`; BFL `timestep_embedding`.
    """
    half = dim // 2
    freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
    args = t.astype(mx.float32)[:, None] * freqs[None]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (diffusers TimestepEmbedding / PixArtAlphaTextProjection);
    `bias=False` for FLUX.2's bias-free embedders."""

    def __init__(self, in_dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden, bias=bias)
        self.out_layer = nn.Linear(hidden, hidden, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.out_layer(nn.silu(self.in_layer(x)))


def embed_scaled(embedder: nn.Module, values: mx.array, dtype: mx.Dtype, dim: int = 256
                 ) -> mx.array:
    """`embedder(timestep_embedding(values * 1000))` with diffusers' casts: `values` (B,)
    (sigma in [0, 1], or a guidance scale) cast to the model `dtype` before the scaling,
    the sinusoid computed in float32 and cast to `dtype`. Returns (B, hidden)."""
    t = (values.astype(dtype) * 1000).astype(mx.float32)
    return embedder(timestep_embedding(t, dim).astype(dtype))


def rope_table(ids: mx.array, axes_dim: Sequence[int], theta: float = 10000.0) -> mx.array:
    """Rotation table for position ids (N, n_axes) -> (N, head_dim/2, 2) float32 [cos, sin].

    Pair k of axis a rotates by angle pos_a * theta^(-2k/dim_a), the axes concatenated
    in order (diffusers FluxPosEmbed, repeat_interleave_real). Built once per run on the
    host in float64, as diffusers does, then cast to float32.
    """
    pos = np.asarray(ids, dtype=np.float64)
    angles = [
        pos[:, a : a + 1] * theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
        for a, dim in enumerate(axes_dim)
    ]
    angle = np.concatenate(angles, axis=-1)
    return mx.array(np.stack([np.cos(angle), np.sin(angle)], axis=-1).astype(np.float32))


def apply_rope(x: mx.array, table: mx.array) -> mx.array:
    """Rotate interleaved pairs of `x` (B, H, N, D) by `table` (N, D/2, 2), in float32.

    out[2i] = x[2i] cos - x[2i+1] sin; out[2i+1] = x[2i+1] cos + x[2i] sin
    (diffusers apply_rotary_emb with use_real_unbind_dim=-1). Returns x's dtype.
    """
    shape = x.shape
    xf = x.astype(mx.float32).reshape(*shape[:-1], shape[-1] // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = table[..., 0], table[..., 1]
    out = mx.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return out.reshape(shape).astype(x.dtype)


MAX_CPU_STREAMS = 8
_THREAD = threading.local()  # MLX streams belong to the thread that made them


def cpu_streams() -> list[mx.Stream]:
    """One MLX stream per CPU core (at most MAX_CPU_STREAMS) on the CPU backend, else [].

    MLX runs each stream's ops on its own thread, so elementwise work split over these
    streams uses every core; results join on the default stream (MLX orders the streams).
    Streams are kept per thread: MLX refuses a stream made in another thread (a server's
    worker thread edits with the models the main thread loaded).
    """
    if mx.default_device() != mx.cpu:
        return []
    n = min(os.cpu_count() or 1, MAX_CPU_STREAMS)
    streams = _THREAD.__dict__.setdefault("streams", [])
    while len(streams) < n:
        streams.append(mx.new_stream(mx.cpu))
    return streams[:n] if n > 1 else []


def split_over_streams(fn, arrays: Sequence[mx.array], axis: int) -> mx.array:
    """`fn(*arrays)` computed in near-equal chunks along `axis`, one chunk per CPU stream,
    concatenated along `axis`. `fn` must act independently on each index of `axis` (heads
    of an attention, tokens of an elementwise op); the result equals `fn(*arrays)`."""
    size = arrays[0].shape[axis]
    streams = cpu_streams()[:size]
    if len(streams) < 2:
        return fn(*arrays)
    bounds = [round(i * size / len(streams)) for i in range(len(streams) + 1)]
    lead = (slice(None),) * (axis % arrays[0].ndim)
    parts = []
    for stream, start, stop in zip(streams, bounds, bounds[1:]):
        with mx.stream(stream):
            parts.append(fn(*(a[(*lead, slice(start, stop))] for a in arrays)))
    return mx.concatenate(parts, axis=axis)


def _sdpa(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5)


def attention(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """Scaled dot-product attention, q (B, H, N, D), k/v (B, H, T, D) -> (B, N, H*D),
    scale 1/sqrt(D); heads split over the CPU streams (`split_over_streams`)."""
    b, h, n, d = q.shape
    out = split_over_streams(_sdpa, (q, k, v), axis=1)
    return out.transpose(0, 2, 1, 3).reshape(b, n, h * d)


def _gelu_tanh(x: mx.array) -> mx.array:
    # 0.5 * (1 + tanh(z)) == sigmoid(2z): one exp instead of tanh, and x*x*x (MLX's CPU
    # pow is a slow scalar call); 1.5957691216057308 = 2 * sqrt(2 / pi).
    return x * mx.sigmoid(1.5957691216057308 * (x + 0.044715 * (x * x * x)))


def gelu_tanh(x: mx.array) -> mx.array:
    """tanh-approximate GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), of x
    (..., N, C), any float dtype; tokens (axis -2) split over the CPU streams.
    diffusers FeedForward 'gelu-approximate' (torch gelu(approximate='tanh'))."""
    return split_over_streams(_gelu_tanh, (x,), axis=-2)


def _swiglu(x: mx.array) -> mx.array:
    a, b = mx.split(x, 2, axis=-1)
    return nn.silu(a) * b


def swiglu(x: mx.array) -> mx.array:
    """silu(first half) * second half of x (..., N, 2C) -> (..., N, C), tokens (axis -2)
    split over the CPU streams. diffusers `Flux2SwiGLU`."""
    return split_over_streams(_swiglu, (x,), axis=-2)


def quick_gelu(x: mx.array) -> mx.array:
    """x * sigmoid(1.702 x), transformers' QuickGELUActivation (original CLIP)."""
    return x * mx.sigmoid(1.702 * x)


# transformers ACT2FN names -> functions with the same numerics (CLIP, SigLIP, T5)
ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": nn.gelu,  # exact (erf) GELU
    "gelu_new": gelu_tanh,  # tanh approximation
    "gelu_pytorch_tanh": gelu_tanh,
    "relu": nn.relu,
    "silu": nn.silu,
}


def activation(name: str):
    """The activation function for a transformers `hidden_act` name; ValueError if unknown."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


def layer_norm(x: mx.array, eps: float = 1e-6) -> mx.array:
    """LayerNorm without affine parameters (statistics in float32 inside mx.fast).

    The mean is removed first: MLX's CPU kernel computes the variance in one pass
    (E[x^2] - E[x]^2), which loses ~1e-3 relative when |mean| >> std.
    """
    return mx.fast.layer_norm(x - x.mean(axis=-1, keepdims=True), None, None, eps)


SUM_BLOCK = 64  # rows per partial sum in `blocked_sum`


def blocked_sum(x: mx.array, block: int = SUM_BLOCK) -> mx.array:
    """Sum of x (B, N, C) over axis 1 -> (B, C) in x's dtype, as a tree: sums of `block`
    consecutive rows, then sums of `block` of those, ... A plain float32 sum of N terms
    has a rounding error growing with N (~1e-4 relative at 4M terms on CPU, where MLX
    adds them in sequence); here each term passes through log_block(N) short sums, so
    the error stays ~1e-7 at any image size. Costs about one read of x."""
    while x.shape[1] > block:
        b, n, c = x.shape
        whole = n - n % block
        parts = x[:, :whole].reshape(b, whole // block, block, c).sum(axis=2)
        if whole < n:
            parts = mx.concatenate([parts, x[:, whole:].sum(axis=1, keepdims=True)], axis=1)
        x = parts
    return x.sum(axis=1)


def _group_mean(x: mx.array, groups: int) -> mx.array:
    """Mean over each group of consecutive channels of x (B, N, C) -> (B, 1, groups, 1)."""
    b, n, c = x.shape
    sums = blocked_sum(x).reshape(b, 1, groups, c // groups).sum(axis=3, keepdims=True)
    return sums / (n * (c // groups))


def group_norm(x: mx.array, groups: int, eps: float) -> mx.array:
    """(x - mean) / sqrt(var + eps) over groups of consecutive channels (as PyTorch's
    F.group_norm without affine), x (B, ..., C) channels-last, any float dtype; statistics
    in float32, returns x's dtype. Raises ValueError if C is not a multiple of `groups`.

    Statistics by `blocked_sum`: a plain float32 mean over a 4K group (33M values) is
    ~3e-4 off, these ~1e-7 (tests/test_vae.py, float64 reference). The variance is of
    centred values, and the mean is taken twice (the second time of the centred values,
    removing the first's rounding): a one-pass E[x^2] - E[x]^2 (MLX's CPU layer_norm
    kernel) loses ~1e-3 when |mean| >> std (flat control/edge images). Grouping is a
    reshape of the channel axis (no transpose).
    """
    b, c = x.shape[0], x.shape[-1]
    if c % groups:
        raise ValueError(f"group_norm: {c} channels are not a multiple of {groups} groups")
    flat = x.reshape(b, -1, c).astype(mx.float32)
    centred = flat.reshape(b, -1, groups, c // groups) - _group_mean(flat, groups)
    flat = centred.reshape(b, -1, c)
    shift = _group_mean(flat, groups)  # the first mean's rounding error
    var = _group_mean(mx.square(flat), groups) - mx.square(shift)
    y = (centred - shift) * mx.rsqrt(var + eps)
    return y.reshape(x.shape).astype(x.dtype)


class GroupNorm(nn.Module):
    """GroupNorm with affine parameters `weight`, `bias` (C,) (as nn.GroupNorm /
    torch.nn.GroupNorm), channels-last input (B, ..., C); statistics by `group_norm`."""

    def __init__(self, groups: int, channels: int, eps: float = 1e-6):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))

    def __call__(self, x: mx.array) -> mx.array:
        return group_norm(x, self.groups, self.eps) * self.weight + self.bias


def modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    """LN(x) * (1 + scale) + shift, with shift/scale (B, D) broadcast over tokens."""
    return layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


@dataclass
class ControlResiduals:
    """ControlNet residuals for one ControlNet, already multiplied by its scale.

    `double`: list of (B, N_img, hidden) added after the double blocks; `single`: the same
    for single blocks (image tokens only). Block i receives `double[i // ceil(n/len)]`
    (diffusers' interval rule) or, with `repeat=True`, `double[i % len]` (XLabs).
    Reference: diffusers transformer_flux.py, FluxTransformer2DModel.forward.
    """

    double: list[mx.array] = field(default_factory=list)
    single: list[mx.array] = field(default_factory=list)
    repeat: bool = False


@dataclass
class IPAdapterKV:
    """One IP-Adapter's keys/values, precomputed once per run for every double block.

    `k`, `v`: one (B, H, T, D) array per double block; `scale`: one float per block.
    The transformer adds scale * SDPA(image query after QK-norm, before RoPE, k, v) to the
    image stream after the feed-forward residual (diffusers FluxIPAdapterAttnProcessor).
    """

    k: list[mx.array]
    v: list[mx.array]
    scale: list[float]


def residual_index(i: int, n_blocks: int, n_residuals: int, repeat: bool) -> int:
    """Which residual block i of n_blocks gets (diffusers interval rule / XLabs repeat)."""
    if repeat:
        return i % n_residuals
    return i // int(math.ceil(n_blocks / n_residuals))
