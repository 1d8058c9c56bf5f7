"""Step caches: transformer evaluations skipped, wall time and PSNR against the uncached run.

    python benchmarks/bench_cache.py --preset wide --image-tokens 256 --text-tokens 128 \
        [--double 1 --single 2] [--steps 28] [--cache fbc:0.12 --cache mag:0.06 ...]
    python benchmarks/bench_cache.py --family flux2 --preset wide --steps 4 ...

FLUX.2 [klein] (`--family flux2`, presets tiny|wide of bench_flux2.py): our
Flux2Transformer with MLX's random initialisation (no torch), or with `--ckpt` the
transformer of a klein folder (the wide klein fixture: diffusers' init), random target
tokens and Qwen3 embeddings, klein's schedule (empirical mu) and no guidance; TaylorSeer
is FLUX.1's only.

RANDOM WEIGHTS: diffusers' FluxTransformer2DModel built from the preset's config under
torch.manual_seed (as bench_transformer.py), loaded into ours; Fill inputs are random
(noise latents, conditioning, T5/CLIP embeddings), the schedule FLUX.1-Fill's for the token
count. The caches' skip patterns depend on the weights: a random model's first-block
residual changes 0.3-0.6 per step (relative), a trained FLUX's far less, so thresholds for
real FLUX come from the references (diffusers docs / ParaAttention FBC 0.08-0.12,
MagCache 0.06 with FLUX.1-dev's ratios, TaylorSeer interval 5) and are listed first;
the "fixture-scaled" thresholds after them only show the mechanics on these weights.

Per setting (`--cache` specs as the CLI's; "none" is the uncached run): full transformer
evaluations / steps, the per-step pattern (C computed, s skipped or predicted), the
denoise wall time (one run, evaluated) and its speed-up, and the PSNR of the final
latents against the uncached ones (peak-to-peak of the uncached latents; latents, not
decoded images). Last line: `cache <spec>: evals N/S speed-up X psnr Y dB` for the last
setting.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: mlx_edit -> OpenBLAS before mlx)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from bench_transformer import build_reference, make_inputs, to_ours  # noqa: E402
from mlx_edit.sampling.cache_spec import parse_cache  # noqa: E402
from mlx_edit.models.flux import FluxConfig  # noqa: E402
from mlx_edit.sampling.denoise import PromptEmbeds, denoise  # noqa: E402
from mlx_edit.sampling.sampler import (SchedulerConfig, empirical_mu,  # noqa: E402
                                        flux_sigmas)

REFERENCE_SETTINGS = ("fbc:0.08", "fbc:0.12", "taylorseer:5", "taylorseer:5,lite",
                      "mag:0.06", "mag:0.12")
FIXTURE_SETTINGS = ("fbc:0.4", "fbc:0.5")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="flux1", choices=("flux1", "flux2"))
    ap.add_argument("--preset", default="wide", choices=("tiny", "small", "wide"))
    ap.add_argument("--image-tokens", type=int, default=256)
    ap.add_argument("--text-tokens", type=int, default=128)
    ap.add_argument("--double", type=int, default=1, help="double (joint) blocks")
    ap.add_argument("--single", type=int, default=2, help="single blocks")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--guidance", type=float, default=30.0)
    ap.add_argument("--cache", action="append", default=None,
                    help="a --cache spec (repeatable); default: the reference and "
                         "fixture-scaled settings")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt", type=Path, default=None,
                    help="--family flux2: a klein folder whose transformer to run (the wide "
                         "klein fixture) instead of random MLX weights at --preset widths")
    return ap.parse_args(argv)


def psnr(x: np.ndarray, ref: np.ndarray) -> float:
    mse = float(np.mean((x.astype(np.float64) - ref) ** 2))
    peak = float(ref.max() - ref.min())
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def run(model, inp: dict, sigmas: np.ndarray, guidance: float, cache) -> tuple[dict, np.ndarray]:
    img = mx.array(inp["img"])
    pooled = inp.get("pooled")
    embeds = PromptEmbeds(mx.array(inp["txt"]), None if pooled is None else mx.array(pooled))
    latents, conditioning = (img, None) if pooled is None else (img[..., :64], img[..., 64:])
    stats: dict = {}
    t0 = time.perf_counter()
    *_, (_, latents) = denoise(model, latents, conditioning, mx.array(inp["img_ids"]),
                               embeds, sigmas, guidance, cache=cache, stats=stats)
    stats["wall_s"] = time.perf_counter() - t0
    return stats, np.array(latents)


def flux2_setup(args) -> tuple:
    """(model, config, inputs, sigmas) for `--family flux2`: random MLX weights, or the
    transformer of the klein folder --ckpt."""
    import bench_flux2

    from mlx_edit.models.flux2 import Flux2Config, Flux2Transformer
    from mlx_edit.sampling.latents_flux2 import latent_ids
    from mlx_edit.weights.flux2 import load_flux2_transformer

    mx.random.seed(args.seed)
    if args.ckpt is not None:
        model = load_flux2_transformer(args.ckpt / "transformer", mx.float32)
    else:
        model = Flux2Transformer(Flux2Config.from_dict(
            bench_flux2.config(args.preset, args.double, args.single)))
    cfg = model.config
    mx.eval(model.parameters())
    side = int(round(args.image_tokens ** 0.5))
    rng = np.random.default_rng(args.seed)
    inp = {"img": rng.standard_normal((1, side * side, cfg.in_channels), np.float32),
           "txt": rng.standard_normal((1, args.text_tokens, cfg.joint_attention_dim),
                                      np.float32),
           "img_ids": np.array(latent_ids(side, side))}
    mu = empirical_mu(side * side, args.steps)
    return model, cfg, inp, flux_sigmas(args.steps, side * side, SchedulerConfig(), mu=mu)


def flux1_setup(args) -> tuple:
    """(model, config, inputs, sigmas) for FLUX.1 Fill: diffusers' random weights."""
    ref_model, cfg_dict = build_reference(args.preset, args.double, args.single, args.seed,
                                          "float32")
    model = to_ours(ref_model, cfg_dict, "float32", None)
    del ref_model
    cfg = FluxConfig.from_dict(cfg_dict)
    inp = make_inputs(cfg, args.image_tokens, args.text_tokens, args.seed)
    return model, cfg, inp, flux_sigmas(args.steps, args.image_tokens, SchedulerConfig())


def main(argv=None) -> int:
    args = parse_args(argv)
    print("\n".join(common.machine_header(" ".join(["python"] + sys.argv))))
    setup = flux2_setup if args.family == "flux2" else flux1_setup
    model, cfg, inp, sigmas = setup(args)
    weights = f"{args.ckpt}'s transformer" if args.ckpt else f"RANDOM WEIGHTS, preset {args.preset}"
    print(f"{weights}, {args.family}: hidden {cfg.hidden_size}, {cfg.num_layers} double + "
          f"{cfg.num_single_layers} single blocks; {args.image_tokens} image + "
          f"{args.text_tokens} text tokens; {args.steps} steps; float32")
    specs = args.cache or [s for s in (*REFERENCE_SETTINGS, *FIXTURE_SETTINGS)
                           if args.family == "flux1" or not s.startswith("taylorseer")]
    run(model, inp, sigmas[:3], args.guidance, None)  # warm-up (allocator, BLAS threads)
    base_stats, base = run(model, inp, sigmas, args.guidance, None)
    rows = [("none", f"{args.steps}/{args.steps}", "C" * args.steps,
             f"{base_stats['wall_s']:.1f}", "1.00", "inf")]
    line, changes, results = "", None, []
    for spec in specs:
        stats, latents = run(model, inp, sigmas, args.guidance, parse_cache(spec))
        results.append((spec, stats, latents))
        changes = changes or stats["cache_info"].get("relative_change")  # first FBC run
    # the uncached run again: on a shared machine the load drifts during the benchmark
    again, _ = run(model, inp, sigmas, args.guidance, None)
    rows.append(("none (again)", f"{args.steps}/{args.steps}", "C" * args.steps,
                 f"{again['wall_s']:.1f}", "", ""))
    base_s = (base_stats["wall_s"] + again["wall_s"]) / 2
    for spec, stats, latents in results:
        speedup = base_s / stats["wall_s"]
        evals = f"{stats['transformer_evals']}/{args.steps}"
        rows.append((spec, evals, stats["cache_steps"], f"{stats['wall_s']:.1f}",
                     f"{speedup:.2f}", f"{psnr(latents, base):.1f}"))
        line = f"cache {spec}: evals {evals} speed-up {speedup:.2f} psnr {rows[-1][-1]} dB"
    print(common.table(rows, ("cache", "evals", "per step", "denoise s",
                              "speed-up (vs mean none)", "latent PSNR dB")))
    if changes:
        c = np.array([x for x in changes if x is not None])
        print(f"first-block relative change per step (first FBC run): min {c.min():.3f} "
              f"median {np.median(c):.3f} max {c.max():.3f}")
    print(line or "cache none: no settings")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
