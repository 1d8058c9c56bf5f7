"""FLUX.1 Redux: the SigLIP vision tower and the Redux image embedder.

SigLIP (google/siglip-so400m-patch14-384), reference transformers
`models/siglip/modeling_siglip.py` (SiglipVisionEmbeddings, SiglipEncoder,
SiglipVisionTransformer): its encoder layers are CLIP's (pre-LayerNorm, biased q/k/v/out,
1/sqrt(head_dim) scale, fc1-act-fc2), so they are reused from `mlx_edit.models.clip`. No
class token; `last_hidden_state` is the encoder output after `post_layernorm`. The
attention-pooling head is not built: Redux reads `last_hidden_state` (diffusers
FluxPriorReduxPipeline.encode_image).

Redux embedder, reference diffusers `pipelines/flux/modeling_flux.py` (ReduxImageEncoder)
and BFL `src/flux/modules/image_embedders.py`: redux_down(silu(redux_up(x))), 1152 ->
3 x 4096 -> 4096. Its 729 tokens per image are appended to the T5 prompt tokens
(mlx_edit.conditioning.image_prompts.prepare_redux).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlx_edit.models.clip import CLIPEncoder, patch_tokens
from mlx_edit.models.config import known_fields, sub_config


@dataclass
class SiglipVisionConfig:
    """transformers `SiglipVisionConfig` fields we use (defaults: so400m-patch14-384)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, d: dict) -> SiglipVisionConfig:
        """Build from a `config.json` dict; unknown keys are ignored. A full SiglipConfig
        (with a nested `vision_config`) is accepted too."""
        return cls(**known_fields(cls, sub_config(d, "vision_config")))

    @property
    def grid(self) -> int:
        """Patches per side: image_size // patch_size (384 // 14 = 27; the rest is cut)."""
        return self.image_size // self.patch_size


class SiglipVisionEmbeddings(nn.Module):
    """Patch tokens + learned positions: (B, S, S, C) NHWC -> (B, grid^2, D).

    A stride-`patch` convolution with bias and "valid" padding (pixels past the last
    whole patch are ignored, as in PyTorch).
    """

    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        self.image_size = c.image_size
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size,
                                         stride=c.patch_size)
        self.position_embedding = nn.Embedding(c.grid**2, c.hidden_size)

    def __call__(self, pixels: mx.array) -> mx.array:
        x = patch_tokens(self.patch_embedding, self.image_size, pixels)
        return x + self.position_embedding.weight


class SiglipVisionModel(nn.Module):
    """SigLIP vision transformer without the pooling head.

    `__call__(pixels (B, S, S, 3) float, NHWC, S = config.image_size, normalised as
    SiglipImageProcessor does: (x/255 - 0.5) / 0.5)` returns `last_hidden_state`
    (B, grid^2, hidden): 729 x 1152 for so400m-patch14-384.
    Raises ValueError for an input of another size (no position interpolation).
    """

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = c = config
        self.embeddings = SiglipVisionEmbeddings(c)
        self.encoder = CLIPEncoder.from_config(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def __call__(self, pixels: mx.array) -> mx.array:
        return self.post_layernorm(self.encoder(self.embeddings(pixels)))


# ---------------------------------------------------------------- Redux embedder


@dataclass
class ReduxConfig:
    """diffusers `ReduxImageEncoder` config (defaults: FLUX.1-Redux-dev)."""

    redux_dim: int = 1152
    txt_in_features: int = 4096

    @classmethod
    def from_dict(cls, d: dict) -> ReduxConfig:
        """Build from `image_embedder/config.json`; unknown keys are ignored."""
        return cls(**known_fields(cls, d))


class ReduxImageEncoder(nn.Module):
    """`__call__(x (B, N, redux_dim))` -> (B, N, txt_in_features), same dtype as the weights.

    The hidden width is 3 x txt_in_features (12288 for FLUX.1-Redux-dev).
    """

    def __init__(self, config: ReduxConfig):
        super().__init__()
        self.config = config
        self.redux_up = nn.Linear(config.redux_dim, 3 * config.txt_in_features)
        self.redux_down = nn.Linear(3 * config.txt_in_features, config.txt_in_features)

    def __call__(self, x: mx.array) -> mx.array:
        x = x.astype(self.redux_up.weight.dtype)
        return self.redux_down(nn.silu(self.redux_up(x)))
