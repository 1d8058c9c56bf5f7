"""Convert a FLUX.1 or FLUX.2 [klein] checkpoint into an mlx-edit folder, quantized or
not, streaming (the family from the source's model_index.json: its components,
`specs.FAMILY_COMPONENT_KINDS`, and tokenizers).
A FLUX ControlNet source (diffusers folder, repo id, x-flux file) is detected and converted
by `weights.controlnet.convert_controlnet` instead (`convert_controlnet_source`), a SAM 2.1
folder by `weights.sam.convert_sam` and a SAM 3 folder by `weights.sam3_convert.convert_sam3`
(`_convert_sam`).

Sources: a diffusers pipeline folder (or a Hugging Face repo id, downloaded through
`mlx_edit.weights.sources.resolve`), a BFL single file (`flux1-fill-dev.safetensors`,
plus `ae.safetensors` / a diffusers folder for the VAE and text encoders), or an mlx-edit
folder (re-quantized: quantized layers are dequantized, then quantized again).

Streaming: one component at a time, one tensor at a time. The model is only *built
lazily* (MLX allocates nothing until evaluated) to know the target names and shapes;
each target tensor is made from its lazily read sources by the loader's key map,
cast, quantized when the policy says so, evaluated and handed to a `ShardWriter`; its
sources are dropped at once. Peak memory: one shard plus the largest tensor (x2 while
it is cast or quantized). Everything is written into a hidden folder next to DEST that
is renamed to DEST at the very end (save.publish).

Key maps and config handling are the loaders' (the spec table, weights/specs.py), so
a converted folder holds exactly what a loader would build.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_edit import __version__, variants
from mlx_edit.weights import controlnet as controlnet_w
from mlx_edit.weights import lora as lora_w
from mlx_edit.weights import sam as sam_w
from mlx_edit.weights import sam3_convert
from mlx_edit.weights import save
from mlx_edit.weights.core import Rule, WeightLoadError, apply_op, checked_plan, read_config
from mlx_edit.weights.text import read_text_tools
from mlx_edit.weights.loader import open_checkpoint
from mlx_edit.weights.quantize import (
    DEFAULT_GROUP_SIZE,
    GROUP_SIZES,
    MLX_LAYOUT_KEY,
    component_bits,
    dequantized_view,
    is_mlx_layout,
    quantize_component,
)
from mlx_edit.weights.specs import COMPONENT_KINDS, FAMILY_COMPONENT_KINDS
from mlx_edit.weights.sources import is_repo_id, read_model_index, resolve

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
AUX_FOLDERS = ("tokenizer", "tokenizer_2", "scheduler")
TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
# Components `--quantize N` applies to, per family (the others need --component-bits).
QUANTIZED = {"flux1": ("transformer", "text_encoder_2"), "flux2": ("transformer", "text_encoder")}

class ConversionError(ValueError):
    """A conversion cannot start: wrong arguments, missing sources, DEST in the way."""


@dataclass
class ComponentSource:
    """One component to convert: a lazily built model (our layout, full precision), the
    lazily opened source tensors, the key map from them to the model, the config to write."""

    name: str
    origin: Path
    model: nn.Module
    tensors: dict
    rules: tuple[Rule, ...]
    config: dict


def _clean_config(cfg: Mapping) -> dict:
    """The source config without our own keys (they are rewritten)."""
    return {k: v for k, v in cfg.items() if k not in (MLX_LAYOUT_KEY, "quantization")}


def open_component(name: str, path: str | Path, overrides: Mapping | None = None,
                   kind: str | None = None):
    """A ComponentSource for `name` (one of COMPONENTS) from its folder or file, opened
    by the loaders' spec of `kind` (None: FLUX.1's, `specs.COMPONENT_KINDS`); an mlx-edit
    source reads as full precision (`dequantized_view`).

    Raises WeightLoadError for unreadable or foreign checkpoints, ConversionError for a
    BFL transformer whose RoPE axes cannot be inferred (pass `overrides`).
    """
    path = Path(path)
    if not path.exists():
        raise WeightLoadError(f"{path}: no such {name} file or folder")
    kind = kind or COMPONENT_KINDS.get(name)
    if kind is None:
        raise KeyError(f"unknown component {name!r}")
    try:
        ckpt = open_checkpoint(kind, path, overrides)
    except WeightLoadError:
        raise
    except ValueError as e:  # a BFL file whose RoPE axes cannot be read off its shapes
        raise ConversionError(
            f"{path}: {e} (give a transformer config.json with --transformer-config)"
        ) from e
    model = ckpt.spec.model_class(ckpt.config)
    tensors = ckpt.tensors
    if ckpt.format.recorded:
        tensors = dequantized_view(model, ckpt.stored, tensors, f"{name} ({path})")
    return ComponentSource(name, path, model, tensors, ckpt.rules,
                           _clean_config(ckpt.config_dict))


def iter_converted(src: ComponentSource, dtype: mx.Dtype, bits: int | None,
                   group_size: int = DEFAULT_GROUP_SIZE, adjust: Callable | None = None):
    """Yield (key, evaluated array) of the converted component, one target at a time, and
    return the quantization record (None when not quantized) as the generator's value.

    `src.model` is quantized in place (lazily) by the policy; its parameters are the
    keys and shapes produced. Source tensors are dropped once used. `adjust(key, value)`
    may change each full-precision tensor before the cast (LoRA baking).
    """
    plan = checked_plan(dict(tree_flatten(src.model.parameters())), src.tensors, src.rules,
                        f"{src.name} ({src.origin})")
    record = quantize_component(src.model, src.name, bits, group_size) if bits else None
    params = dict(tree_flatten(src.model.parameters()))
    uses = Counter(s for item in plan for s in item.sources)
    for item in plan:
        value = apply_op(item.op, [src.tensors[s] for s in item.sources])
        for s in item.sources:
            uses[s] -= 1
            if not uses[s]:
                del src.tensors[s]  # its buffer is freed once `value` is evaluated
        if adjust is not None:
            value = adjust(item.target, value)
        if mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(dtype)
        layer, _, leaf = item.target.rpartition(".")
        if leaf == "weight" and f"{layer}.scales" in params:
            w, s, b = mx.quantize(value, group_size, bits)
            out = {item.target: w, f"{layer}.scales": s, f"{layer}.biases": b}
        else:
            out = {item.target: value}
        del value
        for key, array in out.items():
            if tuple(array.shape) != tuple(params[key].shape):  # a policy/model bug, not data
                raise AssertionError(f"{key}: produced {array.shape}, model has {params[key].shape}")
            mx.eval(array)
            yield key, array
    return record


def convert_component(src: ComponentSource, out_dir: Path, dtype: mx.Dtype, bits: int | None,
                      group_size: int = DEFAULT_GROUP_SIZE,
                      max_shard_bytes: int = save.MAX_SHARD_BYTES,
                      adjust: Callable | None = None) -> dict:
    """Write `src` converted into `out_dir` (shards, index, config.json).

    Returns {"bits", "files", "bytes", "tensors", "largest_shard", "largest_tensor",
    "skipped", "seconds"}. Raises WeightLoadError (strict key check, unreadable tensors).
    """
    t0 = time.perf_counter()
    writer = save.ShardWriter(out_dir, max_shard_bytes)
    gen = iter_converted(src, dtype, bits, group_size, adjust)
    while True:
        try:
            key, array = next(gen)
        except StopIteration as stop:
            record = stop.value
            break
        except RuntimeError as e:  # mlx read errors surface at evaluation
            raise WeightLoadError(f"{src.name} ({src.origin}): {e}") from e
        writer.add(key, array)
    info = writer.close()
    config = {**src.config, MLX_LAYOUT_KEY: __version__}
    for key in ("torch_dtype", "dtype"):  # transformers' record of the saved dtype
        if key in config:
            config[key] = str(dtype).split(".")[-1]
    if record is not None:
        config["quantization"] = record
    save.write_json(out_dir / "config.json", config)
    return {**info, "bits": bits, "skipped": record["skipped"] if record else None,
            "seconds": time.perf_counter() - t0}


def _text_root(path: str | Path) -> Path:
    root = resolve(path, components=(*TEXT_PARTS, "scheduler"))
    if not (root / "text_encoder").is_dir() and root.name in TEXT_PARTS:
        root = root.parent  # a text_encoder/ folder given instead of its root
    return root


def locate_sources(source: str | Path, vae: str | Path | None = None,
                   text_encoders: str | Path | None = None,
                   text_parts: tuple[str, ...] = TEXT_PARTS) -> dict[str, Path | None]:
    """Where each part comes from: {component or tokenizer/scheduler folder: path, and
    "root": the pipeline folder (None for a single file)}. "scheduler" may be None.

    Raises ConversionError when a BFL file comes without findable VAE / text encoders,
    WeightLoadError for a source that does not exist or fails to download.
    """
    single = Path(str(source)).expanduser()
    if single.is_file():
        near = single.parent
        if vae is None:
            vae = next((p for p in (near / "vae", near / "ae.safetensors") if p.exists()), None)
        if text_encoders is None and (near / "text_encoder").is_dir():
            text_encoders = near
        if vae is None or text_encoders is None:
            raise ConversionError(
                f"{single} is a single-file transformer: pass --vae (ae.safetensors or a vae/ "
                "folder) and --text-encoders (a diffusers folder or repo id with text_encoder/, "
                "text_encoder_2/, tokenizer/, tokenizer_2/)"
            )
        root, parts = None, {"transformer": single}
    else:
        need = ["transformer"] + ([] if vae else ["vae"]) + ([] if text_encoders else
                                                             [*text_parts, "scheduler"])
        root = resolve(source, components=need)
        if not root.is_dir():
            raise WeightLoadError(f"{root}: not a model folder")
        parts = {"transformer": root / "transformer"}
    parts["vae"] = (resolve(vae, components=("vae",)) if vae and is_repo_id(str(vae))
                    else Path(str(vae)).expanduser() if vae else root / "vae")
    text_root = _text_root(text_encoders) if text_encoders else root
    for name in text_parts:
        parts[name] = text_root / name
    parts["scheduler"] = next((r / "scheduler" for r in (text_root, root)
                               if r is not None and (r / "scheduler").is_dir()), None)
    parts["root"] = root
    for name in ("transformer", *text_parts):
        if not parts[name].exists():
            raise WeightLoadError(f"{parts[name]}: missing (needed for the {name})")
    return parts


def _check_not_inside(dest: Path, parts: Mapping[str, Path | None]) -> None:
    d = dest.expanduser().resolve()
    for p in parts.values():
        if p is None:
            continue
        p = p.resolve()
        if p == d or d in p.parents:
            raise ConversionError(f"DEST {dest} holds the source {p}: choose another DEST")


def _checked_dest(dest: str | Path, overwrite: bool) -> Path:
    """`dest` expanded; ConversionError when something is in the way (`save.check_dest`)."""
    dest = Path(dest).expanduser()
    try:
        save.check_dest(dest, overwrite)
    except FileExistsError as e:
        raise ConversionError(str(e)) from e
    return dest


def convert_controlnet_source(
    source: str | Path,
    dest: str | Path,
    *,
    dtype: str = "bfloat16",
    quantize: int | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    config: Mapping | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = save.MAX_SHARD_BYTES,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Convert a ControlNet (`is_controlnet_source`) into the mlx-edit folder `dest`
    (`save_controlnet`'s layout), cast to `dtype`, quantized to `quantize` bits
    (`quantize_controlnet`). `config`: overrides (x-flux files with head_dim != 128 need
    "axes_dims_rope"). Returns {"format", "kind", "source", "dtype", "bits", "group_size",
    "bytes"}. Raises ConversionError (DEST in the way, missing config, a quantized source
    asked for other bits), WeightLoadError (damaged checkpoint)."""
    log = log or (lambda _msg: None)
    dest = _checked_dest(dest, overwrite)
    path = controlnet_w.resolve_controlnet(source)
    _check_not_inside(dest, {"controlnet": path})
    cfg = read_config(path) if (path / "config.json").is_file() else {}
    recorded = (cfg.get("quantization") or {}).get("bits") if is_mlx_layout(cfg) else None
    if recorded and recorded != quantize:
        raise ConversionError(f"{path} is already quantized to {recorded} bits: pass "
                              f"--quantize {recorded} or convert from the original ControlNet")
    save.remove_stale_temps(dest)
    t0 = time.perf_counter()
    try:
        controlnet_w.convert_controlnet(path, dest, DTYPES[dtype], quantize, group_size,
                                        overwrite=overwrite, config=dict(config or {}),
                                        max_shard_bytes=max_shard_bytes)
    except WeightLoadError:
        raise
    except ValueError as e:  # an x-flux file whose RoPE axes cannot be inferred
        raise ConversionError(f"{path}: {e} (give a config.json with --transformer-config)"
                              ) from e
    size = save.folder_bytes(dest)
    precision = f"{quantize}-bit (group {group_size})" if quantize else dtype
    log(f"wrote ControlNet {dest}: {precision}, {size / 1e6:.1f} MB, "
        f"{time.perf_counter() - t0:.1f} s")
    return {"format": "mlx-edit", "kind": "controlnet", "source": str(source), "dtype": dtype,
            "bits": quantize, "group_size": group_size, "bytes": size}


def convert_checkpoint(
    source: str | Path, dest: str | Path, *, dtype: str = "bfloat16",
    quantize: int | None = None, group_size: int = DEFAULT_GROUP_SIZE,
    component_bits_override: Mapping[str, int | None] | None = None,
    vae: str | Path | None = None, text_encoders: str | Path | None = None,
    transformer_config: Mapping | None = None, overwrite: bool = False,
    max_shard_bytes: int = save.MAX_SHARD_BYTES, log: Callable[[str], None] | None = None,
    loras: Sequence[tuple[str | Path, float]] = (),
) -> dict:
    """Convert `source` into the mlx-edit folder `dest`; returns the manifest written.

    dtype: "bfloat16" | "float16" | "float32" for floating tensors (quantization scales
    included). quantize: bits for the transformer and T5 (None: full precision);
    `component_bits_override` ({component: bits or None}) overrides per component.
    `transformer_config` overrides/complements the transformer config (BFL files with a
    head_dim other than 128 need its "axes_dims_rope"). The folder is written next to
    `dest` and renamed into place when complete; on any error or interruption nothing is
    left at `dest` (an existing `dest` replaced with `overwrite` stays as it was).
    loras: (source, scale) pairs baked into the transformer before it is cast/quantized
    (mlx_edit.weights.lora.baker), recorded as "baked_loras" in its config.json and the
    manifest.
    A ControlNet `source` goes to `convert_controlnet_source` (`transformer_config` is
    then its config override; VAE, text encoder and per-component options are refused).
    Raises ConversionError (bad arguments, LoRA scales not finite or out of range, `dest`
    not empty without `overwrite`, missing sources), WeightLoadError (unreadable,
    truncated or mismatching checkpoints; a tensor to write with NaN or inf values, from
    the source or a baked LoRA: nothing is published).
    """
    log = log or (lambda _msg: None)
    _check_options(dtype, group_size)
    loras = _checked_loras(loras)
    given = {"--component-bits": component_bits_override, "--vae": vae,
             "--text-encoders": text_encoders, "--lora": loras}
    if controlnet_w.is_controlnet_source(source):
        _refuse_pipeline_options(source, given)
        return convert_controlnet_source(
            source, dest, dtype=dtype, quantize=quantize, group_size=group_size,
            config=transformer_config, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
            log=log)
    for is_source, convert, what in SAM_CONVERTERS:
        if is_source(source):
            _refuse_pipeline_options(source, {**given, "--transformer-config":
                                              transformer_config}, what)
            return _convert_sam(convert, source, dest, dtype, quantize, group_size,
                                overwrite, log)
    family = _family(source, text_encoders)
    kinds = FAMILY_COMPONENT_KINDS[family]
    bits = _component_bits(quantize, component_bits_override, family)
    dest = _checked_dest(dest, overwrite)
    parts = locate_sources(source, vae, text_encoders, _text_parts(kinds))
    _check_not_inside(dest, parts)
    _check_text_tools(parts, kinds)  # damaged files: refused before any work
    manifest = _publish(source, dest, parts, bits, kinds, transformer_config,
                        _options(dtype, group_size, loras), max_shard_bytes, log)
    log(f"wrote {dest} ({save.folder_bytes(dest) / 1e6:.1f} MB)")
    return manifest


def _publish(source: str | Path, dest: Path, parts: Mapping[str, Path | None],
             bits: Mapping[str, int | None], kinds: Mapping[str, str],
             transformer_config: Mapping | None, options: Mapping, max_shard_bytes: int,
             log: Callable[[str], None]) -> dict:
    """Write the components and the manifest into a temporary folder next to `dest` and
    rename it into place when complete (removed on any error); returns the manifest."""
    tmp = _fresh_temp(dest)
    cache_limit = mx.set_cache_limit(0)  # freed buffers go back at once: RSS ~ live arrays
    try:
        components = _write_components(tmp, parts, bits, transformer_config, options,
                                       max_shard_bytes, log, kinds)
        manifest = _write_manifest(tmp, source, parts, options, components)
        save.publish(tmp, dest)
    finally:
        mx.set_cache_limit(cache_limit)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _family(source: str | Path, text_encoders: str | Path | None) -> str:
    """The model family of a source ("flux1", "flux2"): its model_index.json's, or for a
    single file the text encoders' folder's (FLUX.1 when neither names one)."""
    index = read_model_index(source) or read_model_index(text_encoders)
    return variants.family_of(index.get("_class_name"))


def _text_parts(kinds: Mapping[str, str]) -> tuple[str, ...]:
    """The family's text encoder folders and their tokenizers (text_encoder -> tokenizer,
    text_encoder_2 -> tokenizer_2)."""
    encoders = tuple(k for k in kinds if k.startswith("text_encoder"))
    return encoders + tuple(e.replace("text_encoder", "tokenizer") for e in encoders)


def _check_text_tools(parts: Mapping[str, Path | None], kinds: Mapping[str, str]) -> None:
    """Read the scheduler config and tokenizers (WeightLoadError when damaged)."""
    if kinds["text_encoder"] == "qwen3":
        from mlx_edit.editing.text_qwen3 import Qwen3Tokenizer

        read_text_tools(parts["scheduler"], None, None)
        Qwen3Tokenizer.from_folder(parts["tokenizer"])
    else:
        read_text_tools(parts["scheduler"], parts["tokenizer"], parts["tokenizer_2"])


def _component_bits(quantize: int | None, override: Mapping[str, int | None] | None,
                    family: str = "flux1") -> dict[str, int | None]:
    """`weights.quantize.component_bits` for the family's components, its ValueError as a
    ConversionError."""
    try:
        return component_bits(quantize, override, tuple(FAMILY_COMPONENT_KINDS[family]),
                              QUANTIZED[family])
    except ValueError as e:
        raise ConversionError(str(e)) from e


def _checked_loras(loras: Sequence[tuple[str | Path, float]]) -> list[tuple[str | Path, float]]:
    """The (source, scale) pairs with finite scales in range (lora.check_scale), before
    any work. Raises ConversionError."""
    try:
        return [(src, lora_w.check_scale(scale, f"LoRA {src} scale")) for src, scale in loras]
    except ValueError as e:
        raise ConversionError(str(e)) from None


def _options(dtype: str, group_size: int, loras: Sequence[tuple[str | Path, float]]) -> dict:
    """The conversion options every component's config.json and the manifest record."""
    options = {"dtype": dtype, "group_size": group_size, "mode": "affine"}
    if loras:
        options["baked_loras"] = [[str(src), float(scale)] for src, scale in loras]
    return options


def _refuse_pipeline_options(source: str | Path, given: Mapping[str, object],
                             kind: str = "a ControlNet") -> None:
    """ConversionError naming the options set in `given` ({flag: value}): they apply to
    pipeline checkpoints only, and `source` is `kind` (a ControlNet, a SAM 2.1 checkpoint)."""
    flags = [flag for flag, value in given.items() if value]
    if flags:
        raise ConversionError(f"{source} is {kind}: {', '.join(flags)} apply to "
                              "pipeline checkpoints only")


# (is this source, its converter, what it is): SAM 2.1 and SAM 3, converted on their own
SAM_CONVERTERS = ((sam_w.is_sam_source, sam_w.convert_sam, "a SAM 2.1 checkpoint"),
                  (sam3_convert.is_sam3_source, sam3_convert.convert_sam3, "a SAM 3 checkpoint"))


def _convert_sam(convert, source, dest, dtype: str, quantize: int | None, group_size: int,
                 overwrite: bool, log: Callable[[str], None]) -> dict:
    """`convert` (`sam.convert_sam`, `sam3_convert.convert_sam3`) with its refusals as
    ConversionError."""
    try:
        return convert(source, dest, DTYPES[dtype], quantize, group_size,
                       overwrite=overwrite, log=log)
    except (FileExistsError, sam_w.SamQuantizationRefused) as e:
        raise ConversionError(str(e)) from e


def _check_options(dtype: str, group_size: int) -> None:
    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if group_size not in GROUP_SIZES:
        raise ConversionError(f"group size must be one of {GROUP_SIZES}, got {group_size!r}")


def _fresh_temp(dest: Path) -> Path:
    """An empty temporary folder next to `dest` (left-overs of killed runs removed)."""
    save.remove_stale_temps(dest)
    tmp = save.temp_folder_for(dest)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _write_manifest(tmp: Path, source, parts: Mapping[str, Path | None], options: Mapping,
                    components: dict) -> dict:
    """`model_index.json` and the manifest (`save.MANIFEST_NAME`) of a converted folder."""
    manifest = {
        "format": "mlx-edit", "mlx_edit_version": __version__, "source": str(source),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **options, "components": components,
    }
    save.write_model_index(tmp, parts.get("root"))
    save.write_json(tmp / save.MANIFEST_NAME, manifest)
    return manifest


def _write_components(tmp: Path, parts: Mapping[str, Path | None], bits: Mapping[str, int | None],
                      transformer_config: Mapping | None, options: Mapping,
                      max_shard_bytes: int, log: Callable[[str], None],
                      kinds: Mapping[str, str] = COMPONENT_KINDS) -> dict:
    """Convert each component of `kinds` ({component: loader kind}, the family's) into
    `tmp/<name>` (one at a time), copy the tokenizers and the scheduler; returns the
    manifest's {component: {"bits", "bytes", "files", "source"}}."""
    dtype, group_size = options["dtype"], options["group_size"]
    components = {}
    for name, kind in kinds.items():
        overrides = transformer_config if name == "transformer" else None
        src = open_component(name, parts[name], overrides, kind)
        adjust = None
        if name == "transformer" and options.get("baked_loras"):
            adjust, src.config["baked_loras"] = lora_w.baker(src.model, options["baked_loras"])
        info = convert_component(src, tmp / name, DTYPES[dtype], bits[name], group_size,
                                 max_shard_bytes, adjust)
        del src
        components[name] = {"bits": bits[name], "bytes": info["bytes"],
                            "files": info["files"], "source": str(parts[name])}
        kept = f", {len(info['skipped'])} layers kept full" if info["skipped"] else ""
        precision = f"{bits[name]}-bit (group {group_size}){kept}" if bits[name] else dtype
        log(f"{name}: {precision}, {info['bytes'] / 1e6:.1f} MB in {len(info['files'])} "
            f"file(s), {info['seconds']:.1f} s")
    for name in _text_parts(kinds):
        if name.startswith("tokenizer"):
            save.copy_folder(parts[name], tmp / name)
    save.write_scheduler(tmp, parts["scheduler"])
    return components
