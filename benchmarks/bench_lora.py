"""Cost of LoRAs on a FLUX transformer forward: 0, 1 and 3 LoRAs, rank 16 and 64, unfused
(mlx_edit.models.lora.LoRALinear) vs fused into the weights, float or quantized.

    python benchmarks/bench_lora.py [--hidden 3072] [--double 1 --single 2] \
        [--image-tokens 1024 --text-tokens 512] [--ranks 16,64] [--counts 1,3] \
        [--quantize 8] [--reps 3]
    python benchmarks/bench_lora.py --layer [--image-tokens 384 --ranks 64]   # one linear1
    python benchmarks/bench_lora.py --family flux2 [--double 1 --single 2] ...  # FLUX.2 [klein]
    MLX_EDIT_WIDE_CKPT=/work/fixtures/wide python benchmarks/bench_lora.py ...  # its weights
    python benchmarks/bench_lora.py --family flux2 --ckpt <wide klein folder> ...  # klein's
    python benchmarks/bench_lora.py --family flux2 --lokr [--ranks 16] ...  # LoKr adapters

Weights: random (MLX init; the time does not depend on the values) at real FLUX widths by
default (24 heads x 128 = 3072 hidden, MLP 12288, T5 4096), 1 double + 2 single blocks;
with --ckpt (default: $MLX_EDIT_WIDE_CKPT) the transformer of that checkpoint folder
(the `wide` fixture: real widths, 1 double + 1 single block) and its config instead.
A fused LoRA costs exactly the "none" row (the same layers, other values). Each LoRA is a
random file in diffusers naming on every attention and MLP projection of
every block (to_q/k/v, to_out, add_*_proj, to_add_out, ff, ff_context, the single block's
to_q/k/v, proj_mlp and proj_out; as ai-toolkit trains them), converted by our loader
(separate q/k/v downs stacked into the fused layers). --family flux2: FLUX.2 [klein] 4B
widths (hidden 3072, SwiGLU MLP 3x, joint_attention_dim 7680, random weights) and its
diffusers names (to_q/k/v, to_out.0, add_*_proj, to_add_out, ff(_context).linear_in/out,
the single block's fused attn.to_qkv_mlp_proj and attn.to_out); with --ckpt the
transformer of that klein folder (scripts/make_tiny_checkpoint.py --family klein --preset
wide: klein 4B widths, 1 double + 1 single block). Reported per row: median forward
seconds (rows interleaved round by round, so load changes hit all of them; one warm-up
per row and round) and the overhead against no LoRA; the ideal LoRA FLOPs as a share of
the LoRA'd layers' FLOPs. Last line:
`lora rank R x1 unfused overhead: X%  (FLOP share Y%)` for the largest rank.
--lokr: LoKr files instead (SimpleTuner naming, the same modules; w1 (l, m) full and w2
= w2_a @ w2_b of the given rank, l*k = out, m*n = in split near the square root as PEFT's
factorization(-1) does), applied unfused as w1 @ X @ w2.T (mlx_edit.models.lora);
their FLOP share is l*n*(m + k) per token and module.
--layer times one single block's fused input projection (3072 -> 21504) alone, with one
LoRA whose q, k, v and MLP parts have their own downs (the stacked case).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: mlx_edit -> OpenBLAS before mlx)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from mlx_edit.models import lora as L  # noqa: E402
from mlx_edit.models.flux import FluxConfig, FluxTransformer  # noqa: E402
from mlx_edit.models.flux2 import Flux2Config, Flux2Transformer  # noqa: E402
from mlx_edit.weights.lora import convert  # noqa: E402
from mlx_edit.weights.quantize import quantize_transformer  # noqa: E402

_T, _S = "transformer.transformer_blocks.{i}.", "transformer.single_transformer_blocks.{i}."
DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
          "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
          "ff_context.net.0.proj", "ff_context.net.2")
SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
FLUX2_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
              "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="flux1", choices=("flux1", "flux2"))
    p.add_argument("--hidden", type=int, default=3072, help="heads x 128")
    p.add_argument("--double", type=int, default=1)
    p.add_argument("--single", type=int, default=2)
    p.add_argument("--image-tokens", type=int, default=1024)
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--ranks", default="16,64")
    p.add_argument("--counts", default="1,3")
    p.add_argument("--quantize", type=int, default=None, help="4 or 8: quantized base")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--layer", action="store_true", help="time one linear1 layer only")
    p.add_argument("--lokr", action="store_true", help="LoKr (Kronecker) files, not LoRAs")
    p.add_argument("--ckpt", type=Path, default=None,
                   help="a checkpoint folder whose transformer to time (default: random "
                        "weights; FLUX.1: $MLX_EDIT_WIDE_CKPT; --family flux2: a klein "
                        "folder, e.g. the wide klein fixture)")
    args = p.parse_args(argv)
    if args.ckpt is None and args.family == "flux1" and os.environ.get("MLX_EDIT_WIDE_CKPT"):
        args.ckpt = Path(os.environ["MLX_EDIT_WIDE_CKPT"])
    return args


def module_shapes(cfg: FluxConfig | Flux2Config) -> dict[str, tuple[int, int]]:
    """{diffusers module name: (out, in)} of the LoRA targets."""
    h, m = cfg.hidden_size, cfg.mlp_hidden
    if isinstance(cfg, Flux2Config):
        double = {**dict.fromkeys(FLUX2_ATTN, (h, h)), "ff.linear_in": (2 * m, h),
                  "ff.linear_out": (h, m), "ff_context.linear_in": (2 * m, h),
                  "ff_context.linear_out": (h, m)}
        single = {"attn.to_qkv_mlp_proj": (3 * h + 2 * m, h), "attn.to_out": (h, h + m)}
    else:
        double = dict.fromkeys(DOUBLE, (h, h))
        double.update({"ff.net.0.proj": (m, h), "ff.net.2": (h, m),
                       "ff_context.net.0.proj": (m, h), "ff_context.net.2": (h, m)})
        single = {**dict.fromkeys(SINGLE, (h, h)), "proj_mlp": (m, h), "proj_out": (h, h + m)}
    shapes = {}
    for i in range(cfg.num_layers):
        shapes.update({_T.format(i=i) + k: v for k, v in double.items()})
    for i in range(cfg.num_single_layers):
        shapes.update({_S.format(i=i) + k: v for k, v in single.items()})
    return shapes


def near_square(dim: int) -> tuple[int, int]:
    """(a, b), a * b = dim, a <= b, a the largest divisor <= sqrt(dim)."""
    a = max(d for d in range(1, int(np.sqrt(dim)) + 1) if dim % d == 0)
    return a, dim // a


def random_lora(cfg: FluxConfig, rank: int, seed: int, lokr: bool = False):
    g = np.random.default_rng(seed)

    def rand(*shape):
        return (g.standard_normal(shape) * 0.01).astype(np.float32)

    tensors = {}
    for name, (out, inp) in module_shapes(cfg).items():
        if lokr:
            (l1, k), (m, n) = near_square(out), near_square(inp)
            tensors.update({f"{name}.lokr_w1": rand(l1, m), f"{name}.lokr_w2_a": rand(k, rank),
                            f"{name}.lokr_w2_b": rand(rank, n)})
        else:
            tensors[f"{name}.lora_A.weight"] = rand(rank, inp)
            tensors[f"{name}.lora_B.weight"] = rand(out, rank)
    return convert(tensors, name=f"rank{rank}")


def flop_share(cfg: FluxConfig, rank: int, lokr: bool = False) -> float:
    """Ideal adapter FLOPs (LoRA: rank r per separate projection; LoKr: w1 @ X @ w2.T) /
    the adapted layers' FLOPs (both per token)."""
    shapes = module_shapes(cfg).values()
    if lokr:
        cost = sum(near_square(o)[0] * near_square(i)[1] * (near_square(i)[0] + near_square(o)[1])
                   for o, i in shapes)
    else:
        cost = sum(rank * (o + i) for o, i in shapes)
    return cost / sum(o * i for o, i in shapes)


def layer_overhead(args, cfg: FluxConfig) -> None:
    """Median ms of linear1 alone and with one stacked LoRA per rank (module docstring)."""
    h, m, n = cfg.hidden_size, cfg.mlp_hidden, args.image_tokens + args.text_tokens
    base = nn.Linear(h, 3 * h + m)
    x = mx.random.normal((1, n, h))
    mx.eval(base.parameters(), x)
    g = np.random.default_rng(0)
    ms = common.med(common.median_time(lambda: mx.eval(base(x)), args.reps)) * 1e3
    print(f"linear1 {h} -> {3 * h + m}, {n} tokens: {ms:.1f} ms")
    for rank in (int(r) for r in args.ranks.split(",")):
        parts = [L.Part(o, g.standard_normal((rank, h)).astype(np.float32) * 0.01,
                        g.standard_normal((rows, rank)).astype(np.float32) * 0.01)
                 for o, rows in ((0, h), (h, h), (2 * h, h), (3 * h, m))]
        layer = L.LoRALinear(base)
        layer.add("l", L.combine(parts, h, 3 * h + m), 0.8, mx.float32)
        s = common.med(common.median_time(lambda f=layer: mx.eval(f(x)), args.reps)) * 1e3
        ideal = rank * (4 * h + 3 * h + m) / (h * (3 * h + m))
        print(f"lora rank {rank} on linear1: {s:.1f} ms ({100 * (s / ms - 1):+.1f}%, "
              f"FLOP share {100 * ideal:.1f}%)")


def build_model(args) -> FluxTransformer | Flux2Transformer:
    """The timed transformer: --ckpt's (float32), or random at the requested widths."""
    if args.family == "flux2" and args.ckpt is not None:
        from mlx_edit.weights.flux2 import load_flux2_transformer

        return load_flux2_transformer(Path(args.ckpt) / "transformer", mx.float32)
    if args.family == "flux2":
        model = Flux2Transformer(Flux2Config.from_dict(dict(
            in_channels=128, num_layers=args.double, num_single_layers=args.single,
            attention_head_dim=128, num_attention_heads=args.hidden // 128,
            joint_attention_dim=7680, guidance_embeds=False)))
        mx.eval(model.parameters())
        return model
    if args.ckpt is not None:
        from mlx_edit.weights.flux import load_transformer

        return load_transformer(Path(args.ckpt) / "transformer", mx.float32)
    model = FluxTransformer(FluxConfig.from_dict(dict(
        in_channels=384, out_channels=64, num_layers=args.double, num_single_layers=args.single,
        attention_head_dim=128, num_attention_heads=args.hidden // 128, joint_attention_dim=4096,
        pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))))
    mx.eval(model.parameters())
    return model


def forward_inputs(cfg, n: int, t: int) -> list[mx.array]:
    """The transformer's positional inputs for n image and t text tokens, batch 1:
    FLUX.1 (img, ids, txt, txt_ids, timestep, pooled, guidance), FLUX.2 (img, ids, txt,
    txt_ids, timestep) with its 4-axis ids."""
    g = np.random.default_rng(0)
    side = int(np.sqrt(n))
    ids = [np.zeros(n), np.arange(n) // side, np.arange(n) % side]
    txt_ids = np.zeros((t, 3))
    if isinstance(cfg, Flux2Config):
        ids.append(np.zeros(n))
        txt_ids = np.stack([np.zeros(t)] * 3 + [np.arange(t)], 1)
    arrays = [g.standard_normal((1, n, cfg.in_channels)), np.stack(ids, 1),
              g.standard_normal((1, t, cfg.joint_attention_dim)), txt_ids, np.array([0.5])]
    if not isinstance(cfg, Flux2Config):
        arrays += [g.standard_normal((1, cfg.pooled_projection_dim)), np.array([3.5])]
    return [mx.array(a.astype(np.float32)) for a in arrays]


def main(argv=None) -> int:
    args = parse_args(argv)
    print("\n".join(common.machine_header(" ".join(["bench_lora.py", *(argv or sys.argv[1:])]))))
    if args.layer:
        layer_overhead(args, FluxConfig.from_dict(dict(num_attention_heads=args.hidden // 128)))
        return 0
    model = build_model(args)
    cfg = model.config
    source = args.ckpt or f"random {args.family}"
    print(f"transformer: {source} ({cfg.num_layers} double + "
          f"{cfg.num_single_layers} single blocks, hidden {cfg.hidden_size})")
    if args.quantize:
        quantize_transformer(model, args.quantize)
        mx.eval(model.parameters())
    x = forward_inputs(cfg, args.image_tokens, args.text_tokens)
    rope = model.rope(x[1], x[3])

    def forward():
        mx.eval(model(*x, rope=rope))

    ranks = [int(r) for r in args.ranks.split(",")]
    counts = [int(c) for c in args.counts.split(",")]
    files = {r: [random_lora(cfg, r, s, args.lokr) for s in range(max(counts))] for r in ranks}
    configs = [(0, 0)] + [(r, c) for r in ranks for c in counts]
    times = {k: [] for k in configs}
    forward()  # warm-up
    for _ in range(args.reps):  # interleaved rounds: load changes hit every row alike
        for rank, count in configs:
            for i, f in enumerate(files.get(rank, [])[:count]):
                L.attach(model, f"l{i}", f.updates(model), 0.8)
            forward()  # warm-up of this structure
            times[(rank, count)] += common.median_time(forward, 1, warmup=0)
            L.remove(model)
    base = common.med(times[(0, 0)])
    rows, overhead = [["none (= fused)", f"{base:.3f}", "", ""]], {}
    for rank, count in configs[1:]:
        s = common.med(times[(rank, count)])
        overhead[(rank, count)] = s / base - 1
        rows.append([f"{count} x rank {rank}, unfused", f"{s:.3f}", f"{100 * (s / base - 1):+.1f}%",
                     f"{100 * count * flop_share(cfg, rank, args.lokr):.1f}%"])
    print(common.table(rows, ["LoRAs", "median s", "vs none", "ideal FLOP share"]))
    top, kind = max(ranks), "lokr" if args.lokr else "lora"
    print(f"{kind} rank {top} x1 unfused overhead: {100 * overhead[(top, min(counts))]:.1f}%  "
          f"(FLOP share {100 * flop_share(cfg, top, args.lokr):.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
