"""Time per denoising step: FLUX.1 Kontext (target + reference tokens) vs FLUX.1 Fill.

    python benchmarks/bench_kontext.py [--preset wide] [--size 512x512] [--text-tokens 512]
        [--double 1] [--single 2] [--reps 2]

Both transformers have the preset's widths (random MLX weights; time does not depend on
the values) and run one step of the one denoise loop (`sampling.denoise.denoise`) on the
same machine in the same run: Fill with its 320 conditioning channels on N image tokens,
Kontext with one reference of the target's size appended (2N image tokens, 64 channels).
Prints the median seconds per step and the ratio Kontext / Fill.
"""

from __future__ import annotations

import argparse
import sys

import common  # noqa: F401  (first: OpenBLAS before mlx)

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(common.REPO_ROOT / "scripts"))

from mlx_edit.conditioning.kontext import reference_ids  # noqa: E402
from mlx_edit.models.flux import FluxConfig, FluxTransformer  # noqa: E402
from mlx_edit.sampling.denoise import PromptEmbeds, denoise  # noqa: E402
from mlx_edit.sampling.latents import image_ids, token_grid  # noqa: E402


def preset_config(preset: str, n_double: int, n_single: int, in_channels: int) -> FluxConfig:
    """The preset's transformer config (scripts/make_tiny_checkpoint.py) at this depth."""
    import make_tiny_checkpoint as mtc  # imports torch only for its own builders

    cfg = dict(mtc.configs(preset, 0)["transformer"], num_layers=n_double,
               num_single_layers=n_single, in_channels=in_channels)
    return FluxConfig.from_dict(cfg)


def step_seconds(cfg: FluxConfig, width: int, height: int, n_txt: int, kontext: bool,
                 reps: int) -> float:
    model = FluxTransformer(cfg)
    mx.eval(model.parameters())
    h, w = token_grid(height, width)
    n = h * w
    key = mx.random.key(0)
    latents = mx.random.normal((1, n, 64), key=key)
    embeds = PromptEmbeds(mx.random.normal((1, n_txt, cfg.joint_attention_dim), key=key),
                          mx.random.normal((1, cfg.pooled_projection_dim), key=key))
    extra = {}
    channels = None
    if kontext:
        extra = dict(tokens=mx.random.normal((1, n, 64), key=key), token_ids=reference_ids(h, w))
    else:
        channels = mx.random.normal((1, n, cfg.in_channels - 64), key=key)
    sigmas = np.linspace(1.0, 0.0, 2).astype(np.float32)

    def run():
        for _ in denoise(model, latents, channels, image_ids(h, w), embeds, sigmas, 2.5,
                         compile=False, **extra):
            pass

    return common.med(common.median_time(run, reps=reps))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="wide", choices=("tiny", "small", "wide"))
    ap.add_argument("--size", default="512x512", help="target WxH px")
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    print("\n".join(common.machine_header(" ".join(["bench_kontext.py", *(argv or sys.argv[1:])]))))
    fill = step_seconds(preset_config(args.preset, args.double, args.single, 384),
                        width, height, args.text_tokens, False, args.reps)
    kontext = step_seconds(preset_config(args.preset, args.double, args.single, 64),
                           width, height, args.text_tokens, True, args.reps)
    n = token_grid(height, width)[0] * token_grid(height, width)[1]
    print(common.table([["Fill", n, f"{fill:.2f}"], ["Kontext", 2 * n, f"{kontext:.2f}"]],
                       ["variant", "image tokens", "s/step"]))
    print(f"ratio Kontext/Fill per step: {kontext / fill:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
