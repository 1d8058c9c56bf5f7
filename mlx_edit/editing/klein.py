"""FluxKlein: FLUX.2 [klein] edits (0..N reference images; 0 = text-to-image) and
inpainting with an optional reference, on the shared pipeline machinery (the one denoise
loop, masks, paste-back, colour match, crop-to-mask, SAM clicks, keep-size).

Numerics follow diffusers' Flux2KleinPipeline (pipelines/flux2/pipeline_flux2_klein.py)
and Flux2KleinInpaintPipeline (pipeline_flux2_klein_inpaint.py): Qwen3 prompt embeddings,
references shrunk to ~1 MP, centre-cropped to 16 px and appended as tokens with time ids
10, 20, ... (mlx_edit.conditioning.klein), the empirical schedule shift, no guidance
embedding; the distilled models ignore `guidance`, the Base models use it as the true-CFG
scale against an empty prompt (mlx_edit.variants). On a KV folder (klein 9B-KV,
diffusers Flux2KleinKVPipeline, pipeline_flux2_klein_kv.py) the reference tokens attend
only to themselves: their keys/values are computed at the first step and reused at every
later step (`EditJob.reference_kv`, mlx_edit.sampling.compiled.step_inputs); inpainting
there treats its references (the canvas, the reference) the same way (diffusers has no
KV inpaint pipeline). Images are encoded with the VAE posterior mode, as diffusers does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
from PIL import Image

from mlx_edit.conditioning.klein import check_reference
from mlx_edit.imaging.images import InputError, load_image
from mlx_edit.editing import masking
from mlx_edit.editing.kontext import requested_size
from mlx_edit.options import EditOptions, check_prompt
from mlx_edit.editing.masking import mask_or_text
from mlx_edit.editing.pipeline import FluxPipeline
from mlx_edit.sampling.denoise import EditJob
from mlx_edit.sampling.latents_flux2 import image_sizes

DEFAULT_SIZE = (1024, 1024)  # text-to-image (diffusers: default_sample_size 128 x 8 px)


def output_size(first: Image.Image | None, width: int | None, height: int | None
                ) -> tuple[int, int]:
    """The edit's size (W, H): width/height floored to 16 px when given (one alone keeps
    the first image's aspect), else the first image's size shrunk to ~1 MP and floored to
    16 px (diffusers' target size), else 1024 x 1024. InputError under 16 px."""
    if width is None and height is None:
        if first is None:
            return DEFAULT_SIZE
        _, (h, w) = image_sizes(first.size[1], first.size[0])
        return w, h
    return requested_size(first.size if first is not None else DEFAULT_SIZE, width, height)


class FluxKlein(FluxPipeline):
    """FLUX.2 [klein] editing and inpainting. Build with `FluxKlein.from_pretrained(
    "black-forest-labs/FLUX.2-klein-4B")` (or a local diffusers / mlx-edit folder)."""

    VARIANTS = ("klein", "klein-base", "klein-kv")

    def _options(self, options, overrides, mode: str) -> EditOptions:
        """The options resolved for the loaded variant (its defaults and the options it
        refuses: mlx_edit.variants)."""
        return EditOptions.of(options, overrides, mode, self.models.variant_info)

    def edit(self, images, instruction: str, options: EditOptions | None = None, *,
             mask=None, noise: mx.array | None = None,
             progress: Callable[[int, int], None] | None = None,
             **overrides) -> list[Image.Image]:
        """Edit `images` following `instruction`, or generate from it (no images).

        images: None, one image or a list (path, PIL or uint8 (H, W, 3)); all are
        references (each checked: >= 64 px a side, aspect <= 8:1; shrunk to ~1 MP and
        centre-cropped to 16 px); the first sets the output's framing. options:
        EditOptions or its fields as keywords: steps / guidance (defaults from the
        variant: 4 / 1.0 distilled, 50 / 4.0 Base, where guidance > 1 is true CFG against
        `negative_prompt` or ""), width / height (px, floored to 16; default: the first
        image's size shrunk to ~1 MP, or 1024 x 1024), keep_size (returned at the first
        image's own size), seed, num_images, strength (with a mask), grow_mask, feather,
        color_match, blend, soft_mask, crop_to_mask, max_sequence_length (Qwen3 tokens).
        mask: white = edit (path, PIL, array of the first image's size, SAM clicks /
        boxes, or None with mask_text: words, SAM 3): latents outside it are the image's,
        re-noised, after every step, and its pixels are kept exactly outside the grown,
        feathered mask.
        noise: optional packed initial noise (num_images, N, 128) (parity tests).
        Returns num_images PIL images with their parameters in `.info`.
        Raises InputError (bad images, options or mask; prompt too long; a mask without
        an image), before any model loads.
        """
        job = self.edit_job(images, instruction, options, mask=mask, noise=noise,
                            **overrides)
        return self.run(job, job.metadata["masked"], progress)

    def edit_job(self, images, instruction: str, options: EditOptions | None = None, *,
                 mask=None, noise: mx.array | None = None, **overrides) -> EditJob:
        """The prepared EditJob of `edit` (arguments as there), not yet denoised: run it
        with `run(job, job.metadata["masked"])`. Raises as `edit`."""
        o = self._options(options, overrides, "edit")
        mask = mask_or_text(mask, o)
        check_prompt(instruction, "instruction")
        self.models.require("edit")
        refs = [load_image(im) for im in _as_list(images)]
        for i, ref in enumerate(refs):
            check_reference(ref, f"image {i + 1}")
        if mask is not None and not refs:
            raise InputError("a mask needs an image to edit")
        first = refs[0].convert("RGB") if refs else None
        size = output_size(first, o.width, o.height)
        return self.framed_edit_job(first or Image.new("RGB", size), mask, size,
                                    instruction, o, refs, noise)

    def inpaint(self, image, mask, prompt: str, options: EditOptions | None = None, *,
                reference=None, noise: mx.array | None = None,
                progress: Callable[[int, int], None] | None = None,
                **overrides) -> list[Image.Image]:
        """Repaint the white area of `mask` in `image` following `prompt`, optionally
        after a `reference` image (diffusers Flux2KleinInpaintPipeline).

        image: path, PIL or uint8 (H, W, 3). mask: path, PIL or array (white = repaint),
        or SAM clicks / boxes. reference: path, PIL or array, or None. The edited canvas
        (the image, or a ~1 MP window around the mask: crop_to_mask) is encoded once: it
        starts the latents at `strength` (default 1; diffusers' 0.8) and is the first
        reference (time id 10), the reference the second (20); after every step the
        latents outside the mask (at token resolution, bilinear) are the canvas's
        re-noised. options as `edit` (and paste_back); pixels outside the grown,
        feathered mask are the original's exactly (colour matched inside: color_match).
        Returns num_images PIL images of the image's size.
        Raises InputError (bad image, mask, reference or options), before any model loads.
        """
        o = self._options(options, overrides, "inpaint")
        job = self.inpaint_job(image, mask, prompt, o, reference=reference, noise=noise)
        return self.run(job, o.paste_back, progress)

    def inpaint_job(self, image, mask, prompt: str, options: EditOptions | None = None, *,
                    reference=None, noise: mx.array | None = None, **overrides) -> EditJob:
        """The prepared EditJob of `inpaint` (arguments as there), not yet denoised: run
        it with `run(job, options.paste_back)`. Raises as `inpaint`."""
        o = self._options(options, overrides, "inpaint")
        mask = mask_or_text(mask, o)
        check_prompt(prompt)
        self.models.require("inpaint")
        image = load_image(image)
        refs = [] if reference is None else [load_image(reference)]
        for ref in refs:
            check_reference(ref)
        user_mask = self.user_mask(image, mask, o.segment_model)
        model_mask, blend = masking.edit_masks(user_mask, o)
        job = self.prepare(image, model_mask, blend, prompt, o, noise=noise, references=refs,
                           keep_source=True, source_reference=True, metadata={
                               "mode": "inpaint", "grow_mask": o.grow_mask,
                               "feather": o.feather, "reference": reference is not None})
        masking.paste_back_options(job, o, image, user_mask, self.models)
        return job


def _as_list(images) -> list:
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


__all__: Sequence[str] = ("FluxKlein", "output_size")
