"""Paste-back that does not look pasted: colour matching and Poisson blending.

Pure numpy; Poisson blending needs OpenCV (the `[blend]` extra); no mlx. Both steps
change only the *edited* image inside the blend mask; the final composite is
`stitch.paste_back`, so pixels where the blend weight is 0 stay the original's bit for
bit in every mode. Measured in benchmarks/bench_blend.py (results: benchmarks/RESULTS.md).

- Colour match (`none | mean-std | histogram`): a VAE round trip shifts colours globally
  (the FLUX Fill colour drift ComfyUI users fix with colour-corrected paste-back). The
  model's reconstruction of the untouched context shows that shift: in a ring just
  outside the blend mask the edited image should equal the original. We fit, per Lab
  channel, the map from the edited ring to the original ring (mean/std: Reinhard et al.
  2001, "Color transfer between images"; histogram: quantile matching) and apply it to
  the edited pixels inside the blend mask.
- Poisson blending (`feather | poisson`): seamless cloning (Perez et al. 2003, "Poisson
  image editing") with OpenCV's `cv2.seamlessClone` (NORMAL_CLONE): inside the region
  the result keeps the edited image's gradients and meets the original at the boundary.

Images are uint8 (H, W, 3) RGB arrays or PIL; masks float32 (H, W) in [0, 1].
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

from mlx_edit.imaging.images import InputError
from mlx_edit.imaging.masks import binarize_mask, grow_mask

COLOR_MATCH_METHODS = ("none", "mean-std", "histogram")
BLEND_METHODS = ("feather", "poisson")
RING_PX = 16  # width of the ring outside the blend mask the colour statistics come from
MIN_RING_PIXELS = 64  # fewer ring pixels than this: statistics too weak, no colour match
STD_RATIO = (0.5, 2.0)  # mean-std: bounds on the std scaling (a flat ring must not explode)
POISSON_PAD = 4  # px of padding so a region touching the image border is not clipped


def _cv2():
    """Import OpenCV or raise an InputError naming the extra to install."""
    try:
        import cv2
    except ImportError:
        raise InputError("--blend poisson needs OpenCV: pip install 'mlx-edit[blend]' "
                         "(opencv-python-headless), or use --blend feather") from None
    return cv2


def check_methods(color_match: str, blend: str) -> None:
    """InputError unless `color_match` and `blend` are known method names."""
    if color_match not in COLOR_MATCH_METHODS:
        raise InputError(f"color match must be one of {', '.join(COLOR_MATCH_METHODS)}, "
                         f"got {color_match!r}")
    if blend not in BLEND_METHODS:
        raise InputError(f"blend must be one of {', '.join(BLEND_METHODS)}, got {blend!r}")


# sRGB (IEC 61966-2-1) primaries, D65 white: linear RGB -> CIE XYZ, rows X, Y, Z.
_RGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423],
                        [0.212671, 0.715160, 0.072169],
                        [0.019334, 0.119193, 0.950227]])
_WHITE = _RGB_TO_XYZ.sum(axis=1)  # XYZ of RGB (1, 1, 1): the D65 white point
_EPS, _KAPPA = (6.0 / 29.0) ** 3, (29.0 / 6.0) ** 2 / 3.0  # CIE 1976 L*a*b* constants


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


_LINEAR = _srgb_to_linear(np.arange(256) / 255.0).astype(np.float32)
_TO_XYZN = (_RGB_TO_XYZ.T / _WHITE).astype(np.float32)  # linear RGB -> XYZ / white
_FROM_XYZN = np.linalg.inv(_RGB_TO_XYZ.T / _WHITE).astype(np.float32)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 sRGB (..., 3) -> float32 CIE 1976 L*a*b* (D65; L in [0, 100]).

    The textbook conversion (sRGB transfer curve, XYZ, CIE f(t)); agrees with
    skimage.color.rgb2lab to < 5e-3 (its D65 white is rounded; ours is the matrix's own,
    so greys have a = b = 0 exactly). Pure numpy, float32 (no extra needed).
    """
    t = _LINEAR[np.asarray(rgb, dtype=np.uint8)] @ _TO_XYZN
    f = np.where(t > _EPS, np.cbrt(t), np.float32(_KAPPA) * t + np.float32(4.0 / 29.0))
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]),
                     200.0 * (f[..., 1] - f[..., 2])], axis=-1).astype(np.float32)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """float CIE L*a*b* (..., 3) -> uint8 sRGB (rounded, clipped to the sRGB gamut)."""
    lab = np.asarray(lab, dtype=np.float32)
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], axis=-1)
    t = np.where(f > 6.0 / 29.0, f ** 3, (f - np.float32(4.0 / 29.0)) / np.float32(_KAPPA))
    lin = np.clip(t @ _FROM_XYZN, 0.0, 1.0)
    c = np.where(lin <= 0.0031308, lin * 12.92, 1.055 * lin ** np.float32(1 / 2.4) - 0.055)
    return np.rint(c * 255.0).astype(np.uint8)


def outside_ring(blend: np.ndarray, px: float = RING_PX) -> np.ndarray:
    """bool (H, W): pixels where blend == 0 within Euclidean distance `px` of blend > 0."""
    inside = np.asarray(blend) > 0
    return (grow_mask(inside.astype(np.float32), px) > 0) & ~inside


def _quantile_map(x: np.ndarray, src: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Map values x by matching the quantiles of `src` to those of `ref` (one channel).

    Beyond the ring's range the map continues with the end offsets instead of clamping,
    so new content with colours the ring does not have is shifted, not flattened.
    """
    q = np.linspace(0.0, 1.0, 257)
    qs, qr = np.quantile(src, q), np.quantile(ref, q)
    y = np.interp(x, qs, qr)
    y = np.where(x < qs[0], x + (qr[0] - qs[0]), y)
    return np.where(x > qs[-1], x + (qr[-1] - qs[-1]), y)


def color_match(original: np.ndarray, edited: np.ndarray, blend: np.ndarray,
                method: str = "mean-std", ring_px: float = RING_PX) -> np.ndarray:
    """Correct the colours of `edited` inside the blend mask to match `original`.

    The per-channel Lab map is fitted on `outside_ring(blend, ring_px)`, where the edited
    image is the model's reconstruction of untouched pixels, and applied where blend > 0.
    method: "mean-std" (x - mu_e) * clip(sd_o / sd_e, 0.5, 2) + mu_o; "histogram" quantile
    matching; "none" returns a copy. With fewer than MIN_RING_PIXELS ring pixels (the blend
    covers nearly everything) it warns and returns a copy.
    Args: original, edited uint8 (H, W, 3) RGB; blend float (H, W).
    Returns: uint8 (H, W, 3), equal to `edited` where blend == 0.
    Raises: InputError (unknown method), ValueError (shapes differ).
    """
    check_methods(method, "feather")
    o, e = np.asarray(original), np.asarray(edited)
    if o.shape != e.shape or o.shape[:2] != np.shape(blend):
        raise ValueError(f"color_match: shapes differ {o.shape}, {e.shape}, {np.shape(blend)}")
    out = e.copy()
    if method == "none":
        return out
    ring, sel = outside_ring(blend, ring_px), np.asarray(blend) > 0
    if ring.sum() < MIN_RING_PIXELS:
        warnings.warn(f"colour match skipped: only {int(ring.sum())} px around the mask to "
                      "measure the colour shift on (the mask covers nearly the whole window)",
                      stacklevel=2)
        return out
    lo, le, x = rgb_to_lab(o[ring]), rgb_to_lab(e[ring]), rgb_to_lab(e[sel])
    if method == "mean-std":
        mu_o, mu_e = lo.mean(axis=0), le.mean(axis=0)
        ratio = np.clip(lo.std(axis=0) / np.maximum(le.std(axis=0), 1e-3), *STD_RATIO)
        y = (x - mu_e) * ratio + mu_o
    else:
        y = np.stack([_quantile_map(x[:, c], le[:, c], lo[:, c]) for c in range(3)], axis=1)
    out[sel] = lab_to_rgb(y)
    return out


def poisson_blend(original: np.ndarray, edited: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Seamless cloning of `edited` into `original` over `region` (cv2.seamlessClone).

    Inside the region the result has the edited image's gradients and meets the original
    along the region's boundary (a Dirichlet condition). OpenCV needs the region off the
    image border, so both images are padded by reflection first: a region touching the
    border meets the (reflected) original there too. Any image size.
    Args: original, edited uint8 (H, W, 3) RGB; region bool (H, W).
    Returns: uint8 (H, W, 3); outside `region` approximately the original (the caller
    composites with the blend mask, which makes it exact).
    """
    cv2 = _cv2()
    o, e, r = np.asarray(original), np.asarray(edited), np.asarray(region, bool)
    if not r.any():
        return e.copy()
    p = POISSON_PAD
    pad = ((p, p), (p, p), (0, 0))
    mode = "reflect" if min(e.shape[:2]) > p else "edge"
    src, dst = np.pad(e, pad, mode=mode), np.pad(o, pad, mode=mode)
    m = np.pad(r, p, mode="edge").astype(np.uint8) * 255
    # OpenCV zeroes the mask's outer 1-px frame, takes its bounding box and pastes it
    # centred at `center` with top-left center - size // 2: this centre keeps it in place.
    x, y, w, h = cv2.boundingRect(m[1:-1, 1:-1])
    center = (x + 1 + w // 2, y + 1 + h // 2)
    out = cv2.seamlessClone(src, dst, m, center, cv2.NORMAL_CLONE)
    return np.ascontiguousarray(out[p:-p, p:-p])


def blend_images(original, edited, blend: np.ndarray, *, color_match_method: str = "none",
                 method: str = "feather", ring_px: float = RING_PX) -> Image.Image:
    """Colour-match, optionally Poisson-clone, then paste `edited` over `original`.

    The composite is `stitch.paste_back(original, e', blend)`: pixels with blend == 0 are
    the original's bit for bit in every mode; in "poisson" mode e' is the seamless clone
    over blend > 0, so the feathered weights blend two images that already agree at the
    boundary.
    Args: original, edited PIL or uint8 (H, W, 3) of the same size; blend float (H, W).
    Returns: PIL RGB. Raises: InputError (unknown method; "poisson" without OpenCV),
    ValueError (sizes).
    """
    from mlx_edit.imaging.stitch import paste_back

    check_methods(color_match_method, method)
    o = np.asarray(original.convert("RGB") if isinstance(original, Image.Image) else original)
    e = np.asarray(edited.convert("RGB") if isinstance(edited, Image.Image) else edited)
    if o.shape != e.shape:
        raise ValueError(f"blend_images: sizes differ {o.shape} vs {e.shape}")
    if color_match_method != "none":
        e = color_match(o, e, blend, color_match_method, ring_px)
    if method == "poisson":
        e = poisson_blend(o, e, np.asarray(blend) > 0)
    return paste_back(Image.fromarray(o, "RGB"), Image.fromarray(e, "RGB"), blend)


def seam_band(mask: np.ndarray, px: float) -> np.ndarray:
    """float32 (H, W) 0/1: pixels within `px` of the boundary of `mask >= 0.5`, either side.

    The area a seam-repair pass regenerates at low strength (issue 17: a second pass over
    the mask boundary for extreme cases). Raises ValueError if px <= 0.
    """
    if px <= 0:
        raise ValueError(f"seam band width must be > 0, got {px}")
    m = binarize_mask(mask)
    outer = grow_mask(m, px)
    inner = 1.0 - grow_mask(1.0 - m, px)  # erosion by px: the complement grown
    return (outer * (1.0 - inner)).astype(np.float32)
