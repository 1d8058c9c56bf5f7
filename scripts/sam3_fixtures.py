"""Random-weight SAM 3 image-model checkpoints for tests (transformers `Sam3Model` layout).

    python scripts/sam3_fixtures.py OUT [--preset tiny] [--seed 0] [--meta FILE]
    sam3_config(preset) -> dict                     # a Sam3Config dict (no torch)
    make_model(preset, seed) -> Sam3Model           # float32, eval mode
    write_folder(model, out) -> Path                # config.json + model.safetensors,
                                                    # tokenizer files, preprocessor_config.json
    build_sam3(out, preset, seed=0) -> Path         # make_model + write_folder
    meta_state_dict(state) -> dict                  # HF names -> Meta's original names
                                                    # (vision backbone + text encoder)

Presets: `tiny` (ViT width 32, 3 layers with the middle one global, 84 px input = a 6 x 6
grid in 4 x 4 windows so the windows pad, a 3 x 3 pretraining position table so it is
tiled; FPN width 16; CLIP text width 32, 2 layers, the real 49408-id vocabulary; heads
width 16, one layer each, 8 queries), `real-widths-2-layers` (facebook/sam3's vision and
text widths at 504 px, two layers each, tiny heads but for the text projection's
256 outputs). `sam3` is the released facebook/sam3 config
(transformers' `Sam3Config()` defaults; for benchmarks only), `sam3-504` the same at
504 px. Weights: torch's default inits, then seeded noise on every constant tensor
(`sam_fixtures._perturb`: norm weights, zero biases) so a miswired one fails parity.

Files beside the weights: the CLIP BPE tokenizer (`tokenizer_files.write_clip_tokenizer`,
the vocabulary Sam3Processor uses, max length 32) and `preprocessor_config.json` with the
`Sam3ImageProcessor` values (resize to the square input, bilinear, rescale 1/255, mean =
std = 0.5), written as JSON because that processor needs torchvision, not installed here.
Reference: transformers models/sam3/{configuration,modeling,processing}_sam3.py,
convert_sam3_to_hf.py (for `meta_state_dict`, its mapping read backwards).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from sam_fixtures import randomize_torch
from sam_fixtures import processor_config as sam2_processor_config
from tokenizer_files import write_clip_tokenizer

SAM3_MEAN = SAM3_STD = [0.5, 0.5, 0.5]
TEXT_MAX_LENGTH = 32

_HEADS = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32)

TINY = dict(
    vision_config=dict(
        backbone_config=dict(
            model_type="sam3_vit_model", hidden_size=32, intermediate_size=64,
            num_hidden_layers=3, num_attention_heads=2, image_size=84, patch_size=14,
            window_size=4, global_attn_indexes=[1], pretrain_image_size=42),
        fpn_hidden_size=16, backbone_feature_sizes=[[24, 24], [12, 12], [6, 6]]),
    text_config=dict(
        model_type="clip_text_model", vocab_size=49408, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, projection_dim=16,
        max_position_embeddings=TEXT_MAX_LENGTH, hidden_act="gelu"),
    geometry_encoder_config=dict(num_layers=1, **_HEADS),
    detr_encoder_config=dict(num_layers=1, **_HEADS),
    detr_decoder_config=dict(num_layers=1, num_queries=8, **_HEADS),
    mask_decoder_config=dict(hidden_size=16, num_attention_heads=2),
)

# facebook/sam3's vision and text widths, windows (24) and pretraining table (24 x 24) with
# two layers each (one windowed, one global) at 504 px instead of 1008 (a 36 x 36 grid: the
# windows pad, the table tiles), tiny heads: the real widths at a cost CI can pay (the
# 1008 px input takes ~15 s per side on a 2-core CPU).
REAL_WIDTHS_2_LAYERS = dict(
    TINY,
    vision_config=dict(backbone_config=dict(model_type="sam3_vit_model", num_hidden_layers=2,
                                            global_attn_indexes=[1], image_size=504),
                       backbone_feature_sizes=[[144, 144], [72, 72], [36, 36]]),
    text_config=dict(model_type="clip_text_model", hidden_size=1024, intermediate_size=4096,
                     num_hidden_layers=2, num_attention_heads=16, projection_dim=512,
                     max_position_embeddings=TEXT_MAX_LENGTH, hidden_act="gelu"),
    detr_encoder_config=dict(num_layers=1, **dict(_HEADS, hidden_size=256)),
)

# The released config, every layer, at 504 px (the precision benchmark's model: a quarter
# of the 1008 px tokens).
SAM3_504 = dict(vision_config=dict(backbone_config=dict(image_size=504),
                                   backbone_feature_sizes=[[144, 144], [72, 72], [36, 36]]))

PRESETS = {"tiny": TINY, "real-widths-2-layers": REAL_WIDTHS_2_LAYERS, "sam3": {},
           "sam3-504": SAM3_504}


def sam3_config(preset: str = "tiny") -> dict:
    """The Sam3Config kwargs of `preset` (a fresh copy); KeyError for an unknown one."""
    return json.loads(json.dumps(PRESETS[preset]))


def make_model(preset: str = "tiny", seed: int = 0):
    """A float32 eval-mode transformers `Sam3Model` with seeded random weights."""
    import torch
    from transformers import Sam3Config, Sam3Model

    torch.manual_seed(seed)
    model = Sam3Model(Sam3Config(**sam3_config(preset))).eval()
    # torch's default inits: outputs that depend on their inputs
    return randomize_torch(model, seed)


def processor_config(image_size: int) -> dict:
    """The `preprocessor_config.json` of a SAM 3 checkpoint for a square input size: SAM
    2.1's steps with mean = std = 0.5 (its mask size left to the processor's default)."""
    config = {k: v for k, v in sam2_processor_config(image_size).items() if k != "mask_size"}
    return {**config, "image_processor_type": "Sam3ImageProcessor",
            "processor_class": "Sam3Processor", "image_mean": SAM3_MEAN, "image_std": SAM3_STD}


def write_folder(model, out: str | Path) -> Path:
    """Write `model` as a transformers Sam3Model folder (save_pretrained, safetensors)
    with the CLIP tokenizer (max length 32) and preprocessor_config.json; returns `out`."""
    out = Path(out)
    model.save_pretrained(out)
    write_side_files(out, model.config.vision_config.backbone_config.image_size)
    return out


def write_side_files(out: Path, image_size: int) -> None:
    """The files beside a SAM 3 folder's weights: the CLIP tokenizer (max length 32) and
    preprocessor_config.json for a square input of `image_size` px (no torch)."""
    write_clip_tokenizer(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["model_max_length"] = TEXT_MAX_LENGTH
    cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    (out / "preprocessor_config.json").write_text(
        json.dumps(processor_config(image_size), indent=2))


def build_sam3(out: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a SAM 3 checkpoint folder for `preset` to `out`; returns `out`."""
    return write_folder(make_model(preset, seed), out)


# transformers name -> Meta name (convert_sam3_to_hf.py read backwards), vision and text.
_TO_META = [
    (r"^vision_encoder\.backbone\.embeddings\.patch_embeddings\.projection\.",
     "backbone.vision_backbone.trunk.patch_embed.proj."),
    (r"^vision_encoder\.backbone\.layer_norm\.", "backbone.vision_backbone.trunk.ln_pre."),
    (r"^vision_encoder\.backbone\.layers\.(\d+)\.layer_norm(\d)\.",
     r"backbone.vision_backbone.trunk.blocks.\1.norm\2."),
    (r"^vision_encoder\.backbone\.layers\.(\d+)\.attention\.o_proj\.",
     r"backbone.vision_backbone.trunk.blocks.\1.attn.proj."),
    (r"^vision_encoder\.backbone\.layers\.(\d+)\.mlp\.", r"backbone.vision_backbone.trunk.blocks.\1.mlp."),
    (r"^vision_encoder\.neck\.fpn_layers\.(\d+)\.proj1\.", r"backbone.vision_backbone.convs.\1.conv_1x1."),
    (r"^vision_encoder\.neck\.fpn_layers\.(\d+)\.proj2\.", r"backbone.vision_backbone.convs.\1.conv_3x3."),
    (r"^text_encoder\.text_model\.embeddings\.token_embedding\.",
     "backbone.language_backbone.encoder.token_embedding."),
    (r"^text_encoder\.text_model\.embeddings\.position_embedding\.weight$",
     "backbone.language_backbone.encoder.positional_embedding"),
    (r"^text_encoder\.text_model\.final_layer_norm\.", "backbone.language_backbone.encoder.ln_final."),
    (r"^text_encoder\.text_projection\.weight$", "backbone.language_backbone.encoder.text_projection"),
    (r"^text_encoder\.text_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.",
     r"backbone.language_backbone.encoder.transformer.resblocks.\1.attn.out_proj."),
    (r"^text_encoder\.text_model\.encoder\.layers\.(\d+)\.layer_norm(\d)\.",
     r"backbone.language_backbone.encoder.transformer.resblocks.\1.ln_\2."),
    (r"^text_encoder\.text_model\.encoder\.layers\.(\d+)\.mlp\.fc1\.",
     r"backbone.language_backbone.encoder.transformer.resblocks.\1.mlp.c_fc."),
    (r"^text_encoder\.text_model\.encoder\.layers\.(\d+)\.mlp\.fc2\.",
     r"backbone.language_backbone.encoder.transformer.resblocks.\1.mlp.c_proj."),
    (r"^text_projection\.", "backbone.language_backbone.resizer."),
]


def _fpn_meta(key: str) -> tuple[str, str, str]:
    """(level, scale layer, weight|bias) of a neck scale layer's transformers name."""
    pattern = r"^vision_encoder\.neck\.fpn_layers\.(\d+)\.scale_layers\.(\d+)\.(.+)$"
    return re.match(pattern, key).groups()


def meta_state_dict(state: dict, *, scale_factors=(4.0, 2.0, 1.0, 0.5)) -> dict:
    """The vision and text tensors of a transformers Sam3Model state dict (numpy or torch
    values) under Meta's original names, prefixed `detector.` as in the released file:
    q/k/v fused (`attn.qkv`, `attn.in_proj_*`), a class-token row prepended to `pos_embed`,
    CLIP's text projection transposed. Other tensors (the heads) are left out."""
    import numpy as np

    state = {k: np.asarray(v) for k, v in state.items()}
    out = {}
    for key, value in state.items():
        if re.search(r"\.(q|k|v)_proj\.", key) or key.endswith("position_ids"):
            continue
        if key == "vision_encoder.backbone.embeddings.position_embeddings":
            cls = np.full_like(value[:, :1], 7.0)  # any value: dropped on load
            out["backbone.vision_backbone.trunk.pos_embed"] = np.concatenate([cls, value], 1)
        elif ".scale_layers." in key:
            n, m, rest = _fpn_meta(key)
            name = "dconv_2x2" if scale_factors[int(n)] == 2.0 else f"dconv_2x2_{int(m) // 2}"
            out[f"backbone.vision_backbone.convs.{n}.{name}.{rest}"] = value
        else:
            for pattern, repl in _TO_META:
                if re.match(pattern, key):
                    new = re.sub(pattern, repl, key)
                    out[new] = value.T if new.endswith("encoder.text_projection") else value
                    break
    for key in state:
        m = re.match(r"^vision_encoder\.backbone\.layers\.(\d+)\.attention\.q_proj\.(\w+)$", key)
        t = re.match(r"^text_encoder\.text_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.(\w+)$", key)
        if m:
            name = f"backbone.vision_backbone.trunk.blocks.{m[1]}.attn.qkv.{m[2]}"
        elif t:
            name = f"backbone.language_backbone.encoder.transformer.resblocks.{t[1]}.attn.in_proj_{t[2]}"
        else:
            continue
        out[name] = np.concatenate([state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")])
    return {"detector." + k: v for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--meta", help="also write the vision + text tensors in Meta's names here")
    args = parser.parse_args()
    model = make_model(args.preset, args.seed)
    print(write_folder(model, args.out))
    if args.meta:
        from safetensors.numpy import save_file
        state = {k: v.numpy() for k, v in model.state_dict().items()}
        save_file(meta_state_dict(state), args.meta)
        print(args.meta)


if __name__ == "__main__":
    main()
