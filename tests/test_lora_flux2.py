"""FLUX.2 LoRA parity: random LoRA files in each format diffusers' Flux2LoraLoaderMixin
reads (PEFT, ai-toolkit `diffusion_model.` BFL names, kohya `lora_unet_`; LoKr as LyCORIS
`lycoris_*`, ai-toolkit and SimpleTuner's bare diffusers names), loaded by diffusers + PEFT
and by us into the same tiny Flux2 transformer; outputs compared (float32, CPU). Also: several LoRAs loaded, rescaled and unloaded through the LoRA API
(mlx_edit.editing.loras), on quantized models too; unknown keys refused by name."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the reference side: diffusers on torch (parity extra)

from safetensors.torch import save_file  # noqa: E402
from test_flux2 import (  # noqa: E402
    TINY,
    bfl_state_dict,
    build_reference,
    make_inputs,
    rel_err,
    run_ours,
    run_reference,
)

import test_lora  # noqa: E402
from test_lora import _pair, _save, bfl_modules, with_peft_metadata  # noqa: E402

from mlx_edit.models import lora as L  # noqa: E402
from mlx_edit.weights.core import WeightLoadError  # noqa: E402
from mlx_edit.weights.flux2 import load_flux2_transformer  # noqa: E402
from mlx_edit.weights.lora import BFL_NAMES, FLUX2_BFL_NAMES, load_lora_file  # noqa: E402

pytestmark = pytest.mark.parity
TOL = 1e-4


class Host(test_lora.Host):
    mixin = "Flux2LoraLoaderMixin"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora_flux2") / "transformer"
    build_reference(TINY).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def x():
    return make_inputs(TINY, guidance=True)


def fresh_reference(folder):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel.from_pretrained(folder, torch_dtype=torch.float32).eval()


def peft_lora(ref, seed, only=None, rank=4, std=0.1):
    """PEFT names (`transformer.` + diffusers module) on every Linear of `ref`, or on those
    whose name contains one of `only` (ranks then alternate rank, rank + 1)."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for i, (n, m) in enumerate(ref.named_modules()):
        if isinstance(m, torch.nn.Linear) and (only is None or any(o in n for o in only)):
            r = rank + (i % 2 if only else 0)
            a, b = _pair(g, m.out_features, m.in_features, r, std)
            sd[f"transformer.{n}.lora_A.weight"], sd[f"transformer.{n}.lora_B.weight"] = a, b
    return sd


def bfl_lora(ours, seed, prefix, down, up, sep=".", alpha=None, skip=()):
    """test_lora.bfl_lora on FLUX.2's BFL names (ai-toolkit: `diffusion_model.`,
    lora_A/lora_B; kohya: `lora_unet_`, '_', lora_down/lora_up + alpha)."""
    return test_lora.bfl_lora(ours, seed, prefix, down, up, sep, alpha, skip,
                              names=BFL_NAMES + FLUX2_BFL_NAMES)


def expanded_blocks(ref, ours, seed):
    """ai-toolkit with diffusers block names under `diffusion_model.` (accepted by
    diffusers' FLUX.2 converter) and BFL names for the rest."""
    blocks = {k.replace("transformer.", "diffusion_model.", 1): v
              for k, v in peft_lora(ref, seed, only=("transformer_blocks.",)).items()}
    rest = bfl_lora(ours, seed + 1, "diffusion_model.", "lora_A", "lora_B",
                    skip=("blocks", "final_layer.adaLN"))
    return {**blocks, **rest}


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


# diffusers' BFL/ai-toolkit converter maps final_layer.adaLN_modulation.1 onto norm_out
# without swapping BFL's [shift; scale] rows (its checkpoint converter swaps them), so
# that module is checked against the BFL checkpoint path instead (test_bfl_final_layer_*).
# diffusers' kohya converter drops the modulations and guidance_in (warning "Unsupported
# keys") and the final adaLN: they are left out of its file.
AI_TOOLKIT_SKIP = ("final_layer.adaLN",)
KOHYA_SKIP = ("modulation", "guidance_in", "final_layer.adaLN")

FORMATS = {
    "peft_metadata": lambda ref, ours: with_peft_metadata(
        peft_lora(ref, 1), 12.0, {"transformer_blocks.1.attn.to_k": 2.0,
                                  "single_transformer_blocks.0.attn.to_out": 1.0}),
    "peft_subset_mixed_rank": lambda ref, ours: peft_lora(
        ref, 2, only=("to_q", "add_v_proj", "to_qkv_mlp_proj", "ff.linear_out",
                      "double_stream_modulation_txt", "x_embedder"), std=0.15),
    "ai_toolkit": lambda ref, ours: bfl_lora(ours, 3, "diffusion_model.", "lora_A", "lora_B",
                                             skip=AI_TOOLKIT_SKIP),
    # diffusers reads lora_down/lora_up files as kohya's, so this prefix comes with lora_A/B
    "ai_toolkit_peft_prefix": lambda ref, ours: bfl_lora(
        ours, 4, "base_model.model.", "lora_A", "lora_B", skip=AI_TOOLKIT_SKIP),
    "ai_toolkit_expanded_blocks": lambda ref, ours: expanded_blocks(ref, ours, 5),
    "kohya": lambda ref, ours: bfl_lora(ours, 6, "lora_unet_", "lora_down", "lora_up", "_",
                                        alpha=2, skip=KOHYA_SKIP),
    # LoKr: LyCORIS (blocks only), ai-toolkit (BFL names, both factors products),
    # SimpleTuner (bare diffusers names, no alpha)
    "lokr_lycoris": lambda ref, ours: lokr_file(
        diffusers_modules(ref, blocks_only=True), 11, lambda n: "lycoris_" + n.replace(".", "_"),
        alpha=3),
    "lokr_ai_toolkit": lambda ref, ours: lokr_file(
        bfl_modules(ours, AI_TOOLKIT_SKIP, BFL_NAMES + FLUX2_BFL_NAMES), 12,
        lambda n: "diffusion_model." + n, both=True, alpha=6),
    "lokr_simpletuner": lambda ref, ours: lokr_file(diffusers_modules(ref), 13, lambda n: n),
}


def compare(folder, files_scales, x):
    """(rel err ours vs diffusers with the LoRAs, rel size of the LoRA effect)."""
    ref = fresh_reference(folder)
    base = run_reference(ref, x)
    Host(ref).load(files_scales)
    want = run_reference(ref, x)
    ours = load_flux2_transformer(folder, mx.float32)
    for i, (path, scale) in enumerate(files_scales.items()):
        L.attach(ours, f"l{i}", load_lora_file(path).updates(ours), scale)
    return rel_err(run_ours(ours, x), want), rel_err(want, base)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_format_matches_diffusers(tiny, x, tmp_path, fmt):
    ref, ours = fresh_reference(tiny), load_flux2_transformer(tiny, mx.float32)
    path = _save(FORMATS[fmt](ref, ours), tmp_path / f"{fmt}.safetensors")
    err, effect = compare(tiny, {path: 0.8}, x)
    assert effect > 1e-2, effect  # the LoRA (LoKr) really changes the output
    assert err <= TOL, (fmt, err)


def test_bfl_final_layer_lora_follows_bfl_row_order(tiny, x, tmp_path):
    """A BFL LoRA on final_layer.adaLN_modulation.1 (and the modulations) equals merging
    it into the BFL checkpoint and loading that (the BFL -> diffusers weight converter,
    checked against diffusers' in test_flux2)."""
    ref, ours = fresh_reference(tiny), load_flux2_transformer(tiny, mx.float32)
    sd = bfl_lora(ours, 7, "diffusion_model.", "lora_A", "lora_B", alpha=8,
                  skip=("blocks", "_in"))
    assert any("adaLN" in k for k in sd) and any("single_stream" in k for k in sd)
    merged = bfl_state_dict(ref)
    for key in [k for k in sd if k.endswith("lora_A.weight")]:
        module = key.removeprefix("diffusion_model.").removesuffix(".lora_A.weight")
        alpha = float(sd.get(key.replace("lora_A.weight", "alpha"), 4))  # rank 4: alpha/rank
        b = sd[key.replace("lora_A", "lora_B")] * alpha / 4 * 0.6  # and the strength
        merged[f"{module}.weight"] = merged[f"{module}.weight"] + b @ sd[key]
    save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp_path / "m.safetensors"))
    want = run_ours(load_flux2_transformer(tmp_path / "m.safetensors", mx.float32,
                                           config={"axes_dims_rope": [4, 4, 4, 4]}), x)
    L.attach(ours, "l", load_lora_file(_save(sd, tmp_path / "l.safetensors")).updates(ours), 0.6)
    assert rel_err(run_ours(ours, x), want) <= TOL


class LoRAHost:
    """The pipeline's LoRAs (mlx_edit.editing.loras.LoRAs) over one FLUX.2 transformer held
    as the pipeline's Models (mlx_edit.editing.components) holds it: `transformer` applies
    the LoRAs to every load."""

    def __init__(self, folder, quantize=None):
        from mlx_edit.editing.components import Components
        from mlx_edit.editing.loras import LoRAs

        self.loras = LoRAs()
        cfg = load_flux2_transformer(folder, mx.float32).config
        self.components = Components(
            {"transformer": lambda: load_flux2_transformer(folder, mx.float32, quantize=quantize)},
            {"transformer": cfg})

    @property
    def transformer(self):
        model = self.components.get("transformer")
        self.loras.apply(model)
        return model


def test_several_loras_load_rescale_unload_through_the_lora_api(tiny, x, tmp_path):
    """LoRAs.load / set_scales / unload (mlx_edit.editing.loras) on a FLUX.2
    transformer: two LoRAs of different formats match diffusers, rescaling follows,
    unloading restores the base exactly; a quantized model takes them unfused."""
    ref, ours = fresh_reference(tiny), load_flux2_transformer(tiny, mx.float32)
    a = _save(FORMATS["peft_metadata"](ref, ours), tmp_path / "a.safetensors")
    b = _save(FORMATS["kohya"](ref, ours), tmp_path / "b.safetensors")
    Host(ref).load({a: 0.8, b: 0.5})
    for quantize, tol in ((None, TOL), (8, 5e-3)):  # 8-bit base vs diffusers' float32
        api = LoRAHost(tiny, quantize)
        base = run_ours(api.transformer, x)
        assert api.loras.load(api, a, 0.8) == "a" and api.loras.load(api, b, 0.5) == "b"
        model = api.transformer
        assert L.adapter_names(model) == ["a", "b"]
        assert any(isinstance(layer.base, nn.QuantizedLinear)
                   for _, layer in L.lora_layers(model)) == (quantize is not None)
        Host(ref).pipe.set_adapters(["l0", "l1"], [0.8, 0.5])
        assert rel_err(run_ours(model, x), run_reference(ref, x)) <= tol
        api.loras.set_scales({"a": 0.3, "b": -0.4})
        Host(ref).pipe.set_adapters(["l0", "l1"], [0.3, -0.4])
        assert rel_err(run_ours(api.transformer, x), run_reference(ref, x)) <= tol
        api.loras.unload(api)
        assert not L.lora_layers(api.transformer)
        np.testing.assert_array_equal(run_ours(api.transformer, x), base)


def test_unknown_and_foreign_keys_are_named(tiny, tmp_path):
    ours = load_flux2_transformer(tiny, mx.float32)
    good = bfl_lora(ours, 8, "diffusion_model.", "lora_A", "lora_B", skip=("single", "_in"))
    bad = {**good, "diffusion_model.double_blocks.0.img_attn.qkvx.lora_A.weight":
           torch.zeros(4, 64)}
    with pytest.raises(WeightLoadError, match=r"qkvx\.lora_A\.weight"):
        load_lora_file(_save(bad, tmp_path / "bad.safetensors"))
    # a FLUX.1 LoRA (per-block modulation) names the layers a FLUX.2 model lacks
    flux1 = {"lora_unet_double_blocks_0_img_mod_lin.lora_down.weight": torch.zeros(4, 64),
             "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight": torch.zeros(384, 4)}
    lora = load_lora_file(_save(flux1, tmp_path / "flux1.safetensors"))
    with pytest.raises(WeightLoadError, match=r"double_blocks\.0\.img_mod \(no such layer"):
        lora.updates(ours)


def test_lokr_with_a_lora_quantized_and_fused(tiny, x, tmp_path):
    """A LoKr and a LoRA at once match diffusers; on an 8-bit base the LoKr stays unfused
    and close; fusing a LoKr layer equals the unfused layer."""
    ref, ours = fresh_reference(tiny), load_flux2_transformer(tiny, mx.float32)
    lokr = _save(FORMATS["lokr_lycoris"](ref, ours), tmp_path / "k.safetensors")
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
