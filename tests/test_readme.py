"""Every `sh` and `python` example of README.md runs, as written, on the torch-free tiny
fixtures, so the README cannot rot.

The examples name Hugging Face repos (black-forest-labs/FLUX.1-Fill-dev, ...): here each
is a folder of `scripts/make_mlx_checkpoint.py --preset tiny` (with its extras) placed in
an offline Hugging Face cache, so the commands run unchanged and download nothing. They
run in order in one working folder holding small photos under the names the README uses
(photo.jpg, mask.png, car.jpg, ...), `docs/` and `scripts/` as in a clone. In the shell
examples the set-up steps are left out (`python -m venv`, activating it, `pip install`,
`python -m pytest`: the environment running this test is the installed one; CI runs the
first command whole in a fresh venv, .ci/run). `mlx-edit` is this checkout's CLI.
The models' default step counts are 2 and FLUX.1 Kontext's preferred sizes are divided
by 8 here (tests/readme_env/sitecustomize.py), so that the examples take seconds. Blocks of any other language (`text`) are references
(option synopses, HTTP calls, commands needing torch, a GPU or several Macs), not run.
"""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SETUP = re.compile(r"^\s*(python3? -m venv|\. \S*activate|pip install|python -m pytest)\b")
# repo id in the README -> the fixture's folder (relative to the built model)
HUB = {
    "black-forest-labs/FLUX.1-Fill-dev": ".",
    "black-forest-labs/FLUX.1-Kontext-dev": "kontext-model",
    "black-forest-labs/FLUX.1-Canny-dev": "control-model",
    "black-forest-labs/FLUX.1-Depth-dev": "control-model",
    "black-forest-labs/FLUX.1-Redux-dev": "redux",
    "InstantX/FLUX.1-dev-Controlnet-Union": "controlnets/union",
    "XLabs-AI/flux-ip-adapter": "ip-adapter",
    "facebook/sam2.1-hiera-large": "segmenter",
    "facebook/sam3": "text-segmenter",
    "black-forest-labs/FLUX.2-klein-4B": "../klein",  # built beside the FLUX.1 fixture
}
EXTRAS = ("controlnet", "control-model", "kontext-model", "ip-adapter", "redux", "segmenter",
          "text-segmenter")


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block; an unlabelled fence is an error (say
    `text` for a block that is not an example)."""
    out = []
    for m in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", text, re.M | re.S):
        assert m.group(2), f"unlabelled code block: {m.group(3)[:60]!r}"
        code = "\n".join(line[len(m.group(1)):] for line in m.group(3).splitlines())
        out.append((m.group(2), code))
    return out


def runnable(code: str) -> str:
    """A shell example without its set-up steps (module doc)."""
    lines = []
    for line in code.splitlines():
        kept = [s for s in line.split(" && ") if not SETUP.match(s)]
        if kept:
            lines.append(" && ".join(kept))
    return "\n".join(lines)


SHELL = [code for lang, code in blocks(README.read_text()) if lang == "sh"]
PYTHON = [code for lang, code in blocks(README.read_text()) if lang == "python"]


def _photos(work: Path) -> None:
    """Small real photos under the README's names (scikit-image's, or noise without it)."""
    try:
        from skimage import data

        astronaut, coffee = data.astronaut(), data.coffee()
    except ImportError:
        rng = np.random.default_rng(0)
        astronaut, coffee = (rng.integers(0, 255, (s, s, 3), np.uint8) for s in (512, 400))
    photo = Image.fromarray(astronaut).resize((160, 160))
    mask = np.zeros((160, 160), np.uint8)
    mask[5:65, 45:105] = 255
    (work / "docs").mkdir(parents=True)
    for folder in (work, work / "docs"):
        photo.save(folder / "photo.jpg", quality=90)
        Image.fromarray(mask).save(folder / "mask.png")
    small = Image.fromarray(coffee).resize((144, 96))
    for name in ("car.jpg", "room.jpg", "lamp.jpg", "style.jpg", "product.jpg"):
        small.save(work / name)
    sky = np.zeros((160, 160), np.uint8)
    sky[:40] = 255
    Image.fromarray(sky).save(work / "sky.png")


def _hub(model: Path, cache: Path) -> None:
    """An offline Hugging Face cache whose repos (HUB) are the fixture's folders."""
    for repo, sub in HUB.items():
        entry = cache / f"models--{repo.replace('/', '--')}"
        (entry / "refs").mkdir(parents=True)
        (entry / "refs" / "main").write_text("0" * 40)
        (entry / "snapshots").mkdir()
        (entry / "snapshots" / ("0" * 40)).symlink_to((model / sub).resolve())


@pytest.fixture(scope="module")
def readme_env(tmp_path_factory):
    """(working folder, environment) in which the README's examples run."""
    from conftest import import_script
    from test_lora_cli import _lora

    from mlx_edit.models.flux import FluxConfig
    from mlx_edit.weights.core import read_config

    base = tmp_path_factory.mktemp("readme")
    model = import_script("make_mlx_checkpoint").build(base / "fill", "tiny", extras=EXTRAS)
    import_script("klein_fixtures").build_mlx(base / "klein", "tiny")
    _hub(model, base / "hf")
    work = base / "work"
    _photos(work)
    (work / "scripts").symlink_to(ROOT / "scripts")
    cfg = FluxConfig.from_dict(read_config(model / "transformer"))
    _lora(work / "style.safetensors", cfg, False, 1)
    _lora(work / "subject.safetensors", cfg, True, 2)
    bin_dir = base / "bin"
    bin_dir.mkdir()
    cli = bin_dir / "mlx-edit"
    cli.write_text(f"#!/bin/sh\nexec {sys.executable} -c "
                   "'from mlx_edit.cli import main; main()' \"$@\"\n")
    cli.chmod(0o755)
    (base / "scratch").mkdir()
    env = {**os.environ, "HF_HUB_CACHE": str(base / "hf"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "readme_env"), str(ROOT)]),
           "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent),
                                    os.environ.get("PATH", "")]),
           "MLX_EDIT_README_TEST": "1", "TMPDIR": str(base / "scratch"),
           "MLX_EDIT_PROMPT_CACHE": str(base / "prompts")}
    return work, env


def _run(args: list[str], work: Path, env: dict) -> None:
    r = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{args[-1][:300]}\n--- stderr:\n{r.stderr[-3000:]}"


def test_the_readme_has_examples():
    assert len(SHELL) >= 8 and len(PYTHON) >= 4
    first = SHELL[0]
    assert "python3 -m venv" in first and "mktemp -d" in first and "--overwrite" not in first
    assert "make_mlx_checkpoint.py" in first and "torch" not in first.replace(
        "open-clip-torch", "")
    assert "download.pytorch.org/whl/cpu" in SHELL[1] and "pytest" in SHELL[1]


@pytest.mark.parametrize("index", range(len(SHELL)))
def test_shell_example_runs(readme_env, index):
    work, env = readme_env
    code = runnable(SHELL[index])
    if not code.strip():
        pytest.skip("set-up steps only (installs, the test run itself)")
    _run(["bash", "-euo", "pipefail", "-c", code], work, env)


def test_python_examples_run(readme_env):
    """The Python blocks in order, as one script (later blocks use earlier names)."""
    work, env = readme_env
    _run([sys.executable, "-c", "\n\n".join(PYTHON)], work, env)
