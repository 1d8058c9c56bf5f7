"""Parity of the MLX CLIP text tower and T5 encoder with transformers, and strict loading.

Reference models are built by transformers from configs with torch.manual_seed, saved
with `save_pretrained` (T5 wide: sharded, index exercised) and loaded by our loaders.
Metric: max|ours - ref| / max|ref| in float32, tolerance 1e-4.
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import import_script
from safetensors.numpy import load_file, save_file

from mlx_edit.models.clip import CLIPTextConfig
from mlx_edit.models.t5 import T5Config, relative_position_bucket
from mlx_edit.weights.core import WeightLoadError, safetensors_files
from mlx_edit.weights.text import load_clip_text, load_t5

try:  # the parity extra: only the parity tests use torch / transformers
    import torch
    from transformers import CLIPTextConfig as HFCLIPTextConfig
    from transformers import CLIPTextModel as HFCLIPTextModel
    from transformers import T5Config as HFT5Config
    from transformers import T5EncoderModel as HFT5EncoderModel
    from transformers.initialization import no_init_weights
except ImportError:
    torch = None

TOL = 1e-4
BOS, EOS = 49406, 49407

CLIP_TINY = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
    vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
    eos_token_id=EOS, bos_token_id=BOS, pad_token_id=EOS,
)  # fmt: skip
CLIP_WIDE = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, eos_token_id=EOS, bos_token_id=BOS, pad_token_id=EOS,
)  # fmt: skip
T5_TINY = dict(
    d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
    relative_attention_max_distance=16, vocab_size=1000, feed_forward_proj="gated-gelu",
)  # fmt: skip
T5_WIDE = dict(
    d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, vocab_size=32128,
    feed_forward_proj="gated-gelu",
)  # fmt: skip


def rel_err(ours: mx.array, ref: torch.Tensor) -> float:
    ref = ref.detach().float().numpy()
    return float(np.abs(np.array(ours, dtype=np.float32) - ref).max() / np.abs(ref).max())


def clip_ids(seed: int, lengths: list[int | None], pads: list[int], n: int = 77) -> np.ndarray:
    """Rows like tokenized prompts: bos, `length` words, eos, then the row's pad id.

    A `None` length gives a row of plain words, without bos or eos: there the two pooling
    rules differ (legacy: the largest id; otherwise: position 0).
    """
    rng = np.random.default_rng(seed)
    ids = np.empty((len(lengths), n), np.int64)
    for row, (length, pad) in enumerate(zip(lengths, pads, strict=True)):
        if length is None:
            ids[row] = rng.integers(0, BOS, n)
            continue
        ids[row] = pad
        ids[row, 0] = BOS
        ids[row, 1 : 1 + length] = rng.integers(0, BOS, length)
        ids[row, 1 + length] = EOS
    return ids


def t5_ids(seed: int, lengths: list[int], vocab: int, n: int) -> np.ndarray:
    """Rows like T5 tokenization: words (>= 2), eos 1, then pad 0 up to n."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), n), np.int64)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(2, vocab, length)
        ids[row, length] = 1
    return ids


def save_hf(model, folder: Path, shard: str = "10GB") -> Path:
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=shard)
    return folder


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a single-file folder to `dst` with its state dict changed by `edit(sd)`."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    sd = load_file(str(src / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"))
    return dst


def fast_init(model, seed: int):
    """Seeded normal weights scaled like a trained net (unit-scale activations), written
    directly: transformers' own init of the wide models costs ~10 s of the budget."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # LayerNorm / RMSNorm weight and bias
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1, generator=g)
            elif name.endswith("bias") and p.ndim == 1:
                p.normal_(0.0, 0.02, generator=g)
            elif "embed" in name or name == "shared.weight" or "relative_attention" in name:
                p.normal_(0.0, 1.0, generator=g)
            else:  # Linear (out, in); T5 scores are unscaled, so q carries 1/sqrt(d_kv)
                std = p.shape[1] ** -0.5
                if name.endswith("SelfAttention.q.weight"):
                    std *= model.config.d_kv**-0.5
                p.normal_(0.0, std, generator=g)
    return model.eval()


def build(cls, config, seed: int, fast: bool = False):
    """A transformers model from `config`, seeded; `fast`: skip its init, use fast_init."""
    torch.manual_seed(seed)
    if not fast:
        return cls(config).eval()
    with no_init_weights():
        model = cls(config)
    model.tie_weights()  # skipped by no_init_weights: T5's embed_tokens is shared.weight
    return fast_init(model, seed)


def build_clip(cfg: dict, seed: int = 0, fast: bool = False):
    return build(HFCLIPTextModel, HFCLIPTextConfig(**cfg), seed, fast)


def build_t5(cfg: dict, seed: int = 0, fast: bool = False):
    return build(HFT5EncoderModel, HFT5Config(**cfg), seed, fast)


def clip_parity(ref_model, folder: Path, ids: np.ndarray) -> tuple[float, float]:
    with torch.no_grad():
        ref = ref_model(input_ids=torch.from_numpy(ids))
    ours = load_clip_text(folder)
    hidden, pooled = ours(mx.array(ids.astype(np.int32)))
    return rel_err(hidden, ref.last_hidden_state), rel_err(pooled, ref.pooler_output)


@pytest.fixture(scope="module")
def clip_tiny(tmp_path_factory):
    model = build_clip(CLIP_TINY)
    return model, save_hf(model, tmp_path_factory.mktemp("clip_tiny"))


@pytest.fixture(scope="module")
def t5_tiny(tmp_path_factory):
    model = build_t5(T5_TINY)
    return model, save_hf(model, tmp_path_factory.mktemp("t5_tiny"))


@pytest.fixture(scope="module")
def clip_tiny_np(tmp_path_factory):
    """Torch-free: CLIP_TINY built by mlx-edit (scripts/make_mlx_checkpoint.py), saved in
    transformers' single-file layout."""
    root = tmp_path_factory.mktemp("clip_tiny_np")
    import_script("make_mlx_checkpoint").write_component(root, "text_encoder", CLIP_TINY, 0)
    return None, root / "text_encoder"


@pytest.fixture(scope="module")
def t5_tiny_np(tmp_path_factory):
    """Torch-free: T5_TINY built by mlx-edit, transformers' single-file layout."""
    root = tmp_path_factory.mktemp("t5_tiny_np")
    import_script("make_mlx_checkpoint").write_component(root, "text_encoder_2", T5_TINY, 0,
                                                         shard=False)
    return None, root / "text_encoder_2"


# ---------------------------------------------------------------- CLIP parity


@pytest.mark.parity
@pytest.mark.parametrize("layout", ["transformers5", "text_model_prefix"])
def test_clip_tiny_parity(clip_tiny, tmp_path, layout):
    model, folder = clip_tiny
    if layout == "text_model_prefix":
        # hub-style names plus the legacy position_ids buffer (dropped by rule)
        def edit(sd):
            for k in list(sd):
                sd["text_model." + k] = sd.pop(k)
            sd["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]

        folder = rewrite(folder, tmp_path / "prefixed", edit)
    ids = clip_ids(1, [5, 40, None], [EOS, 0, 0])  # row 1 pads with 0; row 2 has no eos
    e_hidden, e_pooled = clip_parity(model, folder, ids)
    print(f"clip tiny {layout}: hidden {e_hidden:.2e} pooled {e_pooled:.2e}")
    assert e_hidden <= TOL and e_pooled <= TOL


@pytest.mark.parity
@pytest.mark.parametrize("act", ["gelu"])
def test_clip_tiny_other_activation(tmp_path, act):
    model = build_clip({**CLIP_TINY, "hidden_act": act}, seed=3)
    ids = clip_ids(2, [0, 75], [EOS, EOS])  # empty prompt and a full one
    e_hidden, e_pooled = clip_parity(model, save_hf(model, tmp_path / "m"), ids)
    print(f"clip tiny {act}: hidden {e_hidden:.2e} pooled {e_pooled:.2e}")
    assert e_hidden <= TOL and e_pooled <= TOL


@pytest.mark.parity
def test_clip_tiny_legacy_eos(tmp_path):
    # eos_token_id 2 (openai/clip-vit-large-patch14's config): pooled at argmax(ids)
    model = build_clip({**CLIP_TINY, "eos_token_id": 2, "bos_token_id": 0, "pad_token_id": 1}, 4)
    # pads equal the max id: the first one wins; the last row has no bos/eos
    ids = clip_ids(5, [3, 20, None], [EOS, EOS, 0])
    e_hidden, e_pooled = clip_parity(model, save_hf(model, tmp_path / "m"), ids)
    print(f"clip tiny legacy eos: hidden {e_hidden:.2e} pooled {e_pooled:.2e}")
    assert e_hidden <= TOL and e_pooled <= TOL


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.parametrize("eos", [EOS, 2])
def test_clip_wide_parity(tmp_path, eos):
    cfg = {**CLIP_WIDE, "eos_token_id": eos}
    if eos == 2:
        cfg.update(bos_token_id=0, pad_token_id=1)  # the hub config of CLIP-L
    model = build_clip(cfg, seed=5, fast=True)
    ids = clip_ids(6, [7, 30, None], [EOS, EOS, 0])  # last row: the rules differ
    e_hidden, e_pooled = clip_parity(model, save_hf(model, tmp_path / "m"), ids)
    print(f"clip wide eos={eos}: hidden {e_hidden:.2e} pooled {e_pooled:.2e}")
    assert e_hidden <= TOL and e_pooled <= TOL


def test_clip_rejects_long_input(clip_tiny_np):
    ours = load_clip_text(clip_tiny_np[1])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(mx.zeros((1, 78), dtype=mx.int32))


# ---------------------------------------------------------------- T5 parity


def t5_parity(ref_model, folder: Path, ids: np.ndarray) -> float:
    with torch.no_grad():
        ref = ref_model(input_ids=torch.from_numpy(ids)).last_hidden_state
    ours = load_t5(folder)
    return rel_err(ours(mx.array(ids.astype(np.int32))), ref)


@pytest.mark.parity
@pytest.mark.parametrize("embedding", ["shared", "shared+tied_copy", "tied_copy_only"])
def test_t5_tiny_parity_512(t5_tiny, tmp_path, embedding):
    model, folder = t5_tiny

    def edit(sd):  # the tied copy beside shared.weight, or in its place
        copy = sd["shared.weight"] if embedding == "shared+tied_copy" else sd.pop("shared.weight")
        sd["encoder.embed_tokens.weight"] = copy

    if embedding != "shared":
        folder = rewrite(folder, tmp_path / "e", edit)
    ids = t5_ids(7, [12, 300], T5_TINY["vocab_size"], 512)
    err = t5_parity(model, folder, ids)
    print(f"t5 tiny 512 tokens ({embedding}): {err:.2e}")
    assert err <= TOL


@pytest.mark.parity
@pytest.mark.parametrize("proj", ["relu", "gated-relu", "gated-silu"])
def test_t5_tiny_other_ff(tmp_path, proj):
    model = build_t5({**T5_TINY, "feed_forward_proj": proj}, seed=8)
    ids = t5_ids(9, [5, 30], T5_TINY["vocab_size"], 40)
    err = t5_parity(model, save_hf(model, tmp_path / "m"), ids)
    print(f"t5 tiny {proj}: {err:.2e}")
    assert err <= TOL


@pytest.mark.parity
@pytest.mark.slow
def test_t5_wide_parity_sharded(tmp_path):
    model = build_t5(T5_WIDE, seed=10, fast=True)
    ids = t5_ids(11, [20, 50], T5_WIDE["vocab_size"], 64)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).last_hidden_state
    folder = save_hf(model, tmp_path / "m", shard="600MB")
    del model  # keep peak memory to about two copies of the 2 GB of weights
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(safetensors_files(folder)) > 1
    ours = load_t5(folder)
    err = rel_err(ours(mx.array(ids.astype(np.int32))), ref)
    print(f"t5 wide (4096, 2 layers) 64 tokens: {err:.2e}")
    assert err <= TOL


@pytest.mark.parity
@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 16)])
def test_relative_position_bucket_matches(buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-700, 701)
    ref = T5Attention._relative_position_bucket(
        torch.from_numpy(rel), bidirectional=True, num_buckets=buckets, max_distance=max_distance
    ).numpy()
    ours = np.array(relative_position_bucket(mx.array(rel.astype(np.int32)), buckets, max_distance))
    np.testing.assert_array_equal(ours, ref)


# ---------------------------------------------------------------- configs


def test_configs_from_dict_ignore_unknown():
    c = CLIPTextConfig.from_dict({**CLIP_TINY, "projection_dim": 512, "model_type": "x"})
    assert (c.hidden_size, c.eos_token_id, c.hidden_act) == (32, EOS, "quick_gelu")
    t = T5Config.from_dict({**T5_TINY, "dense_act_fn": "relu", "is_decoder": False})
    assert (t.d_model, t.dense_act_fn, t.is_gated_act) == (32, "gelu_new", True)
    assert T5Config.from_dict({"feed_forward_proj": "relu"}).is_gated_act is False


# ---------------------------------------------------------------- strict loading


CLIP_BROKEN = {
    "missing": (lambda sd: sd.pop("final_layer_norm.bias"), r"missing: .*final_layer_norm\.bias"),
    "extra": (
        lambda sd: sd.update({"encoder.layers.0.extra.weight": np.zeros(3, np.float32)}),
        r"unexpected: .*encoder\.layers\.0\.extra\.weight",
    ),
    "unknown_buffer": (
        lambda sd: sd.update({"embeddings.position_idz": np.zeros(3, np.int64)}),
        r"unexpected: .*embeddings\.position_idz",
    ),
    "shape": (
        lambda sd: sd.update({"final_layer_norm.weight": np.ones(31, np.float32)}),
        r"mis-shaped: .*final_layer_norm\.weight: checkpoint \(31,\) vs model \(32,\)",
    ),
    "partial_qkv": (
        lambda sd: sd.pop("encoder.layers.1.self_attn.q_proj.weight"),
        r"missing: .*encoder\.layers\.1\.self_attn\.qkv_proj\.weight.*"
        r"unexpected: .*encoder\.layers\.1\.self_attn\.k_proj\.weight",
    ),
}


@pytest.mark.parametrize("case", sorted(CLIP_BROKEN))
def test_clip_strict_loading(clip_tiny_np, tmp_path, case):
    edit, pattern = CLIP_BROKEN[case]
    folder = rewrite(clip_tiny_np[1], tmp_path / "broken", edit)
    with pytest.raises(WeightLoadError, match=pattern):
        load_clip_text(folder)


T5_BROKEN = {
    "missing": (
        lambda sd: sd.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight"),
        r"missing: .*blocks\.1\.ff\.wo\.weight",
    ),
    "missing_bias_table": (
        lambda sd: sd.pop("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
        r"missing: .*relative_attention_bias\.weight",
    ),
    "extra": (
        lambda sd: sd.update(
            {"decoder.block.0.layer.0.SelfAttention.q.weight": np.zeros((32, 32), np.float32)}
        ),
        r"unexpected: .*decoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight",
    ),
    "shape": (
        lambda sd: sd.update({"shared.weight": np.zeros((999, 32), np.float32)}),
        r"mis-shaped: .*shared\.weight: checkpoint \(999, 32\) vs model \(1000, 32\)",
    ),
}


@pytest.mark.parametrize("case", sorted(T5_BROKEN))
def test_t5_strict_loading(t5_tiny_np, tmp_path, case):
    edit, pattern = T5_BROKEN[case]
    folder = rewrite(t5_tiny_np[1], tmp_path / "broken", edit)
    with pytest.raises(WeightLoadError, match=pattern):
        load_t5(folder)


def test_t5_missing_shard(tmp_path):
    import_script("make_mlx_checkpoint").write_component(tmp_path, "text_encoder_2", T5_TINY, 0,
                                                         shard=True)
    folder = tmp_path / "text_encoder_2"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[0]
    (folder / victim).unlink()
    with pytest.raises(WeightLoadError, match="missing shards"):
        load_t5(folder)
