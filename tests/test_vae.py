"""VAE parity against diffusers' AutoencoderKL (float32, CPU), diffusers folder and BFL file."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import json
import re
import shutil

import mlx.core as mx
from mlx.utils import tree_flatten
import numpy as np
import pytest
from conftest import import_script
from safetensors.numpy import save_file as save_numpy

from mlx_edit.models.vae import VAEConfig
from mlx_edit.weights import vae as vae_keys
from mlx_edit.weights.core import WeightLoadError
from mlx_edit.weights.vae import load_vae

try:  # the parity extra: only the parity tests use torch / diffusers
    import torch
    from safetensors.torch import load_file, save_file
except ImportError:
    torch = None

FLUX_FACTORS = dict(scaling_factor=0.3611, shift_factor=0.1159)
# 4 levels, so the scale factor is 8 as in FLUX; channel changes give conv_shortcuts.
TINY = dict(
    block_out_channels=(8, 16, 16, 16), latent_channels=16, layers_per_block=1,
    norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False, **FLUX_FACTORS,
)
# The real FLUX.1 VAE config (black-forest-labs/FLUX.1-Fill-dev vae/config.json).
WIDE = dict(
    block_out_channels=(128, 256, 512, 512), latent_channels=16, layers_per_block=2,
    norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False, **FLUX_FACTORS,
)


def build_reference(cfg, seed=0):
    from diffusers import AutoencoderKL

    n = len(cfg["block_out_channels"])
    torch.manual_seed(seed)
    model = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        **cfg,
    ).eval()
    # GroupNorms start as identity (1, 0): perturb every parameter so a mis-wired layer
    # shows; weights relative to their own spread, so activations stay O(1).
    with torch.no_grad():
        for p in model.parameters():
            scale = p.std() if p.ndim > 1 else 1.0
            p.add_(0.05 * scale * torch.randn_like(p))
    return model


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def to_bfl(state: dict, num_levels: int) -> dict:
    """diffusers AutoencoderKL names -> BFL/LDM `ae.safetensors` names (the test's own
    inverse map, checked against diffusers' converter below)."""
    out = {}
    for key, t in state.items():
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.(\d+)", r"down.\1.block.\2", key)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0", r"down.\1.downsample", k)
        k = re.sub(r"up_blocks\.(\d+)\.resnets\.",
                   lambda m: f"up.{num_levels - 1 - int(m[1])}.block.", k)
        k = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0",
                   lambda m: f"up.{num_levels - 1 - int(m[1])}.upsample", k)
        k = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
        k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
        k = k.replace("attn_1.group_norm.", "attn_1.norm.").replace("attn_1.to_out.0.", "attn_1.proj_out.")
        k = re.sub(r"attn_1\.to_([qkv])\.", r"attn_1.\1.", k)
        k = k.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
        if ".attn_1." in k and k.endswith("weight") and t.ndim == 2:
            t = t[:, :, None, None]  # BFL's attention projections are 1x1 convs
        out[k] = t.contiguous() if hasattr(t, "contiguous") else np.ascontiguousarray(t)
    return out


def make_image(batch, h, w, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, h, w)).astype(np.float32)


def make_latent(batch, h, w, seed=2):
    return np.random.default_rng(seed).standard_normal((batch, 16, h, w)).astype(np.float32)


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def reference_outputs(ref, image, latent):
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(image)).latent_dist
        dec = ref.decode(torch.from_numpy(latent)).sample
    return dist.mean.numpy(), dist.logvar.numpy(), dec.numpy()


def compare(model, ref_out, image, latent):
    """Max relative errors (mean, logvar, decoded) of our model against the reference."""
    mean, logvar = model.encode(mx.array(image.transpose(0, 2, 3, 1)))
    dec = model.decode(mx.array(latent.transpose(0, 2, 3, 1)))
    errs = [rel_err(nchw(a), r) for a, r in zip((mean, logvar, dec), ref_out)]
    print("rel errors mean/logvar/decode:", [f"{e:.2e}" for e in errs])
    return errs


def check_bfl_file(ref, path, num_levels):
    """Write the reference as a BFL file; diffusers' converter must map it back exactly."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = ref.state_dict()
    bfl = to_bfl(state, num_levels)
    save_file(bfl, str(path))
    back = convert_ldm_vae_checkpoint(load_file(str(path)), dict(ref.config))
    assert sorted(back) == sorted(state)
    for k, v in state.items():
        assert torch.equal(back[k], v), k
    return bfl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_tiny")
    ref = build_reference(TINY)
    ref.save_pretrained(root / "vae", safe_serialization=True)
    image, latent = make_image(2, 40, 56), make_latent(2, 5, 7)
    return dict(ref=ref, root=root, image=image, latent=latent,
                out=reference_outputs(ref, image, latent))


@pytest.fixture(scope="module")
def tiny_np(tmp_path_factory):
    """Torch-free: the TINY VAE built by mlx-edit (scripts/make_mlx_checkpoint.py) as a
    diffusers vae/ folder, with its diffusers-named state as numpy arrays."""
    mmc = import_script("make_mlx_checkpoint")
    root = tmp_path_factory.mktemp("vae_tiny_np")
    cfg = dict(TINY, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4)
    params = mmc.write_component(root, "vae", cfg, 0)
    return dict(root=root, state=mmc.to_checkpoint(params, vae_keys.DIFFUSERS_RULES),
                image=make_image(2, 40, 56))


def test_config_from_dict():
    cfg = VAEConfig.from_dict({"block_out_channels": [8, 16], "shift_factor": None, "foo": 1})
    assert cfg.block_out_channels == (8, 16) and cfg.shift_factor == 0.0
    assert cfg.scale_factor == 2 and VAEConfig().scale_factor == 8
    assert (VAEConfig().scaling_factor, VAEConfig().shift_factor) == (0.3611, 0.1159)
    with pytest.raises(ValueError, match="act_fn"):
        VAEConfig.from_dict({"act_fn": "gelu"})


@pytest.mark.parity
def test_tiny_diffusers_folder(tiny):
    for path in (tiny["root"] / "vae", tiny["root"]):  # the vae/ folder and the model root
        model = load_vae(path, dtype=mx.float32)
        assert model.config.block_out_channels == (8, 16, 16, 16)
        assert max(compare(model, tiny["out"], tiny["image"], tiny["latent"])) <= 1e-4


@pytest.mark.parity
def test_tiny_bfl_file(tiny, tmp_path):
    bfl = check_bfl_file(tiny["ref"], tmp_path / "ae.safetensors", 4)
    # The FLUX defaults fill in what the file cannot say, except the tiny widths.
    cfg = VAEConfig.from_dict(dict(tiny["ref"].config))
    model = load_vae(tmp_path / "ae.safetensors", dtype=mx.float32, config=cfg)
    assert max(compare(model, tiny["out"], tiny["image"], tiny["latent"])) <= 1e-4
    # Prefixed inside a full checkpoint: only the VAE part is read.
    full = {f"first_stage_model.{k}": v for k, v in bfl.items()}
    full["model.diffusion_model.img_in.weight"] = torch.zeros(2, 2)
    save_file(full, str(tmp_path / "full.safetensors"))
    model = load_vae(tmp_path / "full.safetensors", dtype=mx.float32, config=cfg)
    assert max(compare(model, tiny["out"], tiny["image"], tiny["latent"])) <= 1e-4


@pytest.mark.parity
@pytest.mark.slow
def test_wide_flux_vae(tmp_path):
    ref = build_reference(WIDE, seed=3)
    ref.save_pretrained(tmp_path / "vae", safe_serialization=True)
    image, latent = make_image(2, 48, 64), make_latent(2, 6, 8)
    out = reference_outputs(ref, image, latent)
    model = load_vae(tmp_path / "vae", dtype=mx.float32)
    assert max(compare(model, out, image, latent)) <= 1e-4
    # The real-width BFL file loads with no config at all (FLUX defaults).
    check_bfl_file(ref, tmp_path / "ae.safetensors", 4)
    shutil.rmtree(tmp_path / "vae")
    model = load_vae(tmp_path / "ae.safetensors", dtype=mx.float32)
    assert max(compare(model, out, image, latent)) <= 1e-4


def test_encode_sample(tiny_np):
    tiny = tiny_np
    model = load_vae(tiny["root"] / "vae", dtype=mx.float32)
    x = mx.array(tiny["image"].transpose(0, 2, 3, 1))
    key = mx.random.key(7)
    a, b = model.encode_sample(x, key), model.encode_sample(x, key)
    assert np.array_equal(np.array(a), np.array(b))
    mean, logvar = model.encode(x)
    eps = mx.random.normal(mean.shape, key=key)
    np.testing.assert_allclose(np.array(a), np.array(mean + mx.exp(0.5 * logvar) * eps),
                               rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.array(a), np.array(model.encode_sample(x, mx.random.key(8))))
    assert a.shape == (2, 5, 7, 16)


@pytest.mark.parity
def test_bfloat16_load(tiny):
    model = load_vae(tiny["root"] / "vae", dtype=mx.bfloat16)
    assert model.encoder.conv_in.weight.dtype == mx.bfloat16
    dec = model.decode(mx.array(tiny["latent"].transpose(0, 2, 3, 1)))
    assert dec.dtype == mx.bfloat16
    assert rel_err(nchw(dec.astype(mx.float32)), tiny["out"][2]) <= 5e-2


def _write_variant(tiny, folder, edit):
    folder.mkdir()
    shutil.copy(tiny["root"] / "vae" / "config.json", folder / "config.json")
    state = {k: v.copy() for k, v in tiny["state"].items()}
    edit(state)
    save_numpy(state, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


@pytest.mark.parametrize("edit, key", [
    (lambda s: s.pop("decoder.up_blocks.1.resnets.0.conv1.weight"),
     "decoder.up_blocks.1.resnets.0.conv1.weight"),
    (lambda s: s.__setitem__("encoder.extra.weight", np.zeros(3, np.float32)),
     "encoder.extra.weight"),
    (lambda s: s.__setitem__("decoder.conv_out.bias", np.zeros(4, np.float32)),
     "decoder.conv_out.bias"),
    (lambda s: s.__setitem__("encoder.mid_block.attentions.0.to_q.weight",
                             np.zeros((16, 8), np.float32)),
     "encoder.mid_block.attentions.0.to_q.weight"),
])
def test_strict_diffusers(tiny_np, tmp_path, edit, key):
    folder = _write_variant(tiny_np, tmp_path / "bad", edit)
    with pytest.raises(WeightLoadError, match=re.escape(key)):
        load_vae(folder, dtype=mx.float32)


def test_strict_bfl(tiny_np, tmp_path):
    bfl = to_bfl(tiny_np["state"], 4)
    cfg = json.loads((tiny_np["root"] / "vae" / "config.json").read_text())
    bfl.pop("encoder.mid.attn_1.q.weight")
    save_numpy(bfl, str(tmp_path / "ae.safetensors"))
    with pytest.raises(WeightLoadError, match=re.escape("encoder.mid_block.attentions.0.to_q.weight")):
        load_vae(tmp_path / "ae.safetensors", dtype=mx.float32, config=cfg)
    # The FLUX default widths do not fit a tiny file: a shape error, not a silent load.
    bfl["encoder.mid.attn_1.q.weight"] = np.zeros((16, 16, 1, 1), np.float32)
    save_numpy(bfl, str(tmp_path / "ae.safetensors"))
    with pytest.raises(WeightLoadError, match="mis-shaped"):
        load_vae(tmp_path / "ae.safetensors", dtype=mx.float32)


@pytest.mark.parity
def test_group_norm_is_precise_when_mean_dominates():
    """Features with |mean| >> std (flat control/edge images give them): a one-pass
    variance (MLX's CPU layer_norm alone) is off by ~1e-3 there. Reference: float64."""
    from mlx_edit.models.vae import GroupNorm

    x = np.random.default_rng(0).standard_normal((2, 64, 4, 4)).astype(np.float32) * 1e-3 + 5
    g = x.astype(np.float64).reshape(2, 4, -1)
    ref = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-6))
    ours = GroupNorm(4, 64, eps=1e-6)(mx.array(x.transpose(0, 2, 3, 1)))
    assert np.abs(nchw(ours).reshape(2, 4, -1) - ref).max() <= 1e-5


def _group_norm_error(x: np.ndarray, y: np.ndarray, groups: int, eps: float = 1e-6) -> float:
    """max |y - ref| / max |ref| for ref = GroupNorm(x) in float64, x, y (1, H, W, C);
    taken a band of rows at a time (a 4K float64 copy would be 0.5 GB)."""
    c = x.shape[-1]
    bands = [slice(r, r + 256) for r in range(0, x.shape[1], 256)]
    per_group = lambda s: s.reshape(groups, -1).sum(-1)  # noqa: E731  (C,) -> (groups,)
    n = x[0, ..., 0].size * (c // groups)
    mean = per_group(x.reshape(-1, c).sum(0, dtype=np.float64)) / n
    mean = np.repeat(mean, c // groups)
    var = sum(per_group(np.square(x[0, b] - mean).reshape(-1, c).sum(0)) for b in bands) / n
    scale = np.repeat(1 / np.sqrt(var + eps), c // groups)
    err = top = 0.0
    for b in bands:
        ref = (x[0, b] - mean) * scale
        err, top = max(err, np.abs(y[0, b] - ref).max()), max(top, np.abs(ref).max())
    return err / top


@pytest.mark.parametrize("height, width", [(832, 1248), (2160, 3840)])
def test_group_norm_precise_at_full_resolution(height, width):
    """The first VAE level's GroupNorm at the image's own size: 4 channels per group (the
    FLUX VAE's 128 channels / 32 groups), so each group holds as many values as the real
    layer's (4.2M at 1248x832, 33M at 4K); 2 of its 32 groups (8 channels) keep the test
    to seconds. Channels get their own mean and spread. A plain
    float32 mean/variance is 1e-5 (1248x832) to 3e-4 (4K) off; float64 reference."""
    from mlx_edit.models.layers import group_norm

    rng = np.random.default_rng(0)
    x = rng.random((1, height, width, 8), dtype=np.float32) - 0.5
    x = x * rng.uniform(0.2, 2, 8).astype(np.float32) + rng.uniform(-3, 3, 8).astype(np.float32)
    y = np.array(group_norm(mx.array(x), 2, 1e-6))
    assert y.dtype == np.float32
    assert _group_norm_error(x, y, 2) <= 1e-6


# Widths whose channels per group equal the FLUX VAE's at every level (128/32, 256/32,
# 512/32 -> 4, 8, 16): each GroupNorm group holds as many values as in the real VAE at
# the same image size, which is what float32 statistics are sensitive to; narrow, so a
# real-size image costs seconds. No mid-block attention: the float64 reference's 16K x 16K
# scores would take a minute (test_attention_precise_at_full_resolution checks ours).
FULL_RES = dict(
    block_out_channels=(8, 16, 32, 32), latent_channels=16, layers_per_block=1,
    norm_num_groups=2, use_quant_conv=False, use_post_quant_conv=False,
    mid_block_add_attention=False, **FLUX_FACTORS,
)


@pytest.fixture(scope="module")
def full_res(tmp_path_factory):
    """The FULL_RES VAE saved as a diffusers folder and a BFL file, and its float64 copy:
    the reference at full size (diffusers in float32 is itself up to 8e-5 off float64
    there: torch's CPU GroupNorm on photo activations; ours stays within 1e-5)."""
    import copy

    root = tmp_path_factory.mktemp("vae_full_res")
    ref = build_reference(FULL_RES, seed=4)
    ref.save_pretrained(root / "vae", safe_serialization=True)
    check_bfl_file(ref, root / "ae.safetensors", 4)
    return dict(ref=ref, ref64=copy.deepcopy(ref).double(), root=root)


def _photo(height: int, width: int) -> np.ndarray:
    """skimage's coffee photo resized to (1, 3, height, width) float32 in [-1, 1]."""
    from skimage.data import coffee
    from skimage.transform import resize

    image = resize(coffee(), (height, width), anti_aliasing=True)  # float64 in [0, 1]
    return (image.transpose(2, 0, 1)[None] * 2 - 1).astype(np.float32)


@pytest.mark.parity
def test_encode_photo_at_1248x832(full_res):
    """A 1248x832 photo (4.2M values per group at the first level): float32 statistics
    over groups that large were 1e-4 off before `group_norm`'s centred sums."""
    image = _photo(832, 1248)
    with torch.no_grad():
        dist = full_res["ref64"].encode(torch.from_numpy(image).double()).latent_dist
    model = load_vae(full_res["root"] / "vae", dtype=mx.float32)
    with model.banded(2**28):
        mean, logvar = model.encode(mx.array(image.transpose(0, 2, 3, 1)))
    assert rel_err(nchw(mean), dist.mean.numpy()) <= 1e-5
    assert rel_err(nchw(logvar), dist.logvar.numpy()) <= 1e-5


@pytest.mark.parity
def test_bfl_file_decode_at_1024x1024(full_res):
    """The BFL single file (ae.safetensors names) decoding a 1024x1024 image."""
    latent = make_latent(1, 128, 128)
    with torch.no_grad():
        ref = full_res["ref64"].decode(torch.from_numpy(latent).double()).sample.numpy()
    cfg = VAEConfig.from_dict(dict(full_res["ref"].config))
    model = load_vae(full_res["root"] / "ae.safetensors", dtype=mx.float32, config=cfg)
    with model.banded(2**28):
        assert rel_err(nchw(model.decode(mx.array(latent.transpose(0, 2, 3, 1)))), ref) <= 1e-5


def test_attention_precise_at_full_resolution():
    """The mid-block attention of a 1248x832 image: 156 x 104 = 16K pixels, each query's
    softmax a sum over 16K keys; float64 reference."""
    from mlx_edit.models.vae import Attention

    h, w, c = 104, 156, 32
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, h, w, c), dtype=np.float32)
    attn = Attention(c, 2)
    params = {name: (rng.standard_normal(p.shape, dtype=np.float32) * (c**-0.5 if p.ndim > 1 else 0.1)
                     + (1 if name.endswith("group_norm.weight") else 0))
              for name, p in tree_flatten(attn.parameters())}
    attn.load_weights([(k, mx.array(v)) for k, v in params.items()])
    attn.max_bytes = 2**26
    ours = np.array(attn(mx.array(x))).reshape(h * w, c)
    p = {k: v.astype(np.float64) for k, v in params.items()}
    g = x.astype(np.float64).reshape(h * w, 2, c // 2)
    t = ((g - g.mean((0, 2))[None, :, None]) / np.sqrt(g.var((0, 2))[None, :, None] + 1e-6))
    t = t.reshape(h * w, c) * p["group_norm.weight"] + p["group_norm.bias"]
    q, k, v = (t @ p[f"to_{n}.weight"].T + p[f"to_{n}.bias"] for n in "qkv")
    rows = slice(0, h * w, 8)  # every 8th query (each still attends to all 16K keys)
    scores = q[rows] @ k.T / np.sqrt(c)
    probs = np.exp(scores - scores.max(1, keepdims=True))
    o = (probs / probs.sum(1, keepdims=True)) @ v
    ref = x[0].reshape(-1, c)[rows] + o @ p["to_out.0.weight"].T + p["to_out.0.bias"]
    print(f"attention rel err {np.abs(ours[rows] - ref).max() / np.abs(ref).max():.2e}")
    assert np.abs(ours[rows] - ref).max() <= 1e-5 * np.abs(ref).max()
