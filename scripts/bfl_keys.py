"""diffusers -> BFL (Black Forest Labs) state-dict conversion for the FLUX transformer and VAE.

Used only by `scripts/make_tiny_checkpoint.py` (to write `flux1-fill-dev.safetensors` and
`ae.safetensors` next to the diffusers folders) and by the tests. It is the inverse of
diffusers' own converters in `diffusers/loaders/single_file_utils.py`:
`convert_flux_transformer_checkpoint_to_diffusers` and `convert_ldm_vae_checkpoint`;
`tests/test_fixtures.py` proves the round trip exact.

The maps are tables: a rename rule is `(regex on the diffusers key, BFL template)`, where the
template is a format string over the regex groups (plus derived fields for the VAE); a fuse rule
concatenates several diffusers tensors, in table order along dim 0, into one BFL tensor.
Every input key must match exactly one rule and every fused group must be complete, or a
KeyError names the offending keys. Unprefixed BFL keys are produced, as BFL ships them
(ComfyUI files add `model.diffusion_model.`, see `COMFY_PREFIX`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the module's tables serve torch-free code too
    import torch

COMFY_PREFIX = "model.diffusion_model."

# --- FLUX transformer ------------------------------------------------------------------------

_P = r"(weight|bias)"
# (diffusers regex, BFL template); `{0}`.. are the regex groups.
TRANSFORMER_RENAMES: list[tuple[str, str]] = [
    (rf"x_embedder\.{_P}", "img_in.{0}"),
    (rf"context_embedder\.{_P}", "txt_in.{0}"),
    (rf"time_text_embed\.timestep_embedder\.linear_1\.{_P}", "time_in.in_layer.{0}"),
    (rf"time_text_embed\.timestep_embedder\.linear_2\.{_P}", "time_in.out_layer.{0}"),
    (rf"time_text_embed\.guidance_embedder\.linear_1\.{_P}", "guidance_in.in_layer.{0}"),
    (rf"time_text_embed\.guidance_embedder\.linear_2\.{_P}", "guidance_in.out_layer.{0}"),
    (rf"time_text_embed\.text_embedder\.linear_1\.{_P}", "vector_in.in_layer.{0}"),
    (rf"time_text_embed\.text_embedder\.linear_2\.{_P}", "vector_in.out_layer.{0}"),
    (rf"transformer_blocks\.(\d+)\.norm1\.linear\.{_P}", "double_blocks.{0}.img_mod.lin.{1}"),
    (
        rf"transformer_blocks\.(\d+)\.norm1_context\.linear\.{_P}",
        "double_blocks.{0}.txt_mod.lin.{1}",
    ),
    (
        r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight",
        "double_blocks.{0}.img_attn.norm.query_norm.scale",
    ),
    (
        r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight",
        "double_blocks.{0}.img_attn.norm.key_norm.scale",
    ),
    (
        r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight",
        "double_blocks.{0}.txt_attn.norm.query_norm.scale",
    ),
    (
        r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight",
        "double_blocks.{0}.txt_attn.norm.key_norm.scale",
    ),
    (rf"transformer_blocks\.(\d+)\.attn\.to_out\.0\.{_P}", "double_blocks.{0}.img_attn.proj.{1}"),
    (rf"transformer_blocks\.(\d+)\.attn\.to_add_out\.{_P}", "double_blocks.{0}.txt_attn.proj.{1}"),
    (rf"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.{_P}", "double_blocks.{0}.img_mlp.0.{1}"),
    (rf"transformer_blocks\.(\d+)\.ff\.net\.2\.{_P}", "double_blocks.{0}.img_mlp.2.{1}"),
    (
        rf"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.{_P}",
        "double_blocks.{0}.txt_mlp.0.{1}",
    ),
    (rf"transformer_blocks\.(\d+)\.ff_context\.net\.2\.{_P}", "double_blocks.{0}.txt_mlp.2.{1}"),
    (
        rf"single_transformer_blocks\.(\d+)\.norm\.linear\.{_P}",
        "single_blocks.{0}.modulation.lin.{1}",
    ),
    (
        r"single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight",
        "single_blocks.{0}.norm.query_norm.scale",
    ),
    (
        r"single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight",
        "single_blocks.{0}.norm.key_norm.scale",
    ),
    (rf"single_transformer_blocks\.(\d+)\.proj_out\.{_P}", "single_blocks.{0}.linear2.{1}"),
    (rf"proj_out\.{_P}", "final_layer.linear.{0}"),
    (rf"norm_out\.linear\.{_P}", "final_layer.adaLN_modulation.1.{0}"),
]

# (diffusers regex with a named group `part`, BFL template, parts in concatenation order)
TRANSFORMER_FUSES: list[tuple[str, str, tuple[str, ...]]] = [
    (
        rf"transformer_blocks\.(\d+)\.attn\.(?P<part>to_q|to_k|to_v)\.{_P}",
        "double_blocks.{0}.img_attn.qkv.{2}",
        ("to_q", "to_k", "to_v"),
    ),
    (
        rf"transformer_blocks\.(\d+)\.attn\.(?P<part>add_q_proj|add_k_proj|add_v_proj)\.{_P}",
        "double_blocks.{0}.txt_attn.qkv.{2}",
        ("add_q_proj", "add_k_proj", "add_v_proj"),
    ),
    (
        rf"single_transformer_blocks\.(\d+)\.(?P<part>attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp)\.{_P}",
        "single_blocks.{0}.linear1.{2}",
        ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    ),
]

# BFL's LastLayer splits its modulation as (shift, scale); diffusers' AdaLayerNormContinuous
# as (scale, shift): swap the halves on dim 0 (weight and bias).
_SWAP_SCALE_SHIFT = re.compile(r"final_layer\.adaLN_modulation\.1\.(weight|bias)")


def swap_scale_shift(t: torch.Tensor) -> torch.Tensor:
    """[a; b] -> [b; a] along dim 0 (its own inverse). Shape (2n, ...) -> (2n, ...)."""
    a, b = t.chunk(2, dim=0)
    import torch

    return torch.cat([b, a], dim=0)


def _fullmatch(rules, key):
    hits = [(rule, m) for rule in rules if (m := re.fullmatch(rule[0], key))]
    return hits


def _cat(tensors: list) -> torch.Tensor:
    import torch

    return torch.cat(tensors, dim=0)


def transformer_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a diffusers `FluxTransformer2DModel` state dict to BFL `flux1-*.safetensors` keys.

    Shapes follow BFL: `img_attn.qkv` (3H, H), `single_blocks.N.linear1` (3H + 4H, H),
    `final_layer.adaLN_modulation.1` with halves swapped; everything else unchanged.
    Works on any tensor device (including `meta`). The input is not modified.
    Raises KeyError naming unmatched keys, keys matched twice, or incomplete fused groups.
    Inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers`.
    """
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    group_order: dict[str, tuple[str, ...]] = {}
    unmatched, ambiguous = [], []
    for key, t in sd.items():
        renames = _fullmatch(TRANSFORMER_RENAMES, key)
        fuses = _fullmatch(TRANSFORMER_FUSES, key)
        if len(renames) + len(fuses) == 0:
            unmatched.append(key)
            continue
        if len(renames) + len(fuses) > 1:
            ambiguous.append(key)
            continue
        if renames:
            (_, template), m = renames[0]
            new = template.format(*m.groups())
            out[new] = swap_scale_shift(t) if _SWAP_SCALE_SHIFT.fullmatch(new) else t
        else:
            (_, template, order), m = fuses[0]
            new = template.format(*m.groups())
            groups.setdefault(new, {})[m.group("part")] = t
            group_order[new] = order
    if unmatched or ambiguous:
        raise KeyError(f"transformer_to_bfl: unmatched {unmatched}, ambiguous {ambiguous}")
    incomplete = {k: sorted(v) for k, v in groups.items() if set(v) != set(group_order[k])}
    if incomplete:
        raise KeyError(f"transformer_to_bfl: incomplete fused groups {incomplete}")
    for new, parts in groups.items():
        out[new] = _cat([parts[p] for p in group_order[new]])
    return out


# --- VAE (AutoencoderKL <-> BFL `ae.safetensors`) ---------------------------------------------

_RES = r"(norm1|conv1|norm2|conv2|conv_shortcut)"
_ATT = r"(group_norm|to_q|to_k|to_v|to_out\.0)"
_ATT_BFL = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

# (diffusers regex, function of (groups, num_up_blocks) -> BFL key)
VAE_RULES: list[tuple[str, Callable[[tuple[str, ...], int], str]]] = [
    (rf"(encoder|decoder)\.(conv_in|conv_out)\.{_P}", lambda g, n: f"{g[0]}.{g[1]}.{g[2]}"),
    (rf"(quant_conv|post_quant_conv)\.{_P}", lambda g, n: f"{g[0]}.{g[1]}"),
    (rf"(encoder|decoder)\.conv_norm_out\.{_P}", lambda g, n: f"{g[0]}.norm_out.{g[1]}"),
    (
        rf"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.{_RES}\.{_P}",
        lambda g, n: f"encoder.down.{g[0]}.block.{g[1]}.{_nin(g[2])}.{g[3]}",
    ),
    (
        rf"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.{_P}",
        lambda g, n: f"encoder.down.{g[0]}.downsample.conv.{g[1]}",
    ),
    (
        rf"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.{_RES}\.{_P}",
        lambda g, n: f"decoder.up.{n - 1 - int(g[0])}.block.{g[1]}.{_nin(g[2])}.{g[3]}",
    ),
    (
        rf"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.{_P}",
        lambda g, n: f"decoder.up.{n - 1 - int(g[0])}.upsample.conv.{g[1]}",
    ),
    (
        rf"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.{_RES}\.{_P}",
        lambda g, n: f"{g[0]}.mid.block_{int(g[1]) + 1}.{_nin(g[2])}.{g[3]}",
    ),
    (
        rf"(encoder|decoder)\.mid_block\.attentions\.0\.{_ATT}\.{_P}",
        lambda g, n: f"{g[0]}.mid.attn_1.{_ATT_BFL[g[1]]}.{g[2]}",
    ),
]
# BFL's mid attention uses 1x1 convs: Linear (O, I) -> Conv2d (O, I, 1, 1).
_VAE_CONV1X1 = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")


def _nin(name: str) -> str:
    return "nin_shortcut" if name == "conv_shortcut" else name


def vae_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a diffusers `AutoencoderKL` state dict to BFL `ae.safetensors` keys.

    Decoder up blocks are renumbered `i -> n-1-i`; mid-attention Linear weights (O, I) become
    1x1 conv weights (O, I, 1, 1); `conv_shortcut` -> `nin_shortcut`; `conv_norm_out` ->
    `norm_out`. The input is not modified. Raises KeyError naming unmatched or ambiguous keys.
    Inverse of diffusers' `convert_ldm_vae_checkpoint`.
    """
    ups = {int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    n_up = max(ups) + 1 if ups else 0
    out: dict[str, torch.Tensor] = {}
    unmatched, ambiguous = [], []
    for key, t in sd.items():
        hits = _fullmatch(VAE_RULES, key)
        if len(hits) != 1:
            (ambiguous if hits else unmatched).append(key)
            continue
        (_, fn), m = hits[0]
        new = fn(m.groups(), n_up)
        if _VAE_CONV1X1.fullmatch(new) and t.ndim == 2:
            t = t.reshape(*t.shape, 1, 1)
        out[new] = t
    if unmatched or ambiguous:
        raise KeyError(f"vae_to_bfl: unmatched {unmatched}, ambiguous {ambiguous}")
    return out
