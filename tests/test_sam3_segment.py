"""SAM 3 end to end against transformers: our TextSegmenter (vision backbone, text
encoder, heads, post-processing) on a random `tiny` Sam3Model folder
(scripts/sam3_fixtures.py) versus transformers' Sam3Model on the same pixels and tokens,
post-processed by Sam3ImageProcessor.post_process_instance_segmentation. Prompts: a
phrase alone, and a phrase with exemplar boxes (positive and negative). Metric: the same
instances kept, scores and boxes <= 1e-4 relative, masks IoU >= 0.99 at the photo's size.
torchvision is absent: see tests/test_sam3_heads.py (roi_align, the post-processor import).
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from skimage import data

from conftest import import_script

pytestmark = pytest.mark.parity
torch = pytest.importorskip("torch")
fx = import_script("sam3_fixtures")
from test_sam3_heads import (  # noqa: E402
    IOU_MIN,
    TOL,
    iou,
    reference_post_process,
    reference_roi_align,
    rel_err,
)


@pytest.fixture(scope="module")
def sam3(tmp_path_factory):
    from mlx_edit.editing.text_segment import TextSegmenter

    model = fx.make_model("tiny", seed=3)
    folder = fx.write_folder(model, tmp_path_factory.mktemp("sam3-e2e") / "tiny")
    seg = TextSegmenter.from_pretrained(folder, mx.float32)
    photo = Image.fromarray(data.chelsea())  # 451 x 300, not square
    seg.set_image(photo)
    return model, seg, photo, folder


@pytest.mark.parametrize("prompt", ["text", "text+boxes"])
def test_text_segmenter_matches_transformers(sam3, prompt, monkeypatch):
    from types import SimpleNamespace

    from transformers.models.sam3 import modeling_sam3

    from mlx_edit.editing.text_segment import exemplar_arrays

    model, seg, photo, _ = sam3
    post = reference_post_process(monkeypatch)
    monkeypatch.setattr(modeling_sam3, "torchvision",
                        SimpleNamespace(ops=SimpleNamespace(roi_align=reference_roi_align)),
                        raising=False)
    phrase = "a cat on a sofa"
    boxes = labels = None
    kw = {}
    if prompt == "text+boxes":
        boxes, labels = [(120, 40, 330, 280), (0, 0, 90, 120)], [1, 0]
        cxcywh, lab = exemplar_arrays(boxes, labels, (photo.height, photo.width))
        kw = dict(input_boxes=torch.from_numpy(cxcywh),
                  input_boxes_labels=torch.from_numpy(lab).long())
    ids, mask = seg.tokenizer.with_mask([phrase])
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(seg.preprocess(photo)).permute(0, 3, 1, 2),
                    input_ids=torch.from_numpy(ids).long(),
                    attention_mask=torch.from_numpy(mask).long(), **kw)
    scores = (ref.pred_logits.sigmoid() * ref.presence_logits.sigmoid())[0].numpy()
    threshold = float(np.median(scores))
    size = (photo.height, photo.width)
    expected = post(None, ref, threshold=threshold, target_sizes=[size])[0]
    found = seg.detect(phrase, boxes, labels, threshold=threshold, order="query")
    assert 0 < len(found.scores) == len(expected["scores"])
    assert rel_err(found.scores, expected["scores"]) <= TOL
    assert rel_err(found.boxes, expected["boxes"]) <= TOL
    assert found.masks.shape[1:] == size
    assert 0.01 < expected["masks"].float().mean() < 0.99
    ious = [iou(a, b) for a, b in zip(found.masks, expected["masks"].numpy())]
    assert min(ious) >= IOU_MIN, ious


# measured on this fixture, per query at the 24 x 24 mask resolution (a pixel is ~2% of
# a mask), vs float32: min IoU float16 0.985, bfloat16 0.96; scores within 2e-4
HALF_IOU = {"float16": 0.98, "bfloat16": 0.95}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_masks_stay_close_to_float32(sam3, dtype):
    from mlx_edit.editing.text_segment import TextSegmenter

    _, seg, photo, folder = sam3
    half = TextSegmenter.from_pretrained(folder, getattr(mx, dtype))
    half.set_image(photo)
    box = [(120, 40, 330, 280)]
    ref, out = seg.run("a cat", boxes=box), half.run("a cat", boxes=box)
    ious = [iou(a, b) for a, b in zip(np.array(ref.masks[0]),
                                      np.array(out.masks[0].astype(mx.float32)))]
    assert min(ious) >= HALF_IOU[dtype], ious
    diff = np.abs(np.array(out.scores.astype(mx.float32)) - np.array(ref.scores)).max()
    assert diff <= 2e-3


def test_torch_free_fixture_loads_strictly_in_transformers(tmp_path):
    """make_mlx_checkpoint's `text-segmenter/` (our models' MLX init written through our
    transformers key rules run backwards) is a complete Sam3Model folder: transformers
    loads every tensor, none missing or unexpected, with our loader's values."""
    from mlx.utils import tree_flatten
    from transformers import Sam3Model

    from mlx_edit.weights.sam3 import load_sam3_heads

    folder = import_script("make_mlx_checkpoint").write_text_segmenter(tmp_path / "t", "tiny")
    ref, info = Sam3Model.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    ours = dict(tree_flatten(load_sam3_heads(folder, mx.float32).parameters()))
    name = "detr_decoder.query_embed.weight"
    assert np.array_equal(np.array(ours[name]), ref.state_dict()[name].numpy())


def test_converted_folder_segments_identically(sam3, tmp_path):
    """`convert_sam3` of the transformers folder (float32): our names, loaded by the
    `mlx` format, give the very same scores, boxes and masks."""
    from mlx_edit.editing.text_segment import TextSegmenter
    from mlx_edit.weights.sam3_convert import convert_sam3

    _, seg, photo, folder = sam3
    dest = tmp_path / "converted"
    convert_sam3(folder, dest, mx.float32)
    ours = TextSegmenter.from_pretrained(dest, mx.float32)
    ours.set_image(photo)
    box = [(120, 40, 330, 280)]
    a, b = seg.detect("a cat", box, threshold=0.0), ours.detect("a cat", box, threshold=0.0)
    for x, y in ((a.scores, b.scores), (a.boxes, b.boxes), (a.masks, b.masks)):
        np.testing.assert_array_equal(x, y)


def test_sam3_benchmarks_run(repo_root):
    """bench_segment.py --text and bench_sam3_quantize.py end to end at the tiny preset
    (their figures at the released config are in benchmarks/RESULTS.md)."""
    import re
    import subprocess
    import sys

    def last_line(script, *args):
        proc = subprocess.run([sys.executable, str(repo_root / "benchmarks" / script), *args],
                              cwd=repo_root, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.strip().splitlines()[-1]

    line = last_line("bench_segment.py", "--text", "--preset", "tiny", "--rounds", "1",
                     "--reps", "1", "--warmup", "0")
    assert re.fullmatch(r"sam3 ratios mlx/transformers \(tiny, 84 px\): time [\d.]+, "
                        r"peak RSS [\d.]+", line), line
    line = last_line("bench_sam3_quantize.py", "--preset", "tiny", "--variants", "bf16,q8",
                     "--photos", "chelsea:a cat", "--group-size", "32")
    assert re.fullmatch(r"sam3 precision vs float32 \(tiny, group 32\): bf16 mean [\d.]+ min "
                        r"[\d.]+ score [\d.e+-]+; q8 mean [\d.]+ min [\d.]+ score [\d.e+-]+",
                        line), line
