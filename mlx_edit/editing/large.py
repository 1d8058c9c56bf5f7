"""Large canvases: when an edit is denoised in windows at its own resolution (tiled
denoising, MultiDiffusion: mlx_edit.sampling.tiles) instead of being shrunk to the
model-size budget, and what that costs.

The pipeline plans an edit window as before (`stitch.plan_crop`, crop-to-mask); when that
window is larger than `max_model_pixels` it would be shrunk for the model. With windows
(`tile_mode` on, or auto without a step cache, whose decisions assume one evaluation
per step) the plan keeps the window at its own resolution (`tiled_plan`) and the
denoise loop evaluates overlapping windows of the budget's size (`windows_for`). The
schedule's shift follows the window's token count (what the model sees per evaluation).
Windows holding no mask token are skipped (their tokens end as the canvas's latents:
`fill_uncovered`), and the tiled VAE passes run only the tiles the kept windows and the
paste-back read (mlx_edit.editing.running: `encode_region`, `decode_region`). A mask
small enough to fit one budget-size window with 64 px of context is edited in that one
window at full resolution (`edit_plan`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_edit.imaging.stitch import CropPlan, plan_crop, plan_native_window
from mlx_edit.options import GLOBAL_PASS_STRENGTH, EditOptions
from mlx_edit.progress import add_run, labelled
from mlx_edit.sampling.latents import token_grid
from mlx_edit.sampling.tiles import Windows, plan_windows

__all__ = ["Windows", "check_memory", "edit_estimate", "edit_plan", "first_pass", "job_windows", "metadata", "refine", "refine_strength",
           "schedule_tokens", "tiled_plan", "windows_for"]

MAX_WINDOW_BATCH = 4  # windows stacked per evaluation when memory allows
AUTO_MARGIN = 1.1  # auto: as plan_crop, a canvas up to 10% over the budget is left whole
TOKEN_PX = 16  # image pixels per packed token side (VAE factor 8 x 2x2 patches)


def _blocked(o: EditOptions) -> bool:
    """A step cache: its decisions assume one evaluation per step (auto falls back)."""
    return o.cache is not None


def tiles_allowed(o: EditOptions) -> bool:
    """Whether this edit may be denoised in windows (tile_mode on, or auto unblocked)."""
    return o.tile_mode == "on" or (o.tile_mode == "auto" and not _blocked(o))


def _limit(o: EditOptions) -> float:
    return o.max_model_pixels * (AUTO_MARGIN if o.tile_mode == "auto" else 1.0)


def tiled_plan(plan: CropPlan, o: EditOptions) -> CropPlan:
    """`plan` at its window's own resolution (1:1, padded to multiples of 16) when
    windows are allowed and the plan would shrink a window larger than the budget;
    otherwise `plan` unchanged (windows or not, the box is the same)."""
    w, h = plan.window_size
    if not (tiles_allowed(o) and plan.resized and w * h > _limit(o)
            and plan.model_size[0] * plan.model_size[1] < w * h):
        return plan
    size = (-(-w // TOKEN_PX) * TOKEN_PX, -(-h // TOKEN_PX) * TOKEN_PX)
    return replace(plan, model_size=size, resized=False)


def edit_plan(image_size: tuple[int, int], blend, crop_to_mask: bool | None,
              plan: CropPlan | None, o: EditOptions | None) -> CropPlan:
    """The crop plan of an edit (`plan` when given, else `stitch.plan_crop` around the
    blend with the budget `o.max_model_pixels` as its target), at its window's own
    resolution when windows are used (`tiled_plan`). When windows are allowed and that
    window exceeds the budget, a mask whose bbox (of the blend) plus 64 px of context on
    every side fits the budget is edited in ONE window of the budget's size at full
    resolution around it (`stitch.plan_native_window`): a small edit on a large photo
    costs one model-size edit."""
    o = o or EditOptions()
    if plan is None:
        target = o.max_model_pixels if crop_to_mask is not False else None
        plan = plan_crop(image_size, blend, target, crop=crop_to_mask)
        w, h = plan.window_size
        if crop_to_mask is not False and plan.resized and tiles_allowed(o) \
                and w * h > _limit(o):  # windows: one at full resolution if the mask fits
            one = plan_native_window(image_size, blend, o.max_model_pixels)
            if one is not None:
                return one
    return tiled_plan(plan, o)


def check_memory(models, plan: CropPlan, o: EditOptions | None, num_images: int,
                 cache, references: Sequence[tuple[int, int]] = (),
                 source_reference: bool = False) -> None:
    """`memory.check_fits` for an edit on `plan` (one window at a time when windowed) with
    `models` (a pipeline's mlx_edit.editing.components.Models: `memory_estimate`,
    `low_memory`; `edit_estimate`); InputError listing options that fit."""
    from mlx_edit.editing.memory import check_fits

    o = o or EditOptions()
    est = edit_estimate(models, plan, o, num_images, cache, windows_for(plan, o), references,
                        source_reference)
    check_fits(est, low_memory=models.low_memory)


def edit_estimate(models, plan: CropPlan, o: EditOptions, num_images: int, cache,
                  windows: Windows | None, references: Sequence[tuple[int, int]] = (),
                  source_reference: bool = False):
    """`models.memory_estimate` of an edit on `plan` in `windows` (None: whole) with
    o.max_sequence_length text tokens, a cache state per true-CFG branch, reference images
    encoded at these (width, height) px (as keys/values with a KV variant) and, with
    `source_reference`, the canvas's own tokens as a reference (klein inpainting)."""
    cfg = o.negative_prompt is not None and o.true_cfg_scale > 1.0  # a cache state per branch
    return models.memory_estimate(
        *plan.model_size, num_images, cache, windows=windows, cache_branches=1 + cfg,
        text_tokens=o.max_sequence_length,
        reference_tokens=sum((w // TOKEN_PX) * (h // TOKEN_PX) for w, h in references),
        reference_px=max(references, key=lambda s: s[0] * s[1], default=None),
        reference_kv=models.variant_info.reference_kv, source_reference=source_reference)


def windows_for(plan: CropPlan, o: EditOptions, batch: int = 1,
                keep: np.ndarray | None = None) -> Windows | None:
    """The windows of `plan`'s model canvas (None: one plain evaluation per step). Used
    when windows are allowed and the canvas exceeds the budget; with tile_mode on
    always (a canvas within the budget is then one window, equal to the plain edit).
    keep: (gh, gw) bool tokens to generate: windows without any are skipped
    (`tiles.plan_windows`)."""
    if not tiles_allowed(o):
        return None
    w, h = plan.model_size
    if o.tile_mode == "auto" and w * h <= _limit(o):
        return None
    budget = max(1, o.max_model_pixels // (TOKEN_PX * TOKEN_PX))
    overlap = round(o.tile_overlap / TOKEN_PX)
    return plan_windows(token_grid(h, w), budget, overlap, batch=batch, keep=keep)


def keep_tokens(mask: np.ndarray) -> np.ndarray:
    """(gh, gw) bool: the packed tokens (TOKEN_PX px square) of a canvas-size binary model
    mask (H, W) that hold any mask pixel."""
    h, w = mask.shape
    return (np.asarray(mask) > 0).reshape(h // TOKEN_PX, TOKEN_PX, w // TOKEN_PX,
                                          TOKEN_PX).any(axis=(1, 3))


def fill_uncovered(latents: mx.array, windows: Windows, source: mx.array) -> mx.array:
    """latents (B, N, C) with the tokens no window covered (skipped windows: no mask
    token) replaced by `source` (1|B, N, C): the canvas's own latents."""
    frozen = mx.array(~windows.covered.reshape(1, -1, 1))
    return mx.where(frozen, source.astype(latents.dtype), latents)


def window_batch(windows: Windows, o: EditOptions, fits) -> int:
    """Windows per evaluation: `o.window_batch`, else the most (up to MAX_WINDOW_BATCH
    and the window count) for which `fits(batch)` (the memory check) holds."""
    if o.window_batch is not None:
        return min(o.window_batch, windows.count)
    best = 1
    for k in range(2, min(MAX_WINDOW_BATCH, windows.count) + 1):
        if not fits(k):
            break
        best = k
    return best


def job_windows(models, plan: CropPlan, o: EditOptions, keep: np.ndarray | None = None,
                references: Sequence[tuple[int, int]] = (), source_reference: bool = False
                ) -> Windows | None:
    """`windows_for` the plan (windows without `keep` tokens skipped), batched as the
    memory allows (`window_batch`; `models`: a pipeline's
    mlx_edit.editing.components.Models, `edit_estimate` with these references)."""
    windows = windows_for(plan, o, keep=keep)
    if windows is None or windows.count == 1:
        return windows
    from mlx_edit.editing.memory import GB, available_memory

    key = "peak_low_memory" if models.low_memory else "peak"
    available = available_memory() / GB

    def fits(k: int) -> bool:
        est = edit_estimate(models, plan, o, o.num_images, o.cache,
                            replace(windows, batch=k), references, source_reference)
        return est[key] <= available
    return replace(windows, batch=window_batch(windows, o, fits))


def schedule_tokens(plan: CropPlan, windows: Windows | None) -> int:
    """Image tokens the schedule's shift is computed for: one window's, or the canvas's."""
    if windows is not None:
        return windows.tokens
    w, h = plan.model_size
    gh, gw = token_grid(h, w)
    return gh * gw


def metadata(o: EditOptions, plan: CropPlan, windows: Windows | None) -> dict:
    """What an output records of the tiling: mode, budget, and the windows (count
    evaluated, columns x rows of the whole plan, skipped: those without mask tokens,
    window size and overlap in px, windows per batch) or None."""
    meta = {"tile_mode": o.tile_mode, "max_model_pixels": o.max_model_pixels,
            "windows": None}
    if windows is not None:
        full = windows_for(plan, o)
        rows = len({t for t, _ in full.origins})
        h, w = windows.size
        meta["windows"] = {"count": windows.count, "grid": [full.count // rows, rows],
                           "skipped": full.count - windows.count,
                           "size": [w * TOKEN_PX, h * TOKEN_PX],
                           "overlap": o.tile_overlap, "batch": windows.batch}
    return meta


def generated_ratio(plan: CropPlan, windows: Windows | None) -> float:
    """Pixels generated per output pixel in the edited window: 1.0 (or more, padding)
    when denoised at the window's resolution, (model area / window area) when shrunk."""
    w, h = plan.window_size
    mw, mh = plan.model_size
    return min(1.0, mw * mh / (w * h)) if plan.resized else 1.0


# ---------------------------------------------------------------- two passes


def refine_strength(o: EditOptions) -> float | None:
    """The strength of the refinement pass of a two-pass edit: `detail_pass`, else
    GLOBAL_PASS_STRENGTH with `global_pass`; None for a one-pass edit."""
    if o.detail_pass:
        return o.detail_pass
    return GLOBAL_PASS_STRENGTH if o.global_pass else None


def first_pass(o: EditOptions) -> EditOptions:
    """The options of a two-pass edit's first pass: the edit shrunk to the budget (the
    layout of the whole window at once, `tile_mode` off), one pass."""
    return replace(o, tile_mode="off", detail_pass=0.0, global_pass=False)


def refine(pipe, images: list[Image.Image], model_mask, blend, prompt: str, o: EditOptions,
           *, conditioning=None, progress: Callable[[int, int], None] | None = None
           ) -> list[Image.Image]:
    """The second pass of a two-pass edit (`--detail-pass S`, `--global-pass`): each
    first-pass result (the output's size) is edited again with the same model mask and
    blend (H, W) float32, from `refine_strength(o)`, at full resolution in windows
    (tile_mode on), and pasted back inside the blend only, so outside the mask the pixels
    stay the first pass's (there: the original's). `pipe.prepare` and `pipe.run`: two
    runs of the pipeline, no other loop. conditioning: the first pass's conditioner
    (restyle's Canny/Depth), else the variant's own (Fill). Step caches, soft masks,
    seam repair and ranking apply to the first pass only; ControlNets to both.
    Returns one image per first-pass image; metadata: the refined run's, plus
    `detail_pass` (its strength), `first_pass_model_size` and the first pass's others."""
    strength = refine_strength(o)
    out = []
    for i, img in enumerate(images):
        before = pipe.last_stats
        ro = replace(first_pass(o), tile_mode="on", strength=strength, num_images=1,
                     seed=o.seed + i, cache=None, soft_mask=False,
                     seam_fix=0.0, rank=None, keep_best=None)
        meta = {"detail_pass": strength, "global_pass": o.global_pass,
                "first_pass_model_size": img.info.get("model_size")}
        with labelled("refine"):
            job = pipe.prepare(img, model_mask, blend, prompt, ro,
                               conditioning=conditioning, metadata=meta)
            job.paste = {"color_match": o.color_match, "method": o.blend}
            result = pipe.run(job, True, progress)[0]
        add_run(pipe, before)
        for k, v in img.info.items():  # the first pass's own records (mode, masks...)
            result.info.setdefault(k, v)
        out.append(result)
    return out
