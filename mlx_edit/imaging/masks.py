"""Mask operations: the model-mask binarization, grow (disc dilation), feather, blend.

Pure numpy (no mlx). Masks are float32 (H, W) in [0, 1], 1 = repaint. All operations
work on the mask's bounding box plus their radius, so small masks on 4K frames are cheap.
"""

from __future__ import annotations

import math

import numpy as np


def binarize_mask(mask: np.ndarray) -> np.ndarray:
    """The model-mask rule: values >= 0.5 -> 1.0, else 0.0 (float32, same shape).

    Reference: diffusers `VaeImageProcessor.binarize` (mask_processor, do_binarize=True).
    """
    return (np.asarray(mask) >= 0.5).astype(np.float32)


def mask_bbox(b: np.ndarray) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the non-zero pixels of an (H, W) array, or None.

    right/bottom are exclusive (a PIL crop box). For a soft mask pass `mask >= 0.5`.
    """
    rows = np.flatnonzero(b.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(b.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _region(shape: tuple[int, ...], box: tuple[int, int, int, int], margin: int):
    x0, y0, x1, y1 = box
    h, w = shape[:2]
    return (slice(max(0, y0 - margin), min(h, y1 + margin)),
            slice(max(0, x0 - margin), min(w, x1 + margin)))


def _row_distance(b: np.ndarray, cap: int) -> np.ndarray:
    """int32 distance along each row to the nearest True pixel, capped at cap + 1."""
    w = b.shape[1]
    idx = np.arange(w, dtype=np.int32)
    left = np.where(b, idx, np.int32(-(cap + 1)))
    np.maximum.accumulate(left, axis=1, out=left)
    right = np.where(b, idx, np.int32(w + cap))[:, ::-1]
    right = np.minimum.accumulate(right, axis=1)[:, ::-1]
    return np.minimum(np.minimum(idx - left, right - idx), cap + 1)


def grow_mask(mask: np.ndarray, px: float) -> np.ndarray:
    """Binary dilation of `mask >= 0.5` by a disc of radius `px` pixels.

    A pixel is set when some mask pixel lies within Euclidean distance px
    (dx^2 + dy^2 <= px^2). Exact; cost O(H*W*px) restricted to the mask's bounding box
    plus px (a 4K frame with px=32 takes well under a second).
    Returns: float32 (H, W) of 0/1. Raises: ValueError if px < 0.
    """
    if px < 0:
        raise ValueError(f"grow radius must be >= 0, got {px}")
    b = np.asarray(mask) >= 0.5
    r = int(math.floor(px))
    box = mask_bbox(b)
    if r == 0 or box is None:
        return b.astype(np.float32)
    r2 = int(math.floor(px * px))
    ys, xs = _region(b.shape, box, r)
    d2 = _row_distance(b[ys, xs], r) ** 2
    grown = np.zeros(d2.shape, dtype=bool)
    h = d2.shape[0]
    for dy in range(-r, r + 1):  # union of row-dilations shifted by dy
        if abs(dy) >= h:
            continue
        t = r2 - dy * dy
        if dy >= 0:
            grown[: h - dy] |= d2[dy:] <= t
        else:
            grown[-dy:] |= d2[: h + dy] <= t
    out = np.zeros(b.shape, dtype=np.float32)
    out[ys, xs] = grown
    return out


def _blur_axis(a: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    r = (len(w) - 1) // 2
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r, r)
    p = np.pad(a, pad, mode="edge")  # replicate: a mask touching the border stays 1 there
    if axis == 1:
        p = np.ascontiguousarray(p.T)  # shifted row slices are contiguous: faster
    n = a.shape[axis]
    out = w[r] * p[r : r + n]
    tmp = np.empty_like(out)
    for k in range(r):  # symmetric kernel: pair taps k and 2r - k
        np.add(p[k : k + n], p[2 * r - k : 2 * r - k + n], out=tmp)
        tmp *= w[k]
        out += tmp
    return out.T if axis == 1 else out


def feather_mask(mask: np.ndarray, px: float) -> np.ndarray:
    """Soften mask edges with a truncated Gaussian blur.

    `px` is the feather radius: a separable Gaussian with sigma = px / 3, truncated at
    px (3 sigma) on each axis, edge-replicated at the image border. An edge becomes a
    ramp 2*px wide centred on it; pixels farther than px (per axis) from any non-zero
    pixel stay exactly 0 and values within 1e-6 of 1 are snapped to 1.
    Args: mask float (H, W) in [0, 1] (soft input is allowed).
    Returns: float32 (H, W) in [0, 1]. Raises: ValueError if px < 0.
    """
    if px < 0:
        raise ValueError(f"feather radius must be >= 0, got {px}")
    m = np.clip(np.asarray(mask, dtype=np.float32), 0.0, 1.0)
    box = mask_bbox(m > 0)
    if px == 0 or box is None:
        return m.copy()
    r = int(math.ceil(px))
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.where(np.abs(x) <= px, np.exp(-0.5 * (x * 3.0 / px) ** 2), 0.0)
    w = (w / w.sum()).astype(np.float32)
    ys, xs = _region(m.shape, box, r)
    sub = _blur_axis(_blur_axis(m[ys, xs], w, 0), w, 1)
    sub[sub >= 1.0 - 1e-6] = 1.0
    out = np.zeros_like(m)
    out[ys, xs] = np.clip(sub, 0.0, 1.0)
    return out


def blend_mask(mask: np.ndarray, grow_px: float = 0.0, feather_px: float = 0.0) -> np.ndarray:
    """Paste-back weights: `feather_mask(grow_mask(mask, grow_px + c), feather_px)`.

    c = ceil(feather_px * sqrt(2)) makes the blend exactly 1 on `grow_mask(mask,
    grow_px)`, so with the model mask grown by the same `grow_px` every regenerated pixel
    is used as is, and the fade to the original happens outside it, over pixels the model
    reconstructed. The blend is exactly 0 beyond about grow_px + 2.9 * feather_px + 1.
    Returns: float32 (H, W) in [0, 1].
    """
    extra = math.ceil(feather_px * math.sqrt(2.0)) if feather_px > 0 else 0
    return feather_mask(grow_mask(mask, grow_px + extra), feather_px)


def edit_masks(mask: np.ndarray, grow_px: float = 0.0, feather_px: float = 0.0
               ) -> tuple[np.ndarray, np.ndarray]:
    """(model mask, blend) of a user mask: the mask grown by `grow_px` (what the model
    repaints) and the paste-back weights `blend_mask(mask, grow_px, feather_px)`."""
    model = grow_mask(mask, grow_px) if grow_px else mask
    return model, blend_mask(mask, grow_px, feather_px)
