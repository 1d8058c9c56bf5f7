"""Random-weight SAM 2.1 image-model checkpoints for tests (transformers `Sam2Model` layout).

    python scripts/sam_fixtures.py OUT [--preset tiny|hiera-tiny] [--seed 0]
    build_sam(out, preset, seed=0) -> Path                      # from tests

OUT gets `config.json` + `model.safetensors` (transformers `save_pretrained` of a
`Sam2Model`, float32) and `preprocessor_config.json` (the `Sam2ImageProcessor` values:
resize to the model's square input, ImageNet mean/std; written as JSON because
transformers' SAM 2 image processor needs torchvision, which is not installed here).

Presets: `tiny` (Hiera widths 16/32/64/128, seven blocks, 256 px input, FPN width 32),
`tiny-b` (the same widths in base-plus/large's layout: 2 blocks and heads in stage 0,
14 x 14 background position embedding),
`hiera-tiny` (the facebook/sam2.1-hiera-tiny config: transformers' `Sam2Config()`
defaults, 1024 px) and `hiera-small|base-plus|large` (the other released sizes, for
benchmarks). The tiny windows (8, 4, 6, 3) make stage 2 and 3 pad their windows
as the real 14/7 windows do on 64/32 grids. Weights: `torch.manual_seed(seed)`, the
transformers constructor, torch's default layer inits, then seeded noise on every constant tensor (norm weights,
zero biases, zero position embeddings) so a miswired one fails parity.
Reference: transformers models/sam2/{configuration,modeling}_sam2.py.

The configs (`sam_config`, `processor_config`) import no torch: the torch-free twin,
`make_mlx_checkpoint.write_segmenter`, builds the same presets with mlx-edit's own model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

TINY_BACKBONE = dict(
    model_type="sam2_hiera_det_model", hidden_size=16, num_attention_heads=1,
    image_size=[256, 256],
    blocks_per_stage=[1, 2, 3, 1], embed_dim_per_stage=[16, 32, 64, 128],
    num_attention_heads_per_stage=[1, 2, 2, 4], window_size_per_stage=[8, 4, 6, 3],
    global_attention_blocks=[4], window_positional_embedding_background_size=[7, 7],
)


def _hiera(width: int, heads: int, blocks: list, global_blocks: list, **extra) -> dict:
    """The vision config of a released Hiera size (transformers convert_sam2_to_hf.py)."""
    dims = [width * 2**i for i in range(4)]
    backbone = dict(model_type="sam2_hiera_det_model", hidden_size=width,
                    num_attention_heads=heads, embed_dim_per_stage=dims,
                    num_attention_heads_per_stage=[heads * 2**i for i in range(4)],
                    blocks_per_stage=blocks, global_attention_blocks=global_blocks, **extra)
    return dict(vision_config=dict(backbone_config=backbone, backbone_channel_list=dims[::-1]))


# The released SAM 2.1 image encoders; the prompt encoder and decoder are the same in all.
PRESETS = {
    "hiera-tiny": {},  # transformers' defaults are facebook/sam2.1-hiera-tiny
    "hiera-small": _hiera(96, 1, [1, 2, 11, 2], [7, 10, 13]),
    "hiera-base-plus": _hiera(112, 2, [2, 3, 16, 3], [12, 16, 20],
                              window_positional_embedding_background_size=[14, 14]),
    "hiera-large": _hiera(144, 2, [2, 6, 36, 4], [23, 33, 43],
                          window_size_per_stage=[8, 4, 16, 8]),
}


# `tiny` in the layout of base-plus/large: two blocks and two heads in stage 0, a 14 x 14
# background position embedding, default FPN levels.
TINY_B_BACKBONE = dict(TINY_BACKBONE, num_attention_heads=2, blocks_per_stage=[2, 2, 3, 2],
                       num_attention_heads_per_stage=[2, 2, 4, 4], window_size_per_stage=[8, 4, 6, 4],
                       global_attention_blocks=[5], window_positional_embedding_background_size=[14, 14])


def sam_config(preset: str = "tiny") -> dict:
    """Sam2Config kwargs (nested dicts) for `preset`."""
    if preset in PRESETS:
        return PRESETS[preset]
    if preset == "tiny-b":
        cfg = sam_config("tiny")
        cfg["vision_config"]["backbone_config"] = dict(TINY_B_BACKBONE)
        return cfg
    if preset != "tiny":
        raise ValueError(f"unknown SAM fixture preset {preset!r} (tiny, tiny-b, {', '.join(PRESETS)})")
    hidden = 32
    return dict(
        vision_config=dict(
            backbone_config=dict(TINY_BACKBONE),
            backbone_channel_list=[128, 64, 32, 16],
            backbone_feature_sizes=[[64, 64], [32, 32], [16, 16]],
            fpn_hidden_size=hidden,
        ),
        prompt_encoder_config=dict(hidden_size=hidden, image_size=256, patch_size=16,
                                   mask_input_channels=8),
        mask_decoder_config=dict(hidden_size=hidden, mlp_dim=64, num_attention_heads=2,
                                 iou_head_hidden_dim=32),
    )


def _perturb(module, seed: int) -> None:
    """Seeded noise on constant parameters and buffers of a torch module (see
    make_tiny_checkpoint)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    with torch.no_grad():
        for _, p in tensors:
            flat = p.detach().reshape(-1)
            if flat.numel() == 0 or not p.is_floating_point() or not bool((flat == flat[0]).all()):
                continue
            c = float(flat[0])
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            p.add_(noise * (0.02 if c == 0.0 else 0.1 * abs(c)))


def make_model(preset: str = "tiny", seed: int = 0):
    """A float32 eval-mode transformers `Sam2Model` with seeded random weights."""
    import torch
    from transformers import Sam2Config, Sam2Model

    torch.manual_seed(seed)
    model = Sam2Model(Sam2Config(**sam_config(preset))).eval()
    # torch's default inits (kaiming-uniform Linear/Conv, N(0, 1) Embedding) instead of
    # transformers' N(0, 0.02): with those, the small heads' outputs are their biases and
    # the IoU / object scores would not depend on the prompt at all.
    return randomize_torch(model, seed)


def randomize_torch(model, seed: int):
    """`model` (a torch module) with torch's default inits on its Linear/Conv/Embedding
    layers and seeded noise on its constant tensors (`_perturb` with seed + 1)."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d,
                                   torch.nn.Embedding)):
                module.reset_parameters()
    _perturb(model, seed + 1)
    return model


def processor_config(image_size: int) -> dict:
    """The `preprocessor_config.json` of a SAM 2.1 checkpoint for a square input size."""
    return {
        "image_processor_type": "Sam2ImageProcessor", "processor_class": "Sam2Processor",
        "do_resize": True, "size": {"height": image_size, "width": image_size},
        "mask_size": {"height": image_size // 4, "width": image_size // 4},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
        "do_convert_rgb": True,
    }


def build_sam(out: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a SAM 2.1 checkpoint folder for `preset` to `out`; returns `out`."""
    out = Path(out)
    model = make_model(preset, seed)
    model.save_pretrained(out)
    size = model.config.prompt_encoder_config.image_size
    (out / "preprocessor_config.json").write_text(json.dumps(processor_config(size), indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "tiny-b", *PRESETS])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_sam(args.out, args.preset, args.seed))


if __name__ == "__main__":
    main()
