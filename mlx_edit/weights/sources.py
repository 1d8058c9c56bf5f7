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


def resolve(repo_or_path: str | Path, components: Iterable[str] = COMPONENTS) -> Path:
    """A local folder holding `components`: the path itself, or a hub snapshot.

    Only `{component}/*` files (plus model_index.json) are downloaded; files already in
    the local Hugging Face cache are reused. Raises WeightLoadError for a path that does
    not exist and is not a repo id, and for a failed download (with the reason: gated
    repo without a token, no network, unknown repo).
    """
    path = Path(str(repo_or_path)).expanduser()
    if path.exists():
        return path
    name = str(repo_or_path)
    if not is_repo_id(name):
        raise not_found(name)
    from huggingface_hub import snapshot_download  # network code only when needed

    patterns = ["model_index.json", *[f"{c}/*" for c in components]]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # hub errors are many; the message names the cause
        raise WeightLoadError(
            f"could not download {name} ({type(e).__name__}: {e}); for gated FLUX repos "
            "accept the license on huggingface.co and run `hf auth login`, or pass a local folder"
        ) from e


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
