"""FLUX transformer parity against diffusers' FluxTransformer2DModel (float32, CPU)."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest

from mlx_edit.models.layers import ControlResiduals
from mlx_edit.weights.core import WeightLoadError
from mlx_edit.weights.flux import load_transformer

pytestmark = pytest.mark.parity
torch = pytest.importorskip("torch")  # the parity extra: every test here uses it

TINY = dict(
    in_channels=384, out_channels=64, num_layers=2, num_single_layers=2,
    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
    pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(4, 4, 8),
)
# Real FLUX widths, one block of each kind.
WIDE = dict(
    in_channels=384, out_channels=64, num_layers=1, num_single_layers=1,
    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
    pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)


def build_reference(cfg, seed=0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**cfg).eval()
    with torch.no_grad():  # norm weights start at exactly 1: perturb so a swap would show
        for p in model.parameters():
            std = float(p.std()) if p.numel() > 1 else 0.0
            p.add_((0.1 * std if std > 0 else 0.1) * torch.randn_like(p))
    return model


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def make_inputs(cfg, batch=2, h=3, w=5, n_txt=7, seed=1):
    g = np.random.default_rng(seed)
    n = h * w
    ids = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(n, 2)
    img_ids = np.concatenate([np.zeros((n, 1)), ids], 1).astype(np.float32)
    return dict(
        img=g.standard_normal((batch, n, cfg["in_channels"])).astype(np.float32),
        img_ids=img_ids,
        txt=g.standard_normal((batch, n_txt, cfg["joint_attention_dim"])).astype(np.float32),
        txt_ids=np.zeros((n_txt, 3), np.float32),
        timestep=np.array([0.7, 0.25][:batch], np.float32),
        pooled=g.standard_normal((batch, cfg["pooled_projection_dim"])).astype(np.float32),
        guidance=np.array([30.0, 3.5][:batch], np.float32),
    )


def run_reference(model, x, **kw):
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    with torch.no_grad():
        return model(
            hidden_states=t["img"], encoder_hidden_states=t["txt"], pooled_projections=t["pooled"],
            timestep=t["timestep"], img_ids=t["img_ids"], txt_ids=t["txt_ids"],
            guidance=t["guidance"], return_dict=False, **kw,
        )[0].numpy()


def run_ours(model, x, **kw):
    a = {k: mx.array(v) for k, v in x.items()}
    out = model(a["img"], a["img_ids"], a["txt"], a["txt_ids"], a["timestep"], a["pooled"],
                a["guidance"], **kw)
    return np.array(out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ref = build_reference(TINY)
    folder = tmp_path_factory.mktemp("flux_tiny")
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder


def test_tiny_forward_matches_diffusers(tiny):
    ref, folder = tiny
    ours = load_transformer(folder, mx.float32)
    x = make_inputs(TINY)
    err = rel_err(run_ours(ours, x), run_reference(ref, x))
    assert err <= 1e-4, err


def test_tiny_non_square_single_item(tiny):
    ref, folder = tiny
    ours = load_transformer(folder, mx.float32)
    x = make_inputs(TINY, batch=1, h=6, w=10, n_txt=5, seed=3)  # a 96x160 px image
    assert rel_err(run_ours(ours, x), run_reference(ref, x)) <= 1e-4


def test_controlnet_residual_injection_matches_diffusers(tiny):
    ref, folder = tiny
    ours = load_transformer(folder, mx.float32)
    x = make_inputs(TINY)
    g = np.random.default_rng(5)
    hidden = TINY["num_attention_heads"] * TINY["attention_head_dim"]
    n = x["img"].shape[1]
    double = [g.standard_normal((2, n, hidden)).astype(np.float32) for _ in range(1)]
    single = [g.standard_normal((2, n, hidden)).astype(np.float32) for _ in range(2)]
    want = run_reference(
        ref, x,
        controlnet_block_samples=[torch.from_numpy(d) for d in double],
        controlnet_single_block_samples=[torch.from_numpy(s) for s in single],
    )
    res = ControlResiduals([mx.array(d) for d in double], [mx.array(s) for s in single])
    got = run_ours(ours, x, controlnet=[res])
    assert rel_err(got, want) <= 1e-4
    # XLabs' repeat rule
    want = run_reference(
        ref, x, controlnet_block_samples=[torch.from_numpy(d) for d in double * 2],
        controlnet_blocks_repeat=True,
    )
    res = ControlResiduals([mx.array(d) for d in double * 2], [], repeat=True)
    assert rel_err(run_ours(ours, x, controlnet=[res]), want) <= 1e-4


def test_wrong_kind_is_named(tmp_path):
    cfg = dict(TINY, in_channels=64, guidance_embeds=False)
    build_reference(cfg).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(WeightLoadError, match="FLUX.1 schnell.*in_channels 64.*384"):
        load_transformer(tmp_path, mx.float32, expect_in_channels=384)


@pytest.mark.slow
def test_wide_forward_matches_diffusers(tmp_path):
    ref = build_reference(WIDE)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_transformer(tmp_path, mx.float32)
    x = make_inputs(WIDE, batch=2, h=4, w=6, n_txt=16)
    err = rel_err(run_ours(ours, x), run_reference(ref, x))
    assert err <= 1e-4, err


def test_layer_norm_is_precise_when_mean_dominates():
    from mlx_edit.models.layers import layer_norm

    # |mean| >> std: MLX's CPU kernel alone (one-pass variance) is off by 1.4e-3 here
    # (torch float32 by 2.5e-4); the float64 two-pass result is the reference.
    x = np.random.default_rng(0).standard_normal((2, 3, 512)).astype(np.float32) * 1e-3 + 5
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
    assert np.abs(np.array(layer_norm(mx.array(x))) - ref).max() <= 1e-5
