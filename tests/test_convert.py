"""`mlx-edit convert` (mlx_edit/weights/convert.py, save.py, cli_convert.py) on the `small`
fixture: round trip, recorded bits, strict loading of damaged folders, temporary folder,
--overwrite, sizes, BFL sources, and the pipeline on a converted 4-bit folder."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mlx_edit.cli.convert import convert_command
from mlx_edit.sampling.latents import image_ids, text_ids
from mlx_edit.weights.quantize import quantize_t5, quantize_transformer
from mlx_edit.weights import convert as cv
from mlx_edit.weights import save
from mlx_edit.weights.core import WeightLoadError
from mlx_edit.weights.flux import load_transformer
from mlx_edit.weights.save import folder_bytes
from mlx_edit.weights.text import load_clip_text, load_t5
from mlx_edit.weights.vae import load_vae


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("converted")


@pytest.fixture(scope="module")
def q4(small_mlx, out):
    return _convert(small_mlx, out / "q4", quantize=4)


@pytest.fixture(scope="module")
def f32(small_mlx, out):
    return _convert(small_mlx, out / "f32")


def _convert(source, dest, **kw):
    cv.convert_checkpoint(source, dest, dtype="float32", **kw)
    return dest


def _params(model):
    return dict(tree_flatten(model.parameters()))


def _same(a, b):
    pa, pb = _params(a), _params(b)
    return pa.keys() == pb.keys() and all(
        pa[k].dtype == pb[k].dtype and mx.array_equal(pa[k], pb[k]).item() for k in pa)


def _forward(model):
    rng = np.random.default_rng(0)
    cfg = model.config
    img = mx.array(rng.standard_normal((1, 12, cfg.in_channels)), mx.float32)
    txt = mx.array(rng.standard_normal((1, 5, cfg.joint_attention_dim)), mx.float32)
    pooled = mx.array(rng.standard_normal((1, cfg.pooled_projection_dim)), mx.float32)
    return model(img, image_ids(3, 4), txt, text_ids(5), mx.array([0.6]), pooled,
                 mx.array([30.0]))


def _kinds(model):
    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    return {p: m for p, m in leaves if hasattr(m, "bits") or isinstance(m, nn.Linear)}


def test_round_trip_matches_quantize_at_load(small_mlx, q4):
    at_load = load_transformer(small_mlx / "transformer", mx.float32)
    quantize_transformer(at_load, 4)
    converted = load_transformer(q4 / "transformer", mx.float32)
    assert _same(at_load, converted)
    assert mx.array_equal(_forward(at_load), _forward(converted)).item()

    t5 = load_t5(small_mlx / "text_encoder_2", mx.float32)
    quantize_t5(t5, 4)
    t5_converted = load_t5(q4 / "text_encoder_2", mx.float32)
    ids = mx.array([[5, 9, 2, 1]])
    assert _same(t5, t5_converted) and mx.array_equal(t5(ids), t5_converted(ids)).item()
    # full-precision components are copied exactly (VAE convs transposed once, CLIP fused)
    assert _same(load_vae(small_mlx / "vae", mx.float32), load_vae(q4 / "vae", mx.float32))
    assert _same(load_clip_text(small_mlx / "text_encoder", mx.float32),
                 load_clip_text(q4 / "text_encoder", mx.float32))


def test_layout_sizes_and_manifest(q4, f32, small_mlx, out):
    for sub in ("tokenizer", "tokenizer_2", "scheduler", "transformer", "vae", "text_encoder",
                "text_encoder_2"):
        assert (q4 / sub).is_dir()
    manifest = json.loads((q4 / "mlx_edit.json").read_text())
    assert manifest["mlx_edit_version"] == mlx_edit.__version__
    assert manifest["source"] == str(small_mlx) and manifest["dtype"] == "float32"
    assert {k: v["bits"] for k, v in manifest["components"].items()} == {
        "transformer": 4, "vae": None, "text_encoder": None, "text_encoder_2": 4}
    assert json.loads((q4 / "model_index.json").read_text())["_class_name"] == "FluxFillPipeline"
    cfg = json.loads((q4 / "transformer" / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and "img_in" in cfg["quantization"]["skipped"]
    assert cfg["num_layers"] == 2  # the source config is kept
    assert "quantization" not in json.loads((q4 / "vae" / "config.json").read_text())
    q8 = _convert(small_mlx, out / "q8", quantize=8)
    full = folder_bytes(f32 / "transformer")
    assert folder_bytes(q4 / "transformer") < 0.40 * full
    assert folder_bytes(q8 / "transformer") < 0.40 * full
    assert _same(load_transformer(f32 / "transformer", mx.float32),
                 load_transformer(small_mlx / "transformer", mx.float32))


def test_component_bits_recorded_and_honoured(small_mlx, out):
    dest = _convert(small_mlx, out / "mixed", quantize=4, group_size=32,
                    component_bits_override={"transformer": 8, "text_encoder": 8,
                                             "text_encoder_2": None})
    rec = {c: json.loads((dest / c / "config.json").read_text()).get("quantization")
           for c in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    assert rec["transformer"]["bits"] == 8 and rec["transformer"]["group_size"] == 32
    assert rec["text_encoder"]["bits"] == 8 and rec["vae"] is None
    assert rec["text_encoder_2"] is None
    layers = _kinds(load_transformer(dest / "transformer", mx.float32))
    assert {(m.bits, m.group_size) for m in layers.values() if hasattr(m, "bits")} == {(8, 32)}
    assert type(layers["img_in"]) is nn.Linear
    clip = _kinds(load_clip_text(dest / "text_encoder", mx.float32))
    assert clip["encoder.layers.0.mlp.fc1"].bits == 8
    t5 = _kinds(load_t5(dest / "text_encoder_2", mx.float32))
    assert all(type(m) is nn.Linear for m in t5.values())


def _damaged(q4, tmp_path):
    dest = tmp_path / "damaged"
    shutil.copytree(q4, dest)
    return dest / "transformer"


def test_damaged_folder_dropped_tensor(q4, tmp_path):
    folder = _damaged(q4, tmp_path)
    tensors = mx.load(str(folder / "model.safetensors"))
    del tensors["single_blocks.1.linear1.biases"]
    mx.save_safetensors(str(folder / "model.safetensors"), tensors)
    with pytest.raises(WeightLoadError, match="1 missing: single_blocks.1.linear1.biases"):
        load_transformer(folder, mx.float32)


def test_damaged_folder_wrong_bits(q4, tmp_path):
    folder = _damaged(q4, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization"]["bits"] = 8
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightLoadError, match="records 8-bit .* stored at 4 bits"):
        load_transformer(folder, mx.float32)
    cfg["quantization"]["bits"] = 4
    cfg["quantization"]["skipped"].remove("img_in")  # recorded quantized, stored full
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightLoadError, match="img_in is not quantized in the checkpoint"):
        load_transformer(folder, mx.float32)


def test_damaged_folder_truncated_shard(q4, tmp_path):
    folder = _damaged(q4, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightLoadError, match="not a readable safetensors file"):
        load_transformer(folder, mx.float32)
    # converting from it fails the same way and leaves no DEST or temporary folder
    with pytest.raises(WeightLoadError, match="not a readable safetensors file"):
        cv.convert_checkpoint(folder.parent, tmp_path / "again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]


def test_interrupted_conversion_leaves_nothing(small_mlx, tmp_path, monkeypatch):
    dest = tmp_path / "dest"
    calls = {"n": 0}
    real_add = save.ShardWriter.add

    def add(self, key, value):
        calls["n"] += 1
        if calls["n"] == 40:  # in the middle of the transformer
            raise KeyboardInterrupt
        real_add(self, key, value)

    monkeypatch.setattr(save.ShardWriter, "add", add)
    with pytest.raises(KeyboardInterrupt):
        cv.convert_checkpoint(small_mlx, dest, quantize=4)
    assert list(tmp_path.iterdir()) == []
    # an existing DEST replaced with --overwrite survives an interruption untouched
    dest.mkdir()
    (dest / "keep.txt").write_text("old")
    (dest / save.MANIFEST_NAME).write_text('{"format": "mlx-edit"}')  # an earlier conversion
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        cv.convert_checkpoint(small_mlx, dest, quantize=4, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["dest"]
    assert sorted(p.name for p in dest.iterdir()) == ["keep.txt", save.MANIFEST_NAME]


def test_stale_temp_folder_of_dead_process_is_removed(tmp_path):
    dest = tmp_path / "dest"
    stale = tmp_path / ".dest.converting-999999999"
    stale.mkdir()
    assert save.remove_stale_temps(dest) == [stale] and not stale.exists()


def test_cli_overwrite_and_usage_errors(small_mlx, f32, tmp_path):
    runner = CliRunner()
    res = runner.invoke(convert_command, [str(small_mlx), str(f32), "-q", "4"])
    assert res.exit_code == 2 and "exists and is not empty (pass --overwrite" in res.output
    res = runner.invoke(convert_command, [str(small_mlx), str(tmp_path / "x"),
                                          "--component-bits", "unet=4"])
    assert res.exit_code == 2 and "unknown component 'unet'" in res.output
    src = tmp_path / "src"
    shutil.copytree(f32, src)
    res = runner.invoke(convert_command, [str(src), str(tmp_path), "--overwrite"])
    assert res.exit_code == 2 and "not an mlx-edit conversion" in res.output
    (tmp_path / save.MANIFEST_NAME).write_text('{"format": "mlx-edit"}')  # even if marked:
    res = runner.invoke(convert_command, [str(src), str(tmp_path), "--overwrite"])
    assert res.exit_code == 2 and "holds the source" in res.output  # never over the source
    (tmp_path / save.MANIFEST_NAME).unlink()
    assert (src / "mlx_edit.json").is_file()
    dest = tmp_path / "over"
    dest.mkdir()
    (dest / "old.txt").write_text("x")
    args = [str(f32), str(dest), "-q", "8", "--overwrite", "--dtype", "float32"]
    res = runner.invoke(convert_command, args)  # not ours: never replaced
    assert res.exit_code == 2 and "not an mlx-edit conversion" in res.output
    assert [p.name for p in dest.iterdir()] == ["old.txt"]
    (dest / save.MANIFEST_NAME).write_text('{"format": "mlx-edit"}')
    res = runner.invoke(convert_command, args)
    assert res.exit_code == 0, res.output
    assert not (dest / "old.txt").exists() and (dest / "mlx_edit.json").is_file()
    assert json.loads((dest / "transformer" / "config.json").read_text())["quantization"][
        "bits"] == 8


def test_bfl_single_file_source_and_sharding(small_mlx, q4, tmp_path):
    dest = tmp_path / "from-bfl"
    res = CliRunner().invoke(convert_command, [
        str(small_mlx / "flux1-fill-dev.safetensors"), str(dest), "-q", "4",
        "--dtype", "float32", "--vae", str(small_mlx / "ae.safetensors"),
        "--text-encoders", str(small_mlx), "--max-shard-size", "300KB",
        "--transformer-config", str(small_mlx / "transformer" / "config.json")])
    # the BFL ae.safetensors has FLUX's widths, not the fixture's: a strict, one-line error
    assert res.exit_code == 2 and "vae" in res.output and "mis-shaped" in res.output
    assert not dest.exists()
    res = CliRunner().invoke(convert_command, [
        str(small_mlx / "flux1-fill-dev.safetensors"), str(dest), "-q", "4",
        "--dtype", "float32", "--text-encoders", str(small_mlx), "--max-shard-size", "300KB",
        "--transformer-config", str(small_mlx / "transformer" / "config.json")])
    assert res.exit_code == 0, res.output
    index = json.loads((dest / "transformer" / save.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((dest / "transformer" / s).stat().st_size < 600_000
                                   for s in shards)
    assert _same(load_transformer(dest / "transformer", mx.float32),
                 load_transformer(q4 / "transformer", mx.float32))


def test_requantize_mlx_folder(small_mlx, q4, f32, out):
    again = _convert(f32, out / "f32-to-q4", quantize=4)  # full-precision mlx folder
    assert _same(load_transformer(again / "transformer", mx.float32),
                 load_transformer(q4 / "transformer", mx.float32))
    q8 = _convert(q4, out / "q4-to-q8", quantize=8, component_bits_override={"vae": 8})
    layers = _kinds(load_transformer(q8 / "transformer", mx.float32))
    assert {m.bits for m in layers.values() if hasattr(m, "bits")} == {8}
    assert _kinds(load_vae(q8 / "vae", mx.float32))["decoder.mid_block.attentions.0.to_q"].bits == 8


def test_streaming_peak_memory(small_mlx, tmp_path):
    src = cv.open_component("transformer", small_mlx / "transformer")
    mx.eval(mx.zeros(1))
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    info = cv.convert_component(src, tmp_path / "transformer", mx.float32, None,
                                max_shard_bytes=1_000_000)
    peak = mx.get_peak_memory() - before
    assert len(info["files"]) > 5
    # about one shard + the largest tensor (single_blocks.*.linear1) and its sources
    assert peak < info["largest_shard"] + 3 * info["largest_tensor"], (peak, info)
    assert peak < 0.5 * info["bytes"]


def test_pipeline_on_converted_q4_folder(q4):
    from mlx_edit.editing.pipeline import FluxFill

    pipe = FluxFill.from_pretrained(q4, mx.float32)
    assert isinstance(pipe.transformer.double_blocks[0].img_attn.qkv, nn.QuantizedLinear)
    rng = np.random.default_rng(0)
    image = (rng.random((64, 96, 3)) * 255).astype(np.uint8)
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 32:64] = 255
    result = pipe.inpaint(image, mask, "a red apple", steps=2, seed=1)[0]
    assert result.size == (96, 64)
    pixels = np.asarray(result)
    assert np.array_equal(pixels[:, :8], image[:, :8])  # pasted back far from the mask
    assert np.isfinite(pixels).all() and pixels[24:40, 40:56].std() > 0


def test_from_pretrained_quantize_at_load_equals_converted(small_mlx, q4):
    from mlx_edit.editing.pipeline import FluxFill

    pipe = FluxFill.from_pretrained(small_mlx, mx.float32, quantize=4)
    assert _same(pipe.transformer, load_transformer(q4 / "transformer", mx.float32))
