"""Editing geometry: paste-back, padding, crop-to-mask and stitch, outpaint canvas.

Pure Pillow/numpy (no mlx). The pipeline's flow for an edit is

    plan = plan_crop(image.size, blend)                 # window around the mask
    canvas, model_mask = crop_for_model(image, mask, plan)   # model_mask binarized
    edited = <FLUX Fill on canvas, model_mask>          # PIL, plan.model_size
    result = stitch_back(image, edited, plan, blend)    # exact outside the blend

with `mask = grow_mask(user_mask, g)` and `blend = blend_mask(user_mask, g, f)` from
`mlx_edit.imaging.masks`.
Masks are float32 (H, W) in [0, 1], 1 = repaint; sizes are PIL `(width, height)`;
boxes are `(left, top, right, bottom)` with right/bottom exclusive.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image

from mlx_edit.imaging.blend import blend_images
from mlx_edit.imaging.images import EmptyMaskError, InputError
from mlx_edit.imaging.masks import binarize_mask, mask_bbox

# ---------------------------------------------------------------- paste-back


def paste_back(original: Image.Image, edited: Image.Image, blend: np.ndarray) -> Image.Image:
    """Blend `edited` over `original`: out = round(o * (1 - b) + e * b) in float32.

    Pixels with b == 0 (or NaN) are copied from `original` bit for bit (never through
    float); b == 1 gives `edited` exactly. Both images are taken as RGB.
    Args: original, edited PIL of the same size (W, H); blend float (H, W), clipped to
      [0, 1]. Returns: new PIL RGB image. Raises: ValueError on size mismatch.
    """
    if original.size != edited.size:
        raise ValueError(f"paste_back: sizes differ {original.size} vs {edited.size}")
    o = np.asarray(original.convert("RGB"))
    e = np.asarray(edited.convert("RGB"))
    b = np.asarray(blend, dtype=np.float32)
    if b.shape != o.shape[:2]:
        raise ValueError(f"paste_back: blend shape {b.shape} != image (H, W) {o.shape[:2]}")
    out = o.copy()
    sel = b > 0
    if sel.any():
        bs = np.minimum(b[sel], 1.0)[:, None]
        mixed = o[sel].astype(np.float32) * (1.0 - bs) + e[sel].astype(np.float32) * bs
        out[sel] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return Image.fromarray(out, "RGB")


# ---------------------------------------------------------------- padding


class Padding(NamedTuple):
    """Pixels added on the right and bottom (the top-left corner stays at (0, 0))."""

    right: int
    bottom: int


def pad_to_multiple(x: Image.Image | np.ndarray, multiple: int = 16):
    """Pad on the right/bottom so both sides are multiples of `multiple`.

    Images are edge-replicated; arrays (masks, (H, W) or (H, W, C)) are padded with 0
    (keep). Returns: (padded, Padding); `unpad(padded, padding)` restores the input size.
    """
    if isinstance(x, Image.Image):
        w, h = x.size
    else:
        h, w = x.shape[:2]
    pad = Padding(-w % multiple, -h % multiple)
    if pad == (0, 0):
        return (x.copy(), pad)
    if isinstance(x, Image.Image):
        a = np.asarray(x)
        widths = [(0, pad.bottom), (0, pad.right)] + [(0, 0)] * (a.ndim - 2)
        return Image.fromarray(np.pad(a, widths, mode="edge"), x.mode), pad
    widths = [(0, pad.bottom), (0, pad.right)] + [(0, 0)] * (x.ndim - 2)
    return np.pad(x, widths, mode="constant"), pad


def unpad(x: Image.Image | np.ndarray, padding: Padding):
    """Crop `padding` off the right/bottom of an image or array (inverse of padding)."""
    if isinstance(x, Image.Image):
        w, h = x.size
        return x.crop((0, 0, w - padding.right, h - padding.bottom))
    h, w = x.shape[:2]
    return x[: h - padding.bottom, : w - padding.right]


# ---------------------------------------------------------------- crop to mask


@dataclass(frozen=True)
class CropPlan:
    """Where the model canvas comes from and how it maps back.

    image_size: (W, H) of the original. box: the window in original pixels
    (left, top, right, bottom). model_size: (W, H) of the model canvas, multiples of 16.
    resized: True -> window resized (Lanczos) to model_size and back; False -> window
    copied 1:1 and edge-padded on the right/bottom up to model_size.
    """

    image_size: tuple[int, int]
    box: tuple[int, int, int, int]
    model_size: tuple[int, int]
    resized: bool

    @property
    def window_size(self) -> tuple[int, int]:
        x0, y0, x1, y1 = self.box
        return x1 - x0, y1 - y0

    @property
    def cropped(self) -> bool:
        return self.box != (0, 0, *self.image_size)


def _round_up(v: int, multiple: int) -> int:
    return -(-v // multiple) * multiple


def _round_to(v: float, multiple: int) -> int:
    return max(multiple, int(round(v / multiple)) * multiple)


def _place(length: int, lo: int, hi: int, limit: int) -> int:
    """Start of a window of `length` centred on [lo, hi), kept inside [0, limit)."""
    start = int(math.floor((lo + hi - length) / 2))
    start = min(max(start, 0), limit - length)
    return max(min(start, lo), hi - length)  # float rounding must never cut the bbox


def plan_crop(
    image_size: tuple[int, int],
    mask: np.ndarray,
    target_pixels: int | None = 1024 * 1024,
    *,
    context: float = 0.5,
    min_context: int = 64,
    max_aspect: float = 2.0,
    crop: bool | None = None,
    multiple: int = 16,
) -> CropPlan:
    """Choose the model canvas: a window around the mask, sized for the model.

    Window: the bbox of `mask >= 0.5` grown on every side by max(min_context,
    context * longer bbox side); each side at least sqrt(target_pixels) / 2 (so upscaling
    stays <= ~2x and the model sees context); the short side enlarged so the aspect is at
    most `max_aspect`; then matched to the model canvas aspect; clamped to the image.
    Pass the *blend* mask (or make min_context exceed its reach) so the blend never
    touches the window edge.
    Rule (crop=None): crop when the image area > 1.1 * target_pixels or the window is under
    half the image area; a cropped window is resized to ~target_pixels (up or down). Not
    cropped: the whole image, copied 1:1 and padded to a multiple of 16 when its area is
    <= 1.1 * target_pixels, else resized to ~target_pixels. crop=True/False forces it;
    target_pixels=None means the whole image 1:1 (no crop, no resize).
    Args: image_size (W, H); mask float (H, W).
    Returns: CropPlan. Raises: EmptyMaskError (no pixel >= 0.5), ValueError (shape).
    """
    w, h = int(image_size[0]), int(image_size[1])
    full = (0, 0, w, h)
    if np.shape(mask) != (h, w):
        raise ValueError(f"plan_crop: mask shape {np.shape(mask)} != image (H, W) {(h, w)}")
    native = CropPlan((w, h), full, (_round_up(w, multiple), _round_up(h, multiple)), False)
    if target_pixels is None:
        return native
    box = mask_bbox(np.asarray(mask) >= 0.5)
    if box is None:
        raise EmptyMaskError("mask is empty: no pixel is >= 0.5, nothing to edit")
    bw, bh = box[2] - box[0], box[3] - box[1]
    margin = max(min_context, context * max(bw, bh))
    min_side = math.sqrt(target_pixels) / 2
    ww, wh = max(bw + 2 * margin, min_side), max(bh + 2 * margin, min_side)
    ww, wh = max(ww, wh / max_aspect), max(wh, ww / max_aspect)
    ww, wh = min(ww, w), min(wh, h)
    if crop is None:
        crop = w * h > 1.1 * target_pixels or ww * wh < 0.5 * w * h
    if not crop:
        if w * h <= 1.1 * target_pixels:
            return native
        ww, wh, box = w, h, full
    scale = math.sqrt(target_pixels / (ww * wh))
    mw, mh = _round_to(ww * scale, multiple), _round_to(wh * scale, multiple)
    # Grow the window to the canvas aspect so the resize does not distort.
    s = min(mw / ww, mh / wh)
    ww, wh = min(w, max(1, round(mw / s))), min(h, max(1, round(mh / s)))
    x0 = _place(ww, box[0], box[2], w)
    y0 = _place(wh, box[1], box[3], h)
    return CropPlan((w, h), (x0, y0, x0 + ww, y0 + wh), (mw, mh), True)


def plan_native_window(image_size: tuple[int, int], blend: np.ndarray, max_pixels: int, *,
                       min_context: int = 64, multiple: int = 16) -> CropPlan | None:
    """One model-size window at the photo's own resolution around a small mask: the bbox
    of `blend > 0` grown by `min_context` px on every side, then both sides scaled up
    together (more context) to at most `max_pixels`, multiples of `multiple`, clamped
    to the image (a clamped side gives its share to the other) and centred on the mask.
    Returns a 1:1 CropPlan (not resized), or None when the bbox and its context do not
    fit `max_pixels` (a larger edit: windows or a shrunk window, `plan_crop`).
    Args: image_size (W, H); blend float (H, W)."""
    w, h = int(image_size[0]), int(image_size[1])
    box = mask_bbox(np.asarray(blend) > 0)
    if box is None:
        raise EmptyMaskError("mask is empty: nothing to edit")
    need_w = min(w, box[2] - box[0] + 2 * min_context)
    need_h = min(h, box[3] - box[1] + 2 * min_context)
    if _round_up(need_w, multiple) * _round_up(need_h, multiple) > max_pixels:
        return None
    k = math.sqrt(max_pixels / (need_w * need_h))
    ww = min(w, max(need_w, int(need_w * k) // multiple * multiple))
    wh = min(h, max(need_h, int(max_pixels // _round_up(ww, multiple)) // multiple * multiple))
    ww = min(w, max(ww, int(max_pixels // _round_up(wh, multiple)) // multiple * multiple))
    x0, y0 = _place(ww, box[0], box[2], w), _place(wh, box[1], box[3], h)
    return CropPlan((w, h), (x0, y0, x0 + ww, y0 + wh),
                    (_round_up(ww, multiple), _round_up(wh, multiple)), False)


def crop_for_model(
    image: Image.Image, mask: np.ndarray | None, plan: CropPlan, *, binarize: bool = True
) -> tuple[Image.Image, np.ndarray | None]:
    """Cut the plan's window out of the image (and mask) and bring it to model_size.

    Resized plans use Lanczos for the image (as diffusers' VaeImageProcessor) and bilinear
    for the float mask; 1:1 plans edge-pad the image and zero-pad the mask (keep).
    Returns: (PIL RGB of plan.model_size, mask float32 (mh, mw) binarized with
    `binarize_mask` unless binarize=False, or None when mask is None).
    """
    if image.size != plan.image_size:
        raise ValueError(f"crop_for_model: image size {image.size} != plan {plan.image_size}")
    x0, y0, x1, y1 = plan.box
    win = image.convert("RGB").crop(plan.box)
    m = None if mask is None else np.asarray(mask, dtype=np.float32)[y0:y1, x0:x1]
    if plan.resized:
        win = win.resize(plan.model_size, Image.LANCZOS)
        if m is not None:
            m = np.asarray(Image.fromarray(m, "F").resize(plan.model_size, Image.BILINEAR))
    else:
        mw, mh = plan.model_size
        pad = Padding(mw - (x1 - x0), mh - (y1 - y0))
        a = np.asarray(win)
        win = Image.fromarray(np.pad(a, ((0, pad.bottom), (0, pad.right), (0, 0)), "edge"))
        if m is not None:
            m = np.pad(m, ((0, pad.bottom), (0, pad.right)))
    if m is not None:
        m = binarize_mask(m) if binarize else np.clip(m, 0.0, 1.0).astype(np.float32)
    return win, m


def stitch_back(
    original: Image.Image, edited: Image.Image, plan: CropPlan, blend: np.ndarray, *,
    color_match: str = "none", method: str = "feather",
) -> Image.Image:
    """Map the model output back into the original and blend it in.

    The model output (plan.model_size) is resized (Lanczos) or un-padded to the window,
    then `paste_back` into the window with `blend[window]`. Pixels outside the window,
    and inside it where blend == 0, are bit-identical to `original`. Blend weight
    outside the window is ignored with a warning naming the options that avoid it.
    color_match ("none" | "mean-std" | "histogram") and method ("feather" | "poisson")
    run first, inside the window (`mlx_edit.imaging.blend.blend_images`; "poisson" needs
    the `[blend]` extra, OpenCV).
    Args: original PIL (plan.image_size); edited PIL (plan.model_size); blend float (H, W).
    Returns: new PIL RGB image of the original's size.
    Raises: InputError (unknown method, OpenCV missing), ValueError (sizes).
    """
    if edited.size != plan.model_size:
        raise ValueError(f"stitch_back: edited size {edited.size} != plan {plan.model_size}")
    b = np.asarray(blend, dtype=np.float32)
    x0, y0, x1, y1 = plan.box
    inside = b[y0:y1, x0:x1]
    if float(b.sum()) > float(inside.sum()) + 1e-3:
        warnings.warn("the feathered mask extends outside the edit window; that part is "
                      "ignored (lower --feather or --grow-mask, or edit the whole image: "
                      "--no-crop-to-mask)", stacklevel=2)
    if plan.resized:
        edited = edited.convert("RGB").resize(plan.window_size, Image.LANCZOS)
    else:
        edited = edited.crop((0, 0, *plan.window_size))
    out = original.convert("RGB")  # a copy
    window = out.crop(plan.box)
    pasted = blend_images(window, edited, inside, color_match_method=color_match,
                          method=method)
    out.paste(pasted, plan.box[:2])
    return out


# ---------------------------------------------------------------- outpaint


class Outpaint(NamedTuple):
    """canvas: PIL RGB with the original at (left, top); mask: float32 (H, W) model mask,
    1 on the new border plus `overlap` px into the original; blend: float32 (H, W)
    paste-back weights, 1 on the border, a linear ramp across the overlap, 0 beyond."""

    canvas: Image.Image
    mask: np.ndarray
    blend: np.ndarray


def outpaint_canvas(
    image: Image.Image,
    left: int = 0,
    right: int = 0,
    top: int = 0,
    bottom: int = 0,
    *,
    overlap: int = 32,
    fill: str | tuple[int, int, int] = "edge",
) -> Outpaint:
    """Place `image` on a larger canvas for outpainting.

    fill: "edge" (replicate the border, default), "mean" (mean colour), "black" (as BFL's
    demo_st_fill.py), or an RGB tuple. With strength 1 the fill never reaches the model
    (the Fill pipeline zeroes masked pixels); it matters only for strength < 1, where a
    replicated border is a closer start than black.
    overlap: px of the original (only along expanded sides, clamped to the image size)
    that the model regenerates so the seam is redrawn; the blend ramps over them, so
    original pixels farther than `overlap` from an expanded side stay exact.
    Sizes are not rounded: `plan_crop`/`crop_for_model` bring the canvas to multiples of 16.
    Raises: InputError if any expansion is negative or all are 0, or overlap < 0.
    """
    sides = {"left": left, "right": right, "top": top, "bottom": bottom}
    if any(int(v) != v or v < 0 for v in sides.values()) or overlap < 0:
        raise InputError(f"outpaint expansions and overlap must be integers >= 0, got "
                         f"{sides}, overlap={overlap}")
    if not any(sides.values()):
        raise InputError("outpaint needs at least one of left/right/top/bottom > 0")
    src = np.asarray(image.convert("RGB"))
    h, w = src.shape[:2]
    widths = ((top, bottom), (left, right), (0, 0))
    if fill == "edge":
        canvas = np.pad(src, widths, mode="edge")
    else:
        if fill == "mean":
            color = np.rint(src.reshape(-1, 3).mean(axis=0))
        elif fill == "black":
            color = np.zeros(3)
        elif isinstance(fill, (tuple, list)) and len(fill) == 3:
            color = np.asarray(fill)
        else:
            raise InputError(f"fill must be 'edge', 'mean', 'black' or an RGB tuple, got {fill!r}")
        canvas = np.empty((h + top + bottom, w + left + right, 3), np.uint8)
        canvas[:] = np.clip(color, 0, 255).astype(np.uint8)
        canvas[top : top + h, left : left + w] = src
    # Linear ramps inside the original: d = distance in px from an expanded side.
    ramp_x = np.zeros(w, np.float32)
    ramp_y = np.zeros(h, np.float32)
    for on, ramp, n, flip in ((left, ramp_x, w, False), (right, ramp_x, w, True),
                              (top, ramp_y, h, False), (bottom, ramp_y, h, True)):
        ov = min(overlap, n) if on else 0
        if ov:
            r = (ov - np.arange(ov, dtype=np.float32)) / (ov + 1)  # in (0, 1), 0 at ov
            part = ramp[n - ov :][::-1] if flip else ramp[:ov]
            np.maximum(part, r, out=part)
    blend = np.ones(canvas.shape[:2], np.float32)
    blend[top : top + h, left : left + w] = np.maximum(ramp_x[None, :], ramp_y[:, None])
    mask = (blend > 0).astype(np.float32)
    return Outpaint(Image.fromarray(canvas, "RGB"), mask, blend)


def resize_with_mask(image: Image.Image, mask: np.ndarray | None, size: tuple[int, int]
                     ) -> tuple[Image.Image, np.ndarray | None]:
    """The image (Lanczos) and its mask (bilinear, or None) resized to `size`."""
    if image.size == size:
        return image, mask
    if mask is not None:
        mask = np.clip(np.asarray(Image.fromarray(mask.astype(np.float32), "F").resize(
            size, Image.BILINEAR)), 0.0, 1.0)
    return image.resize(size, Image.LANCZOS), mask
