"""FLUX.2 [klein] KV variant vs plain references: time per transformer call, mlx-edit only.

    python benchmarks/bench_flux2_kv.py [--preset wide] [--refs 1,3] [--image-tokens 1024] \
        [--ref-tokens 1024] [--text-tokens 512] [--double 1 --single 2] \
        [--dtype float32|bfloat16] [--reps 3] [--model DIR]

Rows per reference count R (each reference `--ref-tokens` tokens):
- plain: one call over target + R x reference tokens, all attending to all (the klein
  pipelines' reference edit; `Flux2KleinPipeline`);
- kv later step: the target tokens alone, attending also to the cached reference K/V
  (`__call__(kv=...)`; diffusers' `kv_cache_mode="cached"` steps);
- kv first step: `reference_kv` (the references through every block once) + the cached
  call (diffusers' `"extract"` step);
- kv refs alone: `reference_kv` only.
Widths: bench_flux2's presets (`wide` = FLUX.2 [klein] 4B's: hidden 3072, SwiGLU MLP
3x, joint_attention_dim 7680) at the given depth; random MLX weights (time does not
depend on the values), or `--model DIR`: the transformer of a klein folder (diffusers
layout, e.g. the wide klein fixture; --preset/--double/--single then unused). Rows interleave round by round after one warm-up each, so a
change of the machine's load hits every row; medians, and per-round ratios to plain.
Last line per R: `kv R refs: later/plain X  first/plain Y  (4-step edit: Z)`, where
Z = (first + 3 later) / (4 plain), the per-edit ratio of a 4-step klein edit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: mlx_edit -> OpenBLAS before mlx)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from bench_flux2 import PRESETS, config  # noqa: E402

from mlx_edit.models.flux2 import Flux2Config, Flux2Transformer  # noqa: E402
from mlx_edit.weights.flux2 import load_flux2_transformer  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="wide", choices=sorted(PRESETS))
    ap.add_argument("--refs", default="1,3", help="reference counts")
    ap.add_argument("--image-tokens", type=int, default=1024)
    ap.add_argument("--ref-tokens", type=int, default=1024, help="tokens per reference")
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model", type=Path, help="a klein folder whose transformer/ is timed")
    return ap.parse_args(argv)


def grid_ids(n: int, time: float) -> np.ndarray:
    """(n, 4) ids (time, row, col, 0) of a near-square grid of n tokens."""
    cols = next(c for c in range(int(np.ceil(np.sqrt(n))), n + 1) if n % c == 0)
    rows, col = np.divmod(np.arange(n), cols)
    return np.stack([np.full(n, time), rows, col, np.zeros(n)], -1).astype(np.float32)


def calls(model: Flux2Transformer, args, n_refs: int, dt) -> dict:
    """{row name: a function running that call and evaluating its output}."""
    g = np.random.default_rng(n_refs)
    c, cfg = model.config.in_channels, model.config
    img = mx.array(g.standard_normal((1, args.image_tokens, c)), dt)
    refs = mx.array(g.standard_normal((1, n_refs * args.ref_tokens, c)), dt)
    txt = mx.array(g.standard_normal((1, args.text_tokens, cfg.joint_attention_dim)), dt)
    t = args.text_tokens
    txt_ids = mx.array(np.stack([np.zeros(t)] * 3 + [np.arange(t)], -1).astype(np.float32))
    img_ids = mx.array(grid_ids(args.image_tokens, 0))
    ref_ids = mx.array(np.concatenate([grid_ids(args.ref_tokens, 10 + 10 * i)
                                       for i in range(n_refs)]))
    timestep = mx.array([0.5])
    joint_ids = mx.concatenate([img_ids, ref_ids])
    rope_plain, rope_kv = model.rope(joint_ids, txt_ids), model.rope(img_ids, txt_ids)
    kv = model.reference_kv(refs, ref_ids)
    mx.eval(kv)

    def plain():
        mx.eval(model(mx.concatenate([img, refs], axis=1), joint_ids, txt, txt_ids, timestep,
                      rope=rope_plain)[:, :args.image_tokens])

    def later(cache=kv):
        mx.eval(model(img, img_ids, txt, txt_ids, timestep, rope=rope_kv, kv=cache))

    def refs_alone():
        mx.eval(model.reference_kv(refs, ref_ids))

    def first():
        cache = model.reference_kv(refs, ref_ids)
        later(cache)

    return {"plain": plain, "kv later step": later, "kv first step": first,
            "kv refs alone": refs_alone}


def main(argv=None) -> int:
    args = parse_args(argv)
    print("\n".join(common.machine_header(
        " ".join(["python benchmarks/bench_flux2_kv.py", *(argv or sys.argv[1:])]))))
    dt = getattr(mx, args.dtype)
    if args.model:
        model = load_flux2_transformer(args.model / "transformer", dt)
    else:
        model = Flux2Transformer(Flux2Config.from_dict(config(args.preset, args.double,
                                                              args.single)))
        model.set_dtype(dt)
    mx.eval(model.parameters())
    cfg = model.config
    print(f"FLUX.2 {args.model or 'preset ' + args.preset}: hidden {cfg.hidden_size}, "
          f"{cfg.num_layers} double + {cfg.num_single_layers} single blocks; "
          f"{args.image_tokens} image + {args.text_tokens} text "
          f"tokens, {args.ref_tokens} tokens per reference; {args.dtype}")
    rows = {r: calls(model, args, r, dt) for r in (int(x) for x in args.refs.split(","))}
    for fns in rows.values():
        for fn in fns.values():
            fn()  # warm-up
    times = {(r, k): [] for r, fns in rows.items() for k in fns}
    for _ in range(args.reps):
        for r, fns in rows.items():
            for k, fn in fns.items():
                times[(r, k)] += common.median_time(fn, 1, warmup=0)
    table, summary = [], []
    for r, fns in rows.items():
        plain = times[(r, "plain")]
        for k in fns:
            ratio = common.med([a / b for a, b in zip(times[(r, k)], plain)])
            table.append([str(r), k, f"{common.med(times[(r, k)]):.3f}", f"{ratio:.2f}"])
        ratio = {k: common.med([a / b for a, b in zip(times[(r, k)], plain)]) for k in fns}
        edit = (ratio["kv first step"] + 3 * ratio["kv later step"]) / 4
        summary.append(f"kv {r} refs: later/plain {ratio['kv later step']:.2f}  first/plain "
                       f"{ratio['kv first step']:.2f}  (4-step edit: {edit:.2f})")
    print(common.table(table, ["refs", "call", "median s", "vs plain (per round)"]))
    kv_mb = {r: cfg.reference_kv_bytes(r * args.ref_tokens, itemsize=dt.size) / 2**20
             for r in rows}
    print("reference K/V held: " + ", ".join(f"{r} refs {mb:.0f} MB" for r, mb in kv_mb.items()))
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
