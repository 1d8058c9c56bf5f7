"""Automatic masks: every object SAM 2.1 finds from a grid of clicks.

    seg = Segmenter.from_pretrained(...); seg.set_image(img)
    for m in generate_masks(seg):            # sorted by area, largest first
        m.mask, m.bbox, m.predicted_iou, m.stability_score

The method of SAM's automatic mask generator (facebookresearch/sam2
`sam2/automatic_mask_generator.py`, one crop layer): a `points_per_side` x
`points_per_side` grid of single positive clicks at cell centres, decoded in batches of
`points_per_batch` with three masks each; masks are kept when their predicted IoU reaches
`pred_iou_thresh` and their stability score (IoU of the mask thresholded at +-offset)
reaches `stability_score_thresh`; duplicates are removed by greedy non-maximum suppression
of the mask boxes (IoU > `box_nms_thresh`), the higher predicted IoU winning. The defaults
are SAM 2's. Masks are thresholded at the original image size, as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlx_edit.editing.segment import Segmenter, upscale_logits


@dataclass
class AutoMask:
    """One automatic mask: `mask` (H, W) bool, `bbox` (x0, y0, x1, y1) inclusive pixel
    bounds, `area` in pixels, the model's `predicted_iou`, `stability_score`, and the grid
    `point` (x, y) that produced it."""

    mask: np.ndarray
    bbox: tuple[int, int, int, int]
    area: int
    predicted_iou: float
    stability_score: float
    point: tuple[float, float]


def point_grid(n: int, height: int, width: int) -> np.ndarray:
    """(n * n, 2) float32 (x, y) pixel coordinates of the cell centres of an n x n grid."""
    centres = (np.arange(n, dtype=np.float64) + 0.5) / n
    xs, ys = np.meshgrid(centres * width, centres * height)
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)


def stability_scores(logits: np.ndarray, threshold: float, offset: float) -> np.ndarray:
    """(..., H, W) logits -> (...,) IoU of the masks at threshold + offset and - offset
    (1 when both are empty)."""
    inner = (logits > threshold + offset).sum(axis=(-2, -1))
    outer = (logits > threshold - offset).sum(axis=(-2, -1))
    return np.where(outer > 0, inner / np.maximum(outer, 1), 1.0)


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, 4) int (x0, y0, x1, y1) inclusive bounds; (0, 0, 0, 0) if empty."""
    boxes = np.zeros((len(masks), 4), np.int64)
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    for i in range(len(masks)):
        ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        if len(ys):
            boxes[i] = (xs[0], ys[0], xs[-1], ys[-1])
    return boxes


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_thresh: float) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the kept boxes, best score first.
    boxes (N, 4) inclusive (x0, y0, x1, y1), as torchvision.ops.batched_nms on one class."""
    boxes = boxes.astype(np.float64)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.argsort(-scores, kind="stable")
    keep = []
    while len(order):
        i, rest = order[0], order[1:]
        keep.append(i)
        lo = np.maximum(boxes[i, :2], boxes[rest, :2])
        hi = np.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
        iou = inter / np.maximum(area[i] + area[rest] - inter, 1e-12)
        order = rest[iou <= iou_thresh]
    return np.array(keep, np.int64)


def _batch_candidates(seg: Segmenter, points: np.ndarray, pred_iou_thresh: float,
                      stability_thresh: float, offset: float) -> list[tuple]:
    """Decode one batch of grid points; the masks passing both filters."""
    logits, iou, _ = seg.predict_logits(points=[[tuple(p)] for p in points],
                                        labels=[[1] for _ in points], multimask=True)
    full = upscale_logits(logits, *seg.image_size)  # (P, M, H, W)
    stab = stability_scores(full, 0.0, offset)
    out = []
    for o, m in zip(*np.nonzero((iou >= pred_iou_thresh) & (stab >= stability_thresh))):
        out.append((full[o, m] > 0.0, float(iou[o, m]), float(stab[o, m]), tuple(points[o])))
    return out


def generate_masks(seg: Segmenter, points_per_side: int = 32, points_per_batch: int = 64,
                   pred_iou_thresh: float = 0.8, stability_score_thresh: float = 0.95,
                   stability_score_offset: float = 1.0, box_nms_thresh: float = 0.7,
                   min_area: int = 1) -> list[AutoMask]:
    """All masks of the image set on `seg` (see module doc), largest area first.

    Raises InputError when no image is set. Memory: one batch of points_per_batch x 3
    full-size float32 logit maps at a time (64 x 3 x 12 MP x 4 B = 9 GB at 12 MP; lower
    points_per_batch for large photos)."""
    if seg.image_size is None:
        from mlx_edit.imaging.images import InputError

        raise InputError("no image: call set_image(image) before generate_masks()")
    grid = point_grid(points_per_side, *seg.image_size)
    cands = []
    for start in range(0, len(grid), points_per_batch):
        cands += _batch_candidates(seg, grid[start:start + points_per_batch], pred_iou_thresh,
                                   stability_score_thresh, stability_score_offset)
    cands = [c for c in cands if c[0].sum() >= min_area]
    if not cands:
        return []
    masks = np.stack([c[0] for c in cands])
    boxes = mask_boxes(masks)
    keep = box_nms(boxes, np.array([c[1] for c in cands]), box_nms_thresh)
    found = [AutoMask(masks[i], tuple(int(v) for v in boxes[i]), int(masks[i].sum()),
                      cands[i][1], cands[i][2], cands[i][3]) for i in keep]
    return sorted(found, key=lambda m: -m.area)
