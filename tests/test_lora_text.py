"""CLIP-L LoRAs (kohya `lora_te1_*`, PEFT `text_encoder.*`): parity of the pooled prompt
vector with diffusers' FluxLoraLoaderMixin loading the file into a Flux pipeline's
text_encoder (float32, CPU); exact unloading; the pipeline re-encodes when they change."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the reference side: diffusers on torch (parity extra)

from test_flux import TINY, build_reference, rel_err  # noqa: E402
from test_lora import Host, _pair, _save  # noqa: E402
from test_text_encoders import CLIP_TINY, build_clip, save_hf  # noqa: E402

from mlx_edit.models import lora as L  # noqa: E402
from mlx_edit.weights.lora import LoadedLoRA, load_lora_file  # noqa: E402
from mlx_edit.weights.lora_text import with_text_loras  # noqa: E402
from mlx_edit.weights.text import load_clip_text  # noqa: E402

TOL = 1e-4
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
           "mlp.fc1", "mlp.fc2")


def clip_lora(hf_clip, fmt, seed, rank=4, std=0.2):
    """A LoRA on every linear of the CLIP text tower, in kohya (`lora_te1_`, alpha) or PEFT
    (`text_encoder.`) naming, plus one transformer module (a FLUX LoRA file)."""
    g, sd = torch.Generator().manual_seed(seed), {}
    tower = getattr(hf_clip, "text_model", hf_clip)  # transformers 5: no text_model level
    for i, layer in enumerate(tower.encoder.layers):
        for name in MODULES:
            m = layer.get_submodule(name)
            a, b = _pair(g, m.out_features, m.in_features, rank, std)
            module = f"text_model.encoder.layers.{i}.{name}"
            if fmt == "kohya":
                key = "lora_te1_" + module.replace(".", "_")
                sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = a, b
                sd[f"{key}.alpha"] = torch.tensor(2.0 * rank)
            else:
                sd[f"text_encoder.{module}.lora_A.weight"] = a
                sd[f"text_encoder.{module}.lora_B.weight"] = b
    hidden = TINY["num_attention_heads"] * TINY["attention_head_dim"]
    a, b = _pair(g, hidden, hidden, rank, std)
    if fmt == "kohya":
        sd["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"] = a
        sd["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"] = b
    else:
        sd["transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight"] = a
        sd["transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight"] = b
    return sd


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora_text")
    build_reference(TINY).save_pretrained(folder / "transformer", safe_serialization=True)
    save_hf(build_clip(CLIP_TINY), folder / "text_encoder")
    return folder


def _ids():
    ids = np.full((1, 77), CLIP_TINY["eos_token_id"], np.int64)
    ids[0, :6] = [CLIP_TINY["bos_token_id"], 320, 1125, 539, 550, CLIP_TINY["eos_token_id"]]
    return ids


def with_metadata(sd, rank=4):
    """A diffusers `save_lora_weights` file: PEFT configs per component in the safetensors
    metadata (text_encoder: lora_alpha 12 and an alpha pattern) instead of alpha tensors."""
    import json

    text = {"r": rank, "lora_alpha": 12.0, "alpha_pattern": {"encoder.layers.1.mlp.fc1": 2.0},
            "rank_pattern": {}, "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj",
                                                   "fc1", "fc2"]}
    flux = {"r": rank, "lora_alpha": 8.0, "target_modules": ["transformer_blocks.0.attn.to_out.0"]}
    meta = {**{f"transformer.{k}": v for k, v in flux.items()},
            **{f"text_encoder.{k}": v for k, v in text.items()}}
    return {**sd, "__metadata__": {"format": "pt", "lora_adapter_metadata": json.dumps(meta)}}


@pytest.mark.parity
@pytest.mark.parametrize("fmt", ["kohya", "peft", "peft_metadata"])
def test_clip_lora_pooled_matches_diffusers(models, tmp_path, fmt):
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel

    ref_clip = CLIPTextModel.from_pretrained(models / "text_encoder").eval()
    sd = clip_lora(ref_clip, fmt.removesuffix("_metadata"), 3)
    sd = with_metadata(sd) if fmt == "peft_metadata" else sd
    path = _save(sd, tmp_path / f"{fmt}.safetensors")
    ids = _ids()
    with torch.no_grad():
        base_ref = ref_clip(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
    host = Host(FluxTransformer2DModel.from_pretrained(models / "transformer").eval())
    host.pipe.text_encoder = ref_clip
    host.load({path: 0.8})
    with torch.no_grad():
        want = ref_clip(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
    assert rel_err(want, base_ref) > 1e-2  # diffusers applied it to CLIP

    lora = load_lora_file(path)
    assert set(lora.text_parts) == {f"encoder.layers.{i}.{m}" for i in range(2)
                                    for m in ("self_attn.qkv_proj", "self_attn.out_proj",
                                              "mlp.fc1", "mlp.fc2")}
    ours = load_clip_text(models / "text_encoder", mx.float32)
    base = np.array(ours(mx.array(ids.astype(np.int32)))[1])
    with_text_loras(ours, {"l0": LoadedLoRA(lora, str(path), 0.8)})
    pooled = np.array(ours(mx.array(ids.astype(np.int32)))[1])
    assert rel_err(pooled, want) <= TOL, rel_err(pooled, want)
    L.remove(ours)
    assert np.array_equal(np.array(ours(mx.array(ids.astype(np.int32)))[1]), base)


def test_t5_keys_warn_and_clip_only_files_load(tmp_path, models):
    from transformers import CLIPTextModel

    ref_clip = CLIPTextModel.from_pretrained(models / "text_encoder")
    sd = {k: v for k, v in clip_lora(ref_clip, "kohya", 4).items() if "lora_te1_" in k}
    sd["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.zeros(4, 8)
    with pytest.warns(UserWarning, match="ignoring 1 T5 text-encoder LoRA keys"):
        lora = load_lora_file(_save(sd, tmp_path / "clip_only.safetensors"))
    assert lora.text_parts and not lora.updates_transformer


def test_pipeline_encodes_with_clip_loras(tiny_mlx, tmp_path):
    """The pooled vector follows load / rescale / unload (prompt caches keyed on them);
    T5's sequence is unchanged; the transformer carries no adapter for a CLIP-only file."""
    from mlx_edit.editing.fill import FluxFill
    from mlx_edit.editing.prompt_cache import PromptCache

    pipe = FluxFill.from_pretrained(tiny_mlx, mx.float32)
    pipe.disk_prompt_cache = PromptCache(tmp_path / "cache")
    clip = load_clip_text(tiny_mlx / "text_encoder", mx.float32)
    g, sd = np.random.default_rng(0), {}
    for i in range(len(clip.encoder.layers)):
        for name in ("self_attn_q_proj", "mlp_fc2"):
            layer = clip.encoder.layers[i].mlp.fc2 if "fc2" in name else None
            out, inp = (layer.weight.shape if layer is not None
                        else (clip.config.hidden_size, clip.config.hidden_size))
            key = f"lora_te1_text_model_encoder_layers_{i}_{name}"
            sd[f"{key}.lora_down.weight"] = torch.from_numpy(g.standard_normal((4, inp)) * 0.3)
            sd[f"{key}.lora_up.weight"] = torch.from_numpy(g.standard_normal((out, 4)) * 0.3)
    path = _save({k: v.float() for k, v in sd.items()}, tmp_path / "clip.safetensors")
    base = pipe.encode_prompt("a cat")
    pipe.load_lora(path, 1.0, name="c")
    with_lora = pipe.encode_prompt("a cat")
    assert not L.lora_layers(pipe.transformer)
    assert np.array_equal(np.array(with_lora.txt), np.array(base.txt))
    assert rel_err(np.array(with_lora.pooled), np.array(base.pooled)) > 1e-2
    pipe.set_lora_scales({"c": 0.0})
    zero = pipe.encode_prompt("a cat")
    np.testing.assert_allclose(np.array(zero.pooled), np.array(base.pooled), atol=1e-6)
    pipe.unload_loras()
    assert np.array_equal(np.array(pipe.encode_prompt("a cat").pooled), np.array(base.pooled))
