"""FLUX.1 Kontext references: resized, VAE-encoded, packed into sequence tokens with ids.

Each reference image is resized (Lanczos) to the preferred Kontext resolution closest in
aspect ratio (BFL src/flux/util.py PREFERED_KONTEXT_RESOLUTIONS; diffusers
pipeline_flux_kontext.py `_auto_resize`), encoded with the VAE posterior mode (diffusers'
`sample_mode="argmax"`), scaled and packed 2x2 into 64-channel tokens. Their position ids
have axis 0 = 1 and rows/columns from 0 (BFL sampling.py prepare_kontext; diffusers
`image_ids[..., 0] = 1`). The loop appends them after the target tokens and keeps the
velocity of the target tokens only.

Several references use ComfyUI's default "offset" layout (comfy/ldm/flux/model.py,
`ref_latents_method="offset"`): every reference keeps axis 0 = 1 and is placed beside
(columns offset) or below (rows offset) the ones before, whichever keeps the combined
grid closer to square. The model was trained with one reference; quality with more
depends on the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
from PIL import Image

from mlx_edit.conditioning.context import ConditioningContext
from mlx_edit.imaging.images import InputError, to_array
from mlx_edit.sampling.latents import token_grid

# (width, height) px, about one megapixel each (BFL util.py; diffusers, same list).
PREFERRED_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248),
    (880, 1184), (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832),
    (1328, 800), (1392, 752), (1456, 720), (1504, 688), (1568, 672),
)
MULTIPLE = 16  # px: VAE factor 8 x 2x2 packing


def preferred_size(width: int, height: int) -> tuple[int, int]:
    """The preferred Kontext resolution (W, H) closest in aspect ratio to width x height
    (ties go to the smaller width, as diffusers' `min` over (|diff|, w, h))."""
    aspect = width / height
    return min((abs(aspect - w / h), w, h) for w, h in PREFERRED_RESOLUTIONS)[1:]


def reference_size(width: int, height: int, auto_resize: bool = True) -> tuple[int, int]:
    """Size a reference image is encoded at: the preferred resolution (auto_resize), else
    its own size floored to multiples of 16 px. Raises InputError below 16 px."""
    if auto_resize:
        width, height = preferred_size(width, height)
    w, h = width // MULTIPLE * MULTIPLE, height // MULTIPLE * MULTIPLE
    if not (w and h):
        raise InputError(f"reference image {width}x{height} is smaller than {MULTIPLE} px")
    return w, h


def offset_layout(grids: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """(row, column) token offsets of references with token grids (h, w), laid out as
    ComfyUI's "offset" method: a reference taller than wide (given the canvas so far)
    goes to the right of it, otherwise below it."""
    offsets, h_all, w_all = [], 0, 0
    for h, w in grids:
        row, col = (0, w_all) if h + h_all > w + w_all else (h_all, 0)
        offsets.append((row, col))
        h_all, w_all = max(h_all, h + row), max(w_all, w + col)
    return offsets


def reference_ids(h: int, w: int, row: int = 0, col: int = 0) -> mx.array:
    """Position ids (h*w, 3) float32 of a reference's tokens: (1, row + r, col + c)."""
    rows = mx.repeat(mx.arange(h, dtype=mx.float32) + row, w)
    cols = mx.tile(mx.arange(w, dtype=mx.float32) + col, h)
    return mx.stack([mx.ones_like(rows), rows, cols], axis=1)


def resize_reference(image: Image.Image, auto_resize: bool = True) -> Image.Image:
    """`image` (RGB) resized with Lanczos to `reference_size` (unchanged if equal)."""
    size = reference_size(*image.size, auto_resize=auto_resize)
    image = image.convert("RGB")
    return image if image.size == size else image.resize(size, Image.LANCZOS)


def kontext_tokens(ctx: ConditioningContext, references: Sequence[Image.Image],
                   auto_resize: bool = True) -> tuple[mx.array, mx.array]:
    """(tokens (1, M, 64) in ctx.dtype, ids (M, 3) float32) of the reference images,
    concatenated in order with the offset layout (M = sum of their token counts).

    references: PIL images of any size (resized here, see `resize_reference`).
    Raises InputError for no reference or one under 16 px.
    """
    if not references:
        raise InputError("Kontext needs at least one reference image")
    resized = [resize_reference(im, auto_resize) for im in references]
    grids = [token_grid(im.size[1], im.size[0]) for im in resized]
    tokens, ids = [], []
    for im, (h, w), (row, col) in zip(resized, grids, offset_layout(grids), strict=True):
        tokens.append(ctx.encode_image(to_array(im)).astype(ctx.dtype))
        ids.append(reference_ids(h, w, row, col))
    return mx.concatenate(tokens, axis=1), mx.concatenate(ids, axis=0)
