"""Build a FLUX.1-Fill-dev checkpoint folder with random weights, without torch.

    python scripts/make_mlx_checkpoint.py OUT --preset tiny|small|wide [--seed 0] [--overwrite]
        [--extras controlnet,control-model,kontext-model,dev-model,ip-adapter,redux,segmenter,
                  text-segmenter]
    python scripts/make_mlx_checkpoint.py OUT --sam tiny|tiny-b|hiera-tiny|...   # SAM 2.1 only
    python scripts/make_mlx_checkpoint.py OUT --family klein [--preset tiny|wide] [--kv]  # FLUX.2

The torch-free twin of scripts/make_tiny_checkpoint.py, for the tests that do not compare
with diffusers/transformers (they must pass in an environment without torch, diffusers and
transformers). Same presets and configs, same layout (diffusers folders for the transformer
and VAE, transformers folders for the text encoders, sharded with an index where the
reference folders are, `flux1-fill-dev.safetensors` and `ae.safetensors` with BFL keys,
tokenizers from scripts/tokenizer_files.py, scheduler config, model_index.json; the same
extras as controlnet_fixtures.py and image_prompt_fixtures.py), but every model is mlx-edit's
own (FluxTransformer, AutoencoderKL, CLIPTextModel, T5Encoder, FluxControlNet, the vision
towers, IP-Adapter, Redux, SAM 2.1) built from the config with MLX's random initialisation under
`mx.random.seed`; tensors that initialise to a constant (norm weights, some biases) get
seeded noise as in the torch builder. The files are written in the checkpoint key layouts
by running mlx-edit's own key maps (mlx_edit/weights: diffusers, transformers and BFL
rules) backwards (`to_checkpoint`).

diffusers and transformers load these folders strictly (tests/test_fixtures_mlx.py), so a
parity test may use them too (test_control_e2e, test_restyle do); the component parity
tests keep the folders diffusers builds (other weights: another RNG).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import mlx_edit  # noqa: F401  (first: loads OpenBLAS before mlx)

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import controlnet_fixtures as cf  # noqa: E402  (ControlNet configs; imports no torch)
import image_prompt_fixtures as ipf  # noqa: E402  (vision configs; imports no torch)
import make_tiny_checkpoint as mtc  # noqa: E402  (presets and configs; imports no torch)
import sam3_fixtures as sf3  # noqa: E402  (SAM 3 configs and side files; imports no torch)
import sam_fixtures as sf  # noqa: E402  (SAM 2.1 configs; imports no torch)

from mlx_edit.models.clip import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
)
from mlx_edit.models.controlnet import ControlNetConfig, FluxControlNet  # noqa: E402
from mlx_edit.models.flux import FluxConfig, FluxTransformer  # noqa: E402
from mlx_edit.models.ip_adapter import IPAdapter, IPAdapterConfig  # noqa: E402
from mlx_edit.models.redux import (  # noqa: E402
    ReduxConfig,
    ReduxImageEncoder,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from mlx_edit.models.sam import SamConfig, SamModel  # noqa: E402
from mlx_edit.models.sam3_heads import Sam3Heads, Sam3HeadsConfig  # noqa: E402
from mlx_edit.models.sam3_text import Sam3TextConfig, Sam3TextEncoder  # noqa: E402
from mlx_edit.models.sam3_vision import Sam3VisionConfig, Sam3VisionModel  # noqa: E402
from mlx_edit.models.t5 import T5Config, T5Encoder  # noqa: E402
from mlx_edit.models.vae import AutoencoderKL, VAEConfig  # noqa: E402
from mlx_edit.weights import controlnet as controlnet_keys  # noqa: E402
from mlx_edit.weights import flux as flux_keys  # noqa: E402
from mlx_edit.weights import sam as sam_keys  # noqa: E402
from mlx_edit.weights import sam3 as sam3_keys  # noqa: E402
from mlx_edit.weights import text as text_keys  # noqa: E402
from mlx_edit.weights import vae as vae_keys  # noqa: E402
from mlx_edit.weights import vision as vision_keys  # noqa: E402
from mlx_edit.weights.core import Rule, _compile  # noqa: E402

# (config class, model class, key rules, weight file stem, config.json extras) per component
COMPONENTS = {
    "transformer": (FluxConfig, FluxTransformer, flux_keys.DIFFUSERS_RULES,
                    "diffusion_pytorch_model", {"_class_name": "FluxTransformer2DModel"}),
    "vae": (VAEConfig, AutoencoderKL, vae_keys.DIFFUSERS_RULES, "diffusion_pytorch_model",
            {"_class_name": "AutoencoderKL"}),
    "text_encoder": (CLIPTextConfig, CLIPTextModel, text_keys.CLIP_TEXT_RULES, "model",
                     {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"}),
    "text_encoder_2": (T5Config, T5Encoder, text_keys.T5_RULES, "model",
                       {"architectures": ["T5EncoderModel"], "model_type": "t5"}),
}
EXTRAS = ("controlnet", "control-model", "kontext-model", "dev-model", "ip-adapter", "redux",
          "segmenter", "text-segmenter")
SHARDED = ("transformer", "text_encoder_2")  # >= 2 shards + index, as the reference folders


def _invert(op: str, value: np.ndarray, n: int, unit: int) -> list[np.ndarray]:
    """The source tensors that `mlx_edit.weights.core.apply_op(op, ...)` turns into `value`.
    A concat's first n-1 parts are `unit` rows each (q, k, v; a single block's linear1
    appends the MLP rows last)."""
    if op == "copy":
        return [value]
    if op == "concat":
        return np.split(value, [unit * k for k in range(1, n)], axis=0)
    if op == "swap":
        a, b = np.split(value, 2, axis=0)
        return [np.concatenate([b, a], axis=0)]
    if op == "conv":
        return [value.transpose(0, 3, 1, 2)]
    if op == "conv1x1":
        return [value.reshape(*value.shape, 1, 1)]
    raise ValueError(f"no inverse for key-map op {op!r}")


def to_checkpoint(params: dict[str, np.ndarray], rules: tuple[Rule, ...], unit: int = 0
                  ) -> dict[str, np.ndarray]:
    """Our parameters -> checkpoint tensors: each parameter is matched against the rules'
    targets in table order (first match wins, as the loader claims keys) and turned into
    the rule's sources. Raises KeyError naming parameters no rule produces."""
    out, left = {}, dict(params)
    for rule in rules:
        regex = _compile(rule.target)
        for key in sorted(left):
            m = regex.match(key)
            if m is None:
                continue
            sources = [s.format(**m.groupdict()) for s in rule.sources]
            parts = _invert(rule.op, left.pop(key), len(sources), unit)
            # contiguous copies: safetensors.numpy writes an array's buffer as it lies
            out.update((s, np.ascontiguousarray(p)) for s, p in zip(sources, parts))
    if left:
        raise KeyError(f"no key rule produces {sorted(left)[:5]}")
    return out


def perturb_constants(params: dict[str, np.ndarray], seed: int) -> list[str]:
    """Seeded noise on every constant tensor, as make_tiny_checkpoint.perturb_constant_tensors:
    zeros get N(0, 0.02^2), a constant c gets c (1 + 0.1 N(0, 1)). Returns the names."""
    rng, names = np.random.default_rng(seed), []
    for name, value in sorted(params.items()):
        flat = value.reshape(-1)
        if flat.size and np.all(flat == flat[0]):
            c = float(flat[0])
            noise = rng.standard_normal(value.shape).astype(value.dtype)
            params[name] = value + noise * (0.02 if c == 0.0 else 0.1 * abs(c))
            names.append(name)
    return names


def random_params(model_cls, config, seed: int) -> dict[str, np.ndarray]:
    """float32 numpy parameters, by our names, of `model_cls(config)`: MLX's own
    initialisation under `mx.random.seed(seed)`, then `perturb_constants(seed + 1000)`."""
    mx.random.seed(seed)
    model = model_cls(config)
    params = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    perturb_constants(params, seed + 1000)
    return params


def make_params(name: str, cfg: dict, seed: int) -> tuple[dict[str, np.ndarray], object]:
    """(parameters, model config) of one pipeline component (`random_params`)."""
    config_cls, model_cls = COMPONENTS[name][:2]
    config = config_cls.from_dict(cfg)
    return random_params(model_cls, config, seed), config


def _concat_unit(name: str, config) -> int:
    if name == "transformer":
        return config.num_attention_heads * config.attention_head_dim
    if name == "text_encoder":
        return config.hidden_size
    if name == "text_encoder_2":
        return config.num_heads * config.d_kv
    return 0


def write_weights(folder: Path, stem: str, tensors: dict[str, np.ndarray], shard: bool) -> None:
    """`{stem}.safetensors`, or two shards `{stem}-0000i-of-00002.safetensors` plus the
    Hugging Face index `{stem}.safetensors.index.json` (tensors split by name order)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not shard:
        save_file(tensors, str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
        return
    keys = sorted(tensors)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves, 1):
        fname = f"{stem}-{i:05d}-of-{len(halves):05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(v.nbytes for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_component(out: Path, name: str, cfg: dict, seed: int, shard: bool | None = None
                    ) -> dict[str, np.ndarray]:
    """Build one component and write `out/name/` (config.json + weights, sharded as the
    reference folders unless `shard` says otherwise); returns our params."""
    _, _, rules, stem, extra = COMPONENTS[name]
    params, config = make_params(name, cfg, seed)
    tensors = to_checkpoint(params, rules, _concat_unit(name, config))
    write_weights(out / name, stem, tensors, name in SHARDED if shard is None else shard)
    (out / name / "config.json").write_text(json.dumps({**extra, **cfg}, indent=2) + "\n")
    return params


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _save(tensors: dict[str, np.ndarray], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})


def write_controlnet(folder: str | Path, cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """A diffusers FluxControlNetModel folder (`cfg`: its kwargs, e.g. from
    controlnet_fixtures.controlnet_config) built from our FluxControlNet; returns our params."""
    folder = Path(folder)
    config = ControlNetConfig.from_dict(cfg)
    params = random_params(FluxControlNet, config, seed)
    unit = config.num_attention_heads * config.attention_head_dim
    folder.mkdir(parents=True, exist_ok=True)
    _save(to_checkpoint(params, controlnet_keys.CONTROLNET_DIFFUSERS_RULES, unit),
          folder / "diffusion_pytorch_model.safetensors")
    _write_json(folder / "config.json", {"_class_name": "FluxControlNetModel", **cfg})
    return params


def write_controlnets(out: str | Path, transformer_cfg: dict, preset: str = "tiny",
                      seed: int = 0) -> dict[str, Path]:
    """controlnet_fixtures.write_controlnets' layout (instantx/, union/, xlabs/ and the x-flux
    file `xlabs-flux-controlnet.safetensors`), torch-free; returns {name: path}."""
    out, paths = Path(out), {}
    for offset, kind in enumerate(cf.KINDS):
        layers, single = cf.DEPTHS[preset][kind]
        cfg = cf.controlnet_config(kind, transformer_cfg, layers, single)
        params = write_controlnet(out / kind, cfg, seed + offset)
        paths[kind] = out / kind
        if kind == "xlabs":
            paths["xlabs-raw"] = out / "xlabs-flux-controlnet.safetensors"
            _save(to_checkpoint(params, controlnet_keys.XLABS_RULES), paths["xlabs-raw"])
    return paths


def write_variant_model(root: str | Path, transformer_cfg: dict, kind: str, seed: int = 0
                        ) -> Path:
    """controlnet_fixtures.write_variant_model's ROOT/<kind>/ (`cf.VARIANT_MODELS`: the
    FLUX.1-Canny-dev or FLUX.1-Kontext-dev layout: another in_channels, diffusers folder +
    BFL file, links to ROOT's shared parts)."""
    in_channels, pipeline_class, bfl_name = cf.VARIANT_MODELS[kind]
    root = Path(root)
    out = root / kind
    cfg = dict(transformer_cfg, in_channels=in_channels, out_channels=64)
    config = FluxConfig.from_dict(cfg)
    params = random_params(FluxTransformer, config, seed)
    unit = config.num_attention_heads * config.attention_head_dim
    write_weights(out / "transformer", "diffusion_pytorch_model",
                  to_checkpoint(params, flux_keys.DIFFUSERS_RULES, unit), shard=False)
    _write_json(out / "transformer" / "config.json",
                {"_class_name": "FluxTransformer2DModel", **cfg})
    _save(to_checkpoint(params, flux_keys.BFL_RULES), out / bfl_name)
    for name in cf.CONTROL_MODEL_SHARED:
        (out / name).symlink_to(Path("..") / name, target_is_directory=True)
    index = json.loads((root / "model_index.json").read_text())
    _write_json(out / "model_index.json", {**index, "_class_name": pipeline_class})
    return out


def _write_vision(folder: Path, config_cls, model_cls, rules, cfg: dict, model_type: str,
                  seed: int) -> None:
    """A transformers vision tower folder (config.json + model.safetensors)."""
    config = config_cls.from_dict(cfg)
    params = random_params(model_cls, config, seed)
    folder.mkdir(parents=True, exist_ok=True)
    _save(to_checkpoint(params, rules, config.hidden_size), folder / "model.safetensors")
    _write_json(folder / "config.json", {"model_type": model_type, **cfg})


def write_ip_adapter(out: str | Path, transformer_cfg: dict, preset: str = "tiny",
                     seed: int = 0) -> Path:
    """image_prompt_fixtures.write_ip_adapter's folder (XLabs `ip_adapter.safetensors` +
    CLIP `image_encoder/`), torch-free; returns `out`."""
    out = Path(out)
    _write_vision(out / "image_encoder", CLIPVisionConfig, CLIPVisionModel,
                  vision_keys.CLIP_VISION_RULES, ipf.clip_vision_config(preset),
                  "clip_vision_model", seed)
    config = IPAdapterConfig(
        image_embed_dim=ipf.CLIP_PROJECTION[preset],
        cross_attention_dim=transformer_cfg["joint_attention_dim"], num_tokens=ipf.IP_TOKENS,
        hidden_size=transformer_cfg["num_attention_heads"] * transformer_cfg["attention_head_dim"],
        num_layers=transformer_cfg["num_layers"])
    params = random_params(IPAdapter, config, seed + 1)
    _save(to_checkpoint(params, vision_keys.IP_ADAPTER_RULES), out / "ip_adapter.safetensors")
    return out


def write_redux(out: str | Path, transformer_cfg: dict, preset: str = "tiny",
                seed: int = 0) -> Path:
    """image_prompt_fixtures.write_redux's FLUX.1-Redux-dev folder, torch-free; returns `out`."""
    out = Path(out)
    cfg = ipf.siglip_vision_config(preset)
    _write_vision(out / "image_encoder", SiglipVisionConfig, SiglipVisionModel,
                  vision_keys.SIGLIP_RULES, cfg, "siglip_vision_model", seed)
    redux = {"redux_dim": cfg["hidden_size"], "txt_in_features": transformer_cfg["joint_attention_dim"]}
    embedder = to_checkpoint(random_params(ReduxImageEncoder, ReduxConfig(**redux), seed + 1),
                             vision_keys.REDUX_RULES)
    write_weights(out / "image_embedder", "diffusion_pytorch_model", embedder, shard=False)
    _write_json(out / "image_embedder" / "config.json", {"_class_name": "ReduxImageEncoder", **redux})
    _save(embedder, out / "flux1-redux-dev.safetensors")
    size = {"height": cfg["image_size"], "width": cfg["image_size"]}
    _write_json(out / "feature_extractor" / "preprocessor_config.json",
                {"image_processor_type": "SiglipImageProcessor", "size": size})
    _write_json(out / "model_index.json", ipf.REDUX_MODEL_INDEX)
    return out


def write_image_prompt_fixtures(out: str | Path, transformer_cfg: dict, preset: str = "tiny",
                                seed: int = 0, kinds: tuple[str, ...] = ("ip-adapter", "redux"),
                                ) -> dict[str, Path]:
    """image_prompt_fixtures.write_image_prompt_fixtures, torch-free: `out/ip-adapter/` and/or
    `out/redux/`; returns {kind: folder}. Raises KeyError for an unknown kind."""
    writers = {"ip-adapter": write_ip_adapter, "redux": write_redux}
    return {kind: writers[kind](Path(out) / kind, transformer_cfg, preset, seed + 10 * offset)
            for offset, kind in enumerate(kinds)}


def sam_checkpoint_config(given: dict) -> dict:
    """transformers' `Sam2Config` dict (config.json) of the preset kwargs `given`: fields not
    given are transformers' defaults, which are SamConfig's (tests/test_sam.py checks the
    released sizes); the nested configs carry their model_type."""
    vision = {"model_type": "sam2_vision_model", **(given.get("vision_config") or {})}
    if "backbone_config" in vision:
        vision["backbone_config"] = {"model_type": "sam2_hiera_det_model",
                                     **vision["backbone_config"]}
    return {"architectures": ["Sam2Model"], "model_type": "sam2", **given,
            "vision_config": vision}


def write_segmenter(out: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """sam_fixtures.build_sam's folder (transformers `Sam2Model` layout: config.json,
    model.safetensors, preprocessor_config.json) for `preset`, torch-free: our SamModel
    with MLX's init (`random_params`), the Fourier-feature matrices N(0, 1) as
    transformers initialises them (so positions are told apart). Returns `out`."""
    out = Path(out)
    given = sf.sam_config(preset)
    config = SamConfig.from_dict(given)
    params = random_params(SamModel, config, seed)
    rng = np.random.default_rng(seed + 2000)
    for name in [k for k in params if k.endswith("positional_embedding")]:
        params[name] = rng.standard_normal(params[name].shape).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    _save(to_checkpoint(params, sam_keys.SAM_RULES), out / "model.safetensors")
    _write_json(out / "config.json", sam_checkpoint_config(given))
    _write_json(out / "preprocessor_config.json", sf.processor_config(config.image_size))
    return out


# SAM 3's sub-models: (config class, model class, transformers key rules, the width of
# each of a fused q/k/v's parts)
SAM3_PARTS = (
    (Sam3VisionConfig, Sam3VisionModel, sam3_keys.VISION_HF_RULES,
     lambda c: c.backbone_config.hidden_size),
    (Sam3TextConfig, Sam3TextEncoder, sam3_keys.TEXT_HF_RULES, lambda c: c.hidden_size),
    (Sam3HeadsConfig, Sam3Heads, sam3_keys.SAM3_HEAD_RULES, lambda c: 0),
)


def write_text_segmenter(out: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """sam3_fixtures.build_sam3's folder (transformers `Sam3Model` layout: config.json,
    model.safetensors, the CLIP tokenizer, preprocessor_config.json) for `preset`,
    torch-free: our three SAM 3 models with MLX's init (`random_params`), written through
    weights/sam3.py's transformers rules run backwards. Returns `out`."""
    out = Path(out)
    given = sf3.sam3_config(preset)
    tensors = {}
    for offset, (config_cls, model_cls, rules, unit) in enumerate(SAM3_PARTS):
        config = config_cls.from_dict(given)
        params = random_params(model_cls, config, seed + offset)
        tensors.update(to_checkpoint(params, rules, unit(config)))
    text = Sam3TextConfig.from_dict(given)  # CLIP's pooled projection: unused, not loaded,
    shape = (given["text_config"]["projection_dim"], text.hidden_size)  # but transformers'
    tensors[sam3_keys.NOT_WEIGHTS[0]] = np.random.default_rng(seed).standard_normal(
        shape).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    _save(tensors, out / "model.safetensors")
    _write_json(out / "config.json", {"architectures": ["Sam3Model"], "model_type": "sam3",
                                      **given})
    image_size = Sam3VisionConfig.from_dict(given).backbone_config.image_size
    sf3.write_side_files(out, image_size)
    return out


def build(out: str | Path, preset: str = "tiny", seed: int = 0, overwrite: bool = False,
          extras: tuple[str, ...] = ()) -> Path:
    """Build the folder `out` (module doc) and return its Path; float32 only. Built next to
    `out` and renamed into place. extras: "controlnet" (controlnets/, `write_controlnets`),
    "control-model" / "kontext-model" / "dev-model" (`write_variant_model`), "ip-adapter",
    "redux" (`write_image_prompt_fixtures`), "segmenter" (`segmenter/`: `write_segmenter`, SAM
    preset `tiny`), "text-segmenter" (`text-segmenter/`: `write_text_segmenter`, SAM 3
    preset `tiny`), seeds as make_tiny_checkpoint.
    Raises KeyError for an unknown preset or extra, FileExistsError as
    make_tiny_checkpoint.build does."""
    unknown = sorted(set(extras) - set(EXTRAS))
    if unknown:
        raise KeyError(f"unknown extras {unknown}; choose from {EXTRAS}")
    out = Path(out)
    if preset not in mtc.PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose from {sorted(mtc.PRESETS)}")
    mtc._prepare_out(out, overwrite)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        cfgs = mtc.configs(preset, mtc.write_tokenizers(tmp))
        _write_json(tmp / "scheduler" / "scheduler_config.json",
                    {"_class_name": "FlowMatchEulerDiscreteScheduler", **mtc.SCHEDULER_CONFIG})
        for offset, name in enumerate(COMPONENTS):
            params = write_component(tmp, name, cfgs[name], seed + offset)
            if name == "transformer":
                _save(to_checkpoint(params, flux_keys.BFL_RULES), tmp / "flux1-fill-dev.safetensors")
            elif name == "vae":
                rules = vae_keys.bfl_rules(len(cfgs["vae"]["block_out_channels"]))
                _save(to_checkpoint(params, rules), tmp / "ae.safetensors")
            del params
        if "controlnet" in extras:
            write_controlnets(tmp / "controlnets", cfgs["transformer"], preset, seed + 10)
        kinds = tuple(k for k in ("ip-adapter", "redux") if k in extras)
        if kinds:
            write_image_prompt_fixtures(tmp, cfgs["transformer"], preset, seed + 20, kinds)
        if "segmenter" in extras:
            write_segmenter(tmp / "segmenter", "tiny", seed + 50)
        if "text-segmenter" in extras:
            write_text_segmenter(tmp / "text-segmenter", "tiny", seed + 70)
        _write_json(tmp / "model_index.json", mtc.MODEL_INDEX)
        for offset, kind in ((30, "control-model"), (40, "kontext-model"), (60, "dev-model")):
            if kind in extras:  # after model_index.json: it copies its entries
                write_variant_model(tmp, cfgs["transformer"], kind, seed + offset)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", choices=sorted(mtc.PRESETS), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--extras", default="", help=f"comma-separated: {', '.join(EXTRAS)}")
    ap.add_argument("--family", choices=("flux1", "klein"), default="flux1",
                    help="klein: a FLUX.2 [klein] folder (scripts/klein_fixtures.py; presets "
                         "tiny, wide; no extras)")
    ap.add_argument("--kv", action="store_true",
                    help="with --family klein: a klein KV folder (Flux2KleinKVPipeline)")
    ap.add_argument("--sam", metavar="PRESET", help="write only a SAM 2.1 folder "
                    "(sam_fixtures presets: tiny, tiny-b, hiera-tiny|small|base-plus|large)")
    args = ap.parse_args(argv)
    if args.sam:
        print(write_segmenter(args.out, args.sam, args.seed))
        return 0
    if args.kv and args.family != "klein":
        ap.error("--kv needs --family klein")
    if args.family == "klein":
        import klein_fixtures

        if args.extras or args.preset not in klein_fixtures.PRESETS:
            ap.error("--family klein takes --preset tiny or wide and no --extras")
        try:
            print(klein_fixtures.describe(klein_fixtures.build_mlx(
                args.out, args.preset, seed=args.seed, overwrite=args.overwrite, kv=args.kv)))
        except FileExistsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        build(args.out, args.preset, seed=args.seed, overwrite=args.overwrite,
              extras=tuple(e for e in args.extras.split(",") if e))
    except (FileExistsError, FileNotFoundError) as e:  # an existing OUT; no CLIP merges
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: preset {args.preset}, float32, seed {args.seed}, "
          f"{mtc.folder_size(args.out) / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
