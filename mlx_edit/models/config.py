"""Config helpers shared by the model dataclasses (ARCHITECTURE.md, rule 1)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


def known_fields(cls, d: dict, *, drop_none: bool = True) -> dict:
    """The items of a `config.json` dict that are fields of dataclass `cls`.

    Unknown keys are ignored (checkpoints carry many); with `drop_none`, keys whose value
    is null are left out so the dataclass default applies.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names and not (drop_none and v is None)}


def sub_config(d: dict, key: str) -> dict:
    """The nested `key` dict of a composite config (transformers' CLIPConfig / SiglipConfig
    hold `text_config` and `vision_config`), or `d` itself for a tower's own config."""
    return d[key] if isinstance(d.get(key), dict) else d


def check_rope_axes(axes: Sequence[int], head_dim: int) -> tuple[int, ...]:
    """RoPE axes as a tuple; ValueError unless they sum to the attention head dim."""
    axes = tuple(axes)
    if sum(axes) != head_dim:
        raise ValueError(f"axes_dims_rope {axes} must sum to attention_head_dim {head_dim}")
    return axes


class TransformerWidths:
    """`hidden_size` and `mlp_hidden` of a FLUX transformer config dataclass (fields
    num_attention_heads, attention_head_dim, mlp_ratio)."""

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


def transformer_config(cls, d: dict, family: str):
    """A FLUX transformer config `cls` from a config.json dict: unknown keys ignored, a null
    out_channels = in_channels, RoPE axes checked; ValueError for a patch size other than
    1 (naming `family`) or RoPE axes not summing to the head dim."""
    cfg = cls(**known_fields(cls, d, drop_none=False))
    cfg.axes_dims_rope = check_rope_axes(cfg.axes_dims_rope, cfg.attention_head_dim)
    if cfg.out_channels is None:
        cfg.out_channels = cfg.in_channels
    if cfg.patch_size != 1:
        raise ValueError(f"patch_size {cfg.patch_size} is not supported ({family} uses 1)")
    return cfg
