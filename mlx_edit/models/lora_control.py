"""Structural changes a LoRA can make besides low-rank adapters, and their exact undo.

BFL's control LoRAs (FLUX.1-Canny-dev-lora, FLUX.1-Depth-dev-lora) turn FLUX.1-dev into
the Canny/Depth control model: their `img_in` LoRA reads 128 input channels (64 noisy
latent + 64 control-image latent), so the base layer is widened from 64 inputs with zero
columns (the control columns come from the LoRA alone, scaled with it), and they carry
full QK-norm scales that replace the model's. diffusers does the same
(`loaders/lora_pipeline.py` FluxLoraLoaderMixin: `_maybe_expand_transformer_param_shape_
or_error_` widens with zeros and sets `config.in_channels`; `_load_norm_into_transformer`
overwrites the norms, unscaled; `unload_lora_weights(reset_to_overwritten_params=True)`
restores both).

Every change is recorded on the model under its owner's (the LoRA's) name with the very
objects it replaced, so `restore` gives back the base model exactly (same arrays, same
layers, same config). Changes are made with no adapters attached (see
`mlx_edit.weights.lora.sync`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_edit.models.lora import LoRALinear, find_layer

# Layers whose input may be widened -> the config field that records their width
# (diffusers' _MODULE_NAME_TO_ATTRIBUTE_MAP_FLUX: x_embedder -> in_channels).
WIDENABLE = {"img_in": "in_channels"}

_RECORDS = "_lora_structure"  # model attribute: {owner: [(kind, path, original)]}


def _records(model: nn.Module) -> dict[str, list]:
    try:
        return object.__getattribute__(model, _RECORDS)
    except AttributeError:
        records: dict[str, list] = {}
        object.__setattr__(model, _RECORDS, records)
        return records


def owners(model: nn.Module) -> list[str]:
    """Names of the LoRAs whose structural changes `model` holds, in the order applied."""
    return list(_records(model))


def _param(model: nn.Module, path: str):
    module_path, _, leaf = path.rpartition(".")
    module = find_layer(model, module_path)[2]
    if isinstance(module, dict) and leaf in module and isinstance(module[leaf], mx.array):
        return module, leaf
    raise KeyError(path)


def check(model: nn.Module, widths: Mapping[str, int], params: Mapping[str, np.ndarray]
          ) -> list[str]:
    """Problems (one string each) applying `widths` {layer: in_features} and replacing
    `params` {parameter path: array} on `model`; [] when all fit."""
    problems = []
    for path, width in widths.items():
        try:
            layer = find_layer(model, path)[2]
        except KeyError:
            problems.append(f"{path} (no such layer in this model)")
            continue
        base = layer.base if isinstance(layer, LoRALinear) else layer
        if path not in WIDENABLE or type(base) is not nn.Linear:
            problems.append(f"{path} (LoRA reads {width} inputs; only a float img_in can "
                            "be widened)")
    for path, value in params.items():
        try:
            module, leaf = _param(model, path)
        except KeyError:
            problems.append(f"{path} (no such parameter in this model)")
            continue
        if tuple(module[leaf].shape) != tuple(value.shape):
            problems.append(f"{path} (file {tuple(value.shape)}, model "
                            f"{tuple(module[leaf].shape)})")
    return problems


def apply(model: nn.Module, owner: str, widths: Mapping[str, int],
          params: Mapping[str, np.ndarray]) -> None:
    """Widen layers to `widths` inputs (zero columns; no-op when already that wide) and
    replace `params`, recorded under `owner`. The model must carry no adapters on those
    layers. Raises ValueError (model unchanged) as `check` finds."""
    problems = check(model, widths, params)
    if problems:
        raise ValueError("LoRA cannot change this model: " + "; ".join(problems))
    done = _records(model).setdefault(owner, [])
    for path, width in widths.items():
        parent, key, layer = find_layer(model, path)
        out, inp = layer.weight.shape
        if width <= inp:
            continue
        wide = nn.Linear(width, out, bias="bias" in layer)
        wide.weight = mx.concatenate(
            [layer.weight, mx.zeros((out, width - inp), layer.weight.dtype)], axis=1)
        if "bias" in layer:
            wide.bias = layer.bias
        parent[key] = wide
        done.append(("layer", path, layer))
        field = WIDENABLE[path]
        done.append(("config", field, model.config))
        model.config = dataclasses.replace(model.config, **{field: width})
    for path, value in params.items():
        module, leaf = _param(model, path)
        done.append(("param", path, module[leaf]))
        module[leaf] = mx.array(value).astype(module[leaf].dtype)


def restore(model: nn.Module) -> None:
    """Undo every recorded change (latest first): the original layers, parameters and
    config objects are put back. Adapters must have been removed first."""
    records = _records(model)
    for owner in reversed(list(records)):
        for kind, path, original in reversed(records.pop(owner)):
            if kind == "config":
                model.config = original
            elif kind == "layer":
                parent, key, _ = find_layer(model, path)
                parent[key] = original
            else:
                module, leaf = _param(model, path)
                module[leaf] = original
