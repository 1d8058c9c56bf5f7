"""Instance choice for masks from words (mlx_edit/text_segment.py), without torch: all
merged, best, by index, and the one-line errors for no instance / a bad index."""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest

from mlx_edit.imaging.images import InputError
from mlx_edit.models.sam3_heads import Sam3Outputs
from mlx_edit.text_segment import (
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
