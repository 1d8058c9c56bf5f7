"""The spec-driven loader (mlx_edit/weights/loader.py, specs.py): a new checkpoint format
is one table entry, detection and strictness are the table's, and every `load_*` is a
call of `load(kind, ...)`. Fixtures are built with mlx-edit's own models (no torch)."""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)

import dataclasses
import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_edit.models.redux import ReduxConfig, ReduxImageEncoder
from mlx_edit.weights import flux, loader
from mlx_edit.weights.core import WeightLoadError, rename
from mlx_edit.weights.specs import SPECS
from mlx_edit.weights.vision import load_redux_embedder

CFG = ReduxConfig(redux_dim=8, txt_in_features=4)


def _redux(path, names=lambda k: k):
    """A random Redux embedder saved as one safetensors file (keys through `names`)."""
    model = ReduxImageEncoder(CFG)
    mx.eval(model.parameters())
    mx.save_safetensors(str(path), {names(k): v for k, v in tree_flatten(model.parameters())})
    return model


def _same(a, b) -> bool:
    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    return pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)


def test_a_new_format_is_one_table_entry(tmp_path):
    """A layout no loader knew ("up."/"down.") loads once its Format is added to the spec:
    detection, config inference from shapes and strict loading all come from the entry."""
    ref = _redux(tmp_path / "other.safetensors", lambda k: k.replace("redux_", ""))
    with pytest.raises(WeightLoadError, match="none of its formats matches: diffusers"):
        load_redux_embedder(tmp_path / "other.safetensors", mx.float32)
    other = loader.Format(
        loader.any_key("up.weight"),
        (rename("up.{p}", "redux_up.{p}"), rename("down.{p}", "redux_down.{p}")),
        infer=lambda t, _o: ReduxConfig(t["up.weight"].shape[1], t["up.weight"].shape[0] // 3),
        sign="up.*")
    spec = dataclasses.replace(SPECS["redux"], formats={**SPECS["redux"].formats, "other": other})
    ckpt = loader.open_checkpoint(spec, tmp_path / "other.safetensors")
    assert (ckpt.format_name, ckpt.config) == ("other", CFG)
    assert _same(loader.load(spec, tmp_path / "other.safetensors", mx.float32), ref)


def test_load_of_a_kind_equals_its_load_function(tmp_path):
    ref = _redux(tmp_path / "flux1-redux-dev.safetensors")
    ours = loader.load("redux", tmp_path / "flux1-redux-dev.safetensors", mx.float32)
    again = load_redux_embedder(tmp_path / "flux1-redux-dev.safetensors", mx.float32)
    assert _same(ours, ref) and _same(again, ref)
    # a folder: its config.json is the config (here it disagrees with the shapes: refused)
    folder = tmp_path / "image_embedder"
    folder.mkdir()
    _redux(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"redux_dim": 8, "txt_in_features": 5}))
    with pytest.raises(WeightLoadError, match=r"4 mis-shaped: redux_up.bias: checkpoint \(12,\) vs model \(15,\)"):
        loader.load("redux", folder, mx.float32)


def test_strict_and_clear_errors(tmp_path):
    _redux(tmp_path / "r.safetensors", lambda k: "extra" if k == "redux_down.bias" else k)
    with pytest.raises(WeightLoadError, match="1 missing: redux_down.bias; 1 unexpected: extra"):
        loader.load("redux", tmp_path / "r.safetensors", mx.float32)
    with pytest.raises(WeightLoadError, match="no such Redux embedder file or folder"):
        loader.load("redux", tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="Redux embedder is not quantized at load"):
        loader.load("redux", tmp_path / "r.safetensors", quantize=4)
    with pytest.raises(KeyError, match="unknown model kind 'unet'"):
        loader.load("unet", tmp_path)
    with pytest.raises(WeightLoadError, match=r"bfl \(img_in.*mlx \(an mlx-edit config.json"):
        flux.detect_format({"something.weight"})


def test_the_table_names_every_kind_once():
    assert set(SPECS) == {"transformer", "vae", "clip_text", "t5", "controlnet", "clip_vision",
                          "siglip_vision", "ip_adapter", "redux", "qwen3",
                          "flux2_transformer", "sam3_vision", "sam3_text", "sam3_heads"}
    for kind, spec in SPECS.items():
        assert spec.formats and spec.label, kind
        assert hasattr(spec.config_class, "from_dict"), kind
