"""Bad and hostile input to `mlx-edit serve` (issue 30), the server sibling of
test_bad_inputs.py: a table of HTTP cases (status code + JSON message, no traceback,
nothing queued) and a table of `serve` command lines (exit 2, one line, before any model
loads). Requests run in process (FastAPI's TestClient) over the tiny checkpoint."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import base64
import io
import json
import socket

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from mlx_edit.cli import main  # noqa: E402
from mlx_edit.serve import ServeConfig, create_app  # noqa: E402
from mlx_edit.serve.uploads import MAX_JSON_DEPTH, MAX_JSON_TOKENS  # noqa: E402


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


IMAGE = _png(np.full((48, 64, 3), 128, np.uint8))
MASK = _png(np.pad(np.full((16, 16), 255, np.uint8), ((16, 16), (24, 24))))
FAST = {"steps": 1, "max_sequence_length": 8}


@pytest.fixture(scope="module")
def client(tiny_mlx, tiny_sam_mlx):
    """A server with the tiny Fill model and a segmenter (loaded only if a job needs it)."""
    from mlx_edit.fill import FluxFill

    config = ServeConfig(local_hosts=("testserver",), segment_model=str(tiny_sam_mlx))
    app = create_app(config, pipelines={"fill": FluxFill.from_pretrained(tiny_mlx)})
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def form(mask=True, **fields):
    """A multipart edit (image, mask, prompt, options) with `fields` replacing any."""
    data = {"prompt": "a hat", "options": json.dumps(FAST), **fields}
    files = {"image": ("a.png", IMAGE, "image/png")}
    if mask:
        files["mask"] = ("m.png", MASK, "image/png")
    return dict(data={k: v for k, v in data.items() if v is not None}, files=files)


def outpaint(**sides):
    return form(mask=False, mode="outpaint", options=json.dumps({**FAST, **sides}))


def body(text: str):
    return dict(content=text, headers={"content-type": "application/json"})


HTTP_CASES = [  # (id, route, request, status, message)
    ("deep JSON body", "/v1/edits", body(nested(100_000)), 422, "nested deeper than 16"),
    ("deep JSON object", "/v1/edits", body('{"a": ' + nested(5000) + "}"), 422,
     "nested deeper than 16"),
    ("deep body to masks", "/v1/masks", body(nested(100_000)), 422, "nested deeper"),
    ("wide JSON body", "/v1/edits", body("[" + "[]," * MAX_JSON_TOKENS + "[]]"), 422,
     f"over {MAX_JSON_TOKENS} brackets"),
    ("deep options field", "/v1/edits", form(options=nested(100_000)), 422,
     "options is nested deeper"),
    ("deep points field", "/v1/edits", form(points=nested(3000)), 422,
     "points is nested deeper"),
    ("huge form field", "/v1/edits", form(options="{" + " " * (2**20 + 1) + "}"), 413,
     "form field is over"),
    ("NUL in the prompt", "/v1/edits", form(prompt="a\x00b"), 400, "NUL"),
    ("options not JSON", "/v1/edits", form(options="{oops"), 400, "options must be JSON"),
    ("JSON body not JSON", "/v1/edits", body("{oops"), 400, "the JSON body is not valid"),
    ("JSON body a list", "/v1/edits", body("[1]"), 400, "must be an object"),
    # checked before queuing (they were 202, then a failed job)
    ("prompt over 64 KiB", "/v1/edits", form(prompt="x" * (2**16 + 1)), 413,
     "prompt is 65537 bytes, over the limit of 65536"),
    ("prompt over 64 KiB, JSON", "/v1/edits",
     body(json.dumps({"prompt": "x" * 10**6, "image": base64.b64encode(IMAGE).decode(),
                      "mask": base64.b64encode(MASK).decode()})), 413, "1000000 bytes"),
    ("click outside the image", "/v1/edits", form(mask=False, points="[[100, 10]]"), 400,
     "outside"),
    ("box outside the image", "/v1/edits", form(mask=False, box="[70, 0, 90, 10]"), 400,
     "box"),
    ("labels not matching", "/v1/edits",
     form(mask=False, points="[[10, 10], [20, 20]]", labels="[1]"), 400, "labels"),
    ("click outside, masks route", "/v1/masks", form(mask=False, points="[[-5, 10]]"), 400,
     "outside"),
    ("outpaint canvas too large", "/v1/edits",
     outpaint(left=16384, right=16384, top=16384, bottom=16384), 400, "over the limit"),
]


@pytest.mark.parametrize("route, request_kw, status, message",
                         [c[1:] for c in HTTP_CASES], ids=[c[0] for c in HTTP_CASES])
def test_http_refuses_bad_input(client, route, request_kw, status, message):
    queued = client.get("/v1/health").json()["queued"]
    r = client.post(route, **request_kw)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert message in r.json()["error"] and "Traceback" not in r.text
    assert client.get("/v1/health").json()["queued"] == queued


def test_depth_bound_is_inclusive(client):
    """MAX_JSON_DEPTH levels pass the bound (and fail later as an options error);
    one more is refused."""
    at = client.post("/v1/edits", **form(options=nested(MAX_JSON_DEPTH)))
    assert at.status_code == 400 and "options must be a JSON object" in at.json()["error"]
    over = client.post("/v1/edits", **form(options=nested(MAX_JSON_DEPTH + 1)))
    assert over.status_code == 422


def test_a_bug_answers_json_500(client, monkeypatch):
    """An unexpected exception in a handler is still a JSON answer (no reset, no HTML)."""
    from mlx_edit.serve import app as app_module

    def broken(*a, **k):
        raise RecursionError("maximum recursion depth exceeded")
    monkeypatch.setattr(app_module, "build_request", broken)
    r = client.post("/v1/edits", **form())
    assert r.status_code == 500
    assert r.json()["error"].startswith("internal error (RecursionError)")


@pytest.fixture(scope="module")
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


CLI_CASES = [  # (id, args, env, message)
    ("blank token, public host", ["--host", "0.0.0.0", "--token", "  "], {}, "blank"),
    ("blank token, loopback", ["--token", ""], {}, "--token (or MLX_EDIT_TOKEN) is blank"),
    ("blank env token", ["--host", "0.0.0.0"], {"MLX_EDIT_TOKEN": " "}, "blank"),
    ("public host, no token", ["--host", "0.0.0.0"], {}, "set --token"),
    ("busy port", ["--port", "{busy}"], {}, "the port is in use"),
    ("unknown host name", ["--host", "no-such-host.invalid", "--token", "t"], {},
     "cannot resolve"),
    ("address of another machine", ["--host", "192.0.2.7", "--token", "t"], {},
     "cannot listen on 192.0.2.7:7860"),
]


@pytest.mark.parametrize("args, env, message", [c[1:] for c in CLI_CASES],
                         ids=[c[0] for c in CLI_CASES])
def test_serve_command_refuses(args, env, message, busy_port, tmp_path, monkeypatch):
    """Exit 2 with one line, before any model loads (the default model is a repo id that
    would be downloaded: nothing is)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = [a.replace("{busy}", str(busy_port)) for a in args]
    r = CliRunner().invoke(main, ["serve", "--no-prompt-cache", *args], env=env)
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0].startswith("Error:") and message in lines[0], r.output


def test_prompt_of_exactly_the_bound_is_queued(client):
    r = client.post("/v1/edits", **form(prompt="x" * 2**16))
    assert r.status_code == 202, r.text
    client.delete(f"/v1/jobs/{r.json()['id']}")
