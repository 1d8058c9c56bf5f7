"""Random-weight FLUX ControlNets built by diffusers, for tests and `--extras controlnet`,
and a FLUX.1-Canny-dev-style control model for `--extras control-model`.

    write_controlnets(OUT, transformer_cfg, preset, seed)   # called by make_tiny_checkpoint
    write_control_model(ROOT, transformer_cfg, seed)        # ROOT/control-model/

OUT gets, for a base FLUX Fill transformer config (widths must match: the residuals are
added to its hidden states and the ControlNet reads the same text embeddings):

    instantx/        FluxControlNetModel (InstantX Canny style: no mode, packed latents)
    union/           FluxControlNetModel with num_mode 10 (InstantX / Shakker Union style)
    xlabs/           FluxControlNetModel with the XLabs hint block (conditioning 16, patch 2)
    xlabs-flux-controlnet.safetensors   the XLabs model with x-flux's raw key names

Each model is `FluxControlNetModel(**cfg)` under `torch.manual_seed`; the zero-initialised
output projections (controlnet_blocks, controlnet_single_blocks, InstantX's
controlnet_x_embedder, the hint block's conv_out) are re-initialised with PyTorch's
default Linear/Conv init and other constant tensors get seeded noise, so that a parity test
can fail. The x-flux names (XLabs-AI/x-flux src/flux/controlnet.py, ControlNetFlux):
BFL block/embedder names (`bfl_keys.transformer_to_bfl`), `controlnet_blocks.N`,
`pos_embed_input` and `input_hint_block.{0,2,...,14}`.

`write_control_model` makes ROOT/control-model/, the hub layout of
black-forest-labs/FLUX.1-Canny-dev: model_index.json (FluxControlPipeline), transformer/
(FluxTransformer2DModel like the Fill one but in_channels 128), flux1-canny-dev.safetensors
(BFL keys), and relative symlinks to ROOT's vae/, text encoders, tokenizers and scheduler
(the real Canny-dev repo ships the same ones as Fill-dev).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the configs serve the torch-free builder too
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bfl_keys  # noqa: E402

KINDS = ("instantx", "union", "xlabs")
# (num_layers, num_single_layers) per kind; wide keeps the folders to a few GB.
DEPTHS = {
    "tiny": {"instantx": (2, 2), "union": (2, 2), "xlabs": (2, 0)},
    "small": {"instantx": (2, 2), "union": (2, 2), "xlabs": (2, 0)},
    "wide": {"instantx": (1, 1), "union": (1, 0), "xlabs": (1, 0)},
}
XLABS_HINT_INDEX = {"conv_in": 0, **{f"blocks.{i}": 2 * i + 2 for i in range(6)}, "conv_out": 14}


def controlnet_config(kind: str, transformer_cfg: dict, layers: int = 2,
                      single_layers: int = 2) -> dict:
    """FluxControlNetModel kwargs of `kind` (KINDS) sized like `transformer_cfg`."""
    shared = {k: transformer_cfg[k] for k in (
        "attention_head_dim", "num_attention_heads", "joint_attention_dim",
        "pooled_projection_dim", "axes_dims_rope")}
    cfg = dict(shared, in_channels=64, num_layers=layers, num_single_layers=single_layers,
               guidance_embeds=True, patch_size=1)
    if kind == "union":
        cfg["num_mode"] = 10
    elif kind == "xlabs":
        cfg.update(conditioning_embedding_channels=16, patch_size=2)
    elif kind != "instantx":
        raise KeyError(f"unknown ControlNet kind {kind!r}; choose from {KINDS}")
    return cfg


def make_controlnet(cfg: dict, seed: int = 0) -> torch.nn.Module:
    """`FluxControlNetModel(**cfg)` with random weights (see the module doc), float32, eval."""
    import torch
    from diffusers import FluxControlNetModel

    torch.manual_seed(seed)
    model = FluxControlNetModel(**cfg)
    zero_init = [*model.controlnet_blocks, *model.controlnet_single_blocks,
                 model.controlnet_x_embedder]
    if model.input_hint_block is not None:
        zero_init.append(model.input_hint_block.conv_out)
    for module in zero_init:
        module.reset_parameters()
    perturb_constants(model, seed + 1000)
    return model.eval()


def perturb_constants(module: torch.nn.Module, seed: int) -> list[str]:
    """make_tiny_checkpoint.perturb_constant_tensors' rule (zeros get N(0, 0.02^2), a
    constant c gets c (1 + 0.1 N(0, 1))), with a cheap first test: a full comparison of
    every wide weight costs seconds on these CPUs. Returns the perturbed names."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    names = []
    with torch.no_grad():
        for name, p in module.named_parameters():
            flat = p.detach().reshape(-1)
            if flat.numel() == 0 or (flat.numel() > 1 and bool(flat[0] != flat[1])):
                continue
            if not bool((flat == flat[0]).all()):
                continue
            c = float(flat[0])
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            p.add_(noise * (0.02 if c == 0.0 else 0.1 * abs(c)))
            names.append(name)
    return names


def xlabs_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An XLabs-style diffusers FluxControlNetModel's weights under x-flux's raw names.

    Raises KeyError for a model without a hint block or with keys x-flux does not have.
    """
    sd = model.state_dict()
    if not any(k.startswith("input_hint_block.") for k in sd):
        raise KeyError("not an XLabs-style ControlNet (no input_hint_block)")
    out, base = {}, {}
    for key, t in sd.items():
        if key.startswith("controlnet_blocks."):
            out[key] = t
        elif key.startswith("controlnet_x_embedder."):
            out["pos_embed_input." + key.split(".", 1)[1]] = t
        elif key.startswith("input_hint_block."):
            name, param = key[len("input_hint_block."):].rsplit(".", 1)
            out[f"input_hint_block.{XLABS_HINT_INDEX[name]}.{param}"] = t
        else:
            base[key] = t
    out.update(bfl_keys.transformer_to_bfl(base))
    return out


def write_controlnets(out: str | Path, transformer_cfg: dict, preset: str = "tiny",
                      seed: int = 0, dtype: torch.dtype | None = None) -> dict[str, Path]:
    """Write the ControlNet fixtures (module doc) under `out`; returns {name: path}.
    dtype: a torch dtype, None for float32."""
    import torch
    from safetensors.torch import save_file

    dtype = dtype or torch.float32

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for offset, kind in enumerate(KINDS):
        layers, single = DEPTHS[preset][kind]
        model = make_controlnet(controlnet_config(kind, transformer_cfg, layers, single),
                                seed + offset)
        if dtype != torch.float32:
            model = model.to(dtype)
        model.save_pretrained(out / kind, safe_serialization=True)
        paths[kind] = out / kind
        if kind == "xlabs":
            raw = out / "xlabs-flux-controlnet.safetensors"
            save_file({k: v.contiguous() for k, v in xlabs_state_dict(model).items()}, str(raw))
            paths["xlabs-raw"] = raw
        del model
    return paths


CONTROL_MODEL_SHARED = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                        "scheduler")


# Variant models written next to the Fill components: folder, in_channels, pipeline class,
# BFL file name (the hub layouts of FLUX.1-Canny-dev and FLUX.1-Kontext-dev).
VARIANT_MODELS = {
    "control-model": (128, "FluxControlPipeline", "flux1-canny-dev.safetensors"),
    "kontext-model": (64, "FluxKontextPipeline", "flux1-kontext-dev.safetensors"),
    "dev-model": (64, "FluxPipeline", "flux1-dev.safetensors"),  # base for control LoRAs
}


def write_variant_model(root: str | Path, transformer_cfg: dict, kind: str, seed: int = 0,
                        dtype: torch.dtype | None = None) -> Path:
    """Write ROOT/<kind>/ (`VARIANT_MODELS`: a transformer of another in_channels, its BFL
    file, the pipeline class in model_index.json, the other components linked to ROOT's)
    next to ROOT's Fill components (ROOT must hold model_index.json already:
    FileNotFoundError otherwise); returns it.

    The transformer is `FluxTransformer2DModel(**transformer_cfg, in_channels=...)` under
    `torch.manual_seed(seed)`, constant tensors perturbed (`perturb_constants`).
    """
    import diffusers
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    in_channels, pipeline_class, bfl_name = VARIANT_MODELS[kind]
    dtype = dtype or torch.float32
    root = Path(root)
    out = root / kind
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**dict(transformer_cfg, in_channels=in_channels,
                                          out_channels=64))
    perturb_constants(model, seed + 1000)
    model = model.eval().to(dtype)
    model.save_pretrained(out / "transformer", safe_serialization=True)
    bfl = bfl_keys.transformer_to_bfl(model.state_dict())
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(out / bfl_name),
              metadata={"format": "pt"})
    for name in CONTROL_MODEL_SHARED:
        (out / name).symlink_to(Path("..") / name, target_is_directory=True)
    index = json.loads((root / "model_index.json").read_text())  # the Fill pipeline's
    index.update(_class_name=pipeline_class, _diffusers_version=diffusers.__version__)
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def write_control_model(root: str | Path, transformer_cfg: dict, seed: int = 0,
                        dtype: torch.dtype | None = None) -> Path:
    """ROOT/control-model/: the FLUX.1-Canny-dev layout (`write_variant_model`)."""
    return write_variant_model(root, transformer_cfg, "control-model", seed, dtype)
