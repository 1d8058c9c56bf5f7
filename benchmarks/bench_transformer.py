"""One FLUX transformer forward: mlx-edit vs diffusers (torch) vs mflux, same shapes.

    python benchmarks/bench_transformer.py --preset wide --image-tokens 1024 --text-tokens 512 \
        [--dtype float32|bfloat16] [--quantize 4|8] [--compare diffusers,mflux] \
        [--double 1 --single 2] [--compile] [--variant one_stream,gelu_approx] [--profile]
    python benchmarks/bench_transformer.py --family flux2 --preset wide ...   (FLUX.2 [klein]
        widths, one process per implementation: benchmarks/bench_flux2.py)

Weights: diffusers' FluxTransformer2DModel built from the preset's config under
torch.manual_seed (scripts/make_tiny_checkpoint.py), loaded into ours through our strict
loader (diffusers key map, in memory). Identical inputs. torch uses as many threads as
the machine has cores (MLX's CPU backend: OpenBLAS threads for GEMM). Reported: median
forward time after one warm-up (implementations interleaved, so load changes hit all),
the MLX float32 GEMM rate measured in the same run (the "ceiling"), the forward's FLOP
count (linear layers + attention, performance-anchors.md), the achieved fraction of the
ceiling and our output's relative error against diffusers. Last line:
`ratio mlx-edit/diffusers: X  ratio mlx-edit/mflux: Y  fraction of matmul ceiling: Z`.

mflux (optional): its Linux wheel pins a CUDA MLX, so install it without dependencies
next to mlx[cpu]:
    pip install --no-deps mflux==0.24.0 platformdirs toml piexif
(or unpack those wheels into a folder and put it on PYTHONPATH). mflux runs with its own
random init (timing does not depend on the values); absent, the script prints
"mflux: not installed" and Y = n/a.

--variant times extra rows with model helpers swapped (monkeypatched in this process only):
proposed changes before they touch the model code, or the code as it was before a change
(`one_stream,gelu_approx` = attention and GELU before the CPU-stream split).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: mlx_edit -> OpenBLAS before mlx)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from mlx_edit.sampling.compiled import make_step, step_dt  # noqa: E402
from mlx_edit.sampling.latents import image_ids, text_ids  # noqa: E402
from mlx_edit.models import flux, layers  # noqa: E402
from mlx_edit.models.flux import FluxConfig, FluxTransformer  # noqa: E402
from mlx_edit.weights.core import load_into  # noqa: E402
from mlx_edit.weights.flux import DIFFUSERS_RULES  # noqa: E402

sys.path.insert(0, str(common.REPO_ROOT / "scripts"))


# ---------------------------------------------------------------- variants
# Each replaces one helper that the model calls (looked up at call time), in this process
# only: proposed changes to measure side by side, or the code as it was before a change.

VARIANTS = {
    # before the CPU-stream split (attention/GELU on one stream, as up to commit 92c8058)
    "one_stream": (layers, "cpu_streams", lambda: []),
    # before gelu_tanh: MLX's nn.gelu_approx (tanh and pow, one stream)
    "gelu_approx": (flux, "gelu_tanh", nn.gelu_approx),
}


@contextlib.contextmanager
def applied(names: str):
    """Temporarily apply the comma-separated VARIANTS."""
    saved = []
    for name in [n for n in names.split(",") if n]:
        owner, attr, fn = VARIANTS[name]
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, fn)
    try:
        yield
    finally:
        for owner, attr, fn in reversed(saved):
            setattr(owner, attr, fn)


def profile(run) -> str:
    """Seconds per op category of one eager forward, each op evaluated on its own."""
    acc: dict[str, float] = {}

    def timed(cat, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            mx.eval([x for x in a if isinstance(x, mx.array)])  # pending work: "other"
            t1 = time.perf_counter()
            out = fn(*a, **kw)
            mx.eval(out)
            acc["other"] = acc.get("other", 0.0) + t1 - t0
            acc[cat] = acc.get(cat, 0.0) + time.perf_counter() - t1
            return out
        return wrapper

    hooks = [(nn.Linear, "__call__", "linear"), (nn.QuantizedLinear, "__call__", "linear"),
             (nn.RMSNorm, "__call__", "qk rms_norm"), (flux, "attention", "attention"),
             (flux, "apply_rope", "rope"), (flux, "modulate", "layer_norm+modulate"),
             (flux, "gelu_tanh", "gelu")]
    saved = [(o, a, getattr(o, a)) for o, a, _ in hooks]
    for o, a, cat in hooks:
        setattr(o, a, timed(cat, getattr(o, a)))
    try:
        t0 = time.perf_counter()
        run()
        total = time.perf_counter() - t0
    finally:
        for o, a, fn in saved:
            setattr(o, a, fn)
    acc["other"] = acc.get("other", 0.0) + total - sum(acc.values())
    rows = [[k, f"{v:.3f}", f"{v / total:.0%}"] for k, v in sorted(acc.items(), key=lambda x: -x[1])]
    return common.table(rows, ["op (eager, evaluated one by one)", "s", "share"])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="flux1", choices=("flux1", "flux2"),
                    help="flux2: FLUX.2 [klein] transformer (bench_flux2.py; tiny|wide)")
    ap.add_argument("--preset", default="wide", choices=("tiny", "small", "wide"))
    ap.add_argument("--image-tokens", type=int, default=1024)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--quantize", type=int, choices=(4, 8))
    ap.add_argument("--compare", default="diffusers,mflux")
    ap.add_argument("--double", type=int, default=1, help="double (joint) blocks")
    ap.add_argument("--single", type=int, default=2, help="single blocks")
    ap.add_argument("--compile", action="store_true", help="also time the compiled step")
    ap.add_argument("--variant", default="", help=f"comma list of {sorted(VARIANTS)}; ';' separates sets")
    ap.add_argument("--profile", action="store_true", help="time op categories (eager)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def grid(n: int) -> tuple[int, int]:
    """Token grid (h, w), h * w = n, as square as possible."""
    h = int(math.isqrt(n))
    while n % h:
        h -= 1
    return h, n // h


def forward_flops(cfg: FluxConfig, n_img: int, n_txt: int) -> tuple[float, float]:
    """(linear FLOP, attention FLOP) of one forward, batch 1 (2 FLOP per multiply-add)."""
    h, m, L = cfg.hidden_size, cfg.mlp_hidden, n_img + n_txt
    lin = 2 * n_img * cfg.in_channels * h + 2 * n_txt * cfg.joint_attention_dim * h
    lin += 2 * n_img * h * cfg.out_channels
    lin += cfg.num_layers * 2 * L * (4 * h * h + 2 * h * m)  # per-stream qkv, proj, MLP
    lin += cfg.num_single_layers * 2 * L * (h * (3 * h + m) + (h + m) * h)
    attn = (cfg.num_layers + cfg.num_single_layers) * 4 * L * L * h
    return float(lin), float(attn)


def build_reference(preset: str, n_double: int, n_single: int, seed: int, dtype: str):
    """(diffusers model, its config dict) with the preset's widths and the given depth."""
    import torch
    import make_tiny_checkpoint as mtc

    cfg = mtc.configs(preset, 0)["transformer"]
    cfg.update(num_layers=n_double, num_single_layers=n_single)
    model = mtc.make_component("transformer", cfg, seed)
    return (model if dtype == "float32" else model.to(getattr(torch, dtype))), cfg


def to_ours(model, cfg: dict, dtype: str, quantize: int | None) -> FluxTransformer:
    """Our transformer with the reference's weights, through the strict diffusers key map."""
    import torch

    tensors = {k: mx.array(v.detach().to(torch.float32).numpy())
               for k, v in model.state_dict().items()}
    ours = load_into(FluxTransformer(FluxConfig.from_dict(cfg)), tensors, DIFFUSERS_RULES,
                     getattr(mx, dtype), name="transformer")
    if quantize:
        from mlx_edit.weights.quantize import quantize_transformer

        quantize_transformer(ours, quantize)
        mx.eval(ours.parameters())
    return ours


def make_inputs(cfg: FluxConfig, n_img: int, n_txt: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    h, w = grid(n_img)
    return {
        "img": rng.standard_normal((1, n_img, cfg.in_channels), dtype=np.float32),
        "txt": rng.standard_normal((1, n_txt, cfg.joint_attention_dim), dtype=np.float32),
        "pooled": rng.standard_normal((1, cfg.pooled_projection_dim), dtype=np.float32),
        "timestep": np.array([0.5], dtype=np.float32),
        "guidance": np.array([30.0], dtype=np.float32),
        "img_ids": np.array(image_ids(h, w)), "txt_ids": np.array(text_ids(n_txt)),
        "grid": (h, w),
    }


def runner_ours(model: FluxTransformer, inp: dict, dtype: str, compiled: bool):
    """A no-argument function running one evaluated forward (or compiled step)."""
    dt = getattr(mx, dtype)
    a = {k: mx.array(v) for k, v in inp.items() if k != "grid"}
    img, txt, pooled = a["img"].astype(dt), a["txt"].astype(dt), a["pooled"].astype(dt)
    rope = model.rope(a["img_ids"], a["txt_ids"])
    g = a["guidance"] if model.config.guidance_embeds else None
    if not compiled:
        def run():
            out = model(img, a["img_ids"], txt, a["txt_ids"], a["timestep"], pooled, g, rope=rope)
            mx.eval(out)
            return out
        return run
    # The compiled step returns latents + dt * velocity; dt = 1 and zero latents give velocity.
    step = make_step(model, compile=True)
    c = model.config.in_channels
    lat, cond = mx.zeros((1, img.shape[1], 64), dtype=dt), img[..., 64:c]
    one = step_dt(0.0, 1.0)

    def run_compiled():
        out = step(lat + img[..., :64], cond, a["img_ids"], txt, a["txt_ids"], a["timestep"],
                   pooled, g, rope, one) - img[..., :64]
        mx.eval(out)
        return out
    return run_compiled


def runner_diffusers(model, inp: dict, dtype: str):
    import torch

    dt = getattr(torch, dtype)
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inp.items() if k != "grid"}

    def run():
        with torch.inference_mode():
            return model(hidden_states=t["img"].to(dt), encoder_hidden_states=t["txt"].to(dt),
                         pooled_projections=t["pooled"].to(dt), timestep=t["timestep"].to(dt),
                         img_ids=t["img_ids"], txt_ids=t["txt_ids"],
                         guidance=t["guidance"].to(dt), return_dict=False)[0]
    return run


def runner_mflux(cfg: dict, inp: dict, dtype: str, quantize: int | None):
    """mflux's FLUX.1 Fill transformer at the same depth, or None when not importable."""
    try:
        from mflux.models.common.config.model_config import ModelConfig
        from mflux.models.flux.model.flux_transformer.transformer import Transformer
    except Exception as e:  # ImportError, or its CUDA MLX failing to load
        print(f"mflux: not installed ({type(e).__name__}: {e})")
        return None
    import mlx.nn as nn

    dt = getattr(mx, dtype)
    ModelConfig.precision = dt  # mflux reads its compute dtype from this class attribute
    model = Transformer(ModelConfig.dev_fill(), cfg["num_layers"], cfg["num_single_layers"])
    model.set_dtype(dt)
    if quantize:
        nn.quantize(model, 64, quantize)
    mx.eval(model.parameters())
    h, w = inp["grid"]
    config = types.SimpleNamespace(
        scheduler=types.SimpleNamespace(sigmas=mx.array([0.5, 0.0])), num_train_steps=1000,
        precision=dt, guidance=30.0, height=16 * h, width=16 * w)
    img, txt = mx.array(inp["img"]).astype(dt), mx.array(inp["txt"]).astype(dt)
    pooled = mx.array(inp["pooled"]).astype(dt)

    def run():
        out = model(0, config, img, txt, pooled)
        mx.eval(out)
        return out
    return run


def rel_err(ours, ref) -> float:
    ours = np.array(ours.astype(mx.float32))
    ref = ref.float().numpy()
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.family == "flux2":
        import bench_flux2

        if args.preset not in bench_flux2.PRESETS:
            raise SystemExit(f"--family flux2 has presets {sorted(bench_flux2.PRESETS)}")
        return bench_flux2.main(args)
    import torch

    torch.set_num_threads(common.os.cpu_count())
    compare = {c for c in args.compare.split(",") if c}
    print("\n".join(common.machine_header(" ".join(["python"] + sys.argv))))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    ref_model, cfg_dict = build_reference(args.preset, args.double, args.single, args.seed,
                                          args.dtype)
    cfg = FluxConfig.from_dict(cfg_dict)
    ours = to_ours(ref_model, cfg_dict, args.dtype, args.quantize)
    if "diffusers" not in compare:
        del ref_model
    inp = make_inputs(cfg, args.image_tokens, args.text_tokens, args.seed)
    lin, attn = forward_flops(cfg, args.image_tokens, args.text_tokens)
    L = args.image_tokens + args.text_tokens
    print(f"preset {args.preset}: hidden {cfg.hidden_size}, {args.double} double + "
          f"{args.single} single blocks; {args.image_tokens} image + {args.text_tokens} text "
          f"tokens; {args.dtype}{f', q{args.quantize}' if args.quantize else ''}")
    print(f"FLOP per forward: {(lin + attn) / 1e12:.3f} T (linear {lin / 1e12:.3f}, "
          f"attention {attn / 1e12:.3f})")

    shapes = [(4096, 3072, 3072), (L, cfg.hidden_size, 3 * cfg.hidden_size + cfg.mlp_hidden)]
    runs = {"mlx-edit": runner_ours(ours, inp, args.dtype, compiled=False)}
    if args.compile:
        runs["mlx-edit compiled"] = runner_ours(ours, inp, args.dtype, compiled=True)
    for names in [v for v in args.variant.split(";") if v]:  # proposed changes, side by side
        runs[f"mlx-edit +{names}"] = with_variants(runs["mlx-edit"], names)
    if "diffusers" in compare:
        runs["diffusers"] = runner_diffusers(ref_model, inp, args.dtype)
    if "mflux" in compare:
        fn = runner_mflux(cfg_dict, inp, args.dtype, args.quantize)
        if fn is not None:
            runs["mflux"] = fn
    outputs, times, gemm = measure(runs, args.reps, shapes)
    if args.profile:
        print(profile(runs["mlx-edit"]))
    report(args, runs, outputs, times, gemm, shapes, lin + attn)
    return 0


def with_variants(run, names: str):
    def patched():
        with applied(names):
            return run()
    return patched


def measure(runs: dict, reps: int, shapes) -> tuple[dict, dict, list[float]]:
    """Warm up each implementation once, then `reps` rounds of [GEMM rate, each run]:
    interleaved, so a change in the machine's load hits every implementation alike."""
    outputs, times, gemm = {}, {name: [] for name in runs}, []
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    for name, fn in runs.items():
        outputs[name] = fn()
    print(f"mlx-edit activations peak: {(mx.get_peak_memory() - base) / 1e9:.2f} GB")
    for _ in range(reps):
        gemm.append(max(common.mlx_gemm_rate(*s, reps=1) for s in shapes))
        for name, fn in runs.items():
            times[name] += common.median_time(fn, reps=1, warmup=0)
    return outputs, times, gemm


def report(args, runs, outputs, times, gemm, shapes, flop: float) -> None:
    ceiling = common.med(gemm)
    rows = []
    for name, ts in times.items():
        rate = flop / common.med(ts) / 1e9
        fracs = [flop / t / 1e9 / g for t, g in zip(ts, gemm)]
        rows.append([name, f"{common.med(ts):.3f}", f"{min(ts):.3f}", f"{rate:.1f}",
                     f"{common.med(fracs):.2f}"])
    print(common.table(rows, ["implementation", "median s", "min s", "GFLOP/s",
                              "of ceiling (per round)"]))
    print("MLX GEMM GFLOP/s per round, best of " + ", ".join(f"{m}x{k}x{n}" for m, k, n in shapes)
          + ": " + " ".join(f"{g:.1f}" for g in gemm) + f" (median {ceiling:.1f})")
    print(f"torch GEMM GFLOP/s 4096x3072x3072: {common.torch_gemm_rate(4096, 3072, 3072):.1f}")
    if "diffusers" in outputs:
        for name in [n for n in outputs if n.startswith("mlx-edit")]:
            print(f"{name} vs diffusers: rel err {rel_err(outputs[name], outputs['diffusers']):.2e}")
    ours = "mlx-edit compiled" if args.compile else "mlx-edit"
    ratio = {}
    for k in ("diffusers", "mflux"):  # median of per-round ratios (robust to load drift)
        ratio[k] = (f"{common.med([a / b for a, b in zip(times[ours], times[k])]):.2f}"
                    if k in times else "n/a")
    frac = common.med([flop / t / 1e9 / g for t, g in zip(times[ours], gemm)])
    print(f"ratio mlx-edit/diffusers: {ratio['diffusers']}  ratio mlx-edit/mflux: "
          f"{ratio['mflux']}  fraction of matmul ceiling: {frac:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
