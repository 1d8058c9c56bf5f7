"""Strict, streaming weight loading driven by key-map tables.

A key map is a tuple of `Rule`s (data, not code paths). Each rule names one target key
of our compute layout and the source key(s) it is made from, with `{placeholders}` that
match one dotted segment (`{rest}` matches any remainder), plus an op:

- ``copy``: the one source tensor as is;
- ``concat``: the sources concatenated on axis 0 (fused QKV, fused single-block input);
- ``split:A:B``: rows [A, B) of the one source tensor (fused source, split target);
- ``conv``: a PyTorch conv weight OIHW transposed to MLX's OHWI;
- ``conv1x1``: a 1x1 conv weight (O, I, 1, 1) squeezed to a Linear (O, I);
- ``swap``: the two halves on axis 0 swapped (BFL's final layer is [shift; scale]);
- ``drop_cls``: the first row of axis 1 dropped (a ViT position table's class token).

Loading reads tensors lazily (`mx.load` of safetensors is lazy), casts each to the
requested dtype and evaluates it before reading the next, so peak memory is the model
plus about one tensor, never two full copies.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten


class WeightLoadError(ValueError):
    """A checkpoint does not match the model: missing, unexpected or mis-shaped tensors,
    a checkpoint of the wrong kind, or unreadable files."""


@dataclass(frozen=True)
class Rule:
    """One row of a key map: `target` is made from `sources` by `op` (see module doc)."""

    target: str
    sources: tuple[str, ...]
    op: str = "copy"


def rename(source: str, target: str) -> Rule:
    """A copy rule, written source-first as key tables usually read."""
    return Rule(target, (source,), "copy")


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _compile(pattern: str) -> re.Pattern:
    parts, pos, seen = [], 0, set()
    for m in _PLACEHOLDER.finditer(pattern):
        parts.append(re.escape(pattern[pos : m.start()]))
        name = m.group(1)
        if name in seen:
            parts.append(f"(?P={name})")
        else:
            parts.append(f"(?P<{name}>.+)" if name == "rest" else f"(?P<{name}>[^.]+)")
            seen.add(name)
        pos = m.end()
    parts.append(re.escape(pattern[pos:]))
    return re.compile("".join(parts) + r"\Z")


@dataclass(frozen=True)
class PlanItem:
    target: str
    sources: tuple[str, ...]
    op: str


def plan_mapping(
    source_keys: Iterable[str], rules: Iterable[Rule]
) -> tuple[list[PlanItem], list[str]]:
    """Match checkpoint keys to targets. Returns (plan, unclaimed source keys).

    Rules are tried in order; a source key is claimed by the first rule that can be
    completed (all of its sources present).
    """
    remaining = set(source_keys)
    plan: list[PlanItem] = []
    for rule in rules:
        regex = _compile(rule.sources[0])
        for key in sorted(remaining):
            if key not in remaining:
                continue
            m = regex.match(key)
            if not m:
                continue
            binds = m.groupdict()
            sources = tuple(s.format(**binds) for s in rule.sources)
            if not all(s in remaining for s in sources):
                continue
            remaining.difference_update(sources)
            plan.append(PlanItem(rule.target.format(**binds), sources, rule.op))
    return plan, sorted(remaining)


def apply_op(op: str, tensors: list[mx.array]) -> mx.array:
    if op == "copy":
        return tensors[0]
    if op == "concat":
        return mx.concatenate(tensors, axis=0)
    if op.startswith("split:"):
        _, a, b = op.split(":")
        return tensors[0][int(a) : int(b)]
    if op == "conv":
        return tensors[0].transpose(0, 2, 3, 1)
    if op == "conv1x1":
        t = tensors[0]
        return t.reshape(t.shape[0], -1)
    if op == "swap":
        a, b = mx.split(tensors[0], 2, axis=0)
        return mx.concatenate([b, a], axis=0)
    if op == "drop_cls":
        return tensors[0][:, 1:]
    raise ValueError(f"unknown key-map op {op!r}")


def op_output_shape(op: str, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    if op == "concat":
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    if op.startswith("split:"):
        _, a, b = op.split(":")
        return (int(b) - int(a), *shapes[0][1:])
    if op == "conv":
        o, i, h, w = shapes[0]
        return (o, h, w, i)
    if op == "conv1x1":
        return (shapes[0][0], math.prod(shapes[0][1:]))
    if op == "drop_cls":
        return (shapes[0][0], shapes[0][1] - 1, *shapes[0][2:])
    return tuple(shapes[0])


def format_keys(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def safetensors_files(folder: str | Path) -> list[Path]:
    """The safetensors files of one component folder (sharded via `*.index.json` or not).

    Raises WeightLoadError when the folder has none or an index names a missing shard.
    """
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        with open(indexes[0]) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise WeightLoadError(f"{folder}: index names missing shards: {format_keys(missing)}")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"{folder}: no .safetensors files found")
    return files


def open_tensors(files: Iterable[str | Path], strip_prefixes: tuple[str, ...] = ()) -> dict:
    """Lazily open safetensors files into one {key: mx.array} dict (nothing is read yet).

    Keys starting with one of `strip_prefixes` lose it (e.g. ``model.diffusion_model.``).
    Raises WeightLoadError for an unreadable, truncated or corrupt file.
    """
    tensors: dict[str, mx.array] = {}
    for path in files:
        try:
            loaded = mx.load(str(path))
        except Exception as e:  # mlx raises RuntimeError/ValueError on bad headers
            raise WeightLoadError(f"{path}: not a readable safetensors file ({e})") from e
        for key, value in loaded.items():
            for prefix in strip_prefixes:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    break
            tensors[key] = value
    return tensors


def checked_plan(params: Mapping[str, mx.array], tensors: Mapping, rules: Iterable[Rule],
                 name: str) -> list[PlanItem]:
    """The key-map plan from checkpoint `tensors` to model `params`, checked strictly.

    Every parameter must be produced exactly once with its exact shape and every
    checkpoint tensor must be used; otherwise WeightLoadError lists the missing,
    unexpected and mis-shaped keys (first few, and counts).
    """
    plan, unexpected = plan_mapping(tensors.keys(), rules)
    produced = {item.target for item in plan}
    missing = sorted(set(params) - produced)
    unexpected = unexpected + sorted(produced - set(params))
    misshaped = []
    for item in plan:
        if item.target not in params:
            continue
        shape = op_output_shape(item.op, [tuple(tensors[s].shape) for s in item.sources])
        if shape != tuple(params[item.target].shape):
            misshaped.append(
                f"{item.target}: checkpoint {shape} vs model {tuple(params[item.target].shape)}"
            )
    if missing or unexpected or misshaped:
        lines = [f"{name}: the checkpoint does not match the model"]
        for label, keys, n in (("missing", missing, 5), ("unexpected", unexpected, 5),
                               ("mis-shaped", misshaped, 3)):
            if keys:
                lines.append(f"{len(keys)} {label}: {format_keys(keys, n)}")
        raise WeightLoadError("; ".join(lines))
    return plan


def load_into(
    model: nn.Module,
    tensors: Mapping[str, mx.array],
    rules: Iterable[Rule],
    dtype: mx.Dtype | None,
    *,
    name: str = "model",
    quantize: Callable[[nn.Module], object] | None = None,
) -> nn.Module:
    """Load `tensors` (a lazy key->array mapping) into `model` through `rules`, strictly.

    See `checked_plan` for the strictness (WeightLoadError). Floating tensors are cast to
    `dtype` (None keeps the checkpoint's); integer tensors (quantized weights) are kept.
    Tensors are evaluated one at a time and a dict `tensors` is consumed (each entry is
    removed once used, so an evaluated source is freed with its target): peak memory is
    the model plus about one tensor.
    quantize: quantizes the model in place (e.g. `lambda m: quantize_transformer(m, 4)`);
    it runs while the weights are still lazy, then each layer is evaluated in turn, so
    peak memory is the quantized model plus about one full-precision layer. The result
    is identical to loading in full precision and quantizing afterwards.
    Every floating-point tensor is checked finite as it is evaluated (a damaged
    checkpoint fails at load, not as NaN images), and a model parameter that is floating
    point must come from a floating-point tensor: WeightLoadError naming the tensor.
    """
    params = dict(tree_flatten(model.parameters()))
    plan = checked_plan(params, tensors, rules, name)
    take = tensors.pop if isinstance(tensors, dict) else tensors.__getitem__
    loaded = []
    for item in plan:
        value = apply_op(item.op, [take(s) for s in item.sources])
        floating = mx.issubdtype(value.dtype, mx.floating)
        if not floating and mx.issubdtype(params[item.target].dtype, mx.floating):
            raise WeightLoadError(f"{name}: tensor {item.sources[0]} is "
                                  f"{str(value.dtype).split('.')[-1]}, the "
                                  "model expects floating point (a damaged or foreign "
                                  "checkpoint)")
        if dtype is not None and floating:
            value = value.astype(dtype)
        if quantize is None:
            evaluate_finite(f"{name}: tensor {item.sources[0]}", [value])
        loaded.append((item.target, value))
    model.load_weights(loaded, strict=False)
    del loaded
    if quantize is not None:
        quantize(model)
        for path, layer in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
            evaluate_finite(f"{name}: layer {path}", [v for _, v in tree_flatten(
                layer.parameters())])
        mx.eval(model.parameters())  # arrays held by non-leaf modules, if any
    return model


def all_finite(value: mx.array) -> bool:
    """Whether an evaluated floating-point array holds no NaN or inf: one pass over its
    memory on the CPU, without a copy (MLX's CPU reductions are 4x slower; RESULTS.md,
    "Weight checks at load"). float32: a BLAS dot product with itself (a NaN or inf
    anywhere, or a magnitude beyond ~1e19, makes it non-finite); float16 / bfloat16:
    their exponent bits (all ones: inf or NaN)."""
    if value.dtype == mx.float32:
        x = np.asarray(value).ravel()
        return bool(np.isfinite(np.dot(x, x)))
    if value.dtype in (mx.float16, mx.bfloat16):
        bits = np.asarray(value.view(mx.uint16))
        ones = 0x7C00 if value.dtype == mx.float16 else 0x7F80
        return not bool(((bits & ones) == ones).any())
    return bool(mx.isfinite(value).all().item())  # float64 (CPU only)


def evaluate_finite(what: str, arrays: list[mx.array]) -> None:
    """Evaluate `arrays` and check that their floating-point values are finite (a pass
    over data in memory, `all_finite`). Raises WeightLoadError naming `what` (NaN or
    inf: a damaged checkpoint, or an overflow of the cast)."""
    mx.eval(arrays)
    if not all(all_finite(a) for a in arrays if mx.issubdtype(a.dtype, mx.floating)):
        raise WeightLoadError(f"{what} has NaN or inf values: the checkpoint is damaged "
                              "(or overflows the dtype); re-download or re-convert it")


def read_config(folder: str | Path, filename: str = "config.json") -> dict:
    """Read a component's JSON config; WeightLoadError if it is missing or invalid."""
    path = Path(folder) / filename
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise WeightLoadError(f"{path} not found: is {Path(folder)} a model component folder?") from e
    except json.JSONDecodeError as e:
        raise WeightLoadError(f"{path}: invalid JSON ({e})") from e


def default_dtype() -> mx.Dtype:
    """bfloat16 on Metal/CUDA, float32 on the CPU backend (its bf16 matmul is slow)."""
    return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32


@contextlib.contextmanager
def reading(what: str, path: Path):
    """Turn any failure while reading `what` at `path` (bad JSON, bad bytes, wrong types)
    into a one-line WeightLoadError naming it, raised at load time rather than mid-edit."""
    try:
        yield
    except WeightLoadError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError,
            NotImplementedError) as e:
        detail = " ".join(str(e).split())[:200]
        raise WeightLoadError(f"{path}: damaged or unreadable {what} ({type(e).__name__}: "
                              f"{detail}); re-download or re-convert the model") from e


def check_headers(path: str | Path) -> None:
    """Read the header of every safetensors file of a component (folder or file) and
    check it against the file size, without reading any tensor, so a truncated or
    damaged file fails when the model is opened, not halfway through an edit.
    Raises WeightLoadError naming the file."""
    for file in safetensors_files(path):
        with reading("safetensors header", file), open(file, "rb") as f:
            size = file.stat().st_size
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or not 2 <= n <= size - 8:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
            if 8 + n + max(ends, default=0) > size:
                raise ValueError(f"truncated: the tensors need {8 + n + max(ends)} bytes, "
                                 f"the file has {size}")
