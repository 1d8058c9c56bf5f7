"""LoRA adapter layers: low-rank updates on top of a base linear, float or quantized.

`LoRALinear` wraps a base `nn.Linear` or `nn.QuantizedLinear` and adds any number of
named adapters:

    y = base(x) + sum_i scale_i * ((x @ A_i) @ B_i + bias_i)

A_i (in, R), B_i (R, out), the file's alpha/rank already folded into B_i (see
`mlx_edit/weights/lora.py`), scale_i the user's strength. Adapters stay unfused by
default so they work on quantized layers and can be rescaled or removed between edits
without reloading the base; `fuse` merges them into float weights.

Our transformer fuses q, k, v (double blocks) and q, k, v, MLP-in (single blocks) into one
projection, while most LoRA files hold one (A, B) per separate projection. `combine`
turns per-projection parts into one exact adapter of the fused layer: the A's stacked
along the rank (or shared, when every part has the same A, as kohya/XLabs files do) and
the B's placed block-diagonally at their output rows; no approximation.

LoKr adapters (`KronUpdate`) are Kronecker products instead: output rows
[offset, offset + l*k) get scale * x @ kron(w1, w2).T for w1 (l, m), w2 (k, n), m*n the
layer's inputs, computed unfused as w1 @ X @ w2.T on X = x reshaped (..., m, n). The file's
factor products (w1_a @ w1_b) and alpha/rank are folded into w1/w2 when read
(`mlx_edit/weights/lora.py`).
Reference: PEFT `tuners/lora/layer.py` (Linear.forward: base + lora_B(lora_A(x)) *
scaling), PEFT `tuners/lokr/layer.py` (get_delta_weight: make_kron(w1, w2, scaling)),
diffusers `loaders/lora_pipeline.py` (set_adapters weights multiply scaling).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np


@dataclass
class Part:
    """One low-rank update of output rows [offset, offset + b.shape[0]) of a layer.

    a: (rank, in) "down" / lora_A; b: (rows, rank) "up" / lora_B with alpha/rank folded
    in; bias: optional (rows,) lora_B bias (BFL control LoRAs). numpy float32.
    """

    offset: int
    a: np.ndarray
    b: np.ndarray
    bias: np.ndarray | None = None

    @property
    def in_features(self) -> int:
        return self.a.shape[1]

    @property
    def size(self) -> int:
        return self.a.size + self.b.size + (0 if self.bias is None else self.bias.size)


@dataclass
class KronPart:
    """One LoKr update of output rows [offset, offset + l*k) of a layer: kron(w1, w2),
    w1 (l, m), w2 (k, n), alpha/rank folded into w1; numpy float32. `offset` is in rows
    once placed (`kron_update`), in hidden-size units as read from a file."""

    offset: int
    w1: np.ndarray
    w2: np.ndarray

    @property
    def rows(self) -> int:
        return self.w1.shape[0] * self.w2.shape[0]

    @property
    def in_features(self) -> int:
        return self.w1.shape[1] * self.w2.shape[1]

    @property
    def size(self) -> int:
        return self.w1.size + self.w2.size


@dataclass
class KronUpdate:
    """The LoKr update of one whole layer: Kronecker parts at their output rows (rows no
    part covers get 0). `dense()` is the (out, in) delta weight."""

    parts: list[KronPart]
    in_features: int
    out_features: int
    bias = None

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)

    def dense(self) -> np.ndarray:
        delta = np.zeros((self.out_features, self.in_features), np.float32)
        for p in self.parts:
            delta[p.offset:p.offset + p.rows] = np.kron(p.w1, p.w2)
        return delta


def kron_update(parts: Sequence[KronPart], in_features: int, out_features: int) -> KronUpdate:
    """The KronUpdate of a layer from its parts (offsets in rows). Raises ValueError for
    a part whose input width is not `in_features` and for overlapping or out-of-range rows."""
    parts = sorted(parts, key=lambda p: p.offset)
    end = 0
    for p in parts:
        if p.in_features != in_features:
            raise ValueError(f"LoKr factors {p.w1.shape} x {p.w2.shape} do not fit a layer "
                             f"with {in_features} inputs")
        if p.offset < end or p.offset + p.rows > out_features:
            raise ValueError(f"LoKr rows {p.offset}:{p.offset + p.rows} overlap or exceed "
                             f"{out_features}")
        end = p.offset + p.rows
    return KronUpdate(list(parts), in_features, out_features)


@dataclass
class LayerUpdate:
    """The update of one whole layer: x @ a (in, R), then block i of B (r_i, rows_i) maps
    columns [col_i, col_i + r_i) of that to output rows [row_i, row_i + rows_i); rows no
    block covers get 0; plus bias (out,). Keeping B as blocks (not one block-diagonal
    matrix) costs the ideal sum_i r_i * rows_i per token, not R * out."""

    a: np.ndarray
    blocks: list[np.ndarray]
    layout: list[tuple[int, int]]  # (row_i, col_i) per block, rows increasing
    out_features: int
    bias: np.ndarray | None = None

    @property
    def in_features(self) -> int:
        return self.a.shape[0]

    def dense(self) -> np.ndarray:
        """The (out, in) delta weight A @ B transposed."""
        return (self.a @ self.b).T

    @property
    def b(self) -> np.ndarray:
        """The dense (R, out) B (zeros off the blocks)."""
        dense = np.zeros((self.a.shape[1], self.out_features), np.float32)
        for (row, col), blk in zip(self.layout, self.blocks):
            dense[col:col + blk.shape[0], row:row + blk.shape[1]] = blk
        return dense

    @property
    def size(self) -> int:
        return self.a.size + sum(b.size for b in self.blocks) + \
            (0 if self.bias is None else self.bias.size)


def combine(parts: Sequence[Part], in_features: int, out_features: int) -> LayerUpdate:
    """Exact single update of a layer from per-output-slice parts (see module docstring).

    Parts sharing one A keep that A (in, r) once; otherwise the A's are stacked to
    (in, sum r) and each part's B reads its own columns. Rows no part covers get zeros.
    Raises ValueError for overlapping or out-of-range rows and for an A whose input
    width is not `in_features`.
    """
    parts = sorted(parts, key=lambda p: p.offset)
    end = 0
    for p in parts:
        if p.a.shape[1] != in_features or p.a.shape[0] != p.b.shape[1]:
            raise ValueError(
                f"LoRA shapes A {p.a.shape}, B {p.b.shape} do not fit a layer with "
                f"{in_features} inputs"
            )
        if p.offset < end or p.offset + p.b.shape[0] > out_features:
            raise ValueError(f"LoRA rows {p.offset}:{p.offset + p.b.shape[0]} overlap or "
                             f"exceed {out_features}")
        end = p.offset + p.b.shape[0]
    shared = all(p.a.shape == parts[0].a.shape and np.array_equal(p.a, parts[0].a) for p in parts)
    downs = [parts[0].a] if shared else [p.a for p in parts]
    cols = np.cumsum([0] + [a.shape[0] for a in downs])
    blocks, layout = [], []
    for i, p in enumerate(parts):
        col = 0 if shared else int(cols[i])
        last = layout[-1] if layout else None
        if shared and last and last[0] + blocks[-1].shape[1] == p.offset:
            blocks[-1] = np.concatenate([blocks[-1], p.b.T], axis=1)  # adjacent rows: one block
        else:
            blocks.append(np.ascontiguousarray(p.b.T, dtype=np.float32))
            layout.append((p.offset, col))
    bias = None
    if any(p.bias is not None for p in parts):
        bias = np.zeros(out_features, np.float32)
        for p in parts:
            if p.bias is not None:
                bias[p.offset:p.offset + p.bias.shape[0]] = p.bias
    a = np.ascontiguousarray(np.concatenate(downs, axis=0).T, dtype=np.float32)
    return LayerUpdate(a, blocks, layout, out_features, bias)


def linear_shape(base: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or QuantizedLinear."""
    out = base.weight.shape[0]
    if isinstance(base, nn.QuantizedLinear):
        return out, base.weight.shape[1] * 32 // base.bits
    return out, base.weight.shape[1]


class LoRALinear(nn.Module):
    """A base linear plus named low-rank adapters; see the module docstring.

    Adapters are stored as parameters ({"a", "b", "scale"[, "bias"]} per name), so a
    compiled step that declares `model.state` as inputs sees rescaling at once.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters = {}
        object.__setattr__(self, "_layouts", {})  # name -> block layout (not parameters)

    @property
    def weight(self) -> mx.array:
        # Callers read `layer.weight.dtype` (e.g. the model dtype from img_in).
        return self.base.weight

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the base layer."""
        return linear_shape(self.base)

    def add(self, name: str, update: LayerUpdate | KronUpdate, scale: float,
            dtype: mx.Dtype) -> None:
        """Add adapter `name` (ValueError if present or mis-shaped)."""
        out, inp = self.shape
        if name in self.adapters:
            raise ValueError(f"a LoRA named {name!r} is already applied")
        if update.in_features != inp or update.out_features != out:
            raise ValueError(f"LoRA ({update.in_features} -> {update.out_features}) does not "
                             f"fit a {inp} -> {out} layer")
        entry = {"scale": mx.array(scale, dtype=mx.float32)}
        if isinstance(update, KronUpdate):
            entry["w1"] = [mx.array(p.w1, dtype=dtype) for p in update.parts]
            entry["w2"] = [mx.array(p.w2, dtype=dtype) for p in update.parts]
            self._layouts[name] = [(p.offset, p.rows) for p in update.parts]
            self.adapters[name] = entry
            return
        entry["a"] = mx.array(update.a, dtype=dtype)
        entry["b"] = [mx.array(blk, dtype=dtype) for blk in update.blocks]
        if update.bias is not None:
            entry["bias"] = mx.array(update.bias, dtype=dtype)
        self.adapters[name] = entry
        self._layouts[name] = list(update.layout)

    def _kron(self, name: str, x: mx.array) -> mx.array:
        """x (..., in) through LoKr adapter `name`, unscaled -> (..., out): per part
        w1 @ X @ w2.T on X = x as (..., m, n), zeros on rows no part covers."""
        entry, out = self.adapters[name], self.shape[0]
        pieces, row = [], 0
        for (r0, rows), w1, w2 in zip(self._layouts[name], entry["w1"], entry["w2"]):
            if r0 > row:
                pieces.append(mx.zeros((*x.shape[:-1], r0 - row), x.dtype))
            xm = x.reshape(*x.shape[:-1], w1.shape[1], w2.shape[1])
            pieces.append(((w1 @ xm) @ w2.T).reshape(*x.shape[:-1], rows))
            row = r0 + rows
        if row < out:
            pieces.append(mx.zeros((*x.shape[:-1], out - row), x.dtype))
        return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=-1)

    def _through_b(self, name: str, xa: mx.array, y: mx.array | None = None) -> mx.array:
        """xa (..., R) = x @ A through the blocks of B -> (..., out), added to `y` when
        given. Why this shape: on the CPU backend every elementwise pass over (..., out)
        runs on one thread, so the blocks accumulate into y's row slices with addmm (one
        GEMM each) and only the final concatenation passes over the output."""
        entry, layout = self.adapters[name], self._layouts[name]
        out, blocks = self.shape[0], entry["b"]
        spans = [(row, row + blk.shape[1]) for (row, _), blk in zip(layout, blocks)]
        cols = [xa[..., col:col + blk.shape[0]] if blk.shape[0] != xa.shape[-1] else xa
                for (_, col), blk in zip(layout, blocks)]
        contiguous = spans[0][0] == 0 and spans[-1][1] == out and all(
            a[1] == b[0] for a, b in zip(spans, spans[1:]))
        if y is not None and contiguous:
            if len(blocks) == 1:
                return mx.addmm(y, cols[0], blocks[0])
            return mx.concatenate([mx.addmm(y[..., r0:r1], c, blk)
                                   for (r0, r1), c, blk in zip(spans, cols, blocks)], axis=-1)
        pieces, row = [], 0
        for (r0, r1), c, blk in zip(spans, cols, blocks):
            if r0 > row:
                pieces.append(mx.zeros((*xa.shape[:-1], r0 - row), xa.dtype))
            pieces.append(c @ blk)
            row = r1
        if row < out:
            pieces.append(mx.zeros((*xa.shape[:-1], out - row), xa.dtype))
        delta = pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=-1)
        return delta if y is None else y + delta

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        for name, entry in self.adapters.items():
            if "w1" in entry:
                y = y + self._kron(name, (x * entry["scale"]).astype(y.dtype))
                continue
            # the strength scales x @ A (..., R), not the (..., out) output: a smaller pass
            xa = ((x @ entry["a"]) * entry["scale"]).astype(y.dtype)
            y = self._through_b(name, xa, y)
            if "bias" in entry:
                y = y + (entry["scale"] * entry["bias"]).astype(y.dtype)
        return y

    def delta_weight(self) -> mx.array:
        """sum_i scale_i * (A_i @ B_i).T, (out, in) float32."""
        out, inp = self.shape
        total = mx.zeros((out, inp), dtype=mx.float32)
        for name, e in self.adapters.items():
            if "w1" in e:  # x = the identity: (in, out)
                eye = mx.eye(inp, dtype=mx.float32)
                total = total + e["scale"] * self._kron(name, eye).astype(mx.float32).T
                continue
            # A (in, R) is x @ A for x = the identity: (in, out) = (A @ B)
            total = total + e["scale"] * self._through_b(name, e["a"]).astype(mx.float32).T
        return total

    def fused(self) -> nn.Linear:
        """A plain nn.Linear equal to this layer (float base only; ValueError if quantized)."""
        if isinstance(self.base, nn.QuantizedLinear):
            raise ValueError("cannot fuse a LoRA into a quantized layer: fuse before quantizing")
        out, inp = self.shape
        dtype = self.base.weight.dtype
        has_bias = "bias" in self.base or any("bias" in e for e in self.adapters.values())
        layer = nn.Linear(inp, out, bias=has_bias)
        layer.weight = (self.base.weight.astype(mx.float32) + self.delta_weight()).astype(dtype)
        if has_bias:
            bias = self.base["bias"].astype(mx.float32) if "bias" in self.base \
                else mx.zeros((out,), mx.float32)
            for e in self.adapters.values():
                if "bias" in e:
                    bias = bias + e["scale"] * e["bias"].astype(mx.float32)
            layer.bias = bias.astype(dtype)
        return layer


def find_layer(model: nn.Module, path: str):
    """(parent, key, module) of the dotted module `path`; KeyError if absent."""
    parent, node, key = None, model, None
    for part in path.split("."):
        parent, key = node, int(part) if isinstance(node, list) else part
        if isinstance(node, list):
            if not 0 <= key < len(node):
                raise KeyError(path)
            node = node[key]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(path)
    return parent, key, node


def check_targets(model: nn.Module, updates: Mapping[str, LayerUpdate | KronUpdate]) -> list[str]:
    """Problems (one string per layer) applying `updates` to `model`; [] when all fit."""
    problems = []
    for path, update in updates.items():
        try:
            _, _, layer = find_layer(model, path)
        except KeyError:
            problems.append(f"{path} (no such layer in this model)")
            continue
        if not isinstance(layer, (nn.Linear, nn.QuantizedLinear, LoRALinear)):
            problems.append(f"{path} (a {type(layer).__name__}, not a linear layer)")
            continue
        out, inp = linear_shape(layer.base if isinstance(layer, LoRALinear) else layer)
        if update.in_features != inp or update.out_features != out:
            problems.append(f"{path} (LoRA {update.in_features} -> {update.out_features}, "
                            f"layer {inp} -> {out})")
    return problems


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(path, layer) of every LoRALinear in `model`."""
    return [(path, mod) for path, mod in model.named_modules() if isinstance(mod, LoRALinear)]


def attach(model: nn.Module, name: str, updates: Mapping[str, LayerUpdate], scale: float,
           dtype: mx.Dtype | None = None) -> None:
    """Add adapter `name` with `updates` {layer path: LayerUpdate} to `model` in place.

    Everything is checked before anything changes: a missing layer, a non-linear target,
    a shape mismatch or a name already in use raises ValueError naming the layers, and
    the model is left as it was. dtype: of the adapter weights (default: the model's,
    read from each base layer; float32 for quantized bases' scales dtype).
    """
    problems = check_targets(model, updates)
    if problems:
        raise ValueError("LoRA targets layers this model lacks or cannot take: "
                         + "; ".join(problems))
    if name in adapter_names(model):
        raise ValueError(f"a LoRA named {name!r} is already applied; unload it or pick a name")
    for path, update in updates.items():
        parent, key, layer = find_layer(model, path)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer)
            parent[key] = layer
        base = layer.base
        layer_dtype = base.scales.dtype if isinstance(base, nn.QuantizedLinear) else base.weight.dtype
        layer.add(name, update, scale, dtype or layer_dtype)


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters applied to `model`, in order of first appearance."""
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def set_scales(model: nn.Module, scales: Mapping[str, float]) -> None:
    """Set the strength of applied adapters by name (KeyError naming unknown names)."""
    unknown = sorted(set(scales) - set(adapter_names(model)))
    if unknown:
        raise KeyError(f"no LoRA named {', '.join(unknown)} is applied "
                       f"(applied: {', '.join(adapter_names(model)) or 'none'})")
    for _, layer in lora_layers(model):
        for name, value in scales.items():
            if name in layer.adapters:
                layer.adapters[name]["scale"] = mx.array(value, dtype=mx.float32)


def scale_of(model: nn.Module, name: str) -> float | None:
    """The strength of adapter `name` on `model` (None when not applied)."""
    for _, layer in lora_layers(model):
        if name in layer.adapters:
            return layer.adapters[name]["scale"].item()
    return None


def remove(model: nn.Module, names: Sequence[str] | None = None) -> None:
    """Remove adapters by name (all when None); layers left without adapters get their
    original base layer back (the very same object, so outputs are restored exactly)."""
    for path, layer in lora_layers(model):
        for name in list(layer.adapters) if names is None else names:
            layer.adapters.pop(name, None)
            layer._layouts.pop(name, None)
        if not layer.adapters:
            parent, key, _ = find_layer(model, path)
            parent[key] = layer.base


def fuse(model: nn.Module) -> None:
    """Merge every adapter into its (float) base layer, leaving plain nn.Linear layers.
    ValueError (model unchanged) if any LoRA sits on a quantized layer."""
    layers = lora_layers(model)
    quantized = [p for p, layer in layers if isinstance(layer.base, nn.QuantizedLinear)]
    if quantized:
        raise ValueError("cannot fuse LoRAs into quantized layers (" + ", ".join(quantized[:3])
                         + "): fuse into the float model, then quantize")
    for path, layer in layers:
        parent, key, _ = find_layer(model, path)
        parent[key] = layer.fused()


def parameter_count(model: nn.Module) -> int:
    """Number of LoRA parameters (A, B, biases) attached to `model`."""
    return sum(v.size for _, layer in lora_layers(model) for e in layer.adapters.values()
               for v in [e["a"], *e["b"], *([e["bias"]] if "bias" in e else [])])
