"""Meta's original SAM 2.1 naming (`sam2.1_hiera_*.pt` state dicts saved as safetensors).

The facebookresearch/sam2 checkpoints name the image model `image_encoder.trunk.*` (Hiera),
`image_encoder.neck.*` (FPN), `sam_prompt_encoder.*`, `sam_mask_decoder.*` and
`no_mem_embed`, plus the video-memory modules. `META_RULES` maps them to our (= the
transformers `Sam2Model`) names as transformers' converter does
(models/sam2/convert_sam2_to_hf.py: KEYS_TO_MODIFY_MAPPING and replace_keys): `.norm` ->
`.layer_norm`, `out_proj` -> `o_proj`, MLP `layers.k` -> proj_in / layers / proj_out,
`output_upscaling.{0,1,3}`, `mask_downscaling.{0,1,3,4,6}`, `neck.convs.n.conv`, the four
`point_embeddings.i` stacked into one table. The prompt encoder's Gaussian matrix also
serves the image's positional embedding (`META_SHARED`). Video-only tensors are dropped by
name (`META_DROP`); everything else is strict.

Such a file has no config.json: the released size is read off the Hiera width and depth
(`META_PRESETS`, the configs of the same converter's get_config).
"""

from __future__ import annotations

import re

from mlx_edit.weights.core import Rule, WeightLoadError, rename

_T, _N = "image_encoder.trunk.", "image_encoder.neck."
_P, _D = "sam_prompt_encoder.", "sam_mask_decoder."
_VB, _PE, _MD = "vision_encoder.backbone.", "prompt_encoder.", "mask_decoder."
_TR = "transformer."


def _mlp3(source: str, target: str) -> tuple[Rule, ...]:
    """A three-layer MLP (`layers.0..2`) -> FeedForward (proj_in, layers.0, proj_out)."""
    return (rename(f"{source}.layers.0.{{p}}", f"{target}.proj_in.{{p}}"),
            rename(f"{source}.layers.1.{{p}}", f"{target}.layers.0.{{p}}"),
            rename(f"{source}.layers.2.{{p}}", f"{target}.proj_out.{{p}}"))


def _attention(source: str, target: str) -> tuple[Rule, ...]:
    return (rename(f"{source}.out_proj.{{p}}", f"{target}.o_proj.{{p}}"),
            rename(f"{source}.{{l}}_proj.{{p}}", f"{target}.{{l}}_proj.{{p}}"))


META_RULES: tuple[Rule, ...] = (
    # Hiera trunk and FPN neck
    Rule(_VB + "patch_embed.projection.weight", (_T + "patch_embed.proj.weight",), "conv"),
    rename(_T + "patch_embed.proj.bias", _VB + "patch_embed.projection.bias"),
    rename(_T + "pos_embed", _VB + "pos_embed"),
    rename(_T + "pos_embed_window", _VB + "pos_embed_window"),
    rename(_T + "blocks.{i}.norm{n}.{p}", _VB + "blocks.{i}.layer_norm{n}.{p}"),
    rename(_T + "blocks.{i}.attn.{l}.{p}", _VB + "blocks.{i}.attn.{l}.{p}"),
    rename(_T + "blocks.{i}.mlp.layers.0.{p}", _VB + "blocks.{i}.mlp.proj_in.{p}"),
    rename(_T + "blocks.{i}.mlp.layers.1.{p}", _VB + "blocks.{i}.mlp.proj_out.{p}"),
    rename(_T + "blocks.{i}.proj.{p}", _VB + "blocks.{i}.proj.{p}"),
    Rule("vision_encoder.neck.convs.{n}.weight", (_N + "convs.{n}.conv.weight",), "conv1x1"),
    rename(_N + "convs.{n}.conv.bias", "vision_encoder.neck.convs.{n}.bias"),
    rename("no_mem_embed", "no_memory_embedding"),
    # prompt encoder
    rename(_P + "pe_layer.positional_encoding_gaussian_matrix",
           _PE + "shared_embedding.positional_embedding"),
    rename("shared_image_embedding.positional_embedding",
           "shared_image_embedding.positional_embedding"),  # from META_SHARED
    Rule(_PE + "point_embed.weight", tuple(f"{_P}point_embeddings.{i}.weight" for i in range(4)),
         "concat"),
    rename(_P + "not_a_point_embed.weight", _PE + "not_a_point_embed.weight"),
    rename(_P + "no_mask_embed.weight", _PE + "no_mask_embed.weight"),
    *(rule for idx, name in ((0, "conv1"), (3, "conv2"), (6, "conv3"))
      for rule in (Rule(f"{_PE}mask_embed.{name}.weight",
                        (f"{_P}mask_downscaling.{idx}.weight",), "conv"),
                   rename(f"{_P}mask_downscaling.{idx}.bias", f"{_PE}mask_embed.{name}.bias"))),
    rename(_P + "mask_downscaling.1.{p}", _PE + "mask_embed.layer_norm1.{p}"),
    rename(_P + "mask_downscaling.4.{p}", _PE + "mask_embed.layer_norm2.{p}"),
    # mask decoder
    *(rule for a in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
      for rule in _attention(f"{_D}{_TR}layers.{{i}}.{a}", f"{_MD}{_TR}layers.{{i}}.{a}")),
    rename(_D + _TR + "layers.{i}.norm{n}.{p}", _MD + _TR + "layers.{i}.layer_norm{n}.{p}"),
    rename(_D + _TR + "layers.{i}.mlp.layers.0.{p}", _MD + _TR + "layers.{i}.mlp.proj_in.{p}"),
    rename(_D + _TR + "layers.{i}.mlp.layers.1.{p}", _MD + _TR + "layers.{i}.mlp.proj_out.{p}"),
    *_attention(_D + _TR + "final_attn_token_to_image", _MD + _TR + "final_attn_token_to_image"),
    rename(_D + _TR + "norm_final_attn.{p}", _MD + _TR + "layer_norm_final_attn.{p}"),
    rename(_D + "{t}_token.weight", _MD + "{t}_token.weight"),
    rename(_D + "mask_tokens.weight", _MD + "mask_tokens.weight"),
    rename(_D + "output_upscaling.0.{p}", _MD + "upscale_conv1.{p}"),
    rename(_D + "output_upscaling.1.{p}", _MD + "upscale_layer_norm.{p}"),
    rename(_D + "output_upscaling.3.{p}", _MD + "upscale_conv2.{p}"),
    Rule(_MD + "conv_{s}.weight", (_D + "conv_{s}.weight",), "conv1x1"),
    rename(_D + "conv_{s}.bias", _MD + "conv_{s}.bias"),
    *_mlp3(_D + "output_hypernetworks_mlps.{i}", _MD + "output_hypernetworks_mlps.{i}"),
    *_mlp3(_D + "iou_prediction_head", _MD + "iou_prediction_head"),
    *_mlp3(_D + "pred_obj_score_head", _MD + "pred_obj_score_head"),
)

# One source tensor that feeds a second target: {target key added: source key}.
META_SHARED = {"shared_image_embedding.positional_embedding":
               _P + "pe_layer.positional_encoding_gaussian_matrix"}

# Video-only tensors of the original checkpoints (memory attention/encoder, object pointers).
META_DROP = re.compile(
    r"^(memory_attention\..*|memory_encoder\..*|mask_downsample\..*|obj_ptr_proj\..*|"
    r"obj_ptr_tpos_proj\..*|maskmem_tpos_enc|no_mem_pos_enc|no_obj_ptr|no_obj_embed_spatial)$"
)


def _preset(width: int, heads: int, blocks: list, global_blocks: list, **extra) -> dict:
    dims = [width * 2**i for i in range(4)]
    backbone = dict(hidden_size=width, embed_dim_per_stage=dims, blocks_per_stage=blocks,
                    num_attention_heads_per_stage=[heads * 2**i for i in range(4)],
                    global_attention_blocks=global_blocks, **extra)
    return {"model_type": "sam2", "vision_config": {
        "backbone_config": backbone, "backbone_channel_list": dims[::-1]}}


# (Hiera width, number of blocks) -> config of the released sizes.
META_PRESETS = {
    (96, 12): ("sam2.1_hiera_tiny", _preset(96, 1, [1, 2, 7, 2], [5, 7, 9])),
    (96, 16): ("sam2.1_hiera_small", _preset(96, 1, [1, 2, 11, 2], [7, 10, 13])),
    (112, 24): ("sam2.1_hiera_base_plus", _preset(
        112, 2, [2, 3, 16, 3], [12, 16, 20], window_positional_embedding_background_size=[14, 14])),
    (144, 48): ("sam2.1_hiera_large", _preset(
        144, 2, [2, 6, 36, 4], [23, 33, 43], window_size_per_stage=[8, 4, 16, 8])),
}


def is_meta(keys) -> bool:
    """Whether checkpoint keys use Meta's original names."""
    return _T + "patch_embed.proj.weight" in keys


def meta_config(tensors, name: str) -> dict:
    """The config of a Meta-named checkpoint without config.json, from its Hiera width
    (patch embedding rows) and block count. WeightLoadError for an unreleased size."""
    width = tensors[_T + "patch_embed.proj.weight"].shape[0]
    blocks = len({k.split(".")[3] for k in tensors if k.startswith(_T + "blocks.")})
    if (width, blocks) not in META_PRESETS:
        known = ", ".join(n for n, _ in META_PRESETS.values())
        raise WeightLoadError(f"{name}: a Hiera of width {width} with {blocks} blocks is none "
                              f"of the released SAM 2.1 sizes ({known}); add a config.json")
    return META_PRESETS[(width, blocks)][1]


def meta_tensors(tensors: dict) -> dict:
    """The Meta-named `tensors` without video-only keys, plus the `META_SHARED` aliases."""
    out = {k: v for k, v in tensors.items() if not META_DROP.match(k)}
    out.update({target: out[source] for target, source in META_SHARED.items() if source in out})
    return out
