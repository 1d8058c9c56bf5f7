"""FLUX.1 Redux image embedder: SigLIP patch features -> tokens in the T5 text space.

Reference: diffusers `pipelines/flux/modeling_flux.py` (ReduxImageEncoder) and BFL
`src/flux/modules/image_embedders.py` (ReduxImageEncoder): redux_down(silu(redux_up(x))),
1152 -> 3 x 4096 -> 4096. Its 729 tokens per image are appended to the T5 prompt tokens
(mlx_edit.image_prompts.prepare_redux); the SigLIP tower is mlx_edit.models.siglip.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn


@dataclass
class ReduxConfig:
    """diffusers `ReduxImageEncoder` config (defaults: FLUX.1-Redux-dev)."""

    redux_dim: int = 1152
    txt_in_features: int = 4096

    @classmethod
    def from_dict(cls, d: dict) -> ReduxConfig:
        """Build from `image_embedder/config.json`; unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})


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
