"""FluxKontext: edit by instruction with FLUX.1 Kontext [dev], one or several reference
images, on the shared pipeline machinery (one denoise loop, conditioning, decoding).

Numerics follow diffusers' FluxKontextPipeline (pipelines/flux/pipeline_flux_kontext.py)
and BFL's cli_kontext / sampling.py prepare_kontext: references resized to the preferred
resolution, encoded (posterior mode) and appended as sequence tokens with axis-0 ids 1;
the schedule is shifted for the target's token count; the velocity is taken on the target
tokens. The output defaults to the (first) reference's preferred size, as BFL's CLI.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
from PIL import Image

from mlx_edit.conditioning.kontext import MULTIPLE, reference_size
from mlx_edit.imaging.images import InputError, load_image
from mlx_edit.options import EditOptions, check_prompt, check_used
from mlx_edit.editing.masking import mask_or_text
from mlx_edit.editing.pipeline import FluxPipeline
from mlx_edit.progress import reports_progress
from mlx_edit.sampling.denoise import EditJob


def output_size(first: Image.Image, width: int | None, height: int | None,
                auto_resize: bool = True) -> tuple[int, int]:
    """The edit's size (W, H): width/height floored to multiples of 16 when given (one
    alone keeps the reference's aspect), else the reference's `reference_size`.
    Raises InputError for sizes under 16 px."""
    if width is None and height is None:
        return reference_size(*first.size, auto_resize=auto_resize)
    return requested_size(first.size, width, height)


def requested_size(aspect: tuple[int, int], width: int | None, height: int | None
                   ) -> tuple[int, int]:
    """(W, H) of an edit whose width and/or height are given: one alone keeps `aspect`'s
    (w, h) ratio; both floored to multiples of 16 px (Kontext's and klein's MULTIPLE).
    Raises InputError for sizes under 16 px."""
    w0, h0 = aspect
    width = width if width is not None else round(height * w0 / h0)
    height = height if height is not None else round(width * h0 / w0)
    w, h = int(width) // MULTIPLE * MULTIPLE, int(height) // MULTIPLE * MULTIPLE
    if w < MULTIPLE or h < MULTIPLE:
        raise InputError(f"width and height must be >= {MULTIPLE} px, got {width}x{height}")
    return w, h


class FluxKontext(FluxPipeline):
    """FLUX.1 Kontext instruction editing. Build with `FluxKontext.from_pretrained(
    "black-forest-labs/FLUX.1-Kontext-dev")` (or a local diffusers / mlx-edit folder, or
    `transformer=` a BFL `flux1-kontext-dev.safetensors`)."""

    VARIANTS = ("kontext",)

    @reports_progress
    def edit(self, images, instruction: str, options: EditOptions | None = None, *,
             mask=None, noise: mx.array | None = None,
             progress: Callable[[int, int], None] | None = None,
             **overrides) -> list[Image.Image]:
        """Edit `images` following `instruction` ("make the car red").

        images: one image or a list (path, PIL or uint8 (H, W, 3)); the first is the one
        edited and sets the framing, all are references. options: EditOptions or its
        fields as keywords (mlx_edit.options; defaults: 28 steps, guidance 2.5): width /
        height (output px, multiples of 16; default: the first image's preferred Kontext
        size), keep_size (the edit returned at the first image's own size), auto_resize
        (references at the preferred resolution, as BFL and diffusers, or at their own
        size floored to 16 px), negative_prompt / true_cfg_scale (true classifier-free
        guidance when the scale is above 1: two transformer passes per step), strength,
        grow_mask / feather (px), seed, num_images, ...
        mask: white = edit (path, PIL or array of the first image's size; or clicks/boxes,
        `mlx_edit.editing.segment.Points` / `Box`, segmented first with SAM 2.1; or None
        with mask_text: words, SAM 3): Kontext inpainting (diffusers
        FluxKontextInpaintPipeline): latents start from the image at
        `strength` and, after every step, outside the mask are the image's re-noised;
        the pixels outside the grown, feathered mask are then the (resized, or with
        keep_size the original) image's exactly.
        noise: optional packed initial noise (num_images, N, 64) (parity tests).
        Returns num_images PIL images (seeds seed, seed+1, ...) with parameters in `.info`.
        Raises InputError (no image, unreadable image or mask, bad options, prompt too
        long; a transformer that is not Kontext's 64-channel model).
        """
        job = self.edit_job(images, instruction, options, mask=mask, noise=noise,
                            **overrides)
        return self.run(job, job.metadata["masked"], progress)

    def edit_job(self, images, instruction: str, options: EditOptions | None = None, *,
                 mask=None, noise: mx.array | None = None, **overrides) -> EditJob:
        """The prepared EditJob of `edit` (arguments as there), not yet denoised: run it
        with `run(job, job.metadata["masked"])`. Raises as `edit`."""
        o = EditOptions.of(options, overrides, "edit")
        mask = mask_or_text(mask, o)
        check_used(o, masked=mask is not None)
        check_prompt(instruction, "instruction")
        self.models.require("edit")
        refs = [load_image(im) for im in (images if isinstance(images, (list, tuple))
                                          else [images])]
        if not refs:
            raise InputError("edit needs at least one --image")
        first, size = refs[0], output_size(refs[0], o.width, o.height, o.auto_resize)
        # The whole image, resized to the Kontext size; mapped back at the original size
        # (keep_size) or onto the image resized like the edit.
        return self.framed_edit_job(first.convert("RGB"), mask, size, instruction, o, refs,
                                    noise, reference_resize=o.auto_resize)


__all__: Sequence[str] = ("FluxKontext", "output_size")
