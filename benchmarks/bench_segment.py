"""SAM 2.1 / SAM 3 on MLX vs transformers: time per image and peak memory.

    python benchmarks/bench_segment.py [--presets hiera-tiny,hiera-large] [--reps 3]
    python benchmarks/bench_segment.py --text [--preset sam3] [--rounds 2] [--reps 1]
        [--folder SAM3_FOLDER] [--phrase "a person"] [--photo astronaut]

For each preset (scripts/sam_fixtures.py: `tiny`, `hiera-tiny|small|base-plus|large`, the
released image encoders with random weights) the same weights run through
`SamModel.image_embeddings` (MLX, float32) and transformers' `Sam2Model.get_image_embeddings`
(torch, float32) on skimage's astronaut at the model's input size (1024 px for the released
configs), then one decode per prompt (one click, multimask) on both. Reports medians
after `--warmup` untimed runs (default 1), the ratio MLX/transformers (< 1: MLX faster), the embedding's relative
error, and MLX's peak memory. The last line is the summary the smoke test reads.

`--text` (SAM 3, masks from words): a random-weight transformers `Sam3Model` of
scripts/sam3_fixtures.py's `--preset` (`sam3`: facebook/sam3's released config, ~840M
parameters, 1008 px; or `--folder`, an existing Sam3Model folder) runs in worker
processes, one framework per process so only one copy of the weights is resident: ours
(`TextSegmenter`'s vision backbone, text encoder and heads, float32) and transformers'
`Sam3Model.forward` (float32), on the same normalised pixels and tokens (one phrase, no
boxes). Time per image is one full forward (vision + text + detector heads; pre- and
post-processing excluded), `--reps` timed after `--warmup` per worker; the workers
alternate in ABBA order over `--rounds` so the order cannot decide the ratio. Peak
memory is each worker's peak RSS (weights included: transformers' are copied out of the
memory-mapped file, as MLX's are, so neither is paged back in from disk) and MLX's own
peak. Outputs are
compared: score relative error and per-query mask IoU (logits > 0).
"""

from __future__ import annotations

import common  # noqa: F401  (first: OpenBLAS before mlx)

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from PIL import Image
from skimage import data

from common import REPO_ROOT, machine_header, med, median_time, peak_gb, table

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import sam_fixtures as fx  # noqa: E402

from mlx_edit.weights.sam import load_sam  # noqa: E402


def bench_preset(preset: str, reps: int, warmup: int = 1) -> list:
    ref = fx.make_model(preset)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = load_sam(tmp)
    size = ours.cfg.image_size
    photo = Image.fromarray(data.astronaut()).resize((size, size), Image.BILINEAR)
    x = ((np.asarray(photo, np.float32) / 255 - fx.IMAGENET_MEAN) / fx.IMAGENET_STD)
    pixels = x.astype(np.float32)[None]
    pixels_t = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    point = np.array([[[[0.45 * size, 0.25 * size]]]], np.float32)

    last = {}  # the timed runs' outputs: no extra (slow, at large sizes) run to compare them

    def ours_embed():
        last["ours"] = emb = ours.image_embeddings(mx.array(pixels))
        mx.eval(emb.embedding, emb.high_res)

    def ref_embed():
        with torch.no_grad():
            last["ref"] = ref.get_image_embeddings(pixels_t)

    mx.reset_peak_memory()
    t_ours = median_time(ours_embed, reps, warmup)
    t_ref = median_time(ref_embed, reps, warmup)
    emb, ref_emb = last["ours"], last["ref"]
    err = float(np.abs(np.array(emb.embedding) - ref_emb[-1].permute(0, 2, 3, 1).numpy()).max()
                / ref_emb[-1].abs().max())

    def ours_decode():
        mx.eval(ours.decode(emb, points=mx.array(point), labels=mx.ones((1, 1, 1), mx.int32)))

    def ref_decode():
        with torch.no_grad():
            ref(image_embeddings=ref_emb, input_points=torch.from_numpy(point),
                input_labels=torch.ones((1, 1, 1), dtype=torch.long))

    d_ours = median_time(ours_decode, max(reps, 5))
    d_ref = median_time(ref_decode, max(reps, 5))
    return [preset, size, f"{med(t_ours):.3f}", f"{med(t_ref):.3f}",
            f"{med(t_ours) / med(t_ref):.2f}", f"{1e3 * med(d_ours):.1f}",
            f"{1e3 * med(d_ref):.1f}", f"{med(d_ours) / med(d_ref):.2f}", f"{err:.1e}",
            f"{peak_gb():.2f}"]


def sam3_inputs(folder: Path, photo: str, phrase: str) -> tuple[np.ndarray, ...]:
    """(pixels (1, S, S, 3) float32 normalised as Sam3ImageProcessor does, token ids,
    attention mask) for skimage's `photo` and `phrase`, read off the folder's files."""
    from mlx_edit.editing.text import Sam3Tokenizer

    config = json.loads((folder / "config.json").read_text())
    size = config["vision_config"]["backbone_config"]["image_size"]
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    image = Image.fromarray(getattr(data, photo)()).convert("RGB").resize((size, size),
                                                                          Image.BILINEAR)
    x = np.asarray(image, np.float32) / 255
    pixels = ((x - np.float32(pre["image_mean"])) / np.float32(pre["image_std"]))[None]
    ids, mask = Sam3Tokenizer.from_folder(folder).with_mask([phrase])
    return pixels.astype(np.float32), ids, mask


def mlx_sam3(folder: Path):
    """Our SAM 3 (float32) as forward(pixels, ids, mask) -> {scores, boxes, masks}."""
    from mlx_edit.editing.text_segment import TextSegmenter

    seg = TextSegmenter.from_pretrained(folder, mx.float32)

    def forward(pixels, ids, mask):
        vision = seg.vision(mx.array(pixels))
        features = (vision.fpn_hidden_states[:-1], vision.fpn_position_encoding[:-1])
        _, text = seg.text_encoder(mx.array(ids), mx.array(mask))
        out = seg.heads(*features, text, mx.array(mask.astype(bool)), None, None)
        mx.eval(out.scores, out.boxes, out.masks, out.semantic)
        return {"scores": np.array(out.scores), "boxes": np.array(out.boxes),
                "masks": np.array(out.masks)}
    return forward


def torch_sam3(folder: Path):
    """transformers' Sam3Model (float32) as forward(pixels, ids, mask) -> the same dict."""
    from transformers import Sam3Model

    model = Sam3Model.from_pretrained(folder, dtype=torch.float32).eval()
    for p in model.parameters():  # own memory, as MLX's loaded arrays: not pages of the
        p.data = p.data.clone()   # mapped file, which a loaded machine evicts mid-forward

    def forward(pixels, ids, mask):
        with torch.no_grad():
            out = model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
                        input_ids=torch.from_numpy(ids).long(),
                        attention_mask=torch.from_numpy(mask).long())
        scores = out.pred_logits.sigmoid() * out.presence_logits.sigmoid()
        return {"scores": scores.numpy(), "boxes": out.pred_boxes.numpy(),
                "masks": out.pred_masks.numpy()}
    return forward


def sam3_worker(args) -> None:
    """One framework in this process: load, run warmup + reps forwards, save the last
    outputs to `args.out` and print one JSON line (load s, times, peak memory)."""
    folder = Path(args.folder)
    inputs = sam3_inputs(folder, args.photo, args.phrase)
    t0 = time.perf_counter()
    forward = {"mlx": mlx_sam3, "torch": torch_sam3}[args.worker](folder)
    load_s = time.perf_counter() - t0
    mx.reset_peak_memory()
    for _ in range(args.warmup):
        forward(*inputs)
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        out = forward(*inputs)
        times.append(time.perf_counter() - t0)
    np.savez(args.out, **out)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_gb = rss / 1e9 if sys.platform == "darwin" else rss / 1e6
    print(json.dumps({"load_s": load_s, "times": times, "rss_gb": rss_gb,
                      "mlx_peak_gb": peak_gb()}))


def run_worker(side: str, folder: Path, out: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--folder", str(folder), "--out",
           str(out), "--reps", str(args.reps), "--warmup", str(args.warmup),
           "--photo", args.photo, "--phrase", args.phrase]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if proc.returncode != 0:
        sys.exit(f"{side} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_outputs(ours: Path, ref: Path) -> tuple[float, float, float]:
    """(score rel err, box rel err, min per-query mask IoU at logits > 0)."""
    a, b = np.load(ours), np.load(ref)
    rel = [float(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max()) for k in ("scores", "boxes")]
    ma, mb = a["masks"][0] > 0, b["masks"][0] > 0
    union = np.logical_or(ma, mb).sum((1, 2))
    inter = np.logical_and(ma, mb).sum((1, 2))
    ious = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    return rel[0], rel[1], float(ious.min())


def bench_text(args) -> None:
    """The --text benchmark (module doc): ABBA rounds of the two workers."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder) if args.folder else None
        if folder is None:
            sys.path.insert(0, str(REPO_ROOT / "scripts"))
            import sam3_fixtures as fx3

            t0 = time.perf_counter()
            folder = fx3.build_sam3(Path(tmp) / "sam3", args.preset, seed=0)
            print(f"built {args.preset} in {time.perf_counter() - t0:.0f} s", flush=True)
        config = json.loads((folder / "config.json").read_text())
        size = config["vision_config"]["backbone_config"]["image_size"]
        results = {"mlx": [], "torch": []}
        for r in range(args.rounds):
            for side in ("mlx", "torch") if r % 2 == 0 else ("torch", "mlx"):
                res = run_worker(side, folder, Path(tmp) / f"{side}.npz", args)
                results[side].append(res)
                print(f"round {r + 1} {side}: " + " ".join(f"{t:.2f}" for t in res["times"])
                      + f" s, peak RSS {res['rss_gb']:.2f} GB", flush=True)
        errs = compare_outputs(Path(tmp) / "mlx.npz", Path(tmp) / "torch.npz")
    summary = {side: (med([t for res in rs for t in res["times"]]), med([res["load_s"] for res in rs]),
                      max(res["rss_gb"] for res in rs), max(res["mlx_peak_gb"] for res in rs))
               for side, rs in results.items()}
    rows = [[side, size, f"{t:.2f}", f"{load:.1f}", f"{rss:.2f}",
             f"{mlx_peak:.2f}" if side == "mlx" else "-"]
            for side, (t, load, rss, mlx_peak) in summary.items()]
    print(table(rows, ["runner", "px", "s per image", "load s", "peak RSS GB", "mlx peak GB"]))
    (t_m, _, rss_m, _), (t_t, _, rss_t, _) = summary["mlx"], summary["torch"]
    print(f"scores rel err {errs[0]:.1e}, boxes rel err {errs[1]:.1e}, "
          f"min mask IoU {errs[2]:.4f}")
    print("load average at the end (1/5/15 min): "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"sam3 ratios mlx/transformers ({args.preset if not args.folder else folder}, {size} px): "
          f"time {t_m / t_t:.2f}, peak RSS {rss_m / rss_t:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="hiera-tiny",
                        help="comma-separated: tiny, " + ", ".join(fx.PRESETS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed embedding runs per side first (0 for the large sizes)")
    parser.add_argument("--text", action="store_true", help="SAM 3 (module doc)")
    parser.add_argument("--preset", default="sam3",
                        help="--text: a scripts/sam3_fixtures.py preset (sam3: the released config)")
    parser.add_argument("--folder", help="--text: an existing Sam3Model folder instead")
    parser.add_argument("--rounds", type=int, default=2, help="--text: ABBA rounds")
    parser.add_argument("--photo", default="astronaut", help="--text: a skimage.data photo")
    parser.add_argument("--phrase", default="a person", help="--text: the text prompt")
    parser.add_argument("--worker", choices=("mlx", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return sam3_worker(args)
    print("\n".join(machine_header(" ".join(["python", *sys.argv]))))
    print(f"torch threads: {torch.get_num_threads()}")
    if args.text:
        return bench_text(args)
    rows = [bench_preset(p, args.reps, args.warmup) for p in args.presets.split(",")]
    print(table(rows, ["preset", "px", "embed mlx s", "embed torch s", "ratio",
                       "decode mlx ms", "decode torch ms", "ratio", "emb rel err",
                       "mlx peak GB"]))
    print("segment ratios mlx/transformers: " + "; ".join(
        f"{r[0]} embed {r[4]} decode {r[7]}" for r in rows))


if __name__ == "__main__":
    main()
