"""Tiled VAE encode + decode at large sizes: time and peak memory; tiled vs untiled PSNR.

    python benchmarks/bench_vae.py --sizes 2048,4096 [--model DIR] [--dtype float32]
        [--tile PX --overlap PX] [--max-tiles K] [--psnr 512] [--whole 256,512]
        [--family flux1|flux2]

VAE: the `vae/` of a FLUX Fill folder (e.g. a `wide` fixture: the full FLUX VAE config
with random weights) or, without --model, the FLUX.1 (or --family flux2: FLUX.2) VAE
config with MLX's random init.
Input: a real photo (scikit-image's astronaut) resized to each size. Peak memory is MLX's
(`mx.get_peak_memory()`, reset per pass) minus the weights, i.e. the VAE activations; the
host accumulators of the tiled path (float32 output + float64 weights) are listed apart.
--max-tiles K stops each pass after K tiles and extrapolates the time from the tile
count (the memory peak is reached on the first tile: every tile has the same shape and
the accumulators are allocated up front). --psnr S compares tiled and untiled passes at
S x S px, for the photo and for stationary random latents. --whole S times the untiled
passes at S x S px, plain and banded (the CPU backend's bounded im2col scratch). Last line:
`vae tiled: <size> decode peak X GB (bound 3 GB) ...`.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: mlx_edit -> OpenBLAS before mlx)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_edit.editing import tiling  # noqa: E402
from mlx_edit.models.vae import AutoencoderKL, VAEConfig  # noqa: E402


class _Stop(Exception):
    pass


def load(model: str | None, dtype, family: str = "flux1") -> AutoencoderKL:
    if model:
        from mlx_edit.weights.vae import load_vae

        return load_vae(Path(model) / "vae" if (Path(model) / "vae").is_dir() else model, dtype)
    mx.random.seed(0)
    vae = AutoencoderKL(VAEConfig.flux2() if family == "flux2" else VAEConfig())
    vae.set_dtype(dtype)
    mx.eval(vae.parameters())
    return vae


def photo(size: int) -> mx.array:
    """(1, size, size, 3) in [-1, 1]: the astronaut, resized."""
    import skimage.data
    from PIL import Image

    img = Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.BICUBIC)
    return mx.array(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)[None]


def n_tiles(size: int, tile: int, overlap: int, align: int) -> int:
    return len(tiling.tile_starts(size, tile, overlap, align)) ** 2


def timed_pass(fn, vae, x, tile, overlap, max_tiles, total_tiles):
    """Run a tiled pass; returns (result or None, seconds (extrapolated), activations GB)."""
    count = [0]

    class Counting:  # the VAE as tiling sees it, with a tile counter on its passes
        def __getattr__(self, name):  # everything else (config, dtype, banded): the VAE's
            return getattr(vae, name)

        def decode(self, z):
            return self._tile(vae.decode, z)

        def encode_mean(self, images):
            return self._tile(vae.encode_mean, images)

        def _tile(self, f, a):
            count[0] += 1
            if max_tiles and count[0] > max_tiles:
                raise _Stop
            return f(a)

    out, secs, act = measured(lambda: fn(Counting(), x, tile=tile, overlap=overlap))
    done = total_tiles if out is not None else min(max_tiles, total_tiles)
    return out, secs * total_tiles / max(done, 1), act, done


def measured(thunk):
    """(thunk()'s evaluated result, or None when cut short by _Stop; seconds; MLX peak
    memory above what was active before, GB)."""
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    t0 = time.perf_counter()
    out = None
    try:
        out = thunk()
        mx.eval(out)
    except _Stop:
        pass
    return out, time.perf_counter() - t0, (mx.get_peak_memory() - base) / 1e9


def whole_image(vae, size: int) -> list[list[str]]:
    """Untiled encode + decode of the photo at size x size, plain and banded
    (`tiling.scratch_bounded`): seconds, activations GB and bytes per pixel."""
    rows = []
    x = photo(size)
    for label, scope in (("plain", nullcontext), ("banded", lambda: tiling.scratch_bounded(vae))):
        with scope():
            z, enc_s, enc_gb = measured(lambda: vae.encode_mean(x))
            _, dec_s, dec_gb = measured(lambda z=z: vae.decode(z))
        for what, secs, gb in (("encode", enc_s, enc_gb), ("decode", dec_s, dec_gb)):
            rows.append([what, label, f"{size}x{size}", f"{secs:.1f}", f"{gb:.2f}",
                         f"{gb * 1e9 / size**2:,.0f}"])
    return rows


def psnr(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(10 * np.log10((ref.max() - ref.min()) ** 2 / np.mean((x - ref) ** 2)))


def compare_untiled(vae, size: int, tile: int, overlap: int) -> list[list[str]]:
    rows = []
    f = vae.config.scale_factor
    stationary = mx.random.normal((1, size // f, size // f, 16), key=mx.random.key(1))
    x = photo(size)
    with tiling.scratch_bounded(vae):  # the whole-image pass, exact (banded on the CPU)
        z = vae.encode_mean(x)
        refs = [np.array(vae.decode(lat).astype(mx.float32)) for lat in (z, stationary)]
    for name, lat, ref in (("photo latents", z, refs[0]), ("random latents", stationary, refs[1])):
        out = np.array(tiling.decode_tiled(vae, lat, tile, overlap))
        rows.append([f"decode, {name}", f"{size}", f"{tile}/{overlap}", f"{psnr(out, ref):.2f}"])
    zt = np.array(tiling.encode_tiled(vae, x, tile, overlap))
    rows.append(["encode, photo", f"{size}", f"{tile}/{overlap}",
                 f"{psnr(zt, np.array(z.astype(mx.float32))):.2f}"])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2048,4096")
    ap.add_argument("--model")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--tile", type=int, help="px (default: tiling.default_tile)")
    ap.add_argument("--overlap", type=int, help="px (default: a quarter of the tile)")
    ap.add_argument("--max-tiles", type=int, default=0)
    ap.add_argument("--psnr", type=int, default=0, help="size for tiled vs untiled")
    ap.add_argument("--whole", default="", help="sizes for untiled passes, plain and banded")
    ap.add_argument("--family", default="flux1", choices=("flux1", "flux2"),
                    help="VAE config without --model")
    args = ap.parse_args(argv)
    print("\n".join(common.machine_header(" ".join(["python"] + sys.argv))))
    dtype = getattr(mx, args.dtype)
    vae = load(args.model, dtype, args.family)
    f = vae.config.scale_factor
    rows, summary = [], []
    for size in [int(s) for s in args.sizes.split(",") if s]:
        z = None
        for what, fn, decode in (("encode", tiling.encode_tiled, False),
                                 ("decode", tiling.decode_tiled, True)):
            tile = args.tile or tiling.default_tile(dtype.size, decode=decode, config=vae.config)
            overlap = tile // 4 if args.overlap is None else args.overlap
            total = (n_tiles(size // f, tile // f, overlap // f, 1) if decode
                     else n_tiles(size, tile, overlap, f))
            if not decode:
                x_in = photo(size)
            else:  # the encoded photo, or random latents when the encode was cut short
                x_in = z if z is not None else mx.random.normal(
                    (1, size // f, size // f, vae.config.latent_channels), key=mx.random.key(0))
            out, secs, act, done = timed_pass(fn, vae, x_in, tile, overlap, args.max_tiles, total)
            z = out if not decode else z
            host = (20 * size * size if decode else 72 * (size // f) ** 2) / 1e9
            est = tiling.vae_activation_gb(tile, tile, dtype.size, decode, config=vae.config)
            rows.append([what, f"{size}x{size}", f"{tile}/{overlap}", f"{done}/{total}",
                         f"{secs:.0f}" + ("" if done == total else " (extrap.)"),
                         f"{act:.2f}", f"{est:.2f}", f"{host:.2f}"])
            summary.append(f"{size} {what} peak {act:.2f} GB")
    if rows:
        print(common.table(rows, ["pass", "size", "tile/overlap px", "tiles run", "seconds",
                                  "activations GB", "estimate GB", "host acc. GB"]))
    for size in [int(s) for s in args.whole.split(",") if s]:
        print(common.table(whole_image(vae, size), ["untiled", "scratch", "size", "seconds",
                                                    "activations GB", "bytes/px"]))
    if args.psnr:
        tile = args.tile or args.psnr // 2
        overlap = tile // 4 if args.overlap is None else args.overlap
        print(common.table(compare_untiled(vae, args.psnr, tile, overlap),
                           ["tiled vs untiled", "size", "tile/overlap", "PSNR dB"]))
    print(f"vae tiled ({args.dtype}): " + "; ".join(summary)
          + f" (bound {tiling.TILE_BUDGET_GB:.0f} GB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
