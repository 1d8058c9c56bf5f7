"""Tiled VAE encode and decode: bounded memory for large images.

The image (or latent) is cut into overlapping tiles on a regular grid; each tile goes
through the VAE on its own and the results are blended with ramps (cosine or linear)
across each overlap, weights normalised to sum to one. Memory then depends on the tile
size, not on the image size: a 4096x4096 decode needs what one tile needs, plus 20 bytes
per output pixel of host-side accumulators (float32 image, float64 weights).

Tiles differ from the whole-image pass because GroupNorm statistics and the mid-block
attention see one tile instead of the whole image. On the FLUX VAE (random weights),
1024x1024, 512 px tiles overlapping by 128 px against the exact whole-image pass:
stationary content (random latents) decodes at 48.6 dB PSNR, a photo's latents at
35.9 dB, and the photo encodes at 30.1 dB (256 px tiles at 512x512: 41.7 / 32.5 /
28.7 dB); the per-tile statistics differ more for a photo (benchmarks/RESULTS.md;
tests/test_tiling.py checks >= 40 dB and the seams).
Reference: diffusers `AutoencoderKL.tiled_encode` / `tiled_decode`
(models/autoencoders/autoencoder_kl.py), which blend linearly between neighbours.
`encode_auto` / `decode_auto` tile only when an untiled pass would need more than
TILE_BUDGET_GB of activations (`should_tile`), with the largest tile that fits it.

On the CPU backend every pass, tiled or not, runs inside `AutoencoderKL.banded`
(BAND_BYTES): convolutions in bands of rows and attention in blocks of queries, exact,
so MLX's im2col scratch (9x a 3x3 conv's input) no longer scales with the image. That
cut the activations from ~38 to ~7.5 kB/px (float32 decode) and made the pass faster
(benchmarks/RESULTS.md), so whole-image (exact) passes reach ~1024x1024 under the
pipeline's threshold (40% of memory: 9.6 GB on a 24 GB machine) and tiles are 512 px,
4x larger in area than before.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import mlx.core as mx
import numpy as np

from mlx_edit.models.vae import AutoencoderKL, VAEConfig
from mlx_edit.progress import ticks

# VAE activation bytes per pixel, per byte of the compute dtype. CPU: measured float32
# inside `banded(BAND_BYTES)` at 256 and 512 px (decode 7.9 / 7.5 kB/px, encode 5.9 /
# 4.9 kB/px, the BAND_BYTES scratch included), rounded up. GPU (not banded): estimated
# from mflux's 3.08 GB peak for a 512x512 bf16 decode on Metal (performance-anchors.md
# [S12]), weights taken off; not measured here. The FLUX.2 VAE (same widths, 32 latent
# channels) measured the same bytes per pixel (benchmarks/RESULTS.md).
DECODE_BYTES_PER_PX = {"cpu": 2_000.0, "gpu": 5_500.0}
ENCODE_BYTES_PER_PX = {"cpu": 1_400.0, "gpu": 3_400.0}
BAND_BYTES = 64 * 2**20  # CPU: largest im2col / attention-score scratch of one op
TILE_BUDGET_GB = 3.0  # activations of one VAE pass, tiled or not (issue 7: 4096^2 < 3 GB)
TILE_SIDES = (1024, 768, 512, 384, 256, 192, 128)
# a pass that fits whole still runs in tiles when this share of them can be skipped (the
# region outside `needed`: tiles differ from the whole pass by their GroupNorm statistics)
SKIP_SHARE = 0.25
BLENDS = ("cosine", "linear")


def _backend() -> str:
    return "gpu" if mx.default_device() == mx.gpu else "cpu"


def vae_activation_gb(height: int, width: int, dtype_size: int = 4, decode: bool = True,
                      backend: str | None = None, config: VAEConfig | None = None) -> float:
    """Estimated activations (GB) of one untiled VAE decode (or encode) of a height x width
    image as `decode_auto` runs it: bytes per pixel (measured on the FLUX VAE; other widths
    scale with their second level's channels, which dominate at full resolution) plus, on
    the CPU backend, the banded scratch (BAND_BYTES)."""
    backend = backend or _backend()
    per_px = (DECODE_BYTES_PER_PX if decode else ENCODE_BYTES_PER_PX)[backend] * dtype_size
    if config is not None:
        channels = config.block_out_channels
        per_px *= channels[min(1, len(channels) - 1)] / 256
    scratch = 0.0 if backend == "gpu" else BAND_BYTES
    return (per_px * height * width + scratch) / 1e9


def should_tile(height: int, width: int, dtype_size: int = 4,
                budget_gb: float = TILE_BUDGET_GB, decode: bool = True,
                config: VAEConfig | None = None) -> bool:
    """True when an untiled VAE decode (or encode) of height x width px would need more
    than `budget_gb` of activations (FLUX VAE, CPU backend, float32 decode: above about
    600x600 px for 3 GB; bf16 on a GPU: above about 520x520 px)."""
    return vae_activation_gb(height, width, dtype_size, decode, config=config) > budget_gb


def default_tile(dtype_size: int = 4, budget_gb: float = TILE_BUDGET_GB,
                 decode: bool = True, config: VAEConfig | None = None) -> int:
    """The largest tile side in TILE_SIDES whose pass fits `budget_gb` (FLUX VAE decode,
    3 GB: 512 px on the CPU backend in float32 and on a GPU in bf16); overlap: a quarter."""
    for side in TILE_SIDES:
        if vae_activation_gb(side, side, dtype_size, decode, config=config) <= budget_gb:
            return side
    return TILE_SIDES[-1]


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


def dilate(mask: np.ndarray, px: int) -> np.ndarray:
    """(H, W) bool: `mask` grown by `px` pixels in every direction (a square: Chebyshev
    distance <= px), through a summed-area table."""
    m = np.pad(np.asarray(mask, bool), px).astype(np.int64)
    s = np.pad(m.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    k = 2 * px + 1
    return (s[k:, k:] - s[:-k, k:] - s[k:, :-k] + s[:-k, :-k]) > 0


def _tiled(fn, x: mx.array, tile: int, overlap: int, scale: float, align: int,
           out_channels: int, blend: str, phase: str, needed: np.ndarray | None = None,
           fill: np.ndarray | None = None) -> mx.array:
    """Run `fn` over overlapping tiles of x (B, H, W, C) (tile/overlap in x's cells) and
    blend the outputs, whose spatial size is `scale` times the tile's. float32 result.
    needed: (out H, out W) bool: only tiles whose output meets it run; the others give
    `fill` (out H, out W, out_channels) there. Reports `phase` per tile run."""
    b, h, w, _ = x.shape
    ys, xs = tile_starts(h, tile, overlap, align), tile_starts(w, tile, overlap, align)
    out_tile = round(tile * scale)
    out_h, out_w = round(h * scale), round(w * scale)
    wy = axis_weights([round(s * scale) for s in ys], out_tile, out_h, blend)
    wx = axis_weights([round(s * scale) for s in xs], out_tile, out_w, blend)
    # Host accumulators (float32): only one tile's activations live in MLX at a time.
    acc = np.zeros((b, out_h, out_w, out_channels), dtype=np.float32)
    total = np.zeros((out_h, out_w), dtype=np.float64)
    boxes = [(y0, x0, round(y0 * scale), round(x0 * scale), ay[:, None] * ax[None, :])
             for y0, ay in zip(ys, wy) for x0, ax in zip(xs, wx)]
    run = [needed is None or needed[oy : oy + wt.shape[0], ox : ox + wt.shape[1]].any()
           for _, _, oy, ox, wt in boxes]
    tick, done = ticks(phase, sum(run)), 0
    for (y0, x0, oy, ox, weight), go in zip(boxes, run):
        th, tw = weight.shape
        if go:
            part = fn(x[:, y0 : y0 + tile, x0 : x0 + tile]).astype(mx.float32)
            mx.eval(part)
            part = np.array(part)
            done += 1
            tick(done)
        else:  # a tile away from what is needed: the given pixels / values instead
            part = fill[None, oy : oy + th, ox : ox + tw]
        acc[:, oy : oy + th, ox : ox + tw] += part * weight.astype(np.float32)[None, :, :, None]
        total[oy : oy + th, ox : ox + tw] += weight
        del part
    # Normalise: exact partition of unity already, except where three tiles overlap.
    acc /= total.astype(np.float32)[None, :, :, None]
    return mx.array(acc)


def scratch_bounded(vae: AutoencoderKL) -> AbstractContextManager:
    """`vae.banded(BAND_BYTES)` on the CPU backend (exact, bounded im2col/score scratch),
    nothing on a GPU (not measured there)."""
    return vae.banded(BAND_BYTES) if _backend() == "cpu" else nullcontext(vae)


def _tile_args(vae: AutoencoderKL, tile: int | None, overlap: int | None,
               decode: bool) -> tuple[int, int]:
    tile = tile or default_tile(vae.dtype.size, decode=decode, config=vae.config)
    return tile, tile // 4 if overlap is None else overlap


def decode_tiled(vae: AutoencoderKL, latents: mx.array, tile: int | None = None,
                 overlap: int | None = None, blend: str = "cosine",
                 needed: np.ndarray | None = None, fill: np.ndarray | None = None
                 ) -> mx.array:
    """Decode unscaled latents (B, h, w, C) to images (B, h*f, w*f, 3) through tiles.

    tile / overlap: in pixels, multiples of the VAE scale factor f (8); None: `default_tile`
    and a quarter of it. Returns float32 (`vae.decode`'s values up to the tile seams;
    identical when one tile covers the image). Peak MLX memory: one tile's decode; the
    float32 output and the blend weights accumulate on the host (16 B/px).
    needed (H, W) bool, fill (H, W, 3) float32 in [-1, 1]: only the tiles that meet
    `needed` are decoded, the others give `fill` (the source's pixels); every pixel that
    only decoded tiles cover (e.g. `needed` shrunk by a tile's overlap) equals the full
    decode's exactly. Raises ValueError for a bad tile/overlap/blend.
    """
    f = vae.config.scale_factor
    tile, overlap = _tile_args(vae, tile, overlap, True)
    if tile % f or overlap % f:
        raise ValueError(f"tile {tile} and overlap {overlap} must be multiples of {f}")
    with scratch_bounded(vae):
        return _tiled(vae.decode, latents, tile // f, overlap // f, f, 1,
                      vae.config.out_channels, blend, "vae_decode", needed, fill)


def encode_tiled(vae: AutoencoderKL, images: mx.array, tile: int | None = None,
                 overlap: int | None = None, blend: str = "cosine",
                 needed: np.ndarray | None = None) -> mx.array:
    """Posterior mean (B, H/f, W/f, latent_channels) of images (B, H, W, 3) in [-1, 1],
    encoded through overlapping tiles and blended in latent space. float32.

    H, W, tile and overlap must be multiples of f (8); tiles start on multiples of f so
    the latent grids line up. Raises ValueError otherwise.
    needed (H/f, W/f) bool: only the tiles whose latents meet it are encoded, the others
    give 0; latents that only encoded tiles cover equal the full pass's exactly.
    """
    f = vae.config.scale_factor
    tile, overlap = _tile_args(vae, tile, overlap, False)
    _, h, w, _ = images.shape
    if h % f or w % f or tile % f or overlap % f:
        raise ValueError(
            f"image {h}x{w}, tile {tile} and overlap {overlap} must be multiples of {f}"
        )
    with scratch_bounded(vae):
        zero = None if needed is None else np.zeros((h // f, w // f, vae.config.latent_channels),
                                                    np.float32)
        return _tiled(vae.encode_mean, images, tile, overlap, 1 / f, f,
                      vae.config.latent_channels, blend, "vae_encode", needed, zero)


def decode_auto(vae: AutoencoderKL, latents: mx.array, budget_gb: float = TILE_BUDGET_GB,
                threshold_gb: float | None = None, needed: np.ndarray | None = None,
                fill: np.ndarray | None = None) -> mx.array:
    """`vae.decode`, or `decode_tiled` (largest tile within `budget_gb`; only the tiles
    meeting `needed`, `fill` elsewhere) when the untiled pass would need more than
    `threshold_gb` (None: `budget_gb`) of activations or when SKIP_SHARE of the tiles
    would miss `needed` (then skipping them beats the whole pass).
    (B, h, w, C) unscaled latents -> (B, h*f, w*f, 3); the untiled path keeps the VAE dtype."""
    f, size, cfg = vae.config.scale_factor, vae.dtype.size, vae.config
    limit = budget_gb if threshold_gb is None else max(threshold_gb, budget_gb)
    tile = default_tile(size, budget_gb, config=cfg)
    if should_tile(latents.shape[1] * f, latents.shape[2] * f, size, limit, config=cfg) \
            or skipped_share(needed, tile // f, f) >= SKIP_SHARE:
        return decode_tiled(vae, latents, tile, needed=needed, fill=fill)
    with scratch_bounded(vae), layer_ticks(vae, "vae_decode"):
        return _evaluated(vae.decode(latents))


def encode_auto(vae: AutoencoderKL, images: mx.array, budget_gb: float = TILE_BUDGET_GB,
                threshold_gb: float | None = None, needed: np.ndarray | None = None
                ) -> mx.array:
    """`vae.encode_mean`, or `encode_tiled` (only the tiles meeting `needed`) when the
    untiled pass would need more than `threshold_gb` (None: `budget_gb`) or SKIP_SHARE
    of the tiles would miss `needed`, and H, W are multiples of f.
    (B, H, W, 3) -> (B, H/f, W/f, latent_channels) posterior mean."""
    f, size, cfg = vae.config.scale_factor, vae.dtype.size, vae.config
    _, h, w, _ = images.shape
    limit = budget_gb if threshold_gb is None else max(threshold_gb, budget_gb)
    tile = default_tile(size, budget_gb, False, cfg)
    if (should_tile(h, w, size, limit, False, cfg) or skipped_share(needed, tile // f, 1)
            >= SKIP_SHARE) and h % f == 0 and w % f == 0:
        return encode_tiled(vae, images, tile, needed=needed)
    with scratch_bounded(vae), layer_ticks(vae, "vae_encode"):
        return _evaluated(vae.encode_mean(images))


def skipped_share(needed: np.ndarray | None, tile: int, scale: int) -> float:
    """The share of the tiles of a tiled pass (`tile` input cells, a quarter overlap,
    outputs `scale` times larger) whose output misses `needed` (its output grid); 0 for
    None."""
    if needed is None:
        return 0.0
    out_tile, (h, w) = tile * scale, needed.shape
    if h * w == 0 or (h <= out_tile and w <= out_tile):
        return 0.0
    ys, xs = (tile_starts(n, out_tile, out_tile // 4) for n in (h, w))
    missed = [not needed[y : y + out_tile, x : x + out_tile].any() for y in ys for x in xs]
    return sum(missed) / len(missed)


def decode_reach(needed: np.ndarray, config: VAEConfig, dtype_size: int,
                 threshold_gb: float | None, budget_gb: float = TILE_BUDGET_GB
                 ) -> np.ndarray:
    """(H, W) bool: the pixels whose latents `decode_auto(needed=needed)` reads: the
    tiles it decodes (a tiled pass), or everything (a whole pass)."""
    h, w = needed.shape
    tile = default_tile(dtype_size, budget_gb, config=config)
    limit = budget_gb if threshold_gb is None else max(threshold_gb, budget_gb)
    if not (should_tile(h, w, dtype_size, limit, config=config)
            or skipped_share(needed, tile // config.scale_factor, config.scale_factor)
            >= SKIP_SHARE):
        return np.ones_like(needed, bool)
    reach = np.zeros_like(needed, bool)
    for y in tile_starts(h, tile, tile // 4):
        for x in tile_starts(w, tile, tile // 4):
            if needed[y : y + tile, x : x + tile].any():
                reach[y : y + tile, x : x + tile] = True
    return reach


def _evaluated(x: mx.array) -> mx.array:
    mx.eval(x)
    return x


@contextmanager
def layer_ticks(vae: AutoencoderKL, phase: str) -> Iterator[None]:
    """Within: a whole-image VAE pass reports `phase` after each block layer (evaluated
    there: the same values, the pass runs layer by layer as it would anyway)."""
    done = 0

    def after(x: mx.array) -> None:
        nonlocal done
        mx.eval(x)
        done += 1
        tick(min(done, total))

    with vae.layer_callback(after) as (encode, decode):
        total = decode if phase == "vae_decode" else encode
        tick = ticks(phase, total)
        yield
