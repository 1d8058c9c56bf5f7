"""Tests of the random-weight checkpoint builder and of the diffusers -> BFL key maps.

The BFL maps (`scripts/bfl_keys.py`) are proven against diffusers' own BFL -> diffusers
converters in `diffusers/loaders/single_file_utils.py`: converting our BFL dict back must give
the diffusers state dict exactly (same keys, bit-identical tensors).
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (first: loads OpenBLAS before anything imports mlx)

import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import import_script
from PIL import Image

# The reference fixtures, built by diffusers/transformers: every test needs the parity extra
# (the torch-free builder is tested in test_fixtures_mlx.py).
pytestmark = pytest.mark.parity
torch = pytest.importorskip("torch")
from diffusers import AutoencoderKL, FluxFillPipeline, FluxTransformer2DModel  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

bfl_keys = import_script("bfl_keys")
mtc = import_script("make_tiny_checkpoint")


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a diffusers/transformers model folder (sharded via its index or not)."""
    index = list(folder.glob("*.safetensors.index.json"))
    if index:
        files = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
    else:
        files = [f.name for f in folder.glob("*.safetensors")]
    sd: dict[str, torch.Tensor] = {}
    for name in files:
        sd.update(load_file(str(folder / name)))
    return sd


def assert_same_state(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want), (sorted(set(got) ^ set(want)))[:10]
    bad = [k for k in want if got[k].shape != want[k].shape or not torch.equal(got[k], want[k])]
    assert not bad, bad[:10]


def flux_converter(inner_dim: int):
    """diffusers' BFL->diffusers transformer converter with its hard-coded 3072 replaced."""
    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert src.count("inner_dim = 3072") == 1, "diffusers converter changed: revisit this test"
    namespace = dict(vars(sfu))
    exec(src.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def narrow_random(sd: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with each key's rows and ndim but at most 3 entries per other dim:
    enough to prove a key/row map exactly without materialising full-width weights."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape[0], *[min(d, 3) for d in v.shape[1:]], generator=gen)
        for k, v in sd.items()
    }


# --- BFL maps vs diffusers' converters ---------------------------------------------------------


@pytest.mark.parity
def test_transformer_bfl_map_inverts_diffusers_converter_at_width_3072():
    cfg = dict(
        patch_size=1,
        in_channels=384,
        out_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=[16, 56, 56],
    )
    with torch.device("meta"):
        meta = FluxTransformer2DModel(**cfg).state_dict()
    bfl_shapes = {k: tuple(v.shape) for k, v in bfl_keys.transformer_to_bfl(meta).items()}
    # BFL flux1-fill-dev shapes (reference §1 "Shapes")
    assert bfl_shapes["img_in.weight"] == (3072, 384)
    assert bfl_shapes["txt_in.weight"] == (3072, 4096)
    assert bfl_shapes["vector_in.in_layer.weight"] == (3072, 768)
    assert bfl_shapes["double_blocks.0.img_attn.qkv.weight"] == (9216, 3072)
    assert bfl_shapes["double_blocks.0.txt_mod.lin.weight"] == (18432, 3072)
    assert bfl_shapes["single_blocks.0.linear1.weight"] == (21504, 3072)
    assert bfl_shapes["single_blocks.0.linear2.weight"] == (3072, 15360)
    assert bfl_shapes["single_blocks.0.modulation.lin.weight"] == (9216, 3072)
    assert bfl_shapes["single_blocks.0.norm.query_norm.scale"] == (128,)
    assert bfl_shapes["final_layer.adaLN_modulation.1.weight"] == (6144, 3072)
    assert bfl_shapes["final_layer.linear.weight"] == (64, 3072)
    assert len(bfl_shapes) == len(meta) - 14  # (3 + 3 + 4 -> 3 fused) x (weight, bias)

    sd = narrow_random(meta)
    bfl = bfl_keys.transformer_to_bfl(sd)
    assert_same_state(sfu.convert_flux_transformer_checkpoint_to_diffusers(dict(bfl)), sd)
    comfy = {bfl_keys.COMFY_PREFIX + k: v for k, v in bfl.items()}
    assert_same_state(sfu.convert_flux_transformer_checkpoint_to_diffusers(comfy), sd)


@pytest.mark.parity
def test_tiny_bfl_transformer_file_roundtrips_through_diffusers_converter(tiny_ckpt):
    diffusers_sd = load_folder(tiny_ckpt / "transformer")
    bfl = load_file(str(tiny_ckpt / "flux1-fill-dev.safetensors"))
    assert_same_state(bfl, bfl_keys.transformer_to_bfl(diffusers_sd))
    hidden = json.loads((tiny_ckpt / "transformer" / "config.json").read_text())
    inner = hidden["num_attention_heads"] * hidden["attention_head_dim"]
    assert_same_state(flux_converter(inner)(dict(bfl)), diffusers_sd)


@pytest.mark.parity
def test_scale_shift_swap_is_applied():
    sd = {
        "norm_out.linear.weight": torch.arange(8.0).reshape(4, 2),
        "norm_out.linear.bias": torch.arange(4.0),
    }
    bfl = bfl_keys.transformer_to_bfl(sd)
    assert bfl["final_layer.adaLN_modulation.1.bias"].tolist() == [2.0, 3.0, 0.0, 1.0]
    with pytest.raises(KeyError, match="unmatched"):
        bfl_keys.transformer_to_bfl({"nonsense.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="incomplete"):
        bfl_keys.transformer_to_bfl({"transformer_blocks.0.attn.to_q.weight": torch.zeros(1)})


@pytest.mark.parity
def test_vae_bfl_map_inverts_diffusers_converter_full_flux_config():
    cfg = mtc.configs("wide", 0)["vae"]
    with torch.device("meta"):
        meta = AutoencoderKL(**cfg).state_dict()
    shapes = {k: tuple(v.shape) for k, v in bfl_keys.vae_to_bfl(meta).items()}
    assert len(shapes) == len(meta) == 244  # BFL ae.safetensors holds 244 tensors
    assert shapes["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["decoder.mid.attn_1.proj_out.weight"] == (512, 512, 1, 1)
    assert shapes["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert shapes["decoder.up.3.block.2.conv2.weight"] == (512, 512, 3, 3)
    assert shapes["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in shapes
    assert shapes["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert shapes["encoder.conv_out.weight"] == (32, 512, 3, 3)
    assert shapes["encoder.norm_out.weight"] == (512,)

    sd = narrow_random(meta, seed=1)
    back = sfu.convert_ldm_vae_checkpoint(bfl_keys.vae_to_bfl(sd), cfg)
    assert_same_state(back, sd)


@pytest.mark.parity
def test_tiny_bfl_vae_file_roundtrips_through_diffusers_converter(tiny_ckpt):
    diffusers_sd = load_folder(tiny_ckpt / "vae")
    config = json.loads((tiny_ckpt / "vae" / "config.json").read_text())
    bfl = load_file(str(tiny_ckpt / "ae.safetensors"))
    assert bfl["encoder.mid.attn_1.k.weight"].ndim == 4
    assert_same_state(sfu.convert_ldm_vae_checkpoint(dict(bfl), config), diffusers_sd)


# --- the folder itself -------------------------------------------------------------------------


def test_tiny_folder_loads_as_flux_fill_pipeline(tiny_ckpt, tmp_path):
    pipe = FluxFillPipeline.from_pretrained(tiny_ckpt)
    assert pipe.transformer.config.in_channels == 384
    assert pipe.transformer.config.out_channels == 64
    assert pipe.transformer.config.guidance_embeds is True
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 16
    assert pipe.vae.config.scaling_factor == 0.3611 and pipe.vae.config.shift_factor == 0.1159
    sched = pipe.scheduler.config
    assert {k: sched[k] for k in mtc.SCHEDULER_CONFIG} == mtc.SCHEDULER_CONFIG
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert pipe.transformer.config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert (tiny_ckpt / "text_encoder_2" / "model.safetensors.index.json").is_file()
    assert (tiny_ckpt / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    # tokenizers: CLIP bos/eos around the text; T5 ends with eos 1 and fits the embedding
    ids = pipe.tokenizer("a photo of a cat").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407
    ids2 = pipe.tokenizer_2("a photo of a cat").input_ids
    assert ids2[-1] == 1 and len(pipe.tokenizer_2) <= pipe.text_encoder_2.config.vocab_size
    # our model_index.json equals the one diffusers writes for the loaded pipeline
    pipe.save_pretrained(tmp_path / "resaved")
    ours = json.loads((tiny_ckpt / "model_index.json").read_text())
    theirs = json.loads((tmp_path / "resaved" / "model_index.json").read_text())
    ours["tokenizer_2"] = theirs["tokenizer_2"]  # T5TokenizerFast is T5Tokenizer in v5
    theirs.pop("_name_or_path", None)  # records where the pipeline was loaded from
    assert ours == theirs


def test_tiny_pipeline_runs_with_finite_order_one_outputs(tiny_ckpt):
    pipe = FluxFillPipeline.from_pretrained(tiny_ckpt)
    pipe.set_progress_bar_config(disable=True)
    outs = []
    pipe.transformer.register_forward_hook(lambda m, i, o: outs.append(o[0]))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 8))
    result = pipe(
        prompt="a cat",
        image=image,
        mask_image=mask,
        height=32,
        width=32,
        num_inference_steps=2,
        max_sequence_length=16,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert np.isfinite(result.images).all()
    for v in outs:
        assert torch.isfinite(v).all() and 0.05 < float(v.std()) < 10.0


def test_no_parameter_is_constant(tiny_ckpt):
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        for k, v in load_folder(tiny_ckpt / sub).items():
            flat = v.reshape(-1)
            assert flat.numel() == 1 or not bool((flat == flat[0]).all()), f"{sub}/{k}"


def test_components_are_seeded():
    cfg = mtc.configs("tiny", 1100)["transformer"]
    a, b, c = (mtc.make_component("transformer", cfg, s).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["x_embedder.weight"], c["x_embedder.weight"])


def test_build_refuses_to_clobber(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        mtc.build(tmp_path, "tiny")
    with pytest.raises(FileExistsError, match="not a checkpoint"):
        mtc.build(tmp_path, "tiny", overwrite=True)
    with pytest.raises(KeyError):
        mtc.build(tmp_path / "new", "huge")
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_small_linear_inputs_are_multiples_of_64(small_ckpt):
    embeddings = re.compile(r".*(embedding|shared|relative_attention_bias).*")
    for sub in ("transformer", "text_encoder", "text_encoder_2"):
        for k, v in load_folder(small_ckpt / sub).items():
            if v.ndim == 2 and not embeddings.fullmatch(k):
                assert v.shape[1] % 64 == 0, f"{sub}/{k} {tuple(v.shape)}"


def test_bfloat16_build(tmp_path):
    out = mtc.build(tmp_path / "bf16", "tiny", seed=3, dtype="bfloat16")
    for f in list(out.rglob("*.safetensors")):
        assert {v.dtype for v in load_file(str(f)).values()} == {torch.bfloat16}, f


# --- wide (real widths): slow ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parity
def test_wide_bfl_files_roundtrip_through_unpatched_diffusers_converters(wide_ckpt):
    cfg = json.loads((wide_ckpt / "transformer" / "config.json").read_text())
    assert cfg["num_attention_heads"] * cfg["attention_head_dim"] == 3072
    assert cfg["joint_attention_dim"] == 4096 and cfg["pooled_projection_dim"] == 768
    bfl = load_file(str(wide_ckpt / "flux1-fill-dev.safetensors"))
    got = sfu.convert_flux_transformer_checkpoint_to_diffusers(bfl)
    assert_same_state(got, load_folder(wide_ckpt / "transformer"))
    del bfl, got
    vae_cfg = json.loads((wide_ckpt / "vae" / "config.json").read_text())
    got = sfu.convert_ldm_vae_checkpoint(load_file(str(wide_ckpt / "ae.safetensors")), vae_cfg)
    assert_same_state(got, load_folder(wide_ckpt / "vae"))
