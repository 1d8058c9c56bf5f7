"""FluxPipeline: what every FLUX edit shares, on MLX.

encode prompt (then free the text encoders) -> plan the canvas -> conditioning prepared
before the loop (mlx_edit.conditioning: channels, sequence tokens, hooks) -> the one
denoise loop (a generator, mlx_edit.sampling.denoise) -> decode -> paste back / stitch.
The edits are subclasses: FluxFill (mlx_edit.fill: inpaint, outpaint, restyle) and
FluxKontext (mlx_edit.kontext: edit). Numerics follow diffusers' Flux pipelines
(pipelines/flux/), except that images are encoded with the VAE posterior mode (BFL's
choice, and deterministic) instead of a sample.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_edit import __version__, variants
from mlx_edit.components import Components, limit_cache
from mlx_edit.conditioning.bfl_control import BFL_CANNY, bfl_conditioner  # noqa: F401
from mlx_edit.conditioning.context import Conditioner, ConditioningContext
from mlx_edit.conditioning.controlnet import ControlNetSpec, prepare_controls  # noqa: F401
from mlx_edit.conditioning.fill import fill_conditioner
from mlx_edit.conditioning.image_prompts import (  # noqa: F401  (specs: public names)
    IPAdapterSpec,
    ReduxSpec,
    prepare_ip_adapters,
    prepare_redux,
)
from mlx_edit.conditioning.kontext import kontext_tokens
from mlx_edit.imaging import masks
from mlx_edit.options import (  # noqa: F401  (DEFAULT_* re-exported: public names)
    CONTROL_GUIDANCE,
    DEFAULT_FEATHER,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    OUTPAINT_OVERLAP,
    EditOptions,
    check_canvas,
    check_prompt,
)
from mlx_edit.sampling.cache import CacheConfig, cache_metadata
from mlx_edit.imaging.images import InputError, from_array, load_mask, to_array
from mlx_edit.imaging.stitch import CropPlan, crop_for_model, plan_crop, stitch_back
from mlx_edit.memory import MemoryEstimate, check_fits, estimate, tile_threshold_gb
from mlx_edit.models.flux import FluxConfig, FluxTransformer
from mlx_edit.models.layers import IPAdapterKV
from mlx_edit.models.vae import AutoencoderKL, VAEConfig
from mlx_edit.sampling.denoise import EditJob, Phase, PromptEmbeds, denoise, initial_noise
from mlx_edit.sampling.denoise import keep_source as keep_source_hook
from mlx_edit.sampling.latents import (
    image_ids,
    pack_latent_mask,
    pack_latents,
    scale_latents,
    token_grid,
    unpack_latents,
    unscale_latents,
)
from mlx_edit.sampling.sampler import flux_sigmas, noise_latents
from mlx_edit.sampling.soft_mask import soft_mask_hook, token_strength
from mlx_edit.tiling import decode_auto, encode_auto
from mlx_edit.weights.core import check_headers, default_dtype, read_config
from mlx_edit.weights.flux import load_transformer, read_transformer_config
from mlx_edit.weights import lora as lora_files
from mlx_edit.weights.sources import COMPONENTS, DEFAULT_MODEL, component_dir, resolve
from mlx_edit.weights.text import load_clip_text, load_t5, load_text_tools
from mlx_edit.weights.vae import load_vae, read_vae_config

PROMPT_CACHE_SIZE = 4  # prompt embeddings kept per pipeline (T5 1x512x4096 bf16: 4 MB)
MODEL_PIXELS = 1024 * 1024  # the model-friendly canvas area for crop-to-mask


def _tokens(plan: CropPlan) -> int:
    """Packed image tokens of the plan's model canvas."""
    w, h = plan.model_size
    h_tok, w_tok = token_grid(h, w)
    return h_tok * w_tok


class FluxPipeline:
    """What every FLUX edit shares: models on demand, prompt encoding, planning,
    conditioning, the one denoise loop and decoding. Edits live in subclasses
    (`FluxFill`, `FluxKontext`), which name the variants they load (mlx_edit.variants).

    The text encoders are loaded for each new prompt and freed right after encoding
    (prompt embeddings are cached), so they never sit in memory during denoising. The
    transformer and VAE (`components`) stay loaded, or with `low_memory` are loaded for
    the phase that needs them and freed after it (mlx_edit.components).
    """

    VARIANTS: tuple[str, ...] = ("fill", "control")  # names in mlx_edit.variants.VARIANTS

    def __init__(self, root: Path, dtype: mx.Dtype, source: str, transformer: Path, *,
                 quantize: int | None = None, low_memory: bool = False):
        """Use `from_pretrained`. transformer: the transformer's folder or BFL file. Reads
        configs and tokenizers only; the models load through `components`."""
        self.root, self.dtype, self.source = root, dtype, source
        self.quantize = quantize  # bits for the transformer, T5 and ControlNets, or None
        self.low_memory = low_memory
        kinds, vae_dir = variants.accepted_in_channels(*self.VARIANTS), component_dir(root, "vae")
        index = root / "model_index.json"
        self.pipeline_class = read_config(root, index.name).get("_class_name") \
            if index.is_file() else None
        # Configs come from config.json / tensor headers: no weights needed to plan an edit.
        t_config, stored_bits = read_transformer_config(transformer, expect_in_channels=kinds)
        self.transformer_bits = stored_bits or quantize  # what the loaded transformer has
        self.components = Components(
            {"transformer": partial(load_transformer, transformer, dtype,
                                    expect_in_channels=kinds, quantize=quantize),
             "vae": partial(load_vae, vae_dir, dtype)},
            {"transformer": t_config, "vae": read_vae_config(vae_dir)}, keep=not low_memory)
        # damaged tokenizer/scheduler files fail here, as one WeightLoadError
        self.scheduler_config, self.clip_tokenizer, self.t5_tokenizer = load_text_tools(root)
        for part in (transformer, vae_dir, *(component_dir(root, name)
                                            for name in ("text_encoder", "text_encoder_2"))):
            check_headers(part)  # damaged files fail at load time, not mid-edit
        self._prompt_cache: dict[tuple, PromptEmbeds] = {}
        self.disk_prompt_cache = None  # a mlx_edit.prompt_cache.PromptCache, or None
        self.tile_threshold_gb = tile_threshold_gb()  # VAE tiling above this (GB)
        self.load_stats: dict = {}
        self.last_stats: dict = {}  # phase timings (s) and peak memory (GB) of the last run
        self.loras: dict[str, lora_files.LoadedLoRA] = {}  # applied on every transformer load

    @classmethod
    def from_pretrained(
        cls,
        repo_or_path: str | Path = DEFAULT_MODEL,
        dtype: mx.Dtype | None = None,
        quantize: int | None = None,
        *,
        transformer: str | Path | None = None,
        low_memory: bool = False,
    ) -> FluxPipeline:
        """Load from a Hugging Face repo id (downloads only the needed components), a
        local diffusers folder, or an mlx-edit folder made by `mlx-edit convert`.

        The transformer is FLUX.1 Fill (inpaint, outpaint) or FLUX.1 Canny/Depth-dev
        (restyle); see `variant`.
        dtype: None -> bfloat16 on GPU, float32 on the CPU backend. quantize: 4 or 8 to
        quantize the transformer, T5 and the ControlNets an edit loads (mlx_edit.weights.quantize),
        layer by layer as they load (full precision is never resident as a whole).
        transformer: a BFL single file (`flux1-fill-dev.safetensors`, ComfyUI prefix or
        not) or folder to use instead of `repo_or_path`'s transformer/ (which is then
        not downloaded).
        low_memory: load nothing now; each edit loads the VAE for encoding, then the
        transformer for denoising, then the VAE again for decoding, freeing each after
        its phase, so only one model is resident at a time (peak: memory.estimate's
        `peak_low_memory`; cost: the weights are read again for every edit). It also caps
        MLX's buffer cache for the whole process (`mlx_edit.components.limit_cache`,
        256 MB; not restored).
        Raises WeightLoadError (missing component, wrong model kind, damaged files; with
        low_memory damaged tensors are found when the edit first loads them).
        """
        stats: dict = {}
        with Phase(stats, "load"):
            components = [c for c in COMPONENTS if not (transformer and c == "transformer")]
            root = resolve(repo_or_path, components)
            pipe = cls(root, dtype or default_dtype(), str(repo_or_path),
                       Path(transformer or component_dir(root, "transformer")),
                       quantize=quantize, low_memory=low_memory)
            if low_memory:
                limit_cache()
            else:  # load both now; they stay
                for name in ("transformer", "vae"):
                    pipe.components.get(name)
        pipe.load_stats = stats
        return pipe

    @property
    def transformer(self) -> FluxTransformer:
        """The FLUX transformer, loaded if not resident (with low_memory it is freed when
        the phase using it ends or the next edit starts; `transformer_config` needs no
        weights)."""
        model = self.components.get("transformer")
        lora_files.sync(model, self.loras)  # (re)loaded models get the current LoRAs
        return model

    @property
    def vae(self) -> AutoencoderKL:
        """The VAE, loaded if not resident (freed like `transformer`; `vae_config` needs no
        weights)."""
        return self.components.get("vae")

    @property
    def transformer_config(self) -> FluxConfig:
        """The transformer's config, known without loading its weights."""
        return self.components.config("transformer")

    @property
    def vae_config(self) -> VAEConfig:
        """The VAE's config, known without loading its weights."""
        return self.components.config("vae")

    @property
    def variant_info(self) -> variants.Variant:
        """The loaded transformer's variant (mlx_edit.variants), known without weights."""
        cfg = self.transformer_config
        found = variants.identify(cfg.in_channels, cfg.guidance_embeds, self.pipeline_class)
        ours = [variants.VARIANTS[n] for n in self.VARIANTS]
        same_width = [v for v in ours if v.in_channels == cfg.in_channels]
        if found not in ours and same_width:  # e.g. a BFL Kontext file: no model_index
            return same_width[0]
        return found or variants.Variant("unknown", variants.describe(cfg.in_channels), "",
                                         cfg.in_channels, cfg.guidance_embeds, 0, 0.0,
                                         "none", ())

    @property
    def variant(self) -> str:
        """The variant's name: 'fill' (FLUX.1 Fill, in_channels 384), 'control' (FLUX.1
        Canny/Depth-dev, 128), 'kontext' (64), ... (mlx_edit.variants)."""
        return self.variant_info.name

    def _require(self, edit: str) -> None:
        """InputError unless the loaded transformer is the variant serving `edit`."""
        want = variants.for_edit(edit)
        if self.variant != want.name:
            raise InputError(f"{edit} needs a {want.title} model ({want.repo}); "
                             f"{self.source} is {self.variant_info.title}")

    def user_mask(self, image: Image.Image, mask, segment_model: str | None = None
                  ) -> np.ndarray:
        """The edit mask (H, W) float32 in [0, 1] of `image`: `mask` as a path, PIL or array
        (resized with a warning when its size differs), or `segment.Points` / `segment.Box`
        prompts (one or a list), segmented first with SAM 2.1 (`segment_model`, default the
        model folder's `segmenter/` when present, else facebook/sam2.1-hiera-large) and
        freed before anything else loads. Raises InputError (bad mask or prompt) and
        WeightLoadError (segmenter)."""
        from mlx_edit.segment import Box, Points

        prompts = mask if isinstance(mask, (list, tuple)) else [mask]
        if not (prompts and all(isinstance(p, (Points, Box)) for p in prompts)):
            return load_mask(mask, image.size)
        from mlx_edit.segment import DEFAULT_SEGMENTER, mask_from_prompts, prompts_from_specs

        own = self.root / "segmenter"
        model = segment_model or (own if own.is_dir() else DEFAULT_SEGMENTER)
        return mask_from_prompts(image, **prompts_from_specs(prompts), model=model
                                 ).astype(np.float32)

    # ------------------------------------------------------------------ LoRA

    def load_lora(self, source: str | Path, scale: float = 1.0, name: str | None = None,
                  *, weight_name: str | None = None) -> str:
        """Apply a FLUX LoRA (any format diffusers reads; mlx_edit.weights.lora) unfused,
        on float or quantized transformers, summed with those already loaded.

        source: a .safetensors file, a Hugging Face repo id (`owner/name`, with
        `weight_name` or as `owner/name:file.safetensors`). Returns the adapter's name
        (default: the file's stem). Raises WeightLoadError for unreadable files, keys
        that map to no layer (named) and layers the model lacks, InputError for a name
        in use; on error nothing is applied.
        """
        if name in self.loras:
            raise InputError(f"a LoRA named {name!r} is already loaded: unload it first")
        lora = lora_files.load_lora_file(source, weight_name)
        name = name or lora_files.default_name(source, self.loras)
        # Check against the model's structure (lazy, no weights) before recording it.
        lora.updates(FluxTransformer(self.transformer_config))
        self.loras[name] = lora_files.LoadedLoRA(lora, str(source), float(scale))
        if "transformer" in self.components.resident:
            try:
                self.transformer  # noqa: B018  (applies it now)
            except Exception:
                del self.loras[name]
                raise
        return name

    def set_lora_scales(self, scales: dict[str, float]) -> None:
        """Change loaded LoRAs' strengths by name, without reloading (InputError for
        unknown names)."""
        unknown = sorted(set(scales) - set(self.loras))
        if unknown:
            raise InputError(f"no LoRA named {', '.join(unknown)} is loaded "
                             f"(loaded: {', '.join(self.loras) or 'none'})")
        for n, value in scales.items():
            self.loras[n].scale = float(value)

    def unload_loras(self, names: Sequence[str] | None = None) -> None:
        """Remove LoRAs by name (all when None); the base transformer is restored exactly."""
        for n in list(self.loras) if names is None else names:
            self.loras.pop(n, None)
        if "transformer" in self.components.resident:
            self.transformer  # noqa: B018  (removes them now)

    def edit_masks(self, user_mask: np.ndarray, o: EditOptions
                   ) -> tuple[np.ndarray, np.ndarray]:
        """(model mask, paste-back blend) of a user mask with the options' grow/feather;
        with a soft mask everything it touches (> 0) is pasted back."""
        model_mask, blend = masks.edit_masks(user_mask, o.grow_mask, o.feather)
        if o.soft_mask:
            blend = masks.blend_mask((user_mask > 0).astype(np.float32), o.grow_mask,
                                     o.feather)
        return model_mask, blend

    def paste_back_options(self, job: EditJob, o: EditOptions, image: Image.Image,
                           user_mask: np.ndarray) -> None:
        """Set `job`'s paste-back (colour match, feather/Poisson: imaging.blend) and, with
        `o.soft_mask`, its differential-diffusion hook (sampling.soft_mask): the canvas's
        source latents (prepare's when it encoded them), the job's initial noise,
        per-token strengths of the mask."""
        job.paste = {"color_match": o.color_match, "method": o.blend}
        job.metadata.update(color_match=o.color_match, blend=o.blend, soft_mask=o.soft_mask)
        if not o.soft_mask:
            return
        canvas, m = crop_for_model(image, user_mask, job.plan, binarize=False)
        if job.source is None:  # prepare encoded the same canvas when it needed it
            with self.components.using("vae", job.stats):
                job.source = self.encode_image(to_array(canvas))
                mx.eval(job.source)
        job.hook = soft_mask_hook(job.source.astype(self.dtype), job.noise,
                                  token_strength(m), job.sigmas)
        job.after_step = None  # the soft mask holds the source itself (Kontext with a mask)

    # ------------------------------------------------------------------ text

    def encode_prompt(
        self, prompt: str, prompt_2: str | None = None, max_sequence_length: int = 512
    ) -> PromptEmbeds:
        """CLIP pooled from `prompt`, T5 sequence from `prompt_2 or prompt` (as diffusers).

        Raises InputError when the T5 prompt exceeds max_sequence_length tokens (a CLIP
        prompt over 77 tokens is truncated with a PromptTruncatedWarning, as CLIP only
        gives the pooled summary).
        """
        key = (prompt, prompt_2, max_sequence_length)
        if key in self._prompt_cache:
            return self._prompt_cache[key]
        if not 1 <= max_sequence_length <= 512:
            raise InputError(f"max_sequence_length must be 1..512, got {max_sequence_length}")
        t5_prompt = prompt_2 if prompt_2 is not None else prompt
        n = self.t5_tokenizer.count_tokens(t5_prompt)
        if n > max_sequence_length:
            raise InputError(
                f"prompt is {n} T5 tokens, over the limit of {max_sequence_length}: "
                "shorten it (or raise --max-sequence-length, at most 512)"
            )
        disk, disk_key, embeds = self.disk_prompt_cache, None, None
        if disk is not None:  # on disk: the text encoders are not loaded at all on a hit
            encoders = [component_dir(self.root, c) for c in ("text_encoder", "text_encoder_2")]
            disk_key = disk.key(encoders, self.dtype, self.quantize, prompt, t5_prompt,
                                max_sequence_length)
            embeds = disk.get(disk_key)
        if embeds is None:
            embeds = self._encode_text(prompt, t5_prompt, max_sequence_length)
            if disk is not None:
                disk.put(disk_key, embeds)
        self._prompt_cache[key] = embeds  # small: a few prompts (e.g. a negative) kept
        while len(self._prompt_cache) > PROMPT_CACHE_SIZE:
            self._prompt_cache.pop(next(iter(self._prompt_cache)))
        return embeds

    def _encode_text(self, prompt: str, t5_prompt: str, max_sequence_length: int
                     ) -> PromptEmbeds:
        """Load CLIP, encode, free it; load T5, encode, free it (one model resident)."""
        clip = load_clip_text(component_dir(self.root, "text_encoder"), self.dtype)
        pooled = clip(mx.array(self.clip_tokenizer(prompt)))[1]  # no lazy ref to CLIP kept
        mx.eval(pooled)
        del clip
        mx.clear_cache()
        t5 = load_t5(component_dir(self.root, "text_encoder_2"), self.dtype, self.quantize)
        txt = t5(mx.array(self.t5_tokenizer(t5_prompt, max_length=max_sequence_length)))
        mx.eval(txt)
        del t5
        mx.clear_cache()
        return PromptEmbeds(txt.astype(self.dtype), pooled.astype(self.dtype))

    # ------------------------------------------------------------------ preparation

    def memory_estimate(self, width: int, height: int, num_images: int = 1,
                        cache: CacheConfig | None = None) -> MemoryEstimate:
        """Estimated peak memory (GB, mlx_edit.memory) of an edit on a width x height canvas
        with this pipeline's models, dtype and quantization (and step cache)."""
        return estimate(
            width, height, num_images, self.dtype, self.transformer_bits, cache=cache,
            transformer=self.transformer_config, vae=self.vae_config,
            clip=read_config(component_dir(self.root, "text_encoder")),
            t5=read_config(component_dir(self.root, "text_encoder_2")),
            lora_params=sum(x.file.parameter_count for x in self.loras.values()),
        )

    def encode_image(self, pixels: np.ndarray) -> mx.array:
        """(H, W, 3) in [-1, 1] -> scaled, packed latents (1, N, 64) (posterior mode).

        Large images go through overlapping VAE tiles (mlx_edit.tiling) so activations
        stay within a few GB."""
        cfg = self.vae.config
        z = encode_auto(self.vae, mx.array(pixels)[None].astype(self.vae.dtype),
                        threshold_gb=self.tile_threshold_gb)
        return pack_latents(scale_latents(z, cfg.scaling_factor, cfg.shift_factor))

    def context(self, plan: CropPlan, inner: tuple[int, int, int, int] | None = None
                ) -> ConditioningContext:
        """What conditioners see of an edit planned as `plan` (mlx_edit.conditioning)."""
        return ConditioningContext(self.dtype, self.quantize, self.transformer_config,
                                   self.vae_config, self.encode_image, plan, inner)

    def job_context(self, job: EditJob) -> ConditioningContext:
        """The conditioning context of a prepared `job` (e.g. to add ControlNet hooks by
        hand: `job.controls = prepare_controls(pipe.job_context(job), specs)[0]`)."""
        inner = None
        if job.metadata.get("mode") == "outpaint":
            left, right, top, bottom = job.metadata["expand"]
            w, h = job.original.size
            inner = (left, top, w - right, h - bottom)
        return self.context(job.plan, inner).for_loop(
            job.embeds, job.guidance, len(job.sigmas) - 1, job.latents.shape[0])

    def plan(self, image: Image.Image, model_mask: np.ndarray, blend: np.ndarray,
             crop_to_mask: bool | None, num_images: int = 1, plan: CropPlan | None = None,
             cache: CacheConfig | None = None) -> tuple[CropPlan, Image.Image, np.ndarray]:
        """(crop plan, model canvas, binary model mask at the canvas size) of an edit,
        its memory checked (`plan` given: used as it is). Raises InputError (mask empty at
        the model's resolution, or an edit that would not fit in memory: the message lists
        options that do)."""
        if plan is None:
            target = MODEL_PIXELS if crop_to_mask is not False else None
            plan = plan_crop(image.size, blend, target, crop=crop_to_mask)
        check_fits(self.memory_estimate(*plan.model_size, num_images, cache),
                   low_memory=self.low_memory)
        canvas, mask = crop_for_model(image, model_mask, plan)
        if not mask.any():
            raise InputError(
                "the mask covers no pixel at the model's resolution: paint a larger area "
                "or use --grow-mask"
            )
        return plan, canvas, mask

    def prepare(
        self,
        image: Image.Image,
        model_mask: np.ndarray,
        blend: np.ndarray,
        prompt: str,
        options: EditOptions | None = None,
        *,
        noise: mx.array | None = None,
        metadata: dict | None = None,
        conditioning: Conditioner | None = None,
        references: Sequence[Image.Image] = (),
        reference_resize: bool = True,
        inner: tuple[int, int, int, int] | None = None,
        plan: CropPlan | None = None,
        keep_source: bool = False,
        **overrides,
    ) -> EditJob:
        """Build an EditJob for a canvas `image`, its binary model mask and blend weights.

        options: EditOptions (or its fields as keyword `overrides`), checked here
        (InputError): steps, guidance, seed(s), strength, the image prompts (ip_adapters,
        redux: mlx_edit.conditioning.image_prompts), ControlNets (controlnets, aligned to
        the canvas), true CFG (negative_prompt, true_cfg_scale > 1: two passes per step).
        conditioning: the Conditioner of the transformer's extra input channels (None:
        the variant's own: Fill's masked image + mask; `conditioning.bfl_control.
        bfl_conditioner` for Canny/Depth-dev; none for Kontext). references: Kontext
        reference images (conditioning.kontext), appended as sequence tokens (resized to
        the preferred Kontext resolution unless reference_resize is False).
        noise: optional packed initial noise (num_images, N, 64) (parity tests inject it).
        inner: for an outpaint, the original's box on the canvas (ControlNet alignment).
        plan: a crop plan to use instead of planning one (Kontext: the preferred size).
        keep_source: after every step, latents outside the model mask are the source's
        re-noised to the next sigma (`denoise.keep_source`; Kontext with a mask).
        Raises InputError (bad options, empty mask, memory, channel mismatch).
        """
        o = EditOptions.of(options, overrides)
        prompt = check_prompt(prompt)
        plan, canvas, mask = self.plan(image, model_mask, blend, o.crop_to_mask,
                                       o.num_images, plan, o.cache)
        stats: dict = {}
        embeds, negative, ip, ctx = self._prompts(prompt, o, plan, inner, stats)
        with self.components.using("vae", stats), Phase(stats, "vae_encode"):
            pixels = to_array(canvas)
            channels = self._channels(ctx, conditioning, pixels, mask)
            tokens, token_ids = kontext_tokens(ctx, references, reference_resize) \
                if references else (None, None)
            image_latents = self.encode_image(pixels) \
                if o.strength < 1.0 or keep_source else None
            mx.eval(channels, tokens, image_latents)
        sigmas = flux_sigmas(ctx.num_steps, _tokens(plan), self.scheduler_config, o.strength)
        noise, latents = self._start(o, plan, ctx, noise, image_latents, float(sigmas[0]))
        meta = {"prompt": prompt, **self._metadata(o, plan, negative is not None, metadata)}
        job = EditJob(image, plan, blend, latents, channels, embeds, ctx.guidance, sigmas,
                      o.seeds, meta, ip=ip, tokens=tokens, token_ids=token_ids, noise=noise,
                      source=image_latents, negative=negative,
                      true_cfg_scale=o.true_cfg_scale, stats=stats, cache=o.cache)
        self._attach_hooks(job, ctx, o, mask if keep_source else None)
        return job

    def _start(self, o: EditOptions, plan: CropPlan, ctx: ConditioningContext,
               noise: mx.array | None, image_latents: mx.array | None, sigma0: float
               ) -> tuple[mx.array, mx.array]:
        """(initial noise, starting latents) in the model dtype: noise drawn from the seeds
        unless given, mixed with the image's latents at sigma0 when strength < 1."""
        if noise is None:
            noise = initial_noise(o.seeds, (_tokens(plan), ctx.latent_channels), mx.float32)
        noise = noise.astype(self.dtype)
        if o.strength == 1.0:
            return noise, noise
        return noise, noise_latents(image_latents.astype(self.dtype), noise, sigma0)

    def _attach_hooks(self, job: EditJob, ctx: ConditioningContext, o: EditOptions,
                      keep_mask: np.ndarray | None) -> None:
        """The job's per-step hooks: the source kept outside `keep_mask` (binary, canvas
        size; None: not kept) and the ControlNets (their control images go through the
        VAE)."""
        if keep_mask is not None:
            job.after_step = keep_source_hook(pack_latent_mask(mx.array(keep_mask)[None]),
                                              job.source, job.noise, job.sigmas)
        if o.controlnets:
            with self.components.using("vae", job.stats):
                job.controls, control_meta = prepare_controls(ctx, list(o.controlnets))
            job.stats["control_prepare_s"] = control_meta.pop("control_prepare_s")
            job.metadata.update(control_meta)

    def _prompts(self, prompt: str, o: EditOptions, plan: CropPlan, inner, stats: dict):
        """(prompt embeddings (with Redux tokens), negative embeddings or None, IP-Adapter
        keys/values, the conditioning context for the loop) of an edit; the text encoders
        (and image-prompt models) are loaded, used and freed here."""
        self.components.release()  # low_memory: nothing but the text encoders while encoding
        with Phase(stats, "text_encode"):
            embeds = self.encode_prompt(prompt, o.prompt_2, o.max_sequence_length)
            negative = None
            if o.negative_prompt is not None and o.true_cfg_scale > 1.0:
                negative = self.encode_prompt(o.negative_prompt, None, o.max_sequence_length)
        loop = (o.effective_guidance, o.effective_steps, o.num_images)
        ctx = self.context(plan, inner).for_loop(embeds, *loop)
        ip: list[IPAdapterKV] = []
        if o.redux or o.ip_adapters:
            with Phase(stats, "image_prompts"):
                embeds = prepare_redux(ctx, o.redux, embeds) if o.redux else embeds
                ip = prepare_ip_adapters(ctx, o.ip_adapters) if o.ip_adapters else []
            ctx = ctx.for_loop(embeds, *loop)
        return embeds, negative, ip, ctx

    def _metadata(self, o: EditOptions, plan: CropPlan, cfg: bool, extra: dict | None
                  ) -> dict:
        """The parameters an output records (PNG text chunks): options, model, geometry."""
        return {
            "prompt_2": o.prompt_2, "steps": o.effective_steps,
            "guidance": o.effective_guidance,
            "strength": o.strength, "model": self.source, "mlx_edit_version": __version__,
            "model_size": list(plan.model_size), "crop_box": list(plan.box),
            "ip_adapters": [[str(a.model), a.scale] for a in o.ip_adapters] or None,
            "redux": [[str(r.model), r.strength] for r in o.redux] or None,
            "loras": [[n, x.source, x.scale] for n, x in self.loras.items()] or None,
            "negative_prompt": o.negative_prompt if cfg else None,
            "true_cfg_scale": o.true_cfg_scale if cfg else None,
            **(extra or {}),
        }

    def _channels(self, ctx: ConditioningContext, conditioner: Conditioner | None,
                  pixels: np.ndarray, mask: np.ndarray) -> mx.array | None:
        """The channel conditioning (1, N, K) of the edit, checked against the
        transformer's input width (None when the variant takes no extra channels)."""
        if conditioner is None and self.variant_info.conditioner == "fill":
            conditioner = fill_conditioner
        channels = conditioner(ctx, pixels, mask) if conditioner else None
        have = ctx.latent_channels + (0 if channels is None else channels.shape[-1])
        if have != ctx.transformer.in_channels:
            raise InputError(
                f"the conditioning has {have - ctx.latent_channels} channels but the "
                f"{self.variant_info.title} transformer takes "
                f"{ctx.transformer.in_channels - ctx.latent_channels}")
        return channels

    # ------------------------------------------------------------------ run

    def steps(self, job: EditJob) -> Iterator[tuple[int, mx.array]]:
        """Run the denoise loop for `job`, yielding (step, latents); keeps the last latents.

        With low_memory the transformer is loaded first (`load_transformer_s`) and freed
        when the loop ends or the generator is closed; after a completed loop the job's
        ControlNets are dropped too (decoding does not need them)."""
        w, h = job.plan.model_size
        ids = image_ids(*token_grid(h, w))
        with self.components.using("transformer", job.stats):
            t0 = time.perf_counter()
            mx.reset_peak_memory()
            for i, latents in denoise(self.transformer, job.latents, job.conditioning, ids,
                                      job.embeds, job.sigmas, job.guidance,
                                      controls=job.controls, ip=job.ip, tokens=job.tokens,
                                      token_ids=job.token_ids, after_step=job.after_step,
                                      negative=job.negative,
                                      true_cfg_scale=job.true_cfg_scale, hook=job.hook,
                                      cache=job.cache, stats=job.stats):
                job.latents = latents
                yield i, latents
            n = len(job.sigmas) - 1
            job.stats["denoise_s"] = time.perf_counter() - t0
            job.stats["step_s"] = job.stats["denoise_s"] / n
            job.stats["denoise_peak_gb"] = mx.get_peak_memory() / 1e9
            job.metadata.update(cache_metadata(job.cache, job.stats))
            if self.low_memory:
                job.controls = ()

    def decode(self, latents: mx.array, width: int, height: int) -> mx.array:
        """Packed latents (B, N, 64) -> images (B, H, W, 3) in [-1, 1] (float32)."""
        cfg = self.vae.config
        z = unscale_latents(unpack_latents(latents, height, width), cfg.scaling_factor,
                            cfg.shift_factor)
        return decode_auto(self.vae, z, threshold_gb=self.tile_threshold_gb).astype(mx.float32)

    def finish(self, job: EditJob, paste_back: bool = True) -> list[Image.Image]:
        """Decode the job's latents and map them back into the original image.

        With paste_back, pixels where the blend is 0 are the original's exactly; without
        it the whole model window replaces the original (outside the window it stays).
        Each returned image carries its metadata in `.info` (str values).
        """
        w, h = job.plan.model_size
        with self.components.using("vae", job.stats), Phase(job.stats, "vae_decode"):
            images = []
            for b in range(job.latents.shape[0]):  # one at a time: decode memory is large
                px = self.decode(job.latents[b : b + 1], w, h)
                mx.eval(px)
                images.append(from_array(np.array(px[0])))
        blend = job.blend
        if not paste_back:
            blend = np.zeros_like(job.blend)
            x0, y0, x1, y1 = job.plan.box
            blend[y0:y1, x0:x1] = 1.0
        out = []
        for seed, edited in zip(job.seeds, images):
            result = stitch_back(job.original, edited, job.plan, blend,
                                 **(job.paste if paste_back else {}))
            meta = {**job.metadata, "seed": seed, "paste_back": paste_back}
            result.info.update({k: str(v) for k, v in meta.items() if v is not None})
            out.append(result)
        return out

    def run(self, job: EditJob, paste_back: bool = True,
            progress: Callable[[int, int], None] | None = None) -> list[Image.Image]:
        """Denoise a prepared job to the end and finish it: `progress(step, total[, job])`."""
        total, with_job = len(job.sigmas) - 1, getattr(progress, "wants_job", False)
        for i, _ in self.steps(job):
            if progress is not None:  # `wants_job`: the job too (its latents: previews)
                progress(i + 1, total, *([job] if with_job else []))
        images = self.finish(job, paste_back)
        self.last_stats = {**self.load_stats, **job.stats}
        return images


def __getattr__(name: str):
    # FluxFill lives in mlx_edit.fill (it builds on this module); the old import path
    # `from mlx_edit.pipeline import FluxFill` keeps working.
    if name == "FluxFill":
        from mlx_edit.fill import FluxFill

        return FluxFill
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
