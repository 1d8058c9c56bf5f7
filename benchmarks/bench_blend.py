"""How pasted does a paste-back look? Colour match and blend methods on real photos.

The case (issue 17): a source photo S (scikit-image) and a "generated" image G that
reproduces S outside an elliptical mask and holds another photo's content inside it
(a soft transition well inside the mask, as a model draws new content continuously),
then carries a known colour cast (+CAST in Lab b*, the global drift a VAE round trip
leaves), optionally with a slight blur (the detail a VAE loses). Photo levels are mapped
into [HEADROOM, 255 - HEADROOM] first so the cast is representable in 8-bit sRGB (at full
range +12 b* clips 29-46% of astronaut's / coffee's pixels, and the clipping, not the
method, dominates the numbers). The ideal edit R* is the
same composite without cast or blur. Each method pastes G back into S; per method:

- dE in / dE out: mean CIEDE2000 (skimage.color.deltaE_ciede2000) between the result and
  R* in a ring of RING px just inside / just outside the mask boundary;
- seam grad: the RMS, over a band of +-BAND px around the boundary, of the gradient
  magnitude of the colour error Lab(result) - Lab(R*) (Lab units per px, smoothed by a
  Gaussian of SMOOTH px): the jump the paste adds across the boundary. A hard step
  scores high, a feathered ramp lower, a seamless paste near 0;
- ms: time of the paste-back (colour match + blend + composite).

    python benchmarks/bench_blend.py [--cast 12] [--blur 0.0] [--feather 8]

Prints a markdown table per case and a summary line (means over the photos).
"""

from __future__ import annotations

import argparse
import time
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFilter

from mlx_edit.imaging.blend import blend_images, lab_to_rgb, rgb_to_lab
from mlx_edit.imaging.masks import blend_mask, feather_mask
from mlx_edit.imaging.stitch import paste_back

RING = 8  # px: width of the rings inside / outside the boundary for dE
BAND = 24  # px: half-width of the band the seam gradient is measured over
SMOOTH = 1.5  # px: Gaussian sigma before the seam gradient
PAIRS = (("astronaut", "coffee"), ("coffee", "chelsea"), ("chelsea", "astronaut"),
         ("rocket", "coffee"))
# (label, colour match, blend method, feather): "hard" is a plain binary paste.
METHODS = (("hard", "none", "feather", False), ("feather", "none", "feather", True),
           ("feather+mean-std", "mean-std", "feather", True),
           ("feather+histogram", "histogram", "feather", True),
           ("poisson", "none", "poisson", True), ("poisson+mean-std", "mean-std", "poisson", True),
           ("poisson+histogram", "histogram", "poisson", True))


class Case(NamedTuple):
    """source, generated, ideal: uint8 (H, W, 3); mask: float32 (H, W) binary."""

    source: np.ndarray
    generated: np.ndarray
    ideal: np.ndarray
    mask: np.ndarray


def photo(name: str, size: tuple[int, int] | None = None, headroom: int = 0) -> np.ndarray:
    """A scikit-image photo as uint8 RGB, resized (Lanczos) to size (W, H) if given, its
    levels mapped linearly into [headroom, 255 - headroom]."""
    from skimage import data

    img = Image.fromarray(getattr(data, name)()).convert("RGB")
    a = np.asarray(img if size is None else img.resize(size, Image.LANCZOS), np.float32)
    return np.rint(headroom + a * (255 - 2 * headroom) / 255).astype(np.uint8)


def ellipse(h: int, w: int, frac: float = 0.28) -> np.ndarray:
    """Binary float32 (H, W) ellipse centred in the frame, semi-axes frac * (W, H)."""
    y, x = np.mgrid[:h, :w]
    r = ((x - w / 2) / (frac * w)) ** 2 + ((y - h / 2) / (frac * h)) ** 2
    return (r <= 1.0).astype(np.float32)


def make_case(source: np.ndarray, other: np.ndarray, cast: float = 12.0, blur: float = 0.0,
              inset: int = 16) -> Case:
    """Build the paste-back case: `other` drawn into the ellipse `inset` px inside its
    boundary (soft edge), then a +cast Lab b* shift (and a Gaussian blur) over all of G."""
    h, w = source.shape[:2]
    mask = ellipse(h, w)
    inner = 1.0 - blend_mask(1.0 - mask, inset)  # the mask eroded by `inset` px
    s = feather_mask(inner, inset / 2)[..., None]
    ideal = np.clip(np.rint(source * (1.0 - s) + other * s), 0, 255).astype(np.uint8)
    lab = rgb_to_lab(ideal)
    lab[..., 2] += cast
    gen = lab_to_rgb(lab)
    if blur > 0:
        gen = np.asarray(Image.fromarray(gen).filter(ImageFilter.GaussianBlur(blur)))
    return Case(source, gen, ideal, mask)


def _distance_bands(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance (px) to the boundary inside and outside the binary mask."""
    from scipy.ndimage import distance_transform_edt

    m = mask >= 0.5
    return distance_transform_edt(m), distance_transform_edt(~m)


def _error_gradient(result: np.ndarray, ideal: np.ndarray) -> np.ndarray:
    """|grad| (Lab units per px) of the colour error Lab(result) - Lab(ideal), smoothed by
    a Gaussian of SMOOTH px (which drops 8-bit rounding noise). The photo's own texture
    cancels in the difference; what is left is the step or ramp the paste introduces."""
    from scipy.ndimage import gaussian_filter

    err = rgb_to_lab(result).astype(np.float64) - rgb_to_lab(ideal)
    gy, gx = np.gradient(gaussian_filter(err, (SMOOTH, SMOOTH, 0)), axis=(0, 1))
    return np.sqrt((gx ** 2 + gy ** 2).sum(axis=-1))


def measure(result: np.ndarray, case: Case) -> dict[str, float]:
    """dE_in, dE_out (mean CIEDE2000 vs the ideal in RING px rings) and seam_grad."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    d_in, d_out = _distance_bands(case.mask)
    de = deltaE_ciede2000(rgb2lab(result), rgb2lab(case.ideal))
    ring_in = (d_in > 0) & (d_in <= RING)
    ring_out = (d_out > 0) & (d_out <= RING)
    band = (d_in <= BAND) & (d_out <= BAND)
    grad = _error_gradient(result, case.ideal)[band]
    return {"dE_in": float(de[ring_in].mean()), "dE_out": float(de[ring_out].mean()),
            "seam_grad": float(np.sqrt((grad ** 2).mean()))}


def paste(case: Case, color_match: str, method: str, feather: float) -> np.ndarray:
    """Paste the case's generated image back with the given methods (feather 0: hard)."""
    weights = blend_mask(case.mask, 0, feather) if feather else case.mask
    src, gen = Image.fromarray(case.source), Image.fromarray(case.generated)
    if color_match == "none" and method == "feather":
        return np.asarray(paste_back(src, gen, weights))
    return np.asarray(blend_images(src, gen, weights, color_match_method=color_match,
                                   method=method))


def run(cast: float, blur: float, feather: float, pairs=PAIRS, size: int | None = None,
        headroom: int = 32):
    """Per pair and method: the metrics and the paste-back time; returns {label: [dicts]}."""
    table: dict[str, list[dict]] = {m[0]: [] for m in METHODS}
    for src_name, other_name in pairs:
        src = photo(src_name, None if size is None else (size, size), headroom)
        case = make_case(src, photo(other_name, src.shape[1::-1], headroom), cast, blur)
        print(f"\n{src_name} ({src.shape[1]}x{src.shape[0]}) <- {other_name}\n")
        print("| method | dE in | dE out | seam grad | ms |\n|---|---|---|---|---|")
        for label, cm, method, soft in METHODS:
            t0 = time.perf_counter()
            out = paste(case, cm, method, feather if soft else 0)
            ms = (time.perf_counter() - t0) * 1e3
            m = {**measure(out, case), "ms": ms}
            table[label].append(m)
            print(f"| {label} | {m['dE_in']:.2f} | {m['dE_out']:.2f} | {m['seam_grad']:.2f} "
                  f"| {ms:.0f} |")
    return table


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cast", type=float, default=12.0, help="Lab b* cast of the paste.")
    ap.add_argument("--blur", type=float, default=0.0, help="Gaussian blur radius (px).")
    ap.add_argument("--feather", type=float, default=8.0, help="Feather (px) of soft modes.")
    ap.add_argument("--size", type=int, default=None, help="Resize photos to SIZE x SIZE.")
    ap.add_argument("--headroom", type=int, default=32,
                    help="Map photo levels into [H, 255-H] so the cast is not clipped "
                         "(0: full range; +12 b* then clips 29%% of astronaut's pixels).")
    args = ap.parse_args(argv)
    print(f"cast +{args.cast} b*, blur {args.blur}, feather {args.feather} px, "
          f"headroom {args.headroom}")
    table = run(args.cast, args.blur, args.feather, size=args.size, headroom=args.headroom)
    print("\nmeans over the photos\n\n| method | dE in | dE out | seam grad | ms |\n"
          "|---|---|---|---|---|")
    for label, rows in table.items():
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        print(f"| {label} | {mean['dE_in']:.2f} | {mean['dE_out']:.2f} | "
              f"{mean['seam_grad']:.2f} | {mean['ms']:.0f} |")
    best = min(table, key=lambda k: np.mean([r["dE_in"] for r in table[k]]))
    print(f"\nlowest dE in: {best}")


if __name__ == "__main__":
    main()
