"""FLUX.2 latents: 2x2 patchify, batch-norm normalisation, packed tokens and 4-axis ids.

Pure mlx functions. Our VAE is NHWC, so latents are (B, H, W, C) where diffusers uses
(B, C, H, W); channel orders and token orders are diffusers'. The path of an image into
the transformer and back (diffusers `pipelines/flux2/pipeline_flux2_klein.py`:
`_encode_vae_image`, `prepare_latents`, `prepare_image_latents` and the end of
`__call__`; `pipeline_flux2_klein_inpaint.py` the same):

    VAE posterior mode (B, H/8, W/8, 32)
      -> patchify_latents    (B, H/16, W/16, 128), channel 4c + 2ph + pw
      -> normalize_latents   (x - running_mean) / sqrt(running_var + eps), VAE `bn`
      -> pack_latents        (B, (H/16)(W/16), 128) tokens, token = row * (W/16) + col
    tokens -> unpack_latents (scatter by ids) -> denormalize_latents -> unpatchify_latents
      -> VAE decode

`tokens_from_latents` / `latents_from_tokens` are these chains. Position ids have four
axes (t, h, w, l): the target image's tokens are (0, row, col, 0) (`latent_ids`),
reference image i's (10 + 10 i, row, col, 0) (`reference_ids`), text token l's
(0, 0, 0, l) (`text_ids`). Ids are float32 (integers, exact), like FLUX.1's 3-axis ids.

Sizes (`image_sizes`): an input image above 1024 x 1024 px in area is first resized to
about that area, then its sides are rounded down to multiples of 16 (2 x the VAE's 8).
"""

from __future__ import annotations

import math

import mlx.core as mx

PATCH = 2  # latent patch side (AutoencoderKLFlux2 patch_size (2, 2))
REFERENCE_TIME_SCALE = 10  # t of reference i is scale + scale * i (`_prepare_image_ids`)
MAX_AREA = 1024 * 1024  # input images above this many pixels are resized down to it


def image_sizes(height: int, width: int, max_area: int = MAX_AREA, multiple: int = 16
                ) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized h, w), (final h, w)) in pixels for an input image of height x width.

    An image over `max_area` pixels is resized (Lanczos in diffusers) to
    (int(h s), int(w s)), s = sqrt(max_area / (h w)) (Flux2ImageProcessor
    `_resize_to_target_area`), else kept; the final size rounds both sides down to
    `multiple` (= 2 x vae_scale_factor). Flux2KleinPipeline center-crops references to
    the final size; Flux2KleinInpaintPipeline resizes its image to it.
    Raises ValueError when a side ends up below `multiple`.
    """
    if height * width > max_area:
        scale = math.sqrt(max_area / (height * width))
        height, width = int(height * scale), int(width * scale)
    final = (height // multiple * multiple, width // multiple * multiple)
    if min(final) <= 0:
        raise ValueError(f"image of {height}x{width} px is smaller than {multiple} px")
    return (height, width), final


def _check_rank(x: mx.array, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected (B, H, W, C) {what}, got shape {x.shape}")


def patchify_latents(latents: mx.array) -> mx.array:
    """(B, H, W, C) VAE latents -> (B, H/2, W/2, 4C), 2x2 patches folded into channels.

    Channel 4c + 2ph + pw holds latent channel c at patch offset (ph, pw) (diffusers
    `Flux2KleinPipeline._patchify_latents` on NCHW). Same dtype. Raises ValueError for
    a rank other than 4 or an odd H or W.
    """
    _check_rank(latents, "latents")
    b, h, w, c = latents.shape
    if h % PATCH or w % PATCH:
        raise ValueError(f"latent height and width must be even, got {h}x{w}")
    x = latents.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, h // 2, w // 2, 4 * c)


def unpatchify_latents(latents: mx.array) -> mx.array:
    """Inverse of `patchify_latents`: (B, h, w, 4C) -> (B, 2h, 2w, C) (diffusers
    `_unpatchify_latents`). Raises ValueError for a rank other than 4 or channels not
    divisible by 4."""
    _check_rank(latents, "patchified latents")
    b, h, w, c4 = latents.shape
    if c4 % 4:
        raise ValueError(f"patchified latents need channels divisible by 4, got {c4}")
    x = latents.reshape(b, h, w, c4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, 2 * h, 2 * w, c4 // 4)


def _std(running_var: mx.array, eps: float) -> mx.array:
    return mx.sqrt(running_var.astype(mx.float32) + eps)


def normalize_latents(latents: mx.array, running_mean: mx.array, running_var: mx.array,
                      eps: float) -> mx.array:
    """(x - running_mean) / sqrt(running_var + eps) over the last axis (the VAE's
    `bn`: channels (128,) of patchified latents; eps = `config.batch_norm_eps`, 1e-4).

    latents (..., C) any float dtype; statistics (C,). Computed in float32, returned
    in the latents' dtype (diffusers `_encode_vae_image`).
    """
    mean = running_mean.astype(mx.float32)
    out = (latents.astype(mx.float32) - mean) / _std(running_var, eps)
    return out.astype(latents.dtype)


def denormalize_latents(latents: mx.array, running_mean: mx.array, running_var: mx.array,
                        eps: float) -> mx.array:
    """Inverse of `normalize_latents`: x * sqrt(running_var + eps) + running_mean, in
    float32, returned in the latents' dtype (the end of diffusers' Flux2 `__call__`)."""
    out = latents.astype(mx.float32) * _std(running_var, eps) + running_mean.astype(mx.float32)
    return out.astype(latents.dtype)


def pack_latents(latents: mx.array) -> mx.array:
    """(B, h, w, C) patchified latents -> (B, h*w, C) tokens, token = row * w + col
    (diffusers `_pack_latents`). Raises ValueError for a rank other than 4."""
    _check_rank(latents, "latents")
    b, h, w, c = latents.shape
    return latents.reshape(b, h * w, c)


def unpack_latents(tokens: mx.array, ids: mx.array, height: int, width: int) -> mx.array:
    """Scatter tokens (B, N, C) to (B, height, width, C) by their position ids (N, 4)
    (rows (t, row, col, l); t and l are ignored): token n lands at (row_n, col_n), cells
    no token names are zero (diffusers `_unpack_latents_with_ids`).

    height, width: the token grid (latent size / 2). Raises ValueError when the shapes
    disagree.
    """
    if tokens.ndim != 3 or ids.ndim != 2 or ids.shape != (tokens.shape[1], 4):
        raise ValueError(f"expected (B, N, C) tokens and (N, 4) ids, got {tokens.shape}, "
                         f"{ids.shape}")
    b, _, c = tokens.shape
    flat = ids[:, 1].astype(mx.int32) * width + ids[:, 2].astype(mx.int32)
    out = mx.zeros((b, height * width, c), dtype=tokens.dtype)
    out[:, flat] = tokens
    return out.reshape(b, height, width, c)


def tokens_from_latents(latents: mx.array, running_mean: mx.array, running_var: mx.array,
                        eps: float) -> mx.array:
    """VAE latents (B, H, W, C) -> normalised packed tokens (B, (H/2)(W/2), 4C): patchify,
    normalise, pack (diffusers `_encode_vae_image` then `_pack_latents`)."""
    x = normalize_latents(patchify_latents(latents), running_mean, running_var, eps)
    return pack_latents(x)


def latents_from_tokens(tokens: mx.array, ids: mx.array, height: int, width: int,
                        running_mean: mx.array, running_var: mx.array, eps: float
                        ) -> mx.array:
    """Normalised packed tokens (B, N, 4C) with ids (N, 4) on a height x width token grid
    -> VAE latents (B, 2 height, 2 width, C): unpack, denormalise, unpatchify (the end of
    diffusers' Flux2KleinPipeline.__call__, before `vae.decode`)."""
    x = unpack_latents(tokens, ids, height, width)
    return unpatchify_latents(denormalize_latents(x, running_mean, running_var, eps))


def _grid_ids(height: int, width: int, t: float) -> mx.array:
    rows = mx.repeat(mx.arange(height, dtype=mx.float32), width)
    cols = mx.tile(mx.arange(width, dtype=mx.float32), height)
    zeros = mx.zeros_like(rows)
    return mx.stack([zeros + t, rows, cols, zeros], axis=1)


def latent_ids(height: int, width: int) -> mx.array:
    """Position ids (height*width, 4) float32 of the target image's tokens on a height x
    width token grid: row n = (0, r, c, 0), n = r * width + c (diffusers
    `_prepare_latent_ids`, without the batch axis)."""
    return _grid_ids(height, width, 0.0)


def reference_ids(grids: list[tuple[int, int]], scale: int = REFERENCE_TIME_SCALE
                  ) -> mx.array:
    """Position ids (sum h_i w_i, 4) float32 of reference images' tokens, concatenated in
    order: reference i on an h_i x w_i token grid has rows (scale + scale i, r, c, 0)
    (diffusers `_prepare_image_ids`, without the batch axis). Raises ValueError for no
    grids."""
    if not grids:
        raise ValueError("reference_ids needs at least one (height, width) token grid")
    return mx.concatenate([_grid_ids(h, w, float(scale + scale * i))
                           for i, (h, w) in enumerate(grids)], axis=0)


def text_ids(n: int) -> mx.array:
    """Position ids (n, 4) float32 of n text tokens: row l = (0, 0, 0, l) (diffusers
    `_prepare_text_ids` with no t_coord)."""
    zeros = mx.zeros((n,), dtype=mx.float32)
    return mx.stack([zeros, zeros, zeros, mx.arange(n, dtype=mx.float32)], axis=1)
