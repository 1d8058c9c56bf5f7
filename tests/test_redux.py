"""FLUX.1 Redux: SigLIP vision tower, Redux embedder and the prompt combination, against
transformers' SiglipVisionModel and diffusers' ReduxImageEncoder / FluxPriorReduxPipeline.

The diffusers pipeline is loaded with `FluxPriorReduxPipeline.from_pretrained` from the
fixture folder (scripts/image_prompt_fixtures.py), which checks its FLUX.1-Redux-dev
layout too. Metric: max|ours - ref| / max|ref| in float32, tolerance 1e-4; preprocessing
is exact.
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)


import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file
from skimage import data

from contexts import make_context
from mlx_edit.models.flux import FluxConfig
from mlx_edit.conditioning.image_prompts import (
    ReduxSpec,
    prepare_redux,
    prior_redux_embeds,
    redux_tokens,
    siglip_preprocess,
)
from mlx_edit.imaging.images import InputError
from mlx_edit.sampling.denoise import PromptEmbeds
from mlx_edit.weights.core import WeightLoadError
from mlx_edit.weights.vision import load_redux_embedder, load_siglip_vision, resolve_redux
from conftest import import_script

pytestmark = pytest.mark.parity
torch = pytest.importorskip("torch")  # the parity extra: every test here uses it
fx = import_script("image_prompt_fixtures")

TOL = 1e-4
TXT_DIM = 32  # the tiny transformer's joint_attention_dim
TRANSFORMER = dict(joint_attention_dim=TXT_DIM, num_attention_heads=2, attention_head_dim=16)


def rel_err(ours, ref) -> float:
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def photos() -> list[Image.Image]:
    return [Image.fromarray(data.coffee()), Image.fromarray(data.chelsea())]


def pipe_like(dtype=mx.float32, width=TXT_DIM):
    return make_context(FluxConfig(joint_attention_dim=width, in_channels=64), dtype=dtype)


@pytest.fixture(scope="module")
def redux_folder(tmp_path_factory):
    return fx.write_redux(tmp_path_factory.mktemp("redux") / "redux", TRANSFORMER, "tiny", seed=7)


def test_siglip_preprocess_equals_transformers():
    from transformers import SiglipImageProcessor

    proc = SiglipImageProcessor(size={"height": 384, "width": 384})
    for im in photos() + [Image.fromarray(data.astronaut()).resize((97, 301))]:
        ref = proc(im, return_tensors="np").pixel_values[0].transpose(1, 2, 0)
        ours = siglip_preprocess(im, 384)
        assert ours.dtype == np.float32 and np.array_equal(ours, ref), np.abs(ours - ref).max()


@pytest.mark.parametrize("preset", ["tiny", "wide"], ids=["tiny", "so400m-width"])
def test_siglip_matches_transformers(preset, tmp_path):
    cfg = fx.siglip_vision_config(preset)
    if preset == "wide":  # so400m widths; one layer keeps the CPU reference fast
        cfg["num_hidden_layers"] = 1
    ref = fx.make_siglip_vision(cfg, seed=1)
    ref.save_pretrained(tmp_path)  # transformers 5: keys without `vision_model.`, with head
    ours = load_siglip_vision(tmp_path, mx.float32)
    ims = photos() if preset == "tiny" else photos()[:1]
    px = np.stack([siglip_preprocess(im, 384) for im in ims])
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(px.transpose(0, 3, 1, 2).copy()))
    got = ours(mx.array(px))
    assert got.shape == (len(ims), 729, cfg["hidden_size"])
    assert rel_err(got, want.last_hidden_state) <= TOL


def test_siglip_hub_layout_and_full_model(tmp_path):
    """Hub files name keys `vision_model.*`; a full SiglipModel also has a text half."""
    import transformers

    vcfg = fx.siglip_vision_config("tiny")
    torch.manual_seed(0)
    full = transformers.SiglipModel(transformers.SiglipConfig(
        vision_config=vcfg, text_config=dict(hidden_size=32, intermediate_size=37,
                                             num_hidden_layers=1, num_attention_heads=4,
                                             vocab_size=99))).eval()
    full.save_pretrained(tmp_path)
    ours = load_siglip_vision(tmp_path, mx.float32)
    px = siglip_preprocess(photos()[0], 384)[None]
    with torch.no_grad():
        want = full.vision_model(pixel_values=torch.from_numpy(px.transpose(0, 3, 1, 2).copy()))
    assert rel_err(ours(mx.array(px)), want.last_hidden_state) <= TOL


@pytest.mark.parametrize("dims", [(32, TXT_DIM), (1152, 4096)], ids=["tiny", "redux-dev"])
def test_redux_embedder_matches_diffusers(dims, tmp_path):
    ref = fx.make_redux_embedder(*dims, seed=2)
    ref.save_pretrained(tmp_path / "image_embedder", safe_serialization=True)
    ours = load_redux_embedder(tmp_path / "image_embedder", mx.float32)
    x = np.random.default_rng(0).standard_normal((1, 64, dims[0])).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).image_embeds
    assert rel_err(ours(mx.array(x)), want) <= TOL


def test_bfl_file_equals_folder_and_strictness(redux_folder, tmp_path):
    folder = load_redux_embedder(redux_folder / "image_embedder", mx.float32)
    bfl = load_redux_embedder(redux_folder / "flux1-redux-dev.safetensors", mx.float32)
    assert bfl.config == folder.config
    assert np.array_equal(np.array(bfl.redux_down.weight), np.array(folder.redux_down.weight))
    raw = load_file(redux_folder / "flux1-redux-dev.safetensors")
    save_file(dict(raw, extra=np.zeros(2, np.float32)), tmp_path / "extra.safetensors")
    with pytest.raises(WeightLoadError, match="unexpected: extra"):
        load_redux_embedder(tmp_path / "extra.safetensors", mx.float32)
    # the BFL file alone: no SigLIP beside it
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "flux1-redux-dev.safetensors").write_bytes(
        (redux_folder / "flux1-redux-dev.safetensors").read_bytes())
    with pytest.raises(WeightLoadError, match="no SigLIP vision tower"):
        resolve_redux(lone)
    emb, enc = resolve_redux(lone, image_encoder=redux_folder / "image_encoder")
    assert emb.name == "flux1-redux-dev.safetensors" and enc.name == "image_encoder"


@pytest.fixture(scope="module")
def diffusers_prior(redux_folder):
    """FluxPriorReduxPipeline from the fixture folder, with a (tiny) text encoder attached
    so that given prompt_embeds are used instead of its 4096-wide zeros."""
    import transformers
    from diffusers import FluxPriorReduxPipeline

    pipe = FluxPriorReduxPipeline.from_pretrained(redux_folder, dtype=torch.float32)
    torch.manual_seed(0)
    pipe.text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
        vocab_size=99))
    return pipe


def test_single_image_matches_prior_pipeline(redux_folder, diffusers_prior):
    g = np.random.default_rng(3)
    txt = g.standard_normal((1, 11, TXT_DIM)).astype(np.float32)
    pooled = g.standard_normal((1, 24)).astype(np.float32)
    want = diffusers_prior(image=photos()[0], prompt_embeds=torch.from_numpy(txt),
                           pooled_prompt_embeds=torch.from_numpy(pooled), return_dict=False)
    embeds = PromptEmbeds(mx.array(txt), mx.array(pooled))
    got = prepare_redux(pipe_like(), [ReduxSpec(redux_folder, photos()[0])], embeds)
    assert got.txt.shape == (1, 11 + 729, TXT_DIM)
    assert rel_err(got.txt, want[0]) <= TOL
    assert np.array_equal(np.array(got.pooled), pooled)


def test_several_images_prior_combination(redux_folder, diffusers_prior):
    """diffusers sums the scaled [txt, tokens_i] over images; `prior_redux_embeds` does
    the same with our tokens. Our own rule keeps each image's tokens (appended)."""
    g = np.random.default_rng(4)
    txt = g.standard_normal((1, 9, TXT_DIM)).astype(np.float32)
    pooled = g.standard_normal((1, 24)).astype(np.float32)
    scales, pooled_scales = [0.7, 1.3], [0.5, 0.9]
    want = diffusers_prior(image=photos(), prompt_embeds=torch.from_numpy(txt).repeat(2, 1, 1),
                           pooled_prompt_embeds=torch.from_numpy(pooled).repeat(2, 1),
                           prompt_embeds_scale=scales, pooled_prompt_embeds_scale=pooled_scales,
                           return_dict=False)
    specs = [ReduxSpec(redux_folder, im) for im in photos()]
    tokens = redux_tokens(pipe_like(), specs)
    seq, pool = prior_redux_embeds(mx.array(txt), mx.array(pooled), tokens, scales,
                                   pooled_scales)
    assert rel_err(seq, want[0]) <= TOL and rel_err(pool, want[1]) <= TOL
    specs = [ReduxSpec(redux_folder, im, s) for im, s in zip(photos(), scales)]
    got = prepare_redux(pipe_like(), specs, PromptEmbeds(mx.array(txt), mx.array(pooled)))
    assert got.txt.shape == (1, 9 + 2 * 729, TXT_DIM)
    assert np.array_equal(np.array(got.txt[:, :9]), txt)
    for i, s in enumerate(scales):
        part = got.txt[:, 9 + 729 * i : 9 + 729 * (i + 1)]
        assert rel_err(part, np.array(tokens[i]) * s) <= 1e-6


def test_redux_input_errors(redux_folder):
    embeds = PromptEmbeds(mx.zeros((1, 4, TXT_DIM)), mx.zeros((1, 24)))
    with pytest.raises(InputError, match="--redux-strength must be"):
        prepare_redux(pipe_like(), [ReduxSpec(redux_folder, photos()[0], -1.0)], embeds)
    with pytest.raises(InputError, match="makes 32-d tokens; the transformer's text width is 64"):
        prepare_redux(pipe_like(width=64), [ReduxSpec(redux_folder, photos()[0])], embeds)
    with pytest.raises(WeightLoadError, match="not a Hugging Face repo id"):
        prepare_redux(pipe_like(), [ReduxSpec(redux_folder / "nope", photos()[0])], embeds)
    assert prepare_redux(pipe_like(), [], embeds) is embeds
