"""SAM 2.1 image-embedding memory on MLX vs `mlx_edit.editing.memory.segmenter_gb`'s estimate
(and with --sam3, SAM 3's vision backbone vs `memory.sam3_backbone_gb`).

    python benchmarks/bench_sam_memory.py [--cases tiny:256,tiny:512,hiera-tiny:512,hiera-tiny:1024,hiera-small:1024]
    python benchmarks/bench_sam_memory.py --sam3 [--cases real-widths-2-layers:336,...:1008]

For each preset (scripts/sam_fixtures.py) at an input size, a random-init SamModel in
float32 embeds a blank image; the activations are MLX's peak minus the memory active
before the call (the weights). The estimate is `SAM_ACT_BYTES` per input pixel and Hiera
stage-0 channel (memory.py), fitted to these rows. --sam3: the same for a random-init
Sam3VisionModel of a scripts/sam3_fixtures.py preset (facebook/sam3's widths with two ViT
layers: the activations of one layer are freed before the next runs) at an input size;
the estimate is `SAM3_ACT_BYTES_PER_TOKEN` per patch token.
"""

from __future__ import annotations

import common  # noqa: F401  (first: OpenBLAS before mlx)

import argparse
import copy
import sys

import mlx.core as mx
from mlx.utils import tree_flatten

from common import REPO_ROOT, machine_header, table

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import sam3_fixtures as fx3  # noqa: E402
import sam_fixtures as fx  # noqa: E402

from mlx_edit.editing.memory import sam3_backbone_gb, segmenter_gb  # noqa: E402
from mlx_edit.models.sam import SamConfig, SamModel  # noqa: E402
from mlx_edit.models.sam3_vision import Sam3VisionConfig, Sam3VisionModel  # noqa: E402


def measure(preset: str, size: int) -> list:
    cfg = copy.deepcopy(fx.sam_config(preset))
    cfg.setdefault("prompt_encoder_config", {})["image_size"] = size
    config = SamConfig.from_dict(cfg)
    model = SamModel(config)
    mx.eval(model.parameters())
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    emb = model.image_embeddings(mx.zeros((1, size, size, 3)))
    mx.eval(emb.embedding, emb.high_res)
    act = (mx.get_peak_memory() - before) / 1e9
    weights, est = segmenter_gb(config)
    del model, emb
    mx.clear_cache()
    return [preset, size, f"{weights:.3f}", f"{act:.3f}", f"{est:.3f}", f"{est / act:.2f}"]


def measure_sam3(preset: str, size: int) -> list:
    cfg = fx3.sam3_config(preset)
    cfg["vision_config"]["backbone_config"]["image_size"] = size
    config = Sam3VisionConfig.from_dict(cfg)
    model = Sam3VisionModel(config)
    mx.eval(model.parameters())
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    out = model(mx.zeros((1, size, size, 3)))
    mx.eval(out.fpn_hidden_states, out.fpn_position_encoding)
    act = (mx.get_peak_memory() - before) / 1e9
    est = sam3_backbone_gb(config)
    del model, out
    mx.clear_cache()
    return [preset, size, f"{weights:.3f}", f"{act:.3f}", f"{est:.3f}", f"{est / act:.2f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=None)
    ap.add_argument("--sam3", action="store_true", help="SAM 3's vision backbone instead")
    args = ap.parse_args()
    cases = args.cases or ("real-widths-2-layers:336,real-widths-2-layers:504,"
                           "real-widths-2-layers:672,real-widths-2-layers:1008" if args.sam3
                           else "tiny:256,tiny:512,hiera-tiny:512,hiera-tiny:1024,"
                                "hiera-small:1024")
    run = measure_sam3 if args.sam3 else measure
    print("\n".join(machine_header(" ".join(["python", *sys.argv]))))
    rows = [run(p, int(s)) for p, s in (c.split(":") for c in cases.split(","))]
    print(table(rows, ["preset", "px", "weights GB", "activations GB", "estimate GB",
                       "estimate/measured"]))


if __name__ == "__main__":
    main()
