"""Loader for a ranking CLIP: a full transformers `CLIPModel` folder
(openai/clip-vit-large-patch14 layout: config.json with text_config/vision_config,
model.safetensors, vocab.json + merges.txt).

The text tower loads with `mlx_edit.weights.text.CLIP_TEXT_RULES` after the `text_model.`
strip, the vision tower (with visual_projection) with `load_clip_vision`; the two
remaining tensors are `text_projection.weight` (projection_dim, text hidden; no bias) and
the scalar `logit_scale`. Tables below say what each half drops; everything else must
match exactly (`mlx_edit.weights.core.load_into`).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import mlx.core as mx

from mlx_edit.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionModel
from mlx_edit.editing.text import ClipTokenizer
from mlx_edit.weights.core import (
    WeightLoadError,
    check_headers,
    default_dtype,
    load_into,
    open_tensors,
    read_config,
    safetensors_files,
)
from mlx_edit.weights.text import CLIP_STRIP_PREFIXES, CLIP_TEXT_DROP, CLIP_TEXT_RULES
from mlx_edit.weights.sources import download, local_or_remote
from mlx_edit.weights.vision import load_clip_vision

DEFAULT_RANKER = "openai/clip-vit-large-patch14"
RANKER_FOLDER = "ranker"  # a model folder's own ranking CLIP, used when present
RANKER_FILES = ["config.json", "*.safetensors", "vocab.json", "merges.txt",
                "tokenizer_config.json", "special_tokens_map.json"]
# Not part of the text tower (after the `text_model.` strip): the vision half and heads.
TEXT_DROP_PREFIXES = ("vision_model.",)
TEXT_DROP_KEYS = (*CLIP_TEXT_DROP, "visual_projection.weight", "text_projection.weight",
                  "logit_scale")


class ClipRanker(NamedTuple):
    """The parts of a CLIPModel that score image-text pairs (see mlx_edit.editing.ranking)."""

    text: CLIPTextModel
    vision: CLIPVisionModel
    text_projection: mx.array  # (projection_dim, text hidden)
    logit_scale: float  # log of the similarity scale (CLIP-L: ln 100)
    tokenizer: ClipTokenizer


def load_clip_ranker(folder: str | Path, dtype: mx.Dtype | None = None) -> ClipRanker:
    """Load a ranking CLIP from a local CLIPModel folder (layout in the module doc).

    Raises WeightLoadError (missing config, files or tokenizer; missing, unexpected or
    mis-shaped tensors).
    """
    folder = Path(folder)
    dtype = default_dtype() if dtype is None else dtype
    cfg = check_ranker_folder(folder)
    tensors = open_tensors(safetensors_files(folder), strip_prefixes=CLIP_STRIP_PREFIXES)
    for key in ("text_projection.weight", "logit_scale"):
        if key not in tensors:
            raise WeightLoadError(f"ranking CLIP ({folder}): missing {key} (a full "
                                  "CLIPModel checkpoint is needed, with projections)")
    text = CLIPTextModel(CLIPTextConfig.from_dict(cfg["text_config"]))
    text_tensors = {k: v for k, v in tensors.items()
                    if k not in TEXT_DROP_KEYS and not k.startswith(TEXT_DROP_PREFIXES)}
    load_into(text, text_tensors, CLIP_TEXT_RULES, dtype, name=f"ranking CLIP text ({folder})")
    text.eval()
    vision = load_clip_vision(folder, dtype)
    try:
        tokenizer = ClipTokenizer.from_folder(folder)
    except FileNotFoundError as e:
        raise WeightLoadError(f"ranking CLIP ({folder}): {e}") from None
    return ClipRanker(text, vision, tensors["text_projection.weight"].astype(dtype),
                      float(tensors["logit_scale"].astype(mx.float32).item()), tokenizer)


def check_ranker_folder(folder: Path) -> dict:
    """What can be checked of a ranking CLIP folder without reading its tensors: a
    CLIPModel config.json, readable safetensors headers, the tokenizer's files. Returns
    the config. Raises WeightLoadError naming what is wrong."""
    cfg = read_config(folder)
    if "text_config" not in cfg or "vision_config" not in cfg:
        raise WeightLoadError(f"{folder}/config.json is not a CLIPModel config (needs "
                              "text_config and vision_config)")
    check_headers(folder)
    missing = [f for f in ("vocab.json", "merges.txt") if not (folder / f).is_file()]
    if missing and not (folder / "tokenizer.json").is_file():
        raise WeightLoadError(f"ranking CLIP ({folder}): missing the tokenizer "
                              f"({', '.join(missing)})")
    return cfg


def resolve_ranker(repo_or_path: str | Path | None, model_root: Path | None = None) -> Path:
    """The ranking CLIP folder: `repo_or_path` (a folder, or a hub repo id downloaded with
    huggingface_hub), else `model_root/ranker` when present, else DEFAULT_RANKER.

    A string that looks like a path is never downloaded (weights.sources).
    Raises WeightLoadError (not found, download failure).
    """
    if repo_or_path is None and model_root is not None and (model_root / RANKER_FOLDER).is_dir():
        return model_root / RANKER_FOLDER
    src = str(repo_or_path or DEFAULT_RANKER)
    path, remote = local_or_remote(src)
    if not remote:
        return path
    return download(src, RANKER_FILES, what="ranking CLIP", hint="; pass --rank-model PATH")
