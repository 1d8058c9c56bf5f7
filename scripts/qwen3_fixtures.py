"""Qwen3 text encoder fixtures for FLUX.2 [klein] folders, built without torch.

- `QWEN3_PRESETS`: transformers `Qwen3Config` dicts. `tiny` (hidden 64, 28 layers so that
  klein's hidden-state indices 9/18/27 exist, vocab 640 >= the ids of the fixture
  tokenizer, `tokenizer_files.write_qwen3_tokenizer`) and `wide` (Qwen3-4B widths, 2
  layers: only for `out_layers` up to 2). The parity tests build transformers'
  `Qwen3ForCausalLM` from the same dicts.
- `write_qwen3_text_encoder(folder, cfg, seed, shard)`: a random full Qwen3 causal LM (every
  layer, the final norm, an untied lm_head unless `tie_word_embeddings`) written in
  transformers' layout (`config.json`, `model.safetensors` or two shards + index): what
  `mlx_edit.weights.qwen3.load_qwen3` reads from a diffusers klein `text_encoder/`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_mlx_checkpoint import random_params, write_weights  # noqa: E402

from mlx_edit.models.qwen3 import Qwen3Config, Qwen3TextEncoder  # noqa: E402

_COMMON = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_act="silu",
               rms_norm_eps=1e-6, rope_theta=1_000_000.0, attention_bias=False,
               max_position_embeddings=40960, bos_token_id=None, eos_token_id=602,
               pad_token_id=None)
QWEN3_PRESETS = {
    "tiny": dict(_COMMON, vocab_size=640, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=28, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, tie_word_embeddings=False),
    "wide": dict(_COMMON, vocab_size=640, hidden_size=2560, intermediate_size=9728,
                 num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, tie_word_embeddings=True),
}


def to_transformers(params: dict[str, np.ndarray], config: Qwen3Config) -> dict[str, np.ndarray]:
    """Our parameter names (a full encoder: every layer and the norm) -> transformers'
    `Qwen3ForCausalLM` names (the inverse of `mlx_edit.weights.qwen3.RULES`)."""
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    out = {}
    for name, value in params.items():
        head, _, leaf = name.rpartition(".")
        if head.endswith("self_attn.qkv_proj"):
            base = head[: -len("qkv_proj")]
            for x, part in zip("qkv", np.split(value, [q, q + kv], axis=0)):
                out[f"model.{base}{x}_proj.{leaf}"] = part
        elif head.endswith("mlp.gate_up_proj"):
            base = head[: -len("gate_up_proj")]
            for x, part in zip(("gate", "up"), np.split(value, 2, axis=0)):
                out[f"model.{base}{x}_proj.{leaf}"] = part
        else:
            out[f"model.{name}"] = value
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def write_qwen3_text_encoder(folder: str | Path, cfg: dict | None = None, seed: int = 0,
                             shard: bool = True) -> dict[str, np.ndarray]:
    """Write a random Qwen3 causal LM (`cfg`: a config.json dict, default preset `tiny`) to
    `folder` in transformers' layout (module doc); returns the tensors written, by
    transformers' names. Torch-free (MLX init under `mx.random.seed(seed)`)."""
    cfg = dict(QWEN3_PRESETS["tiny"] if cfg is None else cfg)
    config = Qwen3Config.from_dict({**cfg, "out_layers": [cfg["num_hidden_layers"]]})
    params = random_params(Qwen3TextEncoder, config, seed)
    tensors = to_transformers(params, config)
    if not cfg.get("tie_word_embeddings", False):
        rng = np.random.default_rng(seed + 1)
        shape = (cfg["vocab_size"], cfg["hidden_size"])
        tensors["lm_head.weight"] = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    folder = Path(folder)
    write_weights(folder, "model", tensors, shard)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return tensors
