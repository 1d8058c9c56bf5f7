"""SAM 2.1 image model against transformers' Sam2Model on the same weights and a real photo.

Checkpoints come from scripts/sam_fixtures.py (`tiny`; `hiera-tiny` = the
facebook/sam2.1-hiera-tiny config, marked slow), loaded by transformers with
`Sam2Model.from_pretrained` and by us with `load_sam`. Both sides get the same normalised
pixels of skimage's astronaut. Metric: max|ours - ref| / max|ref| in float32; image
embeddings and high-res features <= 1e-4, IoU and object scores <= 1e-4, mask logits
<= 1e-3 (the issue's tolerances). The predictor, CLI, automatic masks and edits from
clicks are tested without torch in tests/test_sam_predictor.py, on the folder mlx-edit
builds itself (`tiny_sam_mlx`); `test_mlx_built_fixture_loads_in_transformers` ties that
folder to the reference.
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from skimage import data

from mlx_edit.weights.sam import load_sam
from conftest import import_script

pytestmark = pytest.mark.parity
torch = pytest.importorskip("torch")  # the reference and the fixtures need the parity extra
fx = import_script("sam_fixtures")

EMB_TOL, MASK_TOL, SCORE_TOL = 1e-4, 1e-3, 1e-4


def rel_err(ours, ref) -> float:
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


class Pair:
    """The reference and our model for one fixture, plus the photo's pixels at input size."""

    def __init__(self, folder):
        from transformers import Sam2Model

        self.folder = folder
        self.ref = Sam2Model.from_pretrained(folder).eval()
        self.ours = load_sam(folder)
        size = self.ours.cfg.image_size
        photo = Image.fromarray(data.astronaut()).resize((size, size), Image.BILINEAR)
        x = (np.asarray(photo, np.float32) / 255 - fx.IMAGENET_MEAN) / fx.IMAGENET_STD
        self.pixels = x.astype(np.float32)[None]  # (1, S, S, 3)
        with torch.no_grad():
            self.ref_emb = self.ref.get_image_embeddings(torch.from_numpy(self.pixels).permute(0, 3, 1, 2))
        self.emb = self.ours.image_embeddings(mx.array(self.pixels))
        mx.eval(self.emb.embedding, self.emb.high_res)

    @property
    def size(self) -> int:
        return self.ours.cfg.image_size


def _build(tmp_path_factory, preset) -> Pair:
    folder = fx.build_sam(tmp_path_factory.mktemp(f"sam-{preset}") / preset, preset)
    return Pair(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Pair:
    return _build(tmp_path_factory, "tiny")


@pytest.fixture(scope="module")
def hiera_tiny(tmp_path_factory) -> Pair:
    return _build(tmp_path_factory, "hiera-tiny")


def prompts(size: int) -> dict[str, dict]:
    """Prompt sets in input pixels (astronaut: face near (0.45, 0.25) of the frame)."""
    s = size / 512  # coordinates written for the 512 px photo
    pts = np.array([[[[230, 130], [300, 400]]]], np.float32) * s
    box = np.array([[[150, 40, 340, 260]]], np.float32) * s
    two_pts = np.array([[[[230, 130]], [[400, 300]]]], np.float32) * s
    two_box = np.array([[[150, 40, 340, 260], [330, 180, 500, 510]]], np.float32) * s
    return {
        "points": dict(input_points=pts, input_labels=np.array([[[1, 0]]])),
        "box": dict(input_boxes=box),
        "point+box": dict(input_points=pts[:, :, :1], input_labels=np.array([[[1]]]),
                          input_boxes=box),
        "two objects": dict(input_points=two_pts, input_labels=np.array([[[1], [1]]]),
                            input_boxes=two_box),
        "none": {},
    }


def run_both(pair: Pair, prompt: dict, multimask: bool = True, masks=None):
    """(ref outputs, ours (masks, iou, object logits)) for one prompt set."""
    kw = {k: torch.from_numpy(np.asarray(v)) for k, v in prompt.items()}
    with torch.no_grad():
        ref = pair.ref(image_embeddings=pair.ref_emb, multimask_output=multimask,
                       input_masks=None if masks is None else torch.from_numpy(masks), **kw)
    ours = pair.ours.decode(
        pair.emb,
        points=None if "input_points" not in prompt else mx.array(prompt["input_points"]),
        labels=None if "input_labels" not in prompt else mx.array(prompt["input_labels"]),
        boxes=None if "input_boxes" not in prompt else mx.array(prompt["input_boxes"]),
        masks=None if masks is None else mx.array(masks.transpose(0, 2, 3, 1)),
        multimask=multimask,
    )
    mx.eval(ours)
    return ref, ours


def check_embeddings(pair: Pair) -> None:
    ours = [*pair.emb.high_res, pair.emb.embedding]
    for name, a, ref in zip(("feat_s0", "feat_s1", "embedding"), ours, pair.ref_emb):
        assert a.shape == tuple(ref.permute(0, 2, 3, 1).shape), name
        err = rel_err(np.array(a), ref.permute(0, 2, 3, 1))
        assert err <= EMB_TOL, f"{name}: {err:.2e}"


def check_decode(pair: Pair, name: str, multimask: bool = True, masks=None) -> None:
    ref, (m, iou, obj) = run_both(pair, prompts(pair.size)[name], multimask, masks)
    assert m.shape == tuple(ref.pred_masks.shape)
    errs = (rel_err(m, ref.pred_masks), rel_err(iou, ref.iou_scores),
            rel_err(obj, ref.object_score_logits))
    assert errs[0] <= MASK_TOL and max(errs[1:]) <= SCORE_TOL, f"{name}: {errs}"


def test_tiny_image_embeddings(tiny):
    check_embeddings(tiny)


@pytest.mark.parametrize("name", ["points", "box", "point+box", "two objects", "none"])
def test_tiny_decode(tiny, name):
    check_decode(tiny, name)


def test_tiny_single_mask_and_mask_prompt(tiny):
    check_decode(tiny, "points", multimask=False)
    ref, _ = run_both(tiny, prompts(tiny.size)["box"], multimask=False)
    low_res = ref.pred_masks[:, 0].numpy()  # (1, 1, 4h, 4w): the previous prediction
    check_decode(tiny, "point+box", masks=low_res)


def test_mlx_built_fixture_loads_in_transformers(tiny_sam_mlx):
    """The torch-free SAM fixture is a real transformers checkpoint: Sam2Model loads it
    with no missing/unexpected/mis-shaped key and agrees with our model on it."""
    from transformers import Sam2Model

    ref, info = Sam2Model.from_pretrained(tiny_sam_mlx, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    pair = Pair(tiny_sam_mlx)
    check_embeddings(pair)
    check_decode(pair, "point+box")


def test_tiny_b_layout_parity(tmp_path_factory):
    """base-plus/large specifics (stage-0 heads and depth, 14 x 14 background embedding)."""
    pair = _build(tmp_path_factory, "tiny-b")
    check_embeddings(pair)
    for name in ("point+box", "two objects"):
        check_decode(pair, name)


@pytest.mark.slow
def test_hiera_tiny_parity(hiera_tiny):
    check_embeddings(hiera_tiny)
    for name in ("points", "box", "point+box", "two objects"):
        check_decode(hiera_tiny, name)


# ---------------------------------------------------------------- the predictor


def reference_predict(pair: Pair, photo: np.ndarray, points=None, labels=None, boxes=None,
                      multimask=True):
    """transformers' Sam2Processor + Sam2Model + post_process_masks on `photo` (H, W, 3)
    uint8 -> (masks (O, M, H, W) bool, upscaled logits, iou (O, M)). The module of
    Sam2ImageProcessor imports torchvision (absent here), so its steps are replayed with
    the torch ops it calls: torchvision's uint8 antialiased bilinear resize is
    F.interpolate(antialias=True) on uint8, then rescale 1/255 and ImageNet
    normalisation; post_process_masks is F.interpolate(bilinear, align_corners=False)
    to the original size, then > 0. The coordinate scaling is Sam2Processor's own."""
    import torch.nn.functional as F
    from transformers.models.sam2.processing_sam2 import Sam2Processor

    s, (h, w) = pair.size, photo.shape[:2]
    img = F.interpolate(torch.from_numpy(photo).permute(2, 0, 1)[None], size=(s, s),
                        mode="bilinear", antialias=True, align_corners=False)
    mean, std = torch.tensor(fx.IMAGENET_MEAN), torch.tensor(fx.IMAGENET_STD)
    pixels = ((img.float() / 255).permute(0, 2, 3, 1) - mean) / std
    kw = {}
    if points is not None:
        pts = torch.tensor(points, dtype=torch.float32)
        kw["input_points"] = Sam2Processor._normalize_coordinates(None, s, pts, (h, w))[None]
        kw["input_labels"] = torch.tensor(labels)[None]
    if boxes is not None:
        b = torch.tensor(boxes, dtype=torch.float32)
        kw["input_boxes"] = Sam2Processor._normalize_coordinates(None, s, b, (h, w),
                                                                 is_bounding_box=True)[None]
    with torch.no_grad():
        out = pair.ref(pixel_values=pixels.permute(0, 3, 1, 2), multimask_output=multimask, **kw)
    logits = F.interpolate(out.pred_masks[0], (h, w), mode="bilinear", align_corners=False)
    return (logits > 0).numpy(), logits.numpy(), out.iou_scores[0].numpy()


@pytest.fixture(scope="module")
def segmenter(tiny):
    from mlx_edit.editing.segment import Segmenter

    seg = Segmenter.from_pretrained(tiny.folder)
    seg.set_image(data.coffee())  # 400 x 600, not square: per-axis coordinate scaling
    return seg


@pytest.mark.parametrize("prompt", [
    dict(points=[[(300, 200)]], labels=[[1]]),
    dict(points=[[(300, 200), (100, 350)]], labels=[[1, 0]], boxes=[(150, 60, 480, 330)]),
    dict(points=[[(300, 200)], [(520, 100)]], labels=[[1], [1]],
         boxes=[(150, 60, 480, 330), (450, 20, 599, 200)]),
], ids=["point", "points+box", "two objects"])
def test_predictor_matches_processor_pipeline(tiny, segmenter, prompt):
    from mlx_edit.editing.segment import upscale_logits

    photo = data.coffee()
    ref_masks, ref_logits, ref_iou = reference_predict(tiny, photo, **prompt)
    masks, scores = segmenter.predict(**prompt)
    assert masks.shape == (ref_masks.shape[0] * ref_masks.shape[1], *photo.shape[:2])
    assert masks.dtype == bool
    logits, iou, _ = segmenter.predict_logits(**prompt)
    assert rel_err(upscale_logits(logits, *photo.shape[:2]), ref_logits) <= MASK_TOL
    assert rel_err(scores, ref_iou.reshape(-1)) <= SCORE_TOL
    # pixels may only disagree where the logit is ~0 (|diff| ~1e-6 of the range)
    assert (masks != ref_masks.reshape(masks.shape)).mean() <= 1e-4
    assert 0 < ref_masks.mean() < 1  # the comparison covered both classes


@pytest.mark.slow
def test_bench_segment_runs(repo_root):
    import re
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "bench_segment.py"),
                           "--presets", "tiny", "--reps", "1"], cwd=repo_root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"segment ratios mlx/transformers: tiny embed [\d.]+ decode [\d.]+",
                        last), last


def test_video_checkpoint_loads_its_image_model(tmp_path):
    """The released facebook/sam2.1-* folders also hold the video-memory modules
    (Sam2VideoModel); they are dropped by name and the rest loads strictly and equal."""
    from transformers import Sam2VideoConfig, Sam2VideoModel

    torch.manual_seed(0)
    video = Sam2VideoModel(Sam2VideoConfig(**fx.sam_config("tiny"))).eval()
    video.save_pretrained(tmp_path)
    ours = load_sam(tmp_path)
    ref = video.state_dict()
    w = ours.mask_decoder.transformer.layers[1].cross_attn_image_to_token.k_proj.weight
    assert np.array_equal(np.array(w), ref["mask_decoder.transformer.layers.1."
                                           "cross_attn_image_to_token.k_proj.weight"].numpy())


@pytest.mark.parametrize("preset", ["hiera-small", "hiera-base-plus", "hiera-large"])
def test_released_sizes_map_strictly(preset):
    """Every key and shape of transformers' Sam2Model for the released configs (built on
    the meta device: shapes only) is produced by our model and key map, and back."""
    from dataclasses import asdict

    from mlx.utils import tree_flatten
    from transformers import Sam2Config, Sam2Model

    from mlx_edit.models.sam import SamConfig, SamModel
    from mlx_edit.weights.core import checked_plan
    from mlx_edit.weights.sam import SAM_RULES

    config = Sam2Config(**fx.sam_config(preset))
    with torch.device("meta"):
        ref = Sam2Model(config)
    tensors = {k: v for k, v in ref.state_dict().items()}
    ours = SamModel(SamConfig.from_dict(config.to_dict()))
    plan = checked_plan(dict(tree_flatten(ours.parameters())), tensors, SAM_RULES, preset)
    assert len(plan) == len(tensors)
    backbone = config.vision_config.backbone_config
    ours_backbone = asdict(ours.cfg.vision.backbone)
    for name in ("global_attention_blocks", "window_size_per_stage", "blocks_per_stage",
                 "window_positional_embedding_background_size"):
        assert list(ours_backbone[name]) == list(getattr(backbone, name)), name


