"""Quantization policy: which layers of which component are quantized, and how.

Affine group quantization (`mlx.nn.quantize`, mode "affine"): each row of a Linear weight
is cut into groups of `group_size` inputs, and each group stores `bits`-bit integers with
one scale and one bias (in the model dtype). Only Linear layers are quantized, and only
where it pays and is safe:

- the transformer's attention, MLP and modulation linears and T5's attention and
  feed-forward linears (the bulk of the bytes) are quantized;
- the small, sensitive layers stay in full precision: the transformer's input and
  conditioning embedders (img_in = x_embedder, txt_in = context_embedder, time_in,
  vector_in, guidance_in) and its final layer (norm_out / proj_out); all embeddings;
- the VAE and CLIP stay in full precision unless bits are given for them explicitly;
- a FLUX ControlNet follows the transformer's policy and keeps its control input
  projection (`controlnet_x_embedder`) in full precision too;
- a Linear whose input width is not a multiple of `group_size` cannot be grouped and
  stays in full precision.

The choice is recorded (`quantization_record`) in the component's `config.json` as
{"bits", "group_size", "mode", "skipped": [layer paths left unquantized]}, and a loader
rebuilds exactly that structure before reading weights (`apply_recorded_quantization`),
so a quantized checkpoint never passes through full precision. Reference: MLX
`mlx/nn/layers/quantized.py` (quantize, QuantizedLinear), mflux's `-q` (which quantizes
every layer and records only the bit width).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_edit.weights.core import Rule, WeightLoadError, rename

BITS = (2, 3, 4, 5, 6, 8)  # what MLX's affine kernels support
GROUP_SIZES = (32, 64, 128)
MODE = "affine"
DEFAULT_GROUP_SIZE = 64

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
# Components a plain `--quantize N` / `quantize=N` applies to; the others need explicit bits.
QUANTIZED_BY_DEFAULT = ("transformer", "text_encoder_2")

_EMBEDDERS = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in")
# Layers (path prefixes) kept in full precision even when their component is quantized:
# few bytes, large effect on the output (inputs, conditioning, final projection). A FLUX
# ControlNet (not a pipeline component) keeps its control input projection too.
FULL_PRECISION: Mapping[str, tuple[str, ...]] = {
    "transformer": (*_EMBEDDERS, "final_layer"),
    "vae": (),
    "text_encoder": (),
    "text_encoder_2": (),
    "controlnet": (*_EMBEDDERS, "final_layer", "controlnet_x_embedder"),
    # FLUX.2 [klein]'s Qwen3 text encoder: every attention and MLP linear (the embedding
    # and the norms are not Linear layers, so they stay in full precision)
    "qwen3": (),
}

# Config key marking a component folder written by mlx-edit (our parameter names).
MLX_LAYOUT_KEY = "_mlx_edit_version"
# Key map of such folders: every tensor already has our name.
IDENTITY_RULES: tuple[Rule, ...] = (rename("{rest}", "{rest}"),)


def check_bits(bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> None:
    """ValueError unless `bits` is in BITS and `group_size` in GROUP_SIZES."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size must be one of {GROUP_SIZES}, got {group_size!r}")


def skip_reason(component: str, path: str, module: nn.Module, group_size: int) -> str | None:
    """Why the layer at `path` of `component` stays in full precision, or None to quantize.

    `path` is the dotted module path as `nn.quantize` passes it (e.g.
    "double_blocks.0.img_attn.qkv"). Raises KeyError for an unknown component.
    """
    keep = FULL_PRECISION[component]
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__} layers stay in full precision"
    if any(path == p or path.startswith(p + ".") for p in keep):
        return "sensitive layer kept in full precision by the policy"
    width = module.weight.shape[-1]
    if width % group_size:
        return f"input width {width} is not a multiple of the group size {group_size}"
    return None


def layer_predicate(component: str, group_size: int) -> Callable[[str, nn.Module], bool]:
    """The `class_predicate` for `nn.quantize` implementing the policy for `component`."""
    if component not in FULL_PRECISION:
        raise KeyError(f"unknown component {component!r}; known: {', '.join(COMPONENTS)}")
    return lambda path, module: skip_reason(component, path, module, group_size) is None


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every leaf module that has a `to_quantized` (Linear, Embedding)."""
    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    return [(p, m) for p, m in leaves if hasattr(m, "to_quantized")]


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of the leaf modules that are already quantized."""
    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    return [(p, m) for p, m in leaves if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]


def quantize_component(
    model: nn.Module, component: str, bits: int, group_size: int = DEFAULT_GROUP_SIZE
) -> dict:
    """Quantize `model` (one pipeline component) in place by the policy; return its record.

    Works on lazily built models too (nothing is evaluated here), which is how loaders
    and the converter build a quantized structure without materialising full precision.
    Returns {"bits", "group_size", "mode": "affine", "skipped": sorted layer paths left
    unquantized}. Raises ValueError for unsupported bits / group size or a model that is
    already quantized, KeyError for an unknown component.
    """
    check_bits(bits, group_size)
    if quantized_layers(model):
        raise ValueError(f"the {component} is already quantized")
    predicate = layer_predicate(component, group_size)
    skipped = sorted(p for p, m in quantizable_layers(model) if not predicate(p, m))
    nn.quantize(model, group_size, bits, mode=MODE, class_predicate=predicate)
    return quantization_record(bits, group_size, skipped)


def quantization_record(bits: int, group_size: int, skipped: list[str]) -> dict:
    """The `quantization` entry of a component's config.json."""
    return {"bits": bits, "group_size": group_size, "mode": MODE, "skipped": list(skipped)}


def describe_quantization(model: nn.Module) -> dict | None:
    """The record of an already quantized model (None if nothing is quantized).

    Raises ValueError if its quantized layers do not share one bit width and group size.
    """
    done = quantized_layers(model)
    if not done:
        return None
    kinds = {(m.bits, m.group_size) for _, m in done}
    if len(kinds) != 1:
        raise ValueError(f"mixed quantization {sorted(kinds)} cannot be described by one record")
    (bits, group_size), = kinds
    skipped = sorted(p for p, _ in quantizable_layers(model))
    return quantization_record(bits, group_size, skipped)


def quantize_at_load(model: nn.Module, component: str, bits: int,
                     group_size: int = DEFAULT_GROUP_SIZE) -> dict:
    """Quantize `model` in place by the policy of `component` (a FULL_PRECISION key) and
    return the record; a model already quantized is left as is, with a warning when its
    bits differ. Raises ValueError for unsupported bits / group size."""
    existing = describe_quantization(model)
    if existing is not None:
        if existing["bits"] != bits:
            warnings.warn(
                f"the {component} checkpoint is already quantized at {existing['bits']} bits; "
                f"quantize={bits} is ignored",
                stacklevel=3,
            )
        return existing
    return quantize_component(model, component, bits, group_size)


def quantize_transformer(model: nn.Module, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> dict:
    """Quantize a loaded FluxTransformer in place (attention, MLP and modulation linears;
    embedders and final layer stay in full precision). Returns the record (see
    `quantize_component`). An already quantized model is left as is (with a warning if
    its bits differ). Raises ValueError for unsupported bits / group size."""
    return quantize_at_load(model, "transformer", bits, group_size)


def quantize_t5(model: nn.Module, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> dict:
    """Quantize a loaded T5Encoder in place (attention and feed-forward linears; the
    embeddings stay in full precision). Same contract as `quantize_transformer`."""
    return quantize_at_load(model, "text_encoder_2", bits, group_size)


def component_bits(
    quantize: int | None, overrides: Mapping[str, int | None] | None = None,
    components: tuple[str, ...] = COMPONENTS, quantized: tuple[str, ...] = QUANTIZED_BY_DEFAULT
) -> dict[str, int | None]:
    """Bits per component of `components` (FLUX.1's by default): `quantize` for `quantized`,
    None (full precision) for the rest, then `overrides` (component -> bits or None).
    Raises ValueError naming an unknown component or unsupported bits."""
    bits = {c: (quantize if c in quantized else None) for c in components}
    for name, value in (overrides or {}).items():
        if name not in bits:
            raise ValueError(f"unknown component {name!r}; known: {', '.join(components)}")
        bits[name] = value
    for value in bits.values():
        if value is not None and value not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {value!r}")
    return bits


def parse_component_bits(text: str) -> dict[str, int | None]:
    """Parse "transformer=4,text_encoder_2=8,vae=none" into {component: bits or None}.

    Raises ValueError (one line) for a malformed item, an unknown component or bits.
    """
    out: dict[str, int | None] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip().lower()
        if not sep or not name or not value:
            raise ValueError(f"{item!r}: expected COMPONENT=BITS, e.g. transformer=4")
        if name not in COMPONENTS:
            raise ValueError(f"unknown component {name!r}; known: {', '.join(COMPONENTS)}")
        if value in ("none", "full", "0", "16", "32"):
            out[name] = None
        elif value.isdigit() and int(value) in BITS:
            out[name] = int(value)
        else:
            raise ValueError(f"{item!r}: bits must be one of {BITS} or 'none'")
    return out


def is_mlx_layout(config: Mapping | None) -> bool:
    """True for a component config written by mlx-edit (tensors carry our names)."""
    return bool(config) and MLX_LAYOUT_KEY in config


def read_record(config: Mapping, name: str = "model") -> dict | None:
    """The validated `quantization` entry of a config (None if absent).

    Raises WeightLoadError for a malformed entry (unknown bits, group size or mode).
    """
    q = config.get("quantization")
    if q is None:
        return None
    try:
        bits, group_size, mode = q["bits"], q["group_size"], q.get("mode", MODE)
        skipped = list(q.get("skipped", []))
    except (TypeError, KeyError) as e:
        raise WeightLoadError(f"{name}: malformed quantization entry in config.json ({e})") from e
    if bits not in BITS or group_size not in GROUP_SIZES or mode != MODE:
        raise WeightLoadError(
            f"{name}: config.json records unsupported quantization bits={bits!r} "
            f"group_size={group_size!r} mode={mode!r}"
        )
    return quantization_record(bits, group_size, skipped)


def stored_bits(weight_shape, scales_shape, group_size: int) -> float:
    """Bits per weight implied by a packed uint32 weight (O, I*bits/32) and its scales
    (O, I/group_size)."""
    return weight_shape[-1] * 32 / (scales_shape[-1] * group_size)


def check_tensors(record: dict | None, layers: list[str], tensors: Mapping, name: str) -> None:
    """Check that the quantized tensors match `record` for the quantizable `layers`.

    Raises WeightLoadError (one line) when a layer recorded as quantized has no scales or
    another bit width, when a layer recorded as skipped (or a model recorded as not
    quantized) holds quantized tensors, or when `skipped` names an unknown layer.
    """
    layer_set = set(layers)
    if record is None:
        found = sorted(k[: -len(".scales")] for k in tensors if k.endswith(".scales"))
        if found:
            raise WeightLoadError(
                f"{name}: tensors are quantized ({found[0]}, ...) but config.json records "
                "no quantization"
            )
        return
    unknown = sorted(set(record["skipped"]) - layer_set)
    if unknown:
        raise WeightLoadError(f"{name}: config.json skips unknown layers: {', '.join(unknown[:5])}")
    bits, group_size = record["bits"], record["group_size"]
    for path in sorted(layer_set):
        has_scales = f"{path}.scales" in tensors
        if path in record["skipped"]:
            if has_scales:
                raise WeightLoadError(
                    f"{name}: {path} is recorded as full precision but its tensors are quantized"
                )
            continue
        if not has_scales:
            raise WeightLoadError(
                f"{name}: config.json records {bits}-bit quantization but {path} is not "
                "quantized in the checkpoint"
            )
        w, s = tensors.get(f"{path}.weight"), tensors[f"{path}.scales"]
        if w is None:
            continue  # a missing weight is reported by the strict loader
        found = stored_bits(w.shape, s.shape, group_size)
        if found != bits:
            raise WeightLoadError(
                f"{name}: config.json records {bits}-bit (group {group_size}) quantization but "
                f"{path} is stored at {found:g} bits (weight {tuple(w.shape)}, "
                f"scales {tuple(s.shape)})"
            )


def apply_recorded_quantization(
    model: nn.Module, config: Mapping, tensors: Mapping | None = None, *, name: str = "model"
) -> dict | None:
    """Quantize the (freshly built, not yet loaded) `model` exactly as `config` records.

    Every layer with `to_quantized` is quantized with the recorded bits and group size
    except those listed in `skipped`; nothing is evaluated, so loading the checkpoint
    afterwards never materialises full precision. With `tensors` (the lazy checkpoint),
    the record is first checked against the stored shapes (see `check_tensors`).
    Returns the record, or None when the config records no quantization.
    Raises WeightLoadError for a malformed record or a record that disagrees with the
    tensors.
    """
    record = read_record(config, name)
    layers = [p for p, _ in quantizable_layers(model)]
    if tensors is not None:
        check_tensors(record, layers, tensors, name)
    if record is None:
        return None
    skipped = set(record["skipped"])
    nn.quantize(
        model,
        record["group_size"],
        record["bits"],
        mode=MODE,
        class_predicate=lambda path, m: hasattr(m, "to_quantized") and path not in skipped,
    )
    return record


def dequantized_view(model: nn.Module, config: Mapping, tensors: Mapping, name: str) -> dict:
    """For an mlx-edit source: check its recorded quantization against its tensors, then
    replace each quantized layer's (weight, scales, biases) by a lazy `mx.dequantize`
    under `.weight`, so the source reads as full precision. Nothing is evaluated."""
    record = read_record(config, name)
    layers = [p for p, _ in quantizable_layers(model)]
    check_tensors(record, layers, tensors, name)
    if record is None:
        return tensors
    out = dict(tensors)
    for path in layers:
        keys = [f"{path}.{s}" for s in ("weight", "scales", "biases")]
        if path in record["skipped"] or not all(k in out for k in keys):
            continue  # incomplete layers are reported by the strict plan
        w, s, b = (out.pop(k) for k in keys)
        out[keys[0]] = mx.dequantize(w, s, b, record["group_size"], record["bits"])
    return out


def model_nbytes(model: nn.Module, float_dtype: mx.Dtype | None = None) -> int:
    """Bytes of the model's parameters, floating ones counted at `float_dtype` (None: as
    they are). Reads only shapes: works on lazily built models without allocating."""
    total = 0
    for _, p in tree_flatten(model.parameters()):
        if float_dtype is not None and mx.issubdtype(p.dtype, mx.floating):
            total += p.size * float_dtype.size
        else:
            total += p.nbytes
    return total
