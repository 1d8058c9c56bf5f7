"""Bad and hostile input to every entry point (issue 13): a table of CLI cases for inpaint,
outpaint, restyle, convert and parity, and a table of API cases.

Each CLI case asserts exit status 2, ONE line on stderr (`Error: ...`) naming the problem,
nothing on stdout, no traceback, that no file under the test's folder (or the model
folder) changed, and that nothing was downloaded. Almost every case fails before any
model loads, so the whole table runs in seconds on the tiny checkpoint.
"""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mlx_edit.cli import main
from mlx_edit.imaging.images import InputError
from mlx_edit.weights.core import WeightLoadError

W, H = 64, 48


def _png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, format="PNG")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_mlx):
    """The folder every case runs in: photos, masks, links, odd files, damaged models."""
    w = tmp_path_factory.mktemp("bad-inputs")
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    _png(w / "photo.png", photo)
    Image.fromarray(photo).save(w / "photo.jpg", quality=90)
    mask = np.zeros((H, W), np.uint8)
    mask[10:30, 20:40] = 255
    _png(w / "mask.png", mask)
    _png(w / "empty.png", np.zeros((H, W), np.uint8))
    _png(w / "side.json", mask)  # a mask whose name is a sidecar's
    for name in ("control.png", "ref.png", "shot-1.png"):
        _png(w / name, photo)
    (w / "notes.txt").write_text("not an image")
    (w / "zero.png").write_bytes(b"")
    (w / "cut.png").write_bytes((w / "photo.png").read_bytes()[:200])
    (w / "exists.png").write_bytes(b"keep me")
    (w / "meta.json").write_text("{}")  # the sidecar of --output meta.png
    (w / "sub").mkdir()
    (w / "photos").mkdir()
    _png(w / "photos" / "a.png", photo)
    (w / "link.png").symlink_to(w / "photo.png")
    (w / "sub-link").symlink_to(w / "photos")
    (w / "dangling.png").symlink_to(w / "nowhere.png")
    os.link(w / "photo.png", w / "hard.png")
    (w / "bad.json").write_text("{not json")
    (w / "sam-nocfg").mkdir()
    (w / "sam-nocfg" / "model.safetensors").write_text("weights without their config")
    (w / "ref.safetensors").write_text("not safetensors")
    damaged = {  # every file the loader may read for the part (tokenizer.json or not)
        "vocab": (("tokenizer/vocab.json", "tokenizer/tokenizer.json"), b"{oops"),
        "spiece": (("tokenizer_2/spiece.model", "tokenizer_2/tokenizer.json"), b"garbage"),
        "scheduler": (("scheduler/scheduler_config.json",), b'{"shift": "abc"}')}
    for name, (rels, data) in damaged.items():
        dst = w / "models" / name
        shutil.copytree(tiny_mlx, dst, symlinks=True)
        for rel in rels:
            if (dst / rel).exists():
                (dst / rel).write_bytes(data)
    dst = w / "models" / "t5-cut"  # a truncated text-encoder shard
    shutil.copytree(tiny_mlx, dst, symlinks=True)
    shard = sorted((dst / "text_encoder_2").glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-64])
    for name in ("nan", "int32"):  # one transformer tensor damaged: NaN, or integers
        dst = w / "models" / name
        shutil.copytree(tiny_mlx, dst, symlinks=True)
        _damage(sorted((dst / "transformer").glob("*.safetensors"))[0], name)
    (w / "nan-lora.safetensors").write_bytes(b"")
    _damage(w / "nan-lora.safetensors", "nan")
    dst = w / "models" / "clip-garbage"
    shutil.copytree(tiny_mlx, dst, symlinks=True)
    (dst / "text_encoder" / "model.safetensors").write_bytes(b"garbage" * 3)
    return w


def _damage(path: Path, how: str) -> None:
    """Rewrite a safetensors file with its first float tensor NaN (`nan`) or int32; an
    empty file becomes a kohya LoRA with NaN weights on the tiny model's first block."""
    import mlx.core as mx

    if path.stat().st_size == 0:
        key = "lora_unet_double_blocks_0_img_attn_proj"
        tensors = {f"{key}.lora_down.weight": mx.full((2, 32), float("nan")),
                   f"{key}.lora_up.weight": mx.zeros((32, 2))}
    else:
        tensors = dict(mx.load(str(path)))
        key = next(k for k in sorted(tensors) if mx.issubdtype(tensors[k].dtype, mx.floating))
        tensors[key] = (tensors[key] * float("nan") if how == "nan"
                        else tensors[key].astype(mx.int32))
    mx.eval(tensors)
    path.unlink()
    mx.save_safetensors(str(path), tensors)


def _snapshot(folder: Path) -> dict:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p)] = "->" + os.readlink(p)
        elif p.is_file() and p.stat().st_size > 100_000:  # model files: size and time
            out[str(p)] = (p.stat().st_size, p.stat().st_mtime_ns)
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p)] = "dir"
    return out


def _stats(folder: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def no_download(monkeypatch):
    import huggingface_hub

    def refuse(*a, **k):
        raise AssertionError(f"a download was attempted: {a} {k}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


def run_bad(args, world, ckpt, expect, monkeypatch, listed=None):
    """Run one CLI case in `world` and check the rules of the module doc. `listed`: the
    prefix of the lines a batch lists its bad manifest lines with, before its one error."""
    monkeypatch.chdir(world)
    argv = [str(a).format(w=world, ckpt=ckpt) for a in args]
    before, model_before = _snapshot(world), _stats(ckpt)
    r = CliRunner().invoke(main, argv)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2, (argv, r.output)
    assert lines and lines[-1].startswith("Error: "), r.output
    assert len(lines) == 1 or listed and all(x.startswith(listed) for x in lines[:-1]), r.output
    assert r.stdout == "" and "Traceback" not in r.output
    assert expect.lower() in r.stderr.lower(), (expect, r.stderr)
    assert _snapshot(world) == before, "a file under the test folder changed"
    assert _stats(ckpt) == model_before
    return lines[-1]


INP = ["inpaint", "--model", "{ckpt}", "--image", "{w}/photo.png", "--mask", "{w}/mask.png",
       "--prompt", "x", "--steps", "1", "--output", "{w}/out.png"]
OUT = ["outpaint", "--model", "{ckpt}", "--image", "{w}/photo.png", "--prompt", "x",
       "--left", "16", "--steps", "1", "--output", "{w}/out.png"]
RES = ["restyle", "--model", "{ckpt}", "--image", "{w}/photo.png", "--prompt", "x",
       "--steps", "1", "--output", "{w}/out.png"]
BASES = {"inpaint": INP, "outpaint": OUT, "restyle": RES}

# (option values, what the message must name), for every edit command
COMMON = [
    (["--steps", "0"], "--steps must be in 1..1000"),
    (["--steps", "-1"], "--steps"),
    (["--steps", "1001"], "--steps must be in 1..1000"),
    (["--steps", "1.5"], "--steps"),
    (["--steps", "abc"], "--steps"),
    (["--steps", ""], "--steps"),
    (["--steps", "nan"], "--steps"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--guidance", "inf"], "--guidance must be a finite number"),
    (["--guidance", "-inf"], "--guidance must be a finite number"),
    (["--guidance", "-1"], "--guidance must be in [0, 100]"),
    (["--guidance", "101"], "--guidance must be in [0, 100]"),
    (["--guidance", "abc"], "--guidance"),
    (["--seed", "-1"], "--seed must be in 0..4294967295"),
    (["--seed", "4294967296"], "--seed must be in 0..4294967295"),
    (["--seed", "99999999999999999999999"], "--seed must be in 0..4294967295"),
    (["--seed", "1.5"], "--seed"),
    (["--seed", "abc"], "--seed"),
    (["--seed", "4294967295", "-n", "2"], "seed + num_images - 1"),
    (["--num-images", "0"], "--num-images must be in 1..64"),
    (["--num-images", "-1"], "--num-images must be in 1..64"),
    (["--num-images", "65"], "--num-images must be in 1..64"),
    (["--num-images", "1.5"], "--num-images"),
    (["--max-sequence-length", "0"], "--max-sequence-length must be in 1..512"),
    (["--max-sequence-length", "513"], "--max-sequence-length must be in 1..512"),
    (["--max-sequence-length", "-5"], "--max-sequence-length"),
]
MASKED = [  # inpaint and restyle
    (["--strength", "0"], "--strength must be in (0, 1]"),
    (["--strength", "-0.5"], "--strength must be in (0, 1]"),
    (["--strength", "1.5"], "--strength must be in (0, 1]"),
    (["--strength", "nan"], "--strength must be a finite number"),
    (["--strength", "inf"], "--strength must be a finite number"),
    (["--grow-mask", "-1"], "--grow-mask must be in [0, 1024]"),
    (["--grow-mask", "nan"], "--grow-mask must be a finite number"),
    (["--grow-mask", "inf"], "--grow-mask must be a finite number"),
    (["--grow-mask", "1e9"], "--grow-mask must be in [0, 1024]"),
    (["--grow-mask", "1025"], "--grow-mask must be in [0, 1024]"),
    (["--feather", "-1"], "--feather must be in [0, 1024]"),
    (["--feather", "nan"], "--feather must be a finite number"),
    (["--feather", "inf"], "--feather must be a finite number"),
    (["--feather", "1e9"], "--feather must be in [0, 1024]"),
]
OUTPAINT = [
    (["--left", "-1"], "--left must be in 0..16384"),
    (["--right", "1.5"], "--right"),
    (["--top", "16385"], "--top must be in 0..16384"),
    (["--bottom", "abc"], "--bottom"),
    (["--overlap", "-1"], "--overlap must be in 0..16384"),
    (["--overlap", "nan"], "--overlap"),
    (["--left", "0"], "at least one of left/right/top/bottom > 0"),
    (["--left", "16000", "--right", "16000", "--top", "16000", "--bottom", "16000"],
     "over the limit"),
    (["--grow-mask", "4"], "no such option"),
]
RESTYLE = [
    (["--control-type", "pose"], "--control-type"),
    (["--canny-low", "-1"], "--canny-low must be in [0, 1000]"),
    (["--canny-low", "300", "--canny-high", "200"], "canny-low must be <= canny_high"),
    (["--canny-high", "nan"], "--canny-high must be a finite number"),
    (["--control-type", "depth"], "needs --control-image"),
    (["--control-image", "{w}/missing.png"], "image file not found"),
    (["--control-image", "{w}/notes.txt"], "cannot read image"),
    (["--mask", "{w}/empty.png"], "mask is empty"),
    (["--controlnet", "a/b"], "no such option"),
]
LONG = "x" * (64 * 1024 + 1)  # one byte over options.MAX_PROMPT_BYTES
PROMPTS = [  # bounded in bytes before any model loads or tokenizer runs
    (["--prompt", LONG], "prompt is 65537 bytes, over the limit of 65536"),
    (["--prompt", "\u00e9" * (32 * 1024 + 1)], "prompt is 65538 bytes"),
    (["--prompt-2", LONG], "--prompt-2 is 65537 bytes"),
]
FILES = [  # inpaint's inputs and outputs
    (["--image", "{w}/missing.png"], "image file not found"),
    (["--image", "{w}/sub"], "directory"),
    (["--image", "{w}/notes.txt"], "cannot read image"),
    (["--image", "{w}/zero.png"], "cannot read image"),
    (["--image", "{w}/cut.png"], "cannot read image"),
    (["--mask", "{w}/missing.png"], "mask file not found"),
    (["--mask", "{w}/empty.png"], "mask is empty"),
    (["--mask", "{w}/notes.txt"], "cannot read mask"),
    (["--mask", "{w}/sub"], "directory"),
    (["--output", "{w}/out.jpg"], "must end in .png"),
    (["--output", "{w}/no-folder/out.png"], "output folder does not exist"),
    (["--output", "{w}/photo.png/out.png"], "output folder does not exist"),
    (["--output", "{w}/sub"], "must end in .png"),
    (["--output", "{w}/photo.png"], "one of the input files"),
    (["--output", "{w}/photo.png", "--overwrite"], "one of the input files"),
    (["--output", "{w}/mask.png", "--overwrite"], "one of the input files"),
    (["--output", "{w}/link.png"], "one of the input files"),
    (["--output", "{w}/link.png", "--overwrite"], "one of the input files"),
    (["--output", "{w}/hard.png", "--overwrite"], "one of the input files"),
    (["--image", "{w}/hard.png", "--output", "{w}/photo.png", "--overwrite"],
     "one of the input files"),
    (["--image", "{w}/link.png", "--output", "{w}/photo.png", "--overwrite"],
     "one of the input files"),
    (["--output", "{w}/exists.png"], "already exists; pass --overwrite"),
    (["--output", "{w}/dangling.png"], "already exists"),
    (["--output", "{w}/meta.png", "--metadata"], "meta.json already exists"),
    (["--mask", "{w}/side.json", "--output", "{w}/side.png", "--metadata", "--overwrite"],
     "one of the input files"),
    (["--image", "{w}/shot-1.png", "--output", "{w}/shot.png", "-n", "2", "--overwrite"],
     "one of the input files"),
    (["--transformer", "{w}/missing.safetensors"], "does not exist"),
    (["--prompt-2", "x", "--stepz", "2"], "no such option"),
]
CONDITIONING = [  # inpaint's ControlNet / IP-Adapter / Redux options
    (["--controlnet", "a/b"], "1 --controlnet but 0 --control-image"),
    (["--control-image", "{w}/control.png"], "--control-image given without --controlnet"),
    (["--controlnet", "a/b", "--control-image", "{w}/control.png", "--control-scale", "3"],
     "--control-scale must be in [0, 2]"),
    (["--controlnet", "a/b", "--control-image", "{w}/control.png", "--control-scale", "nan"],
     "--control-scale must be in [0, 2]"),
    (["--controlnet", "a/b", "--control-image", "{w}/control.png", "--control-start", "0.9",
      "--control-end", "0.2"], "start < end"),
    (["--controlnet", "a", "--controlnet", "b", "--control-image", "{w}/control.png",
      "--control-image", "{w}/control.png", "--control-mode", "1", "--control-mode", "2",
      "--control-mode", "3"], "--control-mode given 3 times for 2 --controlnet"),
    (["--controlnet", "a/b", "--control-image", "{w}/missing.png"], "does not exist"),
    (["--controlnet", "a/b", "--control-image", "{w}/notes.txt"], "cannot read image"),
    (["--ip-image", "{w}/ref.png"], "--ip-image given without --ip-adapter"),
    (["--ip-adapter", "A"], "--ip-adapter needs at least one --ip-image"),
    (["--ip-adapter", "A", "--ip-image", "{w}/ref.png", "--ip-scale", "x"], "expected a number"),
    (["--ip-adapter", "A", "--ip-image", "{w}/ref.png", "--ip-scale", "nan"], "finite"),
    (["--ip-adapter", "A", "--ip-image", "{w}/missing.png"], "does not exist"),
    (["--redux", "R", "--redux-image", "{w}/ref.png", "--redux-strength", "-1"], ">= 0"),
    (["--redux", "R", "--redux-image", "{w}/ref.png", "--redux-strength", "nan"], "finite"),
    (["--redux-image", "{w}/ref.png"], "given without --redux"),
    # what is wrong, not something else (issue 30)
    (["--redux", "R", "--redux-image", "{w}/sub"], "sub is a folder, not an image file"),
    (["--ip-adapter", "A", "--ip-image", "{w}/sub"], "is a folder, not an image file"),
    (["--controlnet", "{ckpt}", "--control-image", "{w}/control.png"],
     "is a FLUX model folder (model_index.json, transformer/), not a ControlNet"),
    # an output may never replace a reference input, with or without --overwrite
    (["--controlnet", "a/b", "--control-image", "{w}/control.png", "--output",
      "{w}/control.png", "--overwrite"], "one of the input files"),
    (["--ip-adapter", "A", "--ip-image", "{w}/ref.png", "--output", "{w}/ref.png",
      "--overwrite"], "one of the input files"),
    (["--redux", "R", "--redux-image", "{w}/ref.png", "--output", "{w}/ref.png",
      "--overwrite"], "one of the input files"),
    (["--redux", "R", "--redux-image", "{w}/ref.png", "--output", "{w}/ref.png"],
     "one of the input files"),
]
MODELS = [  # what --model names; a path is never downloaded
    (["--model", "./missing-model"], "not found"),
    (["--model", "../missing-model"], "not found"),
    (["--model", "/nonexistent/model"], "not found"),
    (["--model", "~/no-such-mlx-edit-model"], "not found"),
    (["--model", "sub/missing"], "not found"),  # ./sub exists: a path
    (["--model", "a/b/c"], "not found"),
    (["--model", "{w}/missing"], "not found"),
    (["--model", "{w}"], "missing the transformer/ folder"),
    (["--model", "{w}/models/vocab"], "CLIP tokenizer"),
    (["--model", "{w}/models/spiece"], "T5 tokenizer"),
    (["--model", "{w}/models/scheduler"], "damaged or unreadable scheduler config"),
    (["--model", "{w}/models/t5-cut"], "truncated"),
    (["--model", "{w}/models/clip-garbage"], "damaged or unreadable safetensors header"),
    (["--prompt", "word " * 600], "T5 tokens"),
    (["--model", "{w}/models/nan"], "has NaN or inf values"),  # found at load, not as NaN images
    (["--model", "{w}/models/int32"], "is int32, the model expects floating point"),
]
STEP_CACHE = [  # every number of a --cache spec finite and in range (issue 30)
    (["--cache", "fbc:-1"], "fbc threshold must be a finite number in [0, 1000]"),
    (["--cache", "fbc:nan"], "fbc threshold must be a finite number"),
    (["--cache", "fbc:inf"], "fbc threshold must be a finite number"),
    (["--cache", "mag:inf"], "mag threshold must be a finite number"),
    (["--cache", "mag:0.06,retention=2"], "mag retention_ratio must be a finite number in [0, 1]"),
    (["--cache", "mag:0.06,max_skip=-1"], "mag max_skip_steps must be in 0..1000"),
    (["--cache", "taylorseer:0"], "taylorseer cache_interval must be in 1..1000"),
    (["--cache", "taylorseer:5,before=0"], "disable_cache_before_step must be in 1..1000"),
    (["--cache", "taylorseer:5,order=99"], "max_order must be in 0..8"),
    (["--cache", "taylorseer:1.5"], "'1.5' is not an integer"),
    (["--cache", "fbc:abc"], "'abc' is not a number"),
]
LORAS = [  # --lora specs checked before any model loads (issue 30)
    (["--lora", "{w}/ref.safetensors:nan"], "the scale must be a finite number in [-100, 100]"),
    (["--lora", "{w}/ref.safetensors:inf"], "the scale must be a finite number"),
    (["--lora", "{w}/ref.safetensors:1e30"], "the scale must be a finite number"),
    (["--lora", "{w}/ref.safetensors:-101"], "in [-100, 100], got -101"),
    (["--lora", "{w}/ref.safetensors:abc"], "the scale 'abc' after ':' is not a number"),
    (["--lora", "{w}/ref.safetensors:"], "the scale '' after ':' is not a number"),
    (["--lora", "{w}/sub"], "is a folder, not a LoRA file"),
    (["--lora", "{w}/sub:0.5"], "is a folder, not a LoRA file"),
    (["--lora", "{w}/missing.safetensors:0.5"], "no such LoRA file"),
]
USAGE = [
    (["inpaint"], "missing option"),
    (["inpaint", "--image", "{w}/photo.png", "--mask", "{w}/mask.png"], "missing option"),
    (["paint"], "no such command"),
    (["outpaint", "--image", "{w}/photo.png", "--prompt", "x", "--top", "8", "--output",
      "{w}/photo.png", "--overwrite"], "one of the input files"),
    (["restyle", "--image", "{w}/photo.png", "--prompt", "x", "--control-image",
      "{w}/control.png", "--output", "{w}/control.png", "--overwrite"], "one of the input files"),
    (["restyle", "--model", "{ckpt}", "--image", "{w}/photo.png", "--prompt", "x",
      "--output", "{w}/out.png"], "restyle needs a FLUX.1 Canny or Depth"),
    (["restyle", "--model", "{ckpt}", "--image", "{w}/photo.png", "--prompt", "x",
      "--soft-mask", "--output", "{w}/out.png"], "--soft-mask reads the mask's grey levels"),
    (["edit", "--model", "{ckpt}", "--image", "{w}/photo.png", "--prompt", "x",
      "--soft-mask", "--output", "{w}/out.png"], "no mask was given"),
    (["inpaint", "--model", "{ckpt}", "--image", "{w}/photo.png", "--mask-point", "10,10",
      "--segment-model", "{w}/sam-nocfg", "--prompt", "x", "--output", "{w}/out.png"],
     "a SAM 2.1 folder needs its config.json"),
]
CONVERT = [
    (["convert", "{ckpt}", "{w}/photos", "--overwrite"], "not an mlx-edit conversion"),
    (["convert", "{ckpt}", "{w}/photos"], "exists and is not empty"),
    (["convert", "{ckpt}", "{w}/notes.txt", "--overwrite"], "notes.txt"),
    (["convert", "{ckpt}", "{w}/link.png"], "link.png"),
    (["convert", "{ckpt}", "{w}/sub-link", "--overwrite"], "is a link"),
    (["convert", "./missing-model", "{w}/dest"], "not found"),
    (["convert", "../missing-model", "{w}/dest"], "not found"),
    (["convert", "{ckpt}", "{w}/dest", "--component-bits", "unet=4"], "unknown component"),
    (["convert", "{ckpt}", "{w}/dest", "--dtype", "float8"], "--dtype"),
    (["convert", "{ckpt}", "{w}/dest", "--quantize", "3"], "--quantize"),
    (["convert", "{ckpt}", "{w}/dest", "--max-shard-size", "abc"], "--max-shard-size"),
    (["convert", "{ckpt}", "{w}/dest", "--transformer-config", "{w}/missing.json"],
     "--transformer-config"),
    (["convert", "{ckpt}", "{w}/dest", "--transformer-config", "{w}/bad.json"], "bad.json"),
    # nothing published from NaN (issue 30): a damaged source, a LoRA, a scale
    (["convert", "{w}/models/nan", "{w}/dest"], "has NaN or inf values"),
    (["convert", "{ckpt}", "{w}/dest", "--lora", "{w}/nan-lora.safetensors"],
     "has NaN or inf values"),
    (["convert", "{ckpt}", "{w}/dest", "--lora", "{w}/ref.safetensors:nan"], "finite"),
    (["convert", "{ckpt}", "{w}/dest", "--lora", "{w}/ref.safetensors:inf"], "finite"),
    (["convert", "{ckpt}", "{w}/dest", "--lora", "{w}/sub:1"], "is a folder"),
    (["convert", "{w}/models/vocab", "{w}/dest", "--dtype", "float32"],
     "CLIP tokenizer"),
    (["convert"], "missing argument"),
]
PARITY = [
    (["parity", "{w}/missing.safetensors", "--model", "{ckpt}"], "does not exist"),
    (["parity", "{w}/ref.safetensors", "--model", "{ckpt}"], "not a readable safetensors"),
    (["parity", "{w}/notes.txt", "--model", "{ckpt}"], "not a readable safetensors"),
    (["parity", "{w}/ref.safetensors", "--model", "{w}/missing"], "does not exist"),
    (["parity", "{w}/ref.safetensors", "--model", "{ckpt}", "--tolerance-scale", "0"],
     "--tolerance-scale"),
    (["parity", "{w}/ref.safetensors", "--model", "{ckpt}", "--tolerance-scale", "nan"],
     "--tolerance-scale"),
    (["parity", "{w}/ref.safetensors"], "missing option"),
]

CLI_CASES = (
    [(f"{cmd}{' '.join(a)}", BASES[cmd] + a, m) for cmd in BASES for a, m in COMMON]
    + [(f"{cmd}{' '.join(a)}", BASES[cmd] + a, m) for cmd in ("inpaint", "restyle")
       for a, m in MASKED]
    + [(f"outpaint{' '.join(a)}", OUT + a, m) for a, m in OUTPAINT]
    + [(f"restyle{' '.join(a)}", RES + a, m) for a, m in RESTYLE]
    + [(f"inpaint{' '.join(a)}", INP + a, m) for a, m in FILES + CONDITIONING + MODELS]
    + [(f"{cmd}{' '.join(a)}", BASES[cmd] + a, m) for cmd in BASES
       for a, m in STEP_CACHE + LORAS]
    + [(f"inpaint{a[0]} ({len(a[1])} chars)", INP + a, m) for a, m in PROMPTS]
    + [(" ".join(a), a, m) for a, m in USAGE + CONVERT + PARITY]
)


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0][:80] for c in CLI_CASES])
def test_cli_refuses_bad_input(case, world, tiny_mlx, monkeypatch, no_download):
    _, args, expect = case
    message = run_bad(args, world, tiny_mlx, expect, monkeypatch)
    if "one of the input files" in message:  # never suggests --overwrite for an input
        assert "--overwrite" not in message


def test_unwritable_output_folder(world, tiny_mlx, monkeypatch, no_download):
    """A folder the process cannot write to is refused before the model loads."""
    ro = world / "read-only"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o500)
    try:
        probe = ro / "probe"
        try:
            probe.write_text("")
            probe.unlink()
            target = Path("/proc/mlx-edit-out.png")  # root writes anywhere but here
            if not Path("/proc/self").is_dir():
                pytest.skip("root on a system without /proc")
        except OSError:
            target = ro / "out.png"
        run_bad(INP + ["--output", target], world, tiny_mlx,
                "cannot write to the output folder", monkeypatch)
    finally:
        ro.chmod(0o700)
        ro.rmdir()


# ---------------------------------------------------------------- batches

# (files in the batch's folder, manifest name, lines ({d}: the folder), options, message):
# nothing a manifest reads or a user already had in the output folder is replaced, and
# each case is refused before any line runs (issue 30).
PHOTOS = ("a.png", "b.png", "m.png")
BATCH = [
    ("another line's photo", PHOTOS, "m.jsonl",
     [{"id": "x", "image": "b.png", "mask": "m.png"},
      {"id": "b", "image": "a.png", "mask": "m.png"}], [], "line 2: refusing to write"),
    ("another line's photo, --overwrite", PHOTOS, "m.jsonl",
     [{"id": "x", "image": "b.png", "mask": "m.png"},
      {"id": "b", "image": "a.png", "mask": "m.png"}], ["--overwrite"], "one of the input"),
    ("its own photo", PHOTOS, "m.jsonl", [{"id": "a", "image": "a.png", "mask": "m.png"}],
     ["--overwrite"], "line 1: refusing to write"),
    ("its own mask", PHOTOS, "m.jsonl", [{"id": "m", "image": "a.png", "mask": "m.png"}],
     ["--overwrite"], "one of the input files"),
    ("another line's mask", PHOTOS, "m.jsonl",
     [{"id": "x", "image": "a.png", "mask": "m.png"}, {"id": "m", "mode": "outpaint",
                                                      "image": "b.png", "left": 8}],
     [], "line 2: refusing to write"),
    ("an IP-Adapter image", PHOTOS, "m.jsonl",
     [{"id": "b", "image": "a.png", "mask": "m.png",
       "ip_adapters": [{"model": "A", "image": "{d}/b.png"}]}], ["--overwrite"],
     "one of the input files"),
    ("an invalid line's photo", PHOTOS, "m.jsonl",
     [{"id": "x", "image": "b.png", "mask": "m.png", "steps": 0},
      {"id": "b", "image": "a.png", "mask": "m.png"}], [], "line 2: refusing to write"),
    ("the manifest is results.jsonl", PHOTOS, "results.jsonl",
     [{"id": "x", "image": "a.png", "mask": "m.png"}], ["--overwrite"],
     "results.jsonl: it is one of the input files"),
    ("a user's results.jsonl", PHOTOS + ("results.jsonl",), "m.jsonl",
     [{"id": "x", "image": "a.png", "mask": "m.png"}], [], "not this batch's results"),
    ("a user's file at <id>.png", PHOTOS + ("x.png",), "m.jsonl",
     [{"id": "x", "image": "a.png", "mask": "m.png"}], [], "x.png already exists"),
    ("a user's file at <id>-1.png", PHOTOS + ("x-1.png",), "m.jsonl",
     [{"id": "x", "image": "a.png", "mask": "m.png", "num_images": 2}], [],
     "x-1.png already exists"),
    ("a step cache of NaN", PHOTOS, "m.jsonl",
     [{"id": "x", "image": "a.png", "mask": "m.png", "cache": "fbc:nan"}], [],
     "line 1: cache: fbc threshold must be a finite number"),
    ("a TaylorSeer interval of 0 by --set", PHOTOS, "m.jsonl",
     [{"id": "x", "image": "a.png", "mask": "m.png"}], ["--set", "cache=taylorseer:0"],
     "line 1: cache: taylorseer cache_interval must be in 1..1000"),
]


@pytest.mark.parametrize("case", BATCH, ids=[c[0] for c in BATCH])
def test_batch_protects_inputs_and_existing_files(case, world, tiny_mlx, monkeypatch,
                                                  no_download):
    name, files, manifest, rows, extra, expect = case
    d = world / f"batch-{BATCH.index(case)}"
    d.mkdir()
    for f in files:
        shutil.copy(world / ("mask.png" if f.startswith("m") else "photo.png"), d / f)
    (d / manifest).write_text("".join(json.dumps({"prompt": "x", **r}).replace("{d}", str(d))
                                      + "\n" for r in rows))
    run_bad(["batch", d / manifest, "--output-dir", d, "--model", "{ckpt}",
             "--no-prompt-cache", "--steps", "1", *extra], world, tiny_mlx, expect,
            monkeypatch, listed=f"{d / manifest}: line ")


def test_batch_writer_protects_the_lines_own_inputs(world, tmp_path):
    """write_line never replaces the line's image or mask, even when called without the
    up-front check (a later change of the folder, a caller of the library)."""
    from mlx_edit import batch

    shutil.copy(world / "photo.png", tmp_path / "a.png")
    shutil.copy(world / "mask.png", tmp_path / "m.png")
    before = _snapshot(tmp_path)
    for line_id in ("a", "m"):
        line = batch.parse_line(json.dumps({"id": line_id, "image": "a.png", "mask": "m.png",
                                            "prompt": "x"}), 1, tmp_path, {})
        with pytest.raises(InputError, match="one of the input files"):
            batch.write_line(line, [Image.new("RGB", (W, H))], tmp_path)
    assert _snapshot(tmp_path) == before


def test_a_batch_line_is_done_only_with_its_outputs(world, tmp_path):
    """Resume skips a line only when its last record is ok, has the same hash and every
    output is there: a deleted output is made again."""
    from mlx_edit import batch

    shutil.copy(world / "photo.png", tmp_path / "a.png")
    shutil.copy(world / "mask.png", tmp_path / "m.png")
    line = batch.parse_line(json.dumps({"id": "x", "image": "a.png", "mask": "m.png",
                                        "prompt": "x", "num_images": 2}), 1, tmp_path, {})
    ok = {"id": "x", "status": "ok", "hash": "h"}
    for p in line.outputs(tmp_path):
        p.write_bytes(b"png")
    assert batch.is_done(line, ok, tmp_path, "h")
    assert not batch.is_done(line, ok, tmp_path, "other hash")
    assert not batch.is_done(line, {**ok, "status": "error"}, tmp_path, "h")
    assert not batch.is_done(line, None, tmp_path, "h")
    line.outputs(tmp_path)[1].unlink()
    assert not batch.is_done(line, ok, tmp_path, "h")


def test_batch_line_defaults_seed_and_size(world, tmp_path):
    """Documented defaults: a line without a seed gets one derived from its id (the same
    on every parse and rank, different ids differ), a given seed is kept; the line's
    weight for sharing out is its output canvas (outpaint's four sides) x num_images."""
    from mlx_edit import batch

    shutil.copy(world / "photo.png", tmp_path / "a.png")

    def line(**kw):
        row = {"id": "x", "mode": "outpaint", "image": "a.png", "prompt": "p", "left": 1, **kw}
        return batch.parse_line(json.dumps(row), 1, tmp_path, {})
    seeds = {line(id=i).options.seed for i in ("x", "y", "z")}
    assert len(seeds) == 3 and line().options.seed == line().options.seed
    assert line(seed=7).options.seed == 7
    assert line(left=1, right=2, top=3, bottom=4, num_images=2).pixels == \
        (W + 3) * (H + 7) * 2


def test_batch_manifest_rules_and_merged_order(world, tmp_path):
    """An outpaint line takes no mask; ids whose outputs differ only by case collide (a
    macOS volume ignores case); results.jsonl lists the manifest's order, whatever order
    the lines finished in."""
    from mlx_edit import batch

    shutil.copy(world / "photo.png", tmp_path / "a.png")
    shutil.copy(world / "mask.png", tmp_path / "m.png")
    rows = [{"id": "hat", "image": "a.png", "mask": "m.png", "prompt": "p"},
            {"id": "Hat", "image": "a.png", "mask": "m.png", "prompt": "p"},
            {"id": "o", "mode": "outpaint", "image": "a.png", "mask": "m.png", "left": 8,
             "prompt": "p"}]
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines, errors = batch.read_manifest(m)
    assert [ln.id for ln in lines] == ["hat"]
    assert errors == ["line 2: output Hat.png is also line 1's; choose another id",
                      "line 3: outpaint takes no mask"]
    for i, line_id in enumerate(["c", "a", "b"]):  # finished c, a, b
        batch.append_record(tmp_path / ".results.0.jsonl",
                            {"id": line_id, "hash": "h", "status": "ok", "finished": i})
    batch.merge_results(tmp_path, ["b", "c", "a"])  # neither finish nor sorted order
    merged = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(t)["id"] for t in merged] == ["b", "c", "a"]


def test_batch_removes_only_its_own_stale_temps(world, tmp_path):
    """A killed run's hidden temp files of the batch's outputs are removed; any other
    hidden .tmp in the folder (another program's, another edit's) is not."""
    from mlx_edit import batch

    shutil.copy(world / "photo.png", tmp_path / "a.png")
    shutil.copy(world / "mask.png", tmp_path / "m.png")
    line = batch.parse_line(json.dumps({"id": "x", "image": "a.png", "mask": "m.png",
                                        "prompt": "x"}), 1, tmp_path, {})
    ours, theirs = tmp_path / ".x.png.123.ab12cd34.tmp", tmp_path / ".y.png.123.ab12cd34.tmp"
    results = tmp_path / ".results.jsonl.9.ab12cd34.tmp"
    for p in (ours, theirs, results):
        p.write_bytes(b"partial")
    assert batch.remove_stale_temps(tmp_path, [line]) == 2
    assert not ours.exists() and not results.exists() and theirs.read_bytes() == b"partial"


def test_batch_outputs_it_wrote_are_its_own(world, tmp_path):
    """Outputs and results.jsonl that the batch's records account for are replaced
    without --overwrite (a re-run, a resume); a user's are not, and --overwrite allows
    them; an input never."""
    from mlx_edit import batch

    shutil.copy(world / "photo.png", tmp_path / "a.png")
    shutil.copy(world / "mask.png", tmp_path / "m.png")
    out = tmp_path / "out"
    out.mkdir()
    m = tmp_path / "m.jsonl"
    rows = [{"id": i, "image": "a.png", "mask": "m.png", "prompt": "x"} for i in "xyz"]
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines, _ = batch.read_manifest(m)
    assert batch.check_outputs(lines, tmp_path / "new", m) == (lines, [])
    for name in ("x.png", "y.png", "z.png"):
        (out / name).write_bytes(b"png")
    batch.append_record(out / ".results.0.jsonl", {"id": "x", "hash": "h", "status": "error"})
    batch.append_record(out / ".results.0.jsonl", {"id": "w", "hash": "h", "status": "ok",
                                                   "outputs": [str(out / "y.png")]})
    batch.merge_results(out, ["x", "w"])
    safe, errors = batch.check_outputs(lines, out, m)
    assert [ln.id for ln in safe] == ["x", "y"]
    assert errors == [f"line 3: {out / 'z.png'} already exists and this batch did not "
                      "write it; pass --overwrite to replace it"]
    assert batch.check_outputs(lines, out, m, overwrite=True) == (lines, [])
    (out / "results.jsonl").write_text('{"id": "x", "note": "mine"}\n')
    with pytest.raises(InputError, match="not this batch's results"):
        batch.check_outputs(lines, out, m)
    # the user's results.jsonl is no record: x.png is not the batch's any more
    assert [ln.id for ln in batch.check_outputs(lines, out, m, overwrite=True)[0]] == \
        ["x", "y", "z"]
    batch.merge_results(out, ["x"])  # what a run with --overwrite ends with
    assert (out / "results.jsonl").read_text() == ""  # the user's lines were no records
    (out / "results.jsonl").unlink()
    assert len(batch.check_outputs(lines, out, m)[1]) == 3  # no record left


# ---------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def pipe(tiny_mlx):
    from mlx_edit.editing.pipeline import FluxFill

    return FluxFill.from_pretrained(tiny_mlx)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
    mask = np.zeros((H, W), np.float32)
    mask[10:30, 20:40] = 1
    return photo, mask


NAN = float("nan")
API_CASES = [
    ("inpaint", {"prompt": None}, "prompt must be a string"),
    ("inpaint", {"prompt": 3}, "prompt must be a string"),
    ("inpaint", {"prompt": "a\x00b"}, "NUL"),
    ("inpaint", {"seed": 1.5}, "seed must be an integer"),
    ("inpaint", {"seed": -1}, "seed must be in 0..4294967295"),
    ("inpaint", {"seed": 2**32}, "seed must be in 0..4294967295"),
    ("inpaint", {"seed": True}, "seed must be an integer"),
    ("inpaint", {"steps": "2"}, "steps must be an integer, got str"),
    ("inpaint", {"steps": 2.0}, "steps must be an integer"),
    ("inpaint", {"steps": True}, "steps must be an integer"),
    ("inpaint", {"steps": 0}, "steps must be in 1..1000"),
    ("inpaint", {"guidance": NAN}, "guidance must be a finite number"),
    ("inpaint", {"guidance": "30"}, "guidance must be a number"),
    ("inpaint", {"num_images": 0}, "num_images must be in 1..64"),
    ("inpaint", {"strength": 0}, "strength must be in (0, 1]"),
    ("inpaint", {"grow_mask": 1e9}, "grow_mask must be in [0, 1024]"),
    ("inpaint", {"feather": float("inf")}, "feather must be a finite number"),
    ("inpaint", {"paste_back": "no"}, "paste_back must be true or false"),
    ("inpaint", {"crop_to_mask": 1}, "crop_to_mask must be true or false"),
    ("inpaint", {"prompt_2": 5}, "prompt_2 must be a string"),
    ("inpaint", {"prompt": LONG}, "prompt is 65537 bytes, over the limit of 65536"),
    ("inpaint", {"prompt_2": LONG}, "prompt_2 is 65537 bytes"),
    ("outpaint", {"left": 8, "prompt": LONG}, "prompt is 65537 bytes"),
    ("inpaint", {"max_sequence_length": 600}, "max_sequence_length must be in 1..512"),
    ("inpaint", {"stepz": 2}, "unknown option 'stepz'"),
    ("inpaint", {"left": 8}, "inpaint does not take left"),
    ("inpaint", {"controlnets": "abc"}, "controlnets must be a list"),
    ("inpaint", {"controlnets": [1]}, "controlnets items must be ControlNetSpec"),
    ("inpaint", {"ip_adapters": [{"model": "A"}]}, "missing"),
    ("inpaint", {"redux": [{"model": "R", "image": "x.png", "strength": -1}]}, ">= 0"),
    ("inpaint", {"mask": np.zeros((H, W))}, "mask is empty"),
    ("inpaint", {"mask": np.full((H, W), NAN)}, "NaN"),
    ("inpaint", {"mask": np.ones((1, H, W))}, "is channels-first (C, H, W)"),
    ("inpaint", {"mask": np.ones((H, W, 5))}, "mask must have 1-4 channels, got 5"),
    ("restyle", {"soft_mask": True}, "soft_mask reads the mask's grey levels"),
    ("inpaint", {"image": None}, "image must be a file path"),
    ("inpaint", {"image": "/nonexistent/x.png"}, "image file not found"),
    ("outpaint", {}, "at least one of left/right/top/bottom"),
    ("outpaint", {"left": -1}, "left must be in 0..16384"),
    ("outpaint", {"left": 8, "grow_mask": 2}, "outpaint does not take grow_mask"),
    ("outpaint", {"left": 8, "strength": 0.5}, "outpaint does not take strength"),
    ("outpaint", {"left": 16384, "right": 16384, "top": 16384, "bottom": 16384},
     "over the limit"),
    ("restyle", {"control_type": "pose"}, "control_type must be one of"),
    ("restyle", {"ip_adapters": []}, "restyle does not take ip_adapters"),
    ("restyle", {"canny_low": 250}, "canny_low must be <= canny_high"),
    ("inpaint", {"cache": "fbc:nan"}, "cache: fbc threshold must be a finite number"),
    ("inpaint", {"cache": "taylorseer:0"}, "cache: taylorseer cache_interval must be in"),
    ("outpaint", {"left": 8, "cache": "mag:inf"}, "cache: mag threshold must be a finite"),
    ("inpaint", {"seam_fix": 4, "mask": np.ones((H, W))}, "the mask covers the whole image"),
    ("inpaint", {"rank": "clip", "rank_model": "/nonexistent/clip"}, "not found"),
]


def _call(pipe, images, mode, kwargs):
    photo, mask = images
    kw = {"steps": 1, **kwargs}
    prompt = kw.pop("prompt", "x")
    image = kw.pop("image", photo)
    if mode == "inpaint":
        return pipe.inpaint(image, kw.pop("mask", mask), prompt, **kw)
    if mode == "outpaint":
        return pipe.outpaint(image, prompt, **kw)
    return pipe.restyle(image, None, prompt, **kw)


@pytest.mark.parametrize("mode, kwargs, expect", API_CASES,
                         ids=[f"{m}-{'-'.join(map(str, k))}" for m, k, _ in API_CASES])
def test_api_refuses_bad_input(pipe, images, mode, kwargs, expect, monkeypatch):
    """The API raises InputError with a one-line message naming the field (before any
    model work: the transformer must not run)."""
    def no_work(*a, **k):
        raise AssertionError("the edit started before its options were checked")
    monkeypatch.setattr(type(pipe.prompts), "encode", no_work)
    with pytest.raises((InputError, WeightLoadError)) as e:
        _call(pipe, images, mode, kwargs)
    assert "\n" not in str(e.value) and expect in str(e.value)


def _cache_configs():
    from mlx_edit.sampling import cache

    return [(cache.FirstBlockCache(float("nan")), "fbc threshold"),
            (cache.FirstBlockCache(-0.1), "fbc threshold"),
            (cache.TaylorSeer(cache_interval=0), "taylorseer cache_interval"),
            (cache.TaylorSeer(max_order=True), "taylorseer max_order must be an integer"),
            (cache.MagCache(mag_ratios=[1.0, float("nan")]), "mag mag_ratios must be finite"),
            (cache.MagCache(threshold=float("inf"), calibrate=True), "mag threshold")]


def test_cache_objects_and_specs_are_checked_alike():
    """A config object given to the API is checked as its spec string is; boundaries
    exactly on the limit pass."""
    from mlx_edit.options import EditOptions

    for cfg, expect in _cache_configs():
        with pytest.raises(InputError, match=f"cache: {expect}"):
            EditOptions(cache=cfg)
    for spec in ("fbc:0", "fbc:1000", "taylorseer:1,before=1", "taylorseer:1000,order=8",
                 "mag:0,max_skip=0,retention=1", "mag:1000,retention=0"):
        assert EditOptions(cache=spec).cache is not None, spec
    for spec in ("fbc:1000.001", "taylorseer:1001", "mag:0.1,retention=1.0001"):
        with pytest.raises(InputError):
            EditOptions(cache=spec)


@pytest.mark.parametrize("scale", [NAN, float("inf"), -float("inf"), 1e30, 100.5, "1", True])
def test_lora_scales_of_the_api(pipe, scale, tmp_path):
    """load_lora and set_lora_scales refuse a scale that is not a finite number in
    [-100, 100] before any file is read, and change nothing."""
    with pytest.raises(InputError, match="scale"):
        pipe.load_lora(tmp_path / "never-read.safetensors", scale)
    assert pipe.loras == {}
    with pytest.raises(InputError, match="no LoRA named x"):
        pipe.set_lora_scales({"x": 1.0})


def test_set_lora_scales_checks_all_before_changing_any(pipe, world):
    name = pipe.load_lora(_ok_lora(world), 0.5)
    try:
        with pytest.raises(InputError, match="scale of LoRA 'bad'|no LoRA named bad"):
            pipe.set_lora_scales({name: 0.7, "bad": NAN})
        with pytest.raises(InputError, match=f"scale of LoRA '{name}' must be a finite"):
            pipe.set_lora_scales({name: NAN})
        assert pipe.loras[name].scale == 0.5
        pipe.set_lora_scales({name: -100.0})  # the boundary is allowed
        assert pipe.loras[name].scale == -100.0
    finally:
        pipe.unload_loras()


def _ok_lora(world: Path) -> Path:
    import mlx.core as mx

    path = world / "lora-ok.safetensors"
    if not path.exists():
        key = "lora_unet_double_blocks_0_img_attn_proj"
        mx.save_safetensors(str(path), {f"{key}.lora_down.weight": mx.zeros((2, 32)),
                                        f"{key}.lora_up.weight": mx.zeros((32, 2))})
    return path


def test_boundaries_exactly_on_the_limit(pipe, images, tmp_path):
    """Documented limits are inclusive where documented: a LoRA scale of exactly +-100,
    seam_fix with one pixel left outside the mask, an empty results.jsonl (nothing to
    lose); one step past is refused."""
    from mlx_edit import batch
    from mlx_edit.options import EditOptions
    from mlx_edit.weights.lora import check_scale, split_spec

    assert split_spec("a.safetensors:100") == ("a.safetensors", 100.0)
    assert split_spec("a.safetensors:-100") == ("a.safetensors", -100.0)
    assert split_spec("owner/name:file.safetensors") == ("owner/name:file.safetensors", None)
    assert check_scale(0) == 0.0
    with pytest.raises(InputError, match="in \\[-100, 100\\], got 100.001"):
        split_spec("a.safetensors:100.001")
    nearly_full = np.ones((H, W), np.float32)
    nearly_full[0, 0] = 0
    job = pipe.inpaint_job(images[0], nearly_full, "x", EditOptions(
        seam_fix=4, steps=1, grow_mask=0, feather=0))
    assert job is not None
    (tmp_path / "results.jsonl").write_text("")
    assert batch._is_results(tmp_path / "results.jsonl")
    (tmp_path / "results.jsonl").write_text('{"id": "a", "hash": "h"}\n')
    assert not batch._is_results(tmp_path / "results.jsonl")  # no status: not a record


def test_repo_lora_offline_fails_fast_in_one_line(monkeypatch, caplog):
    """A repo-like LoRA id with the hub unreachable (HF_HUB_OFFLINE here) is one
    WeightLoadError at once, no retries (hf_hub_download retried for half a minute)."""
    import huggingface_hub

    from mlx_edit.weights.lora import locate

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightLoadError) as e:
        locate("someone/some-lora")
    msg = str(e.value)
    assert "\n" not in msg and "someone/some-lora" in msg and "local .safetensors" in msg
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]


def test_half_set_true_cfg_is_a_one_line_warning(world, tiny_mlx, monkeypatch):
    """true_cfg_scale without negative_prompt, and the reverse, would run without true
    CFG: warned in one line as diffusers warns (before the model is even checked)."""
    import warnings

    from mlx_edit.options import EditOptions, check_used

    for kw, expect in (({"true_cfg_scale": 4.0}, "does nothing without a negative_prompt"),
                       ({"negative_prompt": "blur"}, "does nothing with true_cfg_scale <= 1"),
                       ({"negative_prompt": "blur", "true_cfg_scale": 1.0}, "<= 1")):
        with pytest.warns(UserWarning, match=expect):
            check_used(EditOptions(**kw), masked=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kw in ({}, {"true_cfg_scale": 1.0001, "negative_prompt": "blur"}):
            check_used(EditOptions(**kw), masked=False)
        check_used(EditOptions(soft_mask=True), masked=True)
    monkeypatch.chdir(world)
    r = CliRunner().invoke(main, ["edit", "--model", str(tiny_mlx), "--image", "photo.png",
                                  "--prompt", "x", "--true-cfg-scale", "2", "--output",
                                  str(world / "out.png")])
    assert r.exit_code == 2 and r.stderr.splitlines()[0] == (
        "Warning: true_cfg_scale 2 does nothing without a negative_prompt: true CFG is off")


def test_prompt_bound_is_inclusive():
    from mlx_edit.options import MAX_PROMPT_BYTES, check_prompt

    at = "\u00e9" * (MAX_PROMPT_BYTES // 2)  # 2 bytes a character: exactly the bound
    assert check_prompt(at) == at
    with pytest.raises(InputError, match="65537 bytes"):
        check_prompt(at + "x")


def test_manifest_line_with_a_huge_prompt(tmp_path):
    """Refused while the manifest is read (before any line runs or a tokenizer sees it)."""
    from mlx_edit.batch import parse_line

    _png(tmp_path / "a.png", np.zeros((H, W, 3), np.uint8))
    line = json.dumps({"image": "a.png", "prompt": "x" * 50_000_000, "mask_box": [1, 1, 9, 9]})
    with pytest.raises(InputError, match="prompt is 50000000 bytes"):
        parse_line(line, 1, tmp_path, {})


@pytest.fixture(scope="module")
def kontext(tmp_path_factory, import_script):
    from mlx_edit.editing.kontext import FluxKontext

    out = tmp_path_factory.mktemp("kontext") / "tiny"
    ckpt = import_script("make_mlx_checkpoint").build(out, "tiny", extras=("kontext-model",))
    return FluxKontext.from_pretrained(ckpt / "kontext-model")


def test_kontext_references_that_do_not_fit_are_refused_before_work(kontext, images,
                                                                    monkeypatch):
    """12 references at the preferred 1248x832 make a 52K-token sequence: refused by the
    memory estimate before the text encoders run (issue 30: it grew to 16 GB and was
    killed). One reference fits and gets as far as the prompt encoding."""
    from mlx_edit.editing import memory

    class Started(Exception):
        pass

    def started(*a, **k):
        raise Started
    monkeypatch.setattr(memory, "available_memory", lambda: 16 * 10**9)
    monkeypatch.setattr(type(kontext.prompts), "encode", started)
    photo = images[0].resize((300, 200))
    with pytest.raises(InputError) as e:
        kontext.edit([photo] * 12, "x", steps=1)
    assert "\n" not in str(e.value)
    assert "48672 reference tokens" in str(e.value) and "this machine has 16.0 GB" in str(e.value)
    with pytest.raises(Started):
        kontext.edit([photo], "x", steps=1)


def test_options_from_a_manifest_line():
    from mlx_edit.options import EditOptions

    line = json.loads('{"steps": 4, "guidance": 3.5, "seed": 9, "grow_mask": 2}')
    opts = EditOptions.from_dict(line, "inpaint")
    assert (opts.steps, opts.guidance, opts.seed, opts.grow_mask) == (4, 3.5, 9, 2.0)
    with pytest.raises(InputError, match="unknown option 'stepz'"):
        EditOptions.from_dict({"stepz": 4})
    with pytest.raises(InputError, match="outpaint does not take feather"):
        EditOptions.from_dict({"feather": 2, "left": 8}, "outpaint")
    with pytest.raises(InputError, match="options must be a mapping"):
        EditOptions.from_dict([("steps", 4)])
    assert EditOptions.from_dict({"control_type": "depth"}, "restyle").guidance == 10.0
    assert EditOptions.from_dict({}, "inpaint").guidance == 30.0


def test_two_runs_racing_for_one_output(tmp_path):
    """The output appears between the up-front check and the commit: refused, and the
    other run's file is kept; nothing of this run is left."""
    from mlx_edit.imaging.images import OutputExistsError, write_together

    out = tmp_path / "race.png"

    def other_run_writes(f):
        out.write_bytes(b"other run")
        f.write(b"ours")
    with pytest.raises(OutputExistsError, match="already exists"):
        write_together([(tmp_path / "race.json", lambda f: f.write(b"{}")),
                        (out, other_run_writes)])
    assert out.read_bytes() == b"other run" and sorted(os.listdir(tmp_path)) == ["race.png"]


def test_existing_sidecar_fails_before_the_image_is_written(tmp_path):
    from mlx_edit.imaging.images import OutputExistsError, write_together

    (tmp_path / "a.json").write_text("old")
    with pytest.raises(OutputExistsError, match="a.json"):
        write_together([(tmp_path / "a.png", lambda f: f.write(b"png")),
                        (tmp_path / "a.json", lambda f: f.write(b"{}"))])
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_warnings_are_one_line_without_source_paths():
    import warnings

    import click

    from mlx_edit.cli.errors import OneLineCommand

    @click.command(cls=OneLineCommand)
    def cmd():
        warnings.warn("mask size 10x10 differs\nfrom image size 20x20", UserWarning,
                      stacklevel=1)
        click.echo("done")
    r = CliRunner().invoke(cmd, [])
    assert r.exit_code == 0
    assert r.stderr == "Warning: mask size 10x10 differs from image size 20x20\n"
    assert ".py" not in r.stderr


def test_debug_shows_the_traceback(world, tiny_mlx, monkeypatch):
    """MLX_EDIT_DEBUG=1: the error propagates (traceback) instead of the one line."""
    monkeypatch.chdir(world)
    argv = [str(a).format(w=world, ckpt=tiny_mlx) for a in INP + ["--steps", "0"]]
    r = CliRunner(env={"MLX_EDIT_DEBUG": "1"}).invoke(main, argv)
    assert not isinstance(r.exception, SystemExit) and "--steps" in str(r.exception)
    r = CliRunner().invoke(main, argv)
    assert isinstance(r.exception, SystemExit) and r.exit_code == 2


def test_an_unexpected_error_is_one_line_and_status_1(world, tiny_mlx, monkeypatch):
    import sys

    cli_main = sys.modules["mlx_edit.cli.main"]  # the package's `main` shadows the module
    def boom(*a, **k):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(cli_main, "check_inputs", boom)
    r = CliRunner().invoke(main, [str(a).format(w=world, ckpt=tiny_mlx) for a in INP])
    assert r.exit_code == 1 and r.stdout == "" and "Traceback" not in r.output
    assert r.stderr.strip().splitlines() == [
        "Error: internal error: ZeroDivisionError: a bug (MLX_EDIT_DEBUG=1 shows the "
        "traceback; please report it)"]
