"""Masks from words wired into the commands (SAM 3, mlx_edit/editing/text_segment.py):
`mlx-edit mask --text`, `inpaint --mask-text` (CLI and API), a batch line with mask_text,
the server's /v1/masks and /v1/edits with text, the memory phase and the one-line
errors. The model folder is the torch-free tiny Fill fixture with `--extras
text-segmenter` (scripts/make_mlx_checkpoint.py: a random tiny SAM 3 in transformers'
layout); with random weights the scores lie around 0.2-0.35, so threshold 0 keeps every
query and 0.9999 none."""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage import data

from mlx_edit.cli.main import main
from mlx_edit.imaging.images import InputError
from mlx_edit.imaging.masks import blend_mask

FAST = ["--steps", "1", "--seed", "1", "--max-sequence-length", "16", "--feather", "4"]


@pytest.fixture(scope="module")
def text_model(tiny_mlx, tiny_sam3_mlx, tmp_path_factory):
    """The tiny FLUX Fill folder (`tiny_mlx`'s files, linked) with a `text-segmenter/`
    (`tiny_sam3_mlx`): what make_mlx_checkpoint's "text-segmenter" extra builds."""
    root = tmp_path_factory.mktemp("text") / "model"
    root.mkdir()
    for entry in [*tiny_mlx.iterdir(), tiny_sam3_mlx]:
        name = "text-segmenter" if entry == tiny_sam3_mlx else entry.name
        (root / name).symlink_to(entry)
    return root


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "astronaut.png"
    Image.fromarray(data.astronaut()).resize((120, 96)).save(path)
    return path


@pytest.fixture(scope="module")
def segmenter(text_model):
    from mlx_edit.editing.text_segment import TextSegmenter

    return TextSegmenter.from_pretrained(text_model / "text-segmenter")


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(r, message: str) -> None:
    assert r.exit_code == 2 and message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


def test_mask_text_writes_the_segmenters_masks(text_model, photo, segmenter, tmp_path):
    """`mask --text`: merged, best and --each files equal TextSegmenter's masks."""
    merged, _ = segmenter.masks(photo, "a person", "all", 0.0)
    r = cli("mask", "--image", photo, "--text", "a person", "--threshold", "0",
            "--model", text_model, "-o", tmp_path / "m.png")
    assert r.exit_code == 0, r.output
    got = np.asarray(Image.open(tmp_path / "m.png")) == 255
    assert got.shape == (96, 120) and got.any() and np.array_equal(got, merged[0])
    found = segmenter.detect("a person", threshold=0.0)
    r = cli("mask", "--image", photo, "--text", "a person", "--threshold", "0", "--each",
            "--model", text_model / "text-segmenter", "-o", tmp_path / "e.png")
    assert r.exit_code == 0, r.output
    for i, want in enumerate(found.masks):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"e-{i}.png")) == 255, want)
    assert not (tmp_path / f"e-{len(found.masks)}.png").exists()
    r = cli("mask", "--image", photo, "--text", "a person", "--threshold", "0", "--each",
            "--instances", "1", "--model", text_model, "-o", tmp_path / "one.png")
    assert r.exit_code == 0 and "score" in r.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one-0.png")) == 255, found.masks[1])
    assert not (tmp_path / "one-1.png").exists()
    # --box with --text: exemplar boxes of what the phrase means (text + box prompt)
    box = (10, 8, 70, 60)
    want, _ = segmenter.masks(photo, "a person", "all", 0.0, boxes=[box])
    r = cli("mask", "--image", photo, "--text", "a person", "--box", ",".join(map(str, box)),
            "--threshold", "0", "--model", text_model, "-o", tmp_path / "x.png")
    assert r.exit_code == 0, r.output
    got = np.asarray(Image.open(tmp_path / "x.png")) == 255
    assert np.array_equal(got, want[0]) and not np.array_equal(got, merged[0])


@pytest.mark.parametrize("args, message", [
    (["--text", "a person", "--threshold", "0.9999"], 'no instance of "a person" found: '
                                                      "the best score is 0."),
    (["--text", "a person", "--threshold", "1.5"], "--threshold must be a number in [0, 1)"),
    (["--text", "a person", "--instances", "most"], "--instances must be 'all', 'best'"),
    (["--text", "  "], "--text must be a non-empty phrase"),
    (["--text", "a person", "--point", "3,4"], "--text finds the objects itself"),
    (["--text", "a person", "--box", "200,0,300,20"], "lies outside the 120x96 image"),
    (["--each", "--point", "3,4"], "give --text too"),
    (["--text", "a person", "--threshold", "0", "--instances", "99"], "instance 99 of"),
])
def test_mask_text_bad_input_is_one_line_and_writes_nothing(text_model, photo, tmp_path,
                                                            args, message):
    r = cli("mask", "--image", photo, *args, "--model", text_model, "-o", tmp_path / "m.png")
    one_line_error(r, message)
    assert list(tmp_path.iterdir()) == []


def test_mask_text_never_writes_over_the_photo(text_model, photo, tmp_path):
    r = cli("mask", "--image", photo, "--text", "a person", "--threshold", "0",
            "--model", text_model, "-o", photo, "--overwrite")
    one_line_error(r, "input image")
    numbered = tmp_path / "p-0.png"
    Image.open(photo).save(numbered)
    r = cli("mask", "--image", numbered, "--text", "a person", "--threshold", "0", "--each",
            "--model", text_model, "-o", tmp_path / "p.png")
    assert r.exit_code == 2 and not (tmp_path / "p-1.png").exists()


def test_inpaint_mask_text_keeps_unmasked_pixels(text_model, photo, segmenter, tmp_path):
    """`inpaint --mask-text`: SAM 3 segments first (its own phases in the sidecar's
    stats), then only pixels inside the feathered mask change; the API takes mask_text
    as an option and gives the same image."""
    from mlx_edit.editing.fill import FluxFill

    out = tmp_path / "out.png"
    r = cli("inpaint", "--model", text_model, "--image", photo, "--mask-text", "a person",
            "--mask-threshold", "0", "--mask-instances", "best", "--prompt", "a cup",
            *FAST, "--metadata", "-o", out)
    assert r.exit_code == 0, r.output
    assert "load-sam3" in r.output and " sam3 " in r.output  # the phase line
    want, _ = segmenter.masks(photo, "a person", "best", 0.0)
    keep = blend_mask(want[0].astype(np.float32), 0, 4) == 0
    got, src = np.asarray(Image.open(out).convert("RGB")), np.asarray(Image.open(photo))
    assert keep.any() and (~keep).any() and np.array_equal(got[keep], src[keep])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert (meta["mask_text"], meta["mask_instances"]) == ("a person", "best")
    assert {"load_text_segmenter_s", "text_segment_s"} <= set(meta["stats"])
    pipe = FluxFill.from_pretrained(text_model)
    api = pipe.inpaint(photo, None, "a cup", steps=1, seed=1, max_sequence_length=16,
                       feather=4, mask_text="a person", mask_threshold=0.0,
                       mask_instances="best")[0]
    assert np.array_equal(np.asarray(api), got)
    with pytest.raises(InputError, match="not both"):
        pipe.inpaint(photo, np.ones((96, 120)), "a cup", steps=1, mask_text="a person")


@pytest.mark.parametrize("args, message", [
    (["--mask-text", "a person", "--mask-threshold", "0.9999"],
     'no instance of "a person" found: the best score is 0.'),
    (["--mask-text", "a person", "--mask-threshold", "-0.1"], "--mask-threshold must be"),
    (["--mask-text", "a person", "--mask-instances", "all-of-them"], "--mask-instances must"),
    (["--mask-text", "a person", "--mask-point", "3,4"], "give one of --mask"),
    (["--mask-instances", "best", "--mask-point", "3,4"], "--mask-instances chooses"),
])
def test_inpaint_mask_text_bad_input(text_model, photo, tmp_path, args, message):
    r = cli("inpaint", "--model", text_model, "--image", photo, "--prompt", "x", *args,
            *FAST, "-o", tmp_path / "bad.png")
    one_line_error(r, message)
    assert not (tmp_path / "bad.png").exists()


def test_text_segment_memory_phase_is_checked_before_sam3_loads(text_model, photo,
                                                               monkeypatch):
    """estimate(text_segmenter=config) adds the phase "text_segment" (SAM 3 weights next
    to the resident models; alone with low_memory); an edit whose phase does not fit is
    one line naming SAM 3, before it loads."""
    import mlx_edit.editing.memory as memory
    import mlx_edit.editing.text_segment as text_segment
    from mlx_edit.editing.fill import FluxFill

    base = memory.estimate(512, 512)
    est = memory.estimate(512, 512, text_segmenter={})  # facebook/sam3's config
    assert 3.0 < est["weights_text_segmenter"] < 3.6  # ~840M float32 parameters
    resident = base["weights_transformer"] + base["weights_vae"]
    assert est["phase_text_segment"] == pytest.approx(
        resident + est["weights_text_segmenter"] + est["activations_text_segment"]
        + memory.RUNTIME_GB)
    assert {k: v for k, v in est.items() if "text_segment" not in k} == dict(base)
    alone = est["weights_text_segmenter"] + est["activations_text_segment"] + memory.RUNTIME_GB
    memory.check_segmenter_fits(est, True, alone + 0.01, phase="text_segment")
    with pytest.raises(InputError, match="SAM 3 weights .*--low-memory frees"):
        memory.check_segmenter_fits(est, False, alone + 0.01, phase="text_segment")
    pipe = FluxFill.from_pretrained(text_model)
    monkeypatch.setattr(memory, "available_memory", lambda: int(0.01 * memory.GB))
    monkeypatch.setattr(text_segment.TextSegmenter, "from_pretrained",
                        lambda *a, **k: pytest.fail("SAM 3 loaded"))
    with pytest.raises(InputError, match=r"segmenting the mask needs about [\d.]+ GB "
                                         r"\(SAM 3 weights") as e:
        pipe.inpaint(photo, None, "x", steps=1, mask_text="a person")
    assert "\n" not in str(e.value)


def test_options_check_the_text_mask_fields():
    from mlx_edit.options import EditOptions

    o = EditOptions(mask_text="  the sky ", mask_threshold=0, mask_instances="2")
    assert (o.mask_text, o.mask_threshold, o.mask_instances) == ("the sky", 0.0, 2)
    for kw, message in [(dict(mask_text=""), "mask_text must be a non-empty phrase"),
                        (dict(mask_text="a", mask_threshold=1.0), "mask_threshold must"),
                        (dict(mask_text="a", mask_instances=-1), "mask_instances must"),
                        (dict(mask_threshold=0.5), "give mask_text too")]:
        with pytest.raises(InputError, match=message):
            EditOptions(**kw)
    with pytest.raises(InputError, match="outpaint does not take mask_text"):
        EditOptions.from_dict({"mask_text": "a"}, "outpaint")


def test_batch_line_with_mask_text(text_model, photo, segmenter, tmp_path):
    from mlx_edit import batch
    from mlx_edit.editing.text_segment import TextMask

    row = {"id": "t", "image": str(photo), "prompt": "a cup", "mask_text": "a person",
           "mask_threshold": 0, "steps": 1, "seed": 1, "max_sequence_length": 16,
           "feather": 4}
    line = batch.parse_line(json.dumps(row), 1, tmp_path, {})
    assert line.mask == TextMask("a person", 0.0, "all", None)
    with pytest.raises(InputError, match="give one of mask"):
        batch.parse_line(json.dumps({**row, "mask_points": [[3, 4]]}), 2, tmp_path, {})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(row) + "\n")
    r = cli("batch", manifest, "--model", text_model, "--output-dir", tmp_path / "out",
            "--no-prompt-cache")
    assert r.exit_code == 0, r.output
    want, _ = segmenter.masks(photo, "a person", "all", 0.0)
    keep = blend_mask(want[0].astype(np.float32), 0, 4) == 0
    got = np.asarray(Image.open(tmp_path / "out" / "t.png").convert("RGB"))
    assert keep.any() and np.array_equal(got[keep], np.asarray(Image.open(photo))[keep])


def test_server_masks_and_edits_from_text(text_model, photo, segmenter):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mlx_edit.editing.fill import FluxFill
    from mlx_edit.serve import ServeConfig, create_app
    from test_serve import wait

    app = create_app(ServeConfig(local_hosts=("testserver",)),
                     pipelines={"fill": FluxFill.from_pretrained(text_model)})
    with TestClient(app) as client:
        assert client.get("/v1/health").json()["text_segmenter"] is True
        files = {"image": ("p.png", photo.read_bytes(), "image/png")}
        r = client.post("/v1/masks", files=files, data={"text": "a person", "threshold": "0",
                                                        "instances": "best"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        want, _ = segmenter.masks(photo, "a person", "best", 0.0)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))) == 255, want[0])
        for fields, message in (({"text": "a person", "threshold": "0.9999"}, "no instance"),
                                ({"text": "x", "threshold": "2"}, "threshold must"),
                                ({"threshold": "0.5"}, "text must be a non-empty phrase"),
                                ({"text": "x", "points": "[[3, 4]]"}, "not both")):
            bad = client.post("/v1/masks", files=files, data=fields)
            assert bad.status_code == 400 and message in bad.json()["error"], bad.text
        options = {"mask_text": "a person", "mask_threshold": 0, "steps": 1, "seed": 1,
                   "max_sequence_length": 16, "feather": 4}
        job = client.post("/v1/edits", files=files,
                          data={"prompt": "a cup", "options": json.dumps(options)}).json()
        state = wait(client, job["id"])
        assert state["state"] == "done" and "text_segment_s" in state["timings"], state
        out = client.get(f"/v1/jobs/{job['id']}/images/0").content
        got = np.asarray(Image.open(io.BytesIO(out)).convert("RGB"))
        merged, _ = segmenter.masks(photo, "a person", "all", 0.0)
        keep = blend_mask(merged[0].astype(np.float32), 0, 4) == 0
        assert np.array_equal(got[keep], np.asarray(Image.open(photo))[keep])


def test_server_without_a_text_segmenter_refuses_text(tiny_mlx, photo):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mlx_edit.editing.fill import FluxFill
    from mlx_edit.serve import ServeConfig, create_app

    app = create_app(ServeConfig(local_hosts=("testserver",)),
                     pipelines={"fill": FluxFill.from_pretrained(tiny_mlx)})
    with TestClient(app) as client:
        files = {"image": ("p.png", photo.read_bytes(), "image/png")}
        r = client.post("/v1/masks", files=files, data={"text": "a person"})
        assert r.status_code == 400 and "no text segmenter" in r.json()["error"]
        r = client.post("/v1/edits", files=files, data={
            "prompt": "x", "options": json.dumps({"mask_text": "a person"})})
        assert r.status_code == 400 and "no text segmenter" in r.json()["error"]
