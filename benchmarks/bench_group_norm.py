"""GroupNorm statistics: blocked sums (`mlx_edit.models.layers.group_norm`) vs plain
float32 means (the VAE's GroupNorm before issue 30) on a 4K-sized activation.

    python benchmarks/bench_group_norm.py [--size 2160x3840] [--channels 32] [--groups 8]

Input: (1, H, W, C) float32 uniform noise with per-channel offsets, 4 channels per group
as the FLUX VAE's first level (128 channels / 32 groups) so each group holds as many
values as there; fewer channels than the real 128 keep it within a shared machine's
memory (the cost per value is the same). Last line: `group_norm: <size> blocked X s,
plain Y s, ratio R`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: mlx_edit -> OpenBLAS before mlx)

import mlx.core as mx  # noqa: E402

from mlx_edit.models.layers import group_norm  # noqa: E402


def plain_group_norm(x: mx.array, groups: int, eps: float) -> mx.array:
    """The previous VAE GroupNorm: float32 means over the whole group, centred twice."""
    b, c = x.shape[0], x.shape[-1]
    g = x.reshape(b, -1, groups, c // groups).astype(mx.float32)
    centred = g - g.mean(axis=(1, 3), keepdims=True)
    centred = centred - centred.mean(axis=(1, 3), keepdims=True)
    var = mx.square(centred).mean(axis=(1, 3), keepdims=True)
    return (centred * mx.rsqrt(var + eps)).reshape(x.shape).astype(x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2160x3840", help="HxW")
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    print("\n".join(common.machine_header(" ".join(sys.argv))))
    mx.random.seed(0)
    x = mx.random.uniform(shape=(1, h, w, args.channels)) + mx.arange(args.channels) / 8
    mx.eval(x)
    times = {}
    for name, fn in (("blocked", group_norm), ("plain", plain_group_norm)):
        times[name] = common.med(common.median_time(
            lambda fn=fn: mx.eval(fn(x, args.groups, 1e-6)), reps=args.reps))
    print(common.table([[name, f"{t:.3f}"] for name, t in times.items()],
                       ["statistics", "median s"]))
    print(f"group_norm: {args.size}x{args.channels} blocked {times['blocked']:.3f} s, "
          f"plain {times['plain']:.3f} s, ratio {times['blocked'] / times['plain']:.2f}")


if __name__ == "__main__":
    main()
