"""Memory estimate before a run, and a refusal (with options that fit) when it cannot fit.

Weights are counted exactly from the component configs: each model is built lazily (MLX
allocates nothing until evaluated), quantized by the package policy when asked
(mlx_edit.weights.quantize), and its parameter bytes summed. Activations use per-token and
per-pixel costs measured on the CPU backend (benchmarks/RESULTS.md, "memory model"):

- transformer: on the CPU backend attention has no fused kernel, so it materialises its
  scores, B*H*L^2*4 bytes (x ACT_SCORE_COPIES); plus ACT_LINEAR_COPIES copies of the
  widest projection per image, the single blocks' fused input projection, whose width is
  the family's (`Family.activation_width`: FLUX.1 3*hidden + mlp_hidden, FLUX.2
  3*hidden + 2*mlp_hidden for SwiGLU). On Metal/CUDA the fused kernel drops the L^2 term.
- VAE: `tiling.vae_activation_gb` (bytes per pixel, measured) for the image, or for one
  tile plus the host accumulators when `tiling.should_tile` says the pass is tiled.

- SAM 2.1 (a click/box mask): `segmenter_gb`: its weights from the config, and its image
  embedding's activations, linear in the input pixels and the Hiera width (measured).
- SAM 3 (a mask from words): `text_segmenter_gb`: its three models' weights from the
  config, and its backbone's activations, linear in the ViT's patch tokens (measured)
  plus the per-query mask logits.

The peak is the largest phase: [segmenting (SAM 2.1 or SAM 3),] text encoding, VAE encode,
denoising, VAE decode. A segmenter is loaded for its phase only
(mlx_edit.editing.segment.mask_from_prompts, text_segment.mask_for_edit free it before
anything else runs), next to what a normal run keeps resident. The
text encoders are loaded one at a time (CLIP, freed, then T5) in both modes; the
transformer and VAE stay resident in a normal run. With `low_memory` (FluxFill,
mlx_edit.editing.components) only the phase's own model is resident: CLIP or T5, the VAE, the
transformer, the VAE. Quantized components count at their quantized size in both modes,
as the loaders quantize layer by layer (weights/core.py `load_into`). Kontext and klein reference
images are tokens in the transformer's sequence (`reference_tokens`: their attention
grows with the square of the total), encoded one at a time by the VAE; klein inpainting
also appends the canvas itself, encoded whole (`source_reference`); the text is
max_sequence_length T5 / Qwen3 tokens (`text_tokens`). ControlNets and image-prompt models are
not counted.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

import mlx.core as mx

from mlx_edit.editing import tiling
from mlx_edit.imaging.images import InputError
from mlx_edit.models.flux import FluxConfig
from mlx_edit.models.vae import VAEConfig
from mlx_edit.sampling.cache import state_bytes
from mlx_edit.weights.quantize import model_nbytes, quantize_component

GB = 1e9
# Fitted to measured peaks of a wide FLUX.1 forward at 512, 1536 and 2560 tokens (within
# 2%, 2026-11-22); with FLUX.2's width they bound klein's 11-13% above (benchmarks/RESULTS.md):
ACT_SCORE_COPIES = 1.2  # the scores (softmax runs in place), float32, CPU SDPA fallback
ACT_LINEAR_COPIES = 4.3  # widest projection (linear1 out), gelu, concat, residuals
RUNTIME_GB = 0.6  # Python, MLX, tokenizers, prompt embeddings, small buffers
TEXT_TOKENS = 512
PHASES = ("text_encode", "vae_encode", "denoise", "vae_decode")
# SAM image-embedding activations per input pixel and Hiera stage-0 channel (float32, CPU:
# 0.66 GB for hiera-tiny at 1024 px, 0.68 for hiera-small; benchmarks/RESULTS.md).
SAM_ACT_BYTES = 6.6
# SAM 3 backbone activations per ViT patch token (float32, CPU), at facebook/sam3's widths
# (FPN 256): 0.39-0.41 MB at 336-672 px, 0.49 MB at 1008 (facebook/sam3's input, fitted
# there: the smaller inputs are over-estimated by up to 25%); mostly the FPN's
# convolutions at 4x and 2x (benchmarks/RESULTS.md, bench_sam_memory.py --sam3); other
# FPN widths scale it.
SAM3_ACT_BYTES_PER_TOKEN = 4.95e5


def _backend() -> str:
    return "gpu" if mx.default_device() == mx.gpu else "cpu"


def _dtype_size(dtype) -> int:
    if isinstance(dtype, str):
        dtype = getattr(mx, dtype)
    return dtype.size


def weights_gb(transformer=None, vae=None, clip=None, t5=None, dtype="float32",
               quantize: int | None = None, *, family: str = "flux1",
               text: Mapping | None = None) -> dict[str, float]:
    """Parameter GB per component, from configs (the family's config dataclasses or their
    config.json dicts; None = the family's defaults: FLUX.1 Fill-dev's). text: {text
    encoder folder: config} (FLUX.1: clip / t5 are text_encoder / text_encoder_2).
    `quantize` 4/8 applies the package policy (FLUX.1: transformer and T5 quantized,
    embedders/VAE/CLIP not)."""
    return _weights(_parts(family, _configs(transformer, vae, text, clip, t5)), dtype,
                    quantize, family)


def _configs(transformer, vae, text: Mapping | None, clip=None, t5=None) -> dict:
    """{component: config or None}: the transformer, the VAE, then the text encoders
    (`text`, else FLUX.1's clip / t5 as text_encoder / text_encoder_2)."""
    return {"transformer": transformer, "vae": vae,
            **dict(text or {"text_encoder": clip, "text_encoder_2": t5})}


def _parts(family: str, configs: dict) -> dict:
    """{component: model built lazily from its config (nothing is allocated)}; the text
    encoders last, in the family's order."""
    from mlx_edit import families

    return families.get(family).memory_parts(configs)


def _weights(models: dict, dtype, quantize: int | None, family: str = "flux1"
             ) -> dict[str, float]:
    """GB per component, quantized (when asked) as the family's loaders do
    (`Family.quantized`: component -> quantization policy)."""
    from mlx_edit import families

    float_dtype = getattr(mx, dtype) if isinstance(dtype, str) else dtype
    policies = families.get(family).quantized if quantize else {}
    out = {}
    for name, model in models.items():
        if name in policies:
            model.set_dtype(float_dtype)  # scales/biases take the compute dtype
            quantize_component(model, policies[name], quantize)
        out[name] = model_nbytes(model, float_dtype) / GB
    return out


def text_activation_gb(cfg, tokens: int, dtype_size: int) -> float:
    """Activations (GB) of the sequence text encoder (T5 / Qwen3) over `tokens`: a few
    copies of its widest layer and the float32 attention scores."""
    width = max(getattr(cfg, "d_model", 0) or cfg.hidden_size,
                getattr(cfg, "d_ff", 0) or cfg.intermediate_size)
    heads = getattr(cfg, "num_heads", 0) or cfg.num_attention_heads
    return 4 * tokens * width * dtype_size / GB + 2 * heads * tokens**2 * 4 / GB


def transformer_activation_gb(tokens: int, cfg, batch: int, dtype_size: int,
                              fused_attention: bool | None = None, family: str = "flux1"
                              ) -> float:
    """Peak activations (GB) of one transformer forward over `tokens` = image + reference +
    text tokens of a `family` transformer config (FluxConfig / Flux2Config): copies of
    its widest projection (`Family.activation_width`: the single blocks' fused input
    projection) and, without a fused attention kernel (None: the CPU backend), the
    attention scores."""
    from mlx_edit import families

    if fused_attention is None:
        fused_attention = _backend() == "gpu"
    per_hidden, per_mlp = families.get(family).activation_width
    width = per_hidden * cfg.hidden_size + per_mlp * cfg.mlp_hidden
    linear = ACT_LINEAR_COPIES * tokens * width * dtype_size
    scores = 0.0 if fused_attention else (
        ACT_SCORE_COPIES * cfg.num_attention_heads * tokens**2 * dtype_size)
    return batch * (linear + scores) / GB


def denoise_gb(image_tokens: int, text_tokens: int, cfg, batch: int, dtype_size: int,
               window: tuple[int, int] | None = None, family: str = "flux1",
               reference_tokens: int = 0) -> float:
    """Denoising activations (GB): one forward over the canvas's image tokens, the
    reference tokens and the text, or with `window` (image tokens of one window, windows
    per batch) one window batch (each with the references) plus the canvas latents."""
    if window is None:
        return transformer_activation_gb(image_tokens + reference_tokens + text_tokens, cfg,
                                         batch, dtype_size, family=family)
    return transformer_activation_gb(window[0] + reference_tokens + text_tokens, cfg,
                                     batch * window[1], dtype_size, family=family) \
        + canvas_latents_gb(image_tokens, cfg, batch, dtype_size)


def canvas_latents_gb(image_tokens: int, cfg: FluxConfig, batch: int, dtype_size: int
                      ) -> float:
    """The whole canvas's arrays during tiled denoising: latents, initial noise and
    source in the model dtype, the channel conditioning, and the float32 accumulator of
    the windows' weighted sum (packed tokens of `cfg.out_channels`)."""
    out = cfg.out_channels or cfg.in_channels
    per_token = (3 * out + cfg.in_channels - out) * dtype_size + 2 * out * 4
    return batch * image_tokens * per_token / GB


def vae_pass_gb(height: int, width: int, dtype_size: int, decode: bool = True,
                config: VAEConfig | None = None) -> float:
    """VAE activations (GB) as the pipeline runs them (`tiling.decode_auto` / `encode_auto`
    with `tile_threshold_gb()`): the whole image when it fits the threshold, else one tile
    plus the host accumulators (float32 output and float64 weights: 20 B per output pixel
    decoding, 72 B per latent encoding)."""
    if not tiling.should_tile(height, width, dtype_size, tile_threshold_gb(), decode, config):
        return tiling.vae_activation_gb(height, width, dtype_size, decode, config=config)
    tile = tiling.default_tile(dtype_size, decode=decode, config=config)
    acc = 20 * height * width if decode else 72 * (height // 8) * (width // 8)
    return tiling.vae_activation_gb(tile, tile, dtype_size, decode, config=config) + acc / GB


def segmenter_gb(config=None, dtype="float32") -> tuple[float, float]:
    """(weights GB, image-embedding activations GB) of a SAM 2.1 image model from its
    config (SamConfig or config.json dict; None = sam2.1-hiera-tiny's defaults) computing
    in `dtype` (the loader's default is float32). The decoder's per-prompt cost is small
    next to the encoder's and is not counted."""
    from mlx_edit.models.sam import SamConfig, SamModel

    cfg = config if isinstance(config, SamConfig) else SamConfig.from_dict(dict(config or {}))
    float_dtype = getattr(mx, dtype) if isinstance(dtype, str) else dtype
    weights = model_nbytes(SamModel(cfg), float_dtype) / GB  # built lazily: nothing allocated
    pixels = cfg.image_size ** 2
    act = SAM_ACT_BYTES * cfg.vision.backbone.hidden_size * pixels * float_dtype.size / 4 / GB
    return weights, act


def sam3_backbone_gb(vision, dtype="float32") -> float:
    """Activations GB of SAM 3's vision backbone (Sam3VisionConfig) on one image:
    SAM3_ACT_BYTES_PER_TOKEN per ViT patch token, scaled by the FPN width / 256 and the
    dtype's size / 4 (measured in float32: bench_sam_memory.py --sam3)."""
    size = (getattr(mx, dtype) if isinstance(dtype, str) else dtype).size
    vit = vision.backbone_config
    tokens = (vit.image_size // vit.patch_size) ** 2
    return SAM3_ACT_BYTES_PER_TOKEN * tokens * vision.fpn_hidden_size / 256 * size / 4 / GB


def text_segmenter_gb(config=None, dtype="float32") -> tuple[float, float]:
    """(weights GB, activations GB) of SAM 3's image model (vision backbone, text encoder,
    heads) from its config.json dict (None / {}: facebook/sam3's) computing in `dtype`:
    the backbone's activations (`sam3_backbone_gb`) plus two float32 copies of the
    per-query mask logits at the finest FPN level (queries x 16 tokens; the heads'
    other activations are small next to them)."""
    from mlx_edit.models.sam3_heads import Sam3Heads, Sam3HeadsConfig
    from mlx_edit.models.sam3_text import Sam3TextConfig, Sam3TextEncoder
    from mlx_edit.models.sam3_vision import Sam3VisionConfig, Sam3VisionModel

    d = dict(config or {})
    vision, heads = Sam3VisionConfig.from_dict(d), Sam3HeadsConfig.from_dict(d)
    float_dtype = getattr(mx, dtype) if isinstance(dtype, str) else dtype
    models = (Sam3VisionModel(vision), Sam3TextEncoder(Sam3TextConfig.from_dict(d)),
              Sam3Heads(heads))  # built lazily: nothing allocated
    weights = sum(model_nbytes(m, float_dtype) for m in models) / GB
    vit = vision.backbone_config
    finest = 16 * (vit.image_size // vit.patch_size) ** 2  # the FPN's 4x level
    masks = 2 * heads.detr_decoder.num_queries * finest * 4 / GB
    return weights, sam3_backbone_gb(vision, float_dtype) + masks


@dataclass(frozen=True)
class _Inputs:
    """An estimate's request (`estimate`'s arguments; configs: {component: config},
    resolved to the family's config dataclasses)."""

    width: int
    height: int
    num_images: int
    dtype: str
    quantize: int | None
    configs: dict
    lora_params: int = 0
    cache: object = None
    segmenter: object = None
    window: tuple[int, int] | None = None
    text_segmenter: object = None
    cache_branches: int = 1
    text_tokens: int = TEXT_TOKENS
    reference_tokens: int = 0
    reference_px: tuple[int, int] | None = None
    source_reference: bool = False
    family: str = "flux1"
    reference_kv: bool = False


class MemoryEstimate(dict):
    """{name: GB}: weights per component, activations per phase, `peak` (normal run),
    `peak_low_memory` and per-phase totals `phase_<name>`. `.inputs` keeps the request."""

    inputs: _Inputs


def estimate(width: int, height: int, num_images: int = 1, dtype="float32",
             quantize: int | None = None, *, transformer=None, vae=None, clip=None, t5=None,
             text_tokens: int = TEXT_TOKENS, lora_params: int = 0, cache=None,
             segmenter=None, window: tuple[int, int] | None = None,
             cache_branches: int = 1, reference_tokens: int = 0,
             reference_px: tuple[int, int] | None = None, source_reference: bool = False,
             family: str = "flux1", text: Mapping | None = None, text_segmenter=None,
             reference_kv: bool = False) -> MemoryEstimate:
    """Estimate the peak memory (GB) of an edit at width x height px (the model canvas).

    Components: configs (dataclasses or config.json dicts) of the `family`'s models
    (mlx_edit.families); None = the family's defaults (FLUX.1: Fill-dev). text: {text
    encoder folder: config} (FLUX.1: or clip / t5).
    dtype: "float32" / "bfloat16" (or an mx.Dtype); quantize: None, 4 or 8.
    lora_params: LoRA parameters applied unfused (in `dtype`, any quantization).
    cache: the edit's step cache config (sampling.cache) or None; its state (x
    cache_branches: 2 with true CFG) is `cache_state`, counted in the denoise phase.
    segmenter: the SAM 2.1 config (SamConfig or config.json dict) of a click/box mask, or
    None; adds the phase "segment" (its weights and activations next to the resident
    models, `segmenter_gb`), gone before denoising. text_segmenter: the SAM 3 config.json
    dict of a mask from words ({}: facebook/sam3's), or None; adds the phase
    "text_segment" the same way (`text_segmenter_gb`).
    window: (tokens of one window, windows per batch) of tiled denoising: `denoise_gb`.
    text_tokens: the text sequence (max_sequence_length). reference_tokens: packed tokens
    of reference images (Kontext, klein), in every forward next to the image's (and each
    window's); reference_px: (width, height) of the largest reference, its VAE encode
    counted. source_reference: the canvas's own tokens are a reference too (klein
    inpainting: the whole canvas, encoded whole, appended to every forward and window).
    reference_kv: the references enter as keys/values computed once (FLUX.2 KV variant):
    out of the sequence, their cache (`Flux2Config.reference_kv_bytes`, entry
    `reference_kv`) and the forward computing it counted in the denoise phase instead.
    Returns a MemoryEstimate (a dict of GB); `peak` is max over the phases of resident
    weights + that phase's activations + RUNTIME_GB.
    """
    dtype_name = dtype if isinstance(dtype, str) else str(dtype).split(".")[-1]
    return _estimate(_Inputs(
        width, height, num_images, dtype_name, quantize,
        _configs(transformer, vae, text, clip, t5), lora_params, cache, segmenter, window,
        text_segmenter, cache_branches, text_tokens, reference_tokens, reference_px,
        source_reference, family, reference_kv))


def _estimate(i: _Inputs) -> MemoryEstimate:
    """`estimate` of a request: weights, activations per phase, what is resident in each
    phase (normal and low-memory), then the totals."""
    models = _parts(i.family, i.configs)
    i = replace(i, configs={name: m.config for name, m in models.items()})
    w = _weights(models, i.dtype, i.quantize, i.family)
    if i.lora_params:
        w["lora"] = i.lora_params * _dtype_size(i.dtype) / GB
    act, held = _activations(i)
    if i.segmenter is not None:
        w["segmenter"], act["segment"] = segmenter_gb(i.segmenter)
    if i.text_segmenter is not None:
        w["text_segmenter"], act["text_segment"] = text_segmenter_gb(i.text_segmenter)
    normal, low = _resident(w, texts=list(i.configs)[2:])
    out = MemoryEstimate({f"weights_{k}": v for k, v in w.items()})
    out.update({f"activations_{k}": v for k, v in act.items()})
    out.update(held)
    for p in act:
        out[f"phase_{p}"] = normal[p] + act[p] + RUNTIME_GB
    out["peak"] = max(out[f"phase_{p}"] for p in act)
    out["peak_low_memory"] = max(low[p] + act[p] + RUNTIME_GB for p in act)
    out.inputs = i
    return out


def _activations(i: _Inputs) -> tuple[dict[str, float], dict[str, float]]:
    """({phase: activations GB} of the text encode (the last, largest text encoder),
    VAE encode (the canvas or the largest reference), denoise (with what the denoise
    phase holds) and VAE decode; {"cache_state" (with a step cache), "reference_kv" (KV
    variant): GB held through the denoise phase})."""
    size, cfgs, family = _dtype_size(i.dtype), i.configs, i.family
    image_tokens = (i.height // 16) * (i.width // 16)
    refs = i.reference_tokens + (image_tokens if i.source_reference else 0)
    in_sequence = 0 if i.reference_kv else refs
    held = {"cache_state": i.cache_branches * state_bytes(
        i.cache, cfgs["transformer"], i.num_images, image_tokens + in_sequence,
        i.text_tokens, size) / GB} if i.cache is not None else {}
    ref_pass = 0.0
    if i.reference_kv:  # one forward over the references alone computes their K/V
        held["reference_kv"] = cfgs["transformer"].reference_kv_bytes(refs, 1, size) / GB
        ref_pass = transformer_activation_gb(refs, cfgs["transformer"], 1, size, family=family)
    encode_px = max((i.width, i.height), i.reference_px or (0, 0), key=lambda s: s[0] * s[1])
    steps = denoise_gb(image_tokens, i.text_tokens, cfgs["transformer"], i.num_images, size,
                       i.window, family, in_sequence)
    return {
        "text_encode": text_activation_gb(cfgs[list(cfgs)[-1]], i.text_tokens, size),
        "vae_encode": vae_pass_gb(encode_px[1], encode_px[0], size, decode=False,
                                  config=cfgs["vae"]),
        "denoise": max(steps, ref_pass) + sum(held.values()),
        "vae_decode": vae_pass_gb(i.height, i.width, size, decode=True, config=cfgs["vae"]),
    }, held


def _resident(w: dict[str, float], texts: list[str]) -> tuple[dict, dict]:
    """GB of weights resident in each phase: ({phase: GB} of a normal run: the
    transformer (with its LoRAs) and VAE throughout, plus the largest text encoder while
    encoding (they load one at a time: CLIP, freed, then T5), {phase: GB} with
    low_memory: the phase's own model only); with a segmenter (SAM 2.1 "segmenter", SAM 3
    "text_segmenter") its phase too, next to what a normal run keeps resident."""
    transformer = w["transformer"] + w.get("lora", 0.0)  # LoRAs live with the transformer
    text = max(w[t] for t in texts)
    resident = transformer + w["vae"]
    normal = {"text_encode": resident + text, "vae_encode": resident,
              "denoise": resident, "vae_decode": resident}
    low = {"text_encode": text, "vae_encode": w["vae"], "denoise": transformer,
           "vae_decode": w["vae"]}
    for name, phase in (("segmenter", "segment"), ("text_segmenter", "text_segment")):
        if name in w:
            normal[phase], low[phase] = resident + w[name], w[name]
    return normal, low


def tile_threshold_gb() -> float:
    """Untiled VAE passes above this many GB of activations are tiled: 40% of the machine's
    memory (tiles cost quality: per-tile GroupNorm statistics and mid-block attention,
    benchmarks/RESULTS.md), never below tiling.TILE_BUDGET_GB."""
    return max(tiling.TILE_BUDGET_GB, 0.4 * available_memory() / GB)


def available_memory() -> int:
    """Bytes the run may use: Metal's recommended working set (or device memory) on a
    GPU, else the machine's physical memory (os.sysconf on Linux and macOS)."""
    if _backend() == "gpu":
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
            if info.get(key):
                return int(info[key])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _with(est: MemoryEstimate, **changes) -> MemoryEstimate:
    """`est` again with some of its request's fields changed."""
    return _estimate(replace(est.inputs, **changes))


def _smaller_size(est: MemoryEstimate, limit: float, key: str) -> tuple[int, int] | None:
    i = est.inputs
    for step in range(1, 16):  # shrink the area by ~12% a step, sides multiples of 16
        s = 0.94**step
        w, h = max(16, int(i.width * s) // 16 * 16), max(16, int(i.height * s) // 16 * 16)
        if _with(est, width=w, height=h)[key] <= limit:
            return w, h
    return None


def fitting_options(est: MemoryEstimate, available: float, low_memory: bool = False) -> list[str]:
    """Human-readable changes that each bring the estimate under `available` GB."""
    i, key = est.inputs, "peak_low_memory" if low_memory else "peak"
    options = []
    if not low_memory and est["peak_low_memory"] <= available:
        options.append(f"--low-memory (about {est['peak_low_memory']:.1f} GB)")
    for bits in (8, 4):
        if i.quantize is None or bits < i.quantize:
            q = _with(est, quantize=bits)
            for k, flag in ((key, ""), ("peak_low_memory", " --low-memory")):
                if q[k] <= available and (k == key or not low_memory):
                    options.append(f"--quantize {bits}{flag} (about {q[k]:.1f} GB)")
                    break
    if i.num_images > 1:
        fits = [n for n in range(i.num_images - 1, 0, -1) if _with(est, num_images=n)[key] <= available]
        if fits:
            options.append(f"--num-images {fits[0]} (run the others separately)")
    size = _smaller_size(est, available, key)
    if size:
        options.append(f"a smaller canvas, about {size[0]}x{size[1]} px (crop to the mask)")
    return options


def check_fits(est: MemoryEstimate, available: float | None = None,
               low_memory: bool = False) -> None:
    """Raise InputError when the estimate's peak (low-memory peak if `low_memory`) exceeds
    `available` GB (None: `available_memory()`); the message lists options that fit."""
    available = available_memory() / GB if available is None else float(available)
    need = est["peak_low_memory"] if low_memory else est["peak"]
    if need <= available:
        return
    i = est.inputs
    parts = ", ".join(f"{k.removeprefix('weights_')} {v:.1f}" for k, v in est.items()
                      if k.startswith("weights_"))
    options = fitting_options(est, available, low_memory)
    advice = ("options that fit: " + "; ".join(options)) if options else (
        "no smaller setting fits either: use a machine with more memory")
    refs = f", {i.reference_tokens} reference tokens" if i.reference_tokens else ""
    raise InputError(
        f"this edit needs about {need:.1f} GB ({i.width}x{i.height}{refs}, "
        f"{i.num_images} image(s), "
        f"{i.dtype}{f', {i.quantize}-bit' if i.quantize else ''}; weights GB: {parts}) but "
        f"this machine has {available:.1f} GB; {advice}"
    )


# the segment phases: phase -> (weights key, model, its activations, what else to use)
SEGMENT_PHASES = {
    "segment": ("segmenter", "SAM", "image embedding", "a smaller SAM 2.1 checkpoint"),
    "text_segment": ("text_segmenter", "SAM 3", "activations", "clicks (--mask-point)")}


def check_segmenter_fits(est: MemoryEstimate, low_memory: bool = False,
                         available: float | None = None, phase: str = "segment") -> None:
    """Raise InputError when the segment `phase` of `est` ("segment": SAM 2.1,
    "text_segment": SAM 3; an estimate with that model) exceeds `available` GB (None:
    `available_memory()`); checked before the model loads, as the canvas of the later
    phases is known only from the mask (they are `check_fits`'s)."""
    available = available_memory() / GB if available is None else float(available)
    key, model, noun, other = SEGMENT_PHASES[phase]
    weights, act = est[f"weights_{key}"], est[f"activations_{phase}"]
    resident = 0.0 if low_memory else est[f"phase_{phase}"] - act - weights - RUNTIME_GB
    need = resident + weights + act + RUNTIME_GB
    if need <= available:
        return
    advice = "" if low_memory else "; --low-memory frees the FLUX models while segmenting"
    raise InputError(
        f"segmenting the mask needs about {need:.1f} GB ({model} weights {weights:.2f}, "
        f"{noun} {act:.2f}, resident models {resident:.1f}) but this machine has "
        f"{available:.1f} GB: draw the mask instead (--mask) or use {other}{advice}")


def summary(est: Mapping[str, float]) -> str:
    """One line per entry, GB with one decimal (for --verbose / benchmarks)."""
    return "\n".join(f"{k:28s} {v:7.2f} GB" for k, v in est.items())
