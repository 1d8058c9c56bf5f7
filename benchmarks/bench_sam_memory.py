"""SAM 2.1 image-embedding memory on MLX vs `mlx_edit.editing.memory.segmenter_gb`'s estimate.

    python benchmarks/bench_sam_memory.py [--cases tiny:256,tiny:512,hiera-tiny:512,hiera-tiny:1024,hiera-small:1024]

For each preset (scripts/sam_fixtures.py) at an input size, a random-init SamModel in
float32 embeds a blank image; the activations are MLX's peak minus the memory active
before the call (the weights). The estimate is `SAM_ACT_BYTES` per input pixel and Hiera
stage-0 channel (memory.py), fitted to these rows.
"""

from __future__ import annotations

import common  # noqa: F401  (first: OpenBLAS before mlx)

import argparse
import copy
import sys

import mlx.core as mx

from common import REPO_ROOT, machine_header, table

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import sam_fixtures as fx  # noqa: E402

from mlx_edit.editing.memory import segmenter_gb  # noqa: E402
from mlx_edit.models.sam import SamConfig, SamModel  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="tiny:256,tiny:512,hiera-tiny:512,hiera-tiny:1024,"
                                       "hiera-small:1024")
    args = ap.parse_args()
    print("\n".join(machine_header(" ".join(["python", *sys.argv]))))
    rows = [measure(p, int(s)) for p, s in (c.split(":") for c in args.cases.split(","))]
    print(table(rows, ["preset", "px", "weights GB", "activations GB", "estimate GB",
                       "estimate/measured"]))


if __name__ == "__main__":
    main()
