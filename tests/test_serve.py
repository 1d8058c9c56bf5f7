"""`mlx-edit serve`: the HTTP API over the torch-free tiny checkpoint (FastAPI's
TestClient, in process; no socket is opened) and the `serve` command's checks."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import io
import json
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage import data

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from mlx_edit.cli import main  # noqa: E402
from mlx_edit.imaging.masks import blend_mask  # noqa: E402
from mlx_edit.serve import ServeConfig, create_app  # noqa: E402

FAST = {"steps": 2, "max_sequence_length": 8, "seed": 3, "grow_mask": 2, "feather": 3}
SIZE = (97, 75)  # odd: the result must keep it exactly


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo():
    img = Image.fromarray(data.astronaut()).resize(SIZE)
    mask = np.zeros(SIZE[::-1], np.uint8)
    mask[20:50, 30:70] = 255
    return img, mask


@pytest.fixture(scope="module")
def pipes(tiny_mlx):
    from mlx_edit.editing.fill import FluxFill

    return {"fill": FluxFill.from_pretrained(tiny_mlx)}


@pytest.fixture
def make_client(pipes):
    """make_client(**ServeConfig fields) -> a TestClient; its worker stops at teardown."""
    clients = []

    def make(**config):
        config = {"local_hosts": ("testserver",), **config}  # TestClient's Host
        client = TestClient(create_app(ServeConfig(**config), pipelines=pipes))
        clients.append(client.__enter__())
        return client
    yield make
    for c in clients:
        c.__exit__(None, None, None)


def submit(client, photo, options=FAST, headers=None, **fields):
    img, mask = photo
    files = {"image": ("photo.png", _png(img), "image/png")}
    if mask is not None:
        files["mask"] = ("mask.png", _png(Image.fromarray(mask)), "image/png")
    form = {"prompt": "a red hat", "options": options if isinstance(options, str)
            else json.dumps(options), **fields}
    return client.post("/v1/edits", data=form, files=files, headers=headers or {})


def wait(client, job_id, states=("done", "failed", "cancelled"), timeout=60.0, **kw):
    end = time.time() + timeout
    while time.time() < end:
        state = client.get(f"/v1/jobs/{job_id}", **kw).json()
        if state["state"] in states:
            return state
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} still {state}")


def test_inpaint_round_trip(make_client, photo):
    client = make_client()
    r = submit(client, photo)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    state = wait(client, job_id)
    assert state["state"] == "done", state
    assert state["step"] == state["total"] == 2 and state["images"] == 1
    assert state["timings"]["denoise_s"] > 0 and state["timings"]["run_s"] > 0
    png = client.get(f"/v1/jobs/{job_id}/images/0")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    out = Image.open(io.BytesIO(png.content))
    assert out.size == SIZE
    assert out.text["prompt"] == "a red hat" and out.text["seed"] == "3"
    src, mask = np.asarray(photo[0]), photo[1].astype(np.float32) / 255
    outside = blend_mask(mask, 2, 3) == 0
    res = np.asarray(out.convert("RGB"))
    assert np.array_equal(res[outside], src[outside])
    assert not np.array_equal(res[mask > 0], src[mask > 0])
    # The events replay the whole job, in order.
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as s:
        lines = list(s.iter_lines())
    kinds = [line[7:] for line in lines if line.startswith("event: ")]
    assert [k for k in kinds if k != "phase"] == ["queued", "running", "step", "step", "done"]
    phases = [json.loads(line[6:])["phase"] for line in lines if '"phase"' in line]
    assert {"text_encode", "vae_encode", "denoise", "vae_decode", "paste_back"} <= set(phases)
    assert client.get(f"/v1/jobs/{job_id}/images/1").status_code == 404
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 409  # already done


def test_json_body_with_base64(make_client, photo):
    import base64

    client = make_client()
    img, mask = photo
    body = {"prompt": "x", "mode": "inpaint", "options": FAST,
            "image": base64.b64encode(_png(img)).decode(),
            "mask": "data:image/png;base64," + base64.b64encode(
                _png(Image.fromarray(mask))).decode()}
    r = client.post("/v1/edits", json=body)
    assert r.status_code == 202, r.text
    assert wait(client, r.json()["id"])["state"] == "done"


def test_outpaint(make_client, photo):
    client = make_client()
    r = submit(client, (photo[0], None), {"steps": 1, "max_sequence_length": 8,
                                          "left": 16, "bottom": 8}, mode="outpaint")
    assert r.status_code == 202, r.text
    assert wait(client, r.json()["id"])["state"] == "done"
    out = Image.open(io.BytesIO(client.get(f"/v1/jobs/{r.json()['id']}/images/0").content))
    assert out.size == (SIZE[0] + 16, SIZE[1] + 8) and out.text["mode"] == "outpaint"


def test_cancel_running_job_stops_at_next_step(make_client, photo):
    client = make_client()
    job_id = submit(client, photo, {**FAST, "steps": 1000}).json()["id"]
    end = time.time() + 30
    while client.get(f"/v1/jobs/{job_id}").json()["step"] < 1 and time.time() < end:
        time.sleep(0.01)
    r = client.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 202 and r.json()["cancel_requested"]
    asked_at = r.json()["step"]
    state = wait(client, job_id)
    assert state["state"] == "cancelled" and state["total"] == 1000
    assert state["step"] <= asked_at + 1  # the step in progress, then nothing
    assert client.get(f"/v1/jobs/{job_id}/images/0").status_code == 409


def test_queue_full_is_429_and_queued_jobs_cancel_at_once(make_client, photo):
    client = make_client(max_queue=1)
    running = submit(client, photo, {**FAST, "steps": 1000}).json()["id"]
    wait(client, running, states=("running",))
    waiting = submit(client, photo)
    assert waiting.status_code == 202
    full = submit(client, photo)
    assert full.status_code == 429 and "queue is full" in full.json()["error"]
    assert client.get("/v1/health").json()["queued"] == 1
    assert client.delete(f"/v1/jobs/{waiting.json()['id']}").json()["state"] == "cancelled"
    client.delete(f"/v1/jobs/{running}")
    assert wait(client, running)["state"] == "cancelled"


@pytest.mark.parametrize("change,status,message", [
    ({"options": {"steps": 0}}, 400, "steps must be in 1..1000"),
    ({"options": {"nope": 1}}, 422, "unknown field in options: 'nope'"),
    ({"steps": "2"}, 422, "unknown field in the request: 'steps'"),  # not silently ignored
    ({"options": {"segment_model": "/etc"}}, 400, "names files on the server"),
    ({"options": {"num_images": 9}}, 400, "num_images must be <= 8"),
    ({"options": "[1"}, 400, "options must be JSON"),
    ({"mode": "edit"}, 400, "no model for edit"),
    ({"prompt": ""}, 400, "prompt is required"),
    ({"priority": "urgent"}, 400, "priority must be"),
    ({"points": "[[10, 20]]"}, 400, "this server has no segmenter"),
    ({"options": {"rank": "clip"}}, 400, "rank needs a ranker/"),
    ({"mode": "restyle"}, 400, "mode must be one of inpaint, outpaint, edit"),
    ({"mode": "outpaint", "options": {"left": 8}}, 400, "outpaint takes no mask"),
    ({"options": {"cache": "fbc:nan"}}, 400, "cache: fbc threshold must be a finite"),
    ({"options": {"cache": "mag:inf"}}, 400, "cache: mag threshold must be a finite"),
    ({"options": {"cache": "taylorseer:0"}}, 400, "cache: taylorseer cache_interval must"),
])
def test_bad_input_is_refused(make_client, photo, change, status, message):
    client = make_client()
    r = submit(client, photo, **change)
    assert r.status_code == status and message in r.json()["error"], r.text


def test_bad_uploads(make_client, photo):
    client = make_client(max_pixels=5000, max_upload_bytes=200_000)
    files = {"image": ("x.png", b"not an image", "image/png")}
    r = client.post("/v1/edits", data={"prompt": "x"}, files=files)
    assert r.status_code == 400 and "cannot read image" in r.json()["error"]
    r = submit(client, photo)  # 97x75 = 7275 px > 5000: refused from the header
    assert r.status_code == 413 and "over this server's limit" in r.json()["error"]
    # A 3000 x 3000 PNG of a few kB (a small decompression bomb): refused from its header.
    bomb = _png(Image.new("1", (3000, 3000)))
    assert len(bomb) < 10_000
    r = client.post("/v1/edits", data={"prompt": "x"},
                    files={"image": ("b.png", bomb, "image/png")})
    assert r.status_code == 413 and "3000x3000" in r.json()["error"], r.text
    r = client.post("/v1/edits", content=b"x" * 300_000,
                    headers={"content-type": "application/json"})
    assert r.status_code == 413
    chunked = client.post("/v1/edits", content=iter([b"x" * 100_000] * 3),
                          headers={"content-type": "application/json"})
    assert chunked.status_code == 413, chunked.text  # no Content-Length: counted as read
    r = submit(client, (photo[0].resize((60, 60)), None))
    assert r.status_code == 400 and "inpaint needs a mask" in r.json()["error"]


def test_token_and_404(make_client, photo):
    client = make_client(token="s3cret")
    assert submit(client, photo).status_code == 401
    r = submit(client, photo, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "token" in r.json()["error"]
    assert client.get("/v1/health").status_code == 200  # liveness needs no token
    good = {"Authorization": "Bearer s3cret"}
    job_id = submit(client, photo, headers=good).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}").status_code == 401
    assert wait(client, job_id, params={"token": "s3cret"})["state"] == "done"
    r = client.get("/v1/jobs/nope", headers=good)
    assert r.status_code == 404 and "no job nope" in r.json()["error"]
    assert client.get("/v1/nothing-here").status_code == 404


def test_other_sites_are_refused(make_client, photo):
    """A page on another site cannot post to the local server (Origin), nor reach it
    through a DNS name of its own (Host) when there is no token."""
    client = make_client()
    r = submit(client, photo, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["error"]
    assert client.get("/v1/health", headers={"Origin": "http://testserver"}).status_code == 200
    r = client.get("/v1/health", headers={"Host": "rebound.example:7860"})
    assert r.status_code == 403 and "Host" in r.json()["error"]
    tokened = make_client(token="t", local_hosts=("127.0.0.1",))
    assert tokened.get("/v1/health").status_code == 200  # with a token any Host may ask


def test_finished_jobs_are_evicted_oldest_first(make_client, photo):
    client = make_client(keep_jobs=1)
    first = submit(client, photo).json()["id"]
    wait(client, first)
    second = submit(client, photo).json()["id"]
    wait(client, second)
    assert client.get(f"/v1/jobs/{first}").status_code == 404
    assert client.get(f"/v1/jobs/{second}/images/0").status_code == 200


def test_page_and_docs_are_served(make_client):
    client = make_client()
    r = client.get("/")
    assert r.status_code == 200 and '<canvas id="mask"' in r.text
    assert "http://" not in r.text and "https://" not in r.text  # works offline: no CDN
    assert "/v1/edits" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_serve_refuses_public_host_without_token():
    r = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0"])
    assert r.exit_code == 2
    assert r.output.strip().startswith("Error:") and "--token" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_models_run_from_another_thread(pipes, photo):
    """MLX streams are per thread: an edit on the main thread, then on a worker thread."""
    img, mask = photo
    out = []
    pipes["fill"].inpaint(img, mask, "x", **{**FAST, "steps": 1})
    t = threading.Thread(target=lambda: out.append(
        pipes["fill"].inpaint(img, mask, "x", **{**FAST, "steps": 1})))
    t.start()
    t.join()
    assert out and out[0][0].size == SIZE


def test_interactive_jobs_run_before_batch(make_client, photo):
    client = make_client()
    blocker = submit(client, photo, {**FAST, "steps": 1000}).json()["id"]
    wait(client, blocker, states=("running",))
    batch = submit(client, photo, priority="batch").json()["id"]
    interactive = submit(client, photo).json()["id"]
    client.delete(f"/v1/jobs/{blocker}")
    b, i = wait(client, batch), wait(client, interactive)
    assert b["state"] == i["state"] == "done"
    assert i["started"] < b["started"]  # submitted later, ran first


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`mlx-edit serve` as a process on 127.0.0.1 (a free port), cwd `cwd`; `model` the
    --model (None: none given)."""

    def __init__(self, model, cwd, *args):
        import subprocess
        import sys

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from mlx_edit.cli import main; main()", "serve",
             *(["--model", str(model)] if model else []),
             "--host", "127.0.0.1", "--port", str(self.port),
             *(args or ("--no-prompt-cache",))],  # never the user's ~/.cache in tests
            cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_ready(self, client, timeout=60.0):
        import httpx

        end = time.time() + timeout
        while True:
            try:
                assert client.get("/v1/health").json()["status"] == "ok"
                return
            except httpx.TransportError:
                assert self.proc.poll() is None and time.time() < end, self.proc.stderr.read()
                time.sleep(0.2)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stderr.close()


def test_real_server_process(tiny_mlx, photo, tmp_path, tmp_path_factory):
    """`mlx-edit serve` as a process on 127.0.0.1: an edit over a socket; killed mid-job
    it leaves no file behind (results live in memory; the prompt cache is elsewhere)."""
    import signal

    import httpx

    cache = tmp_path_factory.mktemp("prompts")
    server = ServerProcess(tiny_mlx, tmp_path, "--prompt-cache", str(cache),
                           "--max-resident-gb", "100", "--preview-every", "2")
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            server.wait_ready(client)
            job_id = submit(client, photo).json()["id"]
            assert wait(client, job_id)["state"] == "done"
            png = Image.open(io.BytesIO(client.get(f"/v1/jobs/{job_id}/images/0").content))
            assert png.size == SIZE
            health = client.get("/v1/health").json()
            assert health["prompt_cache"] == {"hits": 0, "misses": 1}
            assert health["resident_budget_gb"] == 100
            long = submit(client, photo, {**FAST, "steps": 1000}).json()["id"]
            wait(client, long, states=("running",))
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        assert list(tmp_path.iterdir()) == []
        assert len([f for f in cache.iterdir() if not f.name.startswith(".")]) == 1
    finally:
        server.stop()


def test_bench_serve_runs(repo_root, tiny_mlx):
    """benchmarks/bench_serve.py end to end (few clients): nothing lost, bound kept."""
    import re
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "bench_serve.py"),
                           "--model", str(tiny_mlx), "--clients", "4", "--max-queue", "1",
                           "--size", "48x40", "--steps", "1"],
                          cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"serve: 4 clients, 4 done, 0 lost, \d+ 429s, max queued (\d) "
                     r"\(bound 1\); RSS [\d.]+ -> [\d.]+ GB; second CLI call / warm server "
                     r"edit: [\d.]+x", last)
    assert m and int(m.group(1)) <= 1, last


def test_kontext_edit_mode(tmp_path_factory, import_script, pipes, photo):
    """With a Kontext model configured, mode=edit runs an instruction edit (no mask), with
    `reference` uploads as further images (refused in other modes)."""
    from mlx_edit.editing.kontext import FluxKontext

    out = tmp_path_factory.mktemp("serve-kontext") / "tiny"
    ckpt = import_script("make_mlx_checkpoint").build(out, "tiny", extras=("kontext-model",))
    kontext = FluxKontext.from_pretrained(ckpt / "kontext-model")
    client = TestClient(create_app(ServeConfig(local_hosts=("testserver",)),
                                   pipelines={**pipes, "kontext": kontext}))
    with client:
        assert set(client.get("/v1/health").json()["models"]) == {"fill", "kontext"}
        r = submit(client, (photo[0], None), {"steps": 1, "max_sequence_length": 8,
                                              "width": 64, "height": 48,
                                              "auto_resize": False}, mode="edit")
        assert r.status_code == 202, r.text
        state = wait(client, r.json()["id"])
        assert state["state"] == "done", state
        png = client.get(f"/v1/jobs/{r.json()['id']}/images/0")
        out = Image.open(io.BytesIO(png.content))
        assert out.size == (64, 48) and out.text["mode"] == "edit"
        ref = ("ref.png", _png(photo[0].resize((40, 56))), "image/png")
        r = client.post("/v1/edits", files=[("image", ref), ("reference", ref)], data={
            "prompt": "x", "mode": "edit", "options": json.dumps(
                {"steps": 1, "max_sequence_length": 8, "auto_resize": False,
                 "keep_size": True})})
        assert r.status_code == 202, r.text
        assert wait(client, r.json()["id"])["state"] == "done"
        out = Image.open(io.BytesIO(client.get(f"/v1/jobs/{r.json()['id']}/images/0").content))
        assert out.size == (40, 56) and out.text["references"] == "2"  # the image + 1
        bad = client.post("/v1/edits", files=[("image", ref), ("reference", ref)],
                          data={"prompt": "x", "mode": "outpaint", "options": '{"left": 8}'})
        assert bad.status_code == 400 and "takes no reference" in bad.json()["error"]
        bad = submit(client, (photo[0], None), {"steps": 1, "left": 8}, mode="edit")
        assert bad.status_code == 400 and "edit does not take left" in bad.json()["error"]


def _fake_request(priority=0):
    from mlx_edit.options import EditOptions
    from mlx_edit.serve.uploads import EditRequest

    return EditRequest("inpaint", "fill", "x", Image.new("RGB", (8, 8)), None,
                       EditOptions(), priority)


def test_runner_failures_eviction_by_bytes_and_close():
    """JobRunner without a model: a failing edit is the job's error (the worker lives
    on); PNG bytes over keep_bytes evict the oldest finished jobs; close() cancels the
    waiting ones."""
    from mlx_edit.imaging.images import InputError
    from mlx_edit.serve.jobs import JobRunner, UnknownJob

    gate = threading.Event()

    def edit(request, progress):
        if request.prompt == "fail":
            raise InputError("the mask covers no pixel\nat the model's resolution")
        if request.prompt == "block":
            gate.wait(10)
        noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
        return [Image.fromarray(noise)], {"denoise_s": 0.5, "note": "dropped"}

    runner = JobRunner(edit, max_queue=4, keep_jobs=10, keep_bytes=15_000)
    try:
        bad = _fake_request()
        bad.prompt = "fail"
        failed = runner.submit(bad)
        done = [runner.submit(_fake_request()) for _ in range(2)]
        end = time.time() + 10
        while done[-1].state != "done" and time.time() < end:
            time.sleep(0.01)
        assert failed.state == "failed"
        assert failed.error == "the mask covers no pixel at the model's resolution"
        assert done[-1].stats["denoise_s"] == 0.5 and "note" not in done[-1].stats
        assert len(done[-1].images[0]) > 10_000  # one 64x64 noise PNG ~12 kB
        with pytest.raises(UnknownJob):
            runner.get(done[0].id)  # two PNGs exceed keep_bytes: the older went
        assert runner.get(done[1].id) is done[1]
        blocker = _fake_request()
        blocker.prompt = "block"
        blocking = runner.submit(blocker)
        while blocking.state != "running":
            time.sleep(0.01)
        waiting = runner.submit(_fake_request(priority=1))
        runner.close(timeout=0)  # cancels the waiting job before the blocker ends
    finally:
        gate.set()
        runner.close()
    assert waiting.state == "cancelled" and blocking.state in ("done", "cancelled")


def test_access_log_hides_the_token():
    import logging

    from mlx_edit.cli.serve import RedactToken

    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s"',
                               ("127.0.0.1", "GET", "/v1/jobs/x/events?token=s3cret&a=1"),
                               None)
    assert RedactToken().filter(record)
    assert "s3cret" not in record.getMessage() and "token=***&a=1" in record.getMessage()
