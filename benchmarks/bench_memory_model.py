"""The memory estimate's transformer activations vs MLX's measured peak of one forward.

    python benchmarks/bench_memory_model.py --family flux2 [--tokens 384+128,1280+256,2304+256]
    python benchmarks/bench_memory_model.py --family flux1 ...

A transformer at real widths (FLUX.1: Fill-dev's, 24 heads x 128, MLP 4x; FLUX.2: klein
4B's, 24 heads x 128, SwiGLU MLP 3x, joint_attention_dim 7680), 1 double + 1 single
block, MLX's random initialisation (the peak does not depend on the values), float32.
Per "image+text" token count: the MLX peak over one forward minus the memory resident
before it (weights and inputs evaluated, after one warm-up), the terms of
`memory.transformer_activation_gb` (attention scores H*L^2*4 B and the family's widest
projection L*width*4 B, `Family.activation_width`) and the estimate / measured ratio.
Last line: `estimate/measured: min X max Y`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: mlx_edit -> OpenBLAS before mlx)

import mlx.core as mx  # noqa: E402

from mlx_edit import families  # noqa: E402
from mlx_edit.editing import memory  # noqa: E402
from mlx_edit.models.flux import FluxConfig, FluxTransformer  # noqa: E402
from mlx_edit.models.flux2 import Flux2Config, Flux2Transformer  # noqa: E402

WIDE = {"flux1": dict(num_layers=1, num_single_layers=1),
        "flux2": dict(in_channels=128, num_layers=1, num_single_layers=1,
                      num_attention_heads=24, joint_attention_dim=7680,
                      axes_dims_rope=(32, 32, 32, 32), guidance_embeds=False)}


def build(family: str):
    if family == "flux1":
        return FluxTransformer(FluxConfig.from_dict(WIDE["flux1"]))
    return Flux2Transformer(Flux2Config.from_dict(WIDE["flux2"]))


def forward_peak(model, n: int, t: int) -> int:
    """Bytes allocated beyond the resident ones over one forward on n image and t text
    tokens (zero ids: the RoPE values do not change the memory)."""
    cfg, axes = model.config, len(model.config.axes_dims_rope)
    x = [mx.random.normal((1, n, cfg.in_channels)), mx.zeros((n, axes)),
         mx.random.normal((1, t, cfg.joint_attention_dim)), mx.zeros((t, axes)),
         mx.array([0.5])]
    if axes == 3:  # FLUX.1: pooled text and guidance
        x += [mx.random.normal((1, cfg.pooled_projection_dim)), mx.array([3.5])]
    mx.eval(model.parameters(), x)
    mx.eval(model(*x))
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(model(*x))
    return mx.get_peak_memory() - before


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="flux2", choices=("flux1", "flux2"))
    p.add_argument("--tokens", default="384+128,1280+256,2304+256", help="image+text,...")
    args = p.parse_args(argv)
    print("\n".join(common.machine_header(" ".join(["bench_memory_model.py", *sys.argv[1:]]))))
    model = build(args.family)
    cfg = model.config
    per_hidden, per_mlp = families.get(args.family).activation_width
    width = per_hidden * cfg.hidden_size + per_mlp * cfg.mlp_hidden
    print(f"{args.family}: hidden {cfg.hidden_size}, mlp {cfg.mlp_hidden}, widest "
          f"projection {width}; ACT_SCORE_COPIES {memory.ACT_SCORE_COPIES}, "
          f"ACT_LINEAR_COPIES {memory.ACT_LINEAR_COPIES}")
    rows, ratios = [], []
    for spec in args.tokens.split(","):
        n, t = (int(v) for v in spec.split("+"))
        peak = forward_peak(model, n, t) / 1e9
        est = memory.transformer_activation_gb(n + t, cfg, 1, 4, False, args.family)
        scores, linear = cfg.num_attention_heads * (n + t) ** 2 * 4, (n + t) * width * 4
        ratios.append(est / peak)
        rows.append([spec, f"{peak:.3f}", f"{scores / 1e9:.3f}", f"{linear / 1e9:.3f}",
                     f"{est:.3f}", f"{est / peak:.2f}"])
    print(common.table(rows, ["image+text", "measured GB", "scores GB", "widest GB",
                              "estimate GB", "estimate/measured"]))
    print(f"estimate/measured: min {min(ratios):.2f} max {max(ratios):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
