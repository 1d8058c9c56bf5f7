"""The masks of an edit, as functions of what they use: the user's mask (a file, an array,
SAM 2.1 clicks/boxes or SAM 3 words), the model mask and paste-back blend derived from it,
and the paste-back / soft-mask settings of a job.

The pixel operations live in mlx_edit.imaging (masks, stitch); segmentation in
mlx_edit.editing.segment (clicks) and text_segment (words); the soft-mask step hook in
mlx_edit.sampling.soft_mask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_edit.imaging import masks
from mlx_edit.imaging.images import InputError, load_mask, to_array
from mlx_edit.imaging.stitch import crop_for_model
from mlx_edit.options import EditOptions
from mlx_edit.progress import Phase
from mlx_edit.sampling.denoise import EditJob
from mlx_edit.sampling.soft_mask import soft_mask_hook, token_strength

if TYPE_CHECKING:
    from mlx_edit.editing.components import Models


def mask_or_text(mask, o: EditOptions):
    """An edit's `mask` argument, or the `text_segment.TextMask` of `o.mask_text` when
    `mask` is None (the same spec passes again: a method handing its mask on).
    InputError when both a mask and mask_text are given."""
    from mlx_edit.editing.text_segment import TextMask, text_mask

    spec = text_mask(o)
    if spec is None or mask is None or (isinstance(mask, TextMask) and mask == spec):
        return spec if mask is None else mask
    raise InputError("give a mask (or clicks) or mask_text, not both")


def user_mask(image: Image.Image, mask, segment_model: str | None, models: Models,
              stats: dict) -> np.ndarray:
    """The edit mask (H, W) float32 in [0, 1] of `image`: `mask` as a path, PIL or array
    (resized with a warning when its size differs), or `segment.Points` / `segment.Box`
    prompts (one or a list), segmented first with SAM 2.1 (`segment_model`, default the
    model folder's (`models.root`) `segmenter/` when present, else
    facebook/sam2.1-hiera-large; its memory checked with `models.memory_estimate`) and
    freed before anything else loads (the "segment" phase's time into `stats`); or a
    `text_segment.TextMask` (words, SAM 3: the model folder's `text-segmenter/` unless the
    spec names one; its own phases "load_text_segmenter" and "text_segment" into `stats`).
    Raises InputError (bad mask or prompt, memory, no instance of the phrase) and
    WeightLoadError (segmenter)."""
    from mlx_edit.editing.segment import Box, Points
    from mlx_edit.editing.text_segment import TextMask

    if isinstance(mask, TextMask):
        from mlx_edit.editing import text_segment

        return text_segment.mask_for_edit(image, mask, models.root, models.memory_estimate,
                                          models.low_memory, stats)

    prompts = mask if isinstance(mask, (list, tuple)) else [mask]
    if not (prompts and all(isinstance(p, (Points, Box)) for p in prompts)):
        return load_mask(mask, image.size)
    from mlx_edit.editing.segment import find_segmenter, mask_for_edit

    with Phase(stats, "segment"):
        return mask_for_edit(image, prompts, find_segmenter(segment_model, models.root),
                             models.memory_estimate, models.low_memory)


def edit_masks(user_mask: np.ndarray, o: EditOptions) -> tuple[np.ndarray, np.ndarray]:
    """(model mask, paste-back blend) of a user mask with the options' grow/feather;
    with a soft mask everything it touches (> 0) is pasted back."""
    model_mask, blend = masks.edit_masks(user_mask, o.grow_mask, o.feather)
    if o.soft_mask:
        blend = masks.blend_mask((user_mask > 0).astype(np.float32), o.grow_mask, o.feather)
    return model_mask, blend


def paste_back_options(job: EditJob, o: EditOptions, image: Image.Image,
                       user_mask: np.ndarray, models: Models) -> None:
    """Set `job`'s paste-back (colour match, feather/Poisson: imaging.blend) and, with
    `o.soft_mask`, its differential-diffusion hook (sampling.soft_mask): the canvas's
    source latents (prepare's when it encoded them, else encoded here with `models`' VAE),
    the job's initial noise, per-token strengths of the mask."""
    job.paste = {"color_match": o.color_match, "method": o.blend}
    job.metadata.update(color_match=o.color_match, blend=o.blend, soft_mask=o.soft_mask)
    if not o.soft_mask:
        return
    canvas, m = crop_for_model(image, user_mask, job.plan, binarize=False)
    if job.source is None:  # prepare encoded the same canvas when it needed it
        with models.components.using("vae", job.stats):
            job.source = models.encode_image(to_array(canvas))
            mx.eval(job.source)
    job.hook = soft_mask_hook(job.source.astype(models.dtype), job.noise,
                              token_strength(m), job.sigmas)
    job.after_step = None  # the soft mask holds the source itself (Kontext with a mask)
