"""The model families as data: what FLUX.1 and FLUX.2 do differently, one entry each.

The pipeline (mlx_edit.editing.pipeline), the loop (mlx_edit.sampling.denoise), conditioning,
imaging, options, the CLI, serve and batch are shared; what differs between families is
read from their `Family` entry, taken from the folder's model_index.json
(`variants.family_of`):

- loading: the transformer's and VAE's config readers and loaders (their key maps live
  in mlx_edit.weights), the text encoder folders;
- text: how a prompt becomes the transformer's text inputs (`PromptEmbeds`; FLUX.1: CLIP
  pooled + T5 sequence, mlx_edit.editing.prompts);
- latents: how VAE latents (B, h, w, C) become the packed, normalised tokens the
  transformer denoises and back (FLUX.1: scale/shift, 2x2 packing to 64 channels);
- ids: the RoPE position axes (FLUX.1: 3, (t, row, col)), how reference images become
  sequence tokens with ids, and how a pixel mask becomes a per-token mask for the
  source-keeping step hook;
- the schedule's shift `mu`;
- the memory estimate's parts (mlx_edit.editing.memory).

Defaults (steps, guidance, true CFG) and the edits each transformer serves are its
variants' (mlx_edit.variants). A third family is its models, key maps and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from PIL import Image

from mlx_edit.conditioning import klein
from mlx_edit.conditioning.context import ConditioningContext
from mlx_edit.conditioning.kontext import kontext_tokens
from mlx_edit.conditioning.kontext import reference_size as kontext_reference_size
from mlx_edit.models.clip import CLIPTextConfig, CLIPTextModel
from mlx_edit.models.flux import FluxConfig, FluxTransformer
from mlx_edit.models.flux2 import Flux2Config, Flux2Transformer
from mlx_edit.models.qwen3 import Qwen3Config, Qwen3TextEncoder
from mlx_edit.models.t5 import T5Config, T5Encoder
from mlx_edit.models.vae import AutoencoderKL, VAEConfig
from mlx_edit.editing.prompts import ClipT5Text, Qwen3Text
from mlx_edit.sampling import latents_flux2
from mlx_edit.sampling.latents import (
    pack_latent_mask,
    pack_latents,
    scale_latents,
    token_grid,
    unpack_latents,
    unscale_latents,
)
from mlx_edit.sampling.sampler import SchedulerConfig, compute_mu, empirical_mu
from mlx_edit.weights import flux as flux_weights
from mlx_edit.weights import flux2 as flux2_weights
from mlx_edit.weights import loader
from mlx_edit.weights import vae as vae_weights
from mlx_edit.weights.quantize import QUANTIZED_BY_DEFAULT, read_record

# (ctx, reference images, auto_resize, source) -> (tokens (1, M, C), ids (M, axes)).
# source: the canvas's own packed latents and token grid when the family appends the
# edited image itself as a reference (FLUX.2 inpainting), else None.
ReferenceTokens = Callable[[ConditioningContext, Sequence[Image.Image], bool,
                            "tuple[mx.array, tuple[int, int]] | None"],
                           "tuple[mx.array, mx.array]"]


@dataclass(frozen=True)
class Family:
    """One model family.

    name / title: "flux1" / "FLUX.1". id_axes: RoPE position axes of image, reference and
    text ids (mlx_edit.sampling.latents.image_ids / text_ids).
    read_transformer_config(path, expect_in_channels) -> (config, stored bits | None);
    load_transformer(path, dtype, expect_in_channels=, quantize=) -> model;
    read_vae_config(folder) -> config; load_vae(folder, dtype) -> model.
    text(root) -> the prompt encoder (mlx_edit.editing.prompts: tokenizers read now, encoders
    loaded per prompt; its `folders` are the text-encoder folders).
    to_tokens(vae, z) : VAE latents (B, h, w, C) -> packed model tokens (B, h*w/4, 4C),
    normalised; from_tokens(vae, tokens, width_px, height_px) the inverse.
    token_mask(mask (B, H, W) float, 1 = generate) -> (B, N, 4C | 1): the per-token weight
    of the generated latents in the source-keeping hook (sampling.denoise.keep_source).
    reference_tokens: `ReferenceTokens`. reference_size(width, height, auto_resize) ->
    (width, height) px a reference image is encoded at (for the memory estimate).
    mu(image_seq_len, steps, scheduler config): the
    schedule's shift. memory_parts(configs) -> {component: lazily built model} for the
    weights estimate (nothing is allocated). activation_width: the widest projection of
    a transformer forward, the single blocks' fused input projection (attention q, k, v
    and the MLP's input), as (multiple of hidden_size, multiple of mlp_hidden): the
    activation term of the memory estimate (`memory.transformer_activation_gb`).
    quantized: the components `quantize` applies to, with their quantization policy
    (mlx_edit.weights.quantize.FULL_PRECISION key).
    """

    name: str
    title: str
    id_axes: int
    read_transformer_config: Callable[..., tuple[Any, int | None]]
    load_transformer: Callable[..., Any]
    read_vae_config: Callable[..., Any]
    load_vae: Callable[..., Any]
    text: Callable[..., Any]
    to_tokens: Callable[[Any, mx.array], mx.array]
    from_tokens: Callable[[Any, mx.array, int, int], mx.array]
    token_mask: Callable[[mx.array], mx.array]
    reference_tokens: ReferenceTokens
    reference_size: Callable[[int, int, bool], tuple[int, int]]
    mu: Callable[[int, int, SchedulerConfig], float]
    memory_parts: Callable[[dict], dict]
    activation_width: tuple[int, int]
    quantized: dict[str, str]


# ------------------------------------------------------------------ FLUX.1


def _flux1_to_tokens(vae, z: mx.array) -> mx.array:
    cfg = vae.config  # diffusers FluxPipeline: (z - shift) * scale, then 2x2 packing
    return pack_latents(scale_latents(z, cfg.scaling_factor, cfg.shift_factor))


def _flux1_from_tokens(vae, tokens: mx.array, width: int, height: int) -> mx.array:
    cfg = vae.config
    return unscale_latents(unpack_latents(tokens, height, width), cfg.scaling_factor,
                           cfg.shift_factor)


def _flux1_references(ctx, references, auto_resize, source=None):
    if source is not None:
        raise ValueError("FLUX.1 takes no source reference")
    return kontext_tokens(ctx, references, auto_resize)


def _flux1_mask(mask: mx.array) -> mx.array:
    # diffusers FluxKontextInpaintPipeline: nearest at latent resolution, every channel
    return pack_latent_mask(mask, channels=16)


def _flux1_memory(configs: dict) -> dict:
    parts = {"transformer": (FluxConfig, FluxTransformer), "vae": (VAEConfig, AutoencoderKL),
             "text_encoder": (CLIPTextConfig, CLIPTextModel),
             "text_encoder_2": (T5Config, T5Encoder)}
    return {name: model(_config(cls, configs.get(name))) for name, (cls, model) in parts.items()}


def _config(cls, value):
    """A config dataclass from None (its defaults), a dict (config.json) or itself."""
    if value is None:
        return cls()
    return value if isinstance(value, cls) else cls.from_dict(dict(value))


FLUX1 = Family(
    name="flux1", title="FLUX.1", id_axes=3,
    read_transformer_config=flux_weights.read_transformer_config,
    load_transformer=flux_weights.load_transformer,
    read_vae_config=vae_weights.read_vae_config, load_vae=vae_weights.load_vae,
    text=ClipT5Text, to_tokens=_flux1_to_tokens, from_tokens=_flux1_from_tokens,
    token_mask=_flux1_mask, reference_tokens=_flux1_references,
    reference_size=kontext_reference_size,
    mu=lambda image_seq_len, steps, cfg: compute_mu(image_seq_len, cfg),
    memory_parts=_flux1_memory,
    activation_width=(3, 1),  # linear1: q, k, v + the GELU MLP's input (mlp_hidden)
    quantized={c: c for c in QUANTIZED_BY_DEFAULT},  # the transformer and T5
)


# ------------------------------------------------------------------ FLUX.2


def _flux2_to_tokens(vae, z: mx.array) -> mx.array:
    bn = vae.bn  # diffusers Flux2KleinPipeline._encode_vae_image: patchify, batch norm, pack
    return latents_flux2.tokens_from_latents(z, bn.running_mean, bn.running_var, bn.eps)


def _flux2_from_tokens(vae, tokens: mx.array, width: int, height: int) -> mx.array:
    h, w = token_grid(height, width)  # tokens in grid order: unpacking is a reshape
    x = tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1])
    bn = vae.bn
    return latents_flux2.unpatchify_latents(
        latents_flux2.denormalize_latents(x, bn.running_mean, bn.running_var, bn.eps))


def _flux2_config(path, expect_in_channels=None):
    """(Flux2Config, stored bits) without weights (`expect_in_channels` is FLUX.1's
    variant check: a FLUX.2 folder names its pipeline)."""
    ckpt = loader.open_checkpoint("flux2_transformer", path)
    record = read_record(ckpt.stored, ckpt.name)
    return ckpt.config, record["bits"] if record else None


def _flux2_load(path, dtype, expect_in_channels=None, quantize=None):
    return flux2_weights.load_flux2_transformer(path, dtype, quantize=quantize)


def _flux2_memory(configs: dict) -> dict:
    return {"transformer": Flux2Transformer(_config(Flux2Config, configs.get("transformer"))),
            "vae": AutoencoderKL(_config(VAEConfig, configs.get("vae") or VAEConfig.flux2())),
            "text_encoder": Qwen3TextEncoder(_config(Qwen3Config, configs.get("text_encoder")))}


FLUX2 = Family(
    name="flux2", title="FLUX.2", id_axes=4,
    read_transformer_config=_flux2_config, load_transformer=_flux2_load,
    read_vae_config=vae_weights.read_vae_config, load_vae=vae_weights.load_vae,
    text=Qwen3Text, to_tokens=_flux2_to_tokens, from_tokens=_flux2_from_tokens,
    token_mask=klein.token_mask, reference_tokens=klein.klein_tokens,
    reference_size=klein.reference_size,
    mu=lambda image_seq_len, steps, cfg: empirical_mu(image_seq_len, steps),
    memory_parts=_flux2_memory,
    activation_width=(3, 2),  # to_qkv_mlp_proj: q, k, v + SwiGLU's two halves (2 x mlp)
    quantized={"transformer": "transformer", "text_encoder": "qwen3"},
)

FAMILIES: dict[str, Family] = {f.name: f for f in (FLUX1, FLUX2)}


def get(name: str) -> Family:
    """The family `name` ("flux1", "flux2"); KeyError naming the known ones."""
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]
