"""Load the FLUX VAEs from a diffusers `vae/` folder or a BFL / LDM single file (the
"vae" entry of weights/specs.py; this module holds its key maps and file layout).
FLUX.1's `AutoencoderKL` and FLUX.2's `AutoencoderKLFlux2` share the map and the model
(mlx_edit.models.vae, `VAEConfig.patch_size` set for FLUX.2).

Key maps are data (tuples of `Rule`). Our module names are the diffusers names, so the
diffusers map only transposes conv weights; the BFL map follows diffusers'
`convert_ldm_vae_checkpoint` (diffusers `loaders/single_file_utils.py`):
`down.i.block.j` -> `down_blocks.i.resnets.j`, `up.(n-1-i)` -> `up_blocks.i` (reversed),
`mid.block_{1,2}` -> `mid_block.resnets.{0,1}`, `mid.attn_1.{norm,q,k,v,proj_out}` (1x1
convs) -> `mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}` (Linear),
`norm_out` -> `conv_norm_out`, `nin_shortcut` -> `conv_shortcut`. BFL's FLUX.2
`AutoEncoder` (black-forest-labs/flux2 `src/flux2/autoencoder.py`) keeps its quant convs
inside the encoder and decoder (`encoder.quant_conv`, `decoder.post_quant_conv`; diffusers
`scripts/convert_flux2_to_diffusers.py` maps them to the top level) and has the latent
batch norm `bn.running_mean` / `bn.running_var` under the diffusers names.
`bn.num_batches_tracked` (both namings) is a training counter, not a weight: dropped.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from mlx_edit.models.vae import AutoencoderKL, VAEConfig
from mlx_edit.weights import loader
from mlx_edit.weights.core import Rule, rename, safetensors_files

# Prefixes of the VAE inside LDM / BFL single files (diffusers LDM_VAE_KEYS).
BFL_PREFIXES = ("first_stage_model.", "vae.")

# Tensors of a VAE file that are not weights (the batch norm's training counter).
DROP_KEYS = ("bn.num_batches_tracked",)

# Our layers whose weight is a PyTorch conv (OIHW -> OHWI); the rest copy as is.
_CONV_LAYERS = ("conv_in", "conv_out", "conv1", "conv2", "conv_shortcut", "conv")

DIFFUSERS_RULES: tuple[Rule, ...] = (
    *(Rule(f"{{rest}}.{n}.weight", (f"{{rest}}.{n}.weight",), "conv") for n in _CONV_LAYERS),
    Rule("quant_conv.weight", ("quant_conv.weight",), "conv"),
    Rule("post_quant_conv.weight", ("post_quant_conv.weight",), "conv"),
    rename("{rest}", "{rest}"),
)


def _resnet(src: str, dst: str) -> tuple[Rule, ...]:
    """Rows for one BFL ResnetBlock `src` -> our ResnetBlock `dst` (placeholders allowed)."""
    rows = []
    for s, d in (("norm1", "norm1"), ("norm2", "norm2")):
        rows += [rename(f"{src}.{s}.weight", f"{dst}.{d}.weight"),
                 rename(f"{src}.{s}.bias", f"{dst}.{d}.bias")]
    for s, d in (("conv1", "conv1"), ("conv2", "conv2"), ("nin_shortcut", "conv_shortcut")):
        rows += [Rule(f"{dst}.{d}.weight", (f"{src}.{s}.weight",), "conv"),
                 rename(f"{src}.{s}.bias", f"{dst}.{d}.bias")]
    return tuple(rows)


def _conv(src: str, dst: str) -> tuple[Rule, ...]:
    return (Rule(f"{dst}.weight", (f"{src}.weight",), "conv"), rename(f"{src}.bias", f"{dst}.bias"))


def _attention(part: str) -> tuple[Rule, ...]:
    src, dst = f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0"
    rows = [rename(f"{src}.norm.{p}", f"{dst}.group_norm.{p}") for p in ("weight", "bias")]
    for s, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        rows += [Rule(f"{dst}.{d}.weight", (f"{src}.{s}.weight",), "conv1x1"),
                 rename(f"{src}.{s}.bias", f"{dst}.{d}.bias")]
    return tuple(rows)


def bfl_rules(num_levels: int = 4, flux2: bool = False) -> tuple[Rule, ...]:
    """The BFL/LDM `ae.safetensors` key map (prefixes already stripped) for a VAE with
    `num_levels` = len(block_out_channels); the decoder's up blocks are numbered in
    reverse in BFL, so the table depends on it. `flux2`: BFL's FLUX.2 AutoEncoder (quant
    convs inside encoder / decoder, the latent batch norm) instead of LDM's top-level
    quant convs."""
    rows: list[Rule] = []
    for part in ("encoder", "decoder"):
        rows += [*_conv(f"{part}.conv_in", f"{part}.conv_in"),
                 *_conv(f"{part}.conv_out", f"{part}.conv_out"),
                 rename(f"{part}.norm_out.weight", f"{part}.conv_norm_out.weight"),
                 rename(f"{part}.norm_out.bias", f"{part}.conv_norm_out.bias"),
                 *_resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0"),
                 *_resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1"),
                 *_attention(part)]
    rows += _resnet("encoder.down.{i}.block.{j}", "encoder.down_blocks.{i}.resnets.{j}")
    rows += _conv("encoder.down.{i}.downsample.conv", "encoder.down_blocks.{i}.downsamplers.0.conv")
    for b in range(num_levels):
        i = num_levels - 1 - b
        rows += _resnet(f"decoder.up.{b}.block.{{j}}", f"decoder.up_blocks.{i}.resnets.{{j}}")
        rows += _conv(f"decoder.up.{b}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    if flux2:
        rows += [*_conv("encoder.quant_conv", "quant_conv"),
                 *_conv("decoder.post_quant_conv", "post_quant_conv"),
                 rename("bn.running_mean", "bn.running_mean"),
                 rename("bn.running_var", "bn.running_var")]
    else:
        rows += [*_conv("quant_conv", "quant_conv"), *_conv("post_quant_conv", "post_quant_conv")]
    return tuple(rows)


def is_diffusers(keys) -> bool:
    return any(".down_blocks." in k or ".mid_block." in k for k in keys)


def strip_vae_prefix(tensors: dict) -> dict:
    """Keep only the VAE of a full LDM/BFL checkpoint and strip its prefix (as
    diffusers' convert_ldm_vae_checkpoint: the last prefix that occurs wins)."""
    prefix = ""
    for p in BFL_PREFIXES:
        if any(k.startswith(p) for k in tensors):
            prefix = p
    if not prefix:
        return tensors
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def locate(path: Path) -> tuple[list[Path], Path | None]:
    """(safetensors files, config folder or None) of a VAE file, `vae/` folder or a
    diffusers model root holding `vae/`; WeightLoadError when there is none."""
    path = loader.existing(path, "VAE")
    if path.is_file():
        return [path], None
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"  # a diffusers model root
    return safetensors_files(path), path


def complete_config(config: dict, tensors) -> dict:
    """Configs that predate `use_quant_conv` / `use_post_quant_conv` (and BFL files)
    decide by the keys present; a file with the latent batch norm (`bn.running_mean`)
    without config is FLUX.2's: 2x2 patches over its channels / 4 latent channels."""
    found = {"use_quant_conv": any(k in tensors for k in ("quant_conv.weight",
                                                          "encoder.quant_conv.weight")),
             "use_post_quant_conv": any(k in tensors for k in ("post_quant_conv.weight",
                                                               "decoder.post_quant_conv.weight"))}
    if "bn.running_mean" in tensors and "patch_size" not in config:
        found.update(patch_size=(2, 2), latent_channels=tensors["bn.running_mean"].shape[0] // 4)
    return {**found, **config}


def read_vae_config(path: str | Path, config: VAEConfig | dict | None = None) -> VAEConfig:
    """The VAEConfig `load_vae(path, config=config)` would use, without loading weights
    (config.json and the safetensors headers only). Raises WeightLoadError as `load_vae`
    does for a missing or unreadable path or an unsupported config."""
    return loader.open_checkpoint("vae", path, config).config


def load_vae(
    path: str | Path,
    dtype: mx.Dtype | None = None,
    config: VAEConfig | dict | None = None,
) -> AutoencoderKL:
    """Load an AutoencoderKL from `path`, strictly.

    `path`: a diffusers `vae/` folder (config.json + safetensors, possibly sharded), a
    diffusers model root holding `vae/`, or a single safetensors file in BFL/LDM naming
    (`ae.safetensors`; keys may carry `first_stage_model.` or `vae.`, and other
    components of a full checkpoint are ignored) or in diffusers naming.
    `dtype`: parameter and compute dtype; None -> `default_dtype()` (float32 on CPU).
    `config`: replaces the folder's config.json; a single file without one uses the
    FLUX defaults, with `use_quant_conv` / `use_post_quant_conv` set by the keys present
    and, for a FLUX.2 file (BFL `flux2-vae` / `ae.safetensors` with `bn.*`), 2x2 patches
    and 32 latent channels read off the batch norm.

    Raises WeightLoadError naming the missing, unexpected or mis-shaped keys, or when
    the path holds no readable safetensors / config.
    """
    return loader.load("vae", path, dtype, config=config)
