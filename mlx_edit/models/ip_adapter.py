"""IP-Adapter for FLUX (XLabs-AI/flux-ip-adapter): image projection + per-block k/v.

Reference: diffusers `models/embeddings.py` (ImageProjection, MultiIPAdapterImageProjection),
`models/transformers/transformer_flux.py` (FluxIPAdapterAttnProcessor) and
`loaders/transformer_flux.py` (_load_ip_adapter_weights); XLabs-AI/x-flux
`src/flux/modules/layers.py` (ImageProjModel, IPDoubleStreamBlockProcessor).

The CLIP `image_embeds` (768-d) of a reference image are projected to T tokens in the text
width (Linear 768 -> T x 4096, reshape, LayerNorm(4096, eps 1e-5)). Each double block i
has `to_k_ip[i]`, `to_v_ip[i]` (Linear 4096 -> 3072, bias) applied to those tokens. The
tokens do not depend on the denoising step, so the keys/values are computed once per run
(`IPAdapter.kv`) and handed to the transformer as an `IPAdapterKV`; the transformer adds
scale[i] * SDPA(image query after QK norm, before RoPE, k[i], v[i]) to the image stream.
Several images for one adapter are concatenated along the token axis (diffusers'
(batch, num_images, T, D) reshape in FluxIPAdapterAttnProcessor).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlx_edit.models.config import known_fields
from mlx_edit.models.layers import IPAdapterKV


@dataclass
class IPAdapterConfig:
    """Sizes of one IP-Adapter (defaults: XLabs flux-ip-adapter for FLUX.1 with CLIP-L).

    image_embed_dim: CLIP projection width; cross_attention_dim: the transformer's text
    width (joint_attention_dim); num_tokens: T image tokens; hidden_size: the transformer's
    attention width; num_layers: double blocks. XLabs files carry no config: the loader
    reads these from the tensor shapes (mlx_edit.weights.vision).
    """

    image_embed_dim: int = 768
    cross_attention_dim: int = 4096
    num_tokens: int = 4
    hidden_size: int = 3072
    num_layers: int = 19

    @classmethod
    def from_dict(cls, d: dict) -> IPAdapterConfig:
        return cls(**known_fields(cls, d))


class ImageProjection(nn.Module):
    """`__call__(image_embeds (B, E))` -> (B, T, cross): Linear, reshape, LayerNorm."""

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Linear(image_embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim, eps=1e-5)  # torch nn.LayerNorm default

    def __call__(self, image_embeds: mx.array) -> mx.array:
        x = self.proj(image_embeds.astype(self.proj.weight.dtype))
        return self.norm(x.reshape(x.shape[0], self.num_tokens, -1))


class IPAdapterLayer(nn.Module):
    """The key and value projections of one double block (Linear cross -> hidden, bias)."""

    def __init__(self, cross_attention_dim: int, hidden_size: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size)


def layer_scales(scale: float | Sequence[float], num_layers: int) -> list[float]:
    """Per-double-block scales: one float for all, or exactly `num_layers` floats
    (diffusers set_ip_adapter_scale). Raises ValueError for a list of another length."""
    if isinstance(scale, (int, float)):
        return [float(scale)] * num_layers
    values = [float(s) for s in scale]
    if len(values) != num_layers:
        raise ValueError(
            f"IP-Adapter scale has {len(values)} values; the transformer has {num_layers} "
            "double blocks (give one value, or one per double block)"
        )
    return values


class IPAdapter(nn.Module):
    """One IP-Adapter: `image_proj` (ImageProjection) and `layers[i]` (IPAdapterLayer)."""

    def __init__(self, config: IPAdapterConfig):
        super().__init__()
        self.config = c = config
        self.image_proj = ImageProjection(c.image_embed_dim, c.cross_attention_dim, c.num_tokens)
        self.layers = [
            IPAdapterLayer(c.cross_attention_dim, c.hidden_size) for _ in range(c.num_layers)
        ]

    def tokens(self, image_embeds: mx.array) -> mx.array:
        """CLIP image_embeds (n_images, E) -> image tokens (1, n_images * T, cross)."""
        x = self.image_proj(image_embeds)
        return x.reshape(1, -1, x.shape[-1])

    def kv(
        self,
        image_embeds: mx.array,
        scale: float | Sequence[float],
        num_heads: int,
        batch_size: int = 1,
    ) -> IPAdapterKV:
        """Keys/values for every double block, computed once per run.

        image_embeds: (n_images, E) CLIP `image_embeds` of this adapter's reference
        images; scale: one float or one per double block; num_heads: the transformer's
        attention heads; batch_size: the latents' batch (k/v are broadcast to it).
        Returns IPAdapterKV with k[i], v[i] of shape (batch_size, H, n_images * T, D).
        Raises ValueError for a scale list of the wrong length or a hidden size that
        num_heads does not divide.
        """
        c = self.config
        if c.hidden_size % num_heads:
            raise ValueError(f"IP-Adapter width {c.hidden_size} is not divisible by "
                             f"{num_heads} heads")
        scales = layer_scales(scale, c.num_layers)
        tokens = self.tokens(image_embeds)
        n = tokens.shape[1]

        def heads(x: mx.array) -> mx.array:
            x = x.reshape(1, n, num_heads, -1).transpose(0, 2, 1, 3)
            return mx.broadcast_to(x, (batch_size, *x.shape[1:]))

        ks = [heads(layer.to_k_ip(tokens)) for layer in self.layers]
        vs = [heads(layer.to_v_ip(tokens)) for layer in self.layers]
        return IPAdapterKV(k=ks, v=vs, scale=scales)
