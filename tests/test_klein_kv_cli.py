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
from click.testing import CliRunner
from PIL import Image
from skimage import data

from mlx_edit.cli import main
from mlx_edit.editing.klein import FluxKlein


@pytest.fixture(scope="module")
def klein_kv(tmp_path_factory, import_script):
    out = tmp_path_factory.mktemp("klein-kv-mlx") / "tiny"
    return import_script("klein_fixtures").build_mlx(out, "tiny", kv=True)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.astronaut()).resize((150, 110)).save(d / "astronaut.png")
    Image.fromarray(data.coffee()).resize((120, 90)).save(d / "coffee.png")
    mask = np.zeros((110, 150), np.uint8)
    mask[30:80, 40:110] = 255
    Image.fromarray(mask).save(d / "mask.png")
    return d


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


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
    folder run the references in the sequence, and give another image."""
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


@pytest.mark.parametrize("args, says", [
    (["--negative-prompt", "blurry"], "--negative-prompt is not available"),
    (["--cache", "fbc:0.1"], "--cache is not available"),
])
def test_refused_options_are_one_line(klein_kv, photos, tmp_path, args, says, monkeypatch):
    loads = []
    monkeypatch.setattr(FluxKlein, "from_pretrained", lambda *a, **k: loads.append(a))
    r = invoke("edit", "--model", klein_kv, "-i", photos / "astronaut.png", "-p", "x", *args,
               "-o", tmp_path / "x.png")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert says in r.output and "KV" in r.output and not loads
    assert not (tmp_path / "x.png").exists()
