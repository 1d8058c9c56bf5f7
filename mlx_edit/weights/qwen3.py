"""Key map and loader of the Qwen3 text encoder (FLUX.2 [klein]'s `text_encoder/`: a
transformers `Qwen3ForCausalLM` folder, `config.json` plus one or sharded safetensors
with `model.safetensors.index.json`).

The `model.` prefix is stripped when the files are opened. Tensors the truncated encoder
does not use are dropped by name once the config is known (`unused`): decoder layers
from `layers_run` on, the final norm unless its state is requested, and `lm_head.weight`
(absent when the embeddings are tied, as in Qwen3-4B). Everything else must match
exactly (see `mlx_edit.weights.core.load_into`). The loader is the `qwen3` entry of
`weights/specs.py`.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx

from mlx_edit.models.qwen3 import Qwen3Config, Qwen3TextEncoder
from mlx_edit.weights import loader
from mlx_edit.weights.core import Rule, rename
from mlx_edit.weights.quantize import model_nbytes, quantize_component

PREFIXES = ("model.",)

_ATTN = "layers.{n}.self_attn"
_MLP = "layers.{n}.mlp"

RULES: tuple[Rule, ...] = (
    rename("embed_tokens.weight", "embed_tokens.weight"),
    *(Rule(f"{_ATTN}.qkv_proj.{p}", tuple(f"{_ATTN}.{x}_proj.{p}" for x in "qkv"), "concat")
      for p in ("weight", "bias")),
    Rule(f"{_MLP}.gate_up_proj.weight", (f"{_MLP}.gate_proj.weight", f"{_MLP}.up_proj.weight"),
         "concat"),
    *(rename(f"layers.{{n}}.{m}.{p}", f"layers.{{n}}.{m}.{p}")
      for m in ("self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm", "mlp.down_proj",
                "input_layernorm", "post_attention_layernorm")
      for p in ("weight", "bias")),
    rename("norm.weight", "norm.weight"),
)

_LAYER = re.compile(r"layers\.(\d+)\.")


def unused(config: Qwen3Config, name: str) -> bool:
    """Whether checkpoint tensor `name` (prefix stripped) is one the encoder built from
    `config` does not use: lm_head, the final norm when not requested, later layers."""
    if name.startswith("lm_head."):
        return True
    if name == "norm.weight":
        return not config.final_norm
    m = _LAYER.match(name)
    return m is not None and int(m.group(1)) >= config.layers_run


def load_qwen3(folder: str | Path, dtype: mx.Dtype | None = None, *,
               out_layers: tuple[int, ...] | None = None,
               quantize: int | None = None) -> Qwen3TextEncoder:
    """Load the Qwen3 text encoder from a diffusers klein `text_encoder/` folder (or any
    transformers Qwen3 causal-LM folder, or an `mlx-edit convert` folder), strictly.

    dtype: parameter dtype; None means `default_dtype()` (float32 on the CPU backend).
    out_layers: the `hidden_states` indices returned (None: the folder's `out_layers`,
    else klein's (9, 18, 27)); only the layers up to the highest one are read.
    quantize: 4 or 8 quantizes the attention and MLP linears at load (policy "qwen3":
    embeddings and norms stay in full precision), layer by layer.
    Raises WeightLoadError on a missing config or files, missing, unexpected or
    mis-shaped tensors (e.g. a checkpoint with fewer layers than its config says), or an
    unsupported config (sliding window, RoPE scaling, out_layers past the last layer).
    """
    config = None if out_layers is None else {"out_layers": list(out_layers)}
    return loader.load("qwen3", folder, dtype, config=config, quantize=quantize)


def qwen3_nbytes(config: Qwen3Config | dict | None = None, dtype: mx.Dtype = mx.bfloat16,
                 bits: int | None = None) -> int:
    """Parameter bytes of the encoder `load_qwen3` builds from `config` (a Qwen3Config or
    a config.json dict; None: Qwen3-4B with klein's out layers) at `dtype`, quantized at
    `bits` by the "qwen3" policy when given. Only shapes are read: nothing is allocated."""
    if not isinstance(config, Qwen3Config):
        config = Qwen3Config.from_dict(dict(config or {}))
    model = Qwen3TextEncoder(config)
    model.set_dtype(dtype)
    if bits:
        quantize_component(model, "qwen3", bits)
    return model_nbytes(model, dtype)
