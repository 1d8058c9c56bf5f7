"""FLUX.2 [klein] checkpoint folders with random weights, offline.

    python scripts/make_tiny_checkpoint.py OUT --family klein [--preset tiny|wide] [--kv]
    python scripts/make_mlx_checkpoint.py OUT --family klein [--preset tiny|wide] [--kv]

Both write black-forest-labs/FLUX.2-klein-4B's diffusers layout, a folder `--model` takes:

    model_index.json                 Flux2KleinPipeline, is_distilled true (--kv:
                                     Flux2KleinKVPipeline, as FLUX.2-klein-9b-kv; the
                                     other files are the same)
    scheduler/scheduler_config.json  FlowMatchEulerDiscreteScheduler (dynamic shifting)
    transformer/                     Flux2Transformer2DModel (no guidance embedding)
    vae/                             AutoencoderKLFlux2 (32 latent channels, 2x2 batch norm;
                                     its running statistics random, so they matter)
    text_encoder/                    Qwen3ForCausalLM (hidden states 9, 18, 27 used)
    tokenizer/                       the fixture Qwen2 tokenizer + chat template
                                     (scripts/tokenizer_files.write_qwen3_tokenizer)

`build_diffusers` builds every model with diffusers / transformers under
`torch.manual_seed` and saves the `Flux2KleinPipeline` with `save_pretrained` (needs the
parity extra); `build_mlx` builds mlx-edit's own models (Flux2Transformer, AutoencoderKL,
Qwen3TextEncoder) with MLX's random initialisation and writes them through the key maps
backwards (scripts/make_mlx_checkpoint.to_checkpoint), without torch. Presets: `tiny`
(hidden 32, Qwen3 hidden 64 with 28 layers) and `wide` (klein 4B's widths: hidden 3072,
joint_attention_dim 7680, the real VAE, Qwen3-4B widths with 2 layers and out layers
(1, 2, 2); one double and one single block; ~3 GB in float32). Built next to OUT and
renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import make_tiny_checkpoint as mtc
import qwen3_fixtures
import tokenizer_files

SCHEDULER_CONFIG = {**mtc.SCHEDULER_CONFIG}  # dynamic shifting; klein passes its own mu
PRESETS = {
    "tiny": {
        "transformer": dict(in_channels=128, num_layers=1, num_single_layers=1,
                            attention_head_dim=16, num_attention_heads=2,
                            joint_attention_dim=192, timestep_guidance_channels=32,
                            mlp_ratio=3.0, axes_dims_rope=[4, 4, 4, 4], rope_theta=2000,
                            guidance_embeds=False),
        "vae": dict(block_out_channels=[8, 16, 16, 16], latent_channels=32,
                    layers_per_block=1, norm_num_groups=4),
        "text_encoder": qwen3_fixtures.QWEN3_PRESETS["tiny"],
        "out_layers": None,  # klein's (9, 18, 27)
    },
    "wide": {
        "transformer": dict(in_channels=128, num_layers=1, num_single_layers=1,
                            attention_head_dim=128, num_attention_heads=24,
                            joint_attention_dim=7680, mlp_ratio=3.0,
                            axes_dims_rope=[32, 32, 32, 32], rope_theta=2000,
                            guidance_embeds=False),
        "vae": {},  # AutoencoderKLFlux2's defaults: the real FLUX.2 VAE
        "text_encoder": qwen3_fixtures.QWEN3_PRESETS["wide"],
        "out_layers": [1, 2, 2],
    },
}
# AutoencoderKLFlux2's defaults that differ from FLUX.1's AutoencoderKL (VAEConfig.flux2)
FLUX2_VAE = {"latent_channels": 32, "use_quant_conv": True, "use_post_quant_conv": True,
             "patch_size": [2, 2]}
MODEL_INDEX = {
    "_class_name": "Flux2KleinPipeline", "is_distilled": True,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3ForCausalLM"],
    "tokenizer": ["transformers", "Qwen2TokenizerFast"],
    "transformer": ["diffusers", "Flux2Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
}
PIPELINES = {False: "Flux2KleinPipeline", True: "Flux2KleinKVPipeline"}  # by `kv`


def model_index(kv: bool = False) -> dict:
    """model_index.json of a klein folder; kv: of a klein KV folder (its pipeline class
    is all that tells the variant apart: mlx_edit.variants)."""
    return {**MODEL_INDEX, "_class_name": PIPELINES[kv]}


def out_layers(preset: str) -> tuple[int, ...]:
    """The Qwen3 hidden-state indices the preset's prompt embeddings stack (pass them to
    diffusers as `text_encoder_out_layers`)."""
    return tuple(PRESETS[preset]["out_layers"] or (9, 18, 27))


def _text_config(preset: str) -> dict:
    p = PRESETS[preset]
    return {**p["text_encoder"], **({"out_layers": p["out_layers"]} if p["out_layers"] else {})}


def _building(out: Path, overwrite: bool) -> Path:
    mtc._prepare_out(out, overwrite)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out: Path) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def build_diffusers(out: str | Path, preset: str = "tiny", seed: int = 0,
                    dtype: str = "float32", overwrite: bool = False, kv: bool = False) -> Path:
    """The folder `out` built by diffusers / transformers (module doc; kv: saved by
    Flux2KleinKVPipeline); returns its Path. KeyError: unknown preset; FileExistsError as
    make_tiny_checkpoint.build."""
    import diffusers
    import torch
    import transformers

    cfg, out = PRESETS[preset], Path(out)
    mtc._quiet_libraries()
    tmp = _building(out, overwrite)
    try:
        tokenizer_files.write_qwen3_tokenizer(tmp / "tok")
        torch.manual_seed(seed)
        transformer = diffusers.Flux2Transformer2DModel(**cfg["transformer"])
        vae = diffusers.AutoencoderKLFlux2(**cfg["vae"])
        text = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_text_config(preset)))
        for i, model in enumerate((transformer, vae, text)):
            mtc.perturb_constant_tensors(model, seed + 1000 + i)
        with torch.no_grad():  # running statistics that matter (eps 1e-4 shows too)
            n = vae.bn.running_mean.shape[0]
            vae.bn.running_mean.copy_(0.5 * torch.randn(n))
            vae.bn.running_var.copy_(0.01 + 2 * torch.rand(n))
        pipe = getattr(diffusers, PIPELINES[kv])(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
            vae=vae, text_encoder=text, transformer=transformer, is_distilled=True,
            tokenizer=transformers.AutoTokenizer.from_pretrained(tmp / "tok"))
        pipe.to(getattr(torch, dtype)).save_pretrained(tmp / "pipe", safe_serialization=True)
        shutil.rmtree(tmp / "tok")
        return _publish(tmp / "pipe", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_mlx(out: str | Path, preset: str = "tiny", seed: int = 0,
              overwrite: bool = False, kv: bool = False) -> Path:
    """The folder `out` built from mlx-edit's own models, without torch (module doc; kv: a
    klein KV folder); float32. KeyError: unknown preset; FileExistsError as
    make_tiny_checkpoint.build."""
    import make_mlx_checkpoint as mmc

    from mlx_edit.models.flux2 import Flux2Config, Flux2Transformer
    from mlx_edit.models.vae import AutoencoderKL, VAEConfig
    from mlx_edit.weights import flux2 as flux2_keys
    from mlx_edit.weights import vae as vae_keys

    cfg, out = PRESETS[preset], Path(out)
    tmp = _building(out, overwrite)
    try:
        tokenizer_files.write_qwen3_tokenizer(tmp / "tokenizer")
        mmc._write_json(tmp / "scheduler" / "scheduler_config.json",
                        {"_class_name": "FlowMatchEulerDiscreteScheduler", **SCHEDULER_CONFIG})
        t_cfg = Flux2Config.from_dict(cfg["transformer"])
        params = mmc.random_params(Flux2Transformer, t_cfg, seed)
        mmc.write_weights(tmp / "transformer", "diffusion_pytorch_model", mmc.to_checkpoint(
            params, flux2_keys.DIFFUSERS_RULES, t_cfg.hidden_size), shard=True)
        mmc._write_json(tmp / "transformer" / "config.json",
                        {"_class_name": "Flux2Transformer2DModel", **cfg["transformer"]})
        vae_cfg = {**FLUX2_VAE, **cfg["vae"]}
        params = mmc.random_params(AutoencoderKL, VAEConfig.from_dict(vae_cfg), seed + 1)
        mmc.write_weights(tmp / "vae", "diffusion_pytorch_model", mmc.to_checkpoint(
            params, vae_keys.DIFFUSERS_RULES), shard=False)
        mmc._write_json(tmp / "vae" / "config.json", {"_class_name": "AutoencoderKLFlux2",
                                                     **vae_cfg})
        qwen3_fixtures.write_qwen3_text_encoder(tmp / "text_encoder", _text_config(preset),
                                                seed + 2)
        mmc._write_json(tmp / "model_index.json", model_index(kv))
        return _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def describe(out: Path) -> str:
    """One line: the folder and its model_index class."""
    index = json.loads((Path(out) / "model_index.json").read_text())
    return f"{out}: {index['_class_name']} (is_distilled {index.get('is_distilled')})"
