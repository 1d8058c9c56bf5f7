"""Parity harness, MLX side: check mlx-edit against a diffusers/transformers reference dump.

`scripts/parity_reference.py` (torch; CUDA or CPU) writes one safetensors file holding the
inputs it used and every reference output (layout in that script's docstring). Here the
same weights are loaded in MLX, fed the SAME arrays (token ids, images, injected noise;
the VAE posterior mode on both sides) and each tensor is compared:

    relative error = max|ours - ref| / max|ref|

Tolerances (float32 / bfloat16 references): components 1e-4 / 5e-2, pipeline latents after
each step 1e-3 / 5e-2, final image PSNR >= 40 / 30 dB (on the [-1, 1] decode, peak-to-peak
2), token ids exact. `--tolerance-scale F` multiplies the relative tolerances by F and
lowers the PSNR bound by 20 log10 F. This module imports no torch: a dump made on a CUDA
machine can be checked on a Mac.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import click
import mlx.core as mx
import numpy as np
from PIL import Image

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}


@dataclass(frozen=True)
class Tolerances:
    """Max relative error of component outputs and per-step latents; min image PSNR (dB)."""

    component: float
    step: float
    psnr_db: float

    def scaled(self, factor: float) -> Tolerances:
        """Looser (factor > 1) or tighter tolerances; PSNR moves by 20 log10(factor) dB."""
        if factor <= 0:
            raise ValueError(f"tolerance scale must be > 0, got {factor}")
        return Tolerances(self.component * factor, self.step * factor,
                          self.psnr_db - 20 * math.log10(factor))


TOLERANCES = {
    "float32": Tolerances(component=1e-4, step=1e-3, psnr_db=40.0),
    # bf16 (8-bit mantissa): on the tiny VAE torch-bf16 and mlx-bf16 each differ from a
    # float32 run by ~2e-2 relative, so the two differ from each other by up to ~4e-2
    "bfloat16": Tolerances(component=5e-2, step=5e-2, psnr_db=30.0),
}


@dataclass
class Row:
    """One compared tensor. `tolerance` bounds `rel` (None: judged by PSNR instead)."""

    component: str
    shape: tuple[int, ...]
    max_abs: float
    rel: float
    tolerance: float | None
    passed: bool
    psnr: float | None = None
    psnr_min: float | None = None
    seconds: float | None = None
    note: str = ""


def compare(name: str, ours, ref: np.ndarray, tolerance: float | None) -> Row:
    """Row for `ours` (mlx or numpy) against `ref`; fails on shape mismatch or non-finite."""
    a = np.asarray(ours.astype(mx.float32) if isinstance(ours, mx.array) else ours, np.float64)
    b = np.asarray(ref, np.float64)
    if a.shape != b.shape:
        return Row(name, tuple(b.shape), math.inf, math.inf, tolerance, False,
                   note=f"shape {a.shape} != reference {b.shape}")
    if a.size == 0:
        return Row(name, b.shape, 0.0, 0.0, tolerance, True)
    max_abs = float(np.max(np.abs(a - b)))
    scale = float(np.max(np.abs(b)))
    rel = max_abs / scale if scale > 0 else max_abs
    finite = bool(np.isfinite(a).all())
    ok = finite and (tolerance is None or rel <= tolerance)
    return Row(name, b.shape, max_abs, rel, tolerance, ok, note="" if finite else "non-finite")


def psnr(ours: np.ndarray, ref: np.ndarray, peak_to_peak: float = 2.0) -> float:
    """PSNR in dB of images nominally in [-1, 1] (inf when identical)."""
    mse = float(np.mean((np.asarray(ours, np.float64) - np.asarray(ref, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak_to_peak**2 / mse)


def read_reference(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(arrays, metadata) of a reference dump. Raises ValueError if it is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors reference ({e})") from None
    if not meta.get("format", "").startswith("mlx-edit parity reference"):
        raise ValueError(f"{path}: not an mlx-edit parity reference (no 'format' metadata); "
                         "make one with scripts/parity_reference.py")
    return arrays, meta


class _Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def _timed(row: Row, timer: _Timer) -> Row:
    return replace(row, seconds=timer.seconds)


def _text_rows(ref: dict, meta: dict, root: Path, dtype: mx.Dtype, tol: Tolerances) -> list[Row]:
    from mlx_edit.editing.text import ClipTokenizer, T5Tokenizer
    from mlx_edit.weights.sources import component_dir
    from mlx_edit.weights.text import load_clip_text, load_t5

    prompt, msl = meta["prompt"], int(meta["max_sequence_length"])
    clip_tok = ClipTokenizer.from_folder(component_dir(root, "tokenizer"))
    t5_tok = T5Tokenizer.from_folder(component_dir(root, "tokenizer_2"))
    rows = [compare("tokens.clip", clip_tok(prompt), ref["input.clip_ids"], 0.0),
            compare("tokens.t5", t5_tok(prompt, max_length=msl), ref["input.t5_ids"], 0.0)]
    clip = load_clip_text(component_dir(root, "text_encoder"), dtype)
    with _Timer() as t:
        _, pooled = clip(mx.array(ref["input.clip_ids"]))
        mx.eval(pooled)
    rows.append(_timed(compare("clip.pooled", pooled, ref["clip.pooled"], tol.component), t))
    del clip
    t5 = load_t5(component_dir(root, "text_encoder_2"), dtype)
    with _Timer() as t:
        hidden = t5(mx.array(ref["input.t5_ids"]))
        mx.eval(hidden)
    rows.append(_timed(compare("t5.hidden", hidden, ref["t5.hidden"], tol.component), t))
    del t5
    mx.clear_cache()
    return rows


def _model_rows(pipe, ref: dict, tol: Tolerances) -> list[Row]:
    """VAE encode/decode and one transformer forward, on the pipeline's own modules."""
    dtype = pipe.dtype
    rows = []
    with _Timer() as t:
        mean = pipe.vae.encode_mean(mx.array(ref["input.vae_image"]).astype(dtype))
        mx.eval(mean)
    rows.append(_timed(compare("vae.encode_mean", mean, ref["vae.encode_mean"], tol.component), t))
    with _Timer() as t:
        image = pipe.vae.decode(mx.array(ref["input.vae_latents"]).astype(dtype))
        mx.eval(image)
    rows.append(_timed(compare("vae.decode", image, ref["vae.decode"], tol.component), t))
    k = "input.transformer."
    x = {name[len(k):]: mx.array(a) for name, a in ref.items() if name.startswith(k)}
    guidance = x["guidance"] if pipe.transformer.config.guidance_embeds else None
    with _Timer() as t:
        out = pipe.transformer(x["img"].astype(dtype), x["img_ids"], x["txt"].astype(dtype),
                               x["txt_ids"], x["timestep"], x["pooled"].astype(dtype), guidance)
        mx.eval(out)
    rows.append(_timed(compare("transformer.forward", out, ref["transformer.forward"],
                               tol.component), t))
    return rows


def _pipeline_rows(pipe, ref: dict, meta: dict, case: dict, tol: Tolerances) -> list[Row]:
    """Run one reference pipeline case through FluxFill.prepare / steps / decode."""
    name = case["name"]
    mask = ref["input.mask"].astype(np.float32) / 255.0
    with _Timer() as t:
        job = pipe.prepare(
            Image.fromarray(ref["input.image"]), mask, mask, meta["prompt"],
            steps=int(meta["steps"]), guidance=float(meta["guidance"]), seed=int(meta["seed"]),
            num_images=int(case["num_images"]), strength=float(case["strength"]),
            crop_to_mask=False, prompt_2=None,
            max_sequence_length=int(meta["max_sequence_length"]),
            noise=mx.array(ref[f"{name}.noise"]),
        )
        steps = list(pipe.steps(job))
    expected = sum(1 for k in ref if k.startswith(f"{name}.latents.step"))
    rows = []
    if len(steps) != expected:
        rows.append(Row(f"{name}.steps", (expected,), math.inf, math.inf, 0.0, False,
                        note=f"ran {len(steps)} steps, reference has {expected}"))
    for i, latents in steps:
        key = f"{name}.latents.step{i}"
        if key in ref:
            rows.append(compare(key, latents, ref[key], tol.step))
    if rows:
        rows[-1].seconds = t.seconds
    w, h = job.plan.model_size
    with _Timer() as t:
        image = np.array(pipe.decode(job.latents, w, h))
    row = compare(f"{name}.image", image, ref[f"{name}.image"], None)
    value = psnr(image, ref[f"{name}.image"]) if row.shape == image.shape else -math.inf
    row.psnr, row.psnr_min, row.seconds = value, tol.psnr_db, t.seconds
    row.passed = row.passed and value >= tol.psnr_db
    return rows + [row]


def run_parity(
    ref_path: str | Path,
    model_dir: str | Path,
    tolerance_scale: float = 1.0,
    *,
    components: bool = True,
    pipeline: bool = True,
) -> list[Row]:
    """Compare mlx-edit on `model_dir` with the reference dump `ref_path`.

    Runs in the dtype the reference records (float32 or bfloat16). components: token ids,
    CLIP, T5, VAE, transformer rows (when the dump has them: not `--pipeline-only`);
    pipeline: every recorded case (per-step latents and the final image). Returns the rows in that order. Raises ValueError for a file that is
    not a reference dump, WeightLoadError for an unusable model folder.
    """
    from mlx_edit.editing.pipeline import FluxFill

    ref, meta = read_reference(ref_path)
    components = components and meta.get("components", "true") == "true"
    dtype_name = meta.get("dtype", "float32")
    if dtype_name not in TOLERANCES:
        raise ValueError(f"{ref_path}: reference dtype {dtype_name!r} is not one of "
                         f"{sorted(TOLERANCES)}")
    tol = TOLERANCES[dtype_name].scaled(tolerance_scale)
    root = Path(model_dir)
    rows: list[Row] = []
    if components:
        rows += _text_rows(ref, meta, root, DTYPES[dtype_name], tol)
    pipe = FluxFill.from_pretrained(root, DTYPES[dtype_name])
    if components:
        rows += _model_rows(pipe, ref, tol)
    if pipeline:
        for case in json.loads(meta["cases"]):
            rows += _pipeline_rows(pipe, ref, meta, case, tol)
    return rows


def _fmt(v: float | None, spec: str = ".2e") -> str:
    if v is None:
        return ""
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return "0" if v == 0 else format(v, spec)


def format_table(rows: list[Row]) -> str:
    """Plain-text table: component, shape, max abs err, rel err, tolerance, PSNR, time, result."""
    head = ("component", "shape", "max abs err", "rel err", "tolerance", "PSNR dB", "time s",
            "result")
    lines = []
    for r in rows:
        if r.tolerance is None:
            tol = f"PSNR>={r.psnr_min:g}"
        else:
            tol = "exact" if r.tolerance == 0 else _fmt(r.tolerance, ".1e")
        lines.append((r.component, "x".join(map(str, r.shape)), _fmt(r.max_abs), _fmt(r.rel),
                      tol, _fmt(r.psnr, ".1f"), _fmt(r.seconds, ".2f"),
                      ("pass" if r.passed else "FAIL") + (f" ({r.note})" if r.note else "")))
    widths = [max(len(h), *(len(ln[i]) for ln in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*ln) for ln in lines]
    return "\n".join(s.rstrip() for s in out)


def _finite(value: float) -> float:
    if not math.isfinite(value):  # FloatRange lets NaN through (its comparisons are False)
        raise click.BadParameter(f"{value} is not a finite number",
                                 param_hint="'--tolerance-scale'")
    return value


@click.command("parity")
@click.argument("ref", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "model_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The FLUX.1 Fill folder the reference was made from.")
@click.option("--tolerance-scale", type=click.FloatRange(min=0, max=1e6, min_open=True),
              default=1.0, callback=lambda ctx, p, v: _finite(v),
              show_default=True, help="Multiply every relative tolerance by this factor.")
def parity_command(ref: Path, model_dir: Path, tolerance_scale: float) -> None:
    """Compare mlx-edit with a diffusers reference dump REF (scripts/parity_reference.py).

    Prints one row per tensor; exits with status 1 when any row fails.
    """
    from mlx_edit.weights.core import WeightLoadError

    t0 = time.perf_counter()
    try:
        _, meta = read_reference(ref)
        rows = run_parity(ref, model_dir, tolerance_scale)
    except (ValueError, WeightLoadError, KeyError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"reference: {ref} ({meta.get('dtype')} on {meta.get('device')}; torch "
               f"{meta.get('torch')}, diffusers {meta.get('diffusers')}, transformers "
               f"{meta.get('transformers')}); size {meta.get('size')}, {meta.get('steps')} steps,"
               f" guidance {meta.get('guidance')}, T5 length {meta.get('max_sequence_length')}")
    click.echo(format_table(rows))
    failed = [r.component for r in rows if not r.passed]
    click.echo(f"{len(rows) - len(failed)}/{len(rows)} passed in "
               f"{time.perf_counter() - t0:.1f} s" + (f"; FAILED: {', '.join(failed)}"
                                                      if failed else ""))
    if failed:
        click.get_current_context().exit(1)
