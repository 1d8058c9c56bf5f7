"""Real batches in `mlx-edit batch` (mlx_edit.batch_groups): which lines share a denoise
batch, stacking and splitting, the memory bound, and grouped runs equal to one-by-one
runs. On the torch-free tiny checkpoints.

Tolerance: batching changes only the shapes the matrix products run at, so results
differ by float32 rounding: final latents within LATENT_TOL (max|grouped - alone| /
max|alone|; measured ~1e-7), decoded PNGs as `test_batch.close_images` says (measured:
<= 2 levels on ~0.002% of the values)."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import json

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from test_batch import FAST, _manifest, _results, close_images
from test_cli import invoke, photos  # noqa: F401  (fixture)

from mlx_edit import batch, batch_groups

from mlx_edit.editing import memory
from mlx_edit.editing.fill import FluxFill
from mlx_edit.options import EditOptions

LATENT_TOL = 1e-5


def close_latents(a: mx.array, b: mx.array) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and np.abs(a - b).max() / np.abs(b).max() <= LATENT_TOL


def _line(photos, number, **row):  # noqa: F811
    base = {"image": str(photos / "astronaut.png"), "mask": str(photos / "mask.png"),
            "prompt": "a red hat", **FAST}
    return batch.parse_line(json.dumps({**base, **row}), number, photos, {})


def test_which_lines_share_a_batch(photos):  # noqa: F811
    lines = [_line(photos, 1, prompt="b"), _line(photos, 2, seed=3, num_images=2),
             _line(photos, 3, soft_mask=True), _line(photos, 4, steps=2),
             _line(photos, 5, prompt="a", feather=3), _line(photos, 6, seam_fix=4),
             _line(photos, 7, prompt="a"), _line(photos, 8, detail_pass=0.4),
             _line(photos, 9, global_pass=True)]
    key = batch_groups.stack_key
    assert key(lines[2]) is None and key(lines[5]) is None  # a per-step hook, a 2nd pass
    assert key(lines[7]) is None and key(lines[8]) is None  # two-pass edits (2 pipeline runs)
    assert key(lines[0]) == key(lines[1]) == key(lines[4])  # seeds, images, feather: per line
    assert key(lines[0]) != key(lines[3])  # steps
    chunks = [[ln.number for ln in c] for c in batch_groups.chunks(lines, 3)]
    # one key's lines together, by prompt (a repeated prompt encoded once), at most 3
    assert chunks == [[5, 7, 2], [1], [4], [3], [6], [8], [9]]
    assert [[ln.number for ln in c] for c in batch_groups.chunks(lines, 1)] == \
        [[5], [7], [2], [1], [4], [3], [6], [8], [9]]


@pytest.fixture(scope="module")
def pipe(tiny_mlx):
    return FluxFill.from_pretrained(tiny_mlx, mx.float32)


def _run_alone(pipe, job):
    for _ in pipe.steps(job):
        pass
    return job


def test_stacked_jobs_match_one_by_one_and_fit_memory(pipe, photos, monkeypatch):  # noqa: F811
    image, mask = photos / "astronaut.png", photos / "mask.png"
    specs = [("a red hat", EditOptions(seed=1, **FAST)),
             ("a blue cap", EditOptions(seed=7, num_images=2, strength=1.0, **FAST)),
             ("a crown", EditOptions(seed=3, feather=2, **FAST))]
    alone = [_run_alone(pipe, pipe.inpaint_job(image, mask, p, o)) for p, o in specs]
    jobs = [pipe.inpaint_job(image, mask, p, o) for p, o in specs]
    assert len({batch_groups.signature(j) for j in jobs}) == 1
    batch_groups.denoise_together(pipe, jobs)
    for a, g in zip(alone, jobs):
        assert close_latents(g.latents, a.latents)
        assert g.stats["group_lines"] == 3 and g.stats["denoise_s"] > 0
        for x, y in zip(pipe.finish(a), pipe.finish(g)):
            assert close_images(x, y)
    # different prompts really are different rows (not one prompt broadcast)
    assert not close_latents(jobs[0].latents, jobs[2].latents)

    outs = [pipe.outpaint_job(photos / "coffee.jpg", p, EditOptions(seed=s, left=32, **FAST))
            for p, s in (("a table", 0), ("a wall", 1))]
    alone = [_run_alone(pipe, pipe.outpaint_job(photos / "coffee.jpg", p,
                                                EditOptions(seed=s, left=32, **FAST)))
             for p, s in (("a table", 0), ("a wall", 1))]
    batch_groups.denoise_together(pipe, outs)
    assert all(close_latents(g.latents, a.latents) for g, a in zip(outs, alone))

    # The memory estimate bounds a group: room for 3 images -> the 1 + 2 image lines, then
    # the third alone (an estimate of 1 GB per image; the real one: test_memory.py).
    monkeypatch.setattr(pipe, "memory_estimate", lambda w, h, n: {"peak": float(n)})
    monkeypatch.setattr(memory, "available_memory", lambda: 3.5 * memory.GB)
    prepared = [batch_groups.Prepared(None, j, 0.0) for j in jobs]
    assert [len(g) for g in batch_groups.partition(pipe, prepared, {})] == [2, 1]


@pytest.fixture
def kontext(tmp_path_factory, import_script):
    from mlx_edit.editing.kontext import FluxKontext

    out = tmp_path_factory.mktemp("kontext") / "tiny"
    ckpt = import_script("make_mlx_checkpoint").build(out, "tiny", extras=("kontext-model",))
    return FluxKontext.from_pretrained(ckpt / "kontext-model", mx.float32)


def test_kontext_edits_stack_their_reference_tokens(kontext, photos):  # noqa: F811
    image, specs = photos / "coffee.jpg", [("make it blue", 0), ("add a spoon", 5)]
    opts = [EditOptions(seed=s, auto_resize=False, **FAST) for _, s in specs]  # own size
    alone = [_run_alone(kontext, kontext.edit_job(image, p, o)) for (p, _), o in zip(specs, opts)]
    jobs = [kontext.edit_job(image, p, o) for (p, _), o in zip(specs, opts)]
    assert jobs[0].tokens is not None and batch_groups.signature(jobs[0]) is not None
    batch_groups.denoise_together(kontext, jobs)
    assert all(close_latents(g.latents, a.latents) for g, a in zip(jobs, alone))


def test_grouped_batch_equals_one_by_one_and_resumes(tiny_mlx, photos, tmp_path):  # noqa: F811
    rows = [{"id": f"e{i}", "image": str(photos / "astronaut.png"),
             "mask": str(photos / "mask.png"), "prompt": f"hat {i}", "seed": i, **FAST}
            for i in range(3)]
    rows[1]["num_images"] = 2
    rows.append({**rows[0], "id": "soft", "soft_mask": True})  # a per-step hook: alone
    m = _manifest(tmp_path / "m.jsonl", rows)
    args = ["batch", m, "--model", tiny_mlx, "--no-prompt-cache", "--output-dir"]
    assert invoke(*args, tmp_path / "grouped").exit_code == 0
    assert invoke(*args, tmp_path / "alone", "--batch-size", "1").exit_code == 0
    grouped, alone = _results(tmp_path / "grouped"), _results(tmp_path / "alone")
    assert [grouped[i]["stats"].get("group_lines") for i in ("e0", "e1", "e2", "soft")] == \
        [3, 3, 3, None]
    assert all("group_lines" not in r["stats"] for r in alone.values())
    same = ("status", "seeds", "hash", "mode", "prompt", "line")
    assert {i: [r[k] for k in same] for i, r in grouped.items()} == \
        {i: [r[k] for k in same] for i, r in alone.items()}
    for i, rec in grouped.items():
        assert len(rec["outputs"]) == len(alone[i]["outputs"]) == (2 if i == "e1" else 1)
        for a, b in zip(rec["outputs"], alone[i]["outputs"]):
            x, y = Image.open(a), Image.open(b)
            assert close_images(np.asarray(x), np.asarray(y)) and x.text == y.text
    r = invoke(*args, tmp_path / "grouped")  # everything done: nothing redone
    assert r.exit_code == 0 and "4/4 ok (4 done before)" in r.output
