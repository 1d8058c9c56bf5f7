"""FLUX.2 [klein] from the CLI and the API on scikit-image photos, with the tiny klein
folder built torch-free (scripts/klein_fixtures.build_mlx): `mlx-edit edit` (two
references) and `mlx-edit inpaint` (a reference) choose FluxKlein from the folder's
model_index.json; pixels outside the mask are the photo's exactly; bad input is one line
with exit status 2 before any model loads; text-to-image, crop-to-mask, SAM clicks and
keep-size through the API; the memory estimate counts the klein parts.
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage import data

from mlx_edit.cli import main
from mlx_edit.imaging.images import InputError
from mlx_edit.editing.klein import FluxKlein
from mlx_edit.editing.segment import Points
from mlx_edit.weights.core import WeightLoadError


@pytest.fixture(scope="module")
def klein(tiny_klein_mlx):
    return tiny_klein_mlx


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.astronaut()).resize((150, 110)).save(d / "astronaut.png")
    Image.fromarray(data.coffee()).resize((120, 90)).save(d / "coffee.png")
    Image.fromarray(data.coffee()).resize((40, 40)).save(d / "small.png")
    mask = np.zeros((110, 150), np.uint8)
    mask[30:80, 40:110] = 255
    Image.fromarray(mask).save(d / "mask.png")
    return d


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_edit_and_inpaint_cli(klein, photos, tmp_path):
    common = ["--model", klein, "--steps", 2, "--seed", 3, "--max-sequence-length", 48]
    r = invoke("edit", *common, "-i", photos / "astronaut.png", "-i", photos / "coffee.png",
               "-p", "put the astronaut in the cup", "-o", tmp_path / "edit.png")
    assert r.exit_code == 0, r.output
    out = Image.open(tmp_path / "edit.png")
    assert out.size == (144, 96)  # the first image floored to 16 px (diffusers' size)
    assert out.info["references"] == "2" and out.info["steps"] == "2"

    r = invoke("inpaint", *common, "-i", photos / "astronaut.png", "--mask",
               photos / "mask.png", "--reference", photos / "coffee.png", "--feather", 0,
               "-p", "a cup of coffee", "-o", tmp_path / "inpaint.png")
    assert r.exit_code == 0, r.output
    res = np.asarray(Image.open(tmp_path / "inpaint.png").convert("RGB"))
    src = np.asarray(Image.open(photos / "astronaut.png").convert("RGB"))
    outside = np.asarray(Image.open(photos / "mask.png")) == 0
    assert res.shape == src.shape
    assert np.array_equal(res[outside], src[outside])
    assert not np.array_equal(res[~outside], src[~outside])


def test_edit_with_a_mask_from_words(klein, photos, tiny_sam3_mlx, tmp_path):
    """`edit --mask-text` on klein (SAM 3 first, --text-segment-model): with --keep-size
    the pixels away from the phrase's feathered mask are the photo's exactly."""
    from mlx_edit.editing.text_segment import TextSegmenter
    from mlx_edit.imaging.masks import blend_mask

    photo = photos / "astronaut.png"
    r = invoke("edit", "--model", klein, "-i", photo, "-p", "make it gold", "--steps", 1,
               "--max-sequence-length", 48, "--mask-text", "a person", "--mask-threshold", 0,
               "--mask-instances", "best", "--text-segment-model", tiny_sam3_mlx,
               "--keep-size", "--feather", 4, "-o", tmp_path / "gold.png")
    assert r.exit_code == 0, r.output
    out = Image.open(tmp_path / "gold.png")
    assert out.info["masked"] == "True" and out.info["mask_text"] == "a person"
    want, _ = TextSegmenter.from_pretrained(tiny_sam3_mlx).masks(photo, "a person", "best", 0.0)
    far = blend_mask(want[0].astype(np.float32), 12, 0) == 0  # the resize's reach too
    src = np.asarray(Image.open(photo).convert("RGB"))
    assert far.any() and np.array_equal(np.asarray(out.convert("RGB"))[far], src[far])


@pytest.mark.parametrize("args, says", [
    (["inpaint", "--reference", "small.png"], "at least 64 px"),
    (["edit", "-i", "small.png"], "at least 64 px"),
    (["inpaint", "--negative-prompt", "x"], "No such option"),
    (["edit", "--negative-prompt", "blurry"], "--negative-prompt is not available"),
    (["edit", "--true-cfg-scale", "2"], "--true-cfg-scale is not available"),
    (["edit", "--no-auto-resize"], "--auto-resize is not available"),
    (["outpaint", "--left", "32"], "outpaint needs a FLUX.1 model"),
])
def test_bad_input_is_one_line(klein, photos, tmp_path, args, says, monkeypatch):
    loads = []
    monkeypatch.setattr(FluxKlein, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a)))
    mode, *rest = args
    image = [] if "-i" in rest else ["-i", photos / "astronaut.png"]
    mask = ["--mask", photos / "mask.png"] if mode == "inpaint" else []
    rest = [photos / a if a == "small.png" else a for a in rest]
    r = invoke(mode, "--model", klein, *image, *mask, "-p", "x", *rest,
               "-o", tmp_path / "x.png")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert says in r.output and not loads
    assert not (tmp_path / "x.png").exists()


def test_api_text_to_image_crop_sam_keep_size(klein, tiny_sam_mlx):
    pipe = FluxKlein.from_pretrained(klein)
    assert (pipe.variant, pipe.family.name) == ("klein", "flux2")
    short = {"steps": 1, "max_sequence_length": 32}
    out = pipe.edit(None, "a lighthouse", width=80, height=48, **short)[0]
    assert out.size == (80, 48) and out.info["references"] == "0"

    photo = Image.fromarray(data.astronaut())  # 512x512, a 256x256 model budget: a window
    mask = np.zeros((512, 512), np.float32)
    mask[200:260, 220:300] = 1
    res = pipe.inpaint(photo, mask, "a badge", **short, crop_to_mask=True, feather=0,
                       max_model_pixels=256 * 256)[0]
    box = [int(v) for v in res.info["crop_box"].strip("[]").split(",")]
    assert box != [0, 0, 512, 512] and res.size == photo.size
    outside = mask == 0
    assert np.array_equal(np.asarray(res)[outside], np.asarray(photo)[outside])

    small = photo.resize((160, 160))
    clicked = pipe.inpaint(small, [Points(((80, 70),), (1,))], "a badge", **short,
                           segment_model=str(tiny_sam_mlx))[0]
    assert clicked.size == small.size and clicked.info["mode"] == "inpaint"

    kept = pipe.edit([photo.resize((100, 75))], "warmer", **short, keep_size=True)[0]
    assert kept.size == (100, 75)  # edited at 96x64, returned at the image's own size
    with pytest.raises(InputError, match="FLUX.2 has one text encoder"):
        pipe.edit([photo], "x", prompt_2="y", **short)


def _bfl_lora(path):
    """A random ai-toolkit (BFL `diffusion_model.`) FLUX.2 LoRA for the tiny klein."""
    from safetensors.numpy import save_file
    rng, sd = np.random.default_rng(0), {}
    for name, (out, inp) in {"double_blocks.0.img_attn.qkv": (96, 32),
                             "single_blocks.0.linear1": (288, 32)}.items():
        sd[f"diffusion_model.{name}.lora_A.weight"] = rng.normal(0, 0.3, (4, inp)).astype("f4")
        sd[f"diffusion_model.{name}.lora_B.weight"] = rng.normal(0, 0.3, (out, 4)).astype("f4")
    save_file(sd, path)
    return path


def test_lora_and_cache_cli(klein, photos, tmp_path):
    """issue 26's CLI test: `edit` / `inpaint --model <klein> --lora FILE --cache fbc:0.1`;
    the LoRA changes the result, the cache's decisions are recorded, and a transformer
    LoRA leaves the prompt caches' key alone (Qwen3 is not re-run for it)."""
    lora = _bfl_lora(tmp_path / "style.safetensors")
    common = ["--model", klein, "--steps", 2, "--seed", 3, "--max-sequence-length", 32,
              "-p", "a cup", "--cache", "fbc:0.1"]
    inpaint = ["inpaint", "-i", photos / "astronaut.png", "--mask", photos / "mask.png",
               "--feather", 0, *common]
    for args, name in ((["edit", "-i", photos / "coffee.png", *common], "edit"),
                       (inpaint, "inpaint")):
        r = invoke(*args, "--lora", f"{lora}:0.8", "-o", tmp_path / f"{name}.png")
        assert r.exit_code == 0, r.output
        r = invoke(*args, "-o", tmp_path / f"{name}-plain.png")
        assert r.exit_code == 0, r.output
        out = Image.open(tmp_path / f"{name}.png")
        assert "style" in out.info["loras"] and out.info["cache_steps"].startswith("C")
        assert out.info["cache"] == "FirstBlockCache(threshold=0.1)"
        assert not np.array_equal(np.asarray(out), np.asarray(Image.open(
            tmp_path / f"{name}-plain.png")))
    pipe = FluxKlein.from_pretrained(klein)
    embeds = pipe.encode_prompt("a cup", max_sequence_length=32)
    pipe.load_lora(lora)
    assert pipe.encode_prompt("a cup", max_sequence_length=32) is embeds
    from safetensors.numpy import load_file, save_file
    te = {**load_file(lora), **{f"text_encoder.text_model.encoder.layers.0.self_attn.q_proj."
                                f"lora_{ab}.weight": np.zeros(shape, np.float32)
                                for ab, shape in (("A", (4, 64)), ("B", (64, 4)))}}
    save_file(te, tmp_path / "te.safetensors")
    with pytest.raises(WeightLoadError, match="do not apply to FLUX.2"):
        pipe.load_lora(tmp_path / "te.safetensors")
    assert list(pipe.loras) == ["style"]


def test_tiled_inpaint_with_reference(klein, photos):
    """A klein inpaint on a photo over the model budget with tile_mode on: windows, the
    references (the canvas and the user's) appended to every window's tokens; pixels
    outside the mask are the photo's exactly, the reference changes the masked ones."""
    pipe = FluxKlein.from_pretrained(klein)
    photo = Image.fromarray(data.astronaut()).resize((448, 320))
    mask = np.zeros((320, 448), np.float32)
    mask[20:300, 30:420] = 1
    run = dict(steps=1, seed=2, feather=0, tile_mode="on", max_model_pixels=256 * 256,
               max_sequence_length=32)
    job = pipe.inpaint_job(photo, mask, "a cup", reference=photos / "coffee.png", **run)
    assert job.windows.count > 1 and job.tokens.shape[1] > job.latents.shape[1]
    res = np.asarray(pipe.run(job)[0])
    alone = np.asarray(pipe.inpaint(photo, mask, "a cup", **run)[0])
    src, inside = np.asarray(photo), mask == 1
    assert np.array_equal(res[~inside], src[~inside])
    assert not np.array_equal(res[inside], src[inside])
    assert not np.array_equal(res[inside], alone[inside])


def test_memory_estimate_counts_klein_parts(klein):
    est = FluxKlein.from_pretrained(klein, low_memory=True).memory_estimate(1024, 1024)
    assert {"weights_transformer", "weights_vae", "weights_text_encoder"} <= set(est)
    assert "weights_text_encoder_2" not in est
    assert est["peak"] >= est["weights_transformer"] + est["weights_vae"]
    from mlx_edit.editing import memory

    # klein 4B's parts at their real widths: Qwen3-4B (36 layers built up to layer 27)
    q = [memory.estimate(1024, 1024, dtype="bfloat16", quantize=b, family="flux2",
                         transformer={"num_layers": 5, "num_single_layers": 20,
                                      "num_attention_heads": 24, "joint_attention_dim": 7680,
                                      "guidance_embeds": False}) for b in (None, 4)]
    parts = [e["weights_transformer"] + e["weights_text_encoder"] for e in q]
    assert 12 < parts[0] < 16  # ~3.9B + ~3.1B parameters in bfloat16
    assert 4.0 < parts[1] < 5.0  # 4 bits: near the ~4.3 GiB reported for klein 4B on Macs
    assert q[1]["weights_text_encoder"] < 0.4 * q[0]["weights_text_encoder"]


def test_memory_check_counts_the_source_reference(klein, photos, monkeypatch):
    """klein inpainting appends the whole canvas as reference tokens: the memory check
    (before any model loads) estimates them with the reference's; an edit has none."""
    from mlx_edit.editing import memory

    seen = []

    def check_fits(est, available=None, low_memory=False):
        seen.append(est)
        raise InputError("stop")
    monkeypatch.setattr(memory, "check_fits", check_fits)
    pipe = FluxKlein.from_pretrained(klein)
    with pytest.raises(InputError, match="stop"):
        pipe.inpaint_job(photos / "astronaut.png", photos / "mask.png", "a cup",
                         reference=photos / "coffee.png", crop_to_mask=False)
    with pytest.raises(InputError, match="stop"):
        pipe.edit_job([photos / "astronaut.png"], "make it blue")
    inpaint, edit = (e.inputs for e in seen)
    assert inpaint.source_reference and inpaint.reference_tokens == (120 // 16) * (90 // 16)
    assert not edit.source_reference and edit.reference_tokens == (144 // 16) * (96 // 16)
    canvas = (inpaint.width // 16) * (inpaint.height // 16)
    alone = memory._with(seen[0], source_reference=False)
    assert seen[0]["activations_denoise"] > alone["activations_denoise"]
    assert seen[0]["activations_denoise"] == pytest.approx(memory.denoise_gb(
        canvas, inpaint.text_tokens, inpaint.configs["transformer"], 1, 4,
        family="flux2", reference_tokens=canvas + inpaint.reference_tokens))


def test_batch_runs_klein_lines(klein, photos, tmp_path):
    """`mlx-edit batch --model <klein> --edit-model <klein>` on scikit-image photos: an
    edit line with a reference and an inpaint line with one run on FluxKlein with
    klein's defaults; an outpaint line and an inpaint with two references are refused by
    name."""
    import json

    lines = [{"id": "fix", "image": str(photos / "astronaut.png"),
              "mask": str(photos / "mask.png"), "prompt": "a cup", "steps": 1,
              "references": ["coffee.png"], "max_sequence_length": 32, "feather": 0},
             {"id": "edit", "mode": "edit", "image": str(photos / "coffee.png"),
              "references": [str(photos / "astronaut.png")],
              "prompt": "add the astronaut", "max_sequence_length": 32},
             {"id": "out", "mode": "outpaint", "image": str(photos / "coffee.png"),
              "prompt": "more", "left": 32},
             {"id": "two", "image": "astronaut.png", "mask": "mask.png", "prompt": "x",
              "references": ["coffee.png", "coffee.png"]}]
    manifest = photos / "m.jsonl"  # references relative to the manifest's folder
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = invoke("batch", manifest, "--output-dir", tmp_path / "out", "--model", klein,
               "--edit-model", klein, "--no-prompt-cache", "--skip-invalid")
    assert r.exit_code == 1, r.output  # --skip-invalid: the skipped lines are recorded
    assert "outpaint needs a FLUX.1 model" in r.output
    assert "line 4: inpaint takes one reference, got 2" in r.output
    records = [json.loads(x)
               for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sorted((rec.get("id", f"line {rec.get('line')}"), rec["status"])
                  for rec in records) == [("edit", "ok"), ("fix", "ok"),
                                          ("line 3", "skipped"), ("line 4", "skipped")], records
    edited = Image.open(tmp_path / "out" / "edit.png")
    assert edited.info["steps"] == "4" and edited.size == (112, 80)  # klein's default steps
    assert edited.info["references"] == "2"
    fixed = Image.open(tmp_path / "out" / "fix.png")
    assert fixed.info["reference"] == "True" and fixed.size == (150, 110)
    res, src = np.asarray(fixed.convert("RGB")), np.asarray(Image.open(photos / "astronaut.png"))
    outside = np.asarray(Image.open(photos / "mask.png")) == 0
    assert np.array_equal(res[outside], src[outside])


def test_serve_runs_klein(klein, photos):
    """`mlx-edit serve` with a klein folder for both kinds: inpaint and edit requests run
    on FluxKlein; an outpaint is refused (HTTP 400, naming why)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from test_serve import submit, wait

    from mlx_edit.serve import ServeConfig, create_app

    photo = (Image.open(photos / "astronaut.png"), np.asarray(Image.open(photos / "mask.png")))
    config = ServeConfig(model=str(klein), kontext_model=str(klein),
                         local_hosts=("testserver",))
    with TestClient(create_app(config)) as client:
        assert isinstance(client.app.state.resident.models["fill"], FluxKlein)
        fast = {"steps": 1, "max_sequence_length": 32}
        done = wait(client, submit(client, photo, fast).json()["id"])
        assert done["state"] == "done", done
        done = wait(client, submit(client, (photo[0], None), fast, mode="edit").json()["id"])
        assert done["state"] == "done", done
        r = submit(client, (photo[0], None), {"left": 32}, mode="outpaint")
        assert r.status_code == 400 and "outpaint needs a FLUX.1 model" in r.text, r.text


def test_prompt_cache_keeps_embeddings_without_pooled(klein, tmp_path, monkeypatch):
    """FLUX.2 prompts have no pooled vector: the disk cache stores the sequence alone and
    a second pipeline reads it back without loading Qwen3."""
    from mlx_edit.editing import prompts
    from mlx_edit.editing.prompt_cache import PromptCache

    first = FluxKlein.from_pretrained(klein, low_memory=True)
    first.disk_prompt_cache = PromptCache(tmp_path)
    embeds = first.encode_prompt("a red boat", max_sequence_length=32)
    assert embeds.pooled is None and embeds.txt.shape == (1, 32, 3 * 64)
    second = FluxKlein.from_pretrained(klein, low_memory=True)
    second.disk_prompt_cache = PromptCache(tmp_path)
    loads = []
    monkeypatch.setattr(prompts, "load_qwen3", lambda *a, **k: loads.append(a))
    again = second.encode_prompt("a red boat", max_sequence_length=32)
    assert not loads and again.pooled is None
    assert np.array_equal(np.array(again.txt), np.array(embeds.txt))


def test_prompt_disk_cache_keyed_on_the_encoder(klein, tmp_path, monkeypatch):
    """A klein prompt is a disk-cache hit on a second run (Qwen3 never loads), and a
    miss, re-encoded, once the encoder folder changes: new Qwen3 weights, then a new
    chat template in tokenizer/ (both change the embeddings). Each run is a fresh
    pipeline and PromptCache, as a new process."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    from mlx_edit.editing import prompts
    from mlx_edit.editing.prompt_cache import PromptCache

    folder = tmp_path / "klein"
    shutil.copytree(klein, folder)
    loads, load_qwen3 = [], prompts.load_qwen3
    monkeypatch.setattr(prompts, "load_qwen3",
                        lambda *a, **k: (loads.append(a), load_qwen3(*a, **k))[1])

    def run():
        pipe = FluxKlein.from_pretrained(folder, low_memory=True)
        pipe.disk_prompt_cache = cache = PromptCache(tmp_path / "cache")
        txt = np.array(pipe.encode_prompt("a red boat", max_sequence_length=64).txt)
        return txt, (cache.hits, cache.misses, len(loads))

    first, counts = run()
    assert counts == (0, 1, 1)
    again, counts = run()
    assert counts == (1, 0, 1) and np.array_equal(again, first)
    shard = folder / "text_encoder" / "model-00001-of-00002.safetensors"
    weights = load_file(shard)
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] * 1.5
    save_file(weights, shard, metadata={"format": "pt"})
    new_weights, counts = run()
    assert counts == (0, 1, 2) and not np.allclose(new_weights, first)
    config = folder / "tokenizer" / "tokenizer_config.json"
    tok = json.loads(config.read_text())
    tok["chat_template"] = "Describe an image.\n" + tok["chat_template"]
    config.write_text(json.dumps(tok))
    new_template, counts = run()
    assert counts == (0, 1, 3) and not np.allclose(new_template, new_weights)
    assert run()[1] == (1, 0, 3)


def test_flux1_classes_refuse_a_klein_folder(klein):
    from mlx_edit.editing.fill import FluxFill
    from mlx_edit.editing.kontext import FluxKontext
    from mlx_edit.weights.core import WeightLoadError

    for cls in (FluxFill, FluxKontext):
        with pytest.raises(WeightLoadError, match="FLUX.2 model .* use FluxKlein"):
            cls.from_pretrained(klein)


def test_convert_klein_folder(klein, tmp_path, photos):
    """`mlx-edit convert` of a klein folder: its components (transformer, VAE, Qwen3) and
    tokenizer; `--quantize 8` applies to the transformer and Qwen3; the folder loads as
    klein and edits."""
    import json

    out = tmp_path / "klein-q8"
    r = invoke("convert", klein, out, "--quantize", 8, "--dtype", "float32")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == [
        "mlx_edit.json", "model_index.json", "scheduler", "text_encoder", "tokenizer",
        "transformer", "vae"]
    manifest = json.loads((out / "mlx_edit.json").read_text())
    assert {k: v["bits"] for k, v in manifest["components"].items()} == {
        "transformer": 8, "vae": None, "text_encoder": 8}
    pipe = FluxKlein.from_pretrained(out)
    assert pipe.variant == "klein" and pipe.transformer_bits == 8
    image = pipe.edit([photos / "coffee.png"], "blue", steps=1, max_sequence_length=32)[0]
    assert image.size == (112, 80)
    r = invoke("convert", klein, tmp_path / "x", "--component-bits", "text_encoder_2=4")
    assert r.exit_code == 2 and "unknown component 'text_encoder_2'" in r.output, r.output
