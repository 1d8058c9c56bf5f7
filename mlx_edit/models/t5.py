"""T5 (v1.1) encoder, as FLUX uses google/t5-v1_1-xxl for its 512-token text sequence.

Reference: transformers `models/t5/modeling_t5.py` (T5LayerNorm, T5DenseGatedActDense,
T5Attention._relative_position_bucket / compute_bias, T5Stack, T5EncoderModel) and
`models/t5/configuration_t5.py` ("gated-gelu" means tanh GELU, `gelu_new`).

Numerics that differ from a textbook transformer: attention scores are NOT scaled by
1/sqrt(d_kv); one relative position bias, computed from block 0's table, is added in
every layer; the norm is RMSNorm without bias (variance in float32). diffusers calls
the encoder without an attention mask, so there is none here.

Our layout: q/k/v are fused into `attn.qkv` (rows q, k, v), the bias table lives at
`relative_attention_bias` (top level); `mlx_edit.weights.text` maps the names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlx_edit.models.config import known_fields
from mlx_edit.models.layers import activation

@dataclass
class T5Config:
    """transformers `T5Config` fields the encoder uses (defaults: t5-v1_1-xxl)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    @classmethod
    def from_dict(cls, d: dict) -> T5Config:
        """Build from a `config.json` dict; unknown keys are ignored."""
        return cls(**known_fields(cls, d))

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def dense_act_fn(self) -> str:
        """Activation name exactly as T5Config.__post_init__ derives it."""
        if self.feed_forward_proj == "gated-gelu":  # transformers' back-compat rule
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]


def relative_position_bucket(
    relative_position: mx.array, num_buckets: int, max_distance: int
) -> mx.array:
    """Bidirectional T5 bucket of each relative position (memory - query), int32.

    Half of the buckets are for positive offsets; within each half, offsets below
    `num_buckets // 4` get their own bucket and larger ones log-spaced buckets up to
    `max_distance`. The float math is float32 as in transformers (the truncation of the
    log value decides bucket edges, so it must follow the same operations).
    """
    num_buckets //= 2
    buckets = (relative_position > 0).astype(mx.int32) * num_buckets
    rel = mx.abs(relative_position)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    # log(0) is masked out by is_small; clamp to 1 so the cast below never sees -inf
    rel_f = mx.maximum(rel, 1).astype(mx.float32)
    scaled = (
        mx.log(rel_f / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    )
    large = max_exact + scaled.astype(mx.int32)  # truncation toward zero, like .to(long)
    large = mx.minimum(large, num_buckets - 1)
    return buckets + mx.where(is_small, rel, large)


class T5Attention(nn.Module):
    """Unscaled multi-head self-attention: (B, L, D), bias (1, H, L, L) -> (B, L, D)."""

    def __init__(self, d_model: int, num_heads: int, d_kv: int):
        super().__init__()
        self.num_heads = num_heads
        inner = num_heads * d_kv
        self.qkv = nn.Linear(d_model, 3 * inner, bias=False)
        self.o = nn.Linear(inner, d_model, bias=False)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        out = mx.fast.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=1.0, mask=bias)
        return self.o(out.transpose(0, 2, 1, 3).reshape(b, n, -1))


class T5FeedForward(nn.Module):
    """Gated: wo(act(wi_0 x) * wi_1 x); plain: wo(act(wi x)). (B, L, D) -> (B, L, D)."""

    def __init__(self, d_model: int, d_ff: int, act: str, gated: bool):
        super().__init__()
        self.act = activation(act)
        self.gated = gated
        if gated:
            self.wi_0 = nn.Linear(d_model, d_ff, bias=False)
            self.wi_1 = nn.Linear(d_model, d_ff, bias=False)
        else:
            self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        if self.gated:
            return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))
        return self.wo(self.act(self.wi(x)))


class T5RMSNorm(nn.Module):
    """T5LayerNorm: weight * x / sqrt(mean(x^2) + eps), no mean, no bias, float32 variance."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


class T5Block(nn.Module):
    """x + attn(norm x, bias), then x + ff(norm x): (B, L, D) -> (B, L, D)."""

    def __init__(self, config: T5Config):
        super().__init__()
        c = config
        self.attn_norm = T5RMSNorm(c.d_model, c.layer_norm_epsilon)
        self.attn = T5Attention(c.d_model, c.num_heads, c.d_kv)
        self.ff_norm = T5RMSNorm(c.d_model, c.layer_norm_epsilon)
        self.ff = T5FeedForward(c.d_model, c.d_ff, c.dense_act_fn, c.is_gated_act)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        x = x + self.attn(self.attn_norm(x), bias)
        return x + self.ff(self.ff_norm(x))


class T5Encoder(nn.Module):
    """T5 encoder stack (transformers `T5EncoderModel`, no attention mask).

    `__call__(input_ids (B, L) int32)` -> last_hidden_state (B, L, d_model), after the
    final RMSNorm. Any L works (FLUX uses 512 for dev, 256 for schnell).
    """

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        c = config
        self.shared = nn.Embedding(c.vocab_size, c.d_model)
        self.relative_attention_bias = nn.Embedding(c.relative_attention_num_buckets, c.num_heads)
        self.blocks = [T5Block(c) for _ in range(c.num_layers)]
        self.final_norm = T5RMSNorm(c.d_model, c.layer_norm_epsilon)

    def position_bias(self, n: int) -> mx.array:
        """Additive attention bias (1, num_heads, n, n) for an n-token sequence."""
        pos = mx.arange(n)
        rel = pos[None, :] - pos[:, None]  # memory - query
        buckets = relative_position_bucket(
            rel,
            self.config.relative_attention_num_buckets,
            self.config.relative_attention_max_distance,
        )
        return self.relative_attention_bias(buckets).transpose(2, 0, 1)[None]

    def __call__(self, input_ids: mx.array) -> mx.array:
        x = self.shared(input_ids)
        bias = self.position_bias(input_ids.shape[-1]).astype(x.dtype)
        for block in self.blocks:
            x = block(x, bias)
        return self.final_norm(x)
