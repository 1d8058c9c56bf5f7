"""`mlx-edit serve` around its models: step previews in the events, resident models
evicted by estimated size, the shared on-disk prompt cache, masks from clicks with a
resident segmenter (`/v1/masks`). Tiny torch-free fixture, in process (TestClient)."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import base64
import gc
import io
import json
import time
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from mlx_edit.imaging.masks import blend_mask  # noqa: E402
from mlx_edit.serve import ServeConfig, create_app  # noqa: E402
import test_serve  # noqa: E402
from test_serve import FAST, SIZE, _png, submit, wait  # noqa: E402

# test_serve's fixtures, shared (pytest finds fixtures among a module's names)
make_client, photo, pipes = test_serve.make_client, test_serve.photo, test_serve.pipes


def _events(client, job_id) -> list[dict]:
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as s:
        return [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]


def _decode(url: str) -> Image.Image:
    head, data = url.split(",", 1)
    assert head == "data:image/jpeg;base64"
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    img.load()
    return img


@pytest.mark.parametrize("every,max_side,want", [(1, 256, [1, 2, 3]), (2, 5, [2, 3]),
                                                 (0, 256, [])])
def test_step_events_carry_previews(make_client, photo, every, max_side, want):
    client = make_client(preview_every=every, preview_max_side=max_side)
    job_id = submit(client, photo, {**FAST, "steps": 3}).json()["id"]
    assert wait(client, job_id)["state"] == "done"
    steps = [e for e in _events(client, job_id) if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3]
    assert [e["step"] for e in steps if "preview" in e] == want
    for e in steps:
        if "preview" in e:
            img = _decode(e["preview"])
            assert list(img.size) == e["preview_size"] and img.mode == "RGB"
            assert max(img.size) <= max_side and min(img.size) >= 1
    if every == 1:  # one latent pixel per 8 px of the model canvas (crop window)
        w, h = steps[0]["preview_size"]
        assert 8 <= w <= SIZE[0] // 4 and 8 <= h <= SIZE[1] // 4


def test_previews_follow_denoise_steps_when_progress_counts_windows(monkeypatch):
    """A tiled run reports progress in windows x steps (pipeline.run): previews still
    come every `every` denoise steps, with that step's sigma."""
    import mlx.core as mx

    from mlx_edit.serve.preview import Previewer

    monkeypatch.setattr(Previewer, "image", lambda self, pipe, x, size: np.zeros((4, 4, 3)))
    reports = []
    job = SimpleNamespace(sigmas=np.linspace(1, 0, 5, dtype=np.float32),
                          latents=mx.zeros((1, 4, 64)),
                          plan=SimpleNamespace(model_size=(32, 32)))
    progress = Previewer().for_job(None, lambda step, total, **kw: reports.append(
        (step, total, "preview" in kw)), every=2, max_side=8)
    windows = 3
    for i in range(4):
        progress((i + 1) * windows, 4 * windows, job)
    assert reports == [(3, 12, False), (6, 12, True), (9, 12, False), (12, 12, True)]


def test_old_previews_are_dropped_from_long_jobs(make_client, photo):
    from mlx_edit.serve.jobs import PREVIEWS_KEPT

    client = make_client()
    job_id = submit(client, photo, {**FAST, "steps": PREVIEWS_KEPT + 3}).json()["id"]
    assert wait(client, job_id)["state"] == "done"
    steps = [e for e in _events(client, job_id) if e["event"] == "step"]
    assert [e["step"] for e in steps if "preview" in e] == list(
        range(4, PREVIEWS_KEPT + 4))


def test_projection_fit_recovers_a_linear_encoder(photo):
    """With an encoder that is linear in colour (as real VAE latents roughly are), the
    fitted map turns a photo's latents back into its 8x-downsampled colours."""
    import mlx.core as mx

    from mlx_edit.sampling.latents import pack_latents
    from mlx_edit.serve.preview import fit_projection

    g = np.random.default_rng(0)
    a, c = g.standard_normal((3, 16)).astype(np.float32), g.standard_normal(16)

    def encode(px):
        h, w = px.shape[0] // 8, px.shape[1] // 8
        rgb = px.reshape(h, 8, w, 8, 3).mean(axis=(1, 3))
        return pack_latents(mx.array((rgb @ a + c).astype(np.float32))[None])

    m = fit_projection(encode)
    px = np.asarray(photo[0].resize((96, 80)), np.float32) / 127.5 - 1
    z = np.array(encode(px)).reshape(5, 6, 16, 2, 2).transpose(0, 3, 1, 4, 2)
    got = z.reshape(10, 12, 16) @ m[:-1] + m[-1]
    want = px.reshape(10, 8, 12, 8, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_resident_models_evicted_lru_by_size(caplog):
    """Fake models and sizes: a model that does not fit evicts the least recently used
    first; one in use is never evicted; one without a loader stays."""
    from mlx_edit.serve.resident import Resident

    sizes = {"a": 6.0, "b": 5.0, "c": 1.0, "pinned": 0.5}
    loads, resident_at_load = [], []

    def loader(kind):
        return lambda: (loads.append(kind), resident_at_load.append(list(res.models)),
                        SimpleNamespace(kind=kind))[-1]

    res = Resident({k: loader(k) for k in "abc"}, lambda kind, m: sizes[kind], 11.0,
                   preloaded={"pinned": SimpleNamespace(kind="pinned")})
    assert res.get("a").kind == "a" and res.get("c").kind == "c"
    assert list(res.models) == ["pinned", "a", "c"] and res.total_gb == 7.5
    res.get("a")  # now c is the least recently used
    res.get("b")  # 12.5 > 11: c goes (11.5), then a (5.5); never the loader-less one
    assert res.evictions == ["c", "a"] and list(res.models) == ["pinned", "b"]
    assert res.get("b") is res.models["b"] and loads == ["a", "c", "b"]
    with res.using("b"), caplog.at_level("WARNING", "mlx_edit.serve"):
        res.get("a")  # b is in use: both stay, over budget, with a warning
    assert list(res.models) == ["pinned", "b", "a"] and "does not fit" in caplog.text
    res.get("c")  # b (least recent, no longer in use) goes: 0.5 + 6 + 1
    assert list(res.models) == ["pinned", "a", "c"] and res.total_gb == 7.5
    # a kind loaded before has a known size: room is made before its loader runs
    res.get("b")  # 7.5 + 5 > 11: a (least recent) is evicted first, then b loads
    assert resident_at_load[-1] == ["pinned", "c"] and list(res.models) == ["pinned", "c", "b"]
    with pytest.raises(KeyError):
        res.get("kontext")


def test_server_evicts_pipelines_by_estimate(tiny_mlx, photo):
    """Through the app: a budget below Fill's estimate still serves (Fill alone), and
    the health route reports the resident estimate."""
    from mlx_edit.serve.resident import pipeline_gb

    config = ServeConfig(model=str(tiny_mlx), max_resident_gb=1e-6,
                         local_hosts=("testserver",))
    with TestClient(create_app(config)) as client:
        health = client.get("/v1/health").json()
        assert set(health["resident"]) == {"fill"} and health["resident_budget_gb"] == 1e-6
        assert health["models"] == {"fill": str(tiny_mlx)} and health["segmenter"] is False
        fill = client.app.state.resident.models["fill"]
        assert health["resident"]["fill"] == round(pipeline_gb(fill), 3) > 0
        assert wait(client, submit(client, photo).json()["id"])["state"] == "done"


def test_second_server_reads_prompts_from_the_disk_cache(tiny_mlx, photo, tmp_path,
                                                         monkeypatch):
    """A server started on the cache folder of an earlier one loads no text encoder for
    a prompt the earlier one encoded."""
    import mlx_edit.editing.prompts as prompts
    from mlx_edit.editing.fill import FluxFill

    config = ServeConfig(prompt_cache=str(tmp_path / "prompts"), local_hosts=("testserver",))

    def serve_once():
        app = create_app(config, pipelines={"fill": FluxFill.from_pretrained(tiny_mlx)})
        with TestClient(app) as client:
            state = wait(client, submit(client, photo).json()["id"])
            assert state["state"] == "done", state
            return state["timings"], client.get("/v1/health").json()["prompt_cache"]

    first, cache1 = serve_once()
    assert cache1 == {"hits": 0, "misses": 1} and len(list((tmp_path / "prompts").iterdir())) == 1

    def no_text_encoder(*a, **k):
        raise AssertionError("a text encoder was loaded for a cached prompt")
    monkeypatch.setattr(prompts, "load_t5", no_text_encoder)
    monkeypatch.setattr(prompts.lora_text, "load_clip", no_text_encoder)
    second, cache2 = serve_once()
    assert cache2 == {"hits": 1, "misses": 0}
    assert second["text_encode_s"] < first["text_encode_s"]


class FakeSegmenter:
    """A stand-in for `segment.Segmenter`: a 12 px disc around each positive click minus
    those around negative ones (or the box); prompts checked as SAM's are."""

    model = SimpleNamespace(parameters=lambda: {})

    def set_image(self, image):
        self.size = image.size

    def best_mask(self, points=None, labels=None, boxes=None):
        from mlx_edit.editing.segment import prompt_arrays

        w, h = self.size
        prompt_arrays(points, labels, boxes, (h, w), 1024)  # InputError as SAM's
        yy, xx = np.mgrid[:h, :w]
        out = np.zeros((h, w), bool)
        for (x, y), label in zip(points or [], labels or [1] * len(points or [])):
            disc = (xx - x) ** 2 + (yy - y) ** 2 <= 144
            out = out | disc if label else out & ~disc
        for x0, y0, x1, y1 in boxes or []:
            out |= (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
        return out


@pytest.fixture
def seg_client(pipes):
    return lambda **kw: TestClient(create_app(
        ServeConfig(local_hosts=("testserver",), **kw),
        pipelines={**pipes, "segmenter": FakeSegmenter()})).__enter__()


def test_masks_endpoint_and_edits_from_clicks(seg_client, photo):
    client = seg_client()
    health = client.get("/v1/health").json()
    assert health["segmenter"] is True and set(health["models"]) == {"fill", "segmenter"}
    files = {"image": ("p.png", _png(photo[0]), "image/png")}
    r = client.post("/v1/masks", files=files,
                    data={"points": "[[40, 30], [46, 30]]", "labels": "[1, 0]"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    mask = np.asarray(Image.open(io.BytesIO(r.content)))
    assert mask.shape == SIZE[::-1] and mask[30, 32] == 255 and mask[30, 46] == 0
    assert set(np.unique(mask)) == {0, 255}
    box = client.post("/v1/masks", files=files, data={"box": "[10, 10, 20, 30]"})
    assert (np.asarray(Image.open(io.BytesIO(box.content))) > 0).sum() == 200
    for data, message in (({"points": "[[500, 10]]"}, "outside"), ({}, "send points")):
        bad = client.post("/v1/masks", files=files, data=data)
        assert bad.status_code == 400 and message in bad.json()["error"], bad.text
    job = submit(client, (photo[0], None), points="[[50, 40]]")
    state = wait(client, job.json()["id"])
    assert state["state"] == "done" and state["timings"]["segment_s"] >= 0, state
    out = np.asarray(Image.open(io.BytesIO(
        client.get(f"/v1/jobs/{job.json()['id']}/images/0").content)).convert("RGB"))
    seg = FakeSegmenter()
    seg.set_image(photo[0])
    keep = blend_mask(seg.best_mask([(50, 40)], [1]).astype(np.float32), 2, 3) == 0
    src = np.asarray(photo[0])
    assert np.array_equal(out[keep], src[keep]) and not np.array_equal(out[~keep], src[~keep])
    client.__exit__(None, None, None)


def test_masks_run_between_steps_of_a_running_edit(seg_client, photo):
    client = seg_client()
    long = submit(client, photo, {**FAST, "steps": 1000}).json()["id"]
    wait(client, long, states=("running",))
    t0 = time.time()
    r = client.post("/v1/masks", data={"points": "[[40, 30]]"},
                    files={"image": ("p.png", _png(photo[0]), "image/png")})
    assert r.status_code == 200 and time.time() - t0 < 30
    assert client.get(f"/v1/jobs/{long}").json()["state"] == "running"
    client.delete(f"/v1/jobs/{long}")
    assert wait(client, long)["state"] == "cancelled"
    client.__exit__(None, None, None)


def test_masks_need_a_segmenter(make_client, photo):
    r = make_client().post("/v1/masks", data={"points": "[[4, 4]]"},
                           files={"image": ("p.png", _png(photo[0]), "image/png")})
    assert r.status_code == 400 and "no segmenter" in r.json()["error"]


@pytest.mark.parametrize("args,message", [(["--max-resident-gb", "0"], "max-resident-gb"),
                                          (["--preview-every", "-1"], "preview-every"),
                                          (["--prompt-cache-gb", "0"], "prompt-cache-gb")])
def test_serve_flags_checked(args, message):
    from click.testing import CliRunner

    from mlx_edit.cli import main

    r = CliRunner().invoke(main, ["serve", *args])
    assert r.exit_code == 2 and message in r.output
    assert len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("field,value", [("preview_every", -1), ("preview_max_side", 0),
                                         ("max_resident_gb", 0.0), ("prompt_cache_gb", -1)])
def test_config_refuses_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        ServeConfig(**{field: value})


def test_fill_and_kontext_take_turns_under_a_budget(tmp_path_factory, import_script, photo):
    """A budget that holds Fill or Kontext but not both: an edit evicts Fill to load
    Kontext, the next inpaint brings Fill back (its timings show the load)."""
    from mlx_edit.editing.fill import FluxFill
    from mlx_edit.editing.kontext import FluxKontext
    from mlx_edit.serve.resident import pipeline_gb

    root = import_script("make_mlx_checkpoint").build(
        tmp_path_factory.mktemp("serve-lru") / "tiny", "tiny", extras=("kontext-model",))
    gb = [pipeline_gb(FluxFill.from_pretrained(root)),
          pipeline_gb(FluxKontext.from_pretrained(root / "kontext-model"))]
    config = ServeConfig(model=str(root), kontext_model=str(root / "kontext-model"),
                         max_resident_gb=max(gb) + 0.5 * min(gb), local_hosts=("testserver",))
    edit = {"steps": 1, "max_sequence_length": 8, "width": 64, "height": 48,
            "auto_resize": False}
    with TestClient(create_app(config)) as client:
        resident = lambda: set(client.get("/v1/health").json()["resident"])  # noqa: E731
        assert resident() == {"fill"}
        fill = weakref.ref(client.app.state.resident.models["fill"])
        done = wait(client, submit(client, (photo[0], None), edit, mode="edit").json()["id"])
        assert done["state"] == "done" and done["timings"]["load_s"] > 0, done
        assert resident() == {"kontext"}
        gc.collect()
        assert fill() is None  # evicted means freed: nothing else holds the pipeline
        done = wait(client, submit(client, photo).json()["id"])
        assert done["state"] == "done" and done["timings"]["load_s"] > 0, done
        assert resident() == {"fill"}
        again = wait(client, submit(client, photo).json()["id"])
        assert "load_s" not in again["timings"]  # resident: nothing loaded
        assert client.app.state.resident.evictions == ["fill", "kontext"]
