"""Size and quality of 8- and 4-bit checkpoints (mlx_edit/quantize.py policy).

    python benchmarks/bench_quantize.py [--small DIR] [--wide DIR] [--work DIR]
        [--skip-wide-quality]

1. Bytes per component at bf16 / q8 / q4 (group 64, scales in bf16) for the `small` and
   `wide` fixtures and the full FLUX.1 Fill shapes. Models are built lazily from their
   configs and never evaluated, so the 12B transformer costs no memory here.
2. Quality against float32 on the fixtures: relative error max|q - f32| / max|f32| of one
   transformer forward (quantized at load), and PSNR of a 4-step inpaint (converted
   folders: transformer and T5 quantized, paste-back off so the whole window counts).

MLX's quantized matmul runs at ~1 GFLOP/s on this CPU backend (50-180 for float32), so
the `wide` pipeline runs with *simulated* quantization: each quantized layer replaced by
a float Linear holding its dequantized weights. That is the same arithmetic up to float
summation order; the table shows both paths on `small` and one wide forward, with the
difference between them. Fixture folders default to $MLX_EDIT_SMALL_CKPT /
$MLX_EDIT_WIDE_CKPT, else they are built with scripts/make_tiny_checkpoint.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx_edit  # noqa: F401  (first: loads OpenBLAS before mlx)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map_with_path

from mlx_edit.editing import pipeline as pl
from mlx_edit.editing import prompts
from mlx_edit.sampling.latents import image_ids, text_ids
from mlx_edit.models.clip import CLIPTextConfig, CLIPTextModel
from mlx_edit.models.flux import FluxConfig, FluxTransformer
from mlx_edit.models.t5 import T5Config, T5Encoder
from mlx_edit.models.vae import AutoencoderKL, VAEConfig
from mlx_edit.weights.quantize import COMPONENTS, component_bits, model_nbytes, quantize_component
from mlx_edit.weights.quantize import quantize_transformer
from mlx_edit.weights.convert import convert_checkpoint
from mlx_edit.weights.core import read_config
from mlx_edit.weights.flux import load_transformer

REPO = Path(__file__).resolve().parents[1]
BUILDERS = {
    "transformer": lambda d: FluxTransformer(FluxConfig.from_dict(d)),
    "vae": lambda d: AutoencoderKL(VAEConfig.from_dict(d)),
    "text_encoder": lambda d: CLIPTextModel(CLIPTextConfig.from_dict(d)),
    "text_encoder_2": lambda d: T5Encoder(T5Config.from_dict(d)),
}


def sizes(configs: dict[str, dict]) -> dict[str, dict[str, int]]:
    """{component: {"bf16"|"q8"|"q4": bytes}} from configs, without allocating weights."""
    out: dict[str, dict[str, int]] = {}
    for name in COMPONENTS:
        row = {"bf16": model_nbytes(BUILDERS[name](configs[name]), mx.bfloat16)}
        for bits in (8, 4):
            model = BUILDERS[name](configs[name])
            b = component_bits(bits)[name]
            if b:
                quantize_component(model, name, b, 64)
            row[f"q{bits}"] = model_nbytes(model, mx.bfloat16)
        out[name] = row
    return out


def print_sizes(label: str, table: dict) -> None:
    print(f"\n{label}: bytes per component (GB = 1e9 B; VAE and CLIP stay bf16 by default)")
    print(f"{'component':16} {'bf16':>16} {'q8':>16} {'q4':>16}   q8/bf16 q4/bf16")
    total = {k: 0 for k in ("bf16", "q8", "q4")}
    for name, row in table.items():
        total = {k: total[k] + row[k] for k in total}
        print(f"{name:16} " + " ".join(f"{row[k]:>16,}" for k in ("bf16", "q8", "q4"))
              + f"   {row['q8'] / row['bf16']:.3f}   {row['q4'] / row['bf16']:.3f}")
    print(f"{'total':16} " + " ".join(f"{total[k]:>16,}" for k in ("bf16", "q8", "q4"))
          + "   (" + ", ".join(f"{k} {total[k] / 1e9:.2f} GB" for k in total) + ")")


def folder_configs(folder: Path) -> dict[str, dict]:
    return {name: read_config(folder / name) for name in COMPONENTS}


def dequantize_layers(model: nn.Module) -> nn.Module:
    """Replace each QuantizedLinear by a float Linear with its dequantized weights."""

    def swap(_path, m):
        if not isinstance(m, nn.QuantizedLinear):
            return m
        w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
        lin = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
        lin.weight = w
        if "bias" in m:
            lin.bias = m.bias
        return lin

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(),
                                            is_leaf=nn.Module.is_module))
    mx.eval(model.parameters())
    return model


def rel_err(a: mx.array, b: mx.array) -> float:
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


def forward_errors(folder: Path, h: int, w: int, n_txt: int, real: bool = True) -> dict:
    """Relative error of one forward at q8/q4 (real kernels and/or simulated) vs float32."""
    ref = load_transformer(folder / "transformer", mx.float32)
    cfg = ref.config
    rng = np.random.default_rng(0)
    args = (mx.array(rng.standard_normal((1, h * w, cfg.in_channels)), mx.float32),
            image_ids(h, w),
            mx.array(rng.standard_normal((1, n_txt, cfg.joint_attention_dim)), mx.float32),
            text_ids(n_txt), mx.array([0.7]),
            mx.array(rng.standard_normal((1, cfg.pooled_projection_dim)), mx.float32),
            mx.array([30.0]))
    out_ref = ref(*args)
    mx.eval(out_ref)
    del ref
    res = {}
    for bits in (8, 4):
        model = load_transformer(folder / "transformer", mx.float32)
        quantize_transformer(model, bits)
        mx.eval(model.parameters())
        out_q = None
        if real:
            t0 = time.perf_counter()
            out_q = model(*args)
            mx.eval(out_q)
            res[f"q{bits}_s"] = time.perf_counter() - t0
            res[f"q{bits}"] = rel_err(out_q, out_ref)
        out_sim = dequantize_layers(model)(*args)
        res[f"q{bits}_sim"] = rel_err(out_sim, out_ref)
        if out_q is not None:
            res[f"q{bits}_sim_vs_real"] = rel_err(out_sim, out_q)
        del model
    return res


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def inpaint(folder: Path, size: int, simulate: bool) -> np.ndarray:
    """A 4-step inpaint of the astronaut (size x size), paste-back off, seed 0."""
    from skimage import data
    from PIL import Image

    image = np.asarray(Image.fromarray(data.astronaut()).resize((size, size)))
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    real_load_t5 = prompts.load_t5
    if simulate:  # T5 is loaded at encode time: dequantize it there
        prompts.load_t5 = lambda *a, **k: dequantize_layers(real_load_t5(*a, **k))
    try:
        pipe = pl.FluxFill.from_pretrained(folder, mx.float32)
        if simulate:
            dequantize_layers(pipe.transformer)
        out = pipe.inpaint(image, mask, "an astronaut holding a red apple", steps=4, seed=0,
                           paste_back=False, max_sequence_length=32)[0]
    finally:
        prompts.load_t5 = real_load_t5
    return np.asarray(out)


def pipeline_psnr(source: Path, work: Path, size: int, simulate: bool) -> dict:
    ref = inpaint(source, size, simulate=False)
    res = {}
    for bits in (8, 4):
        dest = work / f"{source.name}-q{bits}"
        shutil.rmtree(dest, ignore_errors=True)
        convert_checkpoint(source, dest, dtype="float32", quantize=bits)
        res[f"q{bits}"] = psnr(inpaint(dest, size, simulate), ref)
        if simulate is False and size <= 128:
            res[f"q{bits}_sim"] = psnr(inpaint(dest, size, True), ref)
        shutil.rmtree(dest, ignore_errors=True)
    return res


def fixture(name: str, given: Path | None, work: Path) -> Path:
    given = given or (Path(os.environ[f"MLX_EDIT_{name.upper()}_CKPT"])
                      if os.environ.get(f"MLX_EDIT_{name.upper()}_CKPT") else None)
    if given:
        return given
    out = work / name
    if not (out / "model_index.json").is_file():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_checkpoint.py"),
                        str(out), "--preset", name, "--overwrite"], check=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=Path)
    ap.add_argument("--wide", type=Path)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--skip-wide-quality", action="store_true")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    work.mkdir(parents=True, exist_ok=True)
    small = fixture("small", args.small, work)
    wide = fixture("wide", args.wide, work)

    print_sizes("FLUX.1 Fill (full shapes, from the default configs)",
                sizes({c: {} for c in COMPONENTS}))
    print_sizes("wide fixture", sizes(folder_configs(wide)))
    print_sizes("small fixture", sizes(folder_configs(small)))

    print("\nrelative error of one transformer forward vs float32 (quantized at load)")
    e = forward_errors(small, 8, 8, 16)
    print(f"small (64 img + 16 txt tokens): q8 {e['q8']:.2e}  q4 {e['q4']:.2e}  "
          f"(simulated: q8 {e['q8_sim']:.2e} q4 {e['q4_sim']:.2e}; simulated vs real "
          f"{e['q8_sim_vs_real']:.1e} / {e['q4_sim_vs_real']:.1e})")
    if not args.skip_wide_quality:
        e = forward_errors(wide, 4, 4, 8)
        print(f"wide (16 img + 8 txt tokens): q8 {e['q8']:.2e}  q4 {e['q4']:.2e}  "
              f"(simulated: q8 {e['q8_sim']:.2e} q4 {e['q4_sim']:.2e}; simulated vs real "
              f"{e['q8_sim_vs_real']:.1e} / {e['q4_sim_vs_real']:.1e}; real q4 forward "
              f"{e['q4_s']:.0f} s)")

    print("\nPSNR (dB) of a 4-step inpaint vs float32 (converted folders, transformer + T5)")
    p = pipeline_psnr(small, work, 128, simulate=False)
    print(f"small, 128x128: q8 {p['q8']:.1f}  q4 {p['q4']:.1f}  "
          f"(simulated: q8 {p['q8_sim']:.1f}  q4 {p['q4_sim']:.1f})")
    if not args.skip_wide_quality:
        p = pipeline_psnr(wide, work, 128, simulate=True)
        print(f"wide, 128x128 (simulated): q8 {p['q8']:.1f}  q4 {p['q4']:.1f}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
