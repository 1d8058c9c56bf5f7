"""`mlx-edit batch`: manifest validation, outputs and results, resume after an interrupted
run, the on-disk prompt cache (T5 not loaded on hits), and the sharding over ranks. On
the torch-free tiny checkpoint."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_cli import invoke, photos  # noqa: F401  (fixture)

from mlx_edit import batch, batch_groups
from mlx_edit.editing import pipeline as pipeline_module
from mlx_edit.editing import prompts
from mlx_edit.cli import main
from mlx_edit.imaging.images import InputError
from mlx_edit.editing.prompt_cache import PromptCache

FAST = {"steps": 1, "max_sequence_length": 16}
LAUNCH = "from mlx_edit.cli import main; main()"  # the README's mlx.launch command
PIXEL_TOL, PIXEL_FRACTION = 3, 1e-3


def close_images(a, b) -> bool:
    """Two uint8 images equal up to float rounding: lines denoised in different real
    batches (mlx_edit.batch_groups) differ only by the rounding of their matrix products,
    which a few pixel values cross (<= PIXEL_TOL levels on <= PIXEL_FRACTION of them)."""
    a, b = np.asarray(a, np.int16), np.asarray(b, np.int16)
    d = np.abs(a - b) if a.shape == b.shape else np.array([255])
    return d.max() <= PIXEL_TOL and (d > 0).mean() <= PIXEL_FRACTION


def _manifest(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _rows(photos):  # noqa: F811
    return [
        {"id": "hat", "image": str(photos / "astronaut.png"), "mask": str(photos / "mask.png"),
         "prompt": "a red hat", **FAST},
        {"id": "hat2", "image": str(photos / "astronaut.png"), "mask": str(photos / "mask.png"),
         "prompt": "a red hat", "seed": 5, **FAST},
        {"id": "wide", "mode": "outpaint", "image": str(photos / "coffee.jpg"),
         "prompt": "a table", "left": 32, **FAST},
    ]


@pytest.fixture
def counted(monkeypatch):
    """Counts of T5 loads and of edits run (alone, or prepared for a real batch)."""
    counts = {"t5": 0, "edits": 0}

    def counting(module, name, key):
        original = getattr(module, name)

        def call(*a, **k):
            counts[key] += 1
            return original(*a, **k)
        monkeypatch.setattr(module, name, call)
    counting(prompts, "load_t5", "t5")
    counting(batch, "edit_line", "edits")
    counting(batch_groups, "prepare_line", "edits")
    return counts


def _results(folder):
    return {r["id"]: r for r in map(json.loads, (folder / "results.jsonl").read_text()
                                    .splitlines())}


def test_bad_lines_named_before_any_model_loads(photos, tmp_path, monkeypatch):  # noqa: F811
    def no_load(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(pipeline_module.FluxPipeline, "from_pretrained", no_load)
    good = _rows(photos)[0]
    rows = [good, "{not json", {**good, "id": "m", "mask": None} | {"mask": 3},
            {**good, "id": "u", "colour": 1}, {**good, "id": "s", "steps": 0},
            {**good, "id": "x", "image": str(tmp_path / "missing.png")},
            {k: v for k, v in good.items() if k != "mask"} | {"id": "nomask"},
            {**good, "mode": "outpaint", "id": "o"}, good,
            {k: v for k, v in good.items() if k != "mask"} | {"id": "p",
                                                               "mask_points": [[900, 5]]},
            {**good, "id": "two", "num_images": 2}, {**good, "id": "two-1"},
            {**good, "id": "r", "references": [good["image"]]},
            {**good, "id": "e", "mode": "edit", "references": ["missing.png"]}]
    m = _manifest(tmp_path / "m.jsonl", rows)
    r = invoke("batch", m, "--output-dir", tmp_path / "out", "--no-prompt-cache")
    assert r.exit_code == 2
    for n, word in [(2, "JSON"), (3, "mask"), (4, "colour"), (5, "steps"), (6, "not found"),
                    (7, "needs mask"), (8, "outpaint needs"), (9, "already used on line 1"),
                    (10, "outside"), (12, "two-1.png is also line 11"),
                    (13, "inpaint takes no references"), (14, "not found")]:
        assert f"line {n}: " in r.output and word in r.output.split(f"line {n}: ")[1]
    assert "line 1:" not in r.output and "12 invalid line(s)" in r.output
    assert not (tmp_path / "out").exists()


def test_click_masks_and_a_model_that_cannot_load(photos, tmp_path):  # noqa: F811
    from mlx_edit.editing.segment import Box, Points

    row = {"image": str(photos / "astronaut.png"), "prompt": "x", "mask_points": [[10, 20]],
           "mask_negative": [[30, 40]], "mask_box": [5, 5, 100, 90]}
    line = batch.parse_line(json.dumps(row), 3, tmp_path, {"steps": 2, "left": 8})
    assert line.id == "000003-astronaut" and line.options.steps == 2  # left: not inpaint's
    assert line.mask == [Points(((10.0, 20.0), (30.0, 40.0)), (1, 0)), Box(5, 5, 100, 90)]
    m = _manifest(tmp_path / "m.jsonl", [_rows(photos)[0]])
    r = invoke("batch", m, "--output-dir", tmp_path / "out", "--model", tmp_path / "none",
               "--no-prompt-cache")
    assert r.exit_code == 2 and "not found" in r.output
    assert not (tmp_path / "out" / "hat.png").exists()


def test_batch_results_resume_and_prompt_cache(tiny_mlx, photos, tmp_path,  # noqa: F811
                                               counted):
    rows = _rows(photos) + [{"id": "long", "image": str(photos / "astronaut.png"),
                             "mask": str(photos / "mask.png"), "steps": 1,
                             "max_sequence_length": 2, "prompt": "far too long a prompt"}]
    m = _manifest(tmp_path / "m.jsonl", rows)
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ("batch", m, "--output-dir", out, "--model", tiny_mlx, "--prompt-cache", cache)
    r = invoke(*args)
    assert r.exit_code == 1, r.output  # one line failed, the others were done
    res = _results(out)
    assert [res[i]["status"] for i in ("hat", "hat2", "wide", "long")] == \
        ["ok", "ok", "ok", "error"]
    assert "T5 tokens" in res["long"]["error"] and res["long"]["outputs"] == []
    assert res["hat2"]["seeds"] == [5] and Image.open(out / "hat2.png").text["seed"] == "5"
    assert Image.open(out / "wide.png").size == (250 + 32, 190)
    assert res["hat"]["stats"]["denoise_s"] > 0 and res["hat"]["seconds"] > 0
    assert counted == {"t5": 2, "edits": 4}  # "a red hat" encoded once for two lines
    assert len(list(cache.glob("*.safetensors"))) == 2
    assert not list(out.glob(".*"))  # no part file or temp file left

    r = invoke(*args)  # nothing left but the failed line, whose prompt never encodes
    assert r.exit_code == 1 and counted == {"t5": 2, "edits": 5}
    assert _results(out)["hat"] == res["hat"]

    # A fresh output folder, same cache: every prompt hits, T5 is never loaded, and the
    # images are the same (same seeds; 'long' now joins hat/hat2's batch: up to rounding).
    rows[3]["max_sequence_length"] = 16
    _manifest(m, rows)
    r = invoke("batch", m, "--output-dir", tmp_path / "out2", "--model", tiny_mlx,
               "--prompt-cache", cache)
    assert r.exit_code == 0, r.output
    assert counted["t5"] == 3  # only the newly valid 'long' prompt missed
    for name in ("hat", "hat2", "wide"):
        a, b = (Image.open(d / f"{name}.png") for d in (out, tmp_path / "out2"))
        assert close_images(a, b), name


def test_edit_commands_cache_prompts_on_disk(tiny_mlx, photos, tmp_path,  # noqa: F811
                                             counted):
    """inpaint/outpaint/restyle/edit cache prompt embeddings by default: a second identical
    call loads no text encoder (its stats say the prompt hit) and gives the same image."""
    def run(name, command="inpaint", *extra):
        out = tmp_path / f"{name}.png"
        where = ("--mask", photos / "mask.png") if command == "inpaint" else ("--left", 16)
        r = invoke(command, "--model", tiny_mlx, "--image", photos / "astronaut.png", *where,
                   "--prompt", "a red hat", "--steps", 1, "--max-sequence-length", 16,
                   "--seed", 1, "--output", out, "--metadata", *extra)
        assert r.exit_code == 0, r.output
        return json.loads(out.with_suffix(".json").read_text())["stats"], r.output

    cache = tmp_path / "cache"
    first, _ = run("a", "inpaint", "--prompt-cache", cache)
    assert (first["prompt_cache_hits"], first["prompt_cache_misses"], counted["t5"]) == (0, 1, 1)
    second, output = run("b", "inpaint", "--prompt-cache", cache)
    assert (second["prompt_cache_hits"], second["prompt_cache_misses"], counted["t5"]) == \
        (1, 0, 1)  # T5 (and CLIP) not loaded
    assert re.search(r"text [0-9.]+s \(cached\)", output)
    assert np.array_equal(*(np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "ab"))
    off, _ = run("c", "inpaint", "--no-prompt-cache")
    assert "prompt_cache_hits" not in off and counted["t5"] == 2
    # The default folder ($MLX_EDIT_PROMPT_CACHE here), shared by the commands.
    run("d", "inpaint")
    hit, _ = run("e", "outpaint")
    assert hit["prompt_cache_hits"] == 1 and counted["t5"] == 3


def test_interrupted_batch_resumes_without_loss(tiny_mlx, photos, tmp_path,  # noqa: F811
                                                counted, monkeypatch):
    m = _manifest(tmp_path / "m.jsonl", _rows(photos))
    out = tmp_path / "out"
    args = ("batch", m, "--output-dir", out, "--model", tiny_mlx, "--no-prompt-cache")
    import mlx_edit.imaging.images as images

    png_writer, writes = images.png_writer, []

    def interrupted_second(*a, **k):  # Ctrl-C halfway through the second line's PNG
        write = png_writer(*a, **k)
        writes.append(1)
        if len(writes) < 2:
            return write

        def half(f):
            f.write(b"\x89PNG partial")
            raise KeyboardInterrupt
        return half
    monkeypatch.setattr(images, "png_writer", interrupted_second)
    r = invoke(*args)
    assert r.exit_code == 130  # interrupted (128 + SIGINT)
    first = [p.name for p in out.iterdir()]
    assert sorted(first) == [".results.0.jsonl", "hat.png"]  # no partial or temp file
    hat = json.loads((out / ".results.0.jsonl").read_text())
    assert hat["id"] == "hat" and hat["stats"]["group_lines"] == 2  # hat2's batch
    monkeypatch.setattr(images, "png_writer", png_writer)
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert counted["edits"] == 2 + 2  # the finished line was not redone
    assert sorted(p.name for p in out.iterdir()) == ["hat.png", "hat2.png", "results.jsonl",
                                                     "wide.png"]
    assert {r["status"] for r in _results(out).values()} == {"ok"}

    # A changed parameter (the seed) makes that line stale: it alone is redone.
    rows = _rows(photos)
    rows[1]["seed"] = 6
    _manifest(m, rows)
    assert invoke(*args).exit_code == 0 and counted["edits"] == 5
    assert _results(out)["hat2"]["seeds"] == [6]


def test_shard_is_disjoint_balanced_and_spreads_the_largest():
    weights = [100, 1, 1, 90, 5, 5, 80, 3, 2, 70]
    shares = batch.shard(weights, 2)
    assert sorted(shares[0] + shares[1]) == list(range(len(weights)))
    loads = [sum(weights[i] for i in s) for s in shares]
    assert abs(loads[0] - loads[1]) <= 5
    assert (0 in shares[0]) != (3 in shares[0])  # the two largest on different ranks
    assert batch.shard([], 3) == [[], [], []] and batch.shard([4], 1) == [[0]]


def test_prompt_cache_bound_and_keys(tmp_path):
    import mlx.core as mx

    from mlx_edit.sampling.denoise import PromptEmbeds

    enc = tmp_path / "text_encoder"
    enc.mkdir()
    (enc / "model.safetensors").write_bytes(b"x")
    cache = PromptCache(tmp_path / "c", max_bytes=3000)
    e = PromptEmbeds(mx.ones((1, 16, 8)), mx.ones((1, 4)))
    k1 = cache.key([enc], mx.float32, None, "a", "a", 16)
    assert k1 != cache.key([enc], mx.float32, None, "a", "a", 32)
    assert k1 != PromptCache(tmp_path / "c").key([enc], mx.float32, 4, "a", "a", 16)
    assert cache.get(k1) is None
    cache.put(k1, e)
    assert np.array_equal(np.asarray(cache.get(k1).txt), np.ones((1, 16, 8)))
    for i in range(10):
        cache.put(cache.key([enc], mx.float32, None, str(i), "a", 16), e)
    assert sum(f.stat().st_size for f in cache.folder.iterdir()) <= 3000
    (enc / "model.safetensors").write_bytes(b"yy")  # new weights: a new key
    assert PromptCache(tmp_path / "c").key([enc], mx.float32, None, "a", "a", 16) != k1
    with pytest.raises(InputError, match="--no-prompt-cache"):
        PromptCache(enc / "model.safetensors" / "sub")  # under a file: cannot be made


@pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch not installed")
def test_two_ranks_split_the_batch_and_match_one_process(tiny_mlx, photos, tmp_path):  # noqa: F811
    """`mlx.launch --backend ring -n 2` on localhost: each rank edits a disjoint share,
    rank 0 merges results.jsonl, and the images equal a one-process run's."""
    small = tmp_path / "small.png"
    Image.open(photos / "astronaut.png").resize((96, 80)).save(small)
    mask = np.zeros((80, 96), np.uint8)
    mask[20:50, 30:70] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    rows = [{"id": f"e{i}", "image": str(small), "mask": str(tmp_path / "mask.png"),
             "prompt": f"hat {i % 2}", "seed": i, **FAST} for i in range(4)]
    rows += [{"id": "big", "image": str(photos / "coffee.jpg"), "mode": "outpaint",
              "prompt": "hat 0", "right": 16, "seed": 9, **FAST}]
    m = _manifest(tmp_path / "m.jsonl", rows)
    args = ["batch", str(m), "--model", str(tiny_mlx), "--no-prompt-cache", "--output-dir"]
    assert invoke(*args, tmp_path / "one").exit_code == 0
    env = {**os.environ, "PYTHONPATH": str(Path(mlx_edit.__file__).parents[1])}
    port = 20000 + os.getpid() % 20000  # agents sharing a machine: not mlx.launch's default
    r = subprocess.run(["mlx.launch", "--backend", "ring", "-n", "2", "--starting-port",
                        str(port), "--python", sys.executable, "--", "-c", LAUNCH, *args,
                        str(tmp_path / "two")], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "5/5 ok (0 done before)" in r.stdout + r.stderr  # rank 0's summary, once
    assert (r.stdout + r.stderr).count("ok (0 done before)") == 1
    res = _results(tmp_path / "two")
    assert sorted(res) == ["big", "e0", "e1", "e2", "e3"]
    ranks = [res[i]["rank"] for i in sorted(res)]
    assert sorted(set(ranks)) == [0, 1] and ranks.count(res["big"]["rank"]) == 1  # the largest alone
    assert not list((tmp_path / "two").glob(".*"))  # part files merged and removed
    for i in res:
        a, b = (Image.open(tmp_path / d / f"{i}.png") for d in ("one", "two"))
        assert close_images(a, b), i  # the ranks' real batches differ from one process's


def test_killed_batch_resumes(tiny_mlx, photos, tmp_path, counted):  # noqa: F811
    """kill -9 of a running batch (a subprocess) after its first line: the re-run does
    only the rest, and no partial output or stale temp file remains."""
    m = _manifest(tmp_path / "m.jsonl", _rows(photos))
    out = tmp_path / "out"
    args = ["batch", str(m), "--output-dir", str(out), "--model", str(tiny_mlx),
            "--no-prompt-cache"]
    env = {**os.environ, "PYTHONPATH": str(Path(mlx_edit.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = out / ".results.0.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not (part.is_file() and part.read_text().count("\n") >= 1):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no clean-up runs
        proc.wait()
    (out / ".wide.png.999.deadbeef.tmp").write_bytes(b"\x89PNG half")  # as a kill mid-write
    done = {json.loads(t)["id"] for t in part.read_text().splitlines() if t.endswith("}")}
    assert 1 <= len(done) < 3
    for png in out.glob("*.png"):  # whatever exists is whole
        Image.open(png).load()
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert counted["edits"] == 3 - len(done)
    assert sorted(p.name for p in out.iterdir()) == ["hat.png", "hat2.png", "results.jsonl",
                                                     "wide.png"]


def test_skip_invalid_records_the_skipped_lines(tiny_mlx, photos, tmp_path):  # noqa: F811
    good = _rows(photos)[0]
    m = _manifest(tmp_path / "m.jsonl", [good, "{not json", {**good, "id": "s", "steps": 0}])
    r = invoke("batch", m, "--output-dir", tmp_path / "out", "--model", tiny_mlx,
               "--skip-invalid", "--no-prompt-cache")
    assert r.exit_code == 1, r.output  # not every line was done
    assert "1/3 ok (0 done before, 2 invalid skipped)" in r.output
    records = [json.loads(t) for t in (tmp_path / "out" / "results.jsonl").read_text()
               .splitlines()]
    assert [(r.get("id"), r.get("line"), r["status"]) for r in records] == [
        ("hat", 1, "ok"), (None, 2, "skipped"), (None, 3, "skipped")]
    assert "JSON" in records[1]["error"] and "steps" in records[2]["error"]


def test_edit_lines_without_an_edit_model_fail_before_the_batch(photos, tmp_path,  # noqa: F811
                                                                monkeypatch, tiny_mlx):
    """The default Kontext repo cannot be had here (offline): one short line naming
    --edit-model, before any line runs or any model loads."""
    def no_load(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(pipeline_module.FluxPipeline, "from_pretrained", no_load)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    good = _rows(photos)[0]
    m = _manifest(tmp_path / "m.jsonl", [good, {**good, "id": "e", "mode": "edit"}])
    r = CliRunner().invoke(main, ["batch", str(m), "--output-dir", str(tmp_path / "out"),
                                  "--model", str(tiny_mlx), "--no-prompt-cache"])
    assert r.exit_code == 2, r.output
    error = r.output.strip().splitlines()[-1]
    assert "line 2 needs a FLUX.1 Kontext model" in error and "--edit-model" in error
    assert len(error) < 250 and not (tmp_path / "out").exists(), error
