"""Key map and loader for SAM 2.1 image models in the transformers `Sam2Model` layout
(facebook/sam2.1-hiera-{tiny,small,base-plus,large}: `config.json` + `model.safetensors`).

Our parameter names are transformers' own; the rules only change layouts: convolution
weights OIHW -> OHWI, and the 1x1 convolutions we run as Linears (FPN laterals, the
decoder's `conv_s0/conv_s1`) squeezed to (out, in). The released checkpoints are shared
with `Sam2VideoModel`, so they also hold the video-memory modules; those are dropped by
an explicit table (transformers' `Sam2PreTrainedModel._keys_to_ignore_on_load_unexpected`).
Anything else missing, unexpected or mis-shaped is a WeightLoadError.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx

from mlx_edit.models.sam import SamConfig, SamModel
from mlx_edit.weights.core import (
    Rule,
    WeightLoadError,
    load_into,
    open_tensors,
    read_config,
    rename,
    safetensors_files,
)
from mlx_edit.weights.sources import download, local_or_remote

SAM_RULES: tuple[Rule, ...] = (
    Rule("vision_encoder.backbone.patch_embed.projection.weight",
         ("vision_encoder.backbone.patch_embed.projection.weight",), "conv"),
    Rule("vision_encoder.neck.convs.{n}.weight", ("vision_encoder.neck.convs.{n}.weight",),
         "conv1x1"),
    Rule("mask_decoder.conv_{s}.weight", ("mask_decoder.conv_{s}.weight",), "conv1x1"),
    Rule("prompt_encoder.mask_embed.conv{n}.weight",
         ("prompt_encoder.mask_embed.conv{n}.weight",), "conv"),
    rename("{rest}", "{rest}"),
)

# Video-only tensors of the released checkpoints (memory encoder/attention, object pointers).
SAM_DROP = re.compile(
    r"^(memory_.*|mask_downsample.*|object_pointer_proj.*|"
    r"temporal_positional_encoding_projection_layer.*|no_memory_positional_encoding|"
    r"no_object_pointer|occlusion_spatial_embedding_parameter)$"
)

SAM_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def resolve_sam(repo_or_path: str | Path) -> Path:
    """A local SAM 2.1 folder: the path itself or a hub snapshot of a repo id (only
    `SAM_FILES` are fetched). Raises WeightLoadError for a missing path or failed download."""
    path, remote = local_or_remote(repo_or_path)
    if not remote:
        return path
    return download(str(repo_or_path), list(SAM_FILES), what="SAM 2.1",
                    hint="; pass a local folder instead")


def load_sam(repo_or_path: str | Path, dtype: mx.Dtype | None = None) -> SamModel:
    """Load a SAM 2.1 image model from a transformers folder or hub repo id.

    dtype: None keeps float32 (SAM is small; masks are thresholded logits, so reduced
    precision is not the default). Raises WeightLoadError (no config/safetensors,
    missing, unexpected or mis-shaped keys).
    """
    folder = resolve_sam(repo_or_path)
    config = read_config(folder)
    if config.get("model_type") not in (None, "sam2", "sam2_video"):
        raise WeightLoadError(f"{folder}: model_type {config.get('model_type')!r} is not "
                              "a SAM 2 checkpoint (sam2)")
    model = SamModel(SamConfig.from_dict(config))
    tensors = {k: v for k, v in open_tensors(safetensors_files(folder)).items()
               if not SAM_DROP.match(k)}
    load_into(model, tensors, SAM_RULES, mx.float32 if dtype is None else dtype,
              name=f"SAM 2.1 ({folder})")
    model.eval()
    return model
