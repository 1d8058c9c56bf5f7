"""Image prompts: IP-Adapter (XLabs) and FLUX.1 Redux, prepared before the denoise loop.

- Preprocessing with Pillow/numpy, the arithmetic of transformers' PIL image processors
  (CLIPImageProcessorPil / SiglipImageProcessorPil, image_processing_backends.PilBackend):
  CLIP: bicubic resize of the short side to S (long side truncated, as
  `get_resize_output_image_size`), center crop S x S, x/255 in float64 -> float32, then
  (x - mean) / std with the OpenAI CLIP mean/std; SigLIP: bicubic resize to S x S,
  (x/255 - 0.5) / 0.5. S comes from the vision tower's config (224 / 384).
- `prepare_ip_adapters(ctx, specs)`: CLIP `image_embeds` of each reference, projected
  and turned into per-block keys/values once (IPAdapterKV, the transformer's `ip=`).
- `prepare_redux(ctx, specs, embeds)`: SigLIP features -> Redux tokens, appended to the
  T5 tokens, each image's tokens multiplied by its strength (text ids stay zeros).
  `prior_redux_embeds` reproduces diffusers' FluxPriorReduxPipeline combination instead.
Vision towers and adapters are loaded, used and freed here; nothing stays in memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_edit.conditioning.context import ConditioningContext
from mlx_edit.imaging.images import InputError, load_image
from mlx_edit.models.layers import IPAdapterKV
from mlx_edit.sampling.denoise import PromptEmbeds

if TYPE_CHECKING:
    from mlx_edit.models.clip import CLIPVisionModel
    from mlx_edit.models.redux import SiglipVisionModel

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers OPENAI_CLIP_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # IMAGENET_STANDARD_MEAN / _STD


# ---------------------------------------------------------------- preprocessing


def _normalize(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    x = (np.asarray(img, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.array(mean, np.float32)) / np.array(std, np.float32)


def clip_preprocess(image: Image.Image, size: int = 224) -> np.ndarray:
    """RGB PIL image -> CLIP pixels (size, size, 3) float32, NHWC without the batch axis.

    Equals transformers' `CLIPImageProcessor(size=size, crop_size=size)` pixel_values
    (PIL backend) transposed to HWC, bit for bit.
    """
    image = image.convert("RGB")
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    new = (size, new_long) if w <= h else (new_long, size)
    image = image.resize(new, Image.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return _normalize(image.crop((left, top, left + size, top + size)), CLIP_MEAN, CLIP_STD)


def siglip_preprocess(image: Image.Image, size: int = 384) -> np.ndarray:
    """RGB PIL image -> SigLIP pixels (size, size, 3) float32 (aspect ratio not kept).

    Equals transformers' `SiglipImageProcessor(size={"height": size, "width": size})`
    pixel_values (PIL backend) transposed to HWC, bit for bit.
    """
    image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    return _normalize(image, SIGLIP_MEAN, SIGLIP_STD)


def clip_image_embeds(model: CLIPVisionModel, images: Sequence[Image.Image]) -> mx.array:
    """CLIP `image_embeds` (n, projection_dim) of PIL images, one batched forward."""
    size = model.config.image_size
    pixels = np.stack([clip_preprocess(im, size) for im in images])
    return model(mx.array(pixels))


def siglip_features(model: SiglipVisionModel, images: Sequence[Image.Image]) -> mx.array:
    """SigLIP `last_hidden_state` (n, grid^2, hidden) of PIL images, one batched forward."""
    size = model.config.image_size
    pixels = np.stack([siglip_preprocess(im, size) for im in images])
    return model(mx.array(pixels))


# ---------------------------------------------------------------- specs


def _images(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass
class IPAdapterSpec:
    """One IP-Adapter and its reference image(s) for an edit.

    model: XLabs `.safetensors` file, a folder holding one, or a repo id
      (XLabs-AI/flux-ip-adapter). image: path, PIL or uint8 (H, W, 3), or a list of them
      (their tokens are concatenated, diffusers' several-images-per-adapter rule).
    scale: one float, or one per double block (19 for FLUX.1); 0 disables a block.
    image_encoder: the CLIP vision tower (folder, file or repo id); default:
      `image_encoder/` beside the adapter, or openai/clip-vit-large-patch14 for repo ids.
    """

    model: str | Path
    image: Any
    scale: float | Sequence[float] = 1.0
    image_encoder: str | Path | None = None

    def validate(self) -> None:
        """Finite scales and at least one image (InputError, one line)."""
        scales = [self.scale] if isinstance(self.scale, (int, float)) else list(self.scale)
        if not scales or not all(isinstance(s, (int, float)) and math.isfinite(s)
                                 for s in scales):
            raise InputError(f"--ip-scale must be finite numbers, got {self.scale!r}")
        if not _images(self.image):
            raise InputError(f"IP-Adapter {self.model}: no reference image (--ip-image)")


@dataclass
class ReduxSpec:
    """One Redux reference image for an edit.

    model: a FLUX.1-Redux-dev folder, an embedder file or a repo id.
    image: path, PIL or uint8 (H, W, 3). strength: multiplies this image's tokens (>= 0;
    1 = as trained, 0 = no effect). image_encoder: the SigLIP tower; default
    `image_encoder/` in the Redux folder, or google/siglip-so400m-patch14-384 for repo ids.
    """

    model: str | Path
    image: Any
    strength: float = 1.0
    image_encoder: str | Path | None = None

    def validate(self) -> None:
        if not (isinstance(self.strength, (int, float)) and math.isfinite(self.strength)
                and self.strength >= 0):
            raise InputError(f"--redux-strength must be a finite number >= 0, "
                             f"got {self.strength!r}")


def _free() -> None:
    mx.clear_cache()


# ---------------------------------------------------------------- IP-Adapter


def _check_ip_compatible(adapter, ctx: ConditioningContext, spec: IPAdapterSpec,
                         embed_dim: int) -> None:
    a, t = adapter.config, ctx.transformer
    want = (t.hidden_size, t.joint_attention_dim, t.num_layers)
    have = (a.hidden_size, a.cross_attention_dim, a.num_layers)
    if have != want:
        raise InputError(
            f"IP-Adapter {spec.model} is for a transformer with hidden {have[0]}, text width "
            f"{have[1]}, {have[2]} double blocks; this one has {want[0]}, {want[1]}, {want[2]}"
        )
    if a.image_embed_dim != embed_dim:
        raise InputError(f"IP-Adapter {spec.model} takes {a.image_embed_dim}-d image "
                         f"embeddings; its CLIP vision tower gives {embed_dim}-d")


def prepare_ip_adapters(ctx: ConditioningContext, specs: Sequence[IPAdapterSpec]
                        ) -> list[IPAdapterKV]:
    """IPAdapterKV per spec for the transformer's `ip=` argument (EditJob.ip).

    Each CLIP vision tower is loaded once, encodes every reference image that uses it
    and is freed; each adapter file likewise computes the keys/values of every spec that
    names it (for ctx.batch_size, the latents' batch, e.g. num_images) and is freed.
    Raises InputError (unreadable image, bad scale, adapter not made for this
    transformer) and WeightLoadError (missing or damaged adapter / vision tower, failed
    download). Images are read first, so a bad path fails before any model loads.
    """
    from mlx_edit.weights.vision import load_clip_vision, load_ip_adapter, resolve_ip_adapter

    for spec in specs:
        spec.validate()
    images = [[load_image(im) for im in _images(s.image)] for s in specs]
    paths = [resolve_ip_adapter(s.model, s.image_encoder) for s in specs]
    embeds: list[mx.array | None] = [None] * len(specs)
    for encoder in dict.fromkeys(p[1] for p in paths):
        clip = load_clip_vision(encoder, ctx.dtype)
        for i, (_, enc) in enumerate(paths):
            if enc == encoder:
                embeds[i] = clip_image_embeds(clip, images[i])
                mx.eval(embeds[i])
        del clip
        _free()
    out: list[IPAdapterKV | None] = [None] * len(specs)
    heads = ctx.transformer.num_attention_heads
    for adapter_path in dict.fromkeys(p[0] for p in paths):
        adapter = load_ip_adapter(adapter_path, ctx.dtype)
        for i, spec in enumerate(specs):
            if paths[i][0] != adapter_path:
                continue
            _check_ip_compatible(adapter, ctx, spec, embeds[i].shape[-1])
            try:
                out[i] = adapter.kv(embeds[i], spec.scale, heads, ctx.batch_size)
            except ValueError as e:
                raise InputError(str(e)) from None
            mx.eval(out[i].k, out[i].v)
        del adapter
        _free()
    return out


# ---------------------------------------------------------------- Redux


def append_redux_tokens(txt: mx.array, tokens: Sequence[mx.array],
                        strengths: Sequence[float]) -> mx.array:
    """[txt, s_1 * tokens_1, s_2 * tokens_2, ...] along the sequence axis.

    txt (1, L, D); tokens[i] (1, N_i, D). For one image at strength 1 this is exactly
    diffusers' FluxPriorReduxPipeline output (cat(T5, Redux)); for several images it keeps
    each image's tokens (as ComfyUI's StyleModelApply and BFL's prepare_redux do) rather
    than summing them.
    """
    parts = [txt] + [t.astype(txt.dtype) * s for t, s in zip(tokens, strengths, strict=True)]
    return mx.concatenate(parts, axis=1)


def prior_redux_embeds(txt: mx.array, pooled: mx.array, tokens: Sequence[mx.array],
                       prompt_scales: Sequence[float], pooled_scales: Sequence[float]
                       ) -> tuple[mx.array, mx.array]:
    """diffusers FluxPriorReduxPipeline's combination, for compatibility.

    sum_i prompt_scales[i] * cat(txt, tokens_i) -> (1, L + N, D) and
    sum_i pooled_scales[i] * pooled -> (1, P): several images are summed token by token,
    and the text is scaled by the sum of the scales (pipeline_flux_prior_redux.py).
    """
    if not len(tokens) == len(prompt_scales) == len(pooled_scales):
        raise ValueError("one prompt scale and one pooled scale per image")
    seq = sum(mx.concatenate([txt, t.astype(txt.dtype)], axis=1) * s
              for t, s in zip(tokens, prompt_scales))
    return seq, pooled * sum(pooled_scales)


def redux_tokens(ctx: ConditioningContext, specs: Sequence[ReduxSpec]) -> list[mx.array]:
    """Redux tokens (1, grid^2, joint_attention_dim) per spec (loaded, used, freed)."""
    from mlx_edit.weights.vision import load_redux_embedder, load_siglip_vision, resolve_redux

    for spec in specs:
        spec.validate()
    images = [load_image(s.image) for s in specs]
    paths = [resolve_redux(s.model, s.image_encoder) for s in specs]
    feats: list[mx.array | None] = [None] * len(specs)
    for encoder in dict.fromkeys(p[1] for p in paths):
        siglip = load_siglip_vision(encoder, ctx.dtype)
        idx = [i for i, p in enumerate(paths) if p[1] == encoder]
        out = siglip_features(siglip, [images[i] for i in idx])
        mx.eval(out)
        for j, i in enumerate(idx):
            feats[i] = out[j : j + 1]
        del siglip
        _free()
    tokens: list[mx.array | None] = [None] * len(specs)
    width = ctx.transformer.joint_attention_dim
    for embedder_path in dict.fromkeys(p[0] for p in paths):
        embedder = load_redux_embedder(embedder_path, ctx.dtype)
        c = embedder.config
        if c.txt_in_features != width:
            raise InputError(f"Redux {embedder_path} makes {c.txt_in_features}-d tokens; the "
                             f"transformer's text width is {width}")
        for i, p in enumerate(paths):
            if p[0] == embedder_path:
                if feats[i].shape[-1] != c.redux_dim:
                    raise InputError(f"Redux {embedder_path} takes {c.redux_dim}-d SigLIP "
                                     f"features; its vision tower gives {feats[i].shape[-1]}-d")
                tokens[i] = embedder(feats[i])
                mx.eval(tokens[i])
        del embedder
        _free()
    return tokens


def prepare_redux(ctx: ConditioningContext, specs: Sequence[ReduxSpec],
                  embeds: PromptEmbeds) -> PromptEmbeds:
    """`embeds` with each spec's Redux tokens appended to the T5 tokens (strength-scaled,
    see `append_redux_tokens`); the pooled CLIP vector is unchanged. Text ids for the
    new tokens are zeros like all text ids (the loop builds them from the length).

    Returns a new PromptEmbeds: txt (1, L + n x 729, D) for n images at so400m-384.
    Raises InputError (unreadable image, bad strength, Redux not made for this
    transformer) and WeightLoadError (missing or damaged files, failed download).
    """
    if not specs:
        return embeds
    tokens = redux_tokens(ctx, specs)
    txt = append_redux_tokens(embeds.txt, tokens, [s.strength for s in specs])
    mx.eval(txt)
    return dataclasses.replace(embeds, txt=txt)
