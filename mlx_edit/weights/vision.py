"""Key maps, loaders and sources for the image-prompt models: the CLIP and SigLIP vision
towers, XLabs IP-Adapter files and FLUX.1 Redux embedders.

Vision towers: transformers checkpoints (`CLIPVisionModelWithProjection`, a full
`CLIPModel` such as openai/clip-vit-large-patch14, `SiglipVisionModel` or a full
`SiglipModel`), as a folder with `config.json` or a bare `.safetensors` file (then the
default config: CLIP ViT-L/14, SigLIP so400m-patch14-384). The `vision_model.` prefix is
stripped (transformers 5 `save_pretrained` omits it for SigLIP); the text half of a full
model, SigLIP's pooling head and position-id buffers are dropped by explicit tables.

IP-Adapter: the mapping of diffusers `FluxIPAdapterMixin.load_ip_adapter`
(loaders/ip_adapter.py): `ip_adapter_proj_model.`/`image_proj.` -> image projection,
`double_blocks.N.processor.ip_adapter_double_stream_{k,v}_proj` (or diffusers'
`ip_adapter.N.to_{k,v}_ip`) -> layer N. Not scripts/convert_flux_xlabs_ipadapter_to_diffusers.py,
which maps proj from norm and overwrites to_k_ip with the v weight.
Redux: `redux_{up,down}.{weight,bias}` (diffusers `image_embedder/` and BFL
`flux1-redux-dev.safetensors` use the same names). Everything else must match exactly.
The loaders are entries of weights/specs.py; this module holds their tables and sources.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx

from mlx_edit.models.clip import CLIPVisionModel
from mlx_edit.models.ip_adapter import IPAdapter, IPAdapterConfig
from mlx_edit.models.redux import ReduxConfig, ReduxImageEncoder, SiglipVisionModel
from mlx_edit.weights import loader
from mlx_edit.weights.core import Rule, WeightLoadError, plan_mapping, rename
from mlx_edit.weights.sources import CONFIG_AND_WEIGHTS, download, local_or_remote

DEFAULT_CLIP_VISION = "openai/clip-vit-large-patch14"  # XLabs / diffusers IP-Adapter docs
DEFAULT_SIGLIP = "google/siglip-so400m-patch14-384"  # BFL Redux
IP_ADAPTER_FILES = ("ip_adapter.safetensors", "flux-ip-adapter.safetensors")  # XLabs names
REDUX_FILES = ("flux1-redux-dev.safetensors",)
ENCODER_FOLDER = "image_encoder"  # diffusers pipeline component names
EMBEDDER_FOLDER = "image_embedder"

_LAYER = "encoder.layers.{n}"


def encoder_rules() -> tuple[Rule, ...]:
    """CLIP/SigLIP encoder layers: q/k/v fused into `qkv_proj`, the rest copied."""
    attn = _LAYER + ".self_attn"
    fused = tuple(
        Rule(f"{attn}.qkv_proj.{p}", tuple(f"{attn}.{x}_proj.{p}" for x in "qkv"), "concat")
        for p in ("weight", "bias")
    )
    parts = ("self_attn.out_proj", "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")
    return fused + tuple(rename(f"{_LAYER}.{m}.{{p}}", f"{_LAYER}.{m}.{{p}}") for m in parts)


CLIP_VISION_RULES: tuple[Rule, ...] = (
    rename("embeddings.class_embedding", "embeddings.class_embedding"),
    Rule("embeddings.patch_embedding.weight", ("embeddings.patch_embedding.weight",), "conv"),
    rename("embeddings.position_embedding.weight", "embeddings.position_embedding.weight"),
    rename("pre_layrnorm.{p}", "pre_layernorm.{p}"),
    *encoder_rules(),
    rename("post_layernorm.{p}", "post_layernorm.{p}"),
    rename("visual_projection.weight", "visual_projection.weight"),
)

SIGLIP_RULES: tuple[Rule, ...] = (
    Rule("embeddings.patch_embedding.weight", ("embeddings.patch_embedding.weight",), "conv"),
    rename("embeddings.patch_embedding.bias", "embeddings.patch_embedding.bias"),
    rename("embeddings.position_embedding.weight", "embeddings.position_embedding.weight"),
    *encoder_rules(),
    rename("post_layernorm.{p}", "post_layernorm.{p}"),
)

# Dropped, never loaded (after the `vision_model.` strip): the text half of a full
# CLIPModel/SiglipModel, SigLIP's attention-pooling head (Redux reads last_hidden_state),
# position-id buffers of older checkpoints.
VISION_DROP_PREFIXES = ("text_model.", "head.")
VISION_DROP_KEYS = ("embeddings.position_ids", "text_projection.weight", "logit_scale",
                    "logit_bias")

IP_ADAPTER_RULES: tuple[Rule, ...] = tuple(
    rename(f"{prefix}.{m}.{{p}}", f"image_proj.{m}.{{p}}")
    for prefix in ("ip_adapter_proj_model", "image_proj")
    for m in ("proj", "norm")
) + tuple(
    rename(src, f"layers.{{n}}.to_{kv}_ip.{{p}}")
    for kv in ("k", "v")
    for src in (
        f"double_blocks.{{n}}.processor.ip_adapter_double_stream_{kv}_proj.{{p}}",
        f"ip_adapter.{{n}}.to_{kv}_ip.{{p}}",
    )
)

REDUX_RULES: tuple[Rule, ...] = (
    rename("redux_up.{p}", "redux_up.{p}"),
    rename("redux_down.{p}", "redux_down.{p}"),
)


def load_clip_vision(path: str | Path, dtype: mx.Dtype | None = None, *,
                     config: dict | None = None) -> CLIPVisionModel:
    """Load a CLIP vision tower with projection from a transformers folder (`config.json`
    + safetensors, CLIPVisionModelWithProjection or full CLIPModel) or a bare file
    (config: `config` or the ViT-L/14 defaults).

    Raises WeightLoadError (missing files/config, missing, unexpected or mis-shaped keys).
    """
    return loader.load("clip_vision", path, dtype, config=config)


def load_siglip_vision(path: str | Path, dtype: mx.Dtype | None = None, *,
                       config: dict | None = None) -> SiglipVisionModel:
    """Load a SigLIP vision tower from a transformers folder (SiglipVisionModel or full
    SiglipModel) or a bare file (config: `config` or the so400m-patch14-384 defaults).

    Raises WeightLoadError (missing files/config, missing, unexpected or mis-shaped keys).
    """
    return loader.load("siglip_vision", path, dtype, config=config)


def ip_adapter_config(tensors: Mapping[str, mx.array]) -> IPAdapterConfig:
    """Sizes of an IP-Adapter from its tensor shapes (XLabs files carry no config).

    T = proj rows / to_k_ip input width (4 for XLabs v1/v2; diffusers' rule "16 if 65536
    rows" gives the same for FLUX files). Raises WeightLoadError when the file is not an
    IP-Adapter or its shapes disagree.
    """
    plan, _ = plan_mapping(tensors.keys(), IP_ADAPTER_RULES)
    shapes = {item.target: tuple(tensors[item.sources[0]].shape) for item in plan}
    proj, k0 = shapes.get("image_proj.proj.weight"), shapes.get("layers.0.to_k_ip.weight")
    if proj is None or k0 is None:
        raise WeightLoadError(
            "not a FLUX IP-Adapter: expected ip_adapter_proj_model.proj.weight and "
            "double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight (XLabs layout)"
        )
    hidden, cross = k0
    if proj[0] % cross:
        raise WeightLoadError(f"IP-Adapter projection rows {proj[0]} are not a multiple of "
                              f"the key input width {cross}")
    layers = {int(t.split(".")[1]) for t in shapes if t.startswith("layers.")}
    return IPAdapterConfig(image_embed_dim=proj[1], cross_attention_dim=cross,
                           num_tokens=proj[0] // cross, hidden_size=hidden,
                           num_layers=max(layers) + 1)


def load_ip_adapter(path: str | Path, dtype: mx.Dtype | None = None) -> IPAdapter:
    """Load an IP-Adapter `.safetensors` file (XLabs-AI/flux-ip-adapter layout, or the
    `image_proj.`/`ip_adapter.` layout diffusers' loader also accepts), strictly.

    Raises WeightLoadError (unreadable, not an IP-Adapter, missing/unexpected/mis-shaped).
    """
    return loader.load("ip_adapter", path, dtype)


def redux_config(tensors: Mapping[str, mx.array]) -> ReduxConfig:
    """Sizes of a Redux embedder from its tensor shapes (the BFL file has no config)."""
    up = tensors["redux_up.weight"].shape
    return ReduxConfig(redux_dim=up[1], txt_in_features=up[0] // 3)


def load_redux_embedder(path: str | Path, dtype: mx.Dtype | None = None) -> ReduxImageEncoder:
    """Load a Redux image embedder: a diffusers `image_embedder/` folder (config.json +
    safetensors) or the BFL single file `flux1-redux-dev.safetensors` (sizes from shapes).

    Raises WeightLoadError (unreadable, missing/unexpected/mis-shaped tensors).
    """
    return loader.load("redux", path, dtype)


# ---------------------------------------------------------------- sources


def resolve_encoder(repo_or_path: str | Path, what: str = "image encoder") -> Path:
    """A vision tower: a local folder or file as given, or a hub snapshot of the repo's
    config.json and safetensors. Raises WeightLoadError (missing path, failed download)."""
    path, remote = local_or_remote(repo_or_path, what)
    return download(str(repo_or_path), list(CONFIG_AND_WEIGHTS), what) if remote else path


def _pick_file(folder: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    found = ", ".join(f.name for f in files) or "none"
    raise WeightLoadError(f"{folder}: cannot tell which file is the {what} (expected "
                          f"{' or '.join(names)}; .safetensors files: {found})")


def _local_encoder(base: Path, given, default: str, what: str, remote: bool) -> Path:
    if given is not None:
        return resolve_encoder(given, what)
    if (base / ENCODER_FOLDER).is_dir():
        return base / ENCODER_FOLDER
    if remote:
        return resolve_encoder(default, what)
    raise WeightLoadError(
        f"{base}: no {what} ({ENCODER_FOLDER}/ with config.json and safetensors) next to the "
        f"adapter; put {default} there or pass its folder/repo id as the image encoder"
    )


def resolve_ip_adapter(repo_or_path: str | Path, image_encoder: str | Path | None = None
                       ) -> tuple[Path, Path]:
    """(adapter file, CLIP vision tower path) for an IP-Adapter given as a `.safetensors`
    file, a folder holding one (ip_adapter.safetensors or a single file), or a repo id.

    The vision tower: `image_encoder` if given, else `image_encoder/` beside the adapter,
    else (repo ids only) openai/clip-vit-large-patch14 from the hub.
    Raises WeightLoadError (missing file or vision tower, failed download).
    """
    path, remote = local_or_remote(repo_or_path, "IP-Adapter")
    if remote:
        path = download(str(repo_or_path), [*IP_ADAPTER_FILES, f"{ENCODER_FOLDER}/*"],
                        "IP-Adapter")
    adapter = path if path.is_file() else _pick_file(path, IP_ADAPTER_FILES, "IP-Adapter")
    base = path.parent if path.is_file() else path
    clip = _local_encoder(base, image_encoder, DEFAULT_CLIP_VISION, "CLIP vision tower", remote)
    return adapter, clip


def resolve_redux(repo_or_path: str | Path, image_encoder: str | Path | None = None
                  ) -> tuple[Path, Path]:
    """(embedder folder or file, SigLIP vision tower path) for FLUX.1 Redux given as a
    FLUX.1-Redux-dev folder (image_embedder/ or flux1-redux-dev.safetensors, plus
    image_encoder/), an embedder file, or a repo id.

    The vision tower: `image_encoder` if given, else `image_encoder/` in the folder, else
    (repo ids only) google/siglip-so400m-patch14-384 from the hub.
    Raises WeightLoadError (missing embedder or vision tower, failed download).
    """
    path, remote = local_or_remote(repo_or_path, "Redux")
    if remote:
        path = download(str(repo_or_path), [f"{EMBEDDER_FOLDER}/*", f"{ENCODER_FOLDER}/*"],
                        "Redux")
        if not (path / EMBEDDER_FOLDER).is_dir():
            path = download(str(repo_or_path), list(REDUX_FILES), "Redux")
    if path.is_file():
        embedder, base = path, path.parent
    elif (path / EMBEDDER_FOLDER).is_dir():
        embedder, base = path / EMBEDDER_FOLDER, path
    else:
        embedder, base = _pick_file(path, REDUX_FILES, "Redux embedder"), path
    siglip = _local_encoder(base, image_encoder, DEFAULT_SIGLIP, "SigLIP vision tower", remote)
    return embedder, siglip
