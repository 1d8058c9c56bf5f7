"""CLIP transformer encoder (generic layers), the CLIP text tower and the vision tower.

Reference: transformers `models/clip/modeling_clip.py` (CLIPAttention, CLIPMLP,
CLIPEncoderLayer, CLIPEncoder, CLIPTextModel, CLIPVisionModelWithProjection). FLUX uses
the text tower of openai/clip-vit-large-patch14 for its pooled 768-d prompt vector; the
XLabs IP-Adapter uses the vision tower's projected 768-d `image_embeds`.

Our layout differs from the checkpoint in one place: q/k/v are one fused projection
`self_attn.qkv_proj` (rows ordered q, k, v); `mlx_edit.weights.text` and
`mlx_edit.weights.vision` map the names (and `pre_layrnorm` to `pre_layernorm`). The
encoder layers take sizes, not a text config, so the vision towers reuse them (CLIP here,
SigLIP in `mlx_edit.models.redux`).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlx_edit.models.config import known_fields, sub_config
from mlx_edit.models.layers import activation


@dataclass
class CLIPTextConfig:
    """transformers `CLIPTextConfig` fields we use (defaults: CLIP-L/14 text tower)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    bos_token_id: int = 49406
    pad_token_id: int = 49407

    @classmethod
    def from_dict(cls, d: dict) -> CLIPTextConfig:
        """Build from a `config.json` dict; unknown keys are ignored. A full CLIPConfig
        (with a nested `text_config`) is accepted too."""
        return cls(**known_fields(cls, sub_config(d, "text_config")))


class CLIPAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and 1/sqrt(head_dim) scale.

    `__call__(x (B, L, D), mask)`: mask is None, or an additive float array broadcastable
    to (B, H, L, L). Returns (B, L, D).
    """

    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        if dims % num_heads:
            raise ValueError(f"hidden size {dims} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dims // num_heads) ** -0.5
        self.qkv_proj = nn.Linear(dims, 3 * dims)
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array, mask: mx.array | None = None) -> mx.array:
        b, n, d = x.shape
        qkv = self.qkv_proj(x).reshape(b, n, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        out = mx.fast.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], scale=self.scale, mask=mask
        )
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, n, d))


class CLIPMLP(nn.Module):
    """fc2(act(fc1(x))): (B, L, D) -> (B, L, D)."""

    def __init__(self, dims: int, hidden_dims: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden_dims)
        self.fc2 = nn.Linear(hidden_dims, dims)
        self.act = activation(act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer: x + attn(ln1 x), then x + mlp(ln2 x).

    Generic over text and vision: the (causal or no) mask is passed in.
    `__call__(x (B, L, D), mask=None) -> (B, L, D)`.
    """

    def __init__(self, dims: int, mlp_dims: int, num_heads: int, act: str, eps: float):
        super().__init__()
        self.self_attn = CLIPAttention(dims, num_heads)
        self.layer_norm1 = nn.LayerNorm(dims, eps=eps)
        self.mlp = CLIPMLP(dims, mlp_dims, act)
        self.layer_norm2 = nn.LayerNorm(dims, eps=eps)

    def __call__(self, x: mx.array, mask: mx.array | None = None) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """A stack of `CLIPEncoderLayer`s (text or vision).

    `__call__(x (B, L, D), mask=None, *, all_hidden=False)` returns the last layer's
    output (B, L, D), or with `all_hidden` the list [input, layer 1, ..., layer N] like
    transformers' `hidden_states` (for penultimate-layer features).
    """

    def __init__(
        self, num_layers: int, dims: int, mlp_dims: int, num_heads: int, act: str, eps: float
    ):
        super().__init__()
        self.layers = [
            CLIPEncoderLayer(dims, mlp_dims, num_heads, act, eps) for _ in range(num_layers)
        ]

    @classmethod
    def from_config(cls, c) -> CLIPEncoder:
        """The encoder of a tower config (CLIPTextConfig, CLIPVisionConfig,
        SiglipVisionConfig: their layer fields have transformers' names)."""
        return cls(c.num_hidden_layers, c.hidden_size, c.intermediate_size,
                   c.num_attention_heads, c.hidden_act, c.layer_norm_eps)

    def __call__(
        self, x: mx.array, mask: mx.array | None = None, *, all_hidden: bool = False
    ) -> mx.array | list[mx.array]:
        hidden = [x]
        for layer in self.layers:
            x = layer(x, mask)
            if all_hidden:
                hidden.append(x)
        return hidden if all_hidden else x


class CLIPTextEmbeddings(nn.Module):
    """Token plus learned absolute position embeddings: (B, L) int -> (B, L, D)."""

    def __init__(self, vocab_size: int, max_positions: int, dims: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dims)
        self.position_embedding = nn.Embedding(max_positions, dims)

    def __call__(self, input_ids: mx.array) -> mx.array:
        n = input_ids.shape[-1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:n]


def causal_mask(n: int, dtype: mx.Dtype) -> mx.array:
    """Additive causal mask (n, n): 0 on and below the diagonal, -inf above."""
    idx = mx.arange(n)
    return mx.where(idx[None, :] > idx[:, None], -mx.inf, 0.0).astype(dtype)


def eos_positions(input_ids: mx.array, eos_token_id: int) -> mx.array:
    """Index of the pooled (EOS) token per row, as transformers' CLIPTextTransformer picks it.

    eos_token_id == 2 is the legacy config (before transformers PR #24773): the position
    of the largest id (EOS is the largest id in CLIP's vocabulary). Otherwise the first
    position where id == eos_token_id (0 if a row has none). Ties resolve to the first.
    """
    if eos_token_id == 2:
        return mx.argmax(input_ids.astype(mx.int32), axis=-1)
    return mx.argmax((input_ids == eos_token_id).astype(mx.int32), axis=-1)


class CLIPTextModel(nn.Module):
    """CLIP text tower without projection (transformers `CLIPTextModel`).

    `__call__(input_ids (B, L) int32, L <= max_position_embeddings, attention_mask=None)`
    returns `(last_hidden_state (B, L, D), pooled (B, D))`, both after `final_layer_norm`;
    the attention is causal, and with `attention_mask` ((B, L), 1 = token, 0 = padding)
    no position attends to padding (transformers' causal + padding mask). Raises
    ValueError when L exceeds the position table.
    """

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        c = config
        self.embeddings = CLIPTextEmbeddings(c.vocab_size, c.max_position_embeddings, c.hidden_size)
        self.encoder = CLIPEncoder.from_config(c)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None
                 ) -> tuple[mx.array, mx.array]:
        n = input_ids.shape[-1]
        if n > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {n} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        x = self.embeddings(input_ids)
        mask = causal_mask(n, x.dtype)
        if attention_mask is not None:
            padding = mx.where(attention_mask[:, None, None, :] == 0, -mx.inf, 0.0)
            mask = mask + padding.astype(x.dtype)
        x = self.encoder(x, mask)
        x = self.final_layer_norm(x)
        idx = eos_positions(input_ids, self.config.eos_token_id)
        pooled = mx.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
        return x, pooled


# ---------------------------------------------------------------- vision tower


@dataclass
class CLIPVisionConfig:
    """transformers `CLIPVisionConfig` fields we use (defaults: CLIP ViT-L/14 at 224 px)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 768
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: dict) -> CLIPVisionConfig:
        """Build from a `config.json` dict; unknown keys are ignored. A full CLIPConfig is
        accepted too: its nested `vision_config`, with the top-level `projection_dim` (the
        width of CLIPModel's `visual_projection`) when it has one."""
        top = d.get("projection_dim") if isinstance(d.get("vision_config"), dict) else None
        d = {**sub_config(d, "vision_config"), **({"projection_dim": top} if top else {})}
        return cls(**known_fields(cls, d))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def patch_tokens(conv: nn.Conv2d, image_size: int, pixels: mx.array) -> mx.array:
    """Patch tokens (B, N, D) of pixels (B, S, S, C) NHWC through the stride-patch `conv`,
    row-major as torch's flatten(2). Raises ValueError unless S == image_size (no
    position interpolation; the message is transformers')."""
    b, h, w, _ = pixels.shape
    if (h, w) != (image_size, image_size):
        raise ValueError(
            f"input image size ({h}*{w}) doesn't match the model ({image_size}*{image_size})"
        )
    x = conv(pixels.astype(conv.weight.dtype))
    return x.reshape(b, -1, x.shape[-1])


class CLIPVisionEmbeddings(nn.Module):
    """[class token, patch tokens] + learned positions: (B, S, S, C) -> (B, 1 + N, D).

    The patch embedding is a stride-`patch` convolution without bias (NHWC, MLX layout).
    """

    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.image_size = c.image_size
        self.class_embedding = mx.zeros((c.hidden_size,))
        self.patch_embedding = nn.Conv2d(
            c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(c.num_patches + 1, c.hidden_size)

    def __call__(self, pixels: mx.array) -> mx.array:
        x = patch_tokens(self.patch_embedding, self.image_size, pixels)
        b = x.shape[0]
        cls = mx.broadcast_to(self.class_embedding.astype(x.dtype), (b, 1, x.shape[-1]))
        return mx.concatenate([cls, x], axis=1) + self.position_embedding.weight


class CLIPVisionModel(nn.Module):
    """CLIP vision tower with projection (transformers `CLIPVisionModelWithProjection`).

    `__call__(pixels (B, S, S, 3) float, NHWC, S = config.image_size, normalised as
    CLIPImageProcessor does)` returns `image_embeds` (B, projection_dim): the class token
    after `post_layernorm`, through `visual_projection` (no bias).
    `encode(pixels)` returns `(last_hidden_state (B, 1 + N, D), image_embeds)`.
    Raises ValueError for an input of another size (no position interpolation).
    """

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = c = config
        self.embeddings = CLIPVisionEmbeddings(c)
        # transformers spells it `pre_layrnorm`; mlx_edit.weights.vision maps the name
        self.pre_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.encoder = CLIPEncoder.from_config(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.visual_projection = nn.Linear(c.hidden_size, c.projection_dim, bias=False)

    def encode(self, pixels: mx.array) -> tuple[mx.array, mx.array]:
        x = self.encoder(self.pre_layernorm(self.embeddings(pixels)))
        return x, self.visual_projection(self.post_layernorm(x[:, 0]))

    def __call__(self, pixels: mx.array) -> mx.array:
        return self.encode(pixels)[1]
