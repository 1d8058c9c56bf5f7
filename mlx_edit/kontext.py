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
import numpy as np
from PIL import Image

from mlx_edit import variants
from mlx_edit.conditioning.kontext import MULTIPLE, reference_size
from mlx_edit.imaging.images import InputError, load_image
from mlx_edit.pipeline import FluxPipeline

KONTEXT = variants.VARIANTS["kontext"]


def output_size(first: Image.Image, width: int | None, height: int | None,
                auto_resize: bool = True) -> tuple[int, int]:
    """The edit's size (W, H): width/height floored to multiples of 16 when given (one
    alone keeps the reference's aspect), else the reference's `reference_size`.
    Raises InputError for sizes under 16 px."""
    if width is None and height is None:
        return reference_size(*first.size, auto_resize=auto_resize)
    w0, h0 = first.size
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

    def edit(
        self,
        images,
        instruction: str,
        *,
        steps: int = KONTEXT.steps,
        guidance: float = KONTEXT.guidance,
        seed: int = 0,
        num_images: int = 1,
        width: int | None = None,
        height: int | None = None,
        keep_size: bool = False,
        auto_resize: bool = True,
        prompt_2: str | None = None,
        max_sequence_length: int = 512,
        noise: mx.array | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Image.Image]:
        """Edit `images` following `instruction` ("make the car red").

        images: one image or a list (path, PIL or uint8 (H, W, 3)); the first sets the
        output's framing. width / height: output px (multiples of 16; default: the first
        reference's preferred Kontext size). keep_size: return the edit resized (Lanczos)
        to the first image's own size. auto_resize: references at the preferred
        resolution (True, as BFL and diffusers) or at their own size floored to 16 px.
        noise: optional packed initial noise (num_images, N, 64) (parity tests).
        Returns num_images PIL images (seeds seed, seed+1, ...) with parameters in `.info`.
        Raises InputError (no image, unreadable image, bad numbers, prompt too long; a
        transformer that is not Kontext's 64-channel model).
        """
        self._require("edit")
        refs = [load_image(im) for im in (images if isinstance(images, (list, tuple))
                                          else [images])]
        if not refs:
            raise InputError("edit needs at least one --image")
        size = output_size(refs[0], width, height, auto_resize)
        canvas = refs[0].convert("RGB").resize(size, Image.LANCZOS)
        ones = np.ones(size[::-1], np.float32)
        job = self.prepare(
            canvas, ones, ones, instruction, steps=steps, guidance=guidance, seed=seed,
            num_images=num_images, strength=1.0, crop_to_mask=False, prompt_2=prompt_2,
            max_sequence_length=max_sequence_length, noise=noise, references=refs,
            reference_resize=auto_resize,
            metadata={"mode": "edit", "references": len(refs), "keep_size": keep_size},
        )
        out = self.run(job, False, progress)
        if keep_size and out[0].size != refs[0].size:
            out = [_resized(im, refs[0].size) for im in out]
        return out


def _resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` resized to `size` with its `.info` (metadata) kept."""
    out = image.resize(size, Image.LANCZOS)
    out.info.update(image.info)
    return out


__all__: Sequence[str] = ("FluxKontext", "output_size")
