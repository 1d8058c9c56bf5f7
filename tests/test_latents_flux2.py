"""FLUX.2 latent helpers and the FLUX.2 VAE config / BFL loading, torch-free.

Parity with diffusers (the pipeline's own helpers, AutoencoderKLFlux2) is in
tests/test_vae_flux2.py; these check layouts, inverses and errors without torch.
"""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest
from conftest import import_script
from mlx.utils import tree_flatten
from safetensors.numpy import save_file

from mlx_edit.models.vae import AutoencoderKL, VAEConfig
from mlx_edit.sampling import latents_flux2 as lf
from mlx_edit.weights import vae as vae_keys
from mlx_edit.weights.core import WeightLoadError
from mlx_edit.weights.vae import load_vae

# black-forest-labs/FLUX.2-klein-4B vae/config.json (what diffusers writes for it)
FLUX2_CONFIG = {
    "_class_name": "AutoencoderKLFlux2", "act_fn": "silu", "batch_norm_eps": 0.0001,
    "batch_norm_momentum": 0.1, "block_out_channels": [128, 256, 512, 512],
    "decoder_block_out_channels": None, "force_upcast": True, "in_channels": 3,
    "latent_channels": 32, "layers_per_block": 2, "mid_block_add_attention": True,
    "norm_num_groups": 32, "out_channels": 3, "patch_size": [2, 2], "sample_size": 1024,
    "use_post_quant_conv": True, "use_quant_conv": True,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
TINY = dict(FLUX2_CONFIG, block_out_channels=[8, 16, 16, 16], layers_per_block=1,
            norm_num_groups=4)


def test_flux2_config():
    cfg = VAEConfig.from_dict(FLUX2_CONFIG)
    assert (cfg.latent_channels, cfg.patch_size, cfg.bn_channels, cfg.scale_factor) == (
        32, (2, 2), 128, 8)
    assert (cfg.scaling_factor, cfg.shift_factor, cfg.use_quant_conv) == (1.0, 0.0, True)
    assert VAEConfig.flux2() == cfg
    with pytest.raises(ValueError, match="patch_size"):
        VAEConfig.from_dict({**FLUX2_CONFIG, "patch_size": [1, 1]})
    model = AutoencoderKL(VAEConfig.from_dict(TINY))
    assert model.bn.running_mean.shape == (128,) and model.bn.eps == 1e-4
    assert "bn" not in AutoencoderKL(VAEConfig.from_dict({**TINY, "patch_size": None}))
    narrow = VAEConfig.from_dict({**TINY, "decoder_block_out_channels": [8, 8, 16, 16]})
    assert AutoencoderKL(narrow).decoder.conv_out.weight.shape == (3, 3, 3, 8)


def test_patchify_layout_and_inverse():
    x = mx.arange(2 * 4 * 6 * 3, dtype=mx.float32).reshape(2, 4, 6, 3)
    p = lf.patchify_latents(x)
    assert p.shape == (2, 2, 3, 12)
    # channel 4c + 2ph + pw of patch (i, j) is x[2i + ph, 2j + pw, c]
    assert p[1, 1, 2, 4 * 2 + 2 * 1 + 0].item() == x[1, 3, 4, 2].item()
    assert mx.array_equal(lf.unpatchify_latents(p), x)
    with pytest.raises(ValueError, match="even"):
        lf.patchify_latents(x[:, :3])
    with pytest.raises(ValueError, match="divisible by 4"):
        lf.unpatchify_latents(p[..., :6])
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        lf.patchify_latents(x[0])


def test_normalize_inverse_and_dtype():
    rng = np.random.default_rng(0)
    mean = mx.array(rng.standard_normal(8).astype(np.float32))
    var = mx.array(rng.uniform(0.01, 2, 8).astype(np.float32))
    x = mx.array(rng.standard_normal((2, 3, 8)).astype(np.float32))
    y = lf.normalize_latents(x, mean, var, 1e-4)
    want = (np.array(x) - np.array(mean)) / np.sqrt(np.array(var) + 1e-4)
    np.testing.assert_allclose(np.array(y), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(lf.denormalize_latents(y, mean, var, 1e-4)),
                               np.array(x), rtol=1e-5, atol=1e-5)
    assert lf.normalize_latents(x.astype(mx.bfloat16), mean, var, 1e-4).dtype == mx.bfloat16


def test_unpack_by_ids():
    h, w = 3, 4
    x = mx.array(np.random.default_rng(1).standard_normal((2, h, w, 5)).astype(np.float32))
    tokens, ids = lf.pack_latents(x), lf.latent_ids(h, w)
    assert mx.array_equal(lf.unpack_latents(tokens, ids, h, w), x)
    order = mx.array(np.random.default_rng(2).permutation(h * w))
    assert mx.array_equal(lf.unpack_latents(tokens[:, order], ids[order], h, w), x)
    part = lf.unpack_latents(tokens[:, :5], ids[:5], h, w)  # cells no token names: zero
    assert mx.array_equal(part.reshape(2, -1, 5)[:, 5:], mx.zeros((2, h * w - 5, 5)))
    with pytest.raises(ValueError, match=r"\(N, 4\) ids"):
        lf.unpack_latents(tokens, ids[:5], h, w)


def test_tokens_round_trip():
    rng = np.random.default_rng(3)
    z = mx.array(rng.standard_normal((1, 6, 10, 32)).astype(np.float32))
    mean = mx.array(rng.standard_normal(128).astype(np.float32))
    var = mx.array(rng.uniform(0.5, 2, 128).astype(np.float32))
    t = lf.tokens_from_latents(z, mean, var, 1e-4)
    assert t.shape == (1, 15, 128)
    back = lf.latents_from_tokens(t, lf.latent_ids(3, 5), 3, 5, mean, var, 1e-4)
    np.testing.assert_allclose(np.array(back), np.array(z), rtol=1e-5, atol=1e-5)


def test_ids():
    assert lf.latent_ids(2, 3).tolist() == [[0, r, c, 0] for r in range(2) for c in range(3)]
    ids = lf.reference_ids([(1, 2), (2, 1)]).tolist()
    assert ids == [[10, 0, 0, 0], [10, 0, 1, 0], [20, 0, 0, 0], [20, 1, 0, 0]]
    assert lf.reference_ids([(1, 1)] * 3, scale=5)[:, 0].tolist() == [5, 10, 15]
    assert lf.text_ids(3).tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2]]
    assert lf.latent_ids(2, 2).dtype == mx.float32
    with pytest.raises(ValueError, match="at least one"):
        lf.reference_ids([])


def test_image_sizes():
    assert lf.image_sizes(480, 640) == ((480, 640), (480, 640))
    assert lf.image_sizes(500, 650) == ((500, 650), (496, 640))
    resized, final = lf.image_sizes(2000, 3000)
    assert resized == (836, 1254) and final == (832, 1248)
    with pytest.raises(ValueError, match="smaller than 16"):
        lf.image_sizes(10, 900)


def test_bfl_flux2_file_without_config(tmp_path):
    """A BFL-named FLUX.2 file (quant convs inside encoder/decoder, `bn.*`, the batch
    counter) loads with no config: 32 latent channels and 2x2 patches read off `bn`."""
    mmc = import_script("make_mlx_checkpoint")
    cfg = VAEConfig.from_dict(TINY)
    params = mmc.random_params(AutoencoderKL, cfg, 0)
    bfl = mmc.to_checkpoint(params, vae_keys.bfl_rules(4, flux2=True))
    assert {"encoder.quant_conv.weight", "decoder.post_quant_conv.bias",
            "bn.running_var"} <= bfl.keys() and "quant_conv.weight" not in bfl
    bfl["bn.num_batches_tracked"] = np.array(7, dtype=np.int64)
    save_file(bfl, str(tmp_path / "ae.safetensors"))
    given = {k: TINY[k] for k in ("block_out_channels", "layers_per_block", "norm_num_groups")}
    model = load_vae(tmp_path / "ae.safetensors", dtype=mx.float32, config=given)
    assert model.config == cfg
    loaded = dict(tree_flatten(model.parameters()))
    assert loaded.keys() == params.keys()
    assert all(np.array_equal(np.array(loaded[k]), v) for k, v in params.items())
    bfl.pop("bn.running_mean")  # now neither FLUX.2 (no bn) nor complete: strict
    bfl.pop("bn.running_var")
    save_file(bfl, str(tmp_path / "ae.safetensors"))
    with pytest.raises(WeightLoadError, match="encoder.quant_conv.weight"):
        load_vae(tmp_path / "ae.safetensors", dtype=mx.float32, config=given)


def test_diffusers_folder_converts_to_mlx_folder(tmp_path):
    """A diffusers FLUX.2 `vae/` folder (with the batch counter) -> `mlx-edit convert`'s
    component folder -> the same model, batch-norm statistics included."""
    from mlx_edit.weights.convert import convert_component, open_component

    mmc = import_script("make_mlx_checkpoint")
    params = mmc.write_component(tmp_path, "vae", TINY, 0)
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = dict(mx.load(str(weights)))
    save_file({**{k: np.array(v) for k, v in tensors.items()},
               "bn.num_batches_tracked": np.array(3, dtype=np.int64)}, str(weights))
    convert_component(open_component("vae", tmp_path / "vae"), tmp_path / "mlx", mx.float32,
                      None)
    for path in (tmp_path / "vae", tmp_path / "mlx"):
        model = load_vae(path, dtype=mx.float32)
        assert model.config == VAEConfig.from_dict(TINY)
        loaded = dict(tree_flatten(model.parameters()))
        assert all(np.array_equal(np.array(loaded[k]), v) for k, v in params.items())
