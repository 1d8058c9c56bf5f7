"""Random-weight image-prompt models for tests and `--extras ip-adapter,redux`.

    write_image_prompt_fixtures(OUT, transformer_cfg, preset, seed)   # make_tiny_checkpoint

OUT gets, sized for a base FLUX transformer config (the IP-Adapter's keys/values live in
its attention width, Redux tokens in its text width `joint_attention_dim`):

    ip-adapter/ip_adapter.safetensors      XLabs-AI/flux-ip-adapter key layout:
        ip_adapter_proj_model.{proj,norm}.{weight,bias}
        double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.{weight,bias}
    ip-adapter/image_encoder/              CLIPVisionModelWithProjection (save_pretrained)
    redux/                                 black-forest-labs/FLUX.1-Redux-dev layout:
        model_index.json                   FluxPriorReduxPipeline
        image_embedder/                    ReduxImageEncoder (diffusers save_pretrained)
        image_encoder/                     SiglipVisionModel (transformers save_pretrained)
        feature_extractor/                 SiglipImageProcessor config
        flux1-redux-dev.safetensors        BFL single file (redux_{up,down}.{weight,bias})

Every model is built by transformers / diffusers from a config under `torch.manual_seed`;
the IP-Adapter is diffusers' `ImageProjection` plus one Linear pair per double block,
renamed to the XLabs keys. Constant tensors (LayerNorm weights 1, biases 0) get seeded
noise so a parity test fails when one is wired wrong. Presets: `tiny` / `small` (vision
width 32 / 64, two layers, real image sizes 224 / 384 and patch 14) and `wide` (CLIP
ViT-L/14 and SigLIP so400m widths, two layers each; IP-Adapter T=4 tokens as XLabs v1).
Reference: diffusers loaders/ip_adapter.py (FluxIPAdapterMixin.load_ip_adapter),
pipelines/flux/modeling_flux.py (ReduxImageEncoder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the configs serve the torch-free builder too
    import torch

# Vision tower widths per preset: (hidden, intermediate, heads, layers).
CLIP_WIDTHS = {"tiny": (32, 37, 4, 2), "small": (64, 256, 2, 2), "wide": (1024, 4096, 16, 2)}
SIGLIP_WIDTHS = {"tiny": (32, 37, 4, 2), "small": (64, 256, 2, 2), "wide": (1152, 4304, 16, 2)}
# CLIP image-embedding width (projection_dim) per preset; ViT-L/14 projects to 768.
CLIP_PROJECTION = {"tiny": 32, "small": 64, "wide": 768}
IP_TOKENS = 4  # XLabs flux-ip-adapter v1/v2: 4 image tokens (diffusers: 16 if 65536 rows)

REDUX_MODEL_INDEX = {
    "_class_name": "FluxPriorReduxPipeline",
    "feature_extractor": ["transformers", "SiglipImageProcessor"],
    "image_embedder": ["diffusers", "ReduxImageEncoder"],
    "image_encoder": ["transformers", "SiglipVisionModel"],
}


def _perturb(module: torch.nn.Module, seed: int) -> None:
    from make_tiny_checkpoint import perturb_constant_tensors  # lazy: it imports us

    perturb_constant_tensors(module, seed)


def clip_vision_config(preset: str = "tiny") -> dict:
    """CLIPVisionConfig kwargs for `preset` (224 px, patch 14, quick_gelu as CLIP-L)."""
    hidden, inter, heads, layers = CLIP_WIDTHS[preset]
    return dict(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                num_hidden_layers=layers, image_size=224, patch_size=14,
                projection_dim=CLIP_PROJECTION[preset], hidden_act="quick_gelu",
                layer_norm_eps=1e-5)


def siglip_vision_config(preset: str = "tiny") -> dict:
    """SiglipVisionConfig kwargs for `preset` (384 px, patch 14, as so400m-patch14-384)."""
    hidden, inter, heads, layers = SIGLIP_WIDTHS[preset]
    return dict(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                num_hidden_layers=layers, image_size=384, patch_size=14,
                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


def make_clip_vision(cfg: dict, seed: int = 0) -> torch.nn.Module:
    """`CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg))`, random, float32, eval."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**cfg))
    _perturb(model, seed + 1000)
    return model.eval()


def make_siglip_vision(cfg: dict, seed: int = 0) -> torch.nn.Module:
    """`SiglipVisionModel(SiglipVisionConfig(**cfg))`, random, float32, eval."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**cfg))
    _perturb(model, seed + 1000)
    return model.eval()


def make_redux_embedder(redux_dim: int, txt_in_features: int, seed: int = 0) -> torch.nn.Module:
    """diffusers `ReduxImageEncoder(redux_dim, txt_in_features)`, random, float32, eval."""
    import torch
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    torch.manual_seed(seed)
    return ReduxImageEncoder(redux_dim=redux_dim, txt_in_features=txt_in_features).eval()


def xlabs_ip_adapter_state_dict(transformer_cfg: dict, image_embed_dim: int,
                                num_tokens: int = IP_TOKENS, seed: int = 0,
                                num_layers: int | None = None) -> dict[str, torch.Tensor]:
    """An IP-Adapter for `transformer_cfg` with XLabs-AI/flux-ip-adapter key names.

    Image projection: diffusers ImageProjection(image_embed_dim -> num_tokens x
    joint_attention_dim, LayerNorm); per double block: Linear(joint_attention_dim ->
    hidden) for k and v, PyTorch's default init. `num_layers` defaults to the
    transformer's double-block count.
    """
    import torch
    from diffusers.models.embeddings import ImageProjection

    cross = transformer_cfg["joint_attention_dim"]
    hidden = transformer_cfg["num_attention_heads"] * transformer_cfg["attention_head_dim"]
    layers = transformer_cfg["num_layers"] if num_layers is None else num_layers
    torch.manual_seed(seed)
    proj = ImageProjection(image_embed_dim=image_embed_dim, cross_attention_dim=cross,
                           num_image_text_embeds=num_tokens)
    _perturb(proj, seed + 1000)
    sd = {"ip_adapter_proj_model.proj." + k.split(".")[-1]: v
          for k, v in proj.image_embeds.state_dict().items()}
    sd.update({"ip_adapter_proj_model.norm." + k: v for k, v in proj.norm.state_dict().items()})
    for i in range(layers):
        for kv in ("k", "v"):
            lin = torch.nn.Linear(cross, hidden)
            prefix = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj."
            sd.update({prefix + k: v for k, v in lin.state_dict().items()})
    return {k: v.detach().contiguous() for k, v in sd.items()}


def _save_file(sd: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(path),
              metadata={"format": "pt"})


def write_ip_adapter(out: str | Path, transformer_cfg: dict, preset: str = "tiny",
                     seed: int = 0, dtype: torch.dtype | None = None) -> Path:
    """Write `out` = an XLabs-layout IP-Adapter folder (module doc); returns `out`.
    dtype: a torch dtype, None for float32."""
    import torch

    dtype = dtype or torch.float32
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clip = make_clip_vision(clip_vision_config(preset), seed)
    if dtype != torch.float32:
        clip = clip.to(dtype)
    clip.save_pretrained(out / "image_encoder")
    sd = xlabs_ip_adapter_state_dict(transformer_cfg, CLIP_PROJECTION[preset], seed=seed + 1)
    _save_file(sd, out / "ip_adapter.safetensors", dtype)
    return out


def write_redux(out: str | Path, transformer_cfg: dict, preset: str = "tiny", seed: int = 0,
                dtype: torch.dtype | None = None) -> Path:
    """Write `out` = a FLUX.1-Redux-dev-layout folder (module doc); returns `out`.
    dtype: a torch dtype, None for float32."""
    import diffusers
    import torch
    from transformers import SiglipImageProcessor

    dtype = dtype or torch.float32
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = siglip_vision_config(preset)
    siglip = make_siglip_vision(cfg, seed)
    embedder = make_redux_embedder(cfg["hidden_size"], transformer_cfg["joint_attention_dim"],
                                   seed + 1)
    if dtype != torch.float32:
        siglip, embedder = siglip.to(dtype), embedder.to(dtype)
    siglip.save_pretrained(out / "image_encoder")
    embedder.save_pretrained(out / "image_embedder", safe_serialization=True)
    _save_file(embedder.state_dict(), out / "flux1-redux-dev.safetensors", dtype)
    SiglipImageProcessor(size={"height": cfg["image_size"], "width": cfg["image_size"]}) \
        .save_pretrained(out / "feature_extractor")
    index = {"_class_name": REDUX_MODEL_INDEX["_class_name"],
             "_diffusers_version": diffusers.__version__,
             **{k: v for k, v in REDUX_MODEL_INDEX.items() if not k.startswith("_")}}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


EXTRAS = {"ip-adapter": write_ip_adapter, "redux": write_redux}


def write_image_prompt_fixtures(out: str | Path, transformer_cfg: dict, preset: str = "tiny",
                                seed: int = 0, dtype: torch.dtype | None = None,
                                kinds: tuple[str, ...] = ("ip-adapter", "redux"),
                                ) -> dict[str, Path]:
    """Write `out/ip-adapter/` and/or `out/redux/` (module doc); returns {kind: folder}.
    Raises KeyError for an unknown kind or preset."""
    paths = {}
    for offset, kind in enumerate(kinds):
        if kind not in EXTRAS:
            raise KeyError(f"unknown image-prompt extra {kind!r}; choose from {sorted(EXTRAS)}")
        paths[kind] = EXTRAS[kind](Path(out) / kind, transformer_cfg, preset,
                                   seed + 10 * offset, dtype)
    return paths
