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
_gif = io.BytesIO()
Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(_gif, format="GIF")
GIF = _gif.getvalue()  # a readable image of a format the server does not take
MASK = _png(np.pad(np.full((16, 16), 255, np.uint8), ((16, 16), (24, 24))))
FAST = {"steps": 1, "max_sequence_length": 8}


@pytest.fixture(scope="module")
def client(tiny_mlx, tiny_sam_mlx):
    """A server with the tiny Fill model and a segmenter (loaded only if a job needs it)."""
    from mlx_edit.editing.fill import FluxFill

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
    ("click outside, masks route", "/v1/masks", form(mask=False, points="[[-5, 10]]", prompt=None,
                                              options=None), 400,
     "outside"),
    ("a GIF photo", "/v1/edits", dict(form(), files={"image": ("a.gif", GIF, "image/gif"),
                                                     "mask": ("m.png", MASK, "image/png")}),
     400, "image is GIF: upload a PNG, JPEG or WebP file"),
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


# ------------------------------------------------- the token on every route, defaults

# Routes served without the token: liveness, the web page (it asks for the token), the
# API docs (no data). Every other route, present or future, must refuse a request
# without it: a route added or changed without the auth dependency fails here.
OPEN_ROUTES = {"/v1/health", "/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json",
               "/docs-assets"}  # Swagger UI's own files


def _routes(app):
    """(method, path with its parameters filled) of every route of the app (FastAPI >=
    0.16x keeps an included router as one entry: its routes are listed from it)."""
    for entry in app.routes:
        routes = entry.effective_route_contexts() \
            if hasattr(entry, "effective_route_contexts") else [entry]
        for route in routes:
            methods = getattr(route, "methods", None) or \
                getattr(getattr(route, "original_route", None), "methods", None) or {"GET"}
            for method in sorted(methods - {"HEAD"}):
                yield method, route.path.replace("{job_id}", "nojob").replace("{k}", "0")


def test_every_route_but_the_open_ones_needs_the_token(tiny_mlx):
    from mlx_edit.editing.fill import FluxFill

    config = ServeConfig(local_hosts=("testserver",), token="s3cret")
    app = create_app(config, pipelines={"fill": FluxFill.from_pretrained(tiny_mlx)})
    routes = list(_routes(app))
    documented = {(m.upper(), p.replace("{job_id}", "nojob").replace("{k}", "0"))
                  for p, ops in app.openapi()["paths"].items() for m in ops}
    assert set(routes) >= documented | {("GET", "/")} and len(documented) >= 7
    with TestClient(app, raise_server_exceptions=False) as c:
        for method, path in routes:
            if path in OPEN_ROUTES:
                assert c.request(method, path + ("/swagger-ui.css" if "assets" in path else "")
                                 ).status_code == 200, path
                continue
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = c.request(method, path, headers=headers)
                assert r.status_code == 401, (method, path, headers, r.status_code)
                error = r.json()["error"]  # OpenAI's shape on its routes
                assert "token" in (error["message"] if path.startswith(
                    ("/v1/images", "/v1/models")) else error)
            r = c.request(method, path, params={"token": "wrong"})
            assert r.status_code == 401, (method, path)
            good = c.request(method, path, headers={"Authorization": "Bearer s3cret"})
            assert good.status_code not in (401, 403), (method, path)  # 400/404: past auth


def test_documented_defaults():
    """ServeConfig's defaults are the `serve` command's (its --help shows them) and the
    values the docs name."""
    from mlx_edit.cli.serve import serve_command
    from mlx_edit.serve.config import MB

    d = ServeConfig()
    assert (d.token, d.max_queue, d.max_upload_bytes, d.max_images, d.preview_every) == \
        (None, 16, 50 * MB, 8, 1)
    assert d.local_hosts == ("127.0.0.1", "localhost", "::1")
    cli = {p.name: p.default for p in serve_command.params}
    assert (cli["host"], cli["port"], cli["token"]) == ("127.0.0.1", 7860, None)
    assert cli["max_queue"] == d.max_queue and cli["max_images"] == d.max_images
    assert cli["max_upload_mb"] * MB == d.max_upload_bytes
    assert cli["preview_every"] == d.preview_every


def test_limits_are_inclusive(tiny_mlx):
    """A body of exactly max_upload_bytes and num_images == max_images pass their limits;
    one more is refused."""
    from mlx_edit.editing.fill import FluxFill

    config = ServeConfig(local_hosts=("testserver",), max_upload_bytes=1000, max_images=2)
    app = create_app(config, pipelines={"fill": FluxFill.from_pretrained(tiny_mlx)})
    with TestClient(app, raise_server_exceptions=False) as c:
        at = c.post("/v1/edits", **body("[" + " " * 998 + "]"))
        assert at.status_code == 400 and "must be an object" in at.json()["error"]
        over = c.post("/v1/edits", **body("[" + " " * 999 + "]"))
        assert over.status_code == 413
    config = ServeConfig(local_hosts=("testserver",), max_images=2)
    app = create_app(config, pipelines={"fill": FluxFill.from_pretrained(tiny_mlx)})
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/edits", **form(options=json.dumps({**FAST, "num_images": 3})))
        assert r.status_code == 400 and "num_images must be <= 2" in r.json()["error"]
        r = c.post("/v1/edits", **form(options=json.dumps({**FAST, "num_images": 2})))
        assert r.status_code == 202, r.text
        assert c.delete(f"/v1/jobs/{r.json()['id']}").status_code == 202


def test_prompt_of_exactly_the_bound_is_queued(client):
    r = client.post("/v1/edits", **form(prompt="x" * 2**16))
    assert r.status_code == 202, r.text
    client.delete(f"/v1/jobs/{r.json()['id']}")


def test_json_strings_do_not_count_as_nesting(client):
    """Brackets and escaped quotes inside strings, and a base64 image whose '/' are
    escaped (some JSON encoders do), pass the bounds: the request is queued."""
    image = base64.b64encode(IMAGE).decode()
    prompt = 'a "hat" ' + "[" * 40 + ' \\" {'
    text = json.dumps({"prompt": prompt, "image": image, "options": FAST,
                       "mask": base64.b64encode(MASK).decode()})
    r = client.post("/v1/edits", **body(text.replace("/", "\\/")))
    assert r.status_code == 202, r.text
    client.delete(f"/v1/jobs/{r.json()['id']}")
