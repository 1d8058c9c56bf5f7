"""FLUX.2 LoKr parity: random LoKr files in the three variants diffusers'
Flux2LoraLoaderMixin reads (LyCORIS `lycoris_*`, ai-toolkit `diffusion_model.` BFL names,
SimpleTuner's bare diffusers names), loaded by diffusers + PEFT's LoKr and by us
(mlx_edit.models.lora KronUpdate) into the same tiny Flux2 transformer; outputs compared
(float32, CPU). Also: LoKr next to a LoRA, on a quantized model, fused; bad keys named."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import mlx.core as mx
import mlx.nn as nn
import pytest

torch = pytest.importorskip("torch")  # the reference side: diffusers on torch (parity extra)

from test_flux2 import TINY, build_reference, make_inputs, rel_err, run_ours, run_reference  # noqa: E402
from test_lora import _save, bfl_modules  # noqa: E402
from test_lora_flux2 import FORMATS, TOL, Host, compare, fresh_reference  # noqa: E402

from mlx_edit.models import lora as L  # noqa: E402
from mlx_edit.weights.core import WeightLoadError  # noqa: E402
from mlx_edit.weights.flux2 import load_flux2_transformer  # noqa: E402
from mlx_edit.weights.lora import BFL_NAMES, FLUX2_BFL_NAMES, load_lora_file  # noqa: E402

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lokr_flux2") / "transformer"
    build_reference(TINY).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def x():
    return make_inputs(TINY, guidance=True)


def lokr_factors(g, out, inp, rank, both, alpha, std=0.3):
    """{suffix: tensor} of one LoKr module shaped as PEFT's LoKr builds it (factorization
    -1; w1/w2 as products exactly where PEFT's rule makes them so), alpha optional."""
    from peft.tuners.lokr.layer import factorization

    (out1, k), (m, n) = factorization(out, -1), factorization(inp, -1)
    sd = {}
    for w, rows, cols, full in (("w1", out1, m, not (both and rank < max(out1, m) / 2)),
                                ("w2", k, n, not rank < max(k, n) / 2)):
        if full:
            sd[f"lokr_{w}"] = torch.randn(rows, cols, generator=g) * std
        else:
            sd[f"lokr_{w}_a"] = torch.randn(rows, rank, generator=g) * std
            sd[f"lokr_{w}_b"] = torch.randn(rank, cols, generator=g) * std
    if alpha is not None:
        sd["alpha"] = torch.tensor(float(alpha))
    return sd


def lokr_file(modules, seed, key, both=False, alpha=None, rank=2):
    """A LoKr file over {module name: (out, in)}, each module written as `key(name)`."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for name, (out, inp) in sorted(modules.items()):
        for suffix, value in lokr_factors(g, out, inp, rank, both, alpha).items():
            sd[f"{key(name)}.{suffix}"] = value
    return sd


def diffusers_modules(ref, blocks_only=False):
    return {n: (m.out_features, m.in_features) for n, m in ref.named_modules()
            if isinstance(m, torch.nn.Linear)
            and (not blocks_only or n.startswith(("transformer_blocks", "single_transformer")))}


LOKR = {
    "lycoris": lambda ref, ours: lokr_file(
        diffusers_modules(ref, blocks_only=True), 11, lambda n: "lycoris_" + n.replace(".", "_"),
        alpha=3),
    "ai_toolkit": lambda ref, ours: lokr_file(
        bfl_modules(ours, ("final_layer.adaLN",), BFL_NAMES + FLUX2_BFL_NAMES), 12,
        lambda n: "diffusion_model." + n, both=True, alpha=6),
    "simpletuner": lambda ref, ours: lokr_file(diffusers_modules(ref), 13, lambda n: n),
}


@pytest.mark.parametrize("fmt", sorted(LOKR))
def test_lokr_format_matches_diffusers(tiny, x, tmp_path, fmt):
    ref, ours = fresh_reference(tiny), load_flux2_transformer(tiny, mx.float32)
    path = _save(LOKR[fmt](ref, ours), tmp_path / f"{fmt}.safetensors")
    err, effect = compare(tiny, {path: 0.8}, x)
    assert effect > 1e-2, effect  # the LoKr really changes the output
    assert err <= TOL, (fmt, err)


def test_lokr_with_a_lora_quantized_and_fused(tiny, x, tmp_path):
    """A LoKr and a LoRA at once match diffusers; on an 8-bit base the LoKr stays unfused
    and close; fusing a LoKr layer equals the unfused layer."""
    ref, ours = fresh_reference(tiny), load_flux2_transformer(tiny, mx.float32)
    lokr = _save(LOKR["lycoris"](ref, ours), tmp_path / "k.safetensors")
    lora = _save(FORMATS["kohya"](ref, ours), tmp_path / "l.safetensors")
    err, effect = compare(tiny, {lokr: 0.7, lora: -0.5}, x)
    assert effect > 1e-2 and err <= TOL, (effect, err)
    ref = fresh_reference(tiny)
    Host(ref).load({lokr: 0.7})
    want = run_reference(ref, x)
    quantized = load_flux2_transformer(tiny, mx.float32, quantize=8)
    L.attach(quantized, "k", load_lora_file(lokr).updates(quantized), 0.7)
    assert any(isinstance(layer.base, nn.QuantizedLinear) for _, layer in L.lora_layers(quantized))
    assert rel_err(run_ours(quantized, x), want) <= 5e-3  # 8-bit base vs float32
    L.attach(ours, "k", load_lora_file(lokr).updates(ours), 0.7)
    _, layer = L.lora_layers(ours)[0]
    h = mx.random.normal((3, layer.shape[1]), key=mx.random.key(0))
    assert rel_err(layer.fused()(h), layer(h)) <= 1e-5


def test_lokr_bad_keys_are_named(tiny, tmp_path):
    ours = load_flux2_transformer(tiny, mx.float32)
    g = torch.Generator().manual_seed(0)
    factors = lokr_factors(g, 64, 64, 2, False, None)
    bad = {f"lycoris_transformer_blocks_0_attn_to_z.{k}": v for k, v in factors.items()}
    with pytest.raises(WeightLoadError, match=r"attn_to_z\.lokr_w1"):
        load_lora_file(_save(bad, tmp_path / "bad.safetensors"))
    half = {"transformer_blocks.0.attn.to_q.lokr_w1": factors["lokr_w1"]}
    with pytest.raises(WeightLoadError, match=r"to_q \(LoKr factors"):
        load_lora_file(_save(half, tmp_path / "half.safetensors"))
    wrong = {f"transformer_blocks.0.attn.to_out.0.{k}": v
             for k, v in lokr_factors(g, 64, 32, 2, False, None).items()}
    with pytest.raises(WeightLoadError, match=r"img_attn\.proj"):
        load_lora_file(_save(wrong, tmp_path / "wrong.safetensors")).updates(ours)
    assert TINY["num_attention_heads"] * TINY["attention_head_dim"] == 64


def test_lokr_on_bfl_final_layer_follows_bfl_row_order(tiny, x, tmp_path):
    """An ai-toolkit LoKr on final_layer.adaLN_modulation.1 (BFL rows [shift; scale]) and a
    modulation equals merging kron(w1, w2) into the BFL checkpoint and loading that (diffusers'
    LoKr converter maps it without the swap, as for LoRA: see test_lora_flux2)."""
    from safetensors.torch import save_file
    from test_flux2 import bfl_state_dict

    ref, ours = fresh_reference(tiny), load_flux2_transformer(tiny, mx.float32)
    modules = {n: s for n, s in bfl_modules(ours, (), BFL_NAMES + FLUX2_BFL_NAMES).items()
               if n in ("final_layer.adaLN_modulation.1", "single_stream_modulation.lin")}
    sd = lokr_file(modules, 14, lambda n: "diffusion_model." + n, alpha=1)
    merged = bfl_state_dict(ref)
    for name in modules:
        f = {k.rpartition(".")[2]: v for k, v in sd.items()
             if k.startswith(f"diffusion_model.{name}.")}
        w2 = f["lokr_w2_a"] @ f["lokr_w2_b"] / f["lokr_w2_b"].shape[0]  # alpha 1 / rank
        merged[f"{name}.weight"] = merged[f"{name}.weight"] + 0.6 * torch.kron(f["lokr_w1"], w2)
    save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp_path / "m.safetensors"))
    want = run_ours(load_flux2_transformer(tmp_path / "m.safetensors", mx.float32,
                                           config={"axes_dims_rope": [4, 4, 4, 4]}), x)
    base = run_ours(ours, x)
    L.attach(ours, "k", load_lora_file(_save(sd, tmp_path / "k.safetensors")).updates(ours), 0.6)
    assert rel_err(want, base) > 1e-2
    assert rel_err(run_ours(ours, x), want) <= TOL
