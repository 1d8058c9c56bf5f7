"""The OpenAI Images API over the server's resident models, so OpenAI's clients work
unchanged (https://platform.openai.com/docs/api-reference/images):

    POST /v1/images/edits        multipart: image (or image[], several: the first is
                                 edited, all are references; a klein inpaint: the
                                 second is its reference), mask (PNG: transparent =
                                 edit), prompt, model, n, size, response_format
    POST /v1/images/generations  JSON: prompt, model, n, size, response_format
    GET  /v1/models              the models served here, by the names `model` takes

Each request becomes one job of the server's queue (serve/jobs.py), checked by the same
code as `POST /v1/edits` (serve/uploads.py) before it queues, and is answered when the
job is done (synchronous, as OpenAI's; a client that disconnects cancels its job):
`{"created", "data": [{"b64_json"} | {"url"}]}`, a url being the job's image in the
result store (`GET /v1/jobs/{id}/images/{k}`, same token rules). Errors have OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`.

Models are looked up in the resident-model table (serve/resident.py kinds): each kind
serves its modes ("fill": inpaint, "kontext": instruction edit, with a FLUX.1 Kontext or
FLUX.2 [klein] folder, "klein": instruction edit, and inpaint with a mask) and is named
by its variant (mlx_edit.variants: "fill", "kontext", "klein", "klein-base") or its kind.
Without `model`, an edit with a mask goes to the inpainting model, one without to the
instruction model (uploads.SERVED_MODES' order). A variant in `TEXT_TO_IMAGE` also
generates. Without `size` an edit keeps the input's size; with one, the inputs are
resized to it first.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from mlx_edit.imaging.images import InputError, load_image
from mlx_edit.serve.jobs import BAD_INPUT, FINISHED, Conflict, Job
from mlx_edit.serve.schema import (
    OPENAI_IGNORED,
    ImagesEditForm,
    ImagesGenerateBody,
    form_body,
    json_body,
)
from mlx_edit.serve.uploads import (
    SERVED_MODES,
    EditRequest,
    _options,
    build_request,
    max_references,
    open_image,
    read_fields,
    request_prompt,
    served_variant,
)

log = logging.getLogger("mlx_edit.serve")
PREFIXES = ("/v1/images", "/v1/models")  # routes answering errors in OpenAI's shape
TEXT_TO_IMAGE = ("klein", "klein-base", "klein-kv")  # FluxKlein.edit with no image generates
KIND_MODES = {"fill": ("inpaint",), "kontext": ("edit",), "klein": ("edit", "inpaint")}
MAX_INPUT_IMAGES = 8
POLL_S = 0.05
STATUS_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object."""
    kind = "server_error" if status >= 500 else STATUS_TYPES.get(status,
                                                                  "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class Served:
    """A model of the resident table: its name, kind, modes (the first without a mask)
    and variant."""

    name: str
    kind: str
    modes: tuple[str, ...]
    variant: object

    @property
    def generates(self) -> bool:
        return self.variant.name in TEXT_TO_IMAGE

    def mode(self, masked: bool) -> str:
        """The mode of an edit with or without a mask."""
        return "inpaint" if masked and "inpaint" in self.modes else self.modes[0]


def served_models(state) -> dict[str, Served]:
    """{name: Served} of the pipelines this server serves (loaded or not), by variant
    name, and by kind where it differs."""
    table = {}
    for kind in sorted(state.resident.kinds & set(KIND_MODES)):
        pipe, modes = state.resident.models.get(kind), KIND_MODES[kind]
        variant = pipe.variant_info if pipe is not None else \
            served_variant(kind, modes[0], state.config)
        served = Served(variant.name, kind, modes, variant)
        table.setdefault(variant.name, served)
        table.setdefault(kind, served)
    return table


def _pick(state, name: str | None, masked: bool, generate: bool = False) -> Served:
    """The served model `name`, or the one that fits (404 model_not_found)."""
    table = served_models(state)
    if name is not None:
        if name not in table:
            raise ModelNotFound(f"model {name!r} is not served here; models: "
                                f"{', '.join(table)}")
        return table[name]
    if generate:
        return next((s for s in table.values() if s.generates), None) or \
            next(iter(table.values()))
    wanted = ("inpaint", "edit") if masked else ("edit", "inpaint")
    return next((table[k] for mode in wanted for k in SERVED_MODES[mode] if k in table),
                table[next(iter(table))])


class ModelNotFound(InputError):
    """`model` names no model of this server (HTTP 404)."""

    param = "model"


def parse_size(size: str | None) -> tuple[int, int] | None:
    """(width, height) of "WIDTHxHEIGHT", None for None / "auto". InputError if bad."""
    if size in (None, "", "auto"):
        return None
    try:
        w, h = (int(v) for v in str(size).lower().split("x"))
    except ValueError:
        raise InputError(f"size must be WIDTHxHEIGHT (e.g. 1024x768) or auto, got "
                         f"{size!r}") from None
    if not (16 <= w <= 8192 and 16 <= h <= 8192):
        raise InputError(f"size must be 16..8192 px a side, got {size}")
    return w, h


def _output_size(size: tuple[int, int] | None) -> dict:
    """width/height options of an instruction model's output (multiples of 16 px)."""
    if size is None:
        return {}
    if size[0] % 16 or size[1] % 16:
        raise InputError(f"size must be multiples of 16 px for this model, got "
                         f"{size[0]}x{size[1]}")
    return {"width": size[0], "height": size[1]}


def _count(fields: dict) -> int:
    try:
        return int(fields.get("n", 1))
    except (TypeError, ValueError):
        raise InputError(f"n must be an integer, got {fields.get('n')!r}") from None


def _raw_options(fields: dict, extra: dict) -> dict:
    """The `options` object with OpenAI's fields mapped onto it (n -> num_images)."""
    from mlx_edit.serve.uploads import _json_field

    raw = _json_field(fields, "options", {}) or {}
    if not isinstance(raw, dict):
        raise InputError(f"options must be a JSON object, got {type(raw).__name__}")
    return {**raw, "num_images": _count(fields), **extra}


def _alpha_mask(data: bytes, max_pixels: int) -> bytes | None:
    """An OpenAI mask (transparent = edit) as this server's (white = edit) PNG bytes;
    None when it has no transparent pixel."""
    img = open_image(data, "mask", max_pixels)
    if "A" not in img.getbands() and "transparency" not in img.info:
        return None
    alpha = img.convert("RGBA").getchannel("A")
    if alpha.getextrema()[0] == 255:
        return None
    buf = io.BytesIO()
    alpha.point(lambda a: 255 - a).save(buf, format="PNG")
    return buf.getvalue()


def _resized(request: EditRequest, size: tuple[int, int] | None) -> EditRequest:
    """The request with its image, references and mask resized to `size` (LANCZOS)."""
    if size is None or request.image.size == size:
        return request
    import numpy as np

    request.image = request.image.resize(size, Image.LANCZOS)
    request.references = [r.resize(size, Image.LANCZOS) for r in request.references]
    if request.mask is not None:
        request.mask = np.asarray(Image.fromarray(request.mask, "F").resize(
            size, Image.BILINEAR), np.float32)
    return request


def build_edit(fields: dict, files: dict, state) -> EditRequest:
    """A checked EditRequest of an OpenAI edit (worker of the thread pool). Raises
    InputError, ModelNotFound, UploadTooLarge."""
    images = files.get("image[]", []) + ([files["image"]] if "image" in files else [])
    if not images:
        raise InputError("image is required (a PNG, JPEG or WebP upload)")
    if len(images) > MAX_INPUT_IMAGES:
        raise InputError(f"at most {MAX_INPUT_IMAGES} images, got {len(images)}")
    limit = state.config.max_pixels
    mask = _alpha_mask(files["mask"], limit) if "mask" in files else None
    if "mask" in files and mask is None:
        raise InputError("mask must be a PNG with transparent pixels (alpha 0 = edit)")
    served = _pick(state, fields.get("model"), mask is not None)
    if mask is None and "inpaint" in served.modes:
        mask = _alpha_mask(images[0], limit)  # OpenAI: the image's own transparency
    mode = served.mode(mask is not None)
    if mask is None and mode == "inpaint":
        others = [n for n, s in served_models(state).items() if "edit" in s.modes]
        hint = f"; models that edit without one: {', '.join(others)}" if others else ""
        raise InputError(f"model {served.name} inpaints: send a mask (transparent = "
                         f"edit){hint}")
    most = max_references(mode, served.variant)  # inpaint: klein's one, Fill's none
    if mode != "edit" and len(images) - 1 > most:
        raise InputError(f"model {served.name} takes one image; several (references) "
                         "need an instruction model" if not most else
                         f"model {served.name} inpaints with at most {most} reference: "
                         f"send at most {most + 1} images")
    size = parse_size(fields.get("size"))
    if mode == "edit":  # the model's own output size, or keep the input's
        extra, size = _output_size(size) or {"keep_size": True}, None
    else:  # an inpaint keeps its input's size: the inputs are resized
        extra = {}
    form = {"mode": mode, "prompt": fields.get("prompt"),
            "options": _raw_options(fields, extra)}
    request = build_request(form, {"image": images[0], **({"mask": mask} if mask else {})},
                            state.config, {served.kind}, variant=served.variant)
    request.references = [load_image(open_image(b, f"image {i + 2}", limit))
                          for i, b in enumerate(images[1:])]
    return _resized(request, size)


def build_generation(fields: dict, state) -> EditRequest:
    """A checked text-to-image EditRequest (FLUX.2 [klein]); InputError naming the
    models that generate when the chosen one does not."""
    served = _pick(state, fields.get("model"), False, generate=True)
    if not served.generates:
        able = [n for n, s in served_models(state).items() if s.generates]
        raise InputError(f"model {served.name} does not generate from text alone; "
                         + (f"models that do: {', '.join(able)}" if able else
                            f"none here does (a FLUX.2 [klein] folder as --klein-model "
                            f"does; {', '.join(TEXT_TO_IMAGE)})"))
    prompt = request_prompt(fields)
    extra = _output_size(parse_size(fields.get("size")))
    options = _options({"options": _raw_options(fields, extra)}, "edit", state.config,
                       served.variant)
    return EditRequest("edit", served.kind, prompt, None, None, options)


async def _answer(request: Request, fields: dict, edit: EditRequest) -> JSONResponse:
    """Queue `edit`, wait for it (a disconnect cancels it) and answer OpenAI's way."""
    runner = request.app.state.runner
    job: Job = runner.submit(edit)
    while job.state not in FINISHED:
        if await request.is_disconnected():
            with contextlib.suppress(Conflict):  # it may have just finished
                runner.cancel(job.id)
            break
        await asyncio.sleep(POLL_S)
    while job.state not in FINISHED:
        await asyncio.sleep(POLL_S)
    if job.state != "done":
        status = 400 if job.error_type in BAD_INPUT else 500
        return JSONResponse(error_body(status, f"the edit {job.state}: {job.error}"), status)
    if fields.get("response_format") == "url":
        base = str(request.base_url).rstrip("/")
        data = [{"url": f"{base}/v1/jobs/{job.id}/images/{k}"} for k in range(len(job.images))]
    else:
        data = [{"b64_json": base64.b64encode(png).decode()} for png in job.images]
    ignored = [k for k in OPENAI_IGNORED if fields.get(k) not in (None, "", "false", False)]
    headers = {"X-Job-Id": job.id}
    if ignored:
        headers["X-Ignored-Fields"] = ", ".join(ignored)
        log.warning("%s: ignored OpenAI fields %s (they mean nothing here)",
                    request.url.path, ", ".join(ignored))
    return JSONResponse({"created": int(job.created), "data": data}, headers=headers)


def _check_common(fields: dict) -> None:
    if str(fields.get("stream", "false")).lower() not in ("false", "0", ""):
        raise InputError("stream is not supported: follow progress with POST /v1/edits "
                         "and GET /v1/jobs/{id}/events")
    if fields.get("response_format", "b64_json") not in ("b64_json", "url"):
        raise InputError(f"response_format must be b64_json or url, got "
                         f"{fields.get('response_format')!r}")


router = APIRouter()


@router.post("/images/edits", openapi_extra=form_body(ImagesEditForm))
async def images_edit(request: Request):
    """OpenAI's image edit: inpaint with a mask (transparent = edit) or edit from an
    instruction; answered when done. Errors in OpenAI's shape."""
    fields, files = await read_fields(request, ImagesEditForm.model_fields, "the request",
                                      ("image", "image[]", "mask"), MAX_INPUT_IMAGES + 1)
    _check_common(fields)
    edit = await run_in_threadpool(build_edit, fields, files, request.app.state)
    return await _answer(request, fields, edit)


@router.post("/images/generations", openapi_extra=json_body(ImagesGenerateBody))
async def images_generate(request: Request):
    """OpenAI's text-to-image, on a model that generates (FLUX.2 [klein])."""
    fields, _ = await read_fields(request, ImagesGenerateBody.model_fields, "the request",
                                  ())
    _check_common(fields)
    return await _answer(request, fields, build_generation(fields, request.app.state))


@router.get("/models")
def models(request: Request):
    """The models served here (OpenAI's list), by the names `model` takes."""
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "mlx-edit",
         "kind": s.kind, "mode": s.modes[0], "modes": list(s.modes),
         "generates": s.generates}
        for name, s in served_models(request.app.state).items()]}


__all__ = ["PREFIXES", "error_body", "router", "served_models"]
