"""Masks from words with SAM 3: the text segmenter, post-processing of the detector's
outputs and the choice of instances.

    seg = TextSegmenter.from_pretrained("path/to/sam3")      # a transformers Sam3Model folder
    masks, scores = seg.masks("photo.jpg", "the red car")    # all instances merged
    masks, scores = seg.masks("photo.jpg", "a dog", instances="best", threshold=0.5)
    found = seg.detect("a dog", boxes=[(10, 20, 200, 180)])  # text + an exemplar box

Pre-processing is Sam3ImageProcessor's (resize to the square input, bilinear, 1/255,
mean = std = 0.5; the image's own processor needs torchvision, so its steps are applied
with Pillow as for SAM 2.1) and the tokenizer is Sam3Processor's (CLIP, 32 tokens).
Exemplar boxes are pixels (x0, y0, x1, y1) of the image, normalised by its size and
passed as (cx, cy, w, h) (Sam3Processor); labels 1 (positive, default) or 0 (negative).

`post_process_instances` follows transformers' Sam3ImageProcessor
.post_process_instance_segmentation (models/sam3/image_processing_sam3.py): scores are
sigmoid(logits) * sigmoid(presence), queries above `threshold` are kept, their mask
probabilities (sigmoid of the logits) are resized bilinearly (align_corners=False) to the
image size and binarised at `mask_threshold`; boxes are scaled from [0, 1] to pixels.
`select_instances` turns the kept instances into the mask an edit uses: all of them
merged (default), the best, or one by index (0 = highest score); no instance is an
InputError naming the phrase and the best score, never an empty mask.

For edits: a `TextMask` spec (an edit's `mask`, or EditOptions.mask_text) is segmented by
`mask_for_edit`: checked, its memory phase checked (memory.check_segmenter_fits), the
model loaded (phase "load_text_segmenter"), run (phase "text_segment") and freed before
anything else loads. The checks of phrases, thresholds and instance choices are
mlx_edit.options' (one check per kind of value).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_edit.imaging.images import InputError, load_image
from mlx_edit.options import MASK_THRESHOLD as SCORE_THRESHOLD  # transformers' default
from mlx_edit.options import check_instances as parse_instances
from mlx_edit.options import check_phrase, check_threshold
from mlx_edit.models.sam3_heads import Sam3Heads, Sam3Outputs
from mlx_edit.models.sam3_text import Sam3TextEncoder
from mlx_edit.models.sam3_vision import Sam3VisionModel
from mlx_edit.editing.segment import _check_box, upscale_logits

MASK_THRESHOLD = 0.5  # on mask probabilities
SAM3_MEAN = SAM3_STD = (0.5, 0.5, 0.5)


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


def binary_masks(probs: np.ndarray, size: tuple[int, int] | None,
                 mask_threshold: float) -> np.ndarray:
    """(K, h, w) mask probabilities -> (K, H, W) bool at `size` (None: unchanged), one
    mask at a time so the float peak is one mask at the image's size."""
    if size is None:
        return probs > mask_threshold
    out = np.zeros((len(probs), *size), bool)
    for i, p in enumerate(probs):
        out[i] = upscale_logits(p, *size) > mask_threshold
    return out


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
        masks = binary_masks(probs[i][keep], size, mask_threshold)
        results.append(Instances(scores[i][keep], b, masks, float(scores[i].max())))
    return results


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


def exemplar_arrays(boxes, labels, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel boxes (x0, y0, x1, y1) of an image of `image_size` (height, width) and labels
    (1 positive, 0 negative; default all 1) -> ((1, N, 4) cxcywh in [0, 1], (1, N) int32).
    InputError: an empty or outside box, a label other than 0/1, mismatched counts."""
    labels = [1] * len(boxes) if labels is None else list(labels)
    if len(labels) != len(boxes):
        raise InputError(f"{len(boxes)} exemplar boxes but {len(labels)} labels")
    for box in boxes:
        _check_box(box, image_size)
    if any(lb not in (0, 1) for lb in labels):
        raise InputError(f"exemplar box labels are 1 (positive) or 0 (negative), got {labels}")
    h, w = image_size
    xyxy = np.array(boxes, np.float32) / np.array([w, h, w, h], np.float32)
    cxcywh = np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
    return cxcywh[None], np.array([labels], np.int32)


class TextSegmenter:
    """SAM 3 image model: vision backbone, text encoder and tokenizer, detector heads."""

    def __init__(self, vision: Sam3VisionModel, text_encoder: Sam3TextEncoder,
                 heads: Sam3Heads, tokenizer, mean=SAM3_MEAN, std=SAM3_STD):
        self.vision, self.text_encoder, self.heads = vision, text_encoder, heads
        self.tokenizer = tokenizer
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.features = None  # the FPN levels of the image set last
        self.image_size: tuple[int, int] | None = None  # its (height, width)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: mx.Dtype | None = None) -> TextSegmenter:
        """Load a transformers Sam3Model folder (weights, tokenizer files and
        preprocessor_config.json) in `dtype`, float32 unless given: bfloat16 weights moved
        masks (minimum IoU 0.970 against float32: benchmarks/RESULTS.md, "SAM 3 precision"),
        so the bfloat16 default of the FLUX models does not apply. Raises WeightLoadError."""
        import json

        from mlx_edit.editing.text import Sam3Tokenizer
        from mlx_edit.weights.sam3 import load_sam3_heads, load_sam3_text, load_sam3_vision

        folder, dtype = Path(folder), dtype or mx.float32
        pre = folder / "preprocessor_config.json"
        cfg = json.loads(pre.read_text(encoding="utf-8")) if pre.is_file() else {}
        return cls(load_sam3_vision(folder, dtype), load_sam3_text(folder, dtype),
                   load_sam3_heads(folder, dtype), Sam3Tokenizer.from_folder(folder),
                   cfg.get("image_mean", SAM3_MEAN), cfg.get("image_std", SAM3_STD))

    @property
    def input_size(self) -> int:
        """Side of the square model input in pixels (1008 for facebook/sam3)."""
        return self.vision.config.backbone_config.image_size

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB image -> (1, S, S, 3) float32 normalised pixels (Sam3ImageProcessor)."""
        s = self.input_size
        x = np.asarray(image.resize((s, s), Image.BILINEAR), np.float32) / 255.0
        return ((x - self.mean) / self.std).astype(np.float32)[None]

    def set_image(self, image) -> None:
        """Run the vision backbone once for `image` (path, PIL image or array)."""
        image = load_image(image)
        out = self.vision(mx.array(self.preprocess(image)))
        self.features = (out.fpn_hidden_states[:-1], out.fpn_position_encoding[:-1])
        mx.eval(self.features)
        self.image_size = (image.height, image.width)

    def run(self, phrase: str, boxes=None, box_labels=None) -> Sam3Outputs:
        """Raw detector outputs for `phrase` (and exemplar boxes) on the image set last."""
        if self.features is None:
            raise InputError("no image: call set_image(image) before detect()")
        ids, mask = self.tokenizer.with_mask([check_phrase(phrase)])
        _, text = self.text_encoder(mx.array(ids), mx.array(mask))
        b = lb = None
        if boxes is not None and len(boxes):
            b, lb = (mx.array(a) for a in exemplar_arrays(boxes, box_labels, self.image_size))
        return self.heads(*self.features, text, mx.array(mask.astype(bool)), b, lb)

    def detect(self, phrase: str, boxes=None, box_labels=None,
               threshold: float = SCORE_THRESHOLD, order: str = "score") -> Instances:
        """The instances of `phrase` on the image set last, masks at the image's size."""
        threshold = check_threshold(threshold)
        out = self.run(phrase, boxes, box_labels)
        return post_process_instances(out, threshold, sizes=[self.image_size], order=order)[0]

    def masks(self, image, phrase: str, instances="all", threshold: float = SCORE_THRESHOLD,
              boxes=None, box_labels=None) -> tuple[np.ndarray, np.ndarray]:
        """(masks (M, H, W) bool, scores (M,)) of `phrase` in `image` (see
        `select_instances`). Prompts are checked before any model work; InputError when
        no instance scores above `threshold`, naming the phrase and the best score."""
        phrase, threshold = check_phrase(phrase), check_threshold(threshold)
        parse_instances(instances)
        image = load_image(image)
        if boxes is not None and len(boxes):
            exemplar_arrays(boxes, box_labels, (image.height, image.width))
        self.set_image(image)
        found = self.detect(phrase, boxes, box_labels, threshold)
        return select_instances(found, phrase, instances, threshold)


DEFAULT_TEXT_SEGMENTER = "facebook/sam3"
SUBFOLDER = "text-segmenter"  # of a FLUX model folder, as `segmenter/` for SAM 2.1


def find_text_segmenter(model: str | Path | None = None, root: str | Path | None = None
                        ) -> str | Path:
    """The SAM 3 checkpoint to load: `model` (a FLUX model folder holding `text-segmenter/`
    means that sub-folder), else `root/text-segmenter/` when present (a pipeline's model
    folder), else DEFAULT_TEXT_SEGMENTER. Nothing is loaded or downloaded."""
    for folder in (model, None if model is not None else root):
        if folder is not None and (Path(folder).expanduser() / SUBFOLDER).is_dir():
            return Path(folder).expanduser() / SUBFOLDER
    return model if model is not None else DEFAULT_TEXT_SEGMENTER


@dataclass(frozen=True)
class TextMask:
    """A mask prompt in words for an edit (SAM 3): the instances of `phrase` scoring above
    `threshold`, all merged, the best, or one by index (`instances`); `model`: the SAM 3
    checkpoint (None: the model folder's text-segmenter/, else facebook/sam3)."""

    phrase: str
    threshold: float = SCORE_THRESHOLD
    instances: str | int = "all"
    model: str | None = None

    def checked(self) -> TextMask:
        """The spec with its values checked and normalised; InputError naming the bad one."""
        return TextMask(check_phrase(self.phrase), check_threshold(self.threshold),
                        parse_instances(self.instances), self.model)

    def mask(self, segmenter: TextSegmenter, image) -> np.ndarray:
        """(H, W) float32 in {0, 1}: the chosen instances of `image` found by `segmenter`,
        merged. InputError as `TextSegmenter.masks` (no instance of the phrase...)."""
        masks, _ = segmenter.masks(image, self.phrase, self.instances, self.threshold)
        return masks.any(axis=0).astype(np.float32)


def text_mask(options) -> TextMask | None:
    """The TextMask of EditOptions `options` (mask_text, mask_threshold, mask_instances,
    text_segment_model), or None without mask_text."""
    if options.mask_text is None:
        return None
    return TextMask(options.mask_text, options.mask_threshold, options.mask_instances,
                    options.text_segment_model)


def text_segmenter_config(folder: str | Path) -> dict:
    """config.json of a SAM 3 folder ({} for a Meta-named file: the released config)."""
    import json

    path = Path(folder) / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def mask_for_edit(image: Image.Image, spec: TextMask, root: str | Path | None,
                  memory_estimate, low_memory: bool = False, stats: dict | None = None
                  ) -> np.ndarray:
    """An edit's mask (H, W) float32 in {0, 1} from a TextMask: the spec checked, the
    checkpoint found (`find_text_segmenter(spec.model, root)`, resolved: a download for a
    repo id), the text-segment phase's memory (`memory_estimate(width, height,
    text_segmenter=config)`, memory.check_segmenter_fits), then load (phase
    "load_text_segmenter") and run (phase "text_segment"), timed into `stats`; SAM 3 is
    freed before returning. Raises InputError (spec, memory, no instance: naming the
    phrase and the best score), WeightLoadError."""
    from mlx_edit.editing.memory import check_segmenter_fits
    from mlx_edit.progress import Phase
    from mlx_edit.weights.sam3 import resolve_sam3

    spec = spec.checked()
    folder = resolve_sam3(find_text_segmenter(spec.model, root))
    est = memory_estimate(image.width, image.height,
                          text_segmenter=text_segmenter_config(folder))
    check_segmenter_fits(est, low_memory, phase="text_segment")
    with Phase(stats, "load_text_segmenter"):
        seg = TextSegmenter.from_pretrained(folder)
    try:
        with Phase(stats, "text_segment"):
            return spec.mask(seg, image)
    finally:
        del seg
        mx.clear_cache()
