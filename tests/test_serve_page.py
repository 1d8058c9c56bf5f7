"""The web page of `mlx-edit serve` in headless Chromium (Playwright, Debian's chromium;
skipped when either is missing): a painted mask, outpaint by dragging the photo's edges,
undo/redo, zoom and pan, the history strip and random seeds, a new photo or mode clearing
the old state, instruction mode with reference images (one server, Fill + Kontext, and
one browser for these), masks from clicks with a segmenter, step previews shown while a
job runs.

MLX_EDIT_SCREENSHOT=docs/serve-page.png: the history test also saves the page (1400x900)
after its edits there (the README's screenshot)."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import io
import json
import os

import httpx
import numpy as np
import pytest
from PIL import Image
from skimage import data

pytest.importorskip("fastapi")
from mlx_edit.imaging.masks import blend_mask  # noqa: E402
from mlx_edit.imaging.stitch import outpaint_canvas  # noqa: E402
from test_serve import SIZE, ServerProcess  # noqa: E402

CHROMIUM = "/usr/bin/chromium"  # Debian's package (apt-get install chromium)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module (one Playwright session: it cannot nest)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM}")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def ready(server):
    with httpx.Client(base_url=server.url, timeout=10) as client:
        server.wait_ready(client)
    return server


def new_page(browser, server, width=1100, height=760):
    page = browser.new_page(accept_downloads=True, viewport={"width": width, "height": height})
    page.set_default_timeout(120_000)  # a busy CI machine: waits are for events, not time
    page.goto(server.url + "/")
    return page


@pytest.fixture(scope="module")
def served(browser, tmp_path_factory, import_script):
    """(browser, server) shared by the tests below: a server (no segmenter) with the tiny
    Fill model and its Kontext twin (edit mode); the server's cwd is an empty folder that
    must stay empty."""
    out = tmp_path_factory.mktemp("serve-page") / "tiny"
    ckpt = import_script("make_mlx_checkpoint").build(out, "tiny", extras=("kontext-model",))
    cwd = tmp_path_factory.mktemp("serve-cwd")
    server = ServerProcess(ckpt, cwd, "--no-prompt-cache", "--kontext-model",
                           str(ckpt / "kontext-model"))
    try:
        yield browser, ready(server)
    finally:
        server.stop()
    assert list(cwd.iterdir()) == []


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory):
    img = Image.fromarray(data.astronaut()).resize(SIZE)
    path = tmp_path_factory.mktemp("in") / "photo.png"
    img.save(path)
    return img, path


def open_photo(page, path):
    page.set_input_files("#file", str(path))
    page.wait_for_function("document.getElementById('photo').width > 0")


def alpha(page):
    """The painted mask's alpha, (H, W) uint8."""
    a = page.evaluate("""() => { const m = document.getElementById('mask');
        const d = m.getContext('2d').getImageData(0, 0, m.width, m.height).data;
        return Array.from(d.filter((_, i) => i % 4 === 3)); }""")
    h, w = page.evaluate("[mask.height, mask.width]")
    return np.array(a, np.uint8).reshape(h, w)


def screen(page, x, y):
    """The viewport point over photo pixel (x, y)'s centre."""
    box, (h, w) = page.locator("#mask").bounding_box(), page.evaluate("[mask.height, mask.width]")
    return box["x"] + (x + 0.5) * box["width"] / w, box["y"] + (y + 0.5) * box["height"] / h


def drag_from(page, start, delta):
    """A left-button drag from viewport point `start` by `delta` (px)."""
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(start[0] + delta[0], start[1] + delta[1], steps=6)
    page.mouse.up()


def line(page, start, end):
    """A brush stroke from photo pixel `start` to `end`."""
    (x0, y0), (x1, y1) = screen(page, *start), screen(page, *end)
    drag_from(page, (x0, y0), (x1 - x0, y1 - y0))


def run_and_download(page, prompt="a red hat", steps="2"):
    """Fill the prompt and options, submit, wait for the picked result; the PNG."""
    page.fill("#prompt", prompt)
    page.fill("#steps", steps)
    page.fill("#seed", "3")
    page.click("#submit")
    page.wait_for_selector("#results img.picked")
    page.wait_for_function("document.querySelector('#results img').naturalWidth > 0")
    with page.expect_download() as download:
        page.click("#download")
    out = Image.open(download.value.path())
    out.load()
    return out


def drag(page, selector, dx, dy):
    box = page.locator(selector).bounding_box()
    drag_from(page, (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2), (dx, dy))


def test_paint_a_stroke_and_download(served, photo_file):
    """Open a photo, paint a stroke, submit, wait for the result, download it: the
    photo's size, the photo's pixels outside the painted mask (grown 0, feathered by the
    default 8 px); the step previews were shown."""
    img, path = photo_file
    page = new_page(*served)
    open_photo(page, path)
    page.eval_on_selector("#size", "e => { e.value = 12; }")
    line(page, (30, 30), (60, 45))
    out = run_and_download(page)
    assert page.get_attribute("#preview", "src").startswith("data:image/jpeg;base64,")
    painted = (alpha(page) > 0).astype(np.float32)
    assert 50 < painted.sum() < 0.5 * painted.size
    assert out.size == SIZE and out.text["prompt"] == "a red hat"
    outside = blend_mask(painted, 0, 8) == 0
    res, src = np.asarray(out.convert("RGB")), np.asarray(img)
    assert np.array_equal(res[outside], src[outside])
    assert not np.array_equal(res[painted > 0], src[painted > 0])


def test_outpaint_by_dragging_edges(served, photo_file):
    """Drag the right and bottom handles outward: the margins follow the pointer (photo
    px), the edit's result has the extended size with the photo's pixels kept exactly
    away from the seams."""
    img, path = photo_file
    page = new_page(*served)
    open_photo(page, path)
    page.select_option("#mode", "outpaint")
    for side in ("left", "right", "top", "bottom"):
        page.fill(f"#{side}", "0")
    scale = page.locator("#photo").bounding_box()["width"] / SIZE[0]
    drag(page, ".handle[data-side=right]", 40, 0)
    drag(page, ".handle[data-side=bottom]", 0, 24)
    drag(page, ".handle[data-side=left]", 30, 0)  # inward: stays 0
    margins = {s: int(page.input_value(f"#{s}")) for s in ("left", "right", "top", "bottom")}
    frame = page.locator("#frame").bounding_box()
    out = run_and_download(page, "a beach", steps="2")
    assert margins == {"left": 0, "right": round(40 / scale), "top": 0,
                       "bottom": round(24 / scale)}, margins
    assert abs(frame["width"] - (SIZE[0] + margins["right"]) * scale) <= 2
    assert out.size == (SIZE[0] + margins["right"], SIZE[1] + margins["bottom"])
    assert json.loads(out.text["expand"]) == [0, margins["right"], 0, margins["bottom"]]
    _, _, blend = outpaint_canvas(img, 0, margins["right"], 0, margins["bottom"])
    keep = (np.asarray(blend) == 0)[: SIZE[1], : SIZE[0]]
    assert keep.mean() > 0.3
    res = np.asarray(out.convert("RGB"))[: SIZE[1], : SIZE[0]]
    assert np.array_equal(res[keep], np.asarray(img)[keep])


def test_undo_redo_zoom_and_pan(served, photo_file):
    """Ctrl+Z / Ctrl+Shift+Z undo and redo strokes and clicks, while Ctrl+Z in the prompt
    stays the browser's text undo; the wheel zooms about the pointer (the photo pixel under
    it stays there) and the brush keeps its width in photo pixels; space + drag pans
    without painting."""
    _, path = photo_file
    page = new_page(*served)
    open_photo(page, path)
    page.eval_on_selector("#size", "e => { e.value = 4; }")
    line(page, (10, 10), (40, 10))
    first = alpha(page)
    line(page, (10, 40), (40, 40))
    both = alpha(page)
    page.keyboard.press("Control+z")
    assert np.array_equal(alpha(page), first) and first[40].max() == 0 < first[10].max()
    page.keyboard.press("Control+Shift+z")
    assert np.array_equal(alpha(page), both)
    page.click("#prompt")
    page.keyboard.type("a hat")
    page.keyboard.press("Control+z")
    assert page.input_value("#prompt") != "a hat"  # the text's own undo
    assert np.array_equal(alpha(page), both)
    page.evaluate("document.activeElement.blur(); "
                  "document.querySelector('input[value=click]').checked = true")
    page.mouse.click(*screen(page, 70, 20))
    assert page.evaluate("clicks.length") == 1
    page.keyboard.press("Control+z")
    assert page.evaluate("clicks.length") == 0 and np.array_equal(alpha(page), both)

    zoom, pointer = page.evaluate("zoom"), screen(page, 60, 30)
    page.mouse.move(*pointer)
    page.mouse.wheel(0, -300)
    page.wait_for_function(f"zoom > {zoom * 1.2}")
    assert np.allclose(screen(page, 60, 30), pointer, atol=0.5)
    page.check("input[value=brush]")
    page.eval_on_selector("#size", "e => { e.value = 4; }")
    line(page, (70, 20), (70, 60))
    width = (alpha(page)[40, 60:80] > 0).sum()
    assert 3 <= width <= 6, width  # 4 photo px at ~10 screen px each

    before, painted = page.locator("#mask").bounding_box(), alpha(page)
    page.keyboard.down("Space")
    drag_from(page, screen(page, 50, 50), (50, 30))
    page.keyboard.up("Space")
    after = page.locator("#mask").bounding_box()
    assert abs(after["x"] - before["x"] - 50) < 1 and abs(after["y"] - before["y"] - 30) < 1
    assert np.array_equal(alpha(page), painted)


def submitted(page, count):
    """Submit and wait for the history to hold `count` results."""
    page.click("#submit")
    page.wait_for_function(f"document.querySelectorAll('#history img').length === {count}"
                           " && document.querySelector('#history img').naturalWidth > 0")


def captions(page, selector):
    return [e.inner_text() for e in page.query_selector_all(selector)]


def test_history_seeds_and_new_photo(served, photo_file, tmp_path):
    """Unlocked, each submit draws a new seed; the candidates show their seeds and are
    scrolled into view; the history keeps every result across a new submit and an error,
    reloads one's settings (its seed, locked) and downloads it. A new photo clears the old
    preview, results and mask (the history stays); outpaint hides the mask, and switching
    mode clears it (undoably)."""
    img, path = photo_file
    page = new_page(*served, 1100, 500)  # the results below the fold
    open_photo(page, path)
    line(page, (20, 20), (50, 40))
    page.fill("#prompt", "a red hat")
    page.fill("#steps", "1")
    submitted(page, 1)
    first = int(page.input_value("#seed"))
    assert not page.is_checked("#seed-lock")
    assert captions(page, "#results figcaption") == [f"seed {first}"]
    page.wait_for_function("""() => { const r = results.getBoundingClientRect();
        return r.top >= 0 && r.bottom <= innerHeight + 1; }""")
    assert page.evaluate("scrollY") > 0  # below the fold at first: scrolled into view
    page.fill("#num", "2")
    submitted(page, 3)
    second = int(page.input_value("#seed"))
    assert second != first
    assert captions(page, "#results figcaption") == [f"seed {second}", f"seed {second + 1}"]
    page.fill("#steps", "0")  # refused by the server
    page.click("#submit")
    page.wait_for_selector("#status.error")
    assert "steps" in page.inner_text("#status")
    assert page.locator("#history img").count() == 3 == page.locator("#results img").count() + 1
    assert [c.split(" \u00b7 ")[1] for c in captions(page, "#history figcaption")] == \
        [f"seed {second + 1}", f"seed {second}", f"seed {first}"]
    if os.environ.get("MLX_EDIT_SCREENSHOT"):
        page.set_viewport_size({"width": 1400, "height": 900})
        page.evaluate("fit(); scrollTo(0, 0)")
        page.screenshot(path=os.environ["MLX_EDIT_SCREENSHOT"])
    page.click("#history figure:last-child img")
    assert (page.input_value("#seed"), page.input_value("#num"), page.input_value("#steps"),
            page.is_checked("#seed-lock")) == (str(first), "1", "1", True)
    with page.expect_download() as download:
        page.click("#history figure:last-child a")
    out = Image.open(download.value.path())
    assert out.size == SIZE and out.text["seed"] == str(first)

    other = tmp_path / "other.png"
    img.resize((80, 64)).save(other)
    page.set_input_files("#file", str(other))
    page.wait_for_function("photo.width === 80")
    assert page.locator("#results img").count() == 0 and not page.is_visible("#download")
    assert not page.is_visible("#live") and alpha(page).max() == 0
    assert page.is_disabled("#undo") and page.locator("#history img").count() == 3
    line(page, (20, 20), (50, 40))
    page.select_option("#mode", "outpaint")
    assert not page.is_visible("#mask") and page.is_enabled("#undo")
    page.select_option("#mode", "inpaint")
    assert alpha(page).max() == 0
    page.click("#undo")
    assert alpha(page).max() > 0


def test_instruction_mode_with_references(served, photo_file, tmp_path):
    """Edit mode speaks of an instruction (not of what to paint); reference images are
    added (several at once), shown as thumbnails and removed; the edit runs on Kontext
    with the photo and the two references left, at the photo's own size (keep-size)."""
    img, path = photo_file
    page = new_page(*served)
    open_photo(page, path)
    page.select_option("#mode", "edit")
    assert page.inner_text("#prompt-label").startswith("Instruction")
    assert "what to paint" not in page.inner_text("aside").lower()
    refs = []
    for name, size in (("a", (40, 56)), ("b", (64, 48)), ("c", (48, 48))):
        refs.append(tmp_path / f"{name}.png")
        img.resize(size).save(refs[-1])
    page.set_input_files("#refs", [str(r) for r in refs[:2]])
    assert page.locator("#refs-list img").count() == 2
    page.click("#refs-list figure:first-child button")
    page.set_input_files("#refs", str(refs[2]))
    assert [e.get_attribute("title") for e in page.query_selector_all("#refs-list img")] == \
        ["b.png", "c.png"]
    assert page.is_checked("#keep-size")
    page.uncheck("#auto-resize")  # references at their own size: a fast tiny edit
    out = run_and_download(page, "make the suit gold", steps="1")
    assert out.size == SIZE and out.text["mode"] == "edit"
    assert out.text["references"] == "3" and out.text["keep_size"] == "True"


@pytest.mark.parity  # the SAM fixture is built with transformers
def test_click_to_mask(browser, tiny_mlx, tmp_path, tmp_path_factory, import_script):
    """With a segmenter: click the object (and shift-click beside it), submit: the
    server segments the clicks; only pixels inside that mask (grown 0, feathered 8)
    change. "Preview mask" turns the clicks into the painted mask."""
    sam = import_script("sam_fixtures").build_sam(tmp_path_factory.mktemp("sam") / "t", "tiny")
    size = (200, 150)
    path = tmp_path / "in" / "coffee.png"
    path.parent.mkdir()
    img = Image.fromarray(data.coffee()).resize(size)
    img.save(path)
    clicks = [((100, 75), 1), ((20, 20), 0)]
    server = ServerProcess(tiny_mlx, tmp_path, "--no-prompt-cache", "--segment-model",
                           str(sam))
    try:
        page = new_page(browser, ready(server))
        open_photo(page, path)
        page.wait_for_selector("label.sam:not(.hidden)")
        page.check("input[name=tool][value=click]")
        box = page.locator("#mask").bounding_box()
        for (x, y), label in clicks:
            if not label:
                page.keyboard.down("Shift")
            page.mouse.click(box["x"] + (x + 0.5) * box["width"] / size[0],
                             box["y"] + (y + 0.5) * box["height"] / size[1])
            page.keyboard.up("Shift")
        sent = page.evaluate("() => clicks")
        out = run_and_download(page, "a cup", steps="1")
        page.click("#preview-mask")
        page.wait_for_function("clicks.length === 0")
        if os.environ.get("MLX_EDIT_SCREENSHOT"):
            page.screenshot(path=os.environ["MLX_EDIT_SCREENSHOT"], full_page=True)
        alpha = page.evaluate("""() => { const m = document.getElementById('mask');
            const d = m.getContext('2d').getImageData(0, 0, m.width, m.height).data;
            return Array.from(d.filter((_, i) => i % 4 === 3)); }""")
        with httpx.Client(base_url=server.url, timeout=60) as client:
            r = client.post("/v1/masks", files={"image": ("c.png", path.read_bytes())},
                            data={"points": json.dumps([c[0] for c in clicks]),
                                  "labels": json.dumps([c[1] for c in clicks])})
    finally:
        server.stop()
    assert [(tuple(c["xy"]), c["label"]) for c in sent] == clicks
    want = np.asarray(Image.open(io.BytesIO(r.content))) > 0
    assert want.any() and not want.all()
    painted = np.array(alpha).reshape(size[::-1]) > 0
    assert np.array_equal(painted, want)  # the preview is the mask the edit used
    keep = blend_mask(want.astype(np.float32), 0, 8) == 0
    res, src = np.asarray(out.convert("RGB")), np.asarray(img)
    assert out.size == size and keep.any()
    assert np.array_equal(res[keep], src[keep]) and not np.array_equal(res[want], src[want])


def test_mask_from_words(browser, tiny_mlx, tiny_sam3_mlx, tmp_path):
    """With a text segmenter (SAM 3): type a phrase and "Find": the server's mask of
    every instance (threshold 0: random weights score ~0.2-0.35) becomes the painted
    mask, the same as /v1/masks gives for that text."""
    path = tmp_path / "in" / "astronaut.png"
    path.parent.mkdir()
    Image.fromarray(data.astronaut()).resize(SIZE).save(path)
    server = ServerProcess(tiny_mlx, tmp_path, "--no-prompt-cache", "--text-segment-model",
                           str(tiny_sam3_mlx))
    try:
        page = new_page(browser, ready(server))
        open_photo(page, path)
        page.wait_for_selector("div.sam3:not(.hidden)")
        page.fill("#mask-text", "a person")
        page.fill("#mask-threshold", "0")
        page.click("#text-mask")
        page.wait_for_function("document.getElementById('status').textContent"
                               ".startsWith('mask of')")
        painted = alpha(page) > 0
        with httpx.Client(base_url=server.url, timeout=60) as client:
            r = client.post("/v1/masks", files={"image": ("a.png", path.read_bytes())},
                            data={"text": "a person", "threshold": "0"})
    finally:
        server.stop()
    want = np.asarray(Image.open(io.BytesIO(r.content))) > 0
    assert want.any() and not want.all() and np.array_equal(painted, want)
