"""Structural control for FLUX edits: preprocessors, ControlNet specs and per-step hooks.

- Preprocessors turn a control image into the map a ControlNet expects: Canny edges
  (scikit-image), grayscale, blur, tile (down- then up-sampled), or pass-through for a
  ready-made depth / pose / edge map (`none`, `depth`, `pose`).
- `prepare_controls(ctx, specs)` loads the ControlNets, aligns each control image to
  the edit's canvas and crop (`ctx.plan`, via `stitch.crop_for_model`), encodes it (VAE
  posterior mode, scaled, packed; raw [-1, 1] pixels for XLabs) and returns one
  `ControlFn` per spec for the denoise loop. The ControlNet sees the 64-channel noisy
  latents, as diffusers' community Fill + ControlNet pipeline
  (examples/community/pipline_flux_fill_controlnet_Inpaint.py).
The BFL FLUX.1-Canny/Depth-dev models' channel conditioning is in `bfl_control.py`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from PIL import Image, ImageFilter

from mlx_edit.conditioning.context import ConditioningContext
from mlx_edit.imaging.images import InputError, load_image, to_array
from mlx_edit.options import CONTROL_TYPES, DEFAULT_CANNY  # noqa: F401  (one place)
from mlx_edit.imaging.stitch import CropPlan, crop_for_model
from mlx_edit.models.controlnet import FluxControlNet
from mlx_edit.sampling.latents import image_ids, token_grid
from mlx_edit.sampling.tiles import crop

# InstantX / Shakker-Labs Union mode ids (their model cards); 6 = low quality.
UNION_MODES = {"canny": 0, "tile": 1, "depth": 2, "blur": 3, "pose": 4, "gray": 5}
# Control types of the BFL Canny/Depth models: edges computed here, or a ready-made map.
RESTYLE_TYPES = ("canny", "depth", "none")


# ---------------------------------------------------------------- preprocessors


def canny(image: Image.Image, low: float = 100.0, high: float = 200.0,
          sigma: float = 1.0) -> Image.Image:
    """Canny edges, white on black, RGB. Thresholds on the 0-255 gradient scale of the
    grayscale image (comparable to OpenCV's, not bit-identical: skimage smooths with a
    Gaussian of `sigma` px and uses the L2 gradient norm).
    Raises InputError for bad thresholds or when scikit-image is missing."""
    if not 0 <= low <= high:
        raise InputError(f"canny thresholds must satisfy 0 <= low <= high, got {low}, {high}")
    try:
        from skimage.feature import canny as sk_canny
    except ImportError as e:
        raise InputError("--control-type canny needs scikit-image: pip install scikit-image") from e
    gray = np.asarray(image.convert("L"), dtype=np.float64)
    edges = sk_canny(gray, sigma=sigma, low_threshold=low, high_threshold=high)
    return Image.fromarray((edges * 255).astype(np.uint8), "L").convert("RGB")


def preprocess(image: Image.Image, control_type: str, *, canny_low: float = DEFAULT_CANNY[0],
               canny_high: float = DEFAULT_CANNY[1], blur_radius: float = 6.0,
               tile_factor: int = 4) -> Image.Image:
    """Make the control map for `control_type` from an RGB image of the model's size.

    canny: edges; gray: luma replicated to RGB; blur: Gaussian blur (`blur_radius` px);
    tile: downsampled by `tile_factor` (bicubic) and back; depth / pose / none: the image
    as given (a ready-made map: no depth or pose estimator is bundled).
    Returns an RGB PIL image of the same size. Raises InputError for an unknown type.
    """
    if control_type not in CONTROL_TYPES:
        raise InputError(f"unknown control type {control_type!r}; choose from "
                         f"{', '.join(CONTROL_TYPES)}")
    image = image.convert("RGB")
    if control_type == "canny":
        return canny(image, canny_low, canny_high)
    if control_type == "gray":
        return image.convert("L").convert("RGB")
    if control_type == "blur":
        return image.filter(ImageFilter.GaussianBlur(blur_radius))
    if control_type == "tile":
        w, h = image.size
        small = image.resize((max(1, w // tile_factor), max(1, h // tile_factor)), Image.BICUBIC)
        return small.resize((w, h), Image.BICUBIC)
    return image


# ---------------------------------------------------------------- specs


@dataclass
class ControlNetSpec:
    """One ControlNet and its control image for an edit.

    model: repo id, diffusers/mlx-edit folder, x-flux file, or a loaded FluxControlNet.
    image: path, PIL or uint8 (H, W, 3): the control image for the whole input image (for
      outpainting: the extended canvas, or the original, placed where the original sits).
    type: preprocessing (CONTROL_TYPES) and, for Union models, the mode it implies.
    mode: explicit Union mode (overrides `type`'s); only for Union models.
    scale: residual multiplier in [0, 2]; start/end: the active part of the schedule as
      fractions, step i of n runs when i/n >= start and (i+1)/n <= end (diffusers'
      controlnet_keep rule). canny_low / canny_high: Canny thresholds (0-255 scale).
    guidance: the guidance value fed to a guidance-embedding ControlNet (None: the edit's,
      as diffusers' community Fill + ControlNet pipeline; dev-trained ControlNets such as
      InstantX's saw ~3.5, Fill runs at 30).
    """

    model: Any
    image: Any
    type: str = "none"
    mode: int | None = None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    canny_low: float = DEFAULT_CANNY[0]
    canny_high: float = DEFAULT_CANNY[1]
    guidance: float | None = None

    def validate(self) -> None:
        """Check the numbers and the type (InputError with a one-line message)."""
        if self.type not in CONTROL_TYPES:
            raise InputError(f"unknown --control-type {self.type!r}; choose from "
                             f"{', '.join(CONTROL_TYPES)}")
        if not (np.isfinite(self.scale) and 0.0 <= self.scale <= 2.0):
            raise InputError(f"--control-scale must be in [0, 2], got {self.scale}")
        if not (0.0 <= self.start < self.end <= 1.0):
            raise InputError("--control-start/--control-end must satisfy 0 <= start < end <= 1,"
                             f" got {self.start}, {self.end}")
        if self.mode is not None and self.mode < 0:
            raise InputError(f"--control-mode must be >= 0, got {self.mode}")
        if not 0 <= self.canny_low <= self.canny_high:
            raise InputError(f"canny thresholds must satisfy 0 <= low <= high, got "
                             f"{self.canny_low}, {self.canny_high}")

    @property
    def label(self) -> str:
        return self.model.__class__.__name__ if isinstance(self.model, FluxControlNet) \
            else str(self.model)


def union_mode(spec: ControlNetSpec, model: FluxControlNet) -> int | None:
    """The mode id passed to `model` for `spec` (None for non-Union models).

    Raises InputError: a mode for a non-Union model, a Union model without a usable
    type/mode, a mode out of range, or a type that contradicts the model's name
    (e.g. a depth map for a '...-Canny' ControlNet).
    """
    num_mode = model.config.num_mode
    if not num_mode:
        if spec.mode is not None:
            raise InputError(f"{spec.label} is not a Union ControlNet: drop --control-mode")
        named = [t for t in ("canny", "depth", "pose", "tile", "blur", "gray")
                 if t in spec.label.lower().rsplit("/", 1)[-1]]
        if len(named) == 1 and spec.type in UNION_MODES and spec.type != named[0]:
            raise InputError(f"{spec.label} is a {named[0]} ControlNet, not {spec.type}: "
                             f"use --control-type {named[0]} or none")
        return None
    mode = spec.mode if spec.mode is not None else UNION_MODES.get(spec.type)
    if mode is None:
        raise InputError(f"{spec.label} is a Union ControlNet: give --control-type "
                         f"({'|'.join(UNION_MODES)}) or --control-mode N")
    if not 0 <= mode < num_mode:
        raise InputError(f"--control-mode {mode} is out of range for {spec.label} "
                         f"(modes 0..{num_mode - 1})")
    return mode


def step_active(i: int, n: int, start: float, end: float) -> bool:
    """Whether step i of n runs the ControlNet (diffusers' `controlnet_keep`)."""
    return not (i / n < start or (i + 1) / n > end)


# ---------------------------------------------------------------- alignment


def _same_aspect(a: tuple[int, int], b: tuple[int, int], tol: float = 0.02) -> bool:
    return abs(a[0] / a[1] - b[0] / b[1]) <= tol * b[0] / b[1]


def align_control(control: Image.Image, canvas_size: tuple[int, int], plan: CropPlan,
                  spec: ControlNetSpec, inner: tuple[int, int, int, int] | None = None
                  ) -> Image.Image:
    """The preprocessed control map on the model canvas (PIL RGB of plan.model_size).

    `canvas_size`: (W, H) of the edit's input (the outpaint canvas for outpainting).
    A control image of the canvas's size or aspect is resized to it, cut and resized like
    the edit (crop_for_model), then preprocessed at the model's resolution. For
    outpainting, an image of the original's size or aspect (`inner` = the original's box
    on the canvas) is preprocessed at the original's size and placed there on black (no
    control over the new border). Raises InputError when neither matches.
    """
    kw = dict(canny_low=spec.canny_low, canny_high=spec.canny_high)
    control = control.convert("RGB")
    inner_size = None if inner is None else (inner[2] - inner[0], inner[3] - inner[1])
    if control.size != canvas_size and inner_size is not None and (
            control.size == inner_size or (_same_aspect(control.size, inner_size)
                                           and not _same_aspect(control.size, canvas_size))):
        placed = Image.new("RGB", canvas_size)
        placed.paste(preprocess(control.resize(inner_size, Image.LANCZOS), spec.type, **kw),
                     inner[:2])
        return crop_for_model(placed, None, plan)[0]
    if not _same_aspect(control.size, canvas_size):
        w, h = canvas_size
        raise InputError(f"control image {control.size[0]}x{control.size[1]} does not match "
                         f"the image's aspect ratio ({w}x{h}): crop or pad it to the same "
                         "framing")
    if control.size != canvas_size:
        control = control.resize(canvas_size, Image.LANCZOS)
    return preprocess(crop_for_model(control, None, plan)[0], spec.type, **kw)


# ---------------------------------------------------------------- ControlNet hooks


def _check_compatible(model: FluxControlNet, ctx: ConditioningContext,
                      spec: ControlNetSpec) -> None:
    t, c = ctx.transformer, model.config
    for what, ours, theirs in (("hidden size", c.hidden_size, t.hidden_size),
                               ("text width", c.joint_attention_dim, t.joint_attention_dim),
                               ("pooled width", c.pooled_projection_dim,
                                t.pooled_projection_dim)):
        if ours != theirs:
            raise InputError(f"ControlNet {spec.label} has {what} {ours} but the FLUX "
                             f"transformer has {theirs}: it was made for another base model")
    latent = ctx.latent_channels
    if c.kind != "xlabs" and c.in_channels != latent:
        raise InputError(f"ControlNet {spec.label} takes {c.in_channels} input channels, "
                         f"not the VAE's packed {latent}")


def make_control_fn(model: FluxControlNet, cond: mx.array, mode: int | None, spec,
                    ctx: ConditioningContext):
    """A ControlFn for the denoise loop: (latents (B, N, 64), timestep (B,), step,
    window=None) -> ControlResiduals scaled by spec.scale, or None outside [start, end].
    window: (grid, origin, size) in tokens for tiled denoising (sampling.tiles): latents
    are then that window's crop, and the control term and position ids (0-based) are
    cropped to it too."""
    n_steps = ctx.num_steps
    active = [step_active(i, n_steps, spec.start, spec.end) for i in range(n_steps)]
    if not any(active):
        warnings.warn(f"ControlNet {spec.label} is active at no step of {n_steps} "
                      f"(start {spec.start}, end {spec.end})", stacklevel=3)
    w, h = ctx.plan.model_size
    ids = image_ids(*token_grid(h, w))
    embeds = ctx.embeds
    rope = model.rope(ids, embeds.txt.shape[1])
    control = model.embed_control(cond)  # step-independent (XLabs: the hint conv stack)
    mx.eval(control)
    guidance = ctx.guidance if spec.guidance is None else spec.guidance

    windows: dict = {}  # window size -> (ids, rope), built once

    def control_fn(latents: mx.array, timestep: mx.array, i: int, window=None):
        if not active[i]:
            return None
        c, ids_w, rope_w = control, ids, rope
        if window is not None:
            grid, origin, size = window
            c = crop(control, grid, origin, size)
            if size not in windows:
                windows[size] = (image_ids(*size), model.rope(image_ids(*size),
                                                              embeds.txt.shape[1]))
            ids_w, rope_w = windows[size]
        b = latents.shape[0]
        txt = mx.broadcast_to(embeds.txt, (b, *embeds.txt.shape[1:]))
        pooled = mx.broadcast_to(embeds.pooled, (b, embeds.pooled.shape[-1]))
        g = mx.full((b,), guidance, mx.float32) if model.config.guidance_embeds else None
        return model(latents, ids_w, txt, timestep, pooled, g, control=c, mode=mode,
                     scale=spec.scale, rope=rope_w)

    return control_fn


def prepare_controls(ctx: ConditioningContext, controlnets: list[ControlNetSpec]
                     ) -> tuple[list, dict]:
    """(ControlFn hooks for the denoise loop, their metadata) for the edit of `ctx`
    (a context `for_loop`: prompt, guidance and steps known).

    Each spec's model is loaded once (specs naming the same model share it, as diffusers'
    Union multi-condition path; quantized to `ctx.quantize` bits when set, a model given
    as an object is used as it is), checked against the transformer, and its control image
    aligned to ctx.plan and encoded. Several ControlNets are summed by the transformer.
    Metadata: {"controlnets": [...], "control_prepare_s": seconds}. Raises InputError (bad
    spec, image, incompatible model) and WeightLoadError (unloadable ControlNet).
    """
    from mlx_edit.weights.controlnet import load_controlnet

    t0 = time.perf_counter()
    for spec in controlnets:  # all numbers first, before any model is loaded
        spec.validate()
    loaded: dict[str, FluxControlNet] = {}
    fns = []
    for spec in controlnets:
        if isinstance(spec.model, FluxControlNet):
            model = spec.model
        else:
            key = str(Path(str(spec.model)).expanduser())
            if key not in loaded:  # quantized like the transformer when ctx.quantize is set
                loaded[key] = load_controlnet(spec.model, ctx.dtype, quantize=ctx.quantize)
            model = loaded[key]
        _check_compatible(model, ctx, spec)
        mode = union_mode(spec, model)
        control = align_control(load_image(spec.image), ctx.plan.image_size, ctx.plan, spec,
                                ctx.inner)
        pixels = to_array(control)
        if model.config.kind == "xlabs":
            cond = mx.array(pixels)[None].astype(ctx.dtype)
        else:
            cond = ctx.encode_image(pixels)
        mx.eval(cond)
        fns.append(make_control_fn(model, cond, mode, spec, ctx))
    meta = {"controlnets": [
        {"model": s.label, "type": s.type, "mode": s.mode, "scale": s.scale, "start": s.start,
         "end": s.end} for s in controlnets],
        "control_prepare_s": time.perf_counter() - t0}
    return fns, meta
