"""FluxFill: inpainting and outpainting with FLUX.1 Fill on MLX, and restyling with the
FLUX.1 Canny/Depth-dev control models.

encode prompt (then free the text encoders) -> prepare the canvas and the conditioning
(Fill: masked image + mask; Canny/Depth: the control image's latents) -> one denoise loop
(a generator) -> decode -> stitch/paste back into the original.
Numerics follow diffusers' FluxFillPipeline (pipelines/flux/pipeline_flux_fill.py) and
FluxControlPipeline / FluxControlImg2ImgPipeline, except that images are encoded with the
VAE posterior mode (BFL's choice, and deterministic) instead of a sample.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_edit import __version__
from mlx_edit.sampling.cache import CacheConfig, cache_metadata
from mlx_edit.sampling.denoise import (
    Conditioner,
    EditJob,
    Phase,
    PromptEmbeds,
    denoise,
    initial_noise,
)
from mlx_edit.conditioning.controlnet import BFL_CANNY, ControlNetSpec, bfl_conditioner, prepare_controls
from mlx_edit.conditioning.image_prompts import IPAdapterSpec, ReduxSpec, prepare_ip_adapters, prepare_redux
from mlx_edit.imaging.images import InputError, from_array, load_image, load_mask, to_array
from mlx_edit.sampling.latents import (
    fill_conditioning,
    image_ids,
    pack_latents,
    pack_mask,
    scale_latents,
    token_grid,
    unpack_latents,
    unscale_latents,
)
from mlx_edit.imaging import masks
from mlx_edit.memory import MemoryEstimate, check_fits, estimate, tile_threshold_gb
from mlx_edit.models.flux import FluxConfig, FluxTransformer
from mlx_edit.models.layers import IPAdapterKV
from mlx_edit.models.vae import AutoencoderKL, VAEConfig
from mlx_edit.components import Components, limit_cache
from mlx_edit.sampling.sampler import (
    flux_sigmas,
    load_scheduler_config,
    noise_latents,
)
from mlx_edit.imaging.stitch import CropPlan, crop_for_model, outpaint_canvas, plan_crop, stitch_back
from mlx_edit.tiling import decode_auto, encode_auto
from mlx_edit.tokenizers import ClipTokenizer, T5Tokenizer
from mlx_edit.weights.core import default_dtype, read_config
from mlx_edit.weights.flux import describe_variant, load_transformer, read_transformer_config
from mlx_edit.weights.sources import COMPONENTS, DEFAULT_MODEL, component_dir, resolve
from mlx_edit.weights.text import load_clip_text, load_t5
from mlx_edit.weights.vae import load_vae, read_vae_config

DEFAULT_STEPS = 50  # diffusers FluxFillPipeline and BFL cli_fill
DEFAULT_GUIDANCE = 30.0  # idem: Fill is guidance-distilled for high guidance values
DEFAULT_FEATHER = 8  # px of soft blend outside the (grown) mask
OUTPAINT_OVERLAP = 32  # px of the original regenerated along an outpainted seam
MODEL_PIXELS = 1024 * 1024  # the model-friendly canvas area for crop-to-mask
CONTROL_GUIDANCE = {"canny": 30.0, "depth": 10.0}  # BFL cli_control.py defaults
FILL_IN, CONTROL_IN = 384, 128  # transformer in_channels of Fill and of Canny/Depth-dev

class FluxFill:
    """FLUX.1 Fill inpainting/outpainting. Build with `FluxFill.from_pretrained`.

    The text encoders are loaded for each new prompt and freed right after encoding
    (prompt embeddings are cached), so they never sit in memory during denoising. The
    transformer and VAE (`components`) stay loaded, or with `low_memory` are loaded for
    the phase that needs them and freed after it (mlx_edit.components).
    """

    def __init__(self, root: Path, dtype: mx.Dtype, source: str, transformer: Path, *,
                 quantize: int | None = None, low_memory: bool = False):
        """Use `from_pretrained`. transformer: the transformer's folder or BFL file. Reads
        configs and tokenizers only; the models load through `components`."""
        self.root, self.dtype, self.source = root, dtype, source
        self.quantize = quantize  # bits for the transformer, T5 and ControlNets, or None
        self.low_memory = low_memory
        kinds, vae_dir = (FILL_IN, CONTROL_IN), component_dir(root, "vae")
        # Configs come from config.json / tensor headers: no weights needed to plan an edit.
        t_config, stored_bits = read_transformer_config(transformer, expect_in_channels=kinds)
        self.transformer_bits = stored_bits or quantize  # what the loaded transformer has
        self.components = Components(
            {"transformer": partial(load_transformer, transformer, dtype,
                                    expect_in_channels=kinds, quantize=quantize),
             "vae": partial(load_vae, vae_dir, dtype)},
            {"transformer": t_config, "vae": read_vae_config(vae_dir)}, keep=not low_memory)
        self.scheduler_config = load_scheduler_config(component_dir(root, "scheduler"))
        self.clip_tokenizer = ClipTokenizer.from_folder(component_dir(root, "tokenizer"))
        self.t5_tokenizer = T5Tokenizer.from_folder(component_dir(root, "tokenizer_2"))
        for name in ("text_encoder", "text_encoder_2"):
            component_dir(root, name)  # fail at load time, not after the first prompt
        self._prompt_cache: dict[tuple, PromptEmbeds] = {}
        self.tile_threshold_gb = tile_threshold_gb()  # VAE tiling above this (GB)
        self.load_stats: dict = {}
        self.last_stats: dict = {}  # phase timings (s) and peak memory (GB) of the last run

    @classmethod
    def from_pretrained(
        cls,
        repo_or_path: str | Path = DEFAULT_MODEL,
        dtype: mx.Dtype | None = None,
        quantize: int | None = None,
        *,
        transformer: str | Path | None = None,
        low_memory: bool = False,
    ) -> FluxFill:
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
        return self.components.get("transformer")

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
    def variant(self) -> str:
        """'fill' (FLUX.1 Fill, in_channels 384) or 'control' (FLUX.1 Canny/Depth-dev, 128)."""
        return "control" if self.transformer_config.in_channels == CONTROL_IN else "fill"

    def _require(self, variant: str, edit: str) -> None:
        """InputError unless the loaded transformer is `variant` (before any work)."""
        if self.variant != variant:
            need = {"fill": "a FLUX.1 Fill model (black-forest-labs/FLUX.1-Fill-dev)",
                    "control": "a FLUX.1 Canny or Depth control model "
                               "(black-forest-labs/FLUX.1-Canny-dev or FLUX.1-Depth-dev)"}
            found = describe_variant(self.transformer_config)
            raise InputError(f"{edit} needs {need[variant]}; {self.source} is {found}")

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
        embeds = PromptEmbeds(txt.astype(self.dtype), pooled.astype(self.dtype))
        self._prompt_cache = {key: embeds}  # keep only the latest: embeddings are small
        return embeds

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
        )

    def encode_image(self, pixels: np.ndarray) -> mx.array:
        """(H, W, 3) in [-1, 1] -> scaled, packed latents (1, N, 64) (posterior mode).

        Large images go through overlapping VAE tiles (mlx_edit.tiling) so activations
        stay within a few GB."""
        cfg = self.vae.config
        z = encode_auto(self.vae, mx.array(pixels)[None].astype(self.vae.dtype),
                        threshold_gb=self.tile_threshold_gb)
        return pack_latents(scale_latents(z, cfg.scaling_factor, cfg.shift_factor))

    def _fill_conditioning(self, pixels: np.ndarray, mask: np.ndarray, plan: CropPlan
                           ) -> mx.array:
        """The default Conditioner: Fill's masked-image latents + packed mask (1, N, 320)."""
        masked = self.encode_image(pixels * (1.0 - mask[..., None]))
        return fill_conditioning(masked, pack_mask(mx.array(mask)[None]))

    def prepare(
        self,
        image: Image.Image,
        model_mask: np.ndarray,
        blend: np.ndarray,
        prompt: str,
        *,
        steps: int,
        guidance: float,
        seed: int,
        num_images: int,
        strength: float,
        crop_to_mask: bool | None,
        prompt_2: str | None,
        max_sequence_length: int,
        noise: mx.array | None = None,
        metadata: dict | None = None,
        ip_adapters: Sequence[IPAdapterSpec] = (),
        redux: Sequence[ReduxSpec] = (),
        controlnets: Sequence[ControlNetSpec] = (),
        conditioning: Conditioner | None = None,
        cache: CacheConfig | None = None,
    ) -> EditJob:
        """Build an EditJob for a canvas `image`, its binary model mask and blend weights.

        conditioning: the Conditioner of the transformer's extra input channels (None:
        Fill's; `mlx_edit.conditioning.controlnet.bfl_conditioner` for Canny/Depth-dev). Raises InputError
        when its channels do not fit the transformer's in_channels.
        noise: optional packed initial noise (num_images, N, 64) (parity tests inject it).
        ip_adapters / redux: image prompts (mlx_edit.conditioning.image_prompts), prepared once here.
        controlnets: ControlNets (mlx_edit.conditioning.controlnet), their inputs aligned to the canvas.
        """
        if steps < 1:
            raise InputError(f"steps must be >= 1, got {steps}")
        if num_images < 1:
            raise InputError(f"num_images must be >= 1, got {num_images}")
        if not 0.0 < strength <= 1.0:
            raise InputError(f"strength must be in (0, 1], got {strength}")
        stats: dict = {}
        target = MODEL_PIXELS if crop_to_mask is not False else None
        plan = plan_crop(image.size, blend, target, crop=crop_to_mask)
        canvas, mask = crop_for_model(image, model_mask, plan)
        if not mask.any():
            raise InputError(
                "the mask covers no pixel at the model's resolution: paint a larger area "
                "or use --grow-mask"
            )
        width, height = canvas.size
        h_tok, w_tok = token_grid(height, width)
        check_fits(self.memory_estimate(width, height, num_images, cache),
                   low_memory=self.low_memory)
        self.components.release()  # low_memory: nothing but the text encoders while encoding
        with Phase(stats, "text_encode"):
            embeds = self.encode_prompt(prompt, prompt_2, max_sequence_length)
        ip: list[IPAdapterKV] = []
        if redux or ip_adapters:
            with Phase(stats, "image_prompts"):
                if redux:
                    embeds = prepare_redux(self, redux, embeds)
                if ip_adapters:
                    ip = prepare_ip_adapters(self, ip_adapters, batch_size=num_images)
        with self.components.using("vae", stats), Phase(stats, "vae_encode"):
            pixels = to_array(canvas)
            conditioning = (conditioning or self._fill_conditioning)(pixels, mask, plan)
            image_latents = self.encode_image(pixels) if strength < 1.0 else None
            mx.eval(conditioning, image_latents)
        channels = 4 * self.vae_config.latent_channels  # packed 2x2 latents: 64
        if channels + conditioning.shape[-1] != self.transformer_config.in_channels:
            raise InputError(
                f"the conditioning has {conditioning.shape[-1]} channels but the "
                f"{describe_variant(self.transformer_config)} transformer takes "
                f"{self.transformer_config.in_channels - channels}")
        sigmas = flux_sigmas(steps, h_tok * w_tok, self.scheduler_config, strength)
        seeds = [seed + i for i in range(num_images)]
        if noise is None:
            noise = initial_noise(seeds, (h_tok * w_tok, channels), mx.float32)
        latents = noise.astype(self.dtype)
        if image_latents is not None:
            latents = noise_latents(image_latents.astype(self.dtype), latents, float(sigmas[0]))
        meta = {
            "prompt": prompt, "prompt_2": prompt_2, "steps": steps, "guidance": guidance,
            "strength": strength, "model": self.source, "mlx_edit_version": __version__,
            "model_size": [width, height], "crop_box": list(plan.box),
            "ip_adapters": [[str(a.model), a.scale] for a in ip_adapters] or None,
            "redux": [[str(r.model), r.strength] for r in redux] or None,
            **(metadata or {}),
        }
        job = EditJob(image, plan, blend, latents, conditioning, embeds, guidance, sigmas,
                      seeds, meta, ip=ip, stats=stats, cache=cache)
        if controlnets:  # their control images go through the VAE
            with self.components.using("vae", stats):
                job.controls = prepare_controls(self, job, list(controlnets))
        return job

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
                                      controls=job.controls, ip=job.ip, cache=job.cache,
                                      stats=job.stats):
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
            result = stitch_back(job.original, edited, job.plan, blend)
            meta = {**job.metadata, "seed": seed, "paste_back": paste_back}
            result.info.update({k: str(v) for k, v in meta.items() if v is not None})
            out.append(result)
        return out

    # ------------------------------------------------------------------ public edits

    def inpaint(
        self,
        image,
        mask,
        prompt: str,
        *,
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        seed: int = 0,
        num_images: int = 1,
        strength: float = 1.0,
        grow_mask: float = 0,
        feather: float = DEFAULT_FEATHER,
        paste_back: bool = True,
        crop_to_mask: bool | None = None,
        prompt_2: str | None = None,
        max_sequence_length: int = 512,
        ip_adapters: Sequence[IPAdapterSpec] = (),
        redux: Sequence[ReduxSpec] = (),
        controlnets: Sequence[ControlNetSpec] = (),
        cache: CacheConfig | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Image.Image]:
        """Repaint the white area of `mask` in `image` following `prompt`.

        image: path, PIL image or uint8 (H, W, 3); any size (EXIF orientation honoured).
        mask: path, PIL or array, white = repaint; resized (with a warning) if its size
        differs. grow_mask / feather: px. crop_to_mask: None = automatic (edit a ~1 MP
        window around the mask when the image is large), True/False to force.
        ip_adapters / redux: image prompts (IPAdapterSpec / ReduxSpec from
        mlx_edit.conditioning.image_prompts): the style or subject of reference images.
        controlnets: ControlNetSpec list (mlx_edit.conditioning.controlnet): structure (edges, depth,
        pose...) to keep; several are summed.
        cache: a step cache (mlx_edit.sampling.cache FirstBlockCache / TaylorSeer /
        MagCache, diffusers' settings): fewer transformer evaluations; None: all of them.
        Returns num_images PIL images of the input's size (seeds seed, seed+1, ...).
        Raises InputError (bad input: empty mask, bad numbers, prompt too long; a
        Canny/Depth transformer loaded instead of Fill).
        """
        self._require("fill", "inpaint")
        image = load_image(image)
        user_mask = load_mask(mask, image.size)
        model_mask = masks.grow_mask(user_mask, grow_mask) if grow_mask else user_mask
        blend = masks.blend_mask(user_mask, grow_mask, feather)
        job = self.prepare(
            image, model_mask, blend, prompt, steps=steps, guidance=guidance, seed=seed,
            num_images=num_images, strength=strength, crop_to_mask=crop_to_mask,
            prompt_2=prompt_2, max_sequence_length=max_sequence_length,
            ip_adapters=ip_adapters, redux=redux, controlnets=controlnets,
            cache=cache, metadata={"mode": "inpaint", "grow_mask": grow_mask, "feather": feather},
        )
        return self.run(job, paste_back, progress)

    def outpaint(
        self,
        image,
        prompt: str,
        *,
        left: int = 0,
        right: int = 0,
        top: int = 0,
        bottom: int = 0,
        overlap: int = OUTPAINT_OVERLAP,
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        seed: int = 0,
        num_images: int = 1,
        crop_to_mask: bool | None = None,
        prompt_2: str | None = None,
        max_sequence_length: int = 512,
        ip_adapters: Sequence[IPAdapterSpec] = (),
        redux: Sequence[ReduxSpec] = (),
        controlnets: Sequence[ControlNetSpec] = (),
        cache: CacheConfig | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Image.Image]:
        """Extend `image` by left/right/top/bottom px, generating the new border.

        The original is kept exactly except for an `overlap` px band along each extended
        side, which is regenerated and blended so the seam does not show.
        Returns PIL images of size (W + left + right, H + top + bottom).
        Raises InputError (no expansion, negative values; not a Fill transformer).
        """
        self._require("fill", "outpaint")
        image = load_image(image)
        canvas, model_mask, blend = outpaint_canvas(image, left, right, top, bottom,
                                                    overlap=overlap)
        job = self.prepare(
            canvas, model_mask, blend, prompt, steps=steps, guidance=guidance, seed=seed,
            num_images=num_images, strength=1.0, crop_to_mask=crop_to_mask,
            prompt_2=prompt_2, max_sequence_length=max_sequence_length,
            ip_adapters=ip_adapters, redux=redux, controlnets=controlnets,
            cache=cache, metadata={"mode": "outpaint", "expand": [left, right, top, bottom],
                      "overlap": overlap},
        )
        return self.run(job, True, progress)

    def restyle(
        self,
        image,
        control_image,
        prompt: str,
        *,
        control_type: str = "canny",
        mask=None,
        strength: float = 1.0,
        steps: int = DEFAULT_STEPS,
        guidance: float | None = None,
        seed: int = 0,
        num_images: int = 1,
        grow_mask: float = 0,
        feather: float = DEFAULT_FEATHER,
        paste_back: bool = True,
        crop_to_mask: bool | None = None,
        prompt_2: str | None = None,
        max_sequence_length: int = 512,
        canny_low: float = BFL_CANNY[0],
        canny_high: float = BFL_CANNY[1],
        cache: CacheConfig | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Image.Image]:
        """Repaint `image` following `prompt` while keeping the structure (edges or depth)
        of `control_image`, with FLUX.1 Canny-dev / Depth-dev (in_channels 128).

        control_image: path, PIL or array, the same framing as `image`; None = `image`
        itself (for canny). control_type: "canny" (edges computed here; thresholds on the
        0-255 scale, BFL's 50/200), "depth" or "none" (a ready-made map, used as given).
        mask: None = the whole image; else white = restyle, and outside the grown and
        feathered mask the original is kept exactly (crop_to_mask as in `inpaint`).
        strength < 1 starts from the image (img2img). guidance None: 30 for canny and
        none, 10 for depth (BFL's defaults).
        Returns num_images PIL images of the input's size (seeds seed, seed+1, ...).
        Raises InputError (not a Canny/Depth transformer, depth without a control image,
        bad numbers, empty mask, prompt too long).
        """
        self._require("control", "restyle")
        image = load_image(image)
        if control_image is None and control_type != "canny":
            raise InputError(f"--control-type {control_type} needs --control-image (a "
                             "ready-made map: no depth estimator is bundled)")
        if mask is None:
            model_mask = blend = np.ones(image.size[::-1], np.float32)
        else:
            user_mask = load_mask(mask, image.size)
            model_mask = masks.grow_mask(user_mask, grow_mask) if grow_mask else user_mask
            blend = masks.blend_mask(user_mask, grow_mask, feather)
        if guidance is None:
            guidance = CONTROL_GUIDANCE.get(control_type, DEFAULT_GUIDANCE)
        conditioner = bfl_conditioner(self, image if control_image is None else control_image,
                                      control_type, canny_low=canny_low, canny_high=canny_high)
        job = self.prepare(
            image, model_mask, blend, prompt, steps=steps, guidance=guidance, seed=seed,
            num_images=num_images, strength=strength, crop_to_mask=crop_to_mask,
            prompt_2=prompt_2, max_sequence_length=max_sequence_length,
            conditioning=conditioner, cache=cache,
            metadata={"mode": "restyle", "control_type": control_type,
                      "masked": mask is not None, "grow_mask": grow_mask, "feather": feather},
        )
        return self.run(job, paste_back, progress)

    def run(self, job: EditJob, paste_back: bool = True,
            progress: Callable[[int, int], None] | None = None) -> list[Image.Image]:
        """Denoise a prepared job to the end and finish it (`progress(step, total)`)."""
        total = len(job.sigmas) - 1
        for i, _ in self.steps(job):
            if progress is not None:
                progress(i + 1, total)
        images = self.finish(job, paste_back)
        self.last_stats = {**self.load_stats, **job.stats}
        return images
