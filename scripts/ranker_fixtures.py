"""A random-weight ranking CLIP (`ranker/`) for the test checkpoints.

    write_ranker(OUT / "ranker", text_cfg, preset, seed, tokenizer_dir)   # make_tiny_checkpoint

`ranker/` is the layout of openai/clip-vit-large-patch14: a transformers `CLIPModel`
(text tower + text_projection, vision tower + visual_projection, logit_scale) saved with
`save_pretrained`, plus the CLIP tokenizer files (vocab.json, merges.txt) next to it. The
text tower has the checkpoint's CLIP text config (`text_encoder/`), the vision tower
scripts/image_prompt_fixtures.py's preset widths; both project to the text width.
Constant tensors get seeded noise so a parity test fails when one is wired wrong.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from image_prompt_fixtures import clip_vision_config

TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
             "bos_token_id", "eos_token_id", "pad_token_id")


def make_ranker(text_cfg: dict, preset: str = "tiny", seed: int = 0) -> torch.nn.Module:
    """`CLIPModel` with the given text config and the preset's vision tower, float32, eval."""
    import transformers

    from make_tiny_checkpoint import perturb_constant_tensors  # lazy: it imports us

    text = {k: text_cfg[k] for k in TEXT_KEYS if k in text_cfg}
    vision = clip_vision_config(preset)
    proj = vision.pop("projection_dim")
    config = transformers.CLIPConfig(text_config=text, vision_config=vision,
                                     projection_dim=proj)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config)
    perturb_constant_tensors(model, seed + 1000)
    with torch.no_grad():  # CLIP's trained value is ln(100); the init is ln(1 / 0.07)
        model.logit_scale.fill_(4.6052)
    return model.eval()


def write_ranker(out: str | Path, text_cfg: dict, preset: str, seed: int,
                 tokenizer_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `out` (a CLIPModel folder with its tokenizer files); returns it."""
    out = Path(out)
    make_ranker(text_cfg, preset, seed).to(dtype).save_pretrained(out)
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    return out
