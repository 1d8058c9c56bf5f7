"""FluxFill: inpainting and outpainting with FLUX.1 Fill, restyling with the FLUX.1
Canny/Depth-dev control models, on the shared pipeline machinery (mlx_edit.editing.pipeline).

Numerics follow diffusers' FluxFillPipeline (pipelines/flux/pipeline_flux_fill.py) and
FluxControlPipeline / FluxControlImg2ImgPipeline, with the VAE posterior mode (BFL's
choice, and deterministic) instead of a sample; paste-back, soft masks, seam repair and
ranking are mlx-edit's (mlx_edit.imaging.blend, sampling.soft_mask, ranking).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from PIL import Image

from mlx_edit.editing import large, masking
from mlx_edit.conditioning.bfl_control import bfl_conditioner
from mlx_edit.imaging import masks
from mlx_edit.imaging.blend import seam_band
from mlx_edit.imaging.images import InputError, load_image, load_mask
from mlx_edit.imaging.stitch import outpaint_canvas
from mlx_edit.options import EditOptions, check_canvas, check_prompt, check_used
from mlx_edit.editing.pipeline import FluxPipeline
from mlx_edit.progress import Phase, add_run, labelled, reports_progress
from mlx_edit.sampling.denoise import EditJob

SEAM_STRENGTH = 0.3  # strength of the seam-repair pass (low: redraw the seam, keep content)


class FluxFill(FluxPipeline):
    """FLUX.1 Fill inpainting/outpainting, and restyling with FLUX.1 Canny/Depth-dev.
    Build with `FluxFill.from_pretrained`."""

    VARIANTS = ("fill", "control", "dev")  # dev: with a BFL control LoRA it is "control"

    @reports_progress
    def inpaint(self, image, mask, prompt: str, options: EditOptions | None = None, *,
                progress: Callable[[int, int], None] | None = None,
                **overrides) -> list[Image.Image]:
        """Repaint the white area of `mask` in `image` following `prompt`.

        image: path, PIL image or uint8 (H, W, 3); any size (EXIF orientation honoured).
        mask: path, PIL or array, white = repaint; resized (with a warning) if its size
        differs; or clicks/boxes (`mlx_edit.editing.segment.Points` / `Box`, segmented first with
        SAM 2.1: `user_mask`); or None with mask_text (words, SAM 3: mask_threshold,
        mask_instances, text_segment_model). options: EditOptions, or its fields as
        keywords (steps, guidance, seed, num_images, strength, grow_mask, feather (px),
        paste_back, crop_to_mask (None = automatic: edit a ~1 MP window around the mask
        when the image is large),
        prompt_2, max_sequence_length, ip_adapters / redux (IPAdapterSpec / ReduxSpec:
        the style or subject of reference images), controlnets (ControlNetSpec list:
        structure to keep; several are summed)); defaults and ranges: mlx_edit.options.
        Paste-back (mlx_edit.imaging.blend): color_match "none" | "mean-std" | "histogram"
        (the edit's colours matched to the photo's in a ring around the mask), blend
        "feather" | "poisson" (seamless cloning; the [blend] extra). soft_mask: the mask's
        grey levels are per-pixel strengths (differential diffusion,
        mlx_edit.sampling.soft_mask); everything > 0 is pasted back. seam_fix: px; > 0 runs
        a second pass at strength SEAM_STRENGTH over a band of that half-width around the
        blend boundary. rank "clip": candidates ordered by CLIP similarity of the edited
        region to the prompt (mlx_edit.editing.ranking; scores in the metadata), keep_best K kept;
        rank_model: a CLIPModel folder or repo (default: the model folder's `ranker/`).
        Returns num_images PIL images of the input's size (seeds seed, seed+1, ...).
        Raises InputError (bad input: a bad option, empty mask, prompt too long; a
        Canny/Depth transformer loaded instead of Fill), before any model loads.
        """
        o = EditOptions.of(options, overrides, "inpaint")
        mask = masking.mask_or_text(mask, o)
        if large.refine_strength(o):  # two runs: shrunk, then refined at full resolution
            image = load_image(image)
            user_mask = self.user_mask(image, mask, o.segment_model)
            first = self.inpaint(image, user_mask, prompt, large.first_pass(o), progress=progress)
            return large.refine(self, first, *masking.edit_masks(user_mask, o), prompt, o,
                                progress=progress)
        job = self.inpaint_job(image, mask, prompt, o)
        images = self.run(job, o.paste_back, progress)
        if o.seam_fix:
            band = seam_band(job.blend, o.seam_fix)
            images = [self._seam_pass(img, band, prompt, job.paste, o, seed=o.seed + i)
                      for i, img in enumerate(images)]
        if o.rank:
            from mlx_edit.editing.ranking import rank_candidates

            with Phase(self.last_stats, "rank"):
                images = rank_candidates(images, prompt, job.blend, keep_best=o.keep_best,
                                         rank_model=o.rank_model, model_root=self.models.root,
                                         dtype=self.models.dtype)
        return images

    def inpaint_job(self, image, mask, prompt: str, options: EditOptions | None = None,
                    **overrides) -> EditJob:
        """The prepared EditJob of `inpaint` (arguments as there), not yet denoised: run it
        with `run(job, options.paste_back)` (seam_fix, rank and the two-pass options
        detail_pass / global_pass are `inpaint`'s own runs around it). Raises as `inpaint`."""
        o = EditOptions.of(options, overrides, "inpaint")
        mask = masking.mask_or_text(mask, o)
        check_prompt(prompt)
        self.models.require("inpaint")
        image = load_image(image)
        user_mask = self.user_mask(image, mask, o.segment_model)
        model_mask, blend = masking.edit_masks(user_mask, o)
        self._check_passes(blend, o)
        job = self.prepare(image, model_mask, blend, prompt, o, metadata={
            "mode": "inpaint", "grow_mask": o.grow_mask, "feather": o.feather,
            "seam_fix": o.seam_fix or None})
        masking.paste_back_options(job, o, image, user_mask, self.models)
        return job

    def _check_passes(self, blend: np.ndarray, o: EditOptions) -> None:
        """Before the edit: seam_fix needs a mask boundary, rank a ranking CLIP that can
        be found and read (InputError / WeightLoadError), not after minutes of work."""
        if o.seam_fix and (blend >= 0.5).all():
            raise InputError("seam_fix redraws the mask's boundary, but the mask covers the "
                             "whole image: set seam_fix 0 or give a smaller mask")
        if o.rank:
            from mlx_edit.weights.ranker import check_ranker_folder, resolve_ranker

            check_ranker_folder(resolve_ranker(o.rank_model, self.models.root))

    def _seam_pass(self, image: Image.Image, band: np.ndarray, prompt: str, paste: dict,
                   o: EditOptions, seed: int) -> Image.Image:
        """Regenerate `band` of a finished edit at SEAM_STRENGTH; keeps its metadata."""
        weights = masks.blend_mask(band, 0, 2)
        seam = dataclasses.replace(EditOptions(), steps=o.steps, guidance=o.guidance,
                                   crop_to_mask=o.crop_to_mask, prompt_2=o.prompt_2,
                                   max_sequence_length=o.max_sequence_length, seed=seed,
                                   strength=SEAM_STRENGTH)
        before = self.last_stats
        with labelled("seam"):
            job = self.prepare(image, band, weights, prompt, seam, metadata=dict(image.info))
            job.paste = paste
            out = self.run(job, True)[0]
        add_run(self, before)
        out.info.update({k: v for k, v in image.info.items()})  # the first pass's values
        return out

    @reports_progress
    def outpaint(self, image, prompt: str, options: EditOptions | None = None, *,
                 progress: Callable[[int, int], None] | None = None,
                 **overrides) -> list[Image.Image]:
        """Extend `image` by left/right/top/bottom px, generating the new border.

        options: EditOptions or its fields as keywords (left, right, top, bottom, overlap,
        and the common ones of `inpaint` except strength/grow_mask/feather/paste_back).
        The original is kept exactly except for an `overlap` px band along each extended
        side, which is regenerated and blended so the seam does not show.
        Returns PIL images of size (W + left + right, H + top + bottom).
        Raises InputError (no expansion, bad values, a canvas too large for the machine,
        checked before it is allocated; not a Fill transformer).
        """
        o = EditOptions.of(options, overrides, "outpaint")
        if large.refine_strength(o):  # two runs: shrunk, then refined at full resolution
            image = load_image(image)  # once, for both runs
            first = self.outpaint(image, prompt, large.first_pass(o), progress=progress)
            _, model_mask, blend = outpaint_canvas(image, o.left, o.right, o.top, o.bottom,
                                                   overlap=o.overlap)
            return large.refine(self, first, model_mask, blend, prompt, o, progress=progress)
        return self.run(self.outpaint_job(image, prompt, o), True, progress)

    def outpaint_job(self, image, prompt: str, options: EditOptions | None = None,
                     **overrides) -> EditJob:
        """The prepared EditJob of `outpaint` (arguments as there), not yet denoised: run
        it with `run(job, True)` (detail_pass / global_pass are `outpaint`'s own second
        run). Raises as `outpaint`."""
        o = EditOptions.of(options, overrides, "outpaint")
        check_prompt(prompt)
        self.models.require("outpaint")
        image = load_image(image)
        w, h = image.size
        check_canvas(w + o.left + o.right, h + o.top + o.bottom)
        canvas, model_mask, blend = outpaint_canvas(image, o.left, o.right, o.top, o.bottom,
                                                    overlap=o.overlap)
        return self.prepare(canvas, model_mask, blend, prompt, o, metadata={
            "mode": "outpaint", "expand": [o.left, o.right, o.top, o.bottom],
            "overlap": o.overlap}, inner=(o.left, o.top, o.left + w, o.top + h))

    @reports_progress
    def restyle(self, image, control_image, prompt: str, options: EditOptions | None = None,
                *, mask=None, progress: Callable[[int, int], None] | None = None,
                **overrides) -> list[Image.Image]:
        """Repaint `image` following `prompt` while keeping the structure (edges or depth)
        of `control_image`, with FLUX.1 Canny-dev / Depth-dev (in_channels 128).

        control_image: path, PIL or array, the same framing as `image`; None = `image`
        itself (for canny). options: EditOptions or its fields as keywords: control_type
        "canny" (edges computed here; canny_low / canny_high on the 0-255 scale, BFL's
        50/200), "depth" or "none" (a ready-made map, used as given), and the common ones
        of `inpaint` except the image prompts and ControlNets.
        mask: None = the whole image; else white = restyle, and outside the grown and
        feathered mask the original is kept exactly (crop_to_mask as in `inpaint`).
        strength < 1 starts from the image (img2img). guidance None: 30 for canny and
        none, 10 for depth (BFL's defaults).
        Returns num_images PIL images of the input's size (seeds seed, seed+1, ...).
        Raises InputError (not a Canny/Depth transformer, depth without a control image,
        bad options, empty mask, prompt too long).
        """
        o = EditOptions.of(options, overrides, "restyle")
        check_used(o, masked=mask is not None)
        check_prompt(prompt)
        self.models.require("restyle")
        image = load_image(image)
        if control_image is None and o.control_type != "canny":
            raise InputError(f"--control-type {o.control_type} needs --control-image (a "
                             "ready-made map: no depth estimator is bundled)")
        user_mask = None if mask is None else load_mask(mask, image.size)
        if user_mask is None:
            model_mask = blend = np.ones(image.size[::-1], np.float32)
        else:
            model_mask, blend = masking.edit_masks(user_mask, o)
        conditioner = bfl_conditioner(image if control_image is None else control_image,
                                      o.control_type, canny_low=o.canny_low,
                                      canny_high=o.canny_high)
        if large.refine_strength(o):  # two runs: shrunk, then refined at full resolution
            first = self.restyle(image, control_image, prompt, large.first_pass(o), mask=mask,
                                 progress=progress)
            return large.refine(self, first, model_mask, blend, prompt, o,
                                conditioning=conditioner, progress=progress)
        job = self.prepare(image, model_mask, blend, prompt, o, conditioning=conditioner,
                           metadata={"mode": "restyle", "control_type": o.control_type,
                                     "masked": mask is not None, "grow_mask": o.grow_mask,
                                     "feather": o.feather})
        if user_mask is not None:
            masking.paste_back_options(job, o, image, user_mask, self.models)
        return self.run(job, o.paste_back, progress)
