"""CLIP ranking of candidates (mlx_edit.editing.ranking) against transformers `CLIPModel`.

A random-weight CLIPModel (scripts/ranker_fixtures.py, the `ranker/` of the test
checkpoints) scores real photos against a prompt on both sides from identical inputs
(our tokenizer's ids, our CLIPImageProcessor-equal pixels); the scores and the order
must agree.
"""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import numpy as np
import pytest
from PIL import Image
from skimage import data

from mlx_edit.conditioning.image_prompts import clip_preprocess
from mlx_edit.editing.ranking import clip_scores, edit_region, rank_images
from mlx_edit.weights.core import WeightLoadError
from mlx_edit.weights.ranker import load_clip_ranker, resolve_ranker

PROMPT = "a photo of a cat on a sofa"


@pytest.fixture(scope="module")
def photos():
    return [Image.fromarray(getattr(data, n)()) for n in
            ("astronaut", "coffee", "chelsea", "rocket")]


@pytest.fixture(scope="module")
def ranker_dir(tmp_path_factory, import_script):
    """A ranker folder, as make_tiny_checkpoint writes it (seed differs from the fixture's)."""
    mtc, rf, tok = (import_script(n) for n in
                    ("make_tiny_checkpoint", "ranker_fixtures", "tokenizer_files"))
    d = tmp_path_factory.mktemp("ranker")
    tok.write_clip_tokenizer(d / "tokenizer")
    text_cfg = mtc.configs("tiny", 1000)["text_encoder"]
    return rf.write_ranker(d / "ranker", text_cfg, "tiny", 7, d / "tokenizer")


@pytest.mark.parity
def test_scores_and_order_equal_transformers(ranker_dir, photos):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    ranker = load_clip_ranker(ranker_dir)
    ours = clip_scores(ranker, photos, PROMPT)
    ref_model = transformers.CLIPModel.from_pretrained(ranker_dir).eval()
    size = ranker.vision.config.image_size
    pixels = np.stack([clip_preprocess(p, size) for p in photos]).transpose(0, 3, 1, 2)
    ids = ranker.tokenizer(PROMPT, max_length=ranker.text.config.max_position_embeddings)
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids, dtype=torch.long),
                        pixel_values=torch.tensor(pixels)).logits_per_image[:, 0].numpy()
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, (ours, ref)
    assert np.array_equal(np.argsort(-ours), np.argsort(-ref))
    assert np.ptp(ref) > 1e-3  # distinct scores: the order means something


@pytest.mark.parity  # the ranker fixture is built by transformers
def test_rank_images_orders_and_keeps_best(ranker_dir, photos):
    ranker = load_clip_ranker(ranker_dir)
    same = [p.resize((128, 96)) for p in photos]
    blend = np.zeros((96, 128), np.float32)
    blend[30:60, 40:90] = 1.0
    scores = clip_scores(ranker, [p.crop(edit_region(blend, (128, 96))) for p in same], PROMPT)
    best = rank_images(ranker, [p.copy() for p in same], PROMPT, blend, keep_best=2,
                       model_name="tiny")
    assert len(best) == 2
    assert [b.info["rank"] for b in best] == ["1", "2"]
    got = [float(b.info["rank_score"]) for b in best]
    np.testing.assert_allclose(got, np.sort(scores)[::-1][:2], rtol=1e-5)
    assert edit_region(blend, (128, 96)) == (28, 18, 102, 72)  # margin round(12.5) = 12
    with pytest.raises(ValueError):
        rank_images(ranker, same, PROMPT, blend, keep_best=0)


@pytest.mark.parity  # the ranker fixture is built by transformers
def test_resolve_ranker(ranker_dir, tmp_path):
    assert resolve_ranker(None, ranker_dir.parent) == ranker_dir  # model folder's ranker/
    assert resolve_ranker(str(ranker_dir)) == ranker_dir
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(WeightLoadError, match="not a CLIPModel config"):
        load_clip_ranker(tmp_path)
