"""Key maps and loaders for the text encoders: CLIP-L (`text_encoder/`) and T5 v1.1
(`text_encoder_2/`) in the transformers checkpoint layout that diffusers folders use.

CLIP checkpoints name their keys `text_model.embeddings...` (transformers 4 and the hub
files) or `embeddings...` (transformers 5 `save_pretrained`); the `text_model.` prefix is
stripped before the key map applies. Known non-weights are dropped by explicit tables:
CLIP's `embeddings.position_ids` buffer (older checkpoints) and T5's tied copy of the
embedding, `encoder.embed_tokens.weight`, when `shared.weight` is also present (alone,
it is loaded as the embedding). Everything else must match exactly (see
`mlx_edit.weights.core.load_into`). The loaders are entries of `weights/specs.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx

from mlx_edit.models.clip import CLIPTextModel
from mlx_edit.models.t5 import T5Encoder
from mlx_edit.weights import loader
from mlx_edit.weights.core import Rule, reading, rename

CLIP_STRIP_PREFIXES = ("text_model.",)

_CLIP_LAYER = "encoder.layers.{n}"
_CLIP_ATTN = _CLIP_LAYER + ".self_attn"

CLIP_TEXT_RULES: tuple[Rule, ...] = (
    rename("embeddings.token_embedding.weight", "embeddings.token_embedding.weight"),
    rename("embeddings.position_embedding.weight", "embeddings.position_embedding.weight"),
    *(
        Rule(
            f"{_CLIP_ATTN}.qkv_proj.{p}",
            tuple(f"{_CLIP_ATTN}.{x}_proj.{p}" for x in "qkv"),
            "concat",
        )
        for p in ("weight", "bias")
    ),
    *(
        rename(f"{_CLIP_LAYER}.{m}.{p}", f"{_CLIP_LAYER}.{m}.{p}")
        for m in ("self_attn.out_proj", "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")
        for p in ("weight", "bias")
    ),
    rename("final_layer_norm.weight", "final_layer_norm.weight"),
    rename("final_layer_norm.bias", "final_layer_norm.bias"),
)

# Buffers that are not weights (after the prefix strip): dropped, never loaded.
CLIP_TEXT_DROP: tuple[str, ...] = ("embeddings.position_ids",)

_T5_BLOCK = "encoder.block.{n}.layer"

T5_RULES: tuple[Rule, ...] = (
    rename("shared.weight", "shared.weight"),
    # a checkpoint holding only the tied copy: it is the embedding
    rename("encoder.embed_tokens.weight", "shared.weight"),
    rename(
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "relative_attention_bias.weight",
    ),
    Rule(
        "blocks.{n}.attn.qkv.weight",
        tuple(f"{_T5_BLOCK}.0.SelfAttention.{x}.weight" for x in "qkv"),
        "concat",
    ),
    rename(f"{_T5_BLOCK}.0.SelfAttention.o.weight", "blocks.{n}.attn.o.weight"),
    rename(f"{_T5_BLOCK}.0.layer_norm.weight", "blocks.{n}.attn_norm.weight"),
    rename(f"{_T5_BLOCK}.1.layer_norm.weight", "blocks.{n}.ff_norm.weight"),
    *(
        rename(f"{_T5_BLOCK}.1.DenseReluDense.{w}.weight", f"blocks.{{n}}.ff.{w}.weight")
        for w in ("wi_0", "wi_1", "wi", "wo")
    ),
    rename("encoder.final_layer_norm.weight", "final_norm.weight"),
)

# key -> the key it duplicates: dropped when that key is present too (tied weights).
T5_DUPLICATES: Mapping[str, str] = {"encoder.embed_tokens.weight": "shared.weight"}


def load_clip_text(folder: str | Path, dtype: mx.Dtype | None = None) -> CLIPTextModel:
    """Load a CLIP text tower from a diffusers `text_encoder/` folder (or any transformers
    CLIPTextModel folder): `config.json` plus one or sharded `*.safetensors`.

    dtype: parameter dtype; None means `default_dtype()` (float32 on the CPU backend).
    Raises WeightLoadError on a missing config or files, or missing, unexpected or
    mis-shaped tensors (e.g. a `CLIPTextModelWithProjection` checkpoint).
    """
    return loader.load("clip_text", folder, dtype)


def load_t5(folder: str | Path, dtype: mx.Dtype | None = None,
            quantize: int | None = None) -> T5Encoder:
    """Load a T5 encoder from a diffusers `text_encoder_2/` folder (transformers
    T5EncoderModel layout; sharded via `model.safetensors.index.json` or single-file).

    dtype: parameter dtype; None means `default_dtype()` (float32 on the CPU backend).
    The model is built lazily, so peak memory is the weights plus about one tensor.
    quantize: 4 or 8 quantizes at load by the package policy (`quantize_t5`), layer by
    layer (full precision never resident beyond one layer); an mlx-edit folder already
    quantized is kept as stored (with a warning if its bits differ).
    Raises WeightLoadError on a missing config or files, or missing, unexpected or
    mis-shaped tensors (e.g. decoder weights of a full T5 checkpoint).
    """
    return loader.load("t5", folder, dtype, quantize=quantize)


def load_text_tools(root: Path):
    """The scheduler config and the CLIP/T5 tokenizers of the model folder `root`, each
    tried on a short prompt so that damaged files fail now (WeightLoadError naming the
    folder), not after the first edit's work. Returns (SchedulerConfig, ClipTokenizer,
    T5Tokenizer)."""
    from mlx_edit.weights.sources import component_dir

    return read_text_tools(*(component_dir(root, c)
                             for c in ("scheduler", "tokenizer", "tokenizer_2")))


def read_text_tools(scheduler: Path | None, tokenizer: Path | None,
                    tokenizer_2: Path | None):
    """`load_text_tools` on separate folders; a None folder is skipped (None returned)."""
    from mlx_edit.sampling.sampler import load_scheduler_config
    from mlx_edit.editing.text import ClipTokenizer, T5Tokenizer

    out = [None, None, None]
    if scheduler is not None:
        with reading("scheduler config", scheduler):
            out[0] = load_scheduler_config(scheduler)
    if tokenizer is not None:
        with reading("CLIP tokenizer files", tokenizer):
            out[1] = ClipTokenizer.from_folder(tokenizer)
            out[1]("a photo")
    if tokenizer_2 is not None:
        with reading("T5 tokenizer files", tokenizer_2):
            out[2] = T5Tokenizer.from_folder(tokenizer_2)
            out[2]("a photo", max_length=8)
    return tuple(out)
