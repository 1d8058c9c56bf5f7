"""Shared pytest fixtures: random-weight FLUX Fill checkpoint folders and script imports.

- `tiny_mlx`, `small_mlx` (session scope): the folders the non-parity tests use, built
  without torch by `scripts/make_mlx_checkpoint.py` (mlx-edit's own models, MLX random init;
  same presets and layout as below). No torch, diffusers or transformers needed.
- `tiny_klein_mlx` (session scope): a FLUX.2 [klein] folder (diffusers layout, preset
  `tiny` of scripts/klein_fixtures.py), built torch-free.
- `tiny_sam_mlx` (session scope): a SAM 2.1 folder (transformers Sam2Model layout, preset
  `tiny` of scripts/sam_fixtures.py) built torch-free by make_mlx_checkpoint.write_segmenter.
- `tiny_sam3_mlx` (session scope): a SAM 3 folder (transformers Sam3Model layout, preset
  `tiny` of scripts/sam3_fixtures.py, 84 px input) built torch-free by
  make_mlx_checkpoint.write_text_segmenter (seed 70: the "text-segmenter" extra's).
- `tiny_ckpt`, `small_ckpt`, `wide_ckpt` (session scope, parity tests): Path of a folder
  built once per session by `scripts/make_tiny_checkpoint.py`'s `build(out, preset, seed=0,
  dtype="float32")` (real FLUX.1-Fill-dev diffusers layout plus BFL single files, every
  model built by diffusers/transformers: needs the `parity` extra).
  `wide_ckpt` (~5 GB, ~1 min) is for tests marked `slow`; set MLX_EDIT_WIDE_CKPT to a folder
  built with `--preset wide` to reuse it instead (it is then never deleted). A wide folder
  built here is deleted at the end of the session.
- `repo_root`: the repository root. `import_script(name)`: import `scripts/<name>.py`.
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (first: loads OpenBLAS before anything imports mlx)

import importlib
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = REPO_ROOT / "scripts"


def import_script(name: str) -> ModuleType:
    """Import `scripts/<name>.py` as a top-level module (scripts/ goes on sys.path)."""
    if str(SCRIPTS_DIR) not in sys.path:
        sys.path.insert(0, str(SCRIPTS_DIR))
    return importlib.import_module(name)


def _build(tmp_path_factory: pytest.TempPathFactory, preset: str) -> Path:
    out = tmp_path_factory.mktemp(f"ckpt-{preset}") / preset
    return import_script("make_tiny_checkpoint").build(out, preset, seed=0, dtype="float32")


@pytest.fixture(autouse=True)
def _prompt_cache_folder(tmp_path_factory, monkeypatch):
    """The edit commands cache prompt embeddings on disk by default: every test gets its
    own empty folder (never the user's ~/.cache; no test sees another's entries)."""
    monkeypatch.setenv("MLX_EDIT_PROMPT_CACHE", str(tmp_path_factory.mktemp("prompts")))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session", name="import_script")
def import_script_fixture():
    """The `import_script(name)` function, for tests that prefer a fixture."""
    return import_script


def _build_mlx(tmp_path_factory: pytest.TempPathFactory, preset: str) -> Path:
    out = tmp_path_factory.mktemp(f"mlx-{preset}") / preset
    return import_script("make_mlx_checkpoint").build(out, preset, seed=0)


@pytest.fixture(scope="session")
def tiny_mlx(tmp_path_factory) -> Path:
    """Preset `tiny`, built torch-free (mlx-edit's models)."""
    return _build_mlx(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def small_mlx(tmp_path_factory) -> Path:
    """Preset `small`, built torch-free (every Linear input width a multiple of 64)."""
    return _build_mlx(tmp_path_factory, "small")


@pytest.fixture(scope="session")
def tiny_sam_mlx(tmp_path_factory) -> Path:
    """SAM 2.1 preset `tiny` (256 px input), built torch-free (mlx-edit's SamModel)."""
    out = tmp_path_factory.mktemp("sam-mlx") / "tiny"
    return import_script("make_mlx_checkpoint").write_segmenter(out, "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_klein_mlx(tmp_path_factory) -> Path:
    """FLUX.2 [klein] preset `tiny`, built torch-free (scripts/klein_fixtures.build_mlx).
    Shared: a test that changes a folder's files copies it first."""
    out = tmp_path_factory.mktemp("klein-mlx") / "tiny"
    return import_script("klein_fixtures").build_mlx(out, "tiny")


@pytest.fixture(scope="session")
def tiny_sam3_mlx(tmp_path_factory) -> Path:
    """SAM 3 preset `tiny`, built torch-free (mlx-edit's three SAM 3 models)."""
    out = tmp_path_factory.mktemp("sam3-mlx") / "tiny"
    return import_script("make_mlx_checkpoint").write_text_segmenter(out, "tiny", seed=70)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """Preset `tiny`: transformer hidden 32, VAE (8,16,16,16), CLIP/T5 width 32."""
    return _build(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory) -> Path:
    """Preset `small`: every Linear input width a multiple of 64 (group-64 quantization)."""
    return _build(tmp_path_factory, "small")


@pytest.fixture(scope="session")
def wide_ckpt(tmp_path_factory):
    """Preset `wide`: real FLUX widths, reduced depth (~5 GB float32)."""
    given = os.environ.get("MLX_EDIT_WIDE_CKPT")
    if given:
        path = Path(given)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"MLX_EDIT_WIDE_CKPT={given} holds no model_index.json")
        yield path
        return
    path = _build(tmp_path_factory, "wide")
    yield path
    shutil.rmtree(path, ignore_errors=True)  # 5 GB: do not leave it in pytest's tmp dirs
