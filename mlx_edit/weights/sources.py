"""Where weights come from: a local folder or a Hugging Face repo id.

Downloads go through `huggingface_hub.snapshot_download` with `allow_patterns` so only
the components a run needs are fetched (the FLUX.1 Fill repo also holds a 24 GB
single-file copy of the transformer that a diffusers-layout load never needs).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from mlx_edit.weights.core import WeightLoadError

DEFAULT_MODEL = "black-forest-labs/FLUX.1-Fill-dev"

# diffusers pipeline folders: component -> subfolder
COMPONENTS = (
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
)

# What a single-model repo (ControlNet, vision tower) is downloaded for.
CONFIG_AND_WEIGHTS = ("config.json", "*.safetensors", "*.safetensors.index.json")

_REPO_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


_FILE_SUFFIXES = (".safetensors", ".json", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


def looks_like_path(name: str) -> bool:
    """True for a string meant as a local path, existing or not: absolute or `~`, `.`,
    `./`, `../`, a backslash, a weights-file suffix, or a first component that exists
    here (`models/flux` when ./models is a folder). Such a string is never downloaded."""
    name = str(name)
    first = name.replace("\\", "/").split("/", 1)[0]
    return (Path(name).expanduser().is_absolute() or name.startswith("~")
            or first in (".", "..") or "\\" in name
            or name.lower().endswith(_FILE_SUFFIXES)
            or ("/" in name and Path(first).expanduser().is_dir()))


def is_repo_id(name: str) -> bool:
    """True for an `owner/name` string that is not an existing local path and does not
    look like one (`looks_like_path`)."""
    name = str(name)
    return (bool(_REPO_ID.match(name)) and not looks_like_path(name)
            and not Path(name).expanduser().exists())


def not_found(name: str) -> WeightLoadError:
    """The error for a path that does not exist (never taken for a repo id)."""
    return WeightLoadError(f"{name}: not found (a local path; a Hugging Face repo id is "
                           "owner/name, e.g. black-forest-labs/FLUX.1-Fill-dev)")


def local_or_remote(repo_or_path: str | Path, what: str = "") -> tuple[Path, bool]:
    """(path, remote): an existing local path as given (remote False), or a Hugging Face
    repo id to download (remote True). Raises WeightLoadError for neither."""
    path = Path(str(repo_or_path)).expanduser()
    if path.exists():
        return path, False
    if not is_repo_id(str(repo_or_path)):
        raise not_found(str(repo_or_path))
    return path, True


def download(repo: str, patterns: list[str], what: str = "", hint: str = "") -> Path:
    """The local snapshot of the files of hub `repo` matching `patterns` (files already
    in the Hugging Face cache are reused). Raises WeightLoadError naming the reason (gated
    repo without a token, no network, unknown repo), followed by `hint`."""
    from huggingface_hub import snapshot_download  # network code only when needed

    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:  # hub errors are many; the message names the cause
        raise WeightLoadError(f"could not download {what + ' ' if what else ''}{repo} "
                              f"({type(e).__name__}: {e}){hint}") from e


def resolve(repo_or_path: str | Path, components: Iterable[str] = COMPONENTS) -> Path:
    """A local folder holding `components`: the path itself, or a hub snapshot.

    Only `{component}/*` files (plus model_index.json) are downloaded; files already in
    the local Hugging Face cache are reused. Raises WeightLoadError for a path that does
    not exist and is not a repo id, and for a failed download (with the reason: gated
    repo without a token, no network, unknown repo).
    """
    path, remote = local_or_remote(repo_or_path)
    if not remote:
        return path
    patterns = ["model_index.json", *[f"{c}/*" for c in components]]
    return download(str(repo_or_path), patterns, hint=(
        "; for gated FLUX repos accept the license on huggingface.co and run "
        "`hf auth login`, or pass a local folder"))


def component_dir(root: Path, component: str) -> Path:
    """`root/component`, or WeightLoadError naming the missing component."""
    path = root / component
    if not path.is_dir():
        raise WeightLoadError(
            f"{root}: missing the {component}/ folder (a FLUX.1 Fill diffusers or mlx-edit "
            "folder has transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, "
            "tokenizer_2/, scheduler/)"
        )
    return path


def read_model_index(repo_or_path: str | Path | None) -> dict:
    """The model_index.json of a local folder or Hugging Face repo (only that file is
    downloaded), {} for None, a file (a BFL transformer), a folder without one or a
    repo that cannot be reached now (loading it reports why)."""
    import json

    if repo_or_path is None:
        return {}
    path = Path(str(repo_or_path)).expanduser()
    if not path.exists() and is_repo_id(str(repo_or_path)):
        try:
            path = download(str(repo_or_path), ["model_index.json"])
        except WeightLoadError:
            return {}
    index = path / "model_index.json"
    try:
        return json.loads(index.read_text(encoding="utf-8")) if index.is_file() else {}
    except (OSError, ValueError):
        return {}  # a damaged file: the pipeline's load names it
