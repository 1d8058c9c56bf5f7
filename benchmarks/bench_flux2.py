"""One FLUX.2 transformer forward: mlx-edit vs diffusers (torch) vs mflux, same shapes.
Run through `bench_transformer.py --family flux2` (its options; --preset tiny|wide):

    python benchmarks/bench_transformer.py --family flux2 --preset wide --image-tokens 1024 \
        --text-tokens 512 [--dtype float32|bfloat16] [--quantize 4|8] \
        [--compare diffusers,mflux] [--double 1 --single 2] [--reps 3]

Widths: `wide` is FLUX.2 [klein] 4B's (hidden 3072 = 24 heads x 128, SwiGLU MLP ratio 3,
joint_attention_dim 7680, no guidance embedding) at the given depth. Weights: diffusers'
Flux2Transformer2DModel built under torch.manual_seed and saved to a temporary folder;
diffusers loads it back, mlx-edit loads it through its strict loader, mflux's klein
transformer (`mflux.models.flux2`, 0.24) runs with its own random init (timing does not
depend on the values). Inputs: a square grid of target tokens with the klein pipeline's
ids, text ids (0, 0, 0, position).

Each implementation runs in its own process (no torch OpenMP threads spinning beside MLX,
no shared allocator), one at a time: a round times each once, the order rotating from
round to round, so neither the order nor a change of the machine's load decides the
ratio. Reported as bench_transformer: medians after one warm-up, the MLX GEMM ceiling
measured in the parent between rounds, ratios as medians of per-round ratios, and the
guard (mlx-edit/diffusers <= GUARD). mflux absent: "mflux: not installed", ratio n/a.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import common
import mlx.core as mx
import numpy as np

GUARD = 1.3  # mlx-edit/diffusers, as for FLUX.1 (benchmarks/RESULTS.md)

# diffusers Flux2Transformer2DModel configs; depth comes from --double / --single.
PRESETS = {
    "tiny": dict(in_channels=16, attention_head_dim=16, num_attention_heads=4,
                 joint_attention_dim=64, timestep_guidance_channels=32,
                 axes_dims_rope=(4, 4, 4, 4)),
    "wide": dict(in_channels=128, attention_head_dim=128, num_attention_heads=24,
                 joint_attention_dim=7680, timestep_guidance_channels=256,
                 axes_dims_rope=(32, 32, 32, 32)),
}


def config(preset: str, n_double: int, n_single: int) -> dict:
    return {**PRESETS[preset], "num_layers": n_double, "num_single_layers": n_single,
            "mlp_ratio": 3.0, "rope_theta": 2000, "guidance_embeds": False}


def forward_flops(cfg: dict, n_img: int, n_txt: int) -> float:
    """Linear + attention FLOP of one forward, batch 1 (2 FLOP per multiply-add)."""
    h = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    m, L = int(h * cfg["mlp_ratio"]), n_img + n_txt
    lin = 2 * n_img * cfg["in_channels"] * h * 2 + 2 * n_txt * cfg["joint_attention_dim"] * h
    lin += cfg["num_layers"] * 2 * L * (4 * h * h + 3 * h * m)  # qkv + proj, SwiGLU MLP
    lin += cfg["num_single_layers"] * 2 * L * (h * (3 * h + 2 * m) + (h + m) * h)
    attn = (cfg["num_layers"] + cfg["num_single_layers"]) * 4 * L * L * h
    return float(lin + attn)


def make_inputs(cfg: dict, n_img: int, n_txt: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    h = int(math.isqrt(n_img))
    while n_img % h:
        h -= 1
    rows, cols = np.divmod(np.arange(n_img), n_img // h)
    zeros, tz = np.zeros(n_img), np.zeros(n_txt)
    return {
        "img": rng.standard_normal((1, n_img, cfg["in_channels"]), dtype=np.float32),
        "txt": rng.standard_normal((1, n_txt, cfg["joint_attention_dim"]), dtype=np.float32),
        "timestep": np.array([0.5], np.float32),
        "img_ids": np.stack([zeros, rows, cols, zeros], -1).astype(np.float32)[None],
        "txt_ids": np.stack([tz, tz, tz, np.arange(n_txt)], -1).astype(np.float32)[None],
    }


def runner_ours(spec: dict):
    from mlx_edit.weights.flux2 import load_flux2_transformer

    dt = getattr(mx, spec["dtype"])
    model = load_flux2_transformer(spec["folder"], dt, quantize=spec["quantize"])
    a = {k: mx.array(v) for k, v in spec["inputs"].items()}
    img, txt = a["img"].astype(dt), a["txt"].astype(dt)
    rope = model.rope(a["img_ids"], a["txt_ids"])

    def run():
        out = model(img, a["img_ids"], txt, a["txt_ids"], a["timestep"], None, rope=rope)
        mx.eval(out)
        return np.array(out.astype(mx.float32))
    return run


def runner_diffusers(spec: dict):
    import torch
    from diffusers import Flux2Transformer2DModel

    torch.set_num_threads(common.os.cpu_count())
    dt = getattr(torch, spec["dtype"])
    model = Flux2Transformer2DModel.from_pretrained(spec["folder"], torch_dtype=dt).eval()
    t = {k: torch.from_numpy(v) for k, v in spec["inputs"].items()}

    def run():
        with torch.inference_mode():
            out = model(hidden_states=t["img"].to(dt), encoder_hidden_states=t["txt"].to(dt),
                        timestep=t["timestep"].to(dt), img_ids=t["img_ids"],
                        txt_ids=t["txt_ids"], guidance=None, return_dict=False)[0]
        return out.float().numpy()
    return run


def runner_mflux(spec: dict):
    """mflux's FLUX.2 [klein] transformer at the same widths and depth (its own init)."""
    import mlx.nn as nn
    from mflux.models.common.config.model_config import ModelConfig
    from mflux.models.flux2.model.flux2_transformer.transformer import Flux2Transformer

    dt = getattr(mx, spec["dtype"])
    ModelConfig.precision = dt  # mflux reads its compute dtype from this class attribute
    model = Flux2Transformer(**spec["config"])
    model.set_dtype(dt)
    if spec["quantize"]:
        nn.quantize(model, 64, spec["quantize"])
    mx.eval(model.parameters())
    a = {k: mx.array(v) for k, v in spec["inputs"].items()}
    img, txt = a["img"].astype(dt), a["txt"].astype(dt)

    def run():
        out = model(img, txt, a["timestep"], a["img_ids"], a["txt_ids"])
        mx.eval(out)
        return None  # its weights differ: no error to report
    return run


RUNNERS = {"mlx-edit": runner_ours, "diffusers": runner_diffusers, "mflux": runner_mflux}


def worker(name: str, conn, spec: dict) -> None:
    """Build one implementation, warm it up (sending its output and its process's peak
    RSS), then time one forward per "run" message until "stop"."""
    try:
        run = RUNNERS[name](spec)
    except Exception as e:  # mflux absent or failing to import: reported, not fatal
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    out = run()
    conn.send(("ready", out, common.process_rss_gb()))
    while conn.recv() == "run":
        t0 = time.perf_counter()
        run()
        conn.send(time.perf_counter() - t0)


def start_workers(names, spec: dict) -> tuple[dict, dict, dict]:
    """(connections, outputs, peak RSS GB) of the implementations that started; the others
    are reported as not installed. Workers start one at a time (they load weights)."""
    ctx = mp.get_context("spawn")
    conns, outputs, rss = {}, {}, {}
    for name in names:
        parent, child = ctx.Pipe()
        ctx.Process(target=worker, args=(name, child, spec), daemon=True).start()
        msg = parent.recv()
        if msg[0] == "error":
            print(f"{name}: not installed ({msg[1]})")
            continue
        conns[name], outputs[name], rss[name] = parent, msg[1], msg[2]
    return conns, outputs, rss


def measure(conns: dict, reps: int, shape) -> tuple[dict, list[float]]:
    """`reps` rounds of [MLX GEMM rate, each implementation once], the order rotating."""
    names, times, gemm = list(conns), {n: [] for n in conns}, []
    for r in range(reps):
        gemm.append(common.mlx_gemm_rate(*shape, reps=1))
        for name in names[r % len(names):] + names[:r % len(names)]:
            conns[name].send("run")
            times[name].append(conns[name].recv())
    for c in conns.values():
        c.send("stop")
    return times, gemm


def build_reference(cfg: dict, seed: int, folder: Path) -> None:
    """diffusers' model under `torch.manual_seed(seed)`, saved to `folder` (float32)."""
    import torch
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    Flux2Transformer2DModel(**cfg).save_pretrained(folder, safe_serialization=True)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def main(args) -> int:
    compare = [c for c in args.compare.split(",") if c]
    print("\n".join(common.machine_header(" ".join(["python"] + common.sys.argv))))
    cfg = config(args.preset, args.double, args.single)
    inputs = make_inputs(cfg, args.image_tokens, args.text_tokens, args.seed)
    flop = forward_flops(cfg, args.image_tokens, args.text_tokens)
    h = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    print(f"FLUX.2 preset {args.preset}: hidden {h}, {args.double} double + {args.single} "
          f"single blocks; {args.image_tokens} image + {args.text_tokens} text tokens; "
          f"{args.dtype}{f', q{args.quantize}' if args.quantize else ''}; "
          f"{flop / 1e12:.3f} TFLOP per forward; one process per implementation")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "transformer"
        build_reference(cfg, args.seed, folder)
        spec = dict(folder=str(folder), dtype=args.dtype, quantize=args.quantize,
                    inputs=inputs, config=cfg)
        names = ["mlx-edit", *[c for c in ("diffusers", "mflux") if c in compare]]
        conns, outputs, rss = start_workers(names, spec)
        shape = (args.image_tokens + args.text_tokens, h, 3 * h + 2 * int(h * cfg["mlp_ratio"]))
        times, gemm = measure(conns, args.reps, shape)
    report(times, gemm, flop, outputs, rss, shape)
    return 0


def report(times: dict, gemm: list[float], flop: float, outputs: dict, rss: dict,
           shape) -> None:
    rows = [[name, f"{common.med(ts):.3f}", f"{min(ts):.3f}",
             f"{flop / common.med(ts) / 1e9:.1f}",
             f"{common.med([flop / t / 1e9 / g for t, g in zip(ts, gemm)]):.2f}",
             f"{rss[name]:.2f}"] for name, ts in times.items()]
    print(common.table(rows, ["implementation", "median s", "min s", "GFLOP/s",
                              "of ceiling (per round)", "process peak RSS GB"]))
    print("seconds per round (order rotating): " + "; ".join(
        f"{name} " + " ".join(f"{t:.1f}" for t in ts) for name, ts in times.items()))
    print(f"MLX GEMM GFLOP/s per round ({'x'.join(map(str, shape))}): "
          + " ".join(f"{g:.1f}" for g in gemm))
    if "diffusers" in outputs:
        print(f"mlx-edit vs diffusers: rel err "
              f"{rel_err(outputs['mlx-edit'], outputs['diffusers']):.2e}")
    ratio = {k: (f"{common.med([a / b for a, b in zip(times['mlx-edit'], times[k])]):.2f}"
                 if k in times else "n/a") for k in ("diffusers", "mflux")}
    if "diffusers" in times:
        ok = float(ratio["diffusers"]) <= GUARD
        print(f"guard mlx-edit/diffusers <= {GUARD}: {'ok' if ok else 'EXCEEDED'}")
    frac = common.med([flop / t / 1e9 / g for t, g in zip(times["mlx-edit"], gemm)])
    print(f"ratio mlx-edit/diffusers: {ratio['diffusers']}  ratio mlx-edit/mflux: "
          f"{ratio['mflux']}  fraction of matmul ceiling: {frac:.2f}")
