"""Click and box segmentation with SAM 2.1: the image predictor.

    seg = Segmenter.from_pretrained("facebook/sam2.1-hiera-tiny")
    seg.set_image("photo.jpg")                       # the image embedding, once
    masks, scores = seg.predict(points=[(420, 310)], labels=[1])
    masks, scores = seg.predict(boxes=[(80, 40, 400, 380), (500, 60, 700, 300)])

Pre- and post-processing follow transformers' Sam2ImageProcessor / Sam2Processor
(models/sam2/image_processing_sam2.py, processing_sam2.py): the RGB image is resized to
the model's square input with an antialiased bilinear filter (Pillow's BILINEAR equals
torchvision's uint8 antialiased resize), scaled to [0, 1] and ImageNet-normalised; prompt
coordinates are scaled by input/original size per axis; low-resolution mask logits are
resized bilinearly (align_corners=False) to the original size and thresholded at 0.

For edits: `mask_from_prompts(image, points, labels, boxes, model)` loads, segments and
frees in one call (prompts checked before the load); `Points(...)` / `Box(...)` specs
become its keywords through `prompts_from_specs`. Automatic masks: mlx_edit.editing.automask.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_edit.imaging.images import InputError, load_image
from mlx_edit.models.sam import PAD_LABEL, ImageEmbeddings, SamModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) float32 matrix of torch's bilinear resize along one axis
    (align_corners=False, no antialias; negative source positions clamp to 0)."""
    scale = size_in / size_out
    src = np.maximum((np.arange(size_out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    frac = src - i0
    m = np.zeros((size_out, size_in), np.float64)
    np.add.at(m, (np.arange(size_out), i0), 1.0 - frac)
    np.add.at(m, (np.arange(size_out), i1), frac)
    return m.astype(np.float32)


def upscale_logits(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """(..., h, w) low-res logits -> (..., height, width), as F.interpolate(bilinear)."""
    ry = bilinear_matrix(logits.shape[-2], height)
    rx = bilinear_matrix(logits.shape[-1], width)
    return ry @ logits.astype(np.float32) @ rx.T


def remove_holes_and_sprinkles(logits: np.ndarray, max_hole_area: float = 0.0,
                               max_sprinkle_area: float = 0.0) -> np.ndarray:
    """SAM 2's optional mask clean-up on low-res logits (..., h, w) (facebookresearch/sam2
    `utils/transforms.py` postprocess_masks): background components (logit <= 0, 8-connected)
    of at most `max_hole_area` low-res pixels become foreground (logit 10), foreground
    components of at most `max_sprinkle_area` become background (-10). Both are found on
    the input logits. Needs SciPy (`pip install scipy`; the `segment` extra)."""
    if max_hole_area <= 0 and max_sprinkle_area <= 0:
        return logits
    from scipy import ndimage

    out = np.array(logits, np.float32, copy=True)
    flat_in, flat_out = logits.reshape(-1, *logits.shape[-2:]), out.reshape(-1, *out.shape[-2:])
    eight = np.ones((3, 3), bool)
    for src, dst in zip(flat_in, flat_out):
        for region, limit, value in ((src <= 0, max_hole_area, 10.0),
                                     (src > 0, max_sprinkle_area, -10.0)):
            if limit <= 0:
                continue
            labels, n = ndimage.label(region, structure=eight)
            areas = np.bincount(labels.ravel(), minlength=n + 1)
            small = (areas <= limit) & (np.arange(n + 1) > 0)
            dst[small[labels]] = value
    return out


def _objects(points, labels, boxes) -> tuple[list[list], list[list], list | None]:
    """Normalise prompts to per-object lists: points [[(x, y), ...], ...], labels, boxes."""
    points = None if _empty(points) else points
    boxes = None if _empty(boxes) else boxes
    if points is not None and np.ndim(points[0]) == 1:
        points, labels = [points], [labels] if labels is not None else None
    if points is not None and labels is None:
        labels = [[1] * len(p) for p in points]
    if points is not None and len(labels) != len(points):
        raise InputError(f"got labels for {len(labels)} objects but points for {len(points)}")
    if points is not None and boxes is not None and len(points) != len(boxes):
        if len(points) != 1:
            raise InputError(f"{len(points)} point sets but {len(boxes)} boxes: give one point "
                             "set per box, or one box per object")
        if len(boxes) != 1:
            raise InputError("points with several boxes: give one point list per box")
    return points, labels, boxes


def _check_point(x: float, y: float, image_size: tuple[int, int]) -> None:
    h, w = image_size
    if not (math.isfinite(x) and math.isfinite(y) and 0 <= x < w and 0 <= y < h):
        raise InputError(f"point ({x:g}, {y:g}) is outside the {w}x{h} image; points are "
                         "pixel (x, y) with 0 <= x < width, 0 <= y < height")


def _check_box(box, image_size: tuple[int, int]) -> None:
    if len(box) != 4:
        raise InputError(f"a box is (x0, y0, x1, y1), got {tuple(box)}")
    x0, y0, x1, y1 = (float(v) for v in box)
    h, w = image_size
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        raise InputError(f"box {tuple(box)} is empty: need x0 < x1 and y0 < y1")
    if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
        raise InputError(f"box {tuple(box)} lies outside the {w}x{h} image")


def prompt_arrays(points, labels, boxes, image_size: tuple[int, int], input_size: int) -> dict:
    """Validate prompts given in pixels of an image of `image_size` (height, width) and
    scale them to the model's square input of side `input_size`:
    {'points': (1, O, N, 2), 'labels': (1, O, N), 'boxes': (1, O, 4)} (present keys only).
    Objects with fewer points are padded with label -10 (as Sam2Processor).
    Raises InputError: no prompt, a point outside the image, an empty or outside box, a
    label other than 0/1, mismatched counts."""
    if _empty(points) and _empty(boxes):
        raise InputError("no prompt: give at least one point or one box")
    points, labels, boxes = _objects(points, labels, boxes)
    h, w = image_size
    scale = np.array([input_size / w, input_size / h], np.float32)
    out = {}
    if points is not None:
        n = max(len(p) for p in points)
        pts = np.zeros((1, len(points), n, 2), np.float32)
        lab = np.full((1, len(points), n), PAD_LABEL, np.int32)
        for o, (ps, ls) in enumerate(zip(points, labels)):
            if len(ps) != len(ls):
                raise InputError(f"{len(ps)} points but {len(ls)} labels for object {o}")
            for i, ((x, y), lb) in enumerate(zip(ps, ls)):
                _check_point(float(x), float(y), image_size)
                if lb not in (0, 1):
                    raise InputError(f"point labels are 1 (object) or 0 (background), got {lb}")
                pts[0, o, i], lab[0, o, i] = (x, y), lb
        out["points"] = pts * scale
        out["labels"] = lab
    if boxes is not None:
        for box in boxes:
            _check_box(box, image_size)
        out["boxes"] = np.asarray(boxes, np.float32)[None] * np.tile(scale, 2)
    return out


class Segmenter:
    """SAM 2.1 image predictor on MLX (see module doc)."""

    def __init__(self, model: SamModel, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.model = model
        self.size = model.cfg.image_size
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.embeddings: ImageEmbeddings | None = None
        self.image_size: tuple[int, int] | None = None  # (height, width) of the set image

    @classmethod
    def from_pretrained(cls, repo_or_path: str | Path) -> Segmenter:
        """Load a SAM 2.1 checkpoint (transformers layout: folder or hub repo id).

        Raises WeightLoadError (see mlx_edit.weights.sam.load_sam)."""
        from mlx_edit.weights.sam import load_sam, resolve_sam

        folder = resolve_sam(repo_or_path)
        model = load_sam(folder)
        proc = folder / "preprocessor_config.json"
        cfg = json.loads(proc.read_text()) if proc.is_file() else {}
        return cls(model, cfg.get("image_mean", IMAGENET_MEAN), cfg.get("image_std", IMAGENET_STD))

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB image -> (1, S, S, 3) float32 normalised pixels."""
        resized = image.resize((self.size, self.size), Image.BILINEAR)
        x = np.asarray(resized, np.float32) / 255.0
        return ((x - self.mean) / self.std).astype(np.float32)[None]

    def set_image(self, image) -> None:
        """Compute the image embedding of `image` (path, PIL image or uint8 (H, W, 3) array;
        EXIF orientation applied) once; every `predict` reuses it.

        Raises InputError / InputNotFoundError for an unreadable image."""
        img = load_image(image)
        self.image_size = (img.height, img.width)
        self.embeddings = self.model.image_embeddings(mx.array(self.preprocess(img)))
        mx.eval(self.embeddings.embedding, self.embeddings.high_res)

    def prompt_arrays(self, points=None, labels=None, boxes=None) -> dict:
        """`prompt_arrays` for the set image; InputError when no image is set."""
        if self.embeddings is None:
            raise InputError("no image: call set_image(image) before predict()")
        return prompt_arrays(points, labels, boxes, self.image_size, self.size)

    def predict_logits(self, points=None, labels=None, boxes=None, multimask: bool = True,
                       mask_input: np.ndarray | None = None):
        """Raw outputs: low-res mask logits (O, M, 4h, 4w), IoU (O, M), object logits (O,).

        mask_input: (4h, 4w) low-res logits of an earlier prediction (a dense prompt)."""
        arrays = self.prompt_arrays(points, labels, boxes)
        masks = None
        if mask_input is not None:
            side = 4 * self.model.cfg.prompt_encoder.embedding_size
            mask_input = np.asarray(mask_input, np.float32)
            if mask_input.shape != (side, side):
                raise InputError(f"mask_input must be low-res logits of shape ({side}, {side}) "
                                 f"(from predict_logits), got {mask_input.shape}")
            masks = mx.array(mask_input[None, :, :, None])
        m, iou, obj = self.model.decode(
            self.embeddings, points=_mx(arrays.get("points")), labels=_mx(arrays.get("labels")),
            boxes=_mx(arrays.get("boxes")), masks=masks, multimask=multimask)
        return np.array(m[0]), np.array(iou[0]), np.array(obj[0, :, 0])

    def predict(self, points: Sequence | None = None, labels: Sequence | None = None,
                boxes: Sequence | None = None, multimask: bool = True,
                mask_input: np.ndarray | None = None, max_hole_area: float = 0.0,
                max_sprinkle_area: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Masks for the prompts, at the set image's own size.

        points: [(x, y), ...] pixels of the original image for one object, or a list of
          such lists (one per object); labels: matching 1 (object) / 0 (background),
          default all 1. boxes: [(x0, y0, x1, y1), ...], one object each (with one point
          list, or one point list per box). multimask: three candidate masks per object
          (SAM's advice for a single click) instead of one. max_hole_area /
          max_sprinkle_area: `remove_holes_and_sprinkles` (low-res pixels; 0 = off).
        Returns: masks (N, H, W) bool and IoU scores (N,) float32, N = objects x (3 or 1),
          object-major. Raises InputError: no image set, no prompt, a point outside the
          image, an empty box, mismatched labels.
        """
        logits, iou, _ = self.predict_logits(points, labels, boxes, multimask, mask_input)
        logits = remove_holes_and_sprinkles(logits, max_hole_area, max_sprinkle_area)
        h, w = self.image_size
        full = upscale_logits(logits, h, w)
        return (full > 0.0).reshape(-1, h, w), iou.reshape(-1)

    def best_mask(self, points=None, labels=None, boxes=None) -> np.ndarray:
        """One (H, W) bool mask: the union over objects of each object's best mask
        (multimask for a single click, as SAM advises; one mask otherwise)."""
        single_click = boxes is None and points is not None and len(points) == 1 \
            and np.ndim(points[0]) == 1
        logits, iou, _ = self.predict_logits(points, labels, boxes, multimask=single_click)
        chosen = logits[np.arange(len(iou)), iou.argmax(axis=1)]  # (O, 4h, 4w)
        return (upscale_logits(chosen, *self.image_size) > 0.0).any(axis=0)


def _empty(x) -> bool:
    return x is None or len(x) == 0


def _mx(a: np.ndarray | None):
    return None if a is None else mx.array(a)


DEFAULT_SEGMENTER = "facebook/sam2.1-hiera-large"


def find_segmenter(model: str | Path | None = None, root: str | Path | None = None
                   ) -> str | Path:
    """The SAM 2.1 checkpoint to load: `model` (a FLUX model folder holding `segmenter/`
    means that sub-folder), else `root/segmenter/` when present (a pipeline's model
    folder), else DEFAULT_SEGMENTER. Nothing is loaded or downloaded."""
    for folder in (model, None if model is not None else root):
        if folder is not None and (Path(folder).expanduser() / "segmenter").is_dir():
            return Path(folder).expanduser() / "segmenter"
    return DEFAULT_SEGMENTER if model is None else model


def mask_from_prompts(image, points=None, labels=None, boxes=None,
                      model: str | Path = DEFAULT_SEGMENTER) -> np.ndarray:
    """One-shot click/box -> (H, W) bool mask of `image` (path, PIL or uint8 array), as
    `Segmenter.best_mask`; for an edit that segments first and then denoises.

    The prompts are checked before the model is loaded, and the model is released (and
    MLX's cache cleared) before returning, so nothing of SAM stays resident.
    Raises InputError (bad image or prompt) before any load, WeightLoadError (model)."""
    img = load_image(image)
    prompt_arrays(points, labels, boxes, (img.height, img.width), 1024)
    seg = Segmenter.from_pretrained(model)
    try:
        seg.set_image(img)
        return seg.best_mask(points, labels, boxes)
    finally:
        del seg
        mx.clear_cache()


def mask_for_edit(image, prompts, model: str | Path, memory_estimate,
                  low_memory: bool = False) -> np.ndarray:
    """An edit's mask (H, W) float32 in {0, 1} from `Points` / `Box` specs (`prompts`):
    the prompts are checked (before any download), then the segment phase's memory (`memory_estimate(width,
    height, segmenter=config)`, a pipeline's, checked by memory.check_segmenter_fits),
    then `mask_from_prompts`. Raises InputError (prompt, memory), WeightLoadError."""
    from mlx_edit.editing.memory import check_segmenter_fits
    from mlx_edit.weights.sam import sam_config

    kw = prompts_from_specs(prompts)
    prompt_arrays(**kw, image_size=(image.height, image.width), input_size=1024)  # no download
    est = memory_estimate(image.width, image.height, segmenter=sam_config(model))
    check_segmenter_fits(est, low_memory)
    return mask_from_prompts(image, **kw, model=model).astype(np.float32)


@dataclass(frozen=True)
class Points:
    """A click prompt for an edit's mask: pixels (x, y) of the photo, labels 1 (on the
    object, the default) or 0 (not on it)."""

    xy: tuple
    labels: tuple | None = None


@dataclass(frozen=True)
class Box:
    """A box prompt for an edit's mask: (x0, y0, x1, y1) pixels of the photo."""

    x0: float
    y0: float
    x1: float
    y1: float


def prompts_from_specs(specs) -> dict:
    """`Points` and `Box` specs (one, or a list) -> the `points/labels/boxes` keywords of
    `Segmenter.best_mask`: all points with at most one box are one object; several boxes
    without points are one object each. Raises InputError for anything else."""
    specs = list(specs) if isinstance(specs, (list, tuple)) else [specs]
    points, labels, boxes = [], [], []
    for spec in specs:
        if isinstance(spec, Points):
            points += [tuple(p) for p in spec.xy]
            labels += list(spec.labels) if spec.labels is not None else [1] * len(spec.xy)
        elif isinstance(spec, Box):
            boxes.append((spec.x0, spec.y0, spec.x1, spec.y1))
        else:
            raise InputError(f"a mask prompt is Points(...) or Box(...), got {type(spec).__name__}")
    if points and len(boxes) > 1:
        raise InputError("Points with several Box prompts: give one Box per object without "
                         "Points, or one Box with the Points")
    return dict(points=points or None, labels=labels or None, boxes=boxes or None)
