"""Latent packing, position ids and FLUX Fill conditioning (pure mlx functions).

Our VAE is NHWC, so latents here are (B, H, W, C) where diffusers uses (B, C, H, W); the
packed token layout is identical to diffusers' (pipelines/flux/pipeline_flux_fill.py):
- `pack_latents` / `unpack_latents`: `FluxFillPipeline._pack_latents` / `_unpack_latents`,
  2x2 patches, token t = row * (W/2) + col, channel = 4c + 2ph + pw.
- `image_ids` / `text_ids`: `_prepare_latent_image_ids` and the zero text ids.
- `pack_mask`: the 8x8 pixel folding of `prepare_mask_latents` (channel = 8dy + dx), packed.
- Fill tokens: [noisy latents 4C | masked-image latents 4C | mask 4f^2], i.e.
  64 + 64 + 256 = 384 channels for FLUX.1 Fill (C = 16 latent channels, f = 8).

Sizes: H x W pixels must be multiples of 2f (16 for FLUX), giving an (H/16) x (W/16) token
grid; non-square sizes and any batch size are supported.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_edit.sampling import latents_flux2


def token_grid(height_px: int, width_px: int, vae_scale_factor: int = 8) -> tuple[int, int]:
    """Packed token grid (h_tokens, w_tokens) = (H / 2f, W / 2f) for an H x W pixel image.

    Raises ValueError unless both sizes are positive multiples of 2 * vae_scale_factor.
    """
    step = 2 * vae_scale_factor
    if height_px <= 0 or width_px <= 0 or height_px % step or width_px % step:
        raise ValueError(
            f"image size {height_px}x{width_px} px must be a positive multiple of {step}"
        )
    return height_px // step, width_px // step


def pack_latents(latents: mx.array) -> mx.array:
    """Pack 2x2 latent patches into tokens.

    Args:
        latents: (B, H, W, C) NHWC latents, H and W even.

    Returns:
        (B, (H/2)(W/2), 4C), same dtype; token index = row * (W/2) + col, channel index
        = 4c + 2ph + pw (diffusers `_pack_latents` on the NCHW tensor).

    Raises:
        ValueError: not 4-D, or H or W odd.
    """
    if latents.ndim != 4:
        raise ValueError(f"expected (B, H, W, C) latents, got shape {latents.shape}")
    b, h, w, c = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even, got {h}x{w}")
    x = latents.reshape(b, h // 2, 2, w // 2, 2, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # (B, h/2, w/2, C, ph, pw)
    return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(
    packed: mx.array, height_px: int, width_px: int, vae_scale_factor: int = 8
) -> mx.array:
    """Inverse of `pack_latents`: (B, N, 4C) tokens -> (B, H, W, C) NHWC latents.

    `height_px`, `width_px` are the image size in pixels; the latent grid is
    H = 2 * (height_px // (2f)), W likewise, as in diffusers `_unpack_latents`.

    Raises:
        ValueError: not 3-D, channels not divisible by 4, or N != (H/2)(W/2).
    """
    if packed.ndim != 3:
        raise ValueError(f"expected (B, N, 4C) packed latents, got shape {packed.shape}")
    b, n, c4 = packed.shape
    h = 2 * (int(height_px) // (vae_scale_factor * 2))
    w = 2 * (int(width_px) // (vae_scale_factor * 2))
    if c4 % 4 or n != (h // 2) * (w // 2):
        raise ValueError(
            f"packed shape {packed.shape} does not match {height_px}x{width_px} px "
            f"(expected N={(h // 2) * (w // 2)} tokens and channels divisible by 4)"
        )
    x = packed.reshape(b, h // 2, w // 2, c4 // 4, 2, 2)  # (B, h/2, w/2, C, ph, pw)
    x = x.transpose(0, 1, 4, 2, 5, 3)  # (B, h/2, ph, w/2, pw, C)
    return x.reshape(b, h, w, c4 // 4)


def image_ids(h_tokens: int, w_tokens: int, axes: int = 3) -> mx.array:
    """RoPE position ids of the packed image tokens, (h*w, axes) float32.

    Token t = r * w_tokens + c. axes 3 (FLUX.1): row t = (0, r, c) (diffusers
    `_prepare_latent_image_ids`); axes 4 (FLUX.2): (0, r, c, 0) (`latents_flux2.latent_ids`).
    """
    if axes == 4:
        return latents_flux2.latent_ids(h_tokens, w_tokens)
    rows = mx.repeat(mx.arange(h_tokens, dtype=mx.float32), w_tokens)
    cols = mx.tile(mx.arange(w_tokens, dtype=mx.float32), h_tokens)
    zeros = mx.zeros_like(rows)
    return mx.stack([zeros, rows, cols], axis=1)


def text_ids(n: int, axes: int = 3) -> mx.array:
    """RoPE position ids of n text tokens, (n, axes) float32: zeros for FLUX.1 (axes 3: text
    has no position); (0, 0, 0, l) for FLUX.2 (axes 4, `latents_flux2.text_ids`)."""
    return latents_flux2.text_ids(n) if axes == 4 else mx.zeros((n, 3), dtype=mx.float32)


def pack_mask(mask: mx.array, vae_scale_factor: int = 8) -> mx.array:
    """Fold a pixel mask into latent channels and pack it (FluxFillPipeline.prepare_mask_latents).

    Args:
        mask: (B, H_px, W_px) or (B, H_px, W_px, 1), 1 = repaint, values in [0, 1]
            (diffusers binarizes at 0.5 beforehand; this function keeps values as given).
            H_px and W_px must be multiples of 2 * vae_scale_factor.

    Returns:
        (B, N, 4 f^2) with f = vae_scale_factor, N = (H_px/2f)(W_px/2f), same dtype. Each
        f x f pixel block becomes f^2 channels (channel = f dy + dx), then `pack_latents`,
        so the final channel = 4 (f dy + dx) + 2 ph + pw; 256 channels for FLUX (f = 8).

    Raises:
        ValueError: bad rank or a size that is not a multiple of 2f.
    """
    if mask.ndim == 4 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 3:
        raise ValueError(f"expected a (B, H, W) mask, got shape {mask.shape}")
    b, hp, wp = mask.shape
    token_grid(hp, wp, vae_scale_factor)  # validates the size
    f = vae_scale_factor
    h, w = hp // f, wp // f
    x = mask.reshape(b, h, f, w, f).transpose(0, 1, 3, 2, 4)  # (B, h, w, dy, dx)
    return pack_latents(x.reshape(b, h, w, f * f))


def pack_latent_mask(mask: mx.array, channels: int = 16, vae_scale_factor: int = 8
                     ) -> mx.array:
    """A pixel mask (B, H_px, W_px) sampled at latent resolution (nearest: pixel (f i, f j)
    for latent pixel (i, j), as torch's `interpolate` default) and repeated over the latent
    channels, packed: (B, N, 4 channels), matching packed latents channel by channel
    (diffusers FluxKontextInpaintPipeline.prepare_mask_latents)."""
    token_grid(mask.shape[1], mask.shape[2], vae_scale_factor)  # validates the size
    m = mask[:, ::vae_scale_factor, ::vae_scale_factor, None]
    return pack_latents(mx.broadcast_to(m, (*m.shape[:3], channels)))


def _check_tokens(a: mx.array, b: mx.array, what: str) -> None:
    if a.ndim != 3 or b.ndim != 3 or a.shape[:2] != b.shape[:2]:
        raise ValueError(
            f"{what}: (B, N, C) shapes must agree in B and N, got {a.shape}, {b.shape}"
        )


def fill_conditioning(masked_image_latents: mx.array, mask_packed: mx.array) -> mx.array:
    """Fill conditioning tokens: concat [masked-image latents | mask] on channels.

    Args:
        masked_image_latents: (B, N, 4C) packed, scaled VAE latents of image * (1 - mask)
            (64 channels for FLUX).
        mask_packed: (B, N, 4 f^2) from `pack_mask` (256 for FLUX).

    Returns:
        (B, N, 4C + 4 f^2) (320 for FLUX), in the promoted dtype of the inputs.

    Raises:
        ValueError: B or N differ.
    """
    _check_tokens(masked_image_latents, mask_packed, "fill_conditioning")
    return mx.concatenate([masked_image_latents, mask_packed], axis=-1)


def model_input(latents_packed: mx.array, conditioning: mx.array | None,
                tokens: mx.array | None = None) -> mx.array:
    """Transformer input tokens: [noisy latents | conditioning] on channels, then the
    reference `tokens` appended on the sequence.

    Args:
        latents_packed: (B, N, 4C) noisy packed latents (64 for FLUX).
        conditioning: (B, N, K) or (1, N, K) from `fill_conditioning` (K = 320 for FLUX),
            or None (no channel conditioning: dev, Kontext); a batch of 1 is broadcast to B.
        tokens: (B|1, M, 4C + K) reference tokens (Kontext) or None.

    Returns:
        (B, N [+ M], 4C + K) (384 for Fill), the `hidden_states` of the transformer.

    Raises:
        ValueError: N differs, or the batch sizes differ and conditioning's is not 1.
    """
    b = latents_packed.shape[0]
    x = latents_packed
    if conditioning is not None:
        if conditioning.ndim == 3 and conditioning.shape[0] == 1 and x.ndim == 3:
            conditioning = mx.broadcast_to(conditioning, (b, *conditioning.shape[1:]))
        _check_tokens(x, conditioning, "model_input")
        x = mx.concatenate([x, conditioning.astype(x.dtype)], axis=-1)
    if tokens is not None:
        tokens = mx.broadcast_to(tokens, (b, *tokens.shape[1:])).astype(x.dtype)
        x = mx.concatenate([x, tokens], axis=1)
    return x


def scale_latents(z: mx.array, scaling: float, shift: float) -> mx.array:
    """VAE latents -> model latents: `(z - shift) * scaling` (FLUX: 0.3611, 0.1159)."""
    return (z - shift) * scaling


def unscale_latents(z: mx.array, scaling: float, shift: float) -> mx.array:
    """Model latents -> VAE latents: `z / scaling + shift`, the order diffusers decodes with."""
    return z / scaling + shift
