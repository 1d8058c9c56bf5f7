"""The OpenAI Images API of `mlx-edit serve` (serve/openai_api.py) with the official
`openai` client against a real uvicorn server on 127.0.0.1 (a free port), over the
torch-free tiny Fill and FLUX.2 [klein] folders; and `/docs` rendered by Chromium with
every request to another host blocked. One server for the module."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from skimage import data

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
from mlx_edit.imaging.masks import blend_mask  # noqa: E402
from mlx_edit.options import DEFAULT_FEATHER  # noqa: E402
from mlx_edit.serve import ServeConfig, create_app  # noqa: E402
from test_serve import SIZE, _free_port, _png  # noqa: E402
from test_serve_page import browser  # noqa: E402, F401  (the module's Chromium fixture)

TOKEN = "s3cret"
FAST = {"options": json.dumps({"steps": 2, "max_sequence_length": 64, "seed": 1})}


@pytest.fixture(scope="module")
def server(tiny_mlx, tiny_klein_mlx):
    """The URL of a server with Fill (inpaint) and klein (edit, generate), token TOKEN."""
    import uvicorn

    from mlx_edit.editing.fill import FluxFill
    from mlx_edit.editing.klein import FluxKlein

    app = create_app(ServeConfig(token=TOKEN), pipelines={
        "fill": FluxFill.from_pretrained(tiny_mlx),
        "kontext": FluxKlein.from_pretrained(tiny_klein_mlx)})
    port = _free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    end = time.time() + 60
    while not uv.started:
        assert thread.is_alive() and time.time() < end, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def photo():
    """(PNG of the photo, OpenAI mask PNG: transparent = edit)."""
    img = Image.fromarray(data.astronaut()).resize(SIZE)
    alpha = np.full(SIZE[::-1], 255, np.uint8)
    alpha[20:50, 30:70] = 0
    mask = Image.merge("RGBA", (*img.split(), Image.fromarray(alpha)))
    return _png(img), _png(mask)


def _client(server, token=TOKEN):
    return openai.OpenAI(base_url=server + "/v1", api_key=token, max_retries=0, timeout=120)


def _size(item) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(item.b64_json))).size


def test_edit_and_generate_with_the_openai_client(server, photo):
    client = _client(server)
    image, mask = photo
    # Inpaint (Fill, chosen by the mask); no size: the input's own odd size is kept.
    raw = client.images.with_raw_response.edit(
        image=("a.png", image, "image/png"), mask=("m.png", mask, "image/png"),
        prompt="a red hat", n=2, quality="high", extra_body=FAST)
    assert raw.headers["x-ignored-fields"] == "quality"
    out = raw.parse()
    assert len(out.data) == 2 and all(_size(d) == SIZE for d in out.data)
    src, res = np.asarray(Image.open(io.BytesIO(image))), np.asarray(Image.open(
        io.BytesIO(base64.b64decode(out.data[0].b64_json))).convert("RGB"))
    edited = np.asarray(Image.open(io.BytesIO(mask)))[..., 3] == 0  # transparent = edit
    outside = blend_mask(edited.astype(np.float32), 0, DEFAULT_FEATHER) == 0
    assert np.array_equal(res[outside], src[outside])  # the original, exactly
    assert not np.array_equal(res[edited], src[edited])
    # Instruction edit with two images (klein, by name), resized to the requested size.
    out = client.images.edit(image=[("a.png", image, "image/png"), ("b.png", image)],
                             prompt="make it blue", model="klein", size="64x48",
                             extra_body=FAST)
    assert [_size(d) for d in out.data] == [(64, 48)]
    # Text to image: klein generates; a url is the job's image, behind the same token.
    out = client.images.generate(prompt="a red hat", size="80x48", response_format="url",
                                 extra_body=FAST)
    png = httpx.get(out.data[0].url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert Image.open(io.BytesIO(png.content)).size == (80, 48)
    assert httpx.get(out.data[0].url).status_code == 401
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="x", model="fill")
    assert "models that do: klein" in e.value.body["message"]
    names = {m.id for m in client.models.list()}
    assert {"fill", "klein", "kontext"} <= names


def test_errors_have_openai_shape(server, photo):
    image, mask = photo
    with pytest.raises(openai.AuthenticationError) as e:
        _client(server, "wrong").images.generate(prompt="x")
    assert e.value.status_code == 401
    assert set(e.value.body) == {"message", "type", "param", "code"}
    assert "token" in e.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as e:  # a typo never runs silently
        _client(server).images.edit(image=("a.png", image), prompt="x",
                                    extra_body={"stepz": "2"})
    assert e.value.body["param"] == "stepz" and "'stepz'" in e.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as e:  # nested alike
        _client(server).images.generate(prompt="x", extra_body={"options": {"stepz": 2}})
    assert "unknown field in options: 'stepz'" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        _client(server).images.edit(image=("a.png", image), prompt="x", model="dall-e-2")
    assert "fill" in e.value.body["message"] and "klein" in e.value.body["message"]
    assert e.value.body["param"] == "model"


def test_docs_render_offline(server, browser):  # noqa: F811
    """Swagger UI from the server's own files: every request elsewhere is aborted."""
    page = browser.new_page()
    elsewhere = []

    def only_here(route):
        if route.request.url.startswith(server):
            return route.continue_()
        elsewhere.append(route.request.url)
        return route.abort()
    page.route("**/*", only_here)
    page.goto(server + "/docs")
    page.wait_for_selector(".opblock", timeout=60_000)
    assert page.locator(".opblock").count() >= 8
    assert "/v1/images/edits" in page.inner_text(".swagger-ui")
    assert elsewhere == []
    page.close()
