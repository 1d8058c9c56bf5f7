"""`mlx-edit serve --klein-model`: FLUX.2 [klein] resident next to (or instead of) the
FLUX.1 models under --max-resident-gb (LRU eviction), its instruction mode (reference
images) and inpaint mode (mask + an optional reference) over the HTTP API (the `model`
field, the health route's `serves`), the OpenAI route, and the page in Chromium driving
klein edits. Tiny torch-free Fill and klein folders, scikit-image photos."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import base64
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage import data

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from mlx_edit.cli import main  # noqa: E402
from mlx_edit.imaging.images import InputError  # noqa: E402
from mlx_edit.imaging.masks import blend_mask  # noqa: E402
from mlx_edit.options import DEFAULT_FEATHER  # noqa: E402
from mlx_edit.serve import ServeConfig, create_app  # noqa: E402
from test_serve import ServerProcess, _free_port, _png, submit, wait  # noqa: E402
from test_serve_page import (  # noqa: E402, F401  (browser: the module's Chromium)
    alpha,
    browser,
    line,
    new_page,
    open_photo,
    ready,
    run_and_download,
)

FAST = {"steps": 1, "max_sequence_length": 32, "seed": 3, "grow_mask": 0, "feather": 0}
SIZE = (120, 88)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """(photo path, mask (H, W) uint8, reference path, its PNG bytes): scikit-image's
    astronaut and coffee."""
    d = tmp_path_factory.mktemp("klein-photos")
    Image.fromarray(data.astronaut()).resize(SIZE).save(d / "astronaut.png")
    Image.fromarray(data.coffee()).resize((96, 72)).save(d / "coffee.png")
    mask = np.zeros(SIZE[::-1], np.uint8)
    mask[24:64, 30:90] = 255
    return d / "astronaut.png", mask, d / "coffee.png", (d / "coffee.png").read_bytes()


def _post(client, photos, mode, options=FAST, refs=1, mask=True, **fields):
    path, mask_px, _, ref = photos
    files = [("image", ("a.png", path.read_bytes(), "image/png"))]
    if mask:
        files.append(("mask", ("m.png", _png(Image.fromarray(mask_px)), "image/png")))
    files += [("reference", (f"r{i}.png", ref, "image/png")) for i in range(refs)]
    return client.post("/v1/edits", files=files, data={
        "prompt": "a cup of coffee", "mode": mode, "options": json.dumps(options), **fields})


def _image(client, job_id) -> Image.Image:
    return Image.open(io.BytesIO(client.get(f"/v1/jobs/{job_id}/images/0").content))


def test_klein_next_to_fill_under_a_budget(tiny_mlx, tiny_klein_mlx, photos):
    """Fill and klein with a budget that holds one: an edit (no kontext: klein, with a
    reference) evicts Fill; `model: klein` inpaints with a reference (pixels outside
    the mask the photo's exactly); a plain inpaint brings Fill back. Health names the
    models of each mode; wrong choices are one-line 400s before anything queues."""
    from mlx_edit.editing.fill import FluxFill
    from mlx_edit.editing.klein import FluxKlein
    from mlx_edit.serve.resident import pipeline_gb

    gb = [pipeline_gb(FluxFill.from_pretrained(tiny_mlx)),
          pipeline_gb(FluxKlein.from_pretrained(tiny_klein_mlx))]
    config = ServeConfig(model=str(tiny_mlx), klein_model=str(tiny_klein_mlx),
                         max_resident_gb=max(gb) + 0.5 * min(gb), local_hosts=("testserver",))
    with TestClient(create_app(config)) as client:
        health = client.get("/v1/health").json()
        assert health["models"] == {"fill": str(tiny_mlx), "klein": str(tiny_klein_mlx)}
        serves = health["serves"]
        assert {m: list(k) for m, k in serves.items()} == {
            "inpaint": ["fill", "klein"], "outpaint": ["fill"], "edit": ["klein"]}
        assert serves["inpaint"]["klein"]["references"] == 1
        assert serves["inpaint"]["fill"]["references"] == 0
        assert serves["edit"]["klein"]["title"] == "FLUX.2 [klein]"
        assert "auto_resize" in serves["edit"]["klein"]["refuses"]
        assert set(health["resident"]) == {"fill"}

        r = _post(client, photos, "edit", {**FAST, "keep_size": True}, refs=1, mask=False)
        done = wait(client, r.json()["id"])
        assert done["state"] == "done" and done["timings"]["load_s"] > 0, done
        out = _image(client, r.json()["id"])
        assert out.size == SIZE and out.text["references"] == "2"  # the photo + 1
        assert set(client.get("/v1/health").json()["resident"]) == {"klein"}

        r = _post(client, photos, "inpaint", model="klein")
        assert wait(client, r.json()["id"])["state"] == "done"
        out = _image(client, r.json()["id"])
        assert out.text["mode"] == "inpaint" and out.text["reference"] == "True"
        src, res = np.asarray(Image.open(photos[0])), np.asarray(out.convert("RGB"))
        inside = photos[1] > 0
        assert np.array_equal(res[~inside], src[~inside])
        assert not np.array_equal(res[inside], src[inside])

        r = _post(client, photos, "inpaint", refs=0)  # the default: Fill
        assert wait(client, r.json()["id"])["state"] == "done"
        assert set(client.get("/v1/health").json()["resident"]) == {"fill"}
        assert client.app.state.resident.evictions == ["fill", "klein"]

        for fields, says in [
                (dict(mode="inpaint", model="kontext"), "model must be one of fill, klein"),
                (dict(mode="outpaint", model="klein"), "model klein does not outpaint"),
                (dict(mode="inpaint"), "inpaint takes no reference images"),  # Fill
                (dict(mode="inpaint", model="klein", refs=2), "at most 1 reference image"),
                (dict(mode="edit", options={"auto_resize": False}, mask=False),
                 "auto_resize is not available with FLUX.2 [klein]")]:
            r = _post(client, photos, **fields)
            assert r.status_code == 400 and says in r.json()["error"], (fields, r.text)
        small = ("s.png", _png(Image.open(photos[0]).resize((40, 40))), "image/png")
        r = client.post("/v1/edits", files=[("image", small)], data={
            "prompt": "x", "mode": "edit", "options": json.dumps(FAST)})
        assert r.status_code == 400 and "image is 40x40 px" in r.json()["error"], r.text
        assert client.app.state.runner.queued == 0


def test_klein_alone(tiny_mlx, tiny_klein_mlx, photos):
    """--klein-model without --model serves klein only (no FLUX.1 download): inpaint
    runs on it, outpaint is refused; the OpenAI route inpaints on it (the image's
    transparency, the second image the reference); a FLUX.1 folder as --klein-model is
    one line before anything loads."""
    config = ServeConfig(klein_model=str(tiny_klein_mlx), local_hosts=("testserver",))
    with TestClient(create_app(config)) as client:
        health = client.get("/v1/health").json()
        assert health["models"] == {"klein": str(tiny_klein_mlx)}
        assert health["serves"]["outpaint"] == {}
        done = wait(client, _post(client, photos, "inpaint", refs=0).json()["id"])
        assert done["state"] == "done", done
        r = submit(client, (Image.open(photos[0]), None), FAST, mode="outpaint")
        assert r.status_code == 400 and "no model for outpaint" in r.text, r.text
        alpha = np.where(photos[1] > 0, 0, 255).astype(np.uint8)
        rgba = Image.merge("RGBA", (*Image.open(photos[0]).split(), Image.fromarray(alpha)))
        images = [("image[]", ("a.png", _png(rgba))), ("image[]", ("c.png", photos[3]))]
        r = client.post("/v1/images/edits", files=images, data={
            "prompt": "a cup", "model": "klein", "options": json.dumps(FAST)})
        assert r.status_code == 200, r.text
        out = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
        inside = photos[1] > 0
        src, res = np.asarray(Image.open(photos[0])), np.asarray(out.convert("RGB"))
        assert out.size == SIZE and out.text["mode"] == "inpaint"
        assert out.text["reference"] == "True"  # the second image
        assert np.array_equal(res[~inside], src[~inside])
        r = client.post("/v1/images/edits", files=images + images[1:], data={
            "prompt": "a cup", "model": "klein"})
        assert r.status_code == 400 and "at most 1 reference" in r.text, r.text
    with pytest.raises(InputError, match="holds a FLUX.1 model"):
        create_app(ServeConfig(klein_model=str(tiny_mlx)))
    r = CliRunner().invoke(main, ["serve", "--klein-model", str(tiny_mlx),
                                  "--port", str(_free_port())])
    assert r.exit_code == 2 and "holds a FLUX.1 model" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_page_drives_klein_edits(browser, tiny_mlx, tiny_klein_mlx, photos, tmp_path):  # noqa: F811
    """The page in Chromium against `mlx-edit serve --model FILL --klein-model KLEIN`:
    inpaint offers both models; klein shows one reference slot (a new file replaces
    the old); a painted stroke + a reference runs on klein (the photo outside the
    mask kept). Edit mode is klein's (no model choice, no Kontext-only auto-resize):
    several references added, one removed, the edit runs with the photo + two."""
    path, _, ref, _ = photos
    more = tmp_path / "more.png"
    Image.fromarray(data.chelsea()).resize((80, 64)).save(more)
    server = ServerProcess(tiny_mlx, tmp_path, "--no-prompt-cache", "--klein-model",
                           str(tiny_klein_mlx))
    try:
        page = new_page(browser, ready(server))
        open_photo(page, path)
        page.wait_for_function("serves !== null")
        assert page.is_visible("#model-row") and not page.is_visible("#ref-tools")
        assert [o.get_attribute("value") for o in page.query_selector_all("#model option")] \
            == ["fill", "klein"]
        page.select_option("#model", "klein")
        assert page.is_visible("#ref-tools") and not page.evaluate("document.getElementById('refs').multiple")
        page.set_input_files("#refs", str(more))
        page.set_input_files("#refs", str(ref))  # replaces: klein's inpaint takes one
        assert [e.get_attribute("title") for e in page.query_selector_all("#refs-list img")] \
            == ["coffee.png"]
        page.fill("#num", "1")
        line(page, (40, 30), (80, 50))
        out = run_and_download(page, "a cup of coffee", steps="1")
        assert out.size == SIZE and out.text["mode"] == "inpaint"
        assert out.text["reference"] == "True"
        drawn = (alpha(page) > 0).astype(np.float32)
        keep = blend_mask(drawn, 0, DEFAULT_FEATHER) == 0
        src = np.asarray(Image.open(path))
        assert keep.any() and np.array_equal(np.asarray(out.convert("RGB"))[keep], src[keep])

        page.select_option("#mode", "edit")
        assert not page.is_visible("#model-row") and page.input_value("#model") == "klein"
        assert not page.is_visible("#auto-resize") and page.evaluate("document.getElementById('refs').multiple")
        page.set_input_files("#refs", [str(more), str(ref)])
        page.click("#refs-list figure:first-child button")  # the coffee kept from inpaint
        assert page.locator("#refs-list img").count() == 2
        out = run_and_download(page, "put the cat in the cup", steps="1")
        assert out.size == SIZE and out.text["mode"] == "edit"
        assert out.text["references"] == "3" and out.text["keep_size"] == "True"
        assert "edit (klein)" in page.inner_text("#history figure:first-child figcaption")
    finally:
        server.stop()
