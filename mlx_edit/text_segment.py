"""Masks from words with SAM 3: post-processing of the detector's outputs and the choice
of instances.

`post_process_instances` follows transformers' Sam3ImageProcessor
.post_process_instance_segmentation (models/sam3/image_processing_sam3.py): scores are
sigmoid(logits) * sigmoid(presence), queries above `threshold` are kept, their mask
probabilities (sigmoid of the logits) are resized bilinearly (align_corners=False) to the
image size and binarised at `mask_threshold`; boxes are scaled from [0, 1] to pixels.
`select_instances` turns the kept instances into the mask an edit uses: all of them
merged (default), the best, or one by index (0 = highest score); no instance is an
InputError naming the phrase and the best score, never an empty mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_edit.imaging.images import InputError
from mlx_edit.models.sam3_heads import Sam3Outputs
from mlx_edit.segment import upscale_logits

SCORE_THRESHOLD = 0.3  # transformers' default instance threshold
MASK_THRESHOLD = 0.5  # on mask probabilities


@dataclass
class Instances:
    """One image's detections, highest score first.

    scores (K,) float32 in [0, 1]; boxes (K, 4) float32 x0, y0, x1, y1 in pixels of the
    target size (or [0, 1] without one); masks (K, H, W) bool; best_score: the highest
    score of all queries, kept or not (for the "no instance" message)."""

    scores: np.ndarray
    boxes: np.ndarray
    masks: np.ndarray
    best_score: float


def _resize_probs(probs: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    if size is None or len(probs) == 0:
        return probs
    return upscale_logits(probs, *size)


def post_process_instances(out: Sam3Outputs, threshold: float = SCORE_THRESHOLD,
                           mask_threshold: float = MASK_THRESHOLD,
                           sizes: list[tuple[int, int]] | None = None,
                           order: str = "score") -> list[Instances]:
    """Sam3Outputs (batch B) -> B Instances. sizes: (height, width) per image, or None
    to keep the masks at the model's resolution and boxes in [0, 1]. order "score" sorts
    by descending score; "query" keeps transformers' query order."""
    scores = np.array(out.scores, np.float32)
    probs = np.array(mx.sigmoid(out.masks), np.float32)
    boxes = np.array(out.boxes, np.float32)
    results = []
    for i in range(scores.shape[0]):
        keep = np.flatnonzero(scores[i] > threshold)
        if order == "score":
            keep = keep[np.argsort(-scores[i][keep], kind="stable")]
        size = None if sizes is None else tuple(sizes[i])
        b = boxes[i][keep]
        if size is not None:
            b = b * np.array([size[1], size[0], size[1], size[0]], np.float32)
        masks = _resize_probs(probs[i][keep], size) > mask_threshold
        results.append(Instances(scores[i][keep], b, masks, float(scores[i].max())))
    return results


def parse_instances(spec) -> str | int:
    """"all", "best" or a non-negative index (int or digits) -> the same; InputError else."""
    if isinstance(spec, str) and spec.strip().lower() in ("all", "best"):
        return spec.strip().lower()
    try:
        index = int(spec)
    except (TypeError, ValueError):
        index = -1
    if index < 0 or isinstance(spec, (bool, float)):
        raise InputError(f"instances must be 'all', 'best' or an index >= 0, got {spec!r}")
    return index


def select_instances(found: Instances, phrase: str, instances="all",
                     threshold: float = SCORE_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """The chosen instances of `found` (sorted by score) -> (masks (M, H, W) bool,
    scores (M,)): "all" merges every instance into one mask (M = 1, its score the best),
    "best" is the highest-scoring one, an index n the n-th by score.
    InputError when nothing scored above `threshold` or the index is out of range."""
    choice = parse_instances(instances)
    n = len(found.scores)
    if n == 0:
        raise InputError(f'no instance of "{phrase}" found: the best score is '
                         f"{found.best_score:.3f}, below the threshold {threshold:g} "
                         "(lower the threshold or rephrase)")
    if choice == "all":
        return found.masks.any(axis=0, keepdims=True), found.scores[:1]
    index = 0 if choice == "best" else choice
    if index >= n:
        raise InputError(f'instance {index} of "{phrase}" does not exist: {n} found '
                         f"(indices 0..{n - 1}, highest score first)")
    return found.masks[index:index + 1], found.scores[index:index + 1]
