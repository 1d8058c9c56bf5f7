"""FLUX.2 [klein] references: checked, sized, VAE-encoded, appended as sequence tokens.

As diffusers' Flux2KleinPipeline / Flux2KleinInpaintPipeline (pipelines/flux2/
pipeline_flux2_klein.py, pipeline_flux2_klein_inpaint.py, image_processor.py): a
reference image is refused below 64 px a side or beyond an 8:1 aspect ratio
(`check_image_input`), shrunk to about one megapixel (Lanczos) when larger
(`_resize_to_target_area`), centre-cropped to multiples of 16 px (`resize_mode="crop"`),
encoded with the VAE posterior mode and normalised by the family (batch-norm statistics,
128-channel tokens). Reference i gets position ids (10 + 10 i, row, col, 0)
(`_prepare_image_ids`, scale 10); the loop appends the tokens after the target's and keeps
the velocity of the target tokens only. For inpainting the edited canvas itself is the
first reference (its latents encoded once, shared with the source-keeping hook), the
optional reference image the second.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_edit.conditioning.context import ConditioningContext
from mlx_edit.imaging.images import InputError, to_array
from mlx_edit.sampling.latents_flux2 import image_sizes, reference_ids

MULTIPLE = 16  # px: VAE factor 8 x 2x2 patches
MIN_SIDE, MAX_ASPECT = 64, 8  # diffusers Flux2ImageProcessor.check_image_input


def check_reference(image: Image.Image, what: str = "reference image") -> None:
    """InputError for an image under 64 px a side or with an aspect ratio beyond 8:1."""
    w, h = image.size
    if min(w, h) < MIN_SIDE:
        raise InputError(f"{what} is {w}x{h} px: both sides must be at least {MIN_SIDE} px")
    if max(w / h, h / w) > MAX_ASPECT:
        raise InputError(f"{what} is {w}x{h} px: the aspect ratio must be at most "
                         f"{MAX_ASPECT}:1")


def prepare_reference(image: Image.Image) -> Image.Image:
    """A reference as the model sees it: checked, shrunk to ~1 MP (Lanczos), centre-cropped
    to multiples of 16 px, RGB (`latents_flux2.image_sizes`). Raises InputError
    (`check_reference`)."""
    check_reference(image)
    image = image.convert("RGB")
    (h, w), (ch, cw) = image_sizes(image.size[1], image.size[0])
    if (w, h) != image.size:
        image = image.resize((w, h), Image.LANCZOS)
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch))


def reference_size(width: int, height: int, auto_resize: bool = True) -> tuple[int, int]:
    """(width, height) px a `width` x `height` reference is encoded at (`prepare_reference`:
    ~1 MP, multiples of 16 px). auto_resize is Kontext's option, unused here."""
    _, (h, w) = image_sizes(height, width)
    return w, h


def klein_tokens(ctx: ConditioningContext, references: Sequence[Image.Image],
                 auto_resize: bool = True,
                 source: tuple[mx.array, tuple[int, int]] | None = None
                 ) -> tuple[mx.array, mx.array]:
    """(tokens (1, M, C) in ctx.dtype, ids (M, 4) float32) of the references in order,
    after `source` ((1, h*w, C) packed latents of the edited canvas, (h, w) token grid)
    when given. auto_resize is Kontext's option and has no effect here (klein sizes every
    reference as `prepare_reference`). Raises InputError (no reference and no source;
    `check_reference`)."""
    parts = [] if source is None else [source]
    for image in references:
        im = prepare_reference(image)
        parts.append((ctx.encode_image(to_array(im)),
                      (im.size[1] // MULTIPLE, im.size[0] // MULTIPLE)))
    if not parts:
        raise InputError("no reference image")
    tokens = mx.concatenate([p.astype(ctx.dtype) for p, _ in parts], axis=1)
    return tokens, reference_ids([grid for _, grid in parts])


def token_mask(mask: mx.array) -> mx.array:
    """A binary pixel mask (B, H, W), 1 = generate, at token resolution (B, (H/16)(W/16),
    1): torch's bilinear `interpolate` (align_corners False, no antialias) to the token
    grid, which for a factor of 16 is the mean of the 2x2 pixels at offsets 7 and 8 of
    each 16x16 block (diffusers Flux2KleinInpaintPipeline.prepare_mask_latents)."""
    m = np.asarray(mask, dtype=np.float32)
    b, hp, wp = m.shape
    if hp % MULTIPLE or wp % MULTIPLE:
        raise ValueError(f"mask size {hp}x{wp} px must be a multiple of {MULTIPLE}")
    blocks = m.reshape(b, hp // MULTIPLE, MULTIPLE, wp // MULTIPLE, MULTIPLE)
    centre = blocks[:, :, 7:9, :, 7:9].mean(axis=(2, 4))
    return mx.array(centre.reshape(b, -1, 1))
