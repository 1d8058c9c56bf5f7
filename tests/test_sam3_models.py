"""SAM 3 backbone without torch: configs from transformers' dicts (unknown keys ignored),
output shapes of the tiny preset, the neck's sine encoding, and input errors.
Parity with transformers: tests/test_sam3_backbone.py."""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest

from mlx_edit.models.sam3_text import Sam3TextConfig, Sam3TextEncoder
from mlx_edit.models.sam3_vision import (
    Sam3VisionConfig,
    Sam3VisionModel,
    Sam3ViTConfig,
    sine_position_encoding,
)
from conftest import import_script

TINY = import_script("sam3_fixtures").sam3_config("tiny")


def test_configs_read_sam3_config_dicts():
    d = {**TINY, "model_type": "sam3", "unknown": 1}
    v = Sam3VisionConfig.from_dict({"detector_config": d})
    assert v.backbone_config.image_size == 84 and v.backbone_config.global_attn_indexes == (1,)
    assert v.fpn_hidden_size == 16 and v.scale_factors == (4.0, 2.0, 1.0, 0.5)
    t = Sam3TextConfig.from_dict(d)
    assert (t.hidden_size, t.d_model, t.max_position_embeddings, t.hidden_act) == (32, 16, 32, "gelu")
    assert Sam3VisionConfig.from_dict({}) == Sam3VisionConfig()  # facebook/sam3 defaults
    assert Sam3TextConfig.from_dict({}).hidden_size == 1024
    with pytest.raises(ValueError, match="square"):
        Sam3ViTConfig.from_dict({"image_size": [84, 98]})


def test_tiny_shapes_and_size_error():
    model = Sam3VisionModel(Sam3VisionConfig.from_dict(TINY))
    out = model(mx.zeros((2, 84, 84, 3)))
    assert out.last_hidden_state.shape == (2, 6, 6, 32)
    assert [f.shape for f in out.fpn_hidden_states] == [(2, s, s, 16) for s in (24, 12, 6, 3)]
    assert [p.shape for p in out.fpn_position_encoding] == [(1, s, s, 16) for s in (24, 12, 6, 3)]
    with pytest.raises(ValueError, match=r"\(B, 84, 84, C\)"):
        model(mx.zeros((1, 98, 98, 3)))
    hidden, features = Sam3TextEncoder(Sam3TextConfig.from_dict(TINY))(mx.zeros((3, 32), mx.int32))
    assert hidden.shape == (3, 32, 32) and features.shape == (3, 32, 16)


def test_sine_encoding_halves_are_y_then_x():
    pos = np.array(sine_position_encoding(3, 5, 8))[0]
    assert pos.shape == (3, 5, 8)
    np.testing.assert_allclose(pos[:, 0, :4], pos[:, 4, :4])  # y half constant along x
    np.testing.assert_allclose(pos[0, :, 4:], pos[2, :, 4:])  # x half constant along y
    np.testing.assert_allclose(pos[-1, 0, 0], np.sin(2 * np.pi * 3 / (3 + 1e-6)), atol=1e-6)
