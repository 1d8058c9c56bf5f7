"""Instance choice for masks from words (mlx_edit/editing/text_segment.py), without torch: all
merged, best, by index, and the one-line errors for no instance / a bad index."""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest

from mlx_edit.imaging.images import InputError
from mlx_edit.models.sam3_heads import Sam3Outputs
from mlx_edit.editing.text_segment import (
    Instances,
    parse_instances,
    post_process_instances,
    select_instances,
)


def found(n: int = 3) -> Instances:
    masks = np.zeros((n, 4, 5), bool)
    for i in range(n):
        masks[i, i, i] = True
    return Instances(np.linspace(0.9, 0.5, n, dtype=np.float32), np.zeros((n, 4), np.float32),
                     masks, 0.9 if n else 0.12)


def test_all_merges_best_and_index_pick_one():
    f = found()
    masks, scores = select_instances(f, "a cat")
    assert masks.shape == (1, 4, 5) and masks.sum() == 3 and scores[0] == pytest.approx(0.9)
    masks, scores = select_instances(f, "a cat", "best")
    assert masks[0, 0, 0] and masks.sum() == 1
    masks, scores = select_instances(f, "a cat", 2)
    assert masks[0, 2, 2] and scores[0] == pytest.approx(0.5)


def test_no_instance_names_the_phrase_and_best_score():
    with pytest.raises(InputError, match=r'no instance of "the red car" found: the best score '
                                         r"is 0\.120, below the threshold 0\.3"):
        select_instances(found(0), "the red car", threshold=0.3)
    with pytest.raises(InputError, match=r"instance 3 .* 3 found"):
        select_instances(found(), "a cat", "3")


@pytest.mark.parametrize("bad", ["some", -1, "1.5", None, 2.0])
def test_bad_instances_spec(bad):
    with pytest.raises(InputError, match="instances must be"):
        parse_instances(bad)


def test_post_processing_keeps_sorts_and_scales():
    logits = mx.array([[0.0, 3.0, -3.0, 1.0]])
    masks = mx.zeros((1, 4, 2, 2)) - 5.0
    masks[:, 1, 0, 0] = 5.0
    boxes = mx.array([[[0.0, 0.0, 0.5, 0.5]] * 4])
    out = Sam3Outputs(masks, boxes, logits, mx.array([[10.0]]), mx.zeros((1, 2, 2, 1)))
    (f,) = post_process_instances(out, threshold=0.6, sizes=[(4, 8)])
    assert np.allclose(f.scores, [1 / (1 + np.exp(-3.0)), 1 / (1 + np.exp(-1.0))], atol=1e-4)
    assert f.masks.shape == (2, 4, 8) and f.masks[0, 0, :3].all() and not f.masks[0, 2:].any() and not f.masks[1].any()
    assert np.allclose(f.boxes[0], [0, 0, 4, 2])
    assert f.best_score == pytest.approx(float(f.scores[0]))


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    """A TextSegmenter of MLX-initialised tiny models (no torch) and the CLIP tokenizer."""
    from conftest import import_script

    from mlx_edit.models.sam3_heads import Sam3Heads, Sam3HeadsConfig
    from mlx_edit.models.sam3_text import Sam3TextConfig, Sam3TextEncoder
    from mlx_edit.models.sam3_vision import Sam3VisionConfig, Sam3VisionModel
    from mlx_edit.editing.text import Sam3Tokenizer
    from mlx_edit.editing.text_segment import TextSegmenter

    tiny = import_script("sam3_fixtures").sam3_config("tiny")
    folder = tmp_path_factory.mktemp("sam3-tok")
    import_script("tokenizer_files").write_clip_tokenizer(folder)
    mx.random.seed(0)
    return TextSegmenter(Sam3VisionModel(Sam3VisionConfig.from_dict(tiny)),
                         Sam3TextEncoder(Sam3TextConfig.from_dict(tiny)),
                         Sam3Heads(Sam3HeadsConfig.from_dict(tiny)),
                         Sam3Tokenizer.from_folder(folder))


PHOTO = np.full((30, 40, 3), 128, np.uint8)


def test_segmenter_shapes_and_no_instance_error(segmenter):
    segmenter.set_image(PHOTO)
    found = segmenter.detect("a cat", threshold=0.0)
    assert found.masks.shape == (8, 30, 40) and found.scores.shape == (8,)
    assert np.all(np.diff(found.scores) <= 0)  # highest first
    with_box = segmenter.detect("a cat", boxes=[(5, 5, 20, 25)], threshold=0.0)
    assert not np.allclose(with_box.scores, found.scores)
    masks, scores = segmenter.masks(PHOTO, "a cat", instances=2, threshold=0.0)
    assert masks.shape == (1, 30, 40) and scores[0] == pytest.approx(found.scores[2], rel=1e-5)
    with pytest.raises(InputError, match=r'no instance of "a cat" found: the best score is '
                                         r"0\.\d{3}, below the threshold 0\.9999"):
        segmenter.masks(PHOTO, "a cat", threshold=0.9999)


@pytest.mark.parametrize("kw, message", [
    (dict(phrase="  "), "non-empty phrase"),
    (dict(threshold=1.5), r"threshold must be a number in \[0, 1\)"),
    (dict(instances="most"), "instances must be"),
    (dict(boxes=[(10, 10, 5, 20)]), "is empty"),
    (dict(boxes=[(1, 1, 5, 5)], box_labels=[2]), "labels are 1 .positive. or 0"),
])
def test_bad_input_is_refused_before_the_model_runs(segmenter, kw, message, monkeypatch):
    def no_work(*_a, **_k):
        raise AssertionError("the model ran")

    monkeypatch.setattr(segmenter, "vision", no_work)
    args = dict(phrase="a cat") | kw
    with pytest.raises(InputError, match=message):
        segmenter.masks(PHOTO, args.pop("phrase"), **args)
