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
    dst = w / "models" / "clip-garbage"
    shutil.copytree(tiny_mlx, dst, symlinks=True)
    (dst / "text_encoder" / "model.safetensors").write_bytes(b"garbage" * 3)
    return w


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


def run_bad(args, world, ckpt, expect, monkeypatch):
    """Run one CLI case in `world` and check the rules of the module doc."""
    monkeypatch.chdir(world)
    argv = [str(a).format(w=world, ckpt=ckpt) for a in args]
    before, model_before = _snapshot(world), _stats(ckpt)
    r = CliRunner().invoke(main, argv)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2, (argv, r.output)
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert r.stdout == "" and "Traceback" not in r.output
    assert expect.lower() in lines[0].lower(), (expect, lines[0])
    assert _snapshot(world) == before, "a file under the test folder changed"
    assert _stats(ckpt) == model_before
    return lines[0]


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


# ---------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def pipe(tiny_mlx):
    from mlx_edit.pipeline import FluxFill

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
    monkeypatch.setattr(type(pipe), "encode_prompt", no_work)
    with pytest.raises(InputError) as e:
        _call(pipe, images, mode, kwargs)
    assert "\n" not in str(e.value) and expect in str(e.value)


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
    from mlx_edit.kontext import FluxKontext

    out = tmp_path_factory.mktemp("kontext") / "tiny"
    ckpt = import_script("make_mlx_checkpoint").build(out, "tiny", extras=("kontext-model",))
    return FluxKontext.from_pretrained(ckpt / "kontext-model")


def test_kontext_references_that_do_not_fit_are_refused_before_work(kontext, images,
                                                                    monkeypatch):
    """12 references at the preferred 1248x832 make a 52K-token sequence: refused by the
    memory estimate before the text encoders run (issue 30: it grew to 16 GB and was
    killed). One reference fits and gets as far as the prompt encoding."""
    from mlx_edit import memory

    class Started(Exception):
        pass

    def started(*a, **k):
        raise Started
    monkeypatch.setattr(memory, "available_memory", lambda: 16 * 10**9)
    monkeypatch.setattr(type(kontext), "encode_prompt", started)
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
