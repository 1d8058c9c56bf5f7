"""FLUX ControlNet parity against diffusers' FluxControlNetModel (float32, CPU).

Residuals per block (InstantX, Union, XLabs from a diffusers folder and from an x-flux
file), the combined forward (diffusers ControlNet residuals injected into
FluxTransformer2DModel vs ours), several ControlNets at once, the x-flux key layout
against diffusers' own converters, strict loading and the mlx-edit folder round trip.
"""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import import_script

from mlx_edit.models.controlnet import ControlNetConfig, FluxControlNet
from mlx_edit.weights.controlnet import (
    CONTROLNET_DIFFUSERS_RULES,
    XLABS_HINT_INDEX,
    convert_controlnet,
    load_controlnet,
    save_controlnet,
)
from mlx_edit.weights.core import WeightLoadError, load_into
from mlx_edit.weights.flux import load_transformer

pytestmark = pytest.mark.parity
torch = pytest.importorskip("torch")  # the parity extra: every test here uses it
cf = import_script("controlnet_fixtures")

TINY = dict(attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=24, axes_dims_rope=[4, 4, 8])
WIDE = dict(attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
            pooled_projection_dim=768, axes_dims_rope=[16, 56, 56])
FILL = dict(TINY, in_channels=384, out_channels=64, num_layers=3, num_single_layers=4,
            guidance_embeds=True)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def make_inputs(width=TINY, batch=2, h=3, w=5, n_txt=7, seed=1, xlabs=False):
    g = np.random.default_rng(seed)
    n = h * w
    rc = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(n, 2)
    x = dict(
        img=g.standard_normal((batch, n, 64)).astype(np.float32),
        img_ids=np.concatenate([np.zeros((n, 1)), rc], 1).astype(np.float32),
        txt=g.standard_normal((batch, n_txt, width["joint_attention_dim"])).astype(np.float32),
        timestep=np.array([0.7, 0.25][:batch], np.float32),
        pooled=g.standard_normal((batch, width["pooled_projection_dim"])).astype(np.float32),
        guidance=np.array([30.0, 3.5][:batch], np.float32),
    )
    if xlabs:  # pixels in [-1, 1], 16 px per token
        x["cond"] = g.uniform(-1, 1, (batch, 16 * h, 16 * w, 3)).astype(np.float32)
    else:
        x["cond"] = g.standard_normal((batch, n, 64)).astype(np.float32)
    return x


def reference_residuals(model, x, mode=None, scale=0.7):
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    cond = t["cond"].permute(0, 3, 1, 2) if t["cond"].ndim == 4 else t["cond"]
    b = t["img"].shape[0]
    with torch.no_grad():
        double, single = model(
            hidden_states=t["img"], controlnet_cond=cond,
            controlnet_mode=None if mode is None else torch.full((b, 1), mode),
            conditioning_scale=scale, encoder_hidden_states=t["txt"],
            pooled_projections=t["pooled"], timestep=t["timestep"], img_ids=t["img_ids"],
            txt_ids=torch.zeros(t["txt"].shape[1], 3), guidance=t["guidance"], return_dict=False,
        )
    return [d.numpy() for d in double or []], [s.numpy() for s in single or []]


def our_residuals(model, x, mode=None, scale=0.7):
    a = {k: mx.array(v) for k, v in x.items()}
    return model(a["img"], a["img_ids"], a["txt"], a["timestep"], a["pooled"], a["guidance"],
                 cond=a["cond"], mode=mode, scale=scale)


def assert_residuals_match(ours, ref_double, ref_single, tol=1e-4):
    assert len(ours.double) == len(ref_double) and len(ours.single) == len(ref_single)
    errs = [rel_err(o, r) for o, r in zip(ours.double + ours.single, ref_double + ref_single)]
    assert max(errs) <= tol, errs
    return max(errs)


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """{kind: (diffusers model, folder)} for tiny InstantX / Union / XLabs ControlNets."""
    out = {}
    for seed, kind in enumerate(cf.KINDS):
        layers, single = cf.DEPTHS["tiny"][kind]
        ref = cf.make_controlnet(cf.controlnet_config(kind, TINY, layers, single), seed)
        folder = tmp_path_factory.mktemp(f"cn_{kind}")
        ref.save_pretrained(folder, safe_serialization=True)
        out[kind] = (ref, folder)
    return out


def test_instantx_residuals_match_diffusers(nets):
    ref, folder = nets["instantx"]
    ours = load_controlnet(folder, mx.float32)
    assert ours.config.kind == "instantx" and not ours.repeat
    x = make_inputs()
    assert_residuals_match(our_residuals(ours, x), *reference_residuals(ref, x))


def test_union_residuals_match_diffusers_per_mode(nets):
    ref, folder = nets["union"]
    ours = load_controlnet(folder, mx.float32)
    x = make_inputs(batch=1, h=6, w=4, n_txt=5, seed=2)
    got = {}
    for mode in (0, 4):
        got[mode] = our_residuals(ours, x, mode=mode)
        assert_residuals_match(got[mode], *reference_residuals(ref, x, mode=mode))
    assert rel_err(got[0].double[0], got[4].double[0]) > 1e-3  # the mode matters
    with pytest.raises(ValueError, match="mode"):
        our_residuals(ours, x, mode=None)
    with pytest.raises(ValueError, match="mode"):
        our_residuals(ours, x, mode=10)


def test_xlabs_residuals_match_diffusers_from_folder_and_xflux_file(nets, tmp_path):
    from safetensors.torch import save_file

    ref, folder = nets["xlabs"]
    x = make_inputs(xlabs=True, seed=3)
    want = reference_residuals(ref, x)
    ours = load_controlnet(folder, mx.float32)
    assert ours.repeat and ours.config.kind == "xlabs"
    assert_residuals_match(our_residuals(ours, x), *want)
    raw = tmp_path / "flux-canny-controlnet-v3.safetensors"
    save_file(cf.xlabs_state_dict(ref), str(raw))
    from_raw = load_controlnet(raw, mx.float32, config={"axes_dims_rope": TINY["axes_dims_rope"]})
    assert from_raw.config == ours.config
    assert_residuals_match(our_residuals(from_raw, x), *want)


def _xflux_to_diffusers_with_diffusers(raw: dict, inner: int = 3072) -> dict:
    """x-flux keys -> diffusers keys with diffusers' own converters: the FLUX transformer
    converter for the BFL-named part (it needs a single block and a final layer: dummies,
    dropped after) and the SD ControlNet converter for the hint block (same index scheme).
    x-flux's `pos_embed_input` and `controlnet_blocks` have no diffusers converter."""
    from diffusers.loaders.single_file_utils import (
        convert_controlnet_checkpoint,
        convert_flux_transformer_checkpoint_to_diffusers,
    )

    hint = {k: v for k, v in raw.items() if k.startswith("input_hint_block.")}
    control = {k: v for k, v in raw.items() if k.startswith(("controlnet_blocks.", "pos_embed_"))}
    bfl = {k: v for k, v in raw.items() if k not in hint and k not in control}
    dummies = {"single_blocks.0.linear1.weight": torch.zeros(7 * inner, 1),
               "single_blocks.0.linear1.bias": torch.zeros(7 * inner),
               "final_layer.adaLN_modulation.1.weight": torch.zeros(2, 1),
               "final_layer.adaLN_modulation.1.bias": torch.zeros(2)}
    for name in ("modulation.lin.weight", "modulation.lin.bias", "norm.query_norm.scale",
                 "norm.key_norm.scale", "linear2.weight", "linear2.bias"):
        dummies[f"single_blocks.0.{name}"] = torch.zeros(1)
    dummies.update({"final_layer.linear.weight": torch.zeros(1), "final_layer.linear.bias":
                    torch.zeros(1)})
    sd = convert_flux_transformer_checkpoint_to_diffusers({**bfl, **dummies})
    sd = {k: v for k, v in sd.items()
          if not k.startswith(("single_transformer_blocks.", "proj_out.", "norm_out."))}
    sd_hint = convert_controlnet_checkpoint({"time_embed.0.weight": torch.zeros(1), **hint},
                                            {"layers_per_block": 2, "down_block_types": []})
    for k, v in sd_hint.items():
        if k.startswith("controlnet_cond_embedding.") and v is not None:
            sd["input_hint_block." + k[len("controlnet_cond_embedding."):]] = v
    sd.update(control)
    sd["controlnet_x_embedder.weight"] = sd.pop("pos_embed_input.weight")
    sd["controlnet_x_embedder.bias"] = sd.pop("pos_embed_input.bias")
    return sd


def test_xflux_layout_round_trips_through_diffusers_converters(nets):
    ref, _ = nets["xlabs"]
    raw = cf.xlabs_state_dict(ref)
    n_double = ref.config.num_layers
    assert sorted(k for k in raw if k.startswith("input_hint_block.")) == sorted(
        f"input_hint_block.{i}.{p}" for i in XLABS_HINT_INDEX.values() for p in ("weight", "bias"))
    assert {k.split(".")[0] for k in raw} == {  # x-flux ControlNetFlux's module names
        "img_in", "time_in", "vector_in", "guidance_in", "txt_in", "double_blocks",
        "controlnet_blocks", "pos_embed_input", "input_hint_block"}
    assert {int(k.split(".")[1]) for k in raw if k.startswith("double_blocks.")} == set(
        range(n_double))
    back = _xflux_to_diffusers_with_diffusers(dict(raw))
    want = ref.state_dict()
    assert sorted(back) == sorted(want)
    assert all(torch.equal(back[k], want[k]) for k in want)


def test_combined_forward_matches_diffusers(nets, tmp_path):
    """FluxMultiControlNetModel(InstantX, Union) residuals into FluxTransformer2DModel (Fill)
    vs our two ControlResiduals; then XLabs alone with the repeat rule."""
    from diffusers import FluxMultiControlNetModel, FluxTransformer2DModel

    make_tiny = import_script("make_tiny_checkpoint")
    torch.manual_seed(0)
    fill = FluxTransformer2DModel(**FILL).eval()
    make_tiny.perturb_constant_tensors(fill, 7)
    fill.save_pretrained(tmp_path, safe_serialization=True)
    ours_fill = load_transformer(tmp_path, mx.float32)
    x = make_inputs(seed=4)
    g = np.random.default_rng(9)
    fill_in = np.concatenate([x["img"], g.standard_normal((2, 15, 320)).astype(np.float32)], -1)
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    txt_ids = torch.zeros(t["txt"].shape[1], 3)

    def reference(double, single, repeat=False):
        with torch.no_grad():
            return fill(hidden_states=torch.from_numpy(fill_in), encoder_hidden_states=t["txt"],
                        pooled_projections=t["pooled"], timestep=t["timestep"],
                        img_ids=t["img_ids"], txt_ids=txt_ids, guidance=t["guidance"],
                        controlnet_block_samples=double, controlnet_single_block_samples=single,
                        controlnet_blocks_repeat=repeat, return_dict=False)[0].numpy()

    def ours(residuals):
        a = {k: mx.array(v) for k, v in x.items()}
        return np.array(ours_fill(mx.array(fill_in), a["img_ids"], a["txt"], mx.zeros((7, 3)),
                                  a["timestep"], a["pooled"], a["guidance"],
                                  controlnet=residuals))

    multi = FluxMultiControlNetModel([nets["instantx"][0], nets["union"][0]])
    with torch.no_grad():
        double, single = multi(
            hidden_states=t["img"], controlnet_cond=[t["cond"], t["cond"].flip(1)],
            controlnet_mode=[torch.zeros(2, dtype=torch.long), torch.full((2,), 2)], conditioning_scale=[0.6, 0.9],
            encoder_hidden_states=t["txt"], pooled_projections=t["pooled"],
            timestep=t["timestep"], img_ids=t["img_ids"], txt_ids=txt_ids,
            guidance=t["guidance"], return_dict=False)
    want = reference(double, single)
    cn_a = load_controlnet(nets["instantx"][1], mx.float32)
    cn_b = load_controlnet(nets["union"][1], mx.float32)
    res_a = our_residuals(cn_a, x, scale=0.6)
    res_b = our_residuals(cn_b, dict(x, cond=x["cond"][:, ::-1].copy()), mode=2, scale=0.9)
    got = ours([res_a, res_b])
    assert rel_err(got, want) <= 1e-4
    assert rel_err(got, reference(None, None)) > 1e-2  # the ControlNets change the output

    xl_ref, xl_folder = nets["xlabs"]
    xx = make_inputs(xlabs=True, seed=4)
    d, _ = reference_residuals(xl_ref, xx, scale=0.8)
    want = reference([torch.from_numpy(r) for r in d], None, repeat=True)
    res = our_residuals(load_controlnet(xl_folder, mx.float32), xx, scale=0.8)
    assert rel_err(ours([res]), want) <= 1e-4


def test_wide_instantx_residuals_match_diffusers():
    """Real FLUX widths (3072 hidden, head 128), one double and one single block; the
    state dict goes through the diffusers key map without a file (tiny tests cover files)."""
    cfg = cf.controlnet_config("instantx", WIDE, 1, 1)
    ref = cf.make_controlnet(cfg, seed=5)
    x = make_inputs(WIDE, batch=1, h=4, w=6, n_txt=16, seed=6)
    want = reference_residuals(ref, x)
    tensors = {k: mx.array(v.numpy()) for k, v in ref.state_dict().items()}
    del ref
    ours = load_into(FluxControlNet(ControlNetConfig.from_dict(cfg)), tensors,
                     CONTROLNET_DIFFUSERS_RULES, mx.float32)
    del tensors
    assert_residuals_match(our_residuals(ours, x), *want)


def test_strict_loading_names_the_keys(nets, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = nets["union"]
    sd = load_file(str(next(folder.glob("*.safetensors"))))
    del sd["controlnet_mode_embedder.weight"]
    sd["controlnet_blocks.9.weight"] = torch.zeros(32, 32)
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(WeightLoadError, match="mode_embedder.weight.*controlnet_blocks.9"):
        load_controlnet(tmp_path, mx.float32)
    with pytest.raises(WeightLoadError, match="not a FLUX ControlNet"):
        load_controlnet(_transformer_file(tmp_path), mx.float32)
    with pytest.raises(WeightLoadError, match="no such ControlNet"):
        load_controlnet(tmp_path / "missing", mx.float32)


def _transformer_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "transformer.safetensors"
    save_file({"x_embedder.weight": torch.zeros(4, 4), "proj_out.weight": torch.zeros(4, 4)},
              str(path))
    return path


def test_mlx_folder_round_trip(nets, tmp_path):
    ours = load_controlnet(nets["xlabs"][1], mx.float32)
    again = load_controlnet(save_controlnet(ours, tmp_path / "mlx"), mx.float32)
    x = make_inputs(xlabs=True, seed=8)
    a, b = our_residuals(ours, x), our_residuals(again, x)
    assert again.config == ours.config and again.repeat
    assert all(np.array_equal(np.array(p), np.array(q)) for p, q in zip(a.double, b.double))


def test_convert_quantized_round_trip(tmp_path):
    """Group-64 widths: an 8-bit mlx-edit folder loads quantized (never via full precision)
    and gives exactly what quantize-at-load gives; embedders stay in full precision."""
    small = dict(attention_head_dim=64, num_attention_heads=2, joint_attention_dim=128,
                 pooled_projection_dim=64, axes_dims_rope=[16, 24, 24])
    ref = cf.make_controlnet(cf.controlnet_config("union", small, 1, 1), seed=2)
    ref.save_pretrained(tmp_path / "src", safe_serialization=True)
    dest = convert_controlnet(tmp_path / "src", tmp_path / "q8", mx.float32, bits=8)
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 8
    assert "controlnet_x_embedder" in cfg["quantization"]["skipped"]
    assert "controlnet_blocks.0" not in cfg["quantization"]["skipped"]
    loaded = load_controlnet(dest, mx.float32)
    at_load = load_controlnet(tmp_path / "src", mx.float32, quantize=8)
    full = load_controlnet(tmp_path / "src", mx.float32)
    assert isinstance(loaded.controlnet_blocks[0], nn.QuantizedLinear)
    assert isinstance(loaded.controlnet_x_embedder, nn.Linear)
    x = make_inputs(small, seed=9)
    q, q2, f = (our_residuals(m, x, mode=3) for m in (loaded, at_load, full))
    assert all(np.array_equal(np.array(a), np.array(b)) for a, b in zip(q.double, q2.double))
    assert 1e-6 < rel_err(q.single[0], f.single[0]) < 5e-2
    with pytest.raises(FileExistsError):
        convert_controlnet(tmp_path / "src", dest, mx.float32)


def test_config_checks():
    with pytest.raises(ValueError, match="in_channels"):
        ControlNetConfig.from_dict(dict(TINY, conditioning_embedding_channels=16, patch_size=1))
    with pytest.raises(ValueError, match="axes_dims_rope"):
        ControlNetConfig.from_dict(dict(TINY, axes_dims_rope=[4, 4, 4]))
    cfg = ControlNetConfig.from_dict(dict(TINY, num_mode=10, unknown_key=1))
    assert cfg.kind == "union" and cfg.hidden_size == 32
