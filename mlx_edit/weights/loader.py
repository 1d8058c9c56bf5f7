"""One loader for every model kind, driven by the spec table in `weights/specs.py`.

A `Spec` says how one model kind is stored: its config and model classes, where a path's
files and config.json are (`locate`), which tensors are not its weights, and its
checkpoint formats. A `Format` is data: how to recognise it (`detect`), its key map
(`rules`) and, for files without config.json, how to read the config off the tensor
shapes (`infer`). Loading is always the same steps:

    locate -> open tensors lazily (prefixes stripped, non-weights dropped) -> detect the
    format -> config (config.json + overrides, or inferred) -> build the model (an
    mlx-edit folder: its recorded quantized structure first) -> strict `load_into`
    (optionally quantizing at load by the package policy, `quantize.FULL_PRECISION`).

`open_checkpoint` stops before the model is built (only config.json and the safetensors
headers are read): the converter and the memory estimate use it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_edit.weights.core import (
    Rule,
    WeightLoadError,
    default_dtype,
    load_into,
    open_tensors,
    read_config,
    safetensors_files,
)
from mlx_edit.weights.quantize import (
    DEFAULT_GROUP_SIZE,
    IDENTITY_RULES,
    apply_recorded_quantization,
    is_mlx_layout,
    quantize_at_load,
)

Rules = tuple[Rule, ...]


@dataclass(frozen=True)
class Format:
    """One checkpoint format of a model kind.

    detect(keys, config.json dict or {}) -> bool: whether a checkpoint is in this format;
      a spec's formats are tried in table order, the first match wins.
    rules: the key map from the checkpoint's names to ours, or a function of the model
      config returning it (when the table depends on the model's depth).
    infer(tensors, overrides) -> config object: the config read off the tensor shapes,
      for formats whose files carry no config.json; None: config.json + overrides.
    recorded: an mlx-edit folder (our names): the quantized structure its config.json
      records is built before the weights are read (`apply_recorded_quantization`).
    sign: what identifies it, for the error when no format matches ("x_embedder.*").
    """

    detect: Callable[[Collection[str], Mapping], bool]
    rules: Rules | Callable[[Any], Rules]
    infer: Callable[[Mapping[str, mx.array], dict], Any] | None = None
    recorded: bool = False
    sign: str = ""


def any_key(*keys: str) -> Callable[[Collection[str], Mapping], bool]:
    """A `Format.detect` that matches when one of `keys` is a tensor name."""
    return lambda names, _config: any(k in names for k in keys)


def has_config(_names, config: Mapping) -> bool:
    """A `Format.detect` for a folder with config.json."""
    return bool(config)


def always(_names, _config) -> bool:
    """A `Format.detect` for a kind's last (fallback) format."""
    return True


def mlx_format(*keys: str) -> Format:
    """The format of the folders `mlx-edit convert` writes (our names, quantization
    recorded in config.json), recognised by its config.json or, for a file without
    one, by one of `keys`."""
    def detect(names: Collection[str], config: Mapping) -> bool:
        return is_mlx_layout(config) or any(k in names for k in keys)
    return Format(detect, IDENTITY_RULES, recorded=True,
                  sign=" or ".join(("an mlx-edit config.json", *keys)))


@dataclass(frozen=True)
class Spec:
    """How one model kind is stored (see the module doc and `weights/specs.py`).

    label: what messages call it ("transformer", "CLIP text encoder").
    locate(path) -> (safetensors files, folder whose config.json describes them or None
      for a lone file, which then uses the config defaults); raises WeightLoadError.
    formats: name -> Format, tried in order (WeightLoadError listing them if none matches).
    prefixes: key prefixes stripped when the files are opened (single-file wrappers).
    select: keeps the kind's own tensors of a whole-model file (and strips their prefix).
    drop / drop_prefixes: names (after the strip) that are not weights: never loaded.
    duplicates: name -> name it is a tied copy of: dropped when that one is present.
    complete(config dict, tensors) -> dict: config keys read from the tensors when absent.
    quantize_policy: the `quantize.FULL_PRECISION` component whose policy `quantize=bits`
      applies at load; None: the kind is not quantized at load.
    config_replaces: a `config` argument replaces config.json instead of updating it.
    class_name: `_class_name` of a config that did not come from a config.json.
    unused(config, name) -> bool: tensors the model built from `config` does not use
      (layers after the last one a truncated model runs): dropped once the config is known.
    """

    label: str
    config_class: type
    model_class: type
    locate: Callable[[Path], tuple[list[Path], Path | None]]
    formats: Mapping[str, Format]
    prefixes: tuple[str, ...] = ()
    select: Callable[[dict], dict] | None = None
    drop: tuple[str, ...] = ()
    drop_prefixes: tuple[str, ...] = ()
    duplicates: Mapping[str, str] = dataclasses.field(default_factory=dict)
    complete: Callable[[dict, Mapping], dict] | None = None
    quantize_policy: str | None = None
    config_replaces: bool = False
    class_name: str = ""
    unused: Callable[[Any, str], bool] | None = None


@dataclass
class Checkpoint:
    """An opened checkpoint: lazy tensors (nothing read yet), its format and config.

    path: as given; name: "label (path)", for messages; stored: its config.json ({} when
    none); config_dict: the effective config as a config.json would hold it; config: the
    config object the model is built from.
    """

    spec: Spec
    path: Path
    name: str
    tensors: dict
    format_name: str
    format: Format
    stored: dict
    config_dict: dict
    config: Any

    @property
    def rules(self) -> Rules:
        rules = self.format.rules
        return rules if isinstance(rules, tuple) else rules(self.config)


def existing(path: str | Path, label: str) -> Path:
    """`path` as a Path; WeightLoadError naming the `label` when nothing is there."""
    path = Path(str(path)).expanduser()
    if not path.exists():
        raise WeightLoadError(f"{path}: no such {label} file or folder")
    return path


def file_or_folder(label: str, *, folder_only: bool = False
                   ) -> Callable[[Path], tuple[list[Path], Path | None]]:
    """`Spec.locate` of a kind stored as one safetensors file (config defaults) or as a
    folder with config.json; `folder_only`: config.json is required whatever the path."""
    def locate(path: Path) -> tuple[list[Path], Path | None]:
        path = existing(path, label)
        return safetensors_files(path), (path if folder_only or path.is_dir() else None)
    return locate


def jsonable(config) -> dict:
    """A config dataclass as config.json would hold it (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def spec_of(kind: str | Spec) -> Spec:
    """The Spec of `kind` (a name in `specs.SPECS`, or a Spec); KeyError naming the kinds."""
    if isinstance(kind, Spec):
        return kind
    from mlx_edit.weights.specs import SPECS  # specs imports the kind modules, which import us

    if kind not in SPECS:
        raise KeyError(f"unknown model kind {kind!r}; known: {', '.join(SPECS)}")
    return SPECS[kind]


def detect(kind: str | Spec, keys: Collection[str], config: Mapping | None = None) -> str:
    """The name of the first format of `kind` that matches; WeightLoadError if none does."""
    spec = spec_of(kind)
    for name, fmt in spec.formats.items():
        if fmt.detect(keys, config or {}):
            return name
    known = ", ".join(f"{n} ({f.sign})" if f.sign else n for n, f in spec.formats.items())
    raise WeightLoadError(f"not a {spec.label} checkpoint: none of its formats matches: {known}")


def _tensors(spec: Spec, files: list[Path]) -> dict:
    tensors = open_tensors(files, strip_prefixes=spec.prefixes)
    if spec.select is not None:
        tensors = spec.select(tensors)
    return {k: v for k, v in tensors.items()
            if k not in spec.drop and not k.startswith(spec.drop_prefixes)
            and not (k in spec.duplicates and spec.duplicates[k] in tensors)}


def _config(spec: Spec, fmt: Format, tensors: dict, stored: dict, folder: Path | None,
            overrides, name: str) -> tuple[dict, Any]:
    """(config dict, config object) of a checkpoint (see `open_checkpoint`)."""
    if isinstance(overrides, spec.config_class):
        return {"_class_name": spec.class_name, **jsonable(overrides)}, overrides
    given = dict(overrides or {})
    from_file = False
    if fmt.infer is not None:
        d = jsonable(fmt.infer(tensors, given))
    elif spec.config_replaces and overrides is not None:
        d = {}
    else:  # a folder's config.json is required; a lone file uses the defaults
        d = stored or (read_config(folder) if folder is not None else {})
        from_file = folder is not None
    d = {**d, **given}
    if spec.complete is not None:
        d = spec.complete(d, tensors)
    try:
        config = spec.config_class.from_dict(d)
    except (TypeError, ValueError) as e:
        raise WeightLoadError(f"{name}: unsupported {spec.label} config ({e})") from e
    return (d if from_file else {"_class_name": spec.class_name, **jsonable(config)}), config


def open_checkpoint(kind: str | Spec, path: str | Path, config=None) -> Checkpoint:
    """Open the checkpoint of `kind` at `path` without loading it: only config.json and
    the safetensors headers are read.

    config: overrides of config.json (a dict), or a config object used as is; for
    formats without config.json it complements the inferred config.
    Raises WeightLoadError: nothing at `path`, unreadable files, no known format, an
    unsupported config; ValueError from a format's config inference.
    """
    spec = spec_of(kind)
    files, folder = spec.locate(path)
    name = f"{spec.label} ({path})"
    stored = {}
    if folder is not None and (folder / "config.json").is_file():
        stored = read_config(folder)
    tensors = _tensors(spec, files)
    try:
        fmt_name = detect(spec, tensors, stored)
    except WeightLoadError as e:
        raise WeightLoadError(f"{path}: {e}") from None
    fmt = spec.formats[fmt_name]
    config_dict, cfg = _config(spec, fmt, tensors, stored, folder, config, name)
    if spec.unused is not None:
        tensors = {k: v for k, v in tensors.items() if not spec.unused(cfg, k)}
    return Checkpoint(spec, Path(str(path)), name, tensors, fmt_name, fmt, stored, config_dict, cfg)


def load_checkpoint(ckpt: Checkpoint, dtype: mx.Dtype | None = None, *,
                    quantize: int | None = None,
                    group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """Build the model of an opened checkpoint and load its weights strictly (see
    `core.load_into`); the model is returned in eval mode.

    dtype: None -> `default_dtype()`. quantize: bits to quantize at load by the kind's
    policy, layer by layer (full precision never resident beyond one layer); an
    mlx-edit folder already quantized is kept as stored (warning if its bits differ).
    Raises WeightLoadError (missing, unexpected or mis-shaped tensors, a quantization
    record that disagrees with the tensors), ValueError (bits, or a kind not quantized
    at load).
    """
    spec = ckpt.spec
    if quantize and spec.quantize_policy is None:
        raise ValueError(f"the {spec.label} is not quantized at load (quantize={quantize})")
    model = spec.model_class(ckpt.config)
    if ckpt.format.recorded:  # build the quantized structure before reading weights
        apply_recorded_quantization(model, ckpt.stored, ckpt.tensors, name=ckpt.name)
    at_load = None
    if quantize:
        def at_load(m):
            return quantize_at_load(m, spec.quantize_policy, quantize, group_size)
    load_into(model, ckpt.tensors, ckpt.rules, default_dtype() if dtype is None else dtype,
              name=ckpt.name, quantize=at_load)
    model.eval()
    return model


def load(kind: str | Spec, path: str | Path, dtype: mx.Dtype | None = None, *, config=None,
         quantize: int | None = None, group_size: int = DEFAULT_GROUP_SIZE,
         check: Callable[[Checkpoint], None] | None = None) -> nn.Module:
    """Load the model of `kind` ("transformer", "vae", "t5", ... : `specs.SPECS`) from
    `path`, strictly: `open_checkpoint` then `load_checkpoint` (arguments and errors
    there). check: called with the opened checkpoint before any weight is read (e.g. the
    transformer variant a pipeline needs)."""
    ckpt = open_checkpoint(kind, path, config)
    if check is not None:
        check(ckpt)
    return load_checkpoint(ckpt, dtype, quantize=quantize, group_size=group_size)
