"""The benchmark scripts run end to end and print their summary line (tiny shapes).

They time nothing here (timings belong in benchmarks/RESULTS.md, measured on a quiet
machine); the point is that a change to the library does not leave a benchmark broken,
as happened when the tiled VAE gained `banded` and bench_vae's wrapper did not.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest


def _stdout(repo_root, script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(repo_root / "benchmarks" / script), *args],
                          cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def _run(repo_root, script: str, *args: str) -> str:
    return _stdout(repo_root, script, *args).splitlines()[-1]


def test_bench_vae_tiled_whole_and_psnr(repo_root, tiny_mlx):
    last = _run(repo_root, "bench_vae.py", "--model", str(tiny_mlx), "--sizes", "64",
                "--tile", "32", "--psnr", "64", "--whole", "64")
    assert re.fullmatch(r"vae tiled \(float32\): 64 encode peak [\d.]+ GB; "
                        r"64 decode peak [\d.]+ GB \(bound 3 GB\)", last), last


@pytest.mark.parity
def test_bench_transformer_against_diffusers(repo_root):
    last = _run(repo_root, "bench_transformer.py", "--preset", "tiny", "--image-tokens", "64",
                "--text-tokens", "16", "--compare", "diffusers", "--reps", "2")
    m = re.fullmatch(r"ratio mlx-edit/diffusers: ([\d.]+)  ratio mlx-edit/mflux: n/a  "
                     r"fraction of matmul ceiling: ([\d.]+)", last)
    assert m, last
    assert float(m.group(1)) > 0


@pytest.mark.parity
def test_bench_transformer_flux2_against_diffusers(repo_root):
    out = _stdout(repo_root, "bench_transformer.py", "--family", "flux2", "--preset", "tiny",
                  "--image-tokens", "16", "--text-tokens", "8", "--compare", "diffusers",
                  "--reps", "1")
    err = re.search(r"mlx-edit vs diffusers: rel err ([\d.e+-]+)", out)
    assert err and float(err.group(1)) <= 1e-4, out
    assert re.fullmatch(r"ratio mlx-edit/diffusers: [\d.]+  ratio mlx-edit/mflux: n/a  "
                        r"fraction of matmul ceiling: [\d.]+", out.splitlines()[-1]), out


def test_bench_pipeline_phases(repo_root, tiny_mlx):
    last = _run(repo_root, "bench_pipeline.py", "--model", str(tiny_mlx), "--size", "64x64",
                "--steps", "1", "--low-memory")
    assert re.match(r"pipeline 64x64 \(float32, low memory\): load [\d.]+ s, text [\d.]+ s, "
                    r"VAE encode [\d.]+ s, step [\d.]+ s, VAE decode [\d.]+ s; "
                    r"peak [\d.]+ GB", last), last


def test_bench_kontext_ratio(repo_root):
    last = _run(repo_root, "bench_kontext.py", "--preset", "tiny", "--size", "64x64",
                "--text-tokens", "16", "--reps", "1")
    m = re.fullmatch(r"ratio Kontext/Fill per step: ([\d.]+)", last)
    assert m and float(m.group(1)) > 0, last


def test_bench_lora_overhead_line(repo_root):
    last = _run(repo_root, "bench_lora.py", "--hidden", "128", "--image-tokens", "16",
                "--text-tokens", "8", "--ranks", "4", "--counts", "1,2", "--reps", "1")
    assert re.fullmatch(r"lora rank 4 x1 unfused overhead: -?[\d.]+%  \(FLOP share [\d.]+%\)",
                        last), last


def test_bench_load_check_overhead_line(repo_root, tiny_mlx):
    last = _run(repo_root, "bench_load_check.py", "--ckpt", str(tiny_mlx), "--reps", "1",
                "--dtypes", "float32")
    assert re.fullmatch(r"load check overhead: -?[\d.]+% \(float32\)", last), last


def test_bench_group_norm_line(repo_root):
    last = _run(repo_root, "bench_group_norm.py", "--size", "16x24", "--reps", "1")
    assert re.fullmatch(r"group_norm: 16x24x32 blocked [\d.]+ s, plain [\d.]+ s, ratio [\d.]+",
                        last), last


def test_bench_lora_flux2_overhead_line(repo_root):
    last = _run(repo_root, "bench_lora.py", "--family", "flux2", "--hidden", "128",
                "--image-tokens", "16", "--text-tokens", "8", "--ranks", "4", "--counts", "1",
                "--reps", "1")
    assert re.fullmatch(r"lora rank 4 x1 unfused overhead: -?[\d.]+%  \(FLOP share [\d.]+%\)",
                        last), last


def test_bench_flux2_kv_ratios(repo_root):
    out = _stdout(repo_root, "bench_flux2_kv.py", "--preset", "tiny", "--image-tokens", "16",
                  "--ref-tokens", "8", "--text-tokens", "4", "--refs", "1,2", "--reps", "1")
    for r in (1, 2):
        assert re.search(rf"^kv {r} refs: later/plain [\d.]+  first/plain [\d.]+  "
                         r"\(4-step edit: [\d.]+\)$", out, re.M), out


@pytest.mark.parity  # bench_cache builds its weights with diffusers
def test_bench_cache_reports_evaluations(repo_root):
    last = _run(repo_root, "bench_cache.py", "--preset", "tiny", "--image-tokens", "16",
                "--text-tokens", "8", "--steps", "6", "--cache", "mag:0.24,retention=0")
    m = re.fullmatch(r"cache mag:0.24,retention=0: evals (\d)/6 speed-up [\d.]+ psnr "
                     r"([\d.]+) dB", last)
    assert m, last
    assert int(m.group(1)) < 6


def test_bench_cache_flux2_reports_evaluations(repo_root):
    last = _run(repo_root, "bench_cache.py", "--family", "flux2", "--preset", "tiny",
                "--image-tokens", "16", "--text-tokens", "8", "--steps", "4", "--cache", "mag:0.12")
    assert re.fullmatch(r"cache mag:0.12: evals 2/4 speed-up [\d.]+ psnr [\d.]+ dB", last), last


def test_bench_lora_and_cache_on_a_klein_folder(repo_root, tmp_path, import_script):
    """--family flux2 --ckpt: the folder's transformer (the wide klein fixture's figures)."""
    folder = import_script("klein_fixtures").build_mlx(tmp_path / "klein", "tiny")
    out = _stdout(repo_root, "bench_lora.py", "--family", "flux2", "--ckpt", str(folder),
                  "--image-tokens", "16", "--text-tokens", "8", "--ranks", "4",
                  "--counts", "1", "--reps", "1")
    assert f"transformer: {folder} (1 double + 1 single blocks, hidden 32)" in out, out
    assert re.search(r"^lora rank 4 x1 unfused overhead: -?[\d.]+%", out, re.M), out
    out = _stdout(repo_root, "bench_cache.py", "--family", "flux2", "--ckpt", str(folder),
                  "--image-tokens", "16", "--text-tokens", "8", "--steps", "4",
                  "--cache", "mag:0.12")
    assert f"{folder}'s transformer, flux2: hidden 32, 1 double + 1 single" in out, out
    assert out.splitlines()[-1].startswith("cache mag:0.12: evals 2/4 "), out


def test_bench_large_tiled_vs_shrunk(repo_root, tiny_mlx):
    last = _run(repo_root, "bench_large.py", "--model", str(tiny_mlx), "--size", "352x224",
                "--max-model-pixels", "65536", "--max-sequence-length", "16")
    m = re.fullmatch(r"large 352x224 inpaint: off .* ratio ([\d.]+); on .* ratio ([\d.]+)", last)
    assert m, last
    assert float(m.group(1)) < 1.0 and float(m.group(2)) == 1.0


def test_bench_ranks_one_process_line(repo_root, tiny_mlx):
    """One process: every window on rank 0, nothing exchanged (mlx.launch: RESULTS.md)."""
    rec = json.loads(_run(repo_root, "bench_ranks.py", str(tiny_mlx)))
    assert rec["ranks"] == 1 and rec["windows_per_rank"] == [rec["windows"]]
    assert rec["windows"] > 1 and rec["bytes_per_step"] == 0
