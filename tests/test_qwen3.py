"""FLUX.2 [klein]'s text side: the Qwen3 encoder, its loading, tokenizer and chat template.

Parity (marker `parity`, float32): transformers' `Qwen3ForCausalLM` built from the tiny
preset of scripts/qwen3_fixtures.py (28 layers, so hidden_states 9/18/27 exist), saved by
`save_pretrained` in shards, loaded by `load_qwen3`; diffusers'
`Flux2KleinPipeline._get_qwen3_prompt_embeds` called as is with transformers' tokenizer of
the fixture folder (scripts/tokenizer_files.py). Metric: max|ours - ref| / max|ref|,
tolerance 1e-4. The torch-free tests load a folder written by scripts/qwen3_fixtures.py.
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)

import json
import shutil
import warnings

import mlx.core as mx
import numpy as np
import pytest
from conftest import import_script

from mlx_edit.models.qwen3 import Qwen3Config, Qwen3TextEncoder
from mlx_edit.editing.text import PromptTruncatedWarning
from mlx_edit.editing.text_qwen3 import Qwen3Tokenizer, encode_qwen3_prompt, qwen3_text_ids
from mlx_edit.weights.core import WeightLoadError
from mlx_edit.weights.qwen3 import load_qwen3, qwen3_nbytes
from mlx_edit.weights.quantize import model_nbytes

TOL = 1e-4
PROMPTS = [
    "a cat on a red sofa",
    "Zürich — 東京の写真 😀 “quoted” don't\n\ttabs  and  spaces ",
    "",
    "make it winter " * 40,  # over-long at the lengths used below: truncated
    "<|im_end|> a literal control token <think>",
]


def rel_err(ours, ref) -> float:
    ref = np.asarray(ref, dtype=np.float32)
    return float(np.abs(np.array(ours, dtype=np.float32) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def fixtures():
    return import_script("qwen3_fixtures")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_tok")
    import_script("tokenizer_files").write_qwen3_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def hf_qwen3(tmp_path_factory, fixtures):
    """(transformers Qwen3ForCausalLM, its save_pretrained folder in several shards)."""
    torch = pytest.importorskip("torch")
    from transformers import Qwen3Config as HFQwen3Config
    from transformers import Qwen3ForCausalLM

    cfg = {k: v for k, v in fixtures.QWEN3_PRESETS["tiny"].items() if k != "architectures"}
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(HFQwen3Config(**cfg)).eval()
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    folder = tmp_path_factory.mktemp("qwen3_hf")
    model.save_pretrained(folder, max_shard_size="200KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return model, folder


@pytest.fixture(scope="module")
def np_folder(tmp_path_factory, fixtures):
    """Torch-free: the tiny preset written by scripts/qwen3_fixtures.py (2 shards)."""
    folder = tmp_path_factory.mktemp("qwen3_np") / "text_encoder"
    fixtures.write_qwen3_text_encoder(folder, seed=0)
    return folder


# ---------------------------------------------------------------- parity


@pytest.mark.parity
@pytest.mark.parametrize("out_layers", [(9, 18, 27), (0, 1, 28)])
def test_hidden_states_parity(hf_qwen3, out_layers):
    """Each requested hidden state, with right and left padding in the batch; index 28 (=
    num_hidden_layers) is the final-normed state, index 0 the embedding."""
    import torch

    model, folder = hf_qwen3
    rng = np.random.default_rng(0)
    n = 40
    ids = rng.integers(0, 640, (3, n))
    mask = np.ones((3, n), np.int64)
    mask[1, 25:] = 0  # right padding
    mask[2, :7] = 0  # left padding: queries with no key (torch SDPA gives zeros)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    output_hidden_states=True, use_cache=False).hidden_states
    ours = load_qwen3(folder, out_layers=out_layers)
    assert len(ours.layers) == max(out_layers)
    states = ours(mx.array(ids.astype(np.int32)), mx.array(mask.astype(np.int32)))
    for k, state in zip(out_layers, states, strict=True):
        assert rel_err(state, ref[k].numpy()) <= TOL, k


@pytest.mark.parity
@pytest.mark.parametrize("max_len, out_layers", [(512, (9, 18, 27)), (24, (2, 27, 28))])
def test_prompt_embeds_parity(hf_qwen3, tokenizer_dir, max_len, out_layers):
    """encode_qwen3_prompt against diffusers' own `_get_qwen3_prompt_embeds` (and its
    `_prepare_text_ids`), default and custom `text_encoder_out_layers`, with prompts that
    are unicode, empty and over-long (truncated at 24 tokens)."""
    import torch
    from diffusers import Flux2KleinPipeline
    from transformers import AutoTokenizer

    model, folder = hf_qwen3
    hf_tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompts = PROMPTS if max_len < 512 else PROMPTS[:2]  # CPU attention over 512 is slow
    with torch.no_grad():
        ref = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            model, hf_tok, prompts, max_sequence_length=max_len,
            hidden_states_layers=out_layers)
    ref_ids = Flux2KleinPipeline._prepare_text_ids(ref)
    encoder = load_qwen3(folder, out_layers=out_layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        embeds, text_ids = encode_qwen3_prompt(encoder, Qwen3Tokenizer.from_folder(tokenizer_dir),
                                               prompts, max_sequence_length=max_len)
    assert embeds.shape == tuple(ref.shape) == (len(prompts), max_len, 3 * 64)
    assert rel_err(embeds, ref.numpy()) <= TOL
    np.testing.assert_array_equal(np.array(text_ids), ref_ids.numpy())


@pytest.mark.parity
def test_tokenization_parity(tokenizer_dir, tmp_path):
    """Rendered text, ids and mask equal transformers' (AutoTokenizer -> Qwen2Tokenizer,
    as the pipeline calls it), for the hub-style folder and for transformers 5's
    `save_pretrained` copy (template moved to chat_template.jinja); left padding too."""
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    hf_tok.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "chat_template.jinja").is_file()
    left = tmp_path / "left"
    shutil.copytree(tokenizer_dir, left)
    cfg = json.loads((left / "tokenizer_config.json").read_text())
    (left / "tokenizer_config.json").write_text(json.dumps({**cfg, "padding_side": "left"}))
    for folder in (tokenizer_dir, tmp_path / "saved", left):
        ref_tok, ours = AutoTokenizer.from_pretrained(folder), Qwen3Tokenizer.from_folder(folder)
        for prompt in PROMPTS:
            text = ref_tok.apply_chat_template([{"role": "user", "content": prompt}],
                                               tokenize=False, add_generation_prompt=True,
                                               enable_thinking=False)
            assert ours.render(prompt) == text
            ref = ref_tok(text, padding="max_length", truncation=True, max_length=48)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PromptTruncatedWarning)
                ids, mask = ours(prompt, 48)
            np.testing.assert_array_equal(ids[0], ref["input_ids"])
            np.testing.assert_array_equal(mask[0], ref["attention_mask"])


@pytest.mark.parity
def test_chat_template_environment_parity():
    """A template using what the real Qwen3 template uses (plain block tags whose newlines
    trim_blocks/lstrip_blocks remove, namespace, loop controls, tojson, string tests)
    renders as transformers' renderer does."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from mlx_edit.editing.text_qwen3 import compile_chat_template

    template = (
        "{% set ns = namespace(n=0) %}\n"
        "{% for m in messages %}\n"
        "  {% if m.content is string and m.content.startswith('skip') %}{% continue %}{% endif %}\n"
        "  {% set ns.n = ns.n + 1 %}\n"
        "<|im_start|>{{ m.role }}\n{{ m.content | trim }}{{ {'k': 'é'} | tojson }}<|im_end|>\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}<|im_start|>assistant {{ ns.n }}\n{% endif %}\n"
        "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
        "{% endif %}"
    )
    messages = [{"role": "user", "content": "  héllo  "}, {"role": "user", "content": "skip me"}]
    ref = render_jinja_template([messages], chat_template=template, add_generation_prompt=True,
                                enable_thinking=False)[0][0]
    ours = compile_chat_template(template).render(messages=messages, tools=None, documents=None,
                                                  add_generation_prompt=True,
                                                  enable_thinking=False)
    assert ours == ref


# ---------------------------------------------------------------- torch-free


def test_load_and_encode_torch_free(np_folder, tokenizer_dir):
    """A folder written by our own code: strict load (lm_head, the final norm and layer 27
    dropped), embeddings of the right shape, real tokens independent of the padding
    length (causal + key mask), text ids as (0, 0, 0, l)."""
    encoder = load_qwen3(np_folder)
    assert len(encoder.layers) == 27 and "norm" not in encoder
    tok = Qwen3Tokenizer.from_folder(tokenizer_dir)
    prompts = PROMPTS[:2]
    embeds, ids = encode_qwen3_prompt(encoder, tok, prompts)
    assert embeds.shape == (2, 512, 192) and embeds.dtype == mx.float32
    assert np.isfinite(np.array(embeds)).all()
    np.testing.assert_array_equal(np.array(ids[1, :, 3]), np.arange(512))
    assert not np.array(ids[..., :3]).any()
    short, _ = encode_qwen3_prompt(encoder, tok, prompts, max_sequence_length=64)
    _, mask = tok(prompts, 64)
    for row in range(2):
        real = mask[row].astype(bool)
        np.testing.assert_allclose(np.array(short[row])[real], np.array(embeds[row, :64])[real],
                                   rtol=1e-5, atol=1e-6)


def test_strict_loading(np_folder, fixtures, tmp_path):
    """Too few layers for the out layers, or a stray tensor: one WeightLoadError naming it;
    a tied checkpoint (no lm_head) loads."""
    cfg = dict(fixtures.QWEN3_PRESETS["tiny"], num_hidden_layers=20)
    short = tmp_path / "short"
    fixtures.write_qwen3_text_encoder(short, cfg, shard=False)
    with pytest.raises(WeightLoadError, match=r"out_layers \(9, 18, 27\) .* in 0\.\.20"):
        load_qwen3(short)
    assert len(load_qwen3(short, out_layers=(5, 20)).layers) == 20
    (short / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 28}))
    with pytest.raises(WeightLoadError, match=r"56 missing: layers\.20\."):
        load_qwen3(short)  # a config claiming more layers than the files hold
    stray = tmp_path / "stray"
    shutil.copytree(np_folder, stray)
    from safetensors.numpy import save_file
    save_file({"model.extra.weight": np.zeros(3, np.float32)}, str(stray / "extra.safetensors"))
    (stray / "model.safetensors.index.json").unlink()
    with pytest.raises(WeightLoadError, match=r"unexpected: extra\.weight"):
        load_qwen3(stray)
    tied = dict(fixtures.QWEN3_PRESETS["tiny"], tie_word_embeddings=True)
    assert "lm_head.weight" not in fixtures.write_qwen3_text_encoder(tmp_path / "tied", tied)
    load_qwen3(tmp_path / "tied")


def test_bad_config_refused(np_folder, tmp_path):
    folder = tmp_path / "te"
    shutil.copytree(np_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "use_sliding_window": True}))
    with pytest.raises(WeightLoadError, match="sliding-window"):
        load_qwen3(folder)
    with pytest.raises(ValueError, match="out_layers"):
        Qwen3Config(num_hidden_layers=28, out_layers=(9, 29))


def test_tokenizer_errors(tokenizer_dir, tmp_path):
    """Missing or damaged files: one WeightLoadError naming the folder; truncation warns."""
    with pytest.raises(WeightLoadError, match="no Qwen3 tokenizer"):
        Qwen3Tokenizer.from_folder(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(tokenizer_dir, broken)
    (broken / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(WeightLoadError, match="cannot read the Qwen3 tokenizer"):
        Qwen3Tokenizer.from_folder(broken)
    tok = Qwen3Tokenizer.from_folder(tokenizer_dir)
    with pytest.warns(PromptTruncatedWarning, match="Qwen3 prompt truncated") as caught:
        ids, mask = tok(PROMPTS[3], 16)
    assert ids.shape == mask.shape == (1, 16) and mask.all()
    w = caught[0].message
    assert w.limit == 16 and tok.count_tokens(PROMPTS[3]) == 16 + w.dropped


def test_text_ids():
    ids = np.array(qwen3_text_ids(2, 5))
    assert ids.shape == (2, 5, 4) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids[1], [[0, 0, 0, i] for i in range(5)])


def test_parameter_bytes(np_folder, fixtures):
    """qwen3_nbytes equals the loaded encoder's bytes, float and quantized."""
    cfg = fixtures.QWEN3_PRESETS["tiny"]
    assert qwen3_nbytes(cfg, mx.float32) == model_nbytes(load_qwen3(np_folder))
    assert qwen3_nbytes(cfg, mx.float32, 8) == model_nbytes(load_qwen3(np_folder, quantize=8))
    full = Qwen3TextEncoder(Qwen3Config.from_dict({**cfg, "out_layers": [28]}))
    assert qwen3_nbytes(cfg, mx.float32) < model_nbytes(full)


@pytest.mark.parity
@pytest.mark.slow
def test_prompt_embeds_parity_wide(fixtures, tokenizer_dir, tmp_path):
    """Qwen3-4B widths (hidden 2560, 32/8 heads of 128, MLP 9728), 2 layers with tied
    embeddings: diffusers' embeddings of hidden states (0, 1, 2), 2 the final-normed one."""
    torch = pytest.importorskip("torch")
    from diffusers import Flux2KleinPipeline
    from transformers import AutoTokenizer
    from transformers import Qwen3Config as HFQwen3Config
    from transformers import Qwen3ForCausalLM
    from transformers.initialization import no_init_weights

    cfg = {k: v for k, v in fixtures.QWEN3_PRESETS["wide"].items() if k != "architectures"}
    g = torch.Generator().manual_seed(0)
    with no_init_weights():
        model = Qwen3ForCausalLM(HFQwen3Config(**cfg)).eval()
    with torch.no_grad():  # trained-like scales: unit embeddings, 1/sqrt(fan-in) linears
        for name, p in model.named_parameters():
            mean, std = (1.0, 0.1) if "norm" in name else (0.0, p.shape[-1] ** -0.5)
            p.normal_(mean, 1.0 if "embed" in name else std, generator=g)
    model.save_pretrained(tmp_path)
    layers = (0, 1, 2)
    with torch.no_grad():
        ref = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            model, AutoTokenizer.from_pretrained(tokenizer_dir), PROMPTS[:2],
            max_sequence_length=64, hidden_states_layers=layers)
    del model
    embeds, _ = encode_qwen3_prompt(load_qwen3(tmp_path, out_layers=layers),
                                    Qwen3Tokenizer.from_folder(tokenizer_dir), PROMPTS[:2],
                                    max_sequence_length=64)
    assert rel_err(embeds, ref.numpy()) <= TOL


@pytest.mark.parametrize("bits, tol", [(8, 0.05), (4, 0.5)])
def test_quantized_encoder(np_folder, tokenizer_dir, bits, tol):
    """quantize=4/8 at load (policy "qwen3"): every attention and MLP linear of the 27
    layers quantized, the embedding and norms not; the output equals the float32 model
    run on the dequantized weights (1e-4) and is within `tol` (max relative) of float32.
    The random weights of the fixture quantize worse than a trained model's: measured
    0.025 (8 bits) and 0.36 (4 bits)."""
    from mlx.utils import tree_flatten

    from mlx_edit.weights.quantize import quantized_layers

    tok = Qwen3Tokenizer.from_folder(tokenizer_dir)
    prompts = PROMPTS[:2]
    q = load_qwen3(np_folder, quantize=bits)
    paths = [p for p, _ in quantized_layers(q)]
    assert len(paths) == 27 * 4 and not any(p.startswith("embed") for p in paths)
    assert all(m.bits == bits for _, m in quantized_layers(q))
    ours, _ = encode_qwen3_prompt(q, tok, prompts, max_sequence_length=48)
    full = load_qwen3(np_folder)
    ref, _ = encode_qwen3_prompt(full, tok, prompts, max_sequence_length=48)
    assert rel_err(ours, ref) <= tol
    weights = dict(tree_flatten(full.parameters()))
    for path, m in quantized_layers(q):
        weights[f"{path}.weight"] = mx.dequantize(m.weight, m.scales, m.biases, m.group_size,
                                                  m.bits)
    full.load_weights(list(weights.items()))
    same, _ = encode_qwen3_prompt(full, tok, prompts, max_sequence_length=48)
    assert rel_err(ours, same) <= TOL


def test_converted_folder(np_folder, tmp_path):
    """An mlx-edit folder of the encoder (converter's writer, 4 bits): self-describing,
    holds only the 27 layers used, loads as stored (quantized) and equals quantizing at
    load."""
    from mlx.utils import tree_flatten

    from mlx_edit.weights.convert import ComponentSource, convert_component
    from mlx_edit.weights.loader import open_checkpoint

    ckpt = open_checkpoint("qwen3", np_folder)
    src = ComponentSource("qwen3", np_folder, ckpt.spec.model_class(ckpt.config), ckpt.tensors,
                          ckpt.rules, ckpt.config_dict)
    info = convert_component(src, tmp_path / "te", mx.float32, 4)
    assert info["bits"] == 4
    cfg = json.loads((tmp_path / "te" / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and "_mlx_edit_version" in cfg
    loaded, direct = load_qwen3(tmp_path / "te"), load_qwen3(np_folder, quantize=4)
    a, b = dict(tree_flatten(loaded.parameters())), dict(tree_flatten(direct.parameters()))
    assert a.keys() == b.keys() and not any(k.startswith("layers.27.") for k in a)
    assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
