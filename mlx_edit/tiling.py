"""Tiled VAE encode and decode: bounded memory for large images.

The image (or latent) is cut into overlapping tiles on a regular grid; each tile goes
through the VAE on its own and the results are blended with ramps (cosine or linear)
across each overlap, weights normalised to sum to one. Memory then depends on the tile
size, not on the image size: a 4096x4096 decode needs about what one 512x512 tile needs.

Tiles differ from the whole-image pass because GroupNorm statistics and the mid-block
attention see one tile instead of the whole image; with 512 px tiles and 128 px of
overlap (25%, diffusers' `tile_overlap_factor`) the result is > 40 dB PSNR from the
untiled one on the FLUX VAE (tests/test_tiling.py, benchmarks/RESULTS.md).
Reference: diffusers `AutoencoderKL.tiled_encode` / `tiled_decode`
(models/autoencoders/autoencoder_kl.py), which blend linearly between neighbours.
`encode_auto` / `decode_auto` tile only above `TILE_THRESHOLD_PIXELS`, so 1 MP edits
stay bit-identical to the untiled (diffusers) path.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from mlx_edit.models.vae import AutoencoderKL

DEFAULT_TILE = 512  # px: one tile's side (64 latent cells)
DEFAULT_OVERLAP = 128  # px: minimum overlap between neighbouring tiles
# Above this many pixels, `*_auto` tiles: an untiled decode of 2048x2048 on the CPU backend
# peaks near 20 GB of activations (the mid-block attention alone is N^2 * 4 bytes).
TILE_THRESHOLD_PIXELS = 1536 * 1536
BLENDS = ("cosine", "linear")


def should_tile(height: int, width: int, threshold: int = TILE_THRESHOLD_PIXELS) -> bool:
    """True when an image of height x width px is large enough to go through tiles."""
    return height * width > threshold


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of `tile` covering [0, size), overlapping by >= `overlap`.

    Tiles are spread evenly (the last one ends at `size`) and starts are multiples of
    `align`. One tile [0] when size <= tile. Raises ValueError for overlap >= tile or
    sizes/tiles that are not multiples of `align`.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap {overlap}, tile {tile}")
    if size % align or tile % align:
        raise ValueError(f"size {size} and tile {tile} must be multiples of {align}")
    if size <= tile:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    span = (size - tile) // align
    starts = [round(i * span / (n - 1)) * align for i in range(n)]
    if any(b - a > tile - overlap for a, b in zip(starts, starts[1:])):
        n += 1  # rounding to `align` opened a gap narrower than the overlap: one more tile
        starts = [round(i * span / (n - 1)) * align for i in range(n)]
    return starts


def _ramp(n: int, blend: str) -> np.ndarray:
    # Rising weights over an overlap of n samples; ramp + ramp[::-1] == 1 for both shapes.
    u = (np.arange(n, dtype=np.float64) + 0.5) / n
    return np.sin(0.5 * np.pi * u) ** 2 if blend == "cosine" else u


def axis_weights(starts: list[int], tile: int, size: int, blend: str) -> list[np.ndarray]:
    """Per-tile 1-D blend weights (tile,): 1 inside, ramps over the overlaps with the
    previous and next tiles, none at the image border. Neighbouring ramps sum to one."""
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    out = []
    for i, s in enumerate(starts):
        w = np.ones(min(tile, size - s), dtype=np.float64)
        if i > 0:
            ov = starts[i - 1] + tile - s
            w[:ov] *= _ramp(ov, blend)
        if i + 1 < len(starts):
            ov = s + tile - starts[i + 1]
            w[len(w) - ov :] *= _ramp(ov, blend)[::-1]
        out.append(w)
    return out


def _tiled(fn, x: mx.array, tile: int, overlap: int, scale: float, align: int,
           out_channels: int, blend: str) -> mx.array:
    """Run `fn` over overlapping tiles of x (B, H, W, C) (tile/overlap in x's cells) and
    blend the outputs, whose spatial size is `scale` times the tile's. float32 result."""
    b, h, w, _ = x.shape
    ys, xs = tile_starts(h, tile, overlap, align), tile_starts(w, tile, overlap, align)
    out_tile = round(tile * scale)
    out_h, out_w = round(h * scale), round(w * scale)
    wy = axis_weights([round(s * scale) for s in ys], out_tile, out_h, blend)
    wx = axis_weights([round(s * scale) for s in xs], out_tile, out_w, blend)
    # Host accumulators (float32): only one tile's activations live in MLX at a time.
    acc = np.zeros((b, out_h, out_w, out_channels), dtype=np.float32)
    total = np.zeros((out_h, out_w), dtype=np.float64)
    for y0, ay in zip(ys, wy):
        for x0, ax in zip(xs, wx):
            part = fn(x[:, y0 : y0 + tile, x0 : x0 + tile]).astype(mx.float32)
            mx.eval(part)
            oy, ox = round(y0 * scale), round(x0 * scale)
            weight = ay[:, None] * ax[None, :]
            acc[:, oy : oy + part.shape[1], ox : ox + part.shape[2]] += (
                np.array(part) * weight.astype(np.float32)[None, :, :, None]
            )
            total[oy : oy + part.shape[1], ox : ox + part.shape[2]] += weight
            del part
    # Normalise: exact partition of unity already, except where three tiles overlap.
    acc /= total.astype(np.float32)[None, :, :, None]
    return mx.array(acc)


def decode_tiled(vae: AutoencoderKL, latents: mx.array, tile: int = DEFAULT_TILE,
                 overlap: int = DEFAULT_OVERLAP, blend: str = "cosine") -> mx.array:
    """Decode unscaled latents (B, h, w, C) to images (B, h*f, w*f, 3) through tiles.

    tile / overlap: in pixels, multiples of the VAE scale factor f (8). Returns float32
    (the same values as `vae.decode` up to the tile seams; identical when one tile covers
    the image). Peak MLX memory is about one tile's decode plus the float32 output.
    Raises ValueError for a bad tile/overlap/blend.
    """
    f = vae.config.scale_factor
    if tile % f or overlap % f:
        raise ValueError(f"tile {tile} and overlap {overlap} must be multiples of {f}")
    return _tiled(vae.decode, latents, tile // f, overlap // f, f, 1,
                  vae.config.out_channels, blend)


def encode_tiled(vae: AutoencoderKL, images: mx.array, tile: int = DEFAULT_TILE,
                 overlap: int = DEFAULT_OVERLAP, blend: str = "cosine") -> mx.array:
    """Posterior mean (B, H/f, W/f, latent_channels) of images (B, H, W, 3) in [-1, 1],
    encoded through overlapping tiles and blended in latent space. float32.

    H, W, tile and overlap must be multiples of f (8); tiles start on multiples of f so
    the latent grids line up. Raises ValueError otherwise.
    """
    f = vae.config.scale_factor
    _, h, w, _ = images.shape
    if h % f or w % f or tile % f or overlap % f:
        raise ValueError(
            f"image {h}x{w}, tile {tile} and overlap {overlap} must be multiples of {f}"
        )
    return _tiled(vae.encode_mean, images, tile, overlap, 1 / f, f,
                  vae.config.latent_channels, blend)


def decode_auto(vae: AutoencoderKL, latents: mx.array, tile: int = DEFAULT_TILE,
                overlap: int = DEFAULT_OVERLAP) -> mx.array:
    """`vae.decode` for images up to TILE_THRESHOLD_PIXELS, `decode_tiled` above it.
    (B, h, w, C) unscaled latents -> (B, h*f, w*f, 3); the untiled path keeps the VAE dtype."""
    f = vae.config.scale_factor
    if should_tile(latents.shape[1] * f, latents.shape[2] * f):
        return decode_tiled(vae, latents, tile, overlap)
    return vae.decode(latents)


def encode_auto(vae: AutoencoderKL, images: mx.array, tile: int = DEFAULT_TILE,
                overlap: int = DEFAULT_OVERLAP) -> mx.array:
    """`vae.encode_mean` up to TILE_THRESHOLD_PIXELS (or when H, W are not multiples of
    f), `encode_tiled` above it. (B, H, W, 3) -> (B, H/f, W/f, latent_channels)."""
    f = vae.config.scale_factor
    _, h, w, _ = images.shape
    if should_tile(h, w) and h % f == 0 and w % f == 0:
        return encode_tiled(vae, images, tile, overlap)
    return vae.encode_mean(images)
