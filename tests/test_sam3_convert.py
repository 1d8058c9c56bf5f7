"""SAM 3 to an mlx-edit folder (weights/sam3_convert.py), torch-free: a random tiny SAM 3
transformers folder (make_mlx_checkpoint.write_text_segmenter) converted by `mlx-edit
convert`; precisions measured harmful and every quantization are refused in one line
before any work. Segmenting with a converted folder vs transformers' own folder:
tests/test_sam3_segment.py.
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import import_script
from mlx_edit.weights.core import WeightLoadError
from mlx_edit.weights.sam3 import load_sam3_heads, load_sam3_text, load_sam3_vision

LOADERS = {"vision.": load_sam3_vision, "text.": load_sam3_text, "heads.": load_sam3_heads}


@pytest.fixture(scope="module")
def tiny_sam3(tmp_path_factory):
    """A transformers Sam3Model folder (tokenizer, preprocessor config), float32, random
    MLX weights at the tiny config, written torch-free (make_mlx_checkpoint)."""
    folder = tmp_path_factory.mktemp("sam3-convert") / "tiny"
    return import_script("make_mlx_checkpoint").write_text_segmenter(folder, "tiny")


def _convert_cli(*args):
    from click.testing import CliRunner

    from mlx_edit.cli.main import main

    return CliRunner().invoke(main, ["convert", *[str(a) for a in args]])


def test_convert_sam3_to_float16(tiny_sam3, tmp_path):
    """Our names under the sub-model prefixes, float16 tensors, the marked config and the
    small files; every parameter loads back strictly as the source's rounded to float16."""
    dest = tmp_path / "sam3-f16"
    res = _convert_cli(tiny_sam3, dest, "--dtype", "float16")
    assert res.exit_code == 0, res.output
    assert "wrote SAM 3" in res.output and "float16" in res.output
    config = json.loads((dest / "config.json").read_text())
    assert "_mlx_edit_version" in config and config["model_type"] == "sam3"
    assert (dest / "preprocessor_config.json").read_text() == \
        (tiny_sam3 / "preprocessor_config.json").read_text()
    w = mx.load(str(dest / "model.safetensors"))
    assert {str(v.dtype) for v in w.values()} == {"mlx.core.float16"}
    assert {k.split(".")[0] + "." for k in w} == set(LOADERS)
    for prefix, load in LOADERS.items():
        ref = dict(tree_flatten(load(tiny_sam3).parameters()))
        got = dict(tree_flatten(load(dest).parameters()))
        assert got.keys() == ref.keys() and len(ref) == sum(k.startswith(prefix) for k in w)
        for key, value in ref.items():
            assert got[key].dtype == mx.float32  # a half folder computes in float32 on the CPU
            np.testing.assert_array_equal(np.array(got[key]),
                                          np.array(value.astype(mx.float16).astype(mx.float32)))
    back = tmp_path / "sam3-f32"  # an mlx-edit folder converts again (mlx format)
    assert _convert_cli(dest, back, "--dtype", "float32").exit_code == 0
    w32 = mx.load(str(back / "model.safetensors"))
    assert all(np.array_equal(np.array(w32[k]), np.array(v.astype(mx.float32)))
               for k, v in w.items())
    from mlx_edit.editing.text_segment import TextSegmenter

    seg = TextSegmenter.from_pretrained(back)  # tokenizer and preprocessor copied
    seg.set_image(np.zeros((40, 60, 3), np.uint8))
    assert seg.run("a cat").scores.shape == (1, 8)
    again = _convert_cli(tiny_sam3, dest, "--dtype", "float16")
    assert again.exit_code == 2 and "--overwrite" in again.output
    w.pop("heads.detr_decoder.query_embed.weight")
    mx.save_safetensors(str(dest / "model.safetensors"), w)
    with pytest.raises(WeightLoadError, match="1 missing: detr_decoder.query_embed.weight"):
        load_sam3_heads(dest)


def test_convert_sam3_refusals_before_any_work(tiny_sam3, tmp_path, monkeypatch):
    """Quantization and the precisions measured harmful (PRECISION_IOU) exit 2 in one
    line quoting the measurement, nothing written; so do pipeline flags. A precision
    that measured harmless is converted with its note."""
    import mlx_edit.weights.sam3_convert as conv

    refused = [("--quantize", str(bits)) for bits in (8, 4)]
    refused += [("--dtype", d) for d in ("float16", "bfloat16")
                if conv.PRECISION_IOU.get(d, (0, 0, 0, 0.0))[3] < conv.MIN_IOU]
    for args in refused:
        out = tmp_path / "refused"
        res = _convert_cli(tiny_sam3, out, *args)
        assert res.exit_code == 2 and "SAM 3" in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1 and not out.exists()
    res = _convert_cli(tiny_sam3, tmp_path / "refused", "--vae", "x")
    assert res.exit_code == 2 and "is a SAM 3 checkpoint: --vae apply to pipeline" in res.output
    monkeypatch.setitem(conv.PRECISION_IOU, "bfloat16", ("test", None, 0.95, 0.5, 2e-3))
    with pytest.raises(conv.Sam3PrecisionRefused, match="0.950 mean, 0.500 min.*--dtype float32"):
        conv.convert_sam3(tmp_path / "absent", tmp_path / "x", mx.bfloat16)  # before the load
    monkeypatch.setitem(conv.PRECISION_IOU, "bfloat16", ("test", None, 0.999, 0.995, 1e-4))
    res = _convert_cli(tiny_sam3, tmp_path / "bf16", "--dtype", "bfloat16")
    assert res.exit_code == 0 and "0.999 mean, 0.995 min" in res.output, res.output
    monkeypatch.delitem(conv.PRECISION_IOU, "bfloat16")
    with pytest.raises(conv.Sam3PrecisionRefused, match="not measured"):
        conv.check_sam3_precision("bfloat16")
