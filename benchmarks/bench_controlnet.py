"""Per-step cost of Fill + one ControlNet vs Fill alone, at real FLUX widths.

    python benchmarks/bench_controlnet.py [--rows 8] [--cols 16] [--txt 32] [--repeats 2]
        [--double 5] [--single 10] [--dtype float32|bfloat16]

One denoise step = the ControlNet hook (`prepare_controls`' ControlFn body: the ControlNet
forward on the 64-channel latents) + the Fill transformer with the residuals, exactly as
`pipeline.denoise` runs it. Widths are FLUX.1's (hidden 3072, 24 heads of 128, T5 4096,
CLIP 768); depths are the real ones (Fill 19 double + 38 single blocks, InstantX Union
5 + 10 by default) but every block of a model shares one set of random weights, so the
12B transformer fits in memory (2 GB of weights instead of 48 GB in float32). Compute per
step is unchanged by the sharing (the same matmuls on the same shapes); on the CPU the
token count is reduced (default 8 x 16 tokens = a 128 x 256 px canvas, 32 text tokens).

Prediction from the FLOP count (per token, a double block's linears are 12 h^2
multiply-adds (each token goes through its own stream's qkv 3h^2, proj h^2, MLP 8h^2) and
a single block's too (linear1 7h^2, linear2 5h^2); attention is 2 n^2 h per block; the
ControlNet adds one h x h projection per block on the image tokens; this gives 59.5 + 14.9
TFLOP for Fill at 1024 x 1024):
ratio = 1 + ControlNet FLOPs / Fill FLOPs, both counted below for the chosen shapes.
The matmul ceiling of this machine is measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import mlx_edit  # noqa: F401  (first: loads OpenBLAS before mlx)

import mlx.core as mx
import numpy as np

from mlx_edit.sampling.latents import image_ids, model_input, text_ids
from mlx_edit.models.controlnet import ControlNetConfig, FluxControlNet
from mlx_edit.models.flux import FluxConfig, FluxTransformer

WIDE = dict(attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
            pooled_projection_dim=768, axes_dims_rope=(16, 56, 56), guidance_embeds=True)


def shared_depth(model, n_double: int, n_single: int, projections: bool = False):
    """Make `model` n_double + n_single blocks deep, every block sharing block 0's weights."""
    model.double_blocks = [model.double_blocks[0]] * n_double
    model.single_blocks = [model.single_blocks[0]] * n_single
    if projections:
        model.controlnet_blocks = [model.controlnet_blocks[0]] * n_double
        model.controlnet_single_blocks = [model.controlnet_single_blocks[0]] * n_single
    return model


def flops(h: int, n_img: int, n_txt: int, n_double: int, n_single: int,
          projections: bool = False, in_ch: int = 384) -> float:
    """Forward FLOPs (2 per multiply-add) of the blocks, attention and projections."""
    n = n_img + n_txt
    per_token = (n_double + n_single) * 12 * h * h
    attention = (n_double + n_single) * 2 * n * n * h  # QK^T and PV
    extra = (n_double + n_single) * n_img * h * h if projections else 0
    embed = n_img * in_ch * h + n_txt * 4096 * h
    return 2.0 * (n * per_token + attention + extra + embed)


def matmul_ceiling(h: int = 3072, n: int = 512, dtype=mx.float32) -> float:
    """GFLOP/s of an (n, h) x (h, h) matmul, best of 3."""
    a = mx.random.normal((n, h)).astype(dtype)
    b = mx.random.normal((h, h)).astype(dtype)
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * h * h / best / 1e9


def timed(fn) -> tuple[float, float]:
    """(seconds, peak GB) of one evaluation of fn()."""
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - t0, mx.get_peak_memory() / 1e9


def interleaved(fns: dict, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Run the configurations in turn, `repeats` rounds: the CPU is shared, so a slow
    phase hits every configuration of a round alike (paired ratios stay meaningful)."""
    out: dict[str, list] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            out[name].append(timed(fn))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--cols", type=int, default=8)
    ap.add_argument("--txt", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--double", type=int, default=5)
    ap.add_argument("--single", type=int, default=10)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = ap.parse_args(argv)
    dtype = getattr(mx, args.dtype)

    fill = FluxTransformer(FluxConfig.from_dict(dict(WIDE, num_layers=1, num_single_layers=1)))
    cn = FluxControlNet(ControlNetConfig.from_dict(dict(WIDE, num_layers=1, num_single_layers=1,
                                                        num_mode=10)))
    for m in (fill, cn):
        m.set_dtype(dtype)
        mx.eval(m.parameters())
    shared_depth(fill, 19, 38)
    shared_depth(cn, args.double, args.single, projections=True)
    h = fill.config.hidden_size
    n_img = args.rows * args.cols
    rng = np.random.default_rng(0)
    arr = lambda *s: mx.array(rng.standard_normal(s).astype(np.float32)).astype(dtype)  # noqa: E731
    latents, cond = arr(1, n_img, 64), arr(1, n_img, 320)
    control, txt, pooled = arr(1, n_img, 64), arr(1, args.txt, 4096), arr(1, 768)
    ids, tids = image_ids(args.rows, args.cols), text_ids(args.txt)
    t, g = mx.array([0.7]), mx.array([30.0])
    rope = fill.rope(ids, tids)
    cn_rope = cn.rope(ids, args.txt)
    emb = cn.embed_control(control)
    mx.eval(rope, cn_rope, emb)

    def fill_step(res=()):
        return fill(model_input(latents, cond), ids, txt, tids, t, pooled, g, controlnet=res,
                    rope=rope)

    def controlled_step():
        res = cn(latents, ids, txt, t, pooled, g, control=emb, mode=0, rope=cn_rope)
        return fill_step([res])

    def controlnet_only():
        res = cn(latents, ids, txt, t, pooled, g, control=emb, mode=0, rope=cn_rope)
        return res.double + res.single

    ceiling = matmul_ceiling(h, 512, dtype)
    mx.eval(controlled_step())  # warm-up
    runs = interleaved({"Fill alone": fill_step, "Fill + ControlNet": controlled_step,
                        "ControlNet alone": controlnet_only}, args.repeats)
    ceiling = max(ceiling, matmul_ceiling(h, 512, dtype))

    f_fill = flops(h, n_img, args.txt, 19, 38)
    f_cn = flops(h, n_img, args.txt + 1, args.double, args.single, True, 64)
    fl = {"Fill alone": f_fill, "Fill + ControlNet": f_fill + f_cn, "ControlNet alone": f_cn}
    print(f"shapes: hidden {h}, {n_img} image + {args.txt} text tokens, {args.dtype}; "
          f"ControlNet {args.double} double + {args.single} single blocks (Union); "
          f"best of {args.repeats} interleaved rounds")
    print(f"matmul ceiling (512 x {h} x {h}, best seen): {ceiling:.0f} GFLOP/s")
    print(f"{'':20}{'step s':>9}{'TFLOP':>8}{'GFLOP/s':>9}{'of ceiling':>11}{'peak GB':>9}")
    for name, rows in runs.items():
        secs = min(r[0] for r in rows)
        peak = max(r[1] for r in rows)
        print(f"{name:20}{secs:9.2f}{fl[name] / 1e12:8.2f}{fl[name] / secs / 1e9:9.0f}"
              f"{fl[name] / secs / 1e9 / ceiling:11.2f}{peak:9.2f}")
    best = min(r[0] for r in runs["Fill + ControlNet"]) / min(r[0] for r in runs["Fill alone"])
    paired = [b[0] / a[0] for a, b in zip(runs["Fill alone"], runs["Fill + ControlNet"])]
    print(f"overhead ratio (Fill + ControlNet) / Fill: predicted {1 + f_cn / f_fill:.3f} "
          f"(FLOPs), measured {best:.3f} (best times; per round "
          f"{', '.join(f'{r:.3f}' for r in paired)})")
    print("FLOPs at 1024x1024 (4096 + 512 tokens): Fill "
          f"{flops(h, 4096, 512, 19, 38) / 1e12:.1f} TFLOP, ControlNet "
          f"{flops(h, 4096, 513, args.double, args.single, True, 64) / 1e12:.1f} TFLOP, "
          f"predicted ratio {1 + flops(h, 4096, 513, args.double, args.single, True, 64) / flops(h, 4096, 512, 19, 38):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
