"""The torch-free fixture builder (scripts/make_mlx_checkpoint.py): its folders hold exactly
the weights of mlx-edit's own models, in every layout the loaders read, and (parity) in the
key layout and shapes diffusers/transformers write and load.
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (first: loads OpenBLAS before mlx)

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import import_script
from mlx.utils import tree_flatten
from safetensors import safe_open

from mlx_edit.weights.controlnet import load_controlnet
from mlx_edit.weights.flux import load_transformer
from mlx_edit.weights.text import load_clip_text, load_t5
from mlx_edit.weights.vae import load_vae

mmc = import_script("make_mlx_checkpoint")
mtc = import_script("make_tiny_checkpoint")
LOADERS = {"transformer": load_transformer, "vae": load_vae, "text_encoder": load_clip_text,
           "text_encoder_2": load_t5}


def _params(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def _headers(folder) -> dict[str, tuple]:
    """{key: shape} over the safetensors files directly in `folder`."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "np") as s:
            out.update({k: tuple(s.get_slice(k).get_shape()) for k in s.keys()})
    return out


def test_layout_matches_the_reference_builder(tiny_mlx):
    names = {p.relative_to(tiny_mlx).as_posix() for p in tiny_mlx.rglob("*")}
    for expected in ("model_index.json", "scheduler/scheduler_config.json",
                     "flux1-fill-dev.safetensors", "ae.safetensors",
                     "transformer/diffusion_pytorch_model.safetensors.index.json",
                     "text_encoder_2/model.safetensors.index.json", "vae/config.json",
                     "tokenizer/merges.txt", "tokenizer_2/spiece.model",
                     "tokenizer_2/tokenizer.json"):
        assert expected in names, expected
    index = json.loads((tiny_mlx / "model_index.json").read_text())
    assert {k: v for k, v in index.items() if not k.startswith("_")} == {
        k: v for k, v in mtc.MODEL_INDEX.items() if not k.startswith("_")}
    sched = json.loads((tiny_mlx / "scheduler" / "scheduler_config.json").read_text())
    assert {k: sched[k] for k in mtc.SCHEDULER_CONFIG} == mtc.SCHEDULER_CONFIG


@pytest.mark.parametrize("offset,name", list(enumerate(mmc.COMPONENTS)))
def test_every_layout_loads_the_built_weights_exactly(tiny_mlx, offset, name):
    """diffusers/transformers folders and BFL files give back the very parameters built."""
    cfg = mtc.configs("tiny", 1100)[name]
    built, _ = mmc.make_params(name, cfg, offset)
    paths = {"transformer": [("flux1-fill-dev.safetensors", {"config": {"axes_dims_rope": [4, 4, 8]}})],
             "vae": [("ae.safetensors", {"config": cfg})]}.get(name, [])
    for path, kw in [(name, {}), *paths]:
        got = _params(LOADERS[name](tiny_mlx / path, mx.float32, **kw))
        assert got.keys() == built.keys(), path
        assert all(np.array_equal(got[k], built[k]) for k in got), path


def test_no_parameter_is_constant_and_seeds_differ(tiny_mlx):
    cfg = mtc.configs("tiny", 1100)["transformer"]
    a, b, c = (mmc.make_params("transformer", cfg, s)[0] for s in (0, 0, 1))
    assert all(np.array_equal(a[k], b[k]) for k in a)  # seeded: the same twice
    assert not any(np.array_equal(a[k], c[k]) for k in a)  # another seed: other weights
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        for f in (tiny_mlx / sub).glob("*.safetensors"):
            with safe_open(str(f), "np") as s:
                for k in s.keys():
                    flat = s.get_tensor(k).reshape(-1)
                    assert flat.size < 2 or not np.all(flat == flat[0]), (sub, k)


def test_extras_load(tmp_path):
    """ControlNets (diffusers folders and the x-flux file), IP-Adapter and Redux load."""
    from mlx_edit.weights import vision

    cfg = mtc.configs("tiny", 1100)["transformer"]
    paths = mmc.write_controlnets(tmp_path / "cn", cfg, "tiny", seed=10)
    nets = {kind: _params(load_controlnet(paths[kind], mx.float32))
            for kind in ("instantx", "union", "xlabs")}
    assert "mode_embedder.weight" in nets["union"] and "mode_embedder.weight" not in nets["xlabs"]
    raw = _params(load_controlnet(paths["xlabs-raw"], mx.float32,
                                  config={"axes_dims_rope": [4, 4, 8]}))
    assert raw.keys() == nets["xlabs"].keys()  # the same XLabs model under x-flux names
    assert all(np.array_equal(raw[k], nets["xlabs"][k]) for k in raw)
    extras = mmc.write_image_prompt_fixtures(tmp_path / "ip", cfg, "tiny", seed=20)
    ip = vision.load_ip_adapter(extras["ip-adapter"] / "ip_adapter.safetensors", mx.float32)
    assert ip.config.num_layers == cfg["num_layers"] and ip.config.num_tokens == 4
    vision.load_clip_vision(extras["ip-adapter"] / "image_encoder", mx.float32)
    vision.load_siglip_vision(extras["redux"] / "image_encoder", mx.float32)
    a = _params(vision.load_redux_embedder(extras["redux"] / "image_embedder", mx.float32))
    b = _params(vision.load_redux_embedder(extras["redux"] / "flux1-redux-dev.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_build_refuses_to_clobber(tmp_path):
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(FileExistsError):
        mmc.build(tmp_path, "tiny")
    with pytest.raises(FileExistsError, match="not a checkpoint folder"):
        mmc.build(tmp_path, "tiny", overwrite=True)
    with pytest.raises(KeyError, match="unknown preset"):
        mmc.build(tmp_path / "new", "huge")
    with pytest.raises(KeyError, match="unknown extras"):
        mmc.build(tmp_path / "new", "tiny", extras=("lora",))
    assert (tmp_path / "x").read_text() == "keep me" and not (tmp_path / "new").exists()


@pytest.mark.parity
def test_same_keys_and_shapes_as_the_diffusers_built_folder(tiny_mlx, tiny_ckpt):
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "."):
        assert _headers(tiny_mlx / sub) == _headers(tiny_ckpt / sub), sub


@pytest.mark.parity
def test_diffusers_and_transformers_load_every_key(tiny_mlx):
    """Strict loads on the reference side: no missing or unexpected key, same values."""
    import diffusers
    import torch
    import transformers
    from safetensors.torch import load_file

    classes = {"transformer": diffusers.FluxTransformer2DModel, "vae": diffusers.AutoencoderKL,
               "text_encoder": transformers.CLIPTextModel,
               "text_encoder_2": transformers.T5EncoderModel}
    for name, cls in classes.items():
        model, info = cls.from_pretrained(tiny_mlx / name, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
    # the BFL files equal the reference converter's output for the diffusers folders
    bfl_keys = import_script("bfl_keys")
    for sub, fname, convert in (("transformer", "flux1-fill-dev", bfl_keys.transformer_to_bfl),
                                ("vae", "ae", bfl_keys.vae_to_bfl)):
        folder = {}
        for f in (tiny_mlx / sub).glob("*.safetensors"):
            folder.update(load_file(str(f)))
        want = convert(folder)
        got = load_file(str(tiny_mlx / f"{fname}.safetensors"))
        assert sorted(got) == sorted(want), sub
        assert all(torch.equal(got[k], want[k]) for k in got), sub
