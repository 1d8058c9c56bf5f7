"""LoRA parity: random LoRA files in each format, loaded by diffusers (FluxLoraLoaderMixin
+ PEFT) and by us into the same FLUX transformer; outputs compared (float32, CPU)."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import re

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the reference side: diffusers on torch (parity extra)

from safetensors.torch import save_file  # noqa: E402
from test_flux import TINY, build_reference, make_inputs, rel_err, run_ours, run_reference  # noqa: E402

from mlx_edit.models import lora as L  # noqa: E402
from mlx_edit.weights.flux import load_transformer  # noqa: E402
from mlx_edit.weights.lora import BFL_NAMES, _regex, load_lora_file  # noqa: E402

pytestmark = pytest.mark.parity
TOL = 1e-4


class Host:
    """The smallest object diffusers' FluxLoraLoaderMixin (`mixin`) accepts as a pipeline."""

    mixin = "FluxLoraLoaderMixin"

    def __init__(self, transformer):
        import diffusers.loaders

        class _Host(getattr(diffusers.loaders, self.mixin)):
            pass

        self.pipe = _Host()
        self.pipe.transformer, self.pipe.text_encoder = transformer, None
        self.pipe.hf_device_map, self.pipe.components = None, {"transformer": transformer}

    def load(self, files_scales: dict):
        for i, path in enumerate(files_scales):
            self.pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
        self.pipe.set_adapters([f"l{i}" for i in range(len(files_scales))],
                               list(files_scales.values()))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora_tiny")
    build_reference(TINY).save_pretrained(folder, safe_serialization=True)
    return folder


def fresh_reference(folder):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.float32).eval()


def _pair(g, out, inp, rank, std=0.1):
    a = torch.randn(rank, inp, generator=g) * std
    return a, torch.randn(out, rank, generator=g) * std


def diffusers_lora(ref, seed, rank=4, alpha=None, only=None, std=0.05):
    """PEFT names on every Linear of `ref` (or those whose name matches `only`)."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for i, (n, m) in enumerate(ref.named_modules()):
        if isinstance(m, torch.nn.Linear) and (only is None or re.search(only, n)):
            r = rank + (i % 2 if only else 0)  # mixed ranks when a subset is targeted
            a, b = _pair(g, m.out_features, m.in_features, r, std)
            sd[f"transformer.{n}.lora_A.weight"], sd[f"transformer.{n}.lora_B.weight"] = a, b
            if alpha is not None:
                sd[f"transformer.{n}.alpha"] = torch.tensor(float(alpha))
    return sd


def bfl_modules(ours, skip=(), names=BFL_NAMES):
    """{BFL module name: (out, in)} for our model's linears (inverse of `names`)."""
    found = {}
    for path, layer in ours.named_modules():
        if not hasattr(layer, "weight") or layer.weight.ndim != 2:
            continue
        for src, dst, _ in names:
            m = _regex(dst, ".").match(path)
            if m and not any(s in src for s in skip):
                found[src.format(**m.groupdict())] = tuple(layer.weight.shape)
    return found


def bfl_lora(ours, seed, prefix, down, up, sep=".", alpha=None, skip=(), rank=4, std=0.1,
             names=BFL_NAMES):
    """A LoRA on BFL module names (kohya: prefix lora_unet_, sep '_'; ComfyUI:
    diffusion_model.; fal: base_model.model.). Final-layer alphas are omitted: diffusers'
    kohya converter drops them (it applies 1 there), kohya applies alpha/rank."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for name, (out, inp) in sorted(bfl_modules(ours, skip, names).items()):
        key = prefix + name.replace(".", sep)
        sd[f"{key}.{down}.weight"], sd[f"{key}.{up}.weight"] = _pair(g, out, inp, rank, std)
        if alpha is not None and "final_layer" not in name:
            sd[f"{key}.alpha"] = torch.tensor(float(alpha))
    return sd


def xlabs_lora(ours, seed, rank=4):
    g, sd = torch.Generator().manual_seed(seed), {}
    h = ours.config.hidden_size
    for i in range(len(ours.double_blocks)):
        for k in (1, 2):
            for kind, out in (("qkv", 3 * h), ("proj", h)):
                key = f"double_blocks.{i}.processor.{kind}_lora{k}"
                sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = _pair(g, out, h, rank)
    for i in range(len(ours.single_blocks)):
        mlp = ours.config.mlp_hidden
        for kind, out, inp in (("qkv", 3 * h, h), ("proj", h, h + mlp)):
            key = f"single_blocks.{i}.processor.{kind}_lora"
            sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = _pair(g, out, inp, rank)
    return sd


def compare(folder, files_scales, cfg=TINY):
    """(rel err ours vs diffusers with the LoRAs, rel size of the LoRA effect)."""
    x = make_inputs(cfg)
    ref = fresh_reference(folder)
    base = run_reference(ref, x)
    Host(ref).load(files_scales)
    want = run_reference(ref, x)
    ours = load_transformer(folder, mx.float32)
    for i, (path, scale) in enumerate(files_scales.items()):
        L.attach(ours, f"l{i}", load_lora_file(path).updates(ours), scale)
    return rel_err(run_ours(ours, x), want), rel_err(want, base)


def _save(sd, path):
    metadata = sd.pop("__metadata__", None)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata)
    return path


def with_peft_metadata(sd, alpha, alpha_pattern):
    """A diffusers `save_lora_weights` file: PEFT config (lora_alpha, patterns) in the
    safetensors metadata instead of alpha tensors."""
    import json

    modules = sorted({k.removeprefix("transformer.").split(".lora_")[0] for k in sd})
    rank = next(v.shape[0] for k, v in sd.items() if k.endswith("lora_A.weight"))
    config = {"r": rank, "lora_alpha": alpha, "target_modules": modules,
              "alpha_pattern": alpha_pattern, "rank_pattern": {}}
    return {**sd, "__metadata__": {"format": "pt", "lora_adapter_metadata": json.dumps(
        {f"transformer.{k}": v for k, v in config.items()})}}


# diffusers' kohya converter splits linear1 at FLUX's full widths (3072, 12288) only, and
# names its embedder / final-layer outputs without the `transformer.` prefix, so
# `load_lora_weights` silently drops them; both are covered separately below.
KOHYA_SKIP = ("linear1", "_in", "final_layer")

FORMATS = {
    "diffusers_alpha": lambda ref, ours: diffusers_lora(ref, 1, alpha=8),
    "diffusers_subset_mixed_rank": lambda ref, ours: diffusers_lora(
        ref, 2, only=r"(to_q|to_v|add_k_proj|proj_mlp|ff\.net\.2)$", std=0.15),
    "diffusers_peft_metadata": lambda ref, ours: with_peft_metadata(
        diffusers_lora(ref, 6, std=0.1), 12.0,
        {"transformer_blocks.1.attn.to_k": 2.0, "single_transformer_blocks.0.proj_out": 1.0}),
    "kohya": lambda ref, ours: bfl_lora(ours, 3, "lora_unet_", "lora_down", "lora_up", "_",
                                        alpha=2, skip=KOHYA_SKIP),
    "comfyui": lambda ref, ours: bfl_lora(ours, 4, "diffusion_model.", "lora_down", "lora_up",
                                          alpha=16, skip=KOHYA_SKIP),
    "xlabs": lambda ref, ours: xlabs_lora(ours, 5),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_format_matches_diffusers(tiny, tmp_path, fmt):
    ref, ours = fresh_reference(tiny), load_transformer(tiny, mx.float32)
    path = _save(FORMATS[fmt](ref, ours), tmp_path / f"{fmt}.safetensors")
    err, effect = compare(tiny, {path: 0.8})
    assert effect > 1e-2, effect  # the LoRA really changes the output
    assert err <= TOL, (fmt, err)


def test_two_loras_rescaled_and_unloaded(tiny, tmp_path):
    ref, ours = fresh_reference(tiny), load_transformer(tiny, mx.float32)
    a = _save(FORMATS["diffusers_alpha"](ref, ours), tmp_path / "a.safetensors")
    b = _save(FORMATS["kohya"](ref, ours), tmp_path / "b.safetensors")
    err, _ = compare(tiny, {a: 0.8, b: 0.5})
    assert err <= TOL, err

    x = make_inputs(TINY)
    base = run_ours(ours, x)
    L.attach(ours, "a", load_lora_file(a).updates(ours), 0.8)
    L.attach(ours, "b", load_lora_file(b).updates(ours), 0.5)
    L.set_scales(ours, {"a": 0.3, "b": -0.4})
    ref = fresh_reference(tiny)
    Host(ref).load({a: 0.3, b: -0.4})
    assert rel_err(run_ours(ours, x), run_reference(ref, x)) <= TOL
    fused = load_transformer(tiny, mx.float32)
    L.attach(fused, "a", load_lora_file(a).updates(fused), 0.3)
    L.attach(fused, "b", load_lora_file(b).updates(fused), -0.4)
    L.fuse(fused)
    assert not L.lora_layers(fused)
    assert rel_err(run_ours(fused, x), run_ours(ours, x)) <= TOL
    L.remove(ours)
    assert np.array_equal(run_ours(ours, x), base)  # unloading restores the base exactly


def test_fill_edit_with_two_loras_matches_diffusers_pipeline(tiny_ckpt, tmp_path, import_script,
                                                             monkeypatch):
    """FluxFillPipeline with two LoRAs (0.8, 0.5) vs FluxFill: every step's latents and
    the decoded image (PSNR >= 40 dB), injected noise (see test_parity_pipeline.py)."""
    from mlx_edit.parity import run_parity
    from mlx_edit.editing.pipeline import FluxFill

    ref = fresh_reference(tiny_ckpt / "transformer")
    ours = load_transformer(tiny_ckpt / "transformer", mx.float32)
    files = {_save(diffusers_lora(ref, 11, alpha=8, std=0.1), tmp_path / "a.safetensors"): 0.8,
             _save(bfl_lora(ours, 12, "lora_unet_", "lora_down", "lora_up", "_", alpha=4,
                            skip=KOHYA_SKIP, std=0.2), tmp_path / "b.safetensors"): 0.5}
    script = import_script("parity_reference")
    load_pipeline = script.load_pipeline

    def with_loras(*args, **kwargs):
        pipe = load_pipeline(*args, **kwargs)
        for i, path in enumerate(files):
            pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
        pipe.set_adapters([f"l{i}" for i in range(len(files))], list(files.values()))
        return pipe

    monkeypatch.setattr(script, "load_pipeline", with_loras)
    dump = script.dump(tiny_ckpt, tmp_path / "ref.safetensors", components=False, steps=2,
                       strengths=(1.0,))
    plain = {r.component: r for r in run_parity(dump, tiny_ckpt, components=False)}
    from_pretrained = FluxFill.from_pretrained.__func__

    def ours_with_loras(cls, *args, **kwargs):
        pipe = from_pretrained(cls, *args, **kwargs)
        for path, scale in files.items():
            pipe.load_lora(path, scale)
        return pipe

    monkeypatch.setattr(FluxFill, "from_pretrained", classmethod(ours_with_loras))
    rows = {r.component: r for r in run_parity(dump, tiny_ckpt, components=False)}
    assert plain["pipeline.image"].psnr < 30, plain["pipeline.image"]  # the LoRAs matter
    for key in ("pipeline.latents.step0", "pipeline.latents.step1"):
        assert rows[key].rel <= 1e-3, rows[key]
    assert rows["pipeline.image"].psnr >= 40.0, rows["pipeline.image"]


# Full FLUX.1 widths and depth: diffusers' kohya linear1 split and fal converter hard-code
# them. LoRA factors are small (rank 1-4), so no model is built: each module's update as
# diffusers converts it is compared with ours on random probe vectors.
FULL = dict(hidden=3072, mlp=12288, double=19, single=38)


def converted_mismatch(path, hidden):
    """max over diffusers modules of rel |B_d A_d v - (our rows) v|, and layers compared."""
    from diffusers.loaders import FluxLoraLoaderMixin

    from mlx_edit.weights.lora import resolve_module

    theirs = FluxLoraLoaderMixin.lora_state_dict(str(path))
    ours, worst, layers = load_lora_file(path), 0.0, set()
    rng = np.random.default_rng(0)
    for key, a in theirs.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        b = theirs[module + ".lora_B.weight"].numpy()
        _, layer, offset, _ = resolve_module(module)
        layers.add(layer)
        v = rng.standard_normal(a.shape[1]).astype(np.float32)
        want = b @ (a.numpy() @ v)
        rows = slice(offset * hidden, offset * hidden + b.shape[0])
        got = sum(p.b @ (p.a @ v) for p in ours.parts[layer])[rows]
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    assert layers == set(ours.parts)  # the same layers, none missing or extra
    return worst


def _full_width_modules(linear1=True, blocks=True):
    h, m = FULL["hidden"], FULL["mlp"]
    mods = {}
    for i in range(FULL["double"] if blocks else 0):
        for s in ("img", "txt"):
            mods.update({f"double_blocks.{i}.{s}_mod.lin": (6 * h, h),
                         f"double_blocks.{i}.{s}_attn.qkv": (3 * h, h),
                         f"double_blocks.{i}.{s}_attn.proj": (h, h),
                         f"double_blocks.{i}.{s}_mlp.0": (m, h),
                         f"double_blocks.{i}.{s}_mlp.2": (h, m)})
    for i in range(FULL["single"] if blocks else 1):
        mods.update({f"single_blocks.{i}.modulation.lin": (3 * h, h),
                     f"single_blocks.{i}.linear2": (h, h + m)})
        if linear1:
            mods[f"single_blocks.{i}.linear1"] = (3 * h + m, h)
    return mods


def _factor_file(path, mods, prefix, down, up, sep=".", alpha=None, rank=1):
    g, sd = torch.Generator().manual_seed(0), {}
    for name, (out, inp) in mods.items():
        key = prefix + name.replace(".", sep)
        sd[f"{key}.{down}.weight"], sd[f"{key}.{up}.weight"] = _pair(g, out, inp, rank)
        if alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(float(alpha))
    return _save(sd, path)


def test_kohya_single_block_linear1_split_matches_diffusers(tmp_path):
    mods = _full_width_modules(blocks=False)
    path = _factor_file(tmp_path / "k.safetensors", mods, "lora_unet_", "lora_down", "lora_up",
                        "_", alpha=2, rank=4)
    assert converted_mismatch(path, FULL["hidden"]) <= 1e-6


def test_fal_kontext_names_match_diffusers(tmp_path):
    mods = _full_width_modules()
    mods["final_layer.linear"] = (64, FULL["hidden"])
    path = _factor_file(tmp_path / "fal.safetensors", mods, "base_model.model.", "lora_A",
                        "lora_B")
    assert load_lora_file(path).formats == ("bfl",)
    assert converted_mismatch(path, FULL["hidden"]) <= 1e-6


# FLUX.1 widths (diffusers' kohya converter splits linear1 at 3072/12288), one single block
# and no double block: the smallest model its converter accepts (~0.2 B parameters).
WIDE_SINGLE = dict(in_channels=64, out_channels=64, num_layers=0, num_single_layers=1,
                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=64,
                   pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


@pytest.mark.slow
def test_kohya_linear1_on_a_full_width_model_matches_diffusers(tmp_path):
    folder = tmp_path / "wide_single"
    build_reference(WIDE_SINGLE).save_pretrained(folder, safe_serialization=True)
    mods = _full_width_modules(blocks=False)
    path = _factor_file(tmp_path / "k.safetensors", mods, "lora_unet_", "lora_down", "lora_up",
                        "_", alpha=8, rank=4)
    err, effect = compare(folder, {path: 0.8}, WIDE_SINGLE)
    assert effect > 1e-3, effect
    assert err <= TOL, err
