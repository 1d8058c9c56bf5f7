"""FLUX.2 VAE (diffusers AutoencoderKLFlux2) and its latent path against diffusers, float32.

- encode (posterior mean / logvar) and decode of our AutoencoderKL built from the
  diffusers `vae/` folder: <= 1e-4 relative;
- image -> normalised packed tokens through the pipeline's own helpers
  (`Flux2KleinPipeline._encode_vae_image`, `_pack_latents`, `prepare_image_latents`) and
  tokens -> latents -> image (`_unpack_latents_with_ids`, the bn de-normalisation of
  `__call__`, `_unpatchify_latents`, `vae.decode`): <= 1e-4 relative;
- the ids, patchify and size helpers equal diffusers';
- a BFL-named file (names as BFL's flux2 `AutoEncoder` has them) loads bit-identical to
  the diffusers folder; the test's BFL names are checked against diffusers' LDM converter
  and the FLUX.2 extras of `scripts/convert_flux2_to_diffusers.py`.
"""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import types

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_vae import rel_err, to_bfl

from mlx_edit.models.vae import VAEConfig
from mlx_edit.sampling import latents_flux2 as lf
from mlx_edit.weights.vae import load_vae

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.parity

# Tiny widths, the real latent layout (32 channels, quant convs, 2x2 batch norm); the
# decoder narrower than the encoder (`decoder_block_out_channels`; None in the real one).
TINY = dict(block_out_channels=(8, 16, 16, 16), decoder_block_out_channels=(8, 8, 16, 16),
            latent_channels=32, layers_per_block=1, norm_num_groups=4)
# The real FLUX.2 VAE (black-forest-labs/FLUX.2-klein-4B vae/config.json): the defaults.
WIDE: dict = {}
# diffusers name -> BFL flux2 AutoEncoder name of what FLUX.1's LDM names lack
# (diffusers scripts/convert_flux2_to_diffusers.py DIFFUSERS_VAE_TO_FLUX2_MAPPING; the
# counter is a BatchNorm2d buffer in both).
FLUX2_EXTRAS = {
    "quant_conv.weight": "encoder.quant_conv.weight",
    "quant_conv.bias": "encoder.quant_conv.bias",
    "post_quant_conv.weight": "decoder.post_quant_conv.weight",
    "post_quant_conv.bias": "decoder.post_quant_conv.bias",
    "bn.running_mean": "bn.running_mean",
    "bn.running_var": "bn.running_var",
    "bn.num_batches_tracked": "bn.num_batches_tracked",
}


def build_reference(cfg, seed=0):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    model = AutoencoderKLFlux2(**cfg).eval()
    with torch.no_grad():  # norms start as identity, biases as zeros: perturb them
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn_like(p))
        n = model.bn.running_mean.shape[0]
        model.bn.running_mean.copy_(0.5 * torch.randn(n))
        model.bn.running_var.copy_(0.01 + 2 * torch.rand(n))  # eps (1e-4) shows
        model.bn.num_batches_tracked.fill_(7)
    return model


def pipeline_stub(vae):
    """What Flux2KleinPipeline's latent helpers read of `self`: the VAE and the static
    helpers (the methods run unbound, so the pipeline's own code is what runs)."""
    from diffusers import Flux2KleinPipeline as P

    stub = types.SimpleNamespace(vae=vae, _patchify_latents=P._patchify_latents,
                                 _pack_latents=P._pack_latents,
                                 _prepare_image_ids=P._prepare_image_ids)
    stub._encode_vae_image = lambda image, generator: P._encode_vae_image(stub, image, generator)
    return stub


def assert_params_equal(a, b):
    pa = {k: np.array(v) for k, v in tree_flatten(a.parameters())}
    pb = {k: np.array(v) for k, v in tree_flatten(b.parameters())}
    assert pa.keys() == pb.keys()
    for k in pa:
        assert np.array_equal(pa[k], pb[k]), k


def nhwc(x):
    return mx.array(np.asarray(x).transpose(0, 2, 3, 1))


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def images(*shapes, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, (1, 3, h, w)).astype(np.float32) for h, w in shapes]


def bn_args(model):
    return model.bn.running_mean, model.bn.running_var, model.bn.eps


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_flux2")
    ref = build_reference(TINY)
    ref.save_pretrained(root / "vae", safe_serialization=True)
    return dict(ref=ref, root=root, model=load_vae(root / "vae", dtype=mx.float32))


def check_encode_decode(model, ref, image, latent):
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(image)).latent_dist
        dec = ref.decode(torch.from_numpy(latent)).sample.numpy()
    mean, logvar = model.encode(nhwc(image))
    errs = [rel_err(nchw(mean), dist.mean.numpy()), rel_err(nchw(logvar), dist.logvar.numpy()),
            rel_err(nchw(model.decode(nhwc(latent))), dec)]
    print("rel errors mean/logvar/decode:", [f"{e:.2e}" for e in errs])
    assert max(errs) <= 1e-4


def test_tiny_encode_decode(tiny):
    model = tiny["model"]
    cfg = model.config
    assert (cfg.latent_channels, cfg.patch_size, cfg.bn_channels) == (32, (2, 2), 128)
    assert (cfg.scaling_factor, cfg.shift_factor, cfg.batch_norm_eps) == (1.0, 0.0, 1e-4)
    assert np.array_equal(np.array(model.bn.running_var), tiny["ref"].bn.running_var.numpy())
    (image,) = images((48, 80))
    latent = np.random.default_rng(2).standard_normal((2, 32, 6, 10)).astype(np.float32)
    check_encode_decode(model, tiny["ref"], np.concatenate([image, -image]), latent)


def test_image_to_tokens_matches_pipeline(tiny):
    """Two references of different sizes (one at the 1024 px area's real grid width) ->
    packed normalised tokens and ids, as Flux2KleinPipeline.prepare_image_latents."""
    from diffusers import Flux2KleinPipeline as P

    model, stub = tiny["model"], pipeline_stub(tiny["ref"])
    refs = images((64, 96), (32, 1024))
    with torch.no_grad():
        want, want_ids = P.prepare_image_latents(
            stub, [torch.from_numpy(x) for x in refs], batch_size=1, generator=None,
            device="cpu", dtype=torch.float32)
    tokens = [lf.tokens_from_latents(model.encode_mean(nhwc(x)), *bn_args(model)) for x in refs]
    got = mx.concatenate(tokens, axis=1)
    grids = [(x.shape[2] // 16, x.shape[3] // 16) for x in refs]
    assert got.shape == tuple(want.shape) == (1, 4 * 6 + 2 * 64, 128)
    assert rel_err(got, want.numpy()) <= 1e-4
    assert np.array_equal(np.array(lf.reference_ids(grids)), want_ids[0].numpy())


def test_tokens_to_image_matches_pipeline(tiny):
    """Tokens in a shuffled order with their ids -> latents -> image, as the end of
    Flux2KleinPipeline.__call__ (its bn lines restated here: they are inline there)."""
    from diffusers import Flux2KleinPipeline as P

    model, ref = tiny["model"], tiny["ref"]
    h, w = 3, 5
    rng = np.random.default_rng(3)
    tokens = rng.standard_normal((2, h * w, 128)).astype(np.float32)
    order = rng.permutation(h * w)
    ids = np.array(lf.latent_ids(h, w))[order]
    with torch.no_grad():
        t_ids = torch.from_numpy(ids).long()[None].expand(2, -1, -1)
        x = P._unpack_latents_with_ids(torch.from_numpy(tokens[:, order]), t_ids, h, w)
        mean = ref.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
        want = P._unpatchify_latents(x * std + mean)
        want_image = ref.decode(want).sample.numpy()
    got = lf.latents_from_tokens(mx.array(tokens[:, order]), mx.array(ids), h, w,
                                 *bn_args(model))
    assert rel_err(nchw(got), want.numpy()) <= 1e-5
    assert rel_err(nchw(model.decode(got)), want_image) <= 1e-4


def test_pipeline_encode_path_at_real_size(tiny):
    """A 256 x 384 image (a real input size; tiny widths) -> tokens, against
    `_encode_vae_image` + `_pack_latents`, and back through the helpers exactly."""
    from diffusers import Flux2KleinPipeline as P

    model, stub = tiny["model"], pipeline_stub(tiny["ref"])
    (image,) = images((256, 384), seed=4)
    with torch.no_grad():
        want = P._pack_latents(stub._encode_vae_image(torch.from_numpy(image), None)).numpy()
    z = model.encode_mean(nhwc(image))
    got = lf.tokens_from_latents(z, *bn_args(model))
    assert got.shape == want.shape == (1, 16 * 24, 128)
    assert rel_err(got, want) <= 1e-4
    back = lf.latents_from_tokens(got, lf.latent_ids(16, 24), 16, 24, *bn_args(model))
    assert rel_err(back, z) <= 1e-5


@pytest.mark.parametrize("h, w", [(2, 2), (4, 6), (6, 4)])
def test_patchify_and_ids_equal_diffusers(h, w):
    from diffusers import Flux2KleinInpaintPipeline as I
    from diffusers import Flux2KleinPipeline as P

    x = np.random.default_rng(5).standard_normal((2, 3, h, w)).astype(np.float32)
    patched = P._patchify_latents(torch.from_numpy(x)).numpy()
    assert np.array_equal(nchw(lf.patchify_latents(nhwc(x))), patched)
    assert np.array_equal(nchw(lf.unpatchify_latents(nhwc(patched))), x)
    grids = [(h // 2, w // 2), (w, h), (1, 3)]
    assert np.array_equal(np.array(lf.latent_ids(h, w)),
                          P._prepare_latent_ids(torch.zeros(1, 128, h, w))[0].numpy())
    lat = [torch.zeros(1, 128, a, b) for a, b in grids]
    ours = np.array(lf.reference_ids(grids))
    assert np.array_equal(ours, P._prepare_image_ids(lat)[0].numpy())
    assert np.array_equal(ours, I._prepare_image_ids(lat, batch_size=1)[0].numpy())
    assert np.array_equal(np.array(lf.text_ids(h * w)),
                          P._prepare_text_ids(torch.zeros(1, h * w, 8))[0].numpy())


@pytest.mark.parametrize("size", [(640, 480), (1024, 1024), (1500, 900), (3000, 2000),
                                  (1025, 1024), (97, 300)])
def test_image_sizes_equal_diffusers(size):
    """Flux2KleinPipeline's size steps: `_resize_to_target_area` above 1024^2 px, then
    sides rounded down to vae_scale_factor * 2."""
    import PIL.Image
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    img = PIL.Image.new("RGB", size)
    if size[0] * size[1] > 1024 * 1024:
        img = Flux2ImageProcessor._resize_to_target_area(img, 1024 * 1024)
    w, h = img.size
    resized, final = lf.image_sizes(size[1], size[0])
    assert resized == (h, w) and final == (h // 16 * 16, w // 16 * 16)


def to_bfl_flux2(state: dict) -> dict:
    """diffusers AutoencoderKLFlux2 names -> BFL flux2 `AutoEncoder` names: FLUX.1's LDM
    names (test_vae.to_bfl) plus FLUX2_EXTRAS."""
    extras = {FLUX2_EXTRAS[k]: v.contiguous() for k, v in state.items() if k in FLUX2_EXTRAS}
    return {**to_bfl({k: v for k, v in state.items() if k not in FLUX2_EXTRAS}, 4), **extras}


def check_bfl_names(ref, bfl: dict) -> None:
    """The BFL names map back to the diffusers state: the LDM part through diffusers'
    own converter, the extras through FLUX2_EXTRAS."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = ref.state_dict()
    back = convert_ldm_vae_checkpoint(bfl, dict(ref.config))
    assert sorted(back) == sorted(k for k in state if k not in FLUX2_EXTRAS)
    back.update({k: bfl[v] for k, v in FLUX2_EXTRAS.items()})
    for k, v in state.items():
        assert torch.equal(back[k], v), k


def test_bfl_file_equals_diffusers_folder(tiny, tmp_path):
    from safetensors.torch import save_file

    bfl = to_bfl_flux2(tiny["ref"].state_dict())
    check_bfl_names(tiny["ref"], bfl)
    save_file(bfl, str(tmp_path / "flux2-vae.safetensors"))
    ours = load_vae(tmp_path / "flux2-vae.safetensors", dtype=mx.float32,
                    config={**TINY, "patch_size": [2, 2]})
    assert ours.config == tiny["model"].config
    assert_params_equal(ours, tiny["model"])


@pytest.mark.slow
def test_wide_flux2_vae(tmp_path):
    """Real widths: diffusers folder parity, and the BFL file with no config at all
    (latent channels, quant convs and the batch norm read off its keys)."""
    from safetensors.torch import save_file

    ref = build_reference(WIDE, seed=3)
    ref.save_pretrained(tmp_path / "vae", safe_serialization=True)
    model = load_vae(tmp_path / "vae", dtype=mx.float32)
    assert model.config == VAEConfig.flux2()
    (image,) = images((48, 64))
    latent = np.random.default_rng(2).standard_normal((1, 32, 6, 8)).astype(np.float32)
    check_encode_decode(model, ref, image, latent)
    bfl = to_bfl_flux2(ref.state_dict())
    check_bfl_names(ref, bfl)
    save_file(bfl, str(tmp_path / "flux2-vae.safetensors"))
    ours = load_vae(tmp_path / "flux2-vae.safetensors", dtype=mx.float32)
    assert ours.config.latent_channels == 32 and ours.config.patch_size == (2, 2)
    assert_params_equal(ours, model)
