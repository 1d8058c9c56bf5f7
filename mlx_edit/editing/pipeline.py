"""FluxPipeline: what every FLUX edit shares, on MLX.

encode prompt (then free the text encoders) -> plan the canvas -> conditioning prepared
before the loop (mlx_edit.conditioning: channels, sequence tokens, hooks) -> the one
denoise loop (a generator, mlx_edit.sampling.denoise) -> decode -> paste back / stitch.
The edits are subclasses: FluxFill (mlx_edit.editing.fill: inpaint, outpaint, restyle),
FluxKontext (mlx_edit.editing.kontext: edit) and FluxKlein (mlx_edit.editing.klein: FLUX.2
[klein] edit and inpaint, through the family table mlx_edit.families). Numerics follow diffusers' Flux pipelines
(pipelines/flux/), except that images are encoded with the VAE posterior mode (BFL's
choice, and deterministic) instead of a sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_edit import __version__

from mlx_edit.editing import large, masking, running
from mlx_edit.editing.components import Models, limit_cache
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
from mlx_edit.imaging.images import InputError, to_array
from mlx_edit.imaging.stitch import CropPlan, crop_for_model, resize_with_mask
from mlx_edit.editing.loras import LoRAs
from mlx_edit.editing.memory import MemoryEstimate
from mlx_edit.models.layers import IPAdapterKV
from mlx_edit.options import (  # noqa: F401  (DEFAULT_* re-exported: public names)
    CONTROL_GUIDANCE,
    DEFAULT_FEATHER,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    MODEL_PIXELS,
    OUTPAINT_OVERLAP,
    EditOptions,
    check_canvas,
    check_prompt,
)
from mlx_edit.editing.prompts import PROMPT_CACHE_SIZE, Prompts  # noqa: F401  (public name)
from mlx_edit.sampling.cache import CacheConfig
from mlx_edit.progress import Phase, denoise_step, labelled, report
from mlx_edit.sampling.denoise import EditJob, PromptEmbeds, initial_noise, rank_split
from mlx_edit.sampling.denoise import keep_source as keep_source_hook
from mlx_edit.sampling.latents import token_grid
from mlx_edit.sampling.sampler import flux_sigmas, noise_latents
from mlx_edit.weights.core import default_dtype
from mlx_edit.weights.sources import COMPONENTS, DEFAULT_MODEL, component_dir, resolve

_Pipeline = TypeVar("_Pipeline", bound="FluxPipeline")


def _of_models(name: str) -> property:
    """`pipe.<name>`: the read-only `pipe.models.<name>` (public API kept on the pipeline)."""
    return property(lambda self: getattr(self.models, name),
                    doc=f"`models.{name}` (mlx_edit.editing.components.Models).")


class FluxPipeline:
    """What every FLUX edit shares: models on demand, prompt encoding, planning,
    conditioning, the one denoise loop and decoding. Edits live in subclasses
    (`FluxFill`, `FluxKontext`, `FluxKlein`), which name the variants they load
    (mlx_edit.variants).

    Its parts are explicit components, made in `__init__` and passed where they are used:
    `loras` (mlx_edit.editing.loras.LoRAs), `models` (mlx_edit.editing.components.Models:
    folder, family, transformer and VAE on demand, configs, variant, VAE encode/decode,
    memory estimate; it applies `loras` to every transformer load) and `prompts`
    (mlx_edit.editing.prompts.Prompts: encode_prompt with its caches); masks are functions
    (mlx_edit.editing.masking). The public names of those parts (`pipe.dtype`,
    `pipe.variant`, `pipe.encode_prompt`, `pipe.load_lora`, ...) are short delegating
    attributes and methods here.

    The text encoders are loaded for each new prompt and freed right after encoding
    (prompt embeddings are cached), so they never sit in memory during denoising. The
    transformer and VAE (`components`) stay loaded, or with `low_memory` are loaded for
    the phase that needs them and freed after it (mlx_edit.editing.components).
    """

    VARIANTS: tuple[str, ...] = ("fill", "control")  # names in mlx_edit.variants.VARIANTS

    def __init__(self, root: Path, dtype: mx.Dtype, source: str, transformer: Path, *,
                 quantize: int | None = None, low_memory: bool = False):
        """Use `from_pretrained`. transformer: the transformer's folder or BFL file. Reads
        configs and tokenizers only; the models load through `components`."""
        self.loras = LoRAs()  # applied on every transformer load
        self.models = Models(root, dtype, source, transformer, variant_names=self.VARIANTS,
                             editor=type(self).__name__, loras=self.loras,
                             quantize=quantize, low_memory=low_memory)
        self.prompts = Prompts(self.models, self.loras)
        self.load_stats: dict = {}
        self.last_stats: dict = {}  # phase timings (s) and peak memory (GB) of the last run
        self.pending_stats: dict = {}  # phases before prepare (segment), moved to its job

    @classmethod
    def from_pretrained(
        cls: type[_Pipeline],
        repo_or_path: str | Path = DEFAULT_MODEL,
        dtype: mx.Dtype | None = None,
        quantize: int | None = None,
        *,
        transformer: str | Path | None = None,
        low_memory: bool = False,
    ) -> _Pipeline:
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
        MLX's buffer cache for the whole process (`mlx_edit.editing.components.limit_cache`,
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
                    pipe.models.components.get(name)
        pipe.load_stats = stats
        return pipe

    # ---------------------------------------- public names of the parts (delegating)

    root = _of_models("root")
    dtype = _of_models("dtype")
    source = _of_models("source")
    quantize = _of_models("quantize")
    low_memory = _of_models("low_memory")
    family = _of_models("family")
    text = _of_models("text")
    components = _of_models("components")
    transformer = _of_models("transformer")
    vae = _of_models("vae")
    transformer_config = _of_models("transformer_config")
    vae_config = _of_models("vae_config")
    variant_info = _of_models("variant_info")
    variant = _of_models("variant")
    transformer_bits = _of_models("transformer_bits")
    scheduler_config = _of_models("scheduler_config")
    tile_threshold_gb = _of_models("tile_threshold_gb")
    encode_image = _of_models("encode_image")
    decode = _of_models("decode")

    def memory_estimate(self, width: int, height: int, num_images: int = 1,
                        **kwargs) -> MemoryEstimate:
        """`models.memory_estimate` (mlx_edit.editing.components.Models): the estimated
        peak memory of an edit on a width x height canvas."""
        return self.models.memory_estimate(width, height, num_images, **kwargs)

    def encode_prompt(self, prompt: str, prompt_2: str | None = None,
                      max_sequence_length: int = 512) -> PromptEmbeds:
        """`prompts.encode` (mlx_edit.editing.prompts.Prompts): the cached text inputs of
        `prompt` (InputError for a prompt too long, before any encoder loads)."""
        return self.prompts.encode(prompt, prompt_2, max_sequence_length)

    @property
    def disk_prompt_cache(self):
        """`prompts.disk_cache`: a mlx_edit.editing.prompt_cache.PromptCache, or None."""
        return self.prompts.disk_cache

    @disk_prompt_cache.setter
    def disk_prompt_cache(self, cache) -> None:
        self.prompts.disk_cache = cache

    def load_lora(self, source: str | Path, scale: float = 1.0, name: str | None = None,
                  *, weight_name: str | None = None) -> str:
        """Apply a FLUX LoRA (any format diffusers reads; mlx_edit.weights.lora) unfused,
        on float or quantized transformers, summed with those already loaded
        (`loras.load`, mlx_edit.editing.loras). A BFL control LoRA (FLUX.1-Canny/Depth-dev-
        lora) makes FLUX.1-dev the control variant (mlx_edit.weights.lora_control); CLIP-L
        parts apply to the text encoder (mlx_edit.weights.lora_text).

        source: a .safetensors file, a Hugging Face repo id (`owner/name`, with
        `weight_name` or as `owner/name:file.safetensors`). Returns the adapter's name
        (default: the file's stem). Raises WeightLoadError for unreadable files, keys
        that map to no layer (named), layers the model lacks and text-encoder layers on
        FLUX.2 (named; diffusers' Flux2LoraLoaderMixin loads the transformer only),
        InputError for a name in use or a scale that is not finite or beyond +-100 (before
        any file is read); on error nothing is applied.
        """
        return self.loras.load(self.models, source, scale, name, weight_name=weight_name)

    def set_lora_scales(self, scales: dict[str, float]) -> None:
        """`loras.set_scales`: change loaded LoRAs' strengths by name, without reloading
        (InputError for unknown names and bad scales, nothing changed then)."""
        self.loras.set_scales(scales)

    def unload_loras(self, names: Sequence[str] | None = None) -> None:
        """`loras.unload`: remove LoRAs by name (all when None); the base transformer is
        restored exactly."""
        self.loras.unload(self.models, names)

    def user_mask(self, image: Image.Image, mask, segment_model: str | None = None
                  ) -> np.ndarray:
        """`masking.user_mask` with this pipeline's models: the edit mask (H, W) float32
        of `image` from a path, PIL, array or SAM prompts; after segmenting, the segment
        phase's time is kept in `pending_stats` for the next `prepare`."""
        stats: dict = {}
        user_mask = masking.user_mask(image, mask, segment_model, self.models, stats)
        if stats:  # segmented: the next job's stats start with it
            self.pending_stats = stats
        return user_mask

    @staticmethod
    def edit_masks(user_mask: np.ndarray, o: EditOptions) -> tuple[np.ndarray, np.ndarray]:
        """`masking.edit_masks`: (model mask, paste-back blend) of a user mask."""
        return masking.edit_masks(user_mask, o)

    # ------------------------------------------------------------------ plan and prepare

    def context(self, plan: CropPlan, inner: tuple[int, int, int, int] | None = None
                ) -> ConditioningContext:
        """What conditioners see of an edit planned as `plan` (mlx_edit.conditioning)."""
        m = self.models
        return ConditioningContext(m.dtype, m.quantize, m.transformer_config, m.vae_config,
                                   m.encode_image, plan, inner)

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
             cache: CacheConfig | None = None, options: EditOptions | None = None,
             references: Sequence[tuple[int, int]] = (), source_reference: bool = False
             ) -> tuple[CropPlan, Image.Image, np.ndarray]:
        """(crop plan, model canvas, binary model mask at the canvas size) of an edit, its memory
        checked (`plan` given: used as it is; 1:1 when `options` allow windows: mlx_edit.editing.large;
        references: the encoded (width, height) of reference images, in the estimate, as
        the canvas itself with `source_reference`: `large.edit_estimate`).
        Raises InputError (mask empty at the model's resolution, or an edit that would not
        fit in memory: the message lists options that do)."""
        plan = large.edit_plan(image.size, blend, crop_to_mask, plan, options)
        large.check_memory(self.models, plan, options, num_images, cache, references,
                           source_reference)
        canvas, mask = crop_for_model(image, model_mask, plan)
        if not mask.any():
            raise InputError(
                "the mask covers no pixel at the model's resolution: paint a larger area "
                "or use --grow-mask"
            )
        return plan, canvas, mask

    def prepare(self, image: Image.Image, model_mask: np.ndarray, blend: np.ndarray,
                prompt: str, options: EditOptions | None = None, *,
                noise: mx.array | None = None, metadata: dict | None = None,
                conditioning: Conditioner | None = None,
                references: Sequence[Image.Image] = (), reference_resize: bool = True,
                inner: tuple[int, int, int, int] | None = None, plan: CropPlan | None = None,
                keep_source: bool = False, source_reference: bool = False,
                **overrides) -> EditJob:
        """Build an EditJob for a canvas `image`, its binary model mask and blend weights.

        options: EditOptions (or its fields as keyword `overrides`), checked here
        (InputError): steps, guidance, seed(s), strength, the image prompts (ip_adapters,
        redux: mlx_edit.conditioning.image_prompts), ControlNets (controlnets, aligned to
        the canvas), true CFG (negative_prompt, true_cfg_scale > 1: two passes per step).
        conditioning: the Conditioner of the transformer's extra input channels (None:
        the variant's own: Fill's masked image + mask; `conditioning.bfl_control.
        bfl_conditioner` for Canny/Depth-dev; none for Kontext and klein). references:
        reference images appended as sequence tokens by the family
        (`families.Family.reference_tokens`: Kontext's, conditioning.kontext, resized to
        the preferred Kontext resolution unless reference_resize is False).
        noise: optional packed initial noise (num_images, N, 64) (parity tests inject it).
        inner: for an outpaint, the original's box on the canvas (ControlNet alignment).
        plan: a crop plan to use instead of planning one (Kontext: the preferred size).
        keep_source: after every step, latents outside the model mask are the source's
        re-noised to the next sigma (`denoise.keep_source`; Kontext with a mask).
        source_reference: the canvas's own latents are the first reference, before
        `references` (FLUX.2 inpainting, diffusers Flux2KleinInpaintPipeline).
        Raises InputError (bad options, empty mask, memory, channel mismatch).
        """
        o = EditOptions.of(options, overrides)
        prompt = check_prompt(prompt)
        m = self.models
        refs = [m.family.reference_size(*im.size, reference_resize) for im in references]
        plan, canvas, mask = self.plan(image, model_mask, blend, o.crop_to_mask,
                                       o.num_images, plan, o.cache, o, refs, source_reference)
        windows = self._windows(plan, o, mask, keep_source or (
            conditioning is None and m.variant_info.conditioner == "fill"), refs,
            source_reference)
        stats, self.pending_stats = self.pending_stats, {}
        cfg_scale = self.true_cfg_scale(o)
        embeds, negative, ip, ctx = self._prompts(prompt, o, plan, inner, stats, cfg_scale)
        needed = running.encode_region(m, image, blend, plan, windows)
        with m.components.using("vae", stats), Phase(stats, "vae_encode"):
            channels, image_latents, tokens, token_ids = self._encode_canvas(
                ctx, canvas, mask, conditioning, needed,
                references, reference_resize, o.strength < 1.0 or keep_source,
                source_reference)
        kv = m.variant_info.reference_kv and tokens is not None
        sigmas, noise, latents = self._start(o, plan, windows, ctx, noise, image_latents)
        meta = {"prompt": prompt,
                **self._metadata(o, plan, cfg_scale if negative is not None else None, metadata),
                **large.metadata(o, plan, windows), **({"reference_kv": True} if kv else {})}
        job = EditJob(image, plan, blend, latents, channels, embeds, ctx.guidance, sigmas,
                      o.seeds, meta, ip=ip, tokens=tokens, token_ids=token_ids, noise=noise,
                      source=image_latents, negative=negative,
                      true_cfg_scale=cfg_scale, stats=stats, cache=o.cache, windows=windows,
                      reference_kv=kv)
        self._attach_hooks(job, ctx, o, mask if keep_source else None)
        if (shared := rank_split(job)) is not None:  # mlx.launch: what each rank runs
            job.metadata.update(shared.metadata())
        return job

    def _windows(self, plan: CropPlan, o: EditOptions, mask: np.ndarray,
                 latents_at_hand: bool, references: Sequence[tuple[int, int]] = (),
                 source_reference: bool = False) -> large.Windows | None:
        """The job's windows (mlx_edit.editing.large; None: one pass over the canvas).
        Windows without mask tokens are skipped where the canvas's latents are at hand to
        fill their tokens after the loop (`latents_at_hand`: the source kept, or Fill's
        masked image's; or strength < 1), never with a soft mask. references /
        source_reference: as `plan`'s, in the window batch's memory estimate."""
        skip = not o.soft_mask and (latents_at_hand or o.strength < 1.0)
        return large.job_windows(self.models, plan, o,
                                 large.keep_tokens(mask) if skip else None, references,
                                 source_reference)

    def _encode_canvas(self, ctx: ConditioningContext, canvas: Image.Image, mask: np.ndarray,
                       conditioning: Conditioner | None, needed: np.ndarray | None,
                       references: Sequence[Image.Image], reference_resize: bool,
                       want_latents: bool, source_reference: bool
                       ) -> tuple[mx.array | None, mx.array | None, mx.array | None,
                                  mx.array | None]:
        """(channel conditioning, the canvas's latents (when `want_latents` or
        `source_reference`, else None), reference tokens and their ids (None without
        references)) of an edit, evaluated; the VAE must be loaded (`components.using`).
        needed: the latent pixels the canvas's encodes must give (`running.encode_region`)."""
        pixels = to_array(canvas)
        encode = partial(self.models.encode_image, needed=needed)  # the canvas's encodes
        channels = self._channels(replace(ctx, encode_image=encode), conditioning, pixels,
                                  mask)
        image_latents = source = None
        if source_reference:  # a source reference (FLUX.2 inpainting) is seen whole
            image_latents = self.models.encode_image(pixels)
            source = (image_latents, token_grid(canvas.size[1], canvas.size[0]))
        elif want_latents:
            image_latents = encode(pixels)
        tokens = token_ids = None
        if references or source:
            tokens, token_ids = self.models.family.reference_tokens(
                ctx, references, reference_resize, source)
        mx.eval(channels, tokens, image_latents)
        return channels, image_latents, tokens, token_ids

    def framed_edit_job(self, image: Image.Image, mask, size: tuple[int, int],
                        instruction: str, o: EditOptions, references: Sequence[Image.Image],
                        noise: mx.array | None = None, reference_resize: bool = True
                        ) -> EditJob:
        """The EditJob of an instruction edit framed on `image` (RGB) at model size `size`
        (W, H) with `references` as sequence tokens (Kontext, klein): the image (and its
        mask: path, PIL, array or SAM prompts; None = everywhere) resized to `size`, or with
        `o.keep_size` mapped back at the image's own size; with a mask the source is kept
        outside it every step and pasted back (tile_mode auto: windows only then)."""
        if mask is None and o.tile_mode == "auto":
            o = dataclasses.replace(o, tile_mode="off")
        user_mask = None if mask is None else self.user_mask(image, mask, o.segment_model)
        if not o.keep_size:
            image, user_mask = resize_with_mask(image, user_mask, size)
        if user_mask is None:
            model_mask = blend = np.ones(image.size[::-1], np.float32)
        else:
            model_mask, blend = masking.edit_masks(user_mask, o)
        plan = CropPlan(image.size, (0, 0, *image.size), size, image.size != size)
        job = self.prepare(
            image, model_mask, blend, instruction, o, noise=noise, references=references,
            reference_resize=reference_resize, plan=plan, keep_source=mask is not None,
            metadata={"mode": "edit", "references": len(references), "keep_size": o.keep_size,
                      "masked": mask is not None, "grow_mask": o.grow_mask,
                      "feather": o.feather})
        if user_mask is not None:
            masking.paste_back_options(job, o, image, user_mask, self.models)
        return job

    def _start(self, o: EditOptions, plan: CropPlan, windows: large.Windows | None,
               ctx: ConditioningContext, noise: mx.array | None, image_latents: mx.array | None
               ) -> tuple[np.ndarray, mx.array, mx.array]:
        """(sigmas shifted for one window's or the canvas's tokens, noise (seeds unless given),
        start latents: the noise, mixed with the image's at sigmas[0] when strength < 1)."""
        tokens = large.schedule_tokens(plan, windows)
        scheduler, family = self.models.scheduler_config, self.models.family
        sigmas = flux_sigmas(ctx.num_steps, tokens, scheduler, o.strength,
                             family.mu(tokens, ctx.num_steps, scheduler))
        if noise is None:
            noise = initial_noise(o.seeds, (large.schedule_tokens(plan, None),
                                            ctx.latent_channels), mx.float32)
        noise = noise.astype(self.models.dtype)
        if o.strength == 1.0:
            return sigmas, noise, noise
        return sigmas, noise, noise_latents(image_latents.astype(self.models.dtype), noise,
                                            float(sigmas[0]))

    def _attach_hooks(self, job: EditJob, ctx: ConditioningContext, o: EditOptions,
                      keep_mask: np.ndarray | None) -> None:
        """The job's per-step hooks: the source kept outside `keep_mask` (binary, canvas
        size; None: not kept) and the ControlNets (their control images go through the
        VAE)."""
        if keep_mask is not None:
            tokens = self.models.family.token_mask(mx.array(keep_mask)[None])
            job.after_step = keep_source_hook(tokens, job.source, job.noise, job.sigmas)
        if o.controlnets:
            with self.models.components.using("vae", job.stats):
                job.controls, control_meta = prepare_controls(ctx, list(o.controlnets))
            job.stats["control_prepare_s"] = control_meta.pop("control_prepare_s")
            job.metadata.update(control_meta)

    def true_cfg_scale(self, o: EditOptions) -> float:
        """The true-CFG scale of an edit (1: off): `true_cfg_scale` with a negative prompt
        for a guidance-distilled model (FLUX.1), else (klein Base) `guidance` itself, as
        diffusers Flux2KleinPipeline (`do_classifier_free_guidance`)."""
        if self.models.variant_info.distilled:
            return o.true_cfg_scale if o.negative_prompt is not None else 1.0
        return o.effective_guidance

    def _prompts(self, prompt: str, o: EditOptions, plan: CropPlan, inner, stats: dict,
                 cfg_scale: float = 1.0):
        """(prompt embeddings (with Redux tokens), negative embeddings (the negative prompt,
        or "" for a non-distilled model) when cfg_scale > 1, else None, IP-Adapter
        keys/values, the conditioning context for the loop) of an edit; the text encoders
        (and image-prompt models) are loaded, used and freed here."""
        self.models.components.release()  # low_memory: nothing but the text encoders while encoding
        with Phase(stats, "text_encode"):
            embeds = self.prompts.encode(prompt, o.prompt_2, o.max_sequence_length)
            negative = None
            if cfg_scale > 1.0:
                negative = self.prompts.encode(o.negative_prompt or "", None,
                                              o.max_sequence_length)
        loop = (o.effective_guidance, o.effective_steps, o.num_images)
        ctx = self.context(plan, inner).for_loop(embeds, *loop)
        ip: list[IPAdapterKV] = []
        if o.redux or o.ip_adapters:
            with Phase(stats, "image_prompts"):
                embeds = prepare_redux(ctx, o.redux, embeds) if o.redux else embeds
                ip = prepare_ip_adapters(ctx, o.ip_adapters) if o.ip_adapters else []
            ctx = ctx.for_loop(embeds, *loop)
        return embeds, negative, ip, ctx

    def _metadata(self, o: EditOptions, plan: CropPlan, cfg: float | None, extra: dict | None
                  ) -> dict:
        """The parameters an output records (PNG text chunks): options, model, geometry;
        cfg: the true-CFG scale when it is on."""
        return {
            "prompt_2": o.prompt_2, "steps": o.effective_steps,
            "guidance": o.effective_guidance,
            "strength": o.strength, "model": self.models.source, "mlx_edit_version": __version__,
            "model_size": list(plan.model_size), "crop_box": list(plan.box),
            "ip_adapters": [[str(a.model), a.scale] for a in o.ip_adapters] or None,
            "redux": [[str(r.model), r.strength] for r in o.redux] or None,
            "loras": [[n, x.source, x.scale] for n, x in self.loras.items()] or None,
            "negative_prompt": o.negative_prompt if cfg else None,
            "true_cfg_scale": cfg,
            **({"mask_text": o.mask_text, "mask_threshold": o.mask_threshold,
                "mask_instances": o.mask_instances} if o.mask_text else {}),
            **(extra or {}),
        }

    def _channels(self, ctx: ConditioningContext, conditioner: Conditioner | None,
                  pixels: np.ndarray, mask: np.ndarray) -> mx.array | None:
        """The channel conditioning (1, N, K) of the edit, checked against the
        transformer's input width (None when the variant takes no extra channels)."""
        if conditioner is None and self.models.variant_info.conditioner == "fill":
            conditioner = fill_conditioner
        channels = conditioner(ctx, pixels, mask) if conditioner else None
        have = ctx.latent_channels + (0 if channels is None else channels.shape[-1])
        if have != ctx.transformer.in_channels:
            raise InputError(
                f"the conditioning has {have - ctx.latent_channels} channels but the "
                f"{self.models.variant_info.title} transformer takes "
                f"{ctx.transformer.in_channels - ctx.latent_channels}")
        return channels

    # ------------------------------------------------------------------ run

    def steps(self, job: EditJob) -> Iterator[tuple[int, mx.array]]:
        """Run the denoise loop for `job`, yielding (step, latents)
        (`running.denoise_job` with this pipeline's models; closing it frees a low_memory
        transformer)."""
        yield from running.denoise_job(self.models, job)

    def finish(self, job: EditJob, paste_back: bool = True) -> list[Image.Image]:
        """Decode the job's latents and map them back into the original image
        (`running.finish_job` with this pipeline's models)."""
        return running.finish_job(self.models, job, paste_back)

    def run(self, job: EditJob, paste_back: bool = True,
            progress: Callable[..., None] | None = None) -> list[Image.Image]:
        """Denoise a prepared job to the end and finish it: `progress(step, total[, job])`."""
        k = job.windows.count if job.windows else 1  # progress counts windows x steps
        total = (len(job.sigmas) - 1) * k
        shared = rank_split(job)
        with labelled("" if shared is None else shared.label()):  # mlx.launch: ranks
            report("denoise", 0, total)  # the phase starts (wants_phases only)
            for i, _ in self.steps(job):  # `wants_job`: the job too (its latents: previews)
                denoise_step(progress, (i + 1) * k, total, job)
        images = self.finish(job, paste_back)
        self.last_stats = {**self.load_stats, **job.stats}
        return images


def __getattr__(name: str):
    # FluxFill lives in mlx_edit.editing.fill (it builds on this module); the old import path
    # `from mlx_edit.editing.pipeline import FluxFill` keeps working.
    if name == "FluxFill":
        from mlx_edit.editing.fill import FluxFill

        return FluxFill
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
