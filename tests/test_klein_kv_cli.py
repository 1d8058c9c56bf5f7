# ruff: noqa: F811  (tests take the imported `photos` fixture as an argument)
"""FLUX.2 [klein] KV from the CLI on scikit-image photos, with the tiny klein KV folder
built torch-free (scripts/klein_fixtures.build_mlx(kv=True)): `mlx-edit edit` with two
references and `mlx-edit inpaint --reference` pick the KV variant from the folder's
model_index.json (Flux2KleinKVPipeline), record it, equal the API's result, and differ
from the same weights run as plain klein; options the variant refuses are one line with
exit status 2 before any model loads."""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from skimage import data

from mlx_edit.editing.klein import FluxKlein
from test_klein_cli import invoke, photos  # noqa: F401  (klein's CLI test's photos fixture)


@pytest.fixture(scope="module")
def klein_kv(tmp_path_factory, import_script):
    out = tmp_path_factory.mktemp("klein-kv-mlx") / "tiny"
    return import_script("klein_fixtures").build_mlx(out, "tiny", kv=True)


COMMON = ["--steps", 2, "--seed", 3, "--max-sequence-length", 48]


def test_edit_and_inpaint_cli_use_the_kv_variant(klein_kv, photos, tmp_path):
    r = invoke("edit", "--model", klein_kv, *COMMON, "-i", photos / "astronaut.png",
               "-i", photos / "coffee.png", "-p", "put the astronaut in the cup",
               "-o", tmp_path / "edit.png")
    assert r.exit_code == 0, r.output
    out = Image.open(tmp_path / "edit.png")
    assert out.size == (144, 96) and out.info["references"] == "2"
    assert out.info["reference_kv"] == "True"
    api = FluxKlein.from_pretrained(klein_kv).edit(
        [photos / "astronaut.png", photos / "coffee.png"], "put the astronaut in the cup",
        steps=2, seed=3, max_sequence_length=48)[0]
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(api))

    r = invoke("inpaint", "--model", klein_kv, *COMMON, "-i", photos / "astronaut.png",
               "--mask", photos / "mask.png", "--reference", photos / "coffee.png",
               "--feather", 0, "-p", "a cup of coffee", "-o", tmp_path / "inpaint.png")
    assert r.exit_code == 0, r.output
    res = Image.open(tmp_path / "inpaint.png")
    assert res.info["reference_kv"] == "True"
    src = np.asarray(Image.open(photos / "astronaut.png").convert("RGB"))
    outside = np.asarray(Image.open(photos / "mask.png")) == 0
    assert np.array_equal(np.asarray(res.convert("RGB"))[outside], src[outside])


def test_plain_klein_folder_of_the_same_weights_differs(klein_kv, photos, tmp_path):
    """The pipeline class alone selects the variant: the same files as a Flux2KleinPipeline
    folder run the references in the sequence, and give another image; without references
    (text-to-image: diffusers' KV pipeline runs its plain forward) the two are equal."""
    plain = tmp_path / "plain"
    shutil.copytree(klein_kv, plain)
    index = json.loads((plain / "model_index.json").read_text())
    (plain / "model_index.json").write_text(json.dumps(
        {**index, "_class_name": "Flux2KleinPipeline"}))
    outs = []
    for folder in (klein_kv, plain):
        r = invoke("edit", "--model", folder, *COMMON, "-i", photos / "astronaut.png",
                   "-p", "a red hat", "-o", tmp_path / f"{folder.name}.png")
        assert r.exit_code == 0, r.output
        outs.append(Image.open(tmp_path / f"{folder.name}.png"))
    assert outs[0].info["reference_kv"] == "True" and "reference_kv" not in outs[1].info
    assert not np.array_equal(np.asarray(outs[0]), np.asarray(outs[1]))
    generated = [FluxKlein.from_pretrained(folder).edit(
        None, "a lighthouse", width=64, height=48, steps=1, max_sequence_length=32)[0]
        for folder in (klein_kv, plain)]
    assert "reference_kv" not in generated[0].info
    assert np.array_equal(np.asarray(generated[0]), np.asarray(generated[1]))


def test_negative_prompt_is_refused_in_one_line(klein_kv, photos, tmp_path, monkeypatch):
    """diffusers' KV pipeline has no CFG, so no negative prompt (as distilled klein)."""
    loads = []
    monkeypatch.setattr(FluxKlein, "from_pretrained", lambda *a, **k: loads.append(a))
    r = invoke("edit", "--model", klein_kv, "-i", photos / "astronaut.png", "-p", "x",
               "--negative-prompt", "blurry", "-o", tmp_path / "x.png")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "--negative-prompt is not available with FLUX.2 [klein] KV" in r.output
    assert not loads and not (tmp_path / "x.png").exists()


def test_step_caches_attend_to_the_cached_references(klein_kv, photos, monkeypatch):
    """First Block Cache on the KV variant: its pieces attend to the references' K/V
    (threshold 0 equals the uncached edit exactly); a huge threshold skips every step
    after the first; compiled (the step, or the cache's pieces) within float32 rounding."""
    pipe = FluxKlein.from_pretrained(klein_kv)
    run = dict(steps=4, seed=5, max_sequence_length=48)
    image = photos / "coffee.png"
    plain = np.asarray(pipe.edit([image], "warmer", **run)[0], np.float32)
    out = pipe.edit([image], "warmer", **run, cache="fbc:0")[0]
    assert out.info["cache_steps"] == "CCCC" and out.info["reference_kv"] == "True"
    assert np.array_equal(np.asarray(out), plain)
    skipped = pipe.edit([image], "warmer", **run, cache="fbc:10")[0]
    assert skipped.info["cache_steps"] == "Csss"
    assert not np.array_equal(np.asarray(skipped), plain)
    monkeypatch.setenv("MLX_EDIT_COMPILE", "1")  # the step (its K/V an argument), the pieces
    for spec in (None, "fbc:0"):
        compiled = np.asarray(pipe.edit([image], "warmer", **run, cache=spec)[0], np.float32)
        assert np.abs(compiled - plain).max() <= 2  # uint8 levels: compiled kernels' rounding


def test_windows_and_stacked_lines_take_the_cached_references(klein_kv, photos):
    """Tiled inpainting (windows share the references' K/V, batch 1) keeps the photo
    outside the mask; two edit lines stacked on the batch axis (`mlx-edit batch`: their
    references' K/V computed together, per row) equal each line run alone."""
    from mlx_edit import batch_groups

    pipe = FluxKlein.from_pretrained(klein_kv)
    photo = Image.fromarray(data.astronaut()).resize((448, 320))
    mask = np.zeros((320, 448), np.float32)
    mask[20:300, 30:420] = 1
    job = pipe.inpaint_job(photo, mask, "a cup", reference=photos / "coffee.png", steps=1,
                           seed=2, feather=0, tile_mode="on", max_model_pixels=256 * 256,
                           max_sequence_length=32)
    assert job.windows.count > 1 and job.reference_kv
    res, src, inside = np.asarray(pipe.run(job)[0]), np.asarray(photo), mask == 1
    assert np.array_equal(res[~inside], src[~inside])

    run = dict(steps=2, max_sequence_length=32)
    cat = Image.fromarray(data.chelsea()).resize((150, 110))  # the astronaut's size
    jobs = [pipe.edit_job([image], "warmer", seed=i, **run)
            for i, image in enumerate((photos / "astronaut.png", cat))]
    assert batch_groups.signature(jobs[0]) == batch_groups.signature(jobs[1]) is not None
    stacked = batch_groups.stack(jobs)
    assert stacked.reference_kv
    for _ in pipe.steps(stacked):
        pass
    for row, j in enumerate(jobs):
        for _ in pipe.steps(j):
            pass
        np.testing.assert_allclose(np.array(stacked.latents[row]), np.array(j.latents[0]),
                                   rtol=0, atol=1e-5)
