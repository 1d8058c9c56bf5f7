"""Rank edit candidates by CLIP image-text similarity (issue 17: `--rank clip`).

score = exp(logit_scale) * cos(text_embeds, image_embeds), transformers
`CLIPModel.logits_per_image` (models/clip/modeling_clip.py): text_embeds = the text
tower's pooled (EOS) output through `text_projection`, image_embeds = the vision tower's
class token through `visual_projection` (mlx_edit.models.clip.CLIPVisionModel). Images
are preprocessed as `CLIPImageProcessor` (mlx_edit.conditioning.image_prompts
.clip_preprocess). Candidates are scored on the edited region (the blend mask's bounding
box plus a margin), so the untouched rest of the photo does not dilute the score.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_edit.conditioning.image_prompts import clip_image_embeds
from mlx_edit.imaging.masks import mask_bbox
from mlx_edit.weights.ranker import ClipRanker, load_clip_ranker, resolve_ranker

REGION_MARGIN = 0.25  # of the region's longer side, added around it for context


def _unit(x: mx.array) -> mx.array:
    x = x.astype(mx.float32)
    return x / mx.linalg.norm(x, axis=-1, keepdims=True)


def clip_scores(ranker: ClipRanker, images: Sequence[Image.Image], prompt: str) -> np.ndarray:
    """CLIP logits of each image against `prompt`: float32 (n,), higher = better match.

    Equals transformers `CLIPModel(input_ids, pixel_values).logits_per_image[:, 0]` on the
    same weights (tests/test_ranking.py, parity marker).
    """
    ids = mx.array(ranker.tokenizer(prompt, max_length=ranker.text.config.max_position_embeddings))
    text = _unit(ranker.text(ids)[1] @ ranker.text_projection.T)  # (1, P)
    image = _unit(clip_image_embeds(ranker.vision, list(images)))  # (n, P)
    logits = np.exp(ranker.logit_scale) * (image @ text.T)[:, 0]
    return np.array(logits, dtype=np.float32)


def edit_region(blend: np.ndarray, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """PIL box around blend > 0 grown by REGION_MARGIN of its longer side, clamped to
    size (W, H); the whole image when the blend is empty."""
    box = mask_bbox(np.asarray(blend) > 0)
    if box is None:
        return (0, 0, *size)
    x0, y0, x1, y1 = box
    m = int(round(REGION_MARGIN * max(x1 - x0, y1 - y0)))
    return max(0, x0 - m), max(0, y0 - m), min(size[0], x1 + m), min(size[1], y1 + m)


def rank_images(ranker: ClipRanker, images: Sequence[Image.Image], prompt: str,
                blend: np.ndarray, keep_best: int | None = None,
                model_name: str = "") -> list[Image.Image]:
    """Order candidates by their CLIP score on the edited region, best first.

    Each returned image's `.info` gains rank_method "clip", rank (1 = best), rank_score
    and rank_model; keep_best K keeps the first K (None: all).
    Raises ValueError if keep_best < 1.
    """
    if keep_best is not None and keep_best < 1:
        raise ValueError(f"keep_best must be >= 1, got {keep_best}")
    box = edit_region(blend, images[0].size)
    scores = clip_scores(ranker, [im.crop(box) for im in images], prompt)
    order = np.argsort(-scores, kind="stable")[:keep_best]
    out = []
    for rank, i in enumerate(order, start=1):
        img = images[i]
        img.info.update({"rank_method": "clip", "rank": str(rank),
                         "rank_score": f"{float(scores[i]):.6g}", "rank_model": model_name})
        out.append(img)
    return out


def rank_candidates(images: list[Image.Image], prompt: str, blend: np.ndarray, *,
                    keep_best: int | None = None, rank_model=None, model_root=None,
                    dtype: mx.Dtype | None = None) -> list[Image.Image]:
    """Load the ranking CLIP (`resolve_ranker(rank_model, model_root)`), `rank_images`,
    free it. Raises WeightLoadError (no ranker), ValueError (keep_best < 1)."""
    folder = resolve_ranker(rank_model, model_root)
    ranker = load_clip_ranker(folder, dtype)
    out = rank_images(ranker, images, prompt, blend, keep_best, str(rank_model or folder))
    del ranker
    mx.clear_cache()
    return out
