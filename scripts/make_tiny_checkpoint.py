"""Build a FLUX.1-Fill-dev checkpoint folder with random weights, offline.

    python scripts/make_tiny_checkpoint.py OUT --preset tiny|small|wide [--seed 0]
        [--dtype float32|bfloat16] [--overwrite]
    python scripts/make_tiny_checkpoint.py OUT --family klein [--preset tiny|wide] [--kv]
        (a FLUX.2 [klein] folder, --kv: klein KV's: scripts/klein_fixtures.py)

OUT gets the real diffusers layout of black-forest-labs/FLUX.1-Fill-dev, every model built
by diffusers / transformers themselves from a config under `torch.manual_seed`:

    model_index.json                     FluxFillPipeline
    scheduler/scheduler_config.json      FlowMatchEulerDiscreteScheduler, FLUX.1-dev's config
    transformer/                         FluxTransformer2DModel, sharded (+ .index.json)
    vae/                                 AutoencoderKL (16 latent channels, scale factor 8)
    text_encoder/                        CLIPTextModel
    text_encoder_2/                      T5EncoderModel, sharded (+ model.safetensors.index.json)
    tokenizer/  tokenizer_2/             written by scripts/tokenizer_files.py
    ranker/                              CLIPModel + tokenizer for `--rank clip` (not in
                                         `wide`; scripts/ranker_fixtures.py)
    text-segmenter/                      with --extras text-segmenter: SAM 3 (Sam3Model,
                                         preset tiny of scripts/sam3_fixtures.py)
    flux1-fill-dev.safetensors           the transformer with BFL keys (scripts/bfl_keys.py)
    ae.safetensors                       the VAE with BFL keys

Presets: `tiny` (hidden 32, a few MB, mostly CLIP's 49408-row embedding), `small` (every
Linear input width a multiple of 64, for group-64 quantization), `wide` (real FLUX widths,
one double and one single block, full VAE, full CLIP-L, full-width two-layer T5; ~5 GB in
float32, built and saved one component at a time). Tensors that diffusers/transformers
initialise to a constant (norm weights 1, biases 0) get small seeded noise so that a parity
test fails when such a layer is wired wrong.

The folder is built next to OUT and renamed into place at the end, so an interrupted build
never leaves a folder that looks complete. Reference: FLUX.1-Fill-dev's hub layout and
/work/shared/reference/flux-architecture.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tokenizer_files  # noqa: E402

# torch, diffusers and transformers are imported where used: the presets, configs and
# scheduler config are shared with the torch-free builder (scripts/make_mlx_checkpoint.py).
DTYPES = {"float32": "float32", "bfloat16": "bfloat16"}  # torch dtype names

# FLUX.1-dev's scheduler/scheduler_config.json (FLUX.1-Fill-dev ships the same).
SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

# model_index.json entries as FLUX.1-Fill-dev lists them (T5TokenizerFast is an alias of
# T5Tokenizer in transformers 5, and the real class with transformers 4).
MODEL_INDEX = {
    "_class_name": "FluxFillPipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


@dataclass(frozen=True)
class Preset:
    """Widths and depths per component; the shared parts are filled in by `configs`."""

    transformer: dict
    vae: dict
    clip: dict
    t5: dict
    t5_min_vocab: int = 0  # T5 vocab = max(tokenizer ids, this)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        transformer=dict(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            axes_dims_rope=[4, 4, 8],
        ),
        vae=dict(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4),
        clip=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
        t5=dict(
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
        ),
    ),
    "small": Preset(
        transformer=dict(
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=64,
            num_attention_heads=2,
            axes_dims_rope=[16, 24, 24],
        ),
        vae=dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=8),
        clip=dict(
            hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2
        ),
        t5=dict(
            d_model=128,
            d_kv=32,
            d_ff=256,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
        ),
    ),
    "wide": Preset(
        transformer=dict(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=128,
            num_attention_heads=24,
            axes_dims_rope=[16, 56, 56],
        ),
        vae=dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32),
        clip=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
        ),
        t5=dict(
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=2,
            num_heads=64,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
        ),
        t5_min_vocab=32128,
    ),
}


def configs(preset: str, t5_vocab: int) -> dict[str, dict]:
    """Full constructor kwargs per component for `preset` (raises KeyError if unknown).

    Returns {"transformer": FluxTransformer2DModel kwargs, "vae": AutoencoderKL kwargs,
    "text_encoder": CLIPTextConfig kwargs, "text_encoder_2": T5Config kwargs}.
    """
    p = PRESETS[preset]
    transformer = dict(
        patch_size=1,
        in_channels=384,
        out_channels=64,
        guidance_embeds=True,
        joint_attention_dim=p.t5["d_model"],
        pooled_projection_dim=p.clip["hidden_size"],
        **p.transformer,
    )
    vae = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        act_fn="silu",
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
        mid_block_add_attention=True,
        **p.vae,
    )
    clip = dict(
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=p.clip["hidden_size"],
        **p.clip,
    )
    t5 = dict(
        vocab_size=max(t5_vocab, p.t5_min_vocab),
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.1,
        is_encoder_decoder=True,
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        num_decoder_layers=p.t5["num_layers"],
        **p.t5,
    )
    return {"transformer": transformer, "vae": vae, "text_encoder": clip, "text_encoder_2": t5}


def perturb_constant_tensors(module: torch.nn.Module, seed: int) -> list[str]:
    """Add seeded noise to every parameter whose elements are all equal; returns their names.

    Zeros get N(0, 0.02^2); a constant c != 0 (norm weights: 1) gets c * (1 + 0.1 N(0, 1)).
    Small enough that activations keep their scale, large enough that a swapped or dropped
    bias/norm weight shows up far above a 1e-4 parity tolerance.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    names = []
    with torch.no_grad():
        for name, p in module.named_parameters():
            flat = p.detach().reshape(-1)
            if flat.numel() == 0 or not bool((flat == flat[0]).all()):
                continue
            c = float(flat[0])
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            p.add_(noise * (0.02 if c == 0.0 else 0.1 * abs(c)))
            names.append(name)
    return names


def _nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def make_component(name: str, cfg: dict, seed: int) -> torch.nn.Module:
    """Construct one component with random weights: `torch.manual_seed(seed)`, then the
    diffusers/transformers constructor, then `perturb_constant_tensors`. float32, eval mode."""
    import diffusers
    import torch
    import transformers

    torch.manual_seed(seed)
    if name == "transformer":
        model = diffusers.FluxTransformer2DModel(**cfg)
    elif name == "vae":
        model = diffusers.AutoencoderKL(**cfg)
    elif name == "text_encoder":
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg))
    elif name == "text_encoder_2":
        model = transformers.T5EncoderModel(transformers.T5Config(**cfg))
    else:
        raise KeyError(f"unknown component {name!r}")
    perturb_constant_tensors(model, seed + 1000)
    return model.eval()


# Cached file bytes of the tokenizer folders: training the SentencePiece model takes seconds.
_TOKENIZER_FILES: dict[str, dict[str, bytes]] = {}


def write_tokenizers(out: Path) -> int:
    """Write `tokenizer/` (CLIP) and `tokenizer_2/` (T5) under `out`; returns the T5 id count."""
    if not _TOKENIZER_FILES:
        tmp = out / ".tokenizers-tmp"
        tokenizer_files.write_clip_tokenizer(tmp / "tokenizer")
        tokenizer_files.write_t5_tokenizer(tmp / "tokenizer_2")
        for sub in ("tokenizer", "tokenizer_2"):
            files = sorted((tmp / sub).iterdir())
            _TOKENIZER_FILES[sub] = {f.name: f.read_bytes() for f in files}
        shutil.rmtree(tmp)
    for sub, files in _TOKENIZER_FILES.items():
        (out / sub).mkdir(parents=True, exist_ok=True)
        for fname, data in files.items():
            (out / sub / fname).write_bytes(data)
    return tokenizer_files.T5_SPIECE_SIZE + tokenizer_files.T5_EXTRA_IDS


def _save_component(model: torch.nn.Module, folder: Path, shard: bool) -> None:
    # Half the size (plus a byte) forces >= 2 shards and the `*.safetensors.index.json` path.
    kwargs = {"max_shard_size": _nbytes(model) // 2 + 1} if shard else {}
    if hasattr(model, "save_config"):  # diffusers ModelMixin
        model.save_pretrained(folder, safe_serialization=True, **kwargs)
    else:
        model.save_pretrained(folder, **kwargs)
    if shard and not list(folder.glob("*.safetensors.index.json")):
        raise RuntimeError(f"{folder}: expected a sharded save with an index file")


def _save_bfl(sd: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})


def _write_model_index(out: Path) -> None:
    import diffusers

    index = {"_class_name": MODEL_INDEX["_class_name"], "_diffusers_version": diffusers.__version__}
    index.update({k: v for k, v in MODEL_INDEX.items() if not k.startswith("_")})
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_scheduler(out: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(out / "scheduler")


def _quiet_libraries() -> None:
    # Progress bars and the "cast with to()" advice are noise for a fixture builder.
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out} exists and is not empty (pass --overwrite, or overwrite=True)"
            )
        if not (out / "model_index.json").is_file():
            # Guard against wiping an unrelated folder given by mistake.
            raise FileExistsError(f"{out} is not a checkpoint folder; refusing to overwrite it")


def build(
    out: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    dtype: str = "float32",
    overwrite: bool = False,
    extras: tuple[str, ...] = (),  # "controlnet": controlnets/, "control-model" /
    # "kontext-model": FLUX.1-Canny-dev / Kontext-dev layouts (scripts/controlnet_fixtures.py)
) -> Path:
    """Build the checkpoint folder `out` (layout in the module docstring); returns its Path.

    Components are built, saved and freed one at a time (peak RAM ~2x the largest one).
    Raises KeyError for an unknown preset or dtype, FileExistsError when `out` is non-empty
    and `overwrite` is False (or `out` holds no `model_index.json`).
    """
    import bfl_keys
    import torch

    out = Path(out)
    torch_dtype = getattr(torch, DTYPES[dtype])
    _quiet_libraries()
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    _prepare_out(out, overwrite)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        t5_ids = write_tokenizers(tmp)
        cfgs = configs(preset, t5_ids)
        _write_scheduler(tmp)
        for offset, name in enumerate(("transformer", "vae", "text_encoder", "text_encoder_2")):
            model = make_component(name, cfgs[name], seed + offset)
            if torch_dtype != torch.float32:
                model = model.to(torch_dtype)
            _save_component(model, tmp / name, shard=name in ("transformer", "text_encoder_2"))
            if name == "transformer":
                _save_bfl(
                    bfl_keys.transformer_to_bfl(model.state_dict()),
                    tmp / "flux1-fill-dev.safetensors",
                )
            elif name == "vae":
                _save_bfl(bfl_keys.vae_to_bfl(model.state_dict()), tmp / "ae.safetensors")
            del model
            gc.collect()
        if preset != "wide":  # ranker/: the ranking CLIP, so `--rank clip` runs offline
            import ranker_fixtures

            ranker_fixtures.write_ranker(tmp / "ranker", cfgs["text_encoder"], preset,
                                         seed + 40, tmp / "tokenizer", torch_dtype)
        # --- extras: --extras controlnet (scripts/controlnet_fixtures.py) ---
        if "controlnet" in extras:
            import controlnet_fixtures

            controlnet_fixtures.write_controlnets(tmp / "controlnets", cfgs["transformer"],
                                                  preset, seed + 10, torch_dtype)
        # --- extras: --extras ip-adapter / redux (scripts/image_prompt_fixtures.py) ---
        kinds = tuple(k for k in ("ip-adapter", "redux") if k in extras)
        if kinds:
            import image_prompt_fixtures

            image_prompt_fixtures.write_image_prompt_fixtures(
                tmp, cfgs["transformer"], preset, seed + 20, torch_dtype, kinds=kinds)
        # --- extras: --extras text-segmenter (scripts/sam3_fixtures.py, SAM 3 tiny) ---
        if "text-segmenter" in extras:
            import sam3_fixtures

            sam3_fixtures.build_sam3(tmp / "text-segmenter", "tiny", seed + 70)
        # --- end extras ---
        _write_model_index(tmp)
        for offset, kind in ((30, "control-model"), (40, "kontext-model"), (60, "dev-model")):
            if kind in extras:  # after model_index.json: it copies its entries
                import controlnet_fixtures

                controlnet_fixtures.write_variant_model(tmp, cfgs["transformer"], kind,
                                                        seed + offset, torch_dtype)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def folder_size(path: Path) -> int:
    """Total bytes of the regular files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--family", choices=("flux1", "klein"), default="flux1",
                    help="klein: a FLUX.2 [klein] folder (scripts/klein_fixtures.py; "
                         "presets tiny, wide; no extras)")
    ap.add_argument("--kv", action="store_true",
                    help="with --family klein: a klein KV folder (Flux2KleinKVPipeline)")
    ap.add_argument("--extras", action="append", default=[],
                    help="comma-separated extras to build too: controlnet (controlnets/: "
                         "InstantX, Union, XLabs, x-flux file), control-model (control-model/: "
                         "FLUX.1-Canny-dev layout), kontext-model (kontext-model/: "
                         "FLUX.1-Kontext-dev layout), dev-model (dev-model/: FLUX.1-dev), "
                         "ip-adapter, redux, text-segmenter (text-segmenter/: SAM 3, "
                         "transformers Sam3Model layout)")
    args = ap.parse_args(argv)
    args.extras = [e for group in args.extras for e in group.split(",") if e]
    known = {"controlnet", "control-model", "kontext-model", "dev-model", "ip-adapter", "redux",
             "text-segmenter"}
    unknown = sorted(set(args.extras) - known)
    if unknown:
        ap.error(f"unknown --extras {unknown}: choose from {', '.join(sorted(known))}")
    if args.family == "klein" and (args.extras or args.preset not in ("tiny", "wide")):
        ap.error("--family klein takes --preset tiny or wide and no --extras")
    if args.kv and args.family != "klein":
        ap.error("--kv needs --family klein")
    t0 = time.perf_counter()
    try:
        if args.family == "klein":
            import klein_fixtures

            klein_fixtures.build_diffusers(args.out, args.preset, seed=args.seed,
                                           dtype=args.dtype, overwrite=args.overwrite,
                                           kv=args.kv)
        else:
            build(args.out, args.preset, seed=args.seed, dtype=args.dtype,
                  overwrite=args.overwrite, extras=tuple(args.extras))
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    secs = time.perf_counter() - t0
    size = folder_size(args.out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    print(
        f"{args.out}: preset {args.preset}, {args.dtype}, seed {args.seed}, "
        f"{size / 2**20:.1f} MiB on disk, {secs:.1f} s, peak RSS {peak:.2f} GiB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
