"""The FastAPI app of `mlx-edit serve`: routes over a JobRunner and resident models
(serve/resident.py: Fill, Kontext, FLUX.2 [klein], SAM, evicted LRU by estimated size).

    POST   /v1/edits                 multipart (image, mask | points/box, reference(s),
                                     prompt, mode, model, options JSON, priority) or
                                     JSON (base64 images)
                                     -> 202 {"id", "state"}
    GET    /v1/jobs/{id}             state, phase, step/total, timings, error
    GET    /v1/jobs/{id}/events      server-sent events: queued, running, phase (model
                                     load, segment, text encode, VAE tiles...: name,
                                     done, total), step (with a JPEG preview every
                                     --preview-every steps), done | failed | cancelled
    POST   /v1/masks                 image + points/labels/box (SAM 2.1) or text
                                     [+ threshold, instances] (SAM 3) -> the mask PNG
    GET    /v1/jobs/{id}/images/{k}  PNG k (metadata in text chunks)
    DELETE /v1/jobs/{id}             cancel (a running edit stops after its current step)
    POST   /v1/images/edits, /v1/images/generations, GET /v1/models
                                     the OpenAI Images API (serve/openai_api.py)
    GET    /v1/health                models loaded, queue length (no token needed)
    GET    /                         the web page (static/index.html)
    GET    /docs, /openapi.json      the API's schema (serve/schema.py), Swagger UI from
                                     local files (no CDN)

Errors are JSON {"error": message} (OpenAI's error object on its routes): 400 bad input
(InputError), 401 missing/wrong token, 403 another web site (Origin) or, without a
token, a non-local Host, 404 unknown job, image or model, 409 wrong state, 413 too
large, 422 a field the endpoint does not declare (top-level or in options) or JSON
nested too deep or too long (uploads.parse_json), 429 queue full, 500 a bug (still
JSON).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import json
import time
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles

from mlx_edit import __version__
from mlx_edit.imaging.images import InputError
from mlx_edit.progress import Phase, reporting
from mlx_edit.serve.config import ServeConfig, host_name
from mlx_edit.serve.jobs import FINISHED, Conflict, JobRunner, QueueFull, UnknownJob
from mlx_edit.serve.preview import Previewer
from mlx_edit.serve.resident import Resident, pipeline_gb, segmenter_gb
from mlx_edit.serve import openai_api
from mlx_edit.serve.openai_api import ModelNotFound
from mlx_edit.serve.schema import EditForm, MaskForm, add_components, form_body
from mlx_edit.serve.uploads import (
    FILE_FIELDS,
    MAX_REFERENCES,
    Unprocessable,
    UploadTooLarge,
    build_mask_request,
    build_request,
    kind_model,
    read_fields,
    served_modes,
)
from mlx_edit.weights.sources import read_model_index

EVENT_POLL_S = 0.05  # how often an event stream looks for new events
KEEPALIVE_S = 15.0  # an SSE comment this often keeps proxies from closing the stream


def model_loaders(config: ServeConfig, cache=None) -> dict:
    """{kind: () -> pipeline} of the configured pipelines: "fill" (model, or FluxFill's
    default repo unless klein_model is given), "kontext" (kontext_model), "klein"
    (klein_model: FluxKlein); the segmenter's is added by `_resident`. Each gets `cache`
    (a PromptCache) when one is given. Raises InputError when klein_model's
    model_index.json names a FLUX.1 pipeline (before anything loads)."""
    from mlx_edit import variants
    from mlx_edit.editing.fill import FluxFill
    from mlx_edit.editing.klein import FluxKlein
    from mlx_edit.editing.kontext import FluxKontext

    kw = {"quantize": config.quantize, "low_memory": config.low_memory}

    def loader(model, flux1_class):
        def load():
            cls = _family_class(model, flux1_class)
            pipe = cls.from_pretrained(model, **kw) if model else cls.from_pretrained(**kw)
            return _with_cache(pipe, cache)
        return load
    loaders = {}
    if config.model or not config.klein_model:
        loaders["fill"] = loader(config.model, FluxFill)
    if config.kontext_model:
        loaders["kontext"] = loader(config.kontext_model, FluxKontext)
    if config.klein_model:
        index = read_model_index(config.klein_model)  # {}: unreadable now (loading says why)
        if index and variants.family_of(index.get("_class_name")) != "flux2":
            raise InputError(f"--klein-model {config.klein_model} holds a FLUX.1 model: give "
                             "a FLUX.2 [klein] folder or repo (FLUX.1 ones go to --model / "
                             "--kontext-model)")
        loaders["klein"] = loader(config.klein_model, FluxKlein)
    return loaders


def _family_class(model, flux1_class):
    """FluxKlein for a FLUX.2 [klein] folder (its model_index.json), else `flux1_class`."""
    from mlx_edit import variants

    if variants.family_of(read_model_index(model).get("_class_name")) == "flux2":
        from mlx_edit.editing.klein import FluxKlein

        return FluxKlein
    return flux1_class


def prompt_cache(config: ServeConfig):
    """The configured on-disk PromptCache, or None."""
    if config.prompt_cache is None:
        return None
    from mlx_edit.editing.prompt_cache import PromptCache

    return PromptCache(config.prompt_cache, int(config.prompt_cache_gb * 2**30))


def _with_cache(pipe, cache):
    if cache is not None:
        pipe.disk_prompt_cache = cache
    return pipe


def _size(kind: str, model) -> float:
    return segmenter_gb(model) if kind.endswith("segmenter") else pipeline_gb(model)


def segment_mask(resident: Resident, image, prompts) -> np.ndarray:
    """(H, W) float32 mask of `image` from `segment.Points` / `Box` prompts, with the
    resident segmenter, or from a `text_segment.TextMask` with the resident text
    segmenter (worker thread). Raises InputError (a point outside the image, no instance
    of the phrase...)."""
    from mlx_edit.editing.segment import prompts_from_specs
    from mlx_edit.editing.text_segment import TextMask

    if isinstance(prompts, TextMask):
        with resident.using("text_segmenter") as seg:
            return prompts.mask(seg, image)
    with resident.using("segmenter") as seg:
        seg.set_image(image)
        return seg.best_mask(**prompts_from_specs(prompts)).astype(np.float32)


def run_edit(state, request, progress) -> tuple[list, dict]:
    """Run one EditRequest on its resident pipeline (worker thread): (images, timings).
    Clicks/boxes are segmented first by the resident segmenter; `progress` gets step
    previews every `preview_every` steps. Timings: the job's phases, plus `load_s` when
    the pipeline had to be made for it (evicted, or first use)."""
    with reporting(progress):  # every phase, the segmenter's and the model load's too
        return _run_edit(state, request, progress)


def _run_edit(state, request, progress) -> tuple[list, dict]:
    resident, config, mask, stats = state.resident, state.config, request.mask, {}
    if mask is not None and not isinstance(mask, np.ndarray):  # clicks, or words
        with Phase(stats, "segment" if isinstance(mask, list) else "text_segment"):
            mask = segment_mask(resident, request.image, mask)
    loaded, t0 = request.kind in resident.models, time.perf_counter()
    with resident.using(request.kind) as pipe:
        if not loaded:  # made (and, unless low_memory, its weights loaded) for this job
            stats["load_s"] = time.perf_counter() - t0
        if config.preview_every:
            progress = state.previewer.for_job(pipe, progress, config.preview_every,
                                               config.preview_max_side)
        o, refs = request.options, request.references
        if request.mode == "inpaint":  # a reference: FLUX.2 [klein]'s (uploads checked)
            extra = {"reference": refs[0]} if refs else {}
            images = pipe.inpaint(request.image, mask, request.prompt, o, progress=progress,
                                  **extra)
        elif request.mode == "outpaint":
            images = pipe.outpaint(request.image, request.prompt, o, progress=progress)
        else:  # image None: text-to-image (FLUX.2 [klein])
            images = pipe.edit([request.image, *refs] if refs else request.image,
                               request.prompt, o, mask=mask, progress=progress)
        # the pipeline's own load_stats are its construction's, paid once, not by this job
        return images, {**{k: v for k, v in pipe.last_stats.items()
                           if k not in pipe.load_stats}, **stats}


def _segmenter(config: ServeConfig, preloaded: dict, sub: str = "segmenter") -> str | None:
    """A segmenter's checkpoint: segment_model (sub "text-segmenter": text_segment_model),
    else the `sub/` folder of the Fill (or, without Fill, the klein) folder."""
    given = config.segment_model if sub == "segmenter" else config.text_segment_model
    if given:
        return given
    pipe = preloaded.get("fill", preloaded.get("klein"))
    own = getattr(pipe, "root", None) if pipe is not None else \
        config.model or config.klein_model
    return str(Path(own) / sub) if own and (Path(own) / sub).is_dir() else None


class BodyLimit:
    """ASGI middleware: request bodies over `max_bytes` are refused (413), by their
    Content-Length before reading, or while streaming when it is absent (chunked)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = _error(413, f"the request is over this server's limit of "
                                   f"{self.max_bytes} bytes", path=scope["path"])
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise UploadTooLarge(f"the request is over this server's limit of "
                                     f"{self.max_bytes} bytes")
            return message
        return await self.app(scope, limited, send)


class SameSite:
    """ASGI middleware against other web sites: a request whose Origin is not this
    server (a page elsewhere posting to it) is refused (403); without a token, so is a
    Host outside `local_hosts` (DNS rebinding). Clients that are not browsers send no
    Origin and are unaffected."""

    def __init__(self, app, config: ServeConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            host = headers.get(b"host", b"").decode("latin-1")
            origin = headers.get(b"origin", b"").decode("latin-1")
            message = None
            if origin and origin.split("://", 1)[-1] != host:
                message = f"cross-origin request from {origin} refused"
            elif self.config.token is None and host_name(host) not in self.config.local_hosts:
                message = f"Host {host!r} refused: without --token only local names are served"
            if message:
                return await _error(403, message, path=scope["path"])(scope, receive, send)
        return await self.app(scope, receive, send)


def _error(status: int, message: str, headers: dict | None = None, path: str = "",
           param: str | None = None) -> JSONResponse:
    """{"error": message}, or OpenAI's error object on its routes (serve/openai_api.py)."""
    if path.startswith(openai_api.PREFIXES):
        return JSONResponse(openai_api.error_body(status, message, param), status,
                            headers=headers)
    return JSONResponse({"error": message}, status, headers=headers)


def _handlers(app: FastAPI) -> None:
    """Every error as {"error": message} with its status (OpenAI's shape on its routes)."""
    table = {ModelNotFound: 404, InputError: 400, Unprocessable: 422, UploadTooLarge: 413,
             QueueFull: 429, Conflict: 409, UnknownJob: 404}
    for exc_type, status in table.items():
        async def handle(request, exc, status=status):
            return _error(status, " ".join(str(exc).split()), path=request.url.path,
                          param=getattr(exc, "param", None))
        app.add_exception_handler(exc_type, handle)

    async def http_error(request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None),
                      request.url.path)

    async def validation(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}",
                      path=request.url.path)

    async def bug(request, exc: Exception):  # logged with its traceback by Starlette
        return _error(500, f"internal error ({type(exc).__name__}): "
                           f"{' '.join(str(exc).split())[:200]}", path=request.url.path)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(Exception, bug)


def _page() -> str:
    return resources.files("mlx_edit.serve").joinpath("static/index.html").read_text("utf-8")


def _auth(request: Request) -> None:
    """401 unless the server has no token or the request carries it (Bearer header, or
    `?token=` for EventSource and image links)."""
    token = request.app.state.config.token
    if token is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else \
        request.query_params.get("token", "")
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPException(401, "missing or wrong token: send Authorization: Bearer <token>",
                            headers={"WWW-Authenticate": "Bearer"})


router = APIRouter()
api = APIRouter(prefix="/v1", dependencies=[Depends(_auth)])


@api.post("/edits", status_code=202, openapi_extra=form_body(EditForm, json_too=True))
async def submit(request: Request):
    """Queue an edit. Multipart: image, mask (or points/labels/box as JSON), prompt,
    mode (inpaint | outpaint | edit), options (JSON object of EditOptions fields),
    priority (interactive | batch), reference (edit only: up to MAX_REFERENCES further
    images, repeated). Or a JSON body with base64 image/mask (references: a list)."""
    state = request.app.state
    fields, files = await read_fields(request, EditForm.model_fields,
                                      file_fields=(*FILE_FIELDS, "reference"),
                                      repeated=("reference",),
                                      max_files=len(FILE_FIELDS) + MAX_REFERENCES)
    req = await run_in_threadpool(build_request, fields, files, state.config,
                                  state.resident.kinds - {"segmenter", "text_segmenter"},
                                  state.segmenter, state.has_ranker, state.text_segmenter)
    job = state.runner.submit(req)
    return JSONResponse({"id": job.id, "state": job.state}, 202,
                        headers={"Location": f"/v1/jobs/{job.id}"})


@api.post("/masks", openapi_extra=form_body(MaskForm, json_too=True))
async def masks(request: Request):
    """Segment without editing (to preview a mask from clicks or words): multipart image
    and points ([[x, y], ...] px) / labels ([1 | 0, ...]) / box ([x0, y0, x1, y1]) as
    JSON, or text (a phrase; threshold, instances: all | best | N), or a JSON body with a
    base64 image. Returns the mask PNG (white = the object) at the
    image's size. Runs on the worker, between two steps of a running edit."""
    state = request.app.state
    fields, files = await read_fields(request, MaskForm.model_fields)
    image, prompts = await run_in_threadpool(build_mask_request, fields, files,
                                             state.config, state.segmenter,
                                             state.text_segmenter)
    mask = await asyncio.wrap_future(state.runner.call(
        lambda: segment_mask(state.resident, image, prompts)))
    buf = io.BytesIO()
    Image.fromarray((mask > 0.5).astype(np.uint8) * 255).save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png")


@api.get("/jobs/{job_id}")
def job_state(job_id: str, request: Request):
    """State, progress (step/total), timings (s) and error of a job."""
    return request.app.state.runner.get(job_id).summary()


async def _event_stream(job):
    sent, quiet = 0, 0.0
    while True:
        events = job.events[sent:]
        for e in events:
            yield f"event: {e['event']}\ndata: {json.dumps(e)}\n\n"
        sent += len(events)
        if job.state in FINISHED and sent == len(job.events):
            return
        quiet = 0.0 if events else quiet + EVENT_POLL_S
        if quiet >= KEEPALIVE_S:
            quiet = 0.0
            yield ": keep-alive\n\n"
        await asyncio.sleep(EVENT_POLL_S)


@api.get("/jobs/{job_id}/events")
def job_events(job_id: str, request: Request):
    """Server-sent events of a job, from its first, until it finishes."""
    job = request.app.state.runner.get(job_id)
    return StreamingResponse(_event_stream(job), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


@api.get("/jobs/{job_id}/images/{k}")
def job_image(job_id: str, k: int, request: Request):
    """PNG k (0-based) of a finished job, its parameters in text chunks."""
    job = request.app.state.runner.get(job_id)
    if job.state != "done":
        raise Conflict(f"job {job_id} is {job.state}: images exist once it is done")
    if not 0 <= k < len(job.images):
        raise HTTPException(404, f"job {job_id} has {len(job.images)} images; k is "
                                 f"0..{len(job.images) - 1}")
    return Response(job.images[k], media_type="image/png", headers={
        "Content-Disposition": f'attachment; filename="{job_id}-{k}.png"'})


@api.delete("/jobs/{job_id}", status_code=202)
def cancel(job_id: str, request: Request):
    """Cancel a job: a queued one now, a running one after its current step."""
    return request.app.state.runner.cancel(job_id).summary()


api.include_router(openai_api.router)  # /v1/images/..., /v1/models: the same token


def _source(state, kind: str) -> str:
    """Where a model comes from: the loaded model's source, else the configured one."""
    model = state.resident.models.get(kind)
    if getattr(model, "source", None):
        return str(model.source)
    if kind in ("segmenter", "text_segmenter"):
        return str(getattr(state, kind))
    return str(kind_model(kind, state.config))


@router.get("/v1/health")
def health(request: Request):
    """Liveness (no token needed): version, the models it serves ({kind: source}), which
    serve each mode (`uploads.served_modes`: the page's model choice), the resident ones
    with their estimated GB, the prompt cache's hits/misses, the queue."""
    state = request.app.state
    running, resident, cache = state.runner.running, state.resident, state.prompt_cache
    return {"status": "ok", "version": __version__,
            "models": {k: _source(state, k) for k in sorted(resident.kinds)},
            "serves": served_modes(state.config,
                                  resident.kinds - {"segmenter", "text_segmenter"}),
            "segmenter": "segmenter" in resident.kinds,
            "text_segmenter": "text_segmenter" in resident.kinds,
            "resident": {k: round(resident.sizes[k], 3) for k in list(resident.models)},
            "resident_budget_gb": state.config.max_resident_gb,
            "prompt_cache": None if cache is None else {
                "hits": cache.hits, "misses": cache.misses},
            "queued": state.runner.queued, "running": running.id if running else None,
            "token_required": state.config.token is not None}


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page():
    return HTMLResponse(_page())


def _docs(app: FastAPI) -> None:
    """`/openapi.json` with every request schema (serve/schema.py) and `/docs`: Swagger UI
    from the files the fastapi-offline package ships (no CDN: it works offline), or,
    without that package, a page pointing to /openapi.json."""
    def openapi():
        if app.openapi_schema is None:
            app.openapi_schema = add_components(get_openapi(
                title=app.title, version=app.version, routes=app.routes))
        return app.openapi_schema
    app.openapi = openapi
    try:  # Swagger UI 5 (OpenAPI 3.1), its files packaged by fastapi-offline
        import fastapi_offline
        assets = Path(fastapi_offline.__file__).parent / "static"
    except ImportError:
        assets = None
    if assets is not None:
        app.mount("/docs-assets", StaticFiles(directory=str(assets)), "docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs():
        if assets is None:
            return HTMLResponse('<p>The API is described in <a href="/openapi.json">'
                                "/openapi.json</a> (pip install fastapi-offline for a "
                                "browsable page here).</p>")
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="mlx-edit API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png",
            swagger_ui_parameters={"validatorUrl": None})


def _resident(config: ServeConfig, pipelines: dict | None):
    """(Resident, segmenter checkpoints {kind: checkpoint or None}, prompt cache or None)
    of the app."""
    cache = prompt_cache(config)
    loaders = {} if pipelines is not None else model_loaders(config, cache)
    if pipelines is None:  # Fill, else klein, made now: a folder it cannot read fails here
        first = "fill" if "fill" in loaders else "klein"
        pipelines = {first: loaders[first]()}
    preloaded = dict(pipelines)
    segmenters = {"segmenter": _segmenter(config, preloaded),
                  "text_segmenter": _segmenter(config, preloaded, "text-segmenter")}
    for kind, checkpoint in segmenters.items():
        if checkpoint and kind not in preloaded:
            loaders[kind] = _segmenter_loader(kind, checkpoint)
    for kind, model in preloaded.items():
        if not kind.endswith("segmenter"):
            _with_cache(model, cache)
    if cache is None:  # given pipelines may bring their own
        cache = next((m.disk_prompt_cache for k, m in preloaded.items()
                      if not k.endswith("segmenter") and m.disk_prompt_cache is not None),
                     None)
    resident = Resident(loaders, _size, config.max_resident_gb, preloaded)
    return resident, segmenters, cache


def _segmenter_loader(kind: str, checkpoint: str):
    """The loader of a resident SAM 2.1 `Segmenter` or SAM 3 `TextSegmenter`."""
    if kind == "segmenter":
        from mlx_edit.editing.segment import Segmenter

        return lambda: Segmenter.from_pretrained(checkpoint)
    from mlx_edit.editing.text_segment import TextSegmenter
    from mlx_edit.weights.sam3 import resolve_sam3

    return lambda: TextSegmenter.from_pretrained(resolve_sam3(checkpoint))


def create_app(config: ServeConfig, pipelines: dict | None = None) -> FastAPI:
    """The server app over resident models (serve/resident.py) and one worker thread.
    pipelines: {kind: model} already made (tests), else the configured ones are made now
    (`model_loaders`; weights load on first use). `app.state.runner.close()` (run at
    shutdown) stops the worker. Raises WeightLoadError when a model cannot be read."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(app.state.runner.close)

    app = FastAPI(title="mlx-edit", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    state = app.state
    state.config, state.previewer = config, Previewer()
    state.resident, segmenters, state.prompt_cache = _resident(config, pipelines)
    state.segmenter, state.text_segmenter = (
        segmenters[k] or ("resident" if k in state.resident.models else None)
        for k in ("segmenter", "text_segmenter"))
    fill = state.resident.models.get("fill")
    root = getattr(fill, "root", None)
    state.has_ranker = bool(root) and (Path(root) / "ranker").is_dir()
    state.runner = JobRunner(lambda req, progress: run_edit(state, req, progress),
                             max_queue=config.max_queue, keep_jobs=config.keep_jobs,
                             keep_bytes=config.keep_bytes)
    app.add_middleware(BodyLimit, max_bytes=config.max_upload_bytes)
    app.add_middleware(SameSite, config=config)
    _handlers(app)
    app.include_router(router)
    app.include_router(api)
    _docs(app)
    return app
