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
