"""Qwen3 text encoder for FLUX.2 [klein]: the hidden states of a few decoder layers.

Reference: transformers `models/qwen3/modeling_qwen3.py` (Qwen3RMSNorm, Qwen3Attention,
Qwen3MLP, Qwen3DecoderLayer, Qwen3Model, Qwen3RotaryEmbedding) called as diffusers'
`Flux2KleinPipeline._get_qwen3_prompt_embeds` calls `Qwen3ForCausalLM`
(`output_hidden_states=True`, an attention mask, positions 0..L-1 whatever the padding).

`hidden_states[k]` of transformers is the input of decoder layer k: index 0 is the token
embedding, index k the output of layer k-1, and the last index (num_hidden_layers) the
final RMSNorm of the last layer's output. Only the layers up to the highest requested
index are built and run (klein takes (9, 18, 27) of Qwen3-4B's 36 layers: 27 layers,
no final norm, no lm_head); the final norm is built only when that last index is asked.

Attention is causal plus the key padding mask; a query whose keys are all masked (left
padding) gets a zero attention output, as torch's SDPA gives. RoPE is the non-interleaved
("rotate_half") kind with its cos/sin table computed in float32 as transformers does.

Our layout: q/k/v fused into `self_attn.qkv_proj` (rows q, k, v), gate/up fused into
`mlp.gate_up_proj` (rows gate, up); `mlx_edit.weights.qwen3` maps transformers' names.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlx_edit.models.config import known_fields

KLEIN_OUT_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers default


@dataclass
class Qwen3Config:
    """transformers `Qwen3Config` fields the encoder uses (defaults: Qwen3-4B), plus
    `out_layers`: the `hidden_states` indices returned (diffusers' `text_encoder_out_layers`).

    Raises ValueError (from `from_dict` / construction) for what this port does not run:
    sliding-window attention, RoPE scaling other than "default", an activation other than
    SiLU, out_layers outside 0..num_hidden_layers.
    """

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    attention_bias: bool = False
    hidden_act: str = "silu"
    out_layers: tuple[int, ...] = KLEIN_OUT_LAYERS

    def __post_init__(self):
        self.out_layers = tuple(int(k) for k in self.out_layers)
        if not self.out_layers or not all(0 <= k <= self.num_hidden_layers
                                          for k in self.out_layers):
            raise ValueError(f"out_layers {self.out_layers} must be hidden_states indices in "
                             f"0..{self.num_hidden_layers}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def from_dict(cls, d: dict) -> Qwen3Config:
        """Build from a transformers `config.json` dict (transformers 5 nests rope_theta in
        `rope_parameters`); unknown keys are ignored. ValueError: see the class doc."""
        d = dict(d)
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ValueError(f"RoPE type {kind!r} is not supported (only 'default')")
        if d.get("rope_theta") is None and "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        if d.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported")
        if d.get("head_dim") is None and d.get("hidden_size") and d.get("num_attention_heads"):
            d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        return cls(**known_fields(cls, d))

    @property
    def layers_run(self) -> int:
        """Decoder layers built and run: the highest requested index (hidden_states[k] is
        the output of layer k-1)."""
        return max(self.out_layers)

    @property
    def final_norm(self) -> bool:
        """Whether the last hidden state (normed in transformers) is requested."""
        return self.num_hidden_layers in self.out_layers


def rope_cos_sin(length: int, head_dim: int, theta: float) -> tuple[mx.array, mx.array]:
    """(cos, sin), each (length, head_dim) float32, for positions 0..length-1: angle
    pos * theta^(-2i/head_dim) for pair i, the half-table repeated (rotate_half layout),
    in float32 operations as Qwen3RotaryEmbedding computes them."""
    exponent = mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim
    inv_freq = 1.0 / mx.power(mx.array(theta, mx.float32), exponent)
    freqs = mx.arange(length, dtype=mx.float32)[:, None] * inv_freq[None]
    emb = mx.concatenate([freqs, freqs], axis=-1)
    return mx.cos(emb), mx.sin(emb)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x (B, heads, L, D) rotated: x*cos + rotate_half(x)*sin, rotate_half = [-x2, x1]."""
    half = x.shape[-1] // 2
    rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)


def attention_mask(mask: mx.array | None, length: int) -> mx.array:
    """Causal AND key-padding boolean mask (B or 1, 1, L, L) from a (B, L) 0/1 mask."""
    pos = mx.arange(length)
    causal = pos[None, :] <= pos[:, None]
    if mask is None:
        return causal[None, None]
    return causal[None, None] & (mask[:, None, None, :] > 0)


class Qwen3Attention(nn.Module):
    """Grouped-query self-attention with per-head RMSNorm of q and k before RoPE."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        width = (self.heads + 2 * self.kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, width, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size,
                                bias=cfg.attention_bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array,
                 attends: mx.array) -> mx.array:
        """x (B, L, hidden); mask (B|1, 1, L, L) bool; attends (B|1, 1, L, 1) bool: rows
        with at least one key. Returns (B, L, hidden)."""
        b, n, _ = x.shape
        d = self.head_dim
        q, k, v = mx.split(self.qkv_proj(x), [self.heads * d, (self.heads + self.kv_heads) * d],
                           axis=-1)
        q = self.q_norm(q.reshape(b, n, self.heads, d)).transpose(0, 2, 1, 3)
        k = self.k_norm(k.reshape(b, n, self.kv_heads, d)).transpose(0, 2, 1, 3)
        v = v.reshape(b, n, self.kv_heads, d).transpose(0, 2, 1, 3)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=d**-0.5, mask=mask)
        out = mx.where(attends, out, mx.zeros((), out.dtype))
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, n, self.heads * d))


class Qwen3MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused in one matmul."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(nn.silu(gate) * up)


class Qwen3Layer(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = Qwen3MLP(cfg)

    def __call__(self, x, cos, sin, mask, attends):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, attends)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3TextEncoder(nn.Module):
    """The first `cfg.layers_run` decoder layers of a Qwen3 model (module doc)."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [Qwen3Layer(cfg) for _ in range(cfg.layers_run)]
        if cfg.final_norm:
            self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, input_ids: mx.array, mask: mx.array | None = None) -> list[mx.array]:
        """input_ids (B, L) int; mask (B, L) 1 for tokens, 0 for padding (None: no padding).

        Returns [hidden_states[k] for k in cfg.out_layers], each (B, L, hidden_size) in
        the parameter dtype, as transformers' `output_hidden_states` gives them.
        """
        cfg = self.config
        n = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(n, cfg.head_dim, cfg.rope_theta)
        cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)  # transformers casts them too
        full = attention_mask(mask, n)
        attends = full.any(axis=-1, keepdims=True)
        kept = {0: x}  # only the requested states stay referenced
        for i, layer in enumerate(self.layers, start=1):
            x = layer(x, cos, sin, full, attends)
            if i in cfg.out_layers:
                kept[i] = self.norm(x) if i == cfg.num_hidden_layers else x
        return [kept[k] for k in cfg.out_layers]
