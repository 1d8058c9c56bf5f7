"""`mlx-edit serve` under load, and a warm server's edit against a fresh CLI call.

    python benchmarks/bench_serve.py --model DIR [--preset tiny] [--clients 50]
        [--max-queue 8] [--size 96x80] [--steps 2] [--max-sequence-length 16] [--repeats 1]

Starts `mlx-edit serve --model DIR` on 127.0.0.1 (a free port, a fresh prompt cache
folder) as a process, then:
1. 1 + --repeats edits with the same prompt (the later ones skip the text encoders: the
   prompt embeddings are cached), their phase timings printed;
2. load (skipped with --clients 0): --clients concurrent clients each submit one edit
   (retrying after a 429 until accepted) and poll it to the end; counted: accepted, done,
   lost (not done or no PNG), 429s, the most jobs ever waiting (from /v1/health,
   sampled), the server's RSS before and after (memory flat: no per-job leak);
3. the same edit as `mlx-edit inpaint --metadata` run 1 + --repeats times as fresh
   processes (the later ones with warm file caches): the median wall time of the later
   ones against the median of the warm server's later edits (submit to PNG), and the
   phases of each side (the CLI's from its JSON sidecar): what the server removes is the
   process start, the model load and the text encoding.
DIR: a FLUX.1 Fill folder; with --preset and no DIR, the torch-free fixture is built
there first (scripts/make_mlx_checkpoint.py). Last line: `serve: N clients, ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402, F401  (first: mlx_edit -> OpenBLAS before mlx)

import httpx  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from mlx_edit.cli import main; main()"]


def _inputs(size: tuple[int, int], folder: Path) -> tuple[bytes, bytes]:
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize(size)
    mask = np.zeros(size[::-1], np.uint8)
    mask[size[1] // 4: size[1] // 2, size[0] // 4: size[0] // 2] = 255
    img.save(folder / "photo.png")
    Image.fromarray(mask).save(folder / "mask.png")
    return (folder / "photo.png").read_bytes(), (folder / "mask.png").read_bytes()


def _rss_gb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


async def _edit(client, files, options, stats) -> tuple[str, float] | None:
    """Submit (retrying on 429), poll to the end, fetch PNG 0: (state, seconds)."""
    t0 = time.perf_counter()
    form = {"prompt": "a red hat", "options": json.dumps(options)}
    while True:
        r = await client.post("/v1/edits", data=form, files={
            "image": ("p.png", files[0], "image/png"), "mask": ("m.png", files[1], "image/png")})
        if r.status_code != 429:
            break
        stats["429"] += 1
        await asyncio.sleep(0.1)
    if r.status_code != 202:
        return None
    job = r.json()["id"]
    while (s := (await client.get(f"/v1/jobs/{job}")).json())["state"] in ("queued", "running"):
        await asyncio.sleep(0.05)
    if s["state"] == "done":
        png = await client.get(f"/v1/jobs/{job}/images/0")
        Image.open(io.BytesIO(png.content)).load()
    return s["state"], time.perf_counter() - t0, s["timings"]


async def _sample_queue(client, stats, stop: asyncio.Event) -> None:
    while not stop.is_set():
        stats["max_queued"] = max(stats["max_queued"],
                                  (await client.get("/v1/health")).json()["queued"])
        await asyncio.sleep(0.05)


async def _load(url, files, options, clients: int) -> dict:
    stats = {"429": 0, "max_queued": 0}
    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_queue(client, stats, stop))
        try:
            results = await asyncio.gather(*(_edit(client, files, options, stats)
                                             for _ in range(clients)))
        finally:  # the sampler ends before the client closes (also on an error)
            stop.set()
            await sampler
    stats["done"] = sum(1 for r in results if r and r[0] == "done")
    stats["lost"] = clients - stats["done"]
    return stats


def _cli_edit(model: Path, folder: Path, options: dict) -> tuple[float, dict]:
    """Wall seconds of one `mlx-edit inpaint` process and its phase timings (sidecar)."""
    out = folder / "cli-out.png"
    out.unlink(missing_ok=True)
    out.with_suffix(".json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    subprocess.run([*CLI, "inpaint", "--model", str(model), "--image", str(folder / "photo.png"),
                    "--mask", str(folder / "mask.png"), "--prompt", "a red hat",
                    "--steps", str(options["steps"]), "--seed", "0", "--max-sequence-length",
                    str(options["max_sequence_length"]), "--output", str(out), "--metadata"],
                   check=True, capture_output=True)
    wall = time.perf_counter() - t0
    return wall, json.loads(out.with_suffix(".json").read_text())["stats"]


def _start(model: Path, max_queue: int, cache: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*CLI, "serve", "--model", str(model), "--port", str(port),
                             "--max-queue", str(max_queue), "--prompt-cache", str(cache)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            httpx.get(url + "/v1/health").raise_for_status()
            return proc, url
        except httpx.TransportError:
            if proc.poll() is not None:
                raise SystemExit("the server exited during start-up") from None
            time.sleep(0.1)
    raise SystemExit("the server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--preset", default=None, help="build this fixture into --model first")
    ap.add_argument("--clients", type=int, default=50, help="0: no load test")
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--size", default="96x80")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--max-sequence-length", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1,
                    help="warm server edits and CLI calls after the first (medians)")
    args = ap.parse_args()
    if args.preset and not args.model.exists():
        sys.path.insert(0, str(REPO / "scripts"))
        import make_mlx_checkpoint

        make_mlx_checkpoint.build(args.model, args.preset, seed=0)
    size = tuple(int(v) for v in args.size.split("x"))
    options = {"steps": args.steps, "max_sequence_length": args.max_sequence_length, "seed": 0}
    print("\n".join(common.machine_header(" ".join(sys.argv))))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = _inputs(size, folder)
        t0 = time.perf_counter()
        proc, url = _start(args.model, args.max_queue, folder / "prompts")
        print(f"server ready (models loaded) in {time.perf_counter() - t0:.3f} s")
        try:
            first, *warm = (asyncio.run(_load_one(url, files, options))
                            for _ in range(1 + args.repeats))
            print(f"server: first edit {first[1]:.3f} s, timings {_phases(first[2])}")
            for i, edit in enumerate(warm):
                print(f"server: edit {i + 2} {edit[1]:.3f} s, timings {_phases(edit[2])}")
            rss0 = _rss_gb(proc.pid)
            stats = asyncio.run(_load(url, files, options, args.clients)) if args.clients \
                else None
            rss1 = _rss_gb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
        cli = [_cli_edit(args.model, folder, options) for _ in range(1 + args.repeats)]
    for i, (wall, phases) in enumerate(cli):
        print(f"mlx-edit inpaint process {i + 1}: {wall:.3f} s, timings {_phases(phases)}, "
              f"outside the phases (start, imports, I/O) "
              f"{wall - sum(v for k, v in phases.items() if k in PHASES):.3f} s")
    print(f"step preview of a 1024x1024 canvas: {_preview_ms():.1f} ms (median of 10)")
    later_cli = statistics.median(c[0] for c in cli[1:])
    later_server = statistics.median(e[1] for e in warm)
    print(f"medians after the first: CLI process {later_cli:.3f} s, warm server edit "
          f"{later_server:.3f} s")
    ratio = f"second CLI call / warm server edit: {later_cli / later_server:.1f}x"
    if stats is None:
        print(f"serve: 0 clients (no load test); RSS {rss0:.2f} GB; {ratio}")
        return
    print(f"serve: {args.clients} clients, {stats['done']} done, {stats['lost']} lost, "
          f"{stats['429']} 429s, max queued {stats['max_queued']} (bound {args.max_queue}); "
          f"RSS {rss0:.2f} -> {rss1:.2f} GB; {ratio}")


def _preview_ms(side: int = 1024, runs: int = 10) -> float:
    """Median ms of one step preview (x0 estimate, projection, JPEG) for a side x side
    canvas, on random latents and a random map (the cost does not depend on them)."""
    from types import SimpleNamespace

    import mlx.core as mx

    from mlx_edit.serve.preview import Previewer

    class Pipe:  # any object a weak reference can point to
        pass

    previewer, pipe = Previewer(), Pipe()
    previewer._maps[pipe] = np.random.default_rng(0).standard_normal((17, 3), np.float32)
    latents = mx.random.normal((1, (side // 16) ** 2, 64))
    job = SimpleNamespace(latents=latents, sigmas=np.linspace(1, 0, runs + 2),
                          plan=SimpleNamespace(model_size=(side, side)))
    progress, times = previewer.for_job(pipe, lambda *a, **k: None, 1, 256), []
    for step in range(1, runs + 1):
        t0 = time.perf_counter()
        progress(step, runs + 1, job)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


async def _load_one(url, files, options):
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        return await _edit(client, files, options, {"429": 0})


PHASES = ("queued_s", "load_s", "load_transformer_s", "load_vae_s", "text_encode_s",
          "vae_encode_s", "denoise_s", "vae_decode_s")


def _phases(timings: dict) -> str:
    return ", ".join(f"{k} {timings[k]:.3f}" for k in PHASES if k in timings)


if __name__ == "__main__":
    main()
