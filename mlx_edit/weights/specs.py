"""The table of model kinds and their checkpoint formats: what `loader.load(kind, path)`
reads. Every `load_*` function of this package is one call of it.

    kind           formats (tried in this order)          config of a file without one
    transformer    diffusers, bfl, mlx                    bfl: from shapes (+ RoPE axes)
    flux2_transformer  diffusers, bfl, mlx                bfl: from shapes (+ RoPE axes)
    vae            mlx, diffusers, bfl                    FLUX.1 defaults (+ quant convs;
                                                          FLUX.2 by its batch norm)
    clip_text      mlx, transformers                      (a folder is required)
    t5             mlx, transformers                      (a folder is required)
    qwen3          mlx, transformers                      (a folder is required)
    controlnet     diffusers, xlabs, mlx                  xlabs: from shapes
    clip_vision    transformers                           ViT-L/14 defaults
    siglip_vision  transformers                           so400m-patch14-384 defaults
    ip_adapter     xlabs (and diffusers' names)           from shapes
    redux          diffusers, bfl                         bfl: from shapes
    sam3_vision    mlx, transformers, meta                meta: SAM 3 defaults + overrides
    sam3_text      mlx, transformers, meta                meta: SAM 3 defaults + overrides
    sam3_heads     mlx, transformers, meta                meta: SAM 3 defaults + overrides

To add a format: one entry here, in the `formats` of its kind: a `Format(detect, rules,
infer)` with its key map (a tuple of `core.Rule`, kept beside the kind's other maps in
flux.py, vae.py, text.py, controlnet.py or vision.py) and, when its files carry no
config.json, the function reading the config off the tensor shapes. To add a kind: one
`Spec` here (config and model classes, where its files are, the formats, which tensors
are not weights, the quantization policy in `quantize.FULL_PRECISION`) and a thin
`load_*` calling `loader.load`. The `mlx` format is the folders `mlx-edit convert`
writes (our names, quantization recorded in config.json).
"""

from __future__ import annotations

from mlx_edit.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from mlx_edit.models.controlnet import ControlNetConfig, FluxControlNet
from mlx_edit.models.flux import FluxConfig, FluxTransformer
from mlx_edit.models.flux2 import Flux2Config, Flux2Transformer
from mlx_edit.models.ip_adapter import IPAdapter, IPAdapterConfig
from mlx_edit.models.sam3_heads import Sam3Heads, Sam3HeadsConfig
from mlx_edit.models.sam3_text import Sam3TextConfig, Sam3TextEncoder
from mlx_edit.models.sam3_vision import Sam3VisionConfig, Sam3VisionModel
from mlx_edit.models.redux import (
    ReduxConfig,
    ReduxImageEncoder,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from mlx_edit.models.qwen3 import Qwen3Config, Qwen3TextEncoder
from mlx_edit.models.t5 import T5Config, T5Encoder
from mlx_edit.models.vae import AutoencoderKL, VAEConfig
from mlx_edit.weights import controlnet, flux, flux2, qwen3, sam3, text, vae, vision
from mlx_edit.weights.loader import (
    Format,
    Spec,
    always,
    any_key,
    file_or_folder,
    has_config,
    mlx_format,
)
from mlx_edit.weights.quantize import is_mlx_layout


def _axes(overrides: dict):
    return overrides.get("axes_dims_rope")


# The inference functions are looked up on their modules at call time, so a test (or a
# user) can wrap `flux.infer_bfl_config` for files whose RoPE axes are not the default.
TRANSFORMER = Spec(
    "FLUX transformer", FluxConfig, FluxTransformer, file_or_folder("transformer"),
    formats={
        "diffusers": Format(any_key("x_embedder.weight"), flux.DIFFUSERS_RULES,
                            sign="x_embedder.*"),
        "bfl": Format(any_key("final_layer.adaLN_modulation.1.weight"), flux.BFL_RULES,
                      infer=lambda t, o: flux.infer_bfl_config(t, _axes(o)),
                      sign="img_in.*, final_layer.adaLN_modulation.*"),
        "mlx": mlx_format("final_layer.modulation.weight", "final_layer.modulation.scales"),
    },
    prefixes=flux.BFL_PREFIXES, quantize_policy="transformer",
    class_name="FluxTransformer2DModel",
)

FLUX2_TRANSFORMER = Spec(
    "FLUX.2 transformer", Flux2Config, Flux2Transformer, file_or_folder("FLUX.2 transformer"),
    formats={
        "diffusers": Format(any_key(flux2.DIFFUSERS_SIGN), flux2.DIFFUSERS_RULES,
                            sign=flux2.DIFFUSERS_SIGN),
        "bfl": Format(any_key(flux2.BFL_SIGN), flux2.BFL_RULES,
                      infer=lambda t, o: flux2.infer_bfl_config(t, _axes(o)),
                      sign=flux2.BFL_SIGN),
        "mlx": mlx_format("double_mod_img.weight", "double_mod_img.scales"),
    },
    prefixes=flux.BFL_PREFIXES, quantize_policy="transformer",
    class_name="Flux2Transformer2DModel",
)

VAE = Spec(
    "VAE", VAEConfig, AutoencoderKL, vae.locate,
    formats={
        "mlx": mlx_format(),  # first: our names are diffusers' (but convs already OHWI)
        "diffusers": Format(lambda k, c: vae.is_diffusers(k), vae.DIFFUSERS_RULES),
        "bfl": Format(always, lambda cfg: vae.bfl_rules(len(cfg.block_out_channels),
                                                        flux2=cfg.patch_size is not None)),
    },
    select=vae.strip_vae_prefix, complete=vae.complete_config, config_replaces=True,
    drop=vae.DROP_KEYS,
    class_name="AutoencoderKL",
)

CLIP_TEXT = Spec(
    "CLIP text encoder", CLIPTextConfig, CLIPTextModel,
    file_or_folder("CLIP text encoder", folder_only=True),
    formats={"mlx": mlx_format(), "transformers": Format(always, text.CLIP_TEXT_RULES)},
    prefixes=text.CLIP_STRIP_PREFIXES, drop=text.CLIP_TEXT_DROP, class_name="CLIPTextModel",
)

T5 = Spec(
    "T5 encoder", T5Config, T5Encoder, file_or_folder("T5 encoder", folder_only=True),
    formats={"mlx": mlx_format(), "transformers": Format(always, text.T5_RULES)},
    duplicates=text.T5_DUPLICATES, quantize_policy="text_encoder_2",
    class_name="T5EncoderModel",
)

QWEN3 = Spec(
    "Qwen3 text encoder", Qwen3Config, Qwen3TextEncoder,
    file_or_folder("Qwen3 text encoder", folder_only=True),
    formats={"mlx": mlx_format(), "transformers": Format(always, qwen3.RULES)},
    prefixes=qwen3.PREFIXES, unused=qwen3.unused, quantize_policy="qwen3",
    class_name="Qwen3ForCausalLM",
)


def _diffusers_controlnet(names, _config) -> bool:
    return "x_embedder.weight" in names and any(n.startswith("controlnet_") for n in names)


CONTROLNET = Spec(
    "FLUX ControlNet", ControlNetConfig, FluxControlNet, controlnet.locate,
    quantize_policy="controlnet", class_name="FluxControlNetModel",
    prefixes=flux.BFL_PREFIXES,
    formats={
        "diffusers": Format(_diffusers_controlnet, controlnet.CONTROLNET_DIFFUSERS_RULES,
                            sign="x_embedder + controlnet_*"),
        "xlabs": Format(any_key("pos_embed_input.weight"), controlnet.XLABS_RULES,
                        infer=lambda t, o: controlnet.infer_xlabs_config(t, _axes(o)),
                        sign="x-flux pos_embed_input"),
        "mlx": mlx_format("controlnet_x_embedder.weight", "controlnet_x_embedder.scales"),
    },
)


def _vision(label: str, config_class, model_class, rules) -> Spec:
    """CLIP and SigLIP towers: transformers names, `vision_model.` stripped, the text
    half and pooling head of a full model dropped (vision.py's tables)."""
    return Spec(
        label, config_class, model_class, file_or_folder(label),
        formats={"transformers": Format(always, rules)},
        prefixes=("vision_model.",), drop=vision.VISION_DROP_KEYS,
        drop_prefixes=vision.VISION_DROP_PREFIXES, config_replaces=True,
    )


IP_ADAPTER = Spec(
    "IP-Adapter", IPAdapterConfig, IPAdapter, file_or_folder("IP-Adapter"),
    formats={"xlabs": Format(always, vision.IP_ADAPTER_RULES,
                             infer=lambda t, _o: vision.ip_adapter_config(t))},
)

REDUX = Spec(
    "Redux embedder", ReduxConfig, ReduxImageEncoder, file_or_folder("Redux embedder"),
    formats={
        "diffusers": Format(has_config, vision.REDUX_RULES, sign="a folder with config.json"),
        "bfl": Format(any_key("redux_up.weight"), vision.REDUX_RULES,
                      infer=lambda t, _o: vision.redux_config(t), sign="redux_up.*"),
    },
)


def _sam3_mlx(kind: str) -> Format:
    """An mlx-edit SAM 3 folder (weights/sam3.py: our names under the kind's prefix)."""
    return Format(lambda _names, config: is_mlx_layout(config), sam3.mlx_rules(kind),
                  sign="an mlx-edit config.json")


def _sam3(kind: str, label: str, config_class, model_class, select, hf: tuple,
          meta: tuple) -> Spec:
    """A SAM 3 sub-model: its tensors selected from a whole Sam3Model file, in
    transformers' or Meta's names (weights/sam3.py); Meta files carry no config.json (the
    released config, updated by the `config` argument)."""
    return Spec(
        label, config_class, model_class, file_or_folder(label), select=select,
        prefixes=sam3.WRAPPER_PREFIXES, class_name="Sam3Model",
        formats={
            "mlx": _sam3_mlx(kind),
            "transformers": Format(sam3.has_prefix(hf[0]), hf[1], sign=hf[0] + "*"),
            "meta": Format(sam3.has_prefix(meta[0]), meta[1], sign=meta[0] + "*",
                           infer=lambda _t, o: config_class.from_dict(o)),
        },
    )


SAM3_VISION = _sam3("sam3_vision", "SAM 3 vision backbone", Sam3VisionConfig, Sam3VisionModel,
                    sam3.selector(sam3.VISION_SELECT),
                    (sam3.HF_VISION, sam3.VISION_HF_RULES),
                    (sam3.META_TRUNK, sam3.VISION_META_RULES))
SAM3_TEXT = _sam3("sam3_text", "SAM 3 text encoder", Sam3TextConfig, Sam3TextEncoder,
                  sam3.selector(sam3.TEXT_SELECT),
                  (sam3.HF_TEXT, sam3.TEXT_HF_RULES), (sam3.META_TEXT, sam3.TEXT_META_RULES))

# The heads' select renames Meta's names to transformers' (weights/sam3.py), so the two
# formats share one key map and differ in where the config comes from.
SAM3_HEADS = Spec(
    "SAM 3 heads", Sam3HeadsConfig, Sam3Heads, file_or_folder("SAM 3 heads"),
    select=sam3.select_heads, prefixes=sam3.WRAPPER_PREFIXES, class_name="Sam3Model",
    formats={
        "mlx": _sam3_mlx("sam3_heads"),  # first: its config.json would match transformers'
        "transformers": Format(has_config, sam3.SAM3_HEAD_RULES, sign="detr_decoder.*"),
        "meta": Format(always, sam3.SAM3_HEAD_RULES, sign="transformer.decoder.*",
                       infer=lambda _t, o: Sam3HeadsConfig.from_dict(o)),
    },
)

SPECS: dict[str, Spec] = {
    "transformer": TRANSFORMER,
    "flux2_transformer": FLUX2_TRANSFORMER,
    "vae": VAE,
    "clip_text": CLIP_TEXT,
    "t5": T5,
    "qwen3": QWEN3,
    "controlnet": CONTROLNET,
    "clip_vision": _vision("CLIP vision tower", CLIPVisionConfig, CLIPVisionModel,
                           vision.CLIP_VISION_RULES),
    "siglip_vision": _vision("SigLIP vision tower", SiglipVisionConfig, SiglipVisionModel,
                             vision.SIGLIP_RULES),
    "ip_adapter": IP_ADAPTER,
    "redux": REDUX,
    "sam3_vision": SAM3_VISION,
    "sam3_text": SAM3_TEXT,
    "sam3_heads": SAM3_HEADS,
}

# The pipeline components `mlx-edit convert` writes -> their kinds (FLUX.1's), and per
# model family (mlx_edit.variants.family_of); the text encoders' order is the family's.
COMPONENT_KINDS = {"transformer": "transformer", "vae": "vae", "text_encoder": "clip_text",
                   "text_encoder_2": "t5"}
FAMILY_COMPONENT_KINDS = {
    "flux1": COMPONENT_KINDS,
    "flux2": {"transformer": "flux2_transformer", "vae": "vae", "text_encoder": "qwen3"},
}
