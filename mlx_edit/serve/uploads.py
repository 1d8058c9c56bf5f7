"""Request fields and uploaded images -> a checked `EditRequest`, before anything queues.

Images are opened from bytes (never from a client-supplied path); their size is read
from the header and refused (`UploadTooLarge`, HTTP 413) above the server's pixel limit
before a pixel is decoded, so a decompression bomb costs nothing. Options go through
`EditOptions.from_dict` (unknown keys and bad values: InputError, HTTP 400); options that
name files on the server (models, adapters) are refused: the server's configuration
chooses models.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import io
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mlx_edit.imaging.images import InputError, load_image, load_mask
from mlx_edit.options import (
    FIELDS,
    MASK_THRESHOLD,
    MAX_PROMPT_BYTES,
    EditOptions,
    check_canvas,
    check_instances,
    check_phrase,
    check_prompt,
    check_threshold,
)
from mlx_edit.serve.config import ServeConfig

FORMATS = ("PNG", "JPEG", "WEBP")  # what browsers and cameras send; TIFF/HEIC stay local
FILE_FIELDS = ("image", "mask")
MAX_REFERENCES = 4  # `reference` uploads of one edit (edit mode's further images)
MAX_FIELD_BYTES = 2**20  # a form field that is not a file (prompt, options, points...)
PATH_OPTIONS = ("segment_model", "text_segment_model", "rank_model", "ip_adapters", "redux",
                "controlnets")
PRIORITIES = {"interactive": 0, "batch": 1}  # lower runs first
# The pipeline kinds (serve/resident.py) that serve each mode, the default first; a
# request's `model` names one (FLUX.2 [klein] serves instruction edits and inpainting).
SERVED_MODES = {"inpaint": ("fill", "klein"), "outpaint": ("fill",),
                "edit": ("kontext", "klein")}
MODEL_KINDS = ("fill", "kontext", "klein")
MAX_JSON_DEPTH = 16  # nesting of a JSON body or field (an edit request needs ~4)
MAX_JSON_TOKENS = 100_000  # brackets and strings in one JSON document
_JSON_STRING = re.compile(rb'"[^"]*"')  # once escaped quotes are gone
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


class UploadTooLarge(Exception):
    """A request body or an image over the server's limits (HTTP 413)."""


class Unprocessable(InputError):
    """Well-formed but beyond what the server processes: a field no schema declares
    (`check_fields`), JSON nested deeper than MAX_JSON_DEPTH or with more than
    MAX_JSON_TOKENS brackets/strings (HTTP 422)."""


def check_fields(fields, known, where: str, aliases: dict[str, str] | None = None) -> None:
    """Raise Unprocessable (HTTP 422) naming the `fields` (names) not in `known` (the
    declared names: serve/schema.py's models, options.FIELDS); `aliases`: {sent name:
    declared name}, e.g. "image[]" -> "image"."""
    aliases = aliases or {}
    unknown = [k for k in fields if aliases.get(k, k) not in known]
    if unknown:
        error = Unprocessable(f"unknown field{'s' if len(unknown) > 1 else ''} in {where}: "
                              f"{', '.join(map(repr, unknown))}; known: {', '.join(known)}")
        error.param = unknown[0]
        raise error


def parse_json(data: str | bytes, what: str) -> Any:
    """json.loads of a body or field after bounding its nesting and its count of
    brackets and strings (a few passes over the bytes, each in C), so no client can make
    the parser recurse past Python's limit or spend long on it. Raises Unprocessable
    over the bounds, InputError when it is not JSON."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    # Escaped backslashes, then escaped quotes, then whole strings dropped (C-speed
    # passes): what is left of the brackets is what nests.
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    nest = _JSON_STRING.sub(b"", unescaped).translate(None, _NOT_BRACKETS)
    depth = 0
    for c in nest[:MAX_JSON_TOKENS + 1]:
        depth += 1 if c in b"[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise Unprocessable(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
    if unescaped.count(b'"') // 2 + len(nest) > MAX_JSON_TOKENS:
        raise Unprocessable(f"{what} has over {MAX_JSON_TOKENS} brackets and strings")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{what} is not valid JSON") from None


@dataclass
class EditRequest:
    """One checked edit: mode ("inpaint" | "outpaint" | "edit"), the pipeline kind that
    serves it ("fill" | "kontext" | "klein"), prompt, image (RGB PIL, upright; None:
    text-to-image, edit mode), mask (float32 (H, W) in [0, 1], a list of
    `segment.Points` / `Box`, a `text_segment.TextMask`, or None), options (EditOptions
    resolved for the mode), priority (0 interactive, 1 batch), references (edit mode: more
    RGB PIL images after `image`; FLUX.2 [klein] inpaint: at most one, the repainted
    area's reference)."""

    mode: str
    kind: str
    prompt: str
    image: Image.Image
    mask: Any
    options: EditOptions
    priority: int = 0
    references: list = dataclasses.field(default_factory=list)


def open_image(data: bytes, what: str, max_pixels: int) -> Image.Image:
    """An uploaded PNG/JPEG/WebP, its pixel count checked from the header before decoding.
    Raises InputError (empty, unreadable, another format), UploadTooLarge (pixels)."""
    if not data:
        raise InputError(f"{what} is empty: upload a PNG, JPEG or WebP file")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:  # Pillow's own limit, also from the header
        raise UploadTooLarge(f"{what}: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"cannot read {what} ({type(e).__name__}): upload a PNG, JPEG or "
                         "WebP file") from None
    if img.format not in FORMATS:
        raise InputError(f"{what} is {img.format}: upload a PNG, JPEG or WebP file")
    w, h = img.size
    if w * h > max_pixels:
        raise UploadTooLarge(f"{what} is {w}x{h} px, over this server's limit of "
                             f"{max_pixels / 1e6:g} MP")
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot decode {what} ({type(e).__name__}: {e})") from None
    return img


def decode_base64(value: Any, what: str) -> bytes:
    """The bytes of a base64 string (a `data:` URL prefix is allowed). InputError if bad."""
    if not isinstance(value, str):
        raise InputError(f"{what} must be a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value.split(",", 1)[-1] if value.startswith("data:")
                                else value, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what} is not valid base64") from None


def _json_field(fields: dict, name: str, default: Any = None) -> Any:
    """A field that is JSON in a form (a string) or already a value in a JSON body."""
    value = fields.get(name, default)
    if isinstance(value, str) and name != "prompt":
        try:
            return parse_json(value, name)
        except Unprocessable:
            raise
        except InputError:
            raise InputError(f"{name} must be JSON, got {value[:40]!r}") from None
    return value


@functools.lru_cache(maxsize=8)
def _model_index(model: str | None) -> dict:
    from mlx_edit.weights.sources import read_model_index

    return read_model_index(model)


def kind_model(kind: str, config: ServeConfig) -> str | None:
    """The configured folder or repo of a pipeline kind ("fill", "kontext", "klein")."""
    return {"fill": config.model, "kontext": config.kontext_model,
            "klein": config.klein_model}[kind]


def served_variant(kind: str, mode: str, config: ServeConfig):
    """The variant (mlx_edit.variants) that serves `mode` on the pipeline `kind` here: the
    model of its folder's model_index.json (FLUX.1 Fill / Kontext, or FLUX.2 [klein]; the
    klein kind is klein when its index cannot be read); its defaults and refusals apply
    to the request's options. InputError when that model does not serve `mode`."""
    from mlx_edit import variants

    index = _model_index(kind_model(kind, config))
    if kind == "klein" and not index:
        index = {"_class_name": variants.KLEIN_PIPELINES[0]}
    try:
        return variants.for_folder(index, mode)
    except ValueError as e:
        raise InputError(str(e)) from None


def max_references(mode: str, variant) -> int:
    """How many `reference` uploads a request of `mode` takes on `variant`: edit mode
    MAX_REFERENCES, a FLUX.2 [klein] inpaint one, anything else none."""
    if mode == "edit":
        return MAX_REFERENCES
    return 1 if mode == "inpaint" and variant.family == "flux2" else 0


def serving_kind(mode: str, model: str | None, config: ServeConfig, kinds: set[str]) -> str:
    """The pipeline kind that runs a request of `mode`: `model` (a kind) when given, else
    the first of SERVED_MODES[mode] this server has. InputError when `model` is not
    served here or does not do `mode`, or no model here does it."""
    if model is not None:
        if model not in kinds:
            raise InputError(f"model must be one of {', '.join(sorted(kinds))} on this "
                             f"server, got {model!r}")
        if model not in SERVED_MODES[mode]:
            able = [k for k in SERVED_MODES[mode] if k in kinds]
            raise InputError(f"model {model} does not {mode}" + (
                f"; here {', '.join(able)} does" if able else ""))
        return model
    for kind in SERVED_MODES[mode]:
        if kind in kinds:
            return kind
    raise InputError(f"this server has no model for {mode} (start it with "
                     + ("--kontext-model or --klein-model)" if mode == "edit" else
                        "--model or --klein-model)"))


def served_modes(config: ServeConfig, kinds: set[str]) -> dict[str, dict]:
    """{mode: {kind: {"title", "references", "refuses"}}} of the pipelines served here
    (the default kind of each mode first): what the page offers per mode, from each
    kind's variant (its title, the reference uploads it takes (`max_references`), the
    EditOptions fields it refuses)."""
    out = {}
    for mode, order in SERVED_MODES.items():
        out[mode] = {}
        for kind in (k for k in order if k in kinds):
            try:
                variant = served_variant(kind, mode, config)
            except InputError:  # e.g. a klein folder as --model: no outpaint
                continue
            out[mode][kind] = {"title": variant.title,
                               "references": max_references(mode, variant),
                               "refuses": list(variant.refuses)}
    return out


def _options(fields: dict, mode: str, config: ServeConfig, variant) -> EditOptions:
    raw = _json_field(fields, "options", {}) or {}
    if not isinstance(raw, dict):
        raise InputError(f"options must be a JSON object, got {type(raw).__name__}")
    for name in PATH_OPTIONS:
        if name in raw:
            raise InputError(f"option {name} names files on the server: not accepted over "
                             "HTTP (the server's configuration chooses models)")
    check_fields(raw, [k for k in FIELDS if k not in PATH_OPTIONS], "options")
    options = EditOptions.from_dict(raw, mode, variant)
    if options.num_images > config.max_images:
        raise InputError(f"num_images must be <= {config.max_images} on this server, got "
                         f"{options.num_images}")
    return options


def _click_mask(fields: dict, segmenter: str | None, image_size: tuple[int, int]
                ) -> list | None:
    """`segment.Points` / `Box` prompts from the points/labels/box fields, or None;
    InputError unless they are valid for an image of image_size (width, height) px."""
    points, labels, box = (_json_field(fields, k) for k in ("points", "labels", "box"))
    if points is None and box is None:
        return None
    if segmenter is None:
        raise InputError("this server has no segmenter: send a mask image (or start it "
                         "with --segment-model)")
    from mlx_edit.editing.segment import Box, Points, prompt_arrays, prompts_from_specs

    prompts = []
    try:
        if points is not None:
            prompts.append(Points(tuple(tuple(float(c) for c in p) for p in points),
                                  None if labels is None else tuple(int(x) for x in labels)))
        if box is not None:
            prompts.append(Box(*(float(c) for c in box)))
    except (TypeError, ValueError):
        raise InputError("points must be [[x, y], ...], labels [1 | 0, ...], box "
                         "[x0, y0, x1, y1]") from None
    # inside the image, labels 0/1, counts matching: checked now, not in the queued job
    prompt_arrays(**prompts_from_specs(prompts), image_size=image_size[::-1], input_size=1024)
    return prompts


NO_TEXT_SEGMENTER = ("this server has no text segmenter: send a mask image or clicks (or "
                     "start it with --text-segment-model)")


def _text_mask(options: EditOptions, text_segmenter: str | None):
    """(the `text_segment.TextMask` of options.mask_text or None, the options without
    it: the server segments it with its resident SAM 3). InputError without one."""
    if options.mask_text is None:
        return None, options
    if text_segmenter is None:
        raise InputError(NO_TEXT_SEGMENTER)
    from mlx_edit.editing.text_segment import text_mask

    return text_mask(options), dataclasses.replace(
        options, mask_text=None, mask_threshold=MASK_THRESHOLD, mask_instances="all")


def request_prompt(fields: dict) -> str:
    """The checked `prompt` field. Raises InputError (missing, bad characters),
    UploadTooLarge (over MAX_PROMPT_BYTES)."""
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("prompt is required")
    size = len(prompt.encode("utf-8", "surrogatepass"))
    if size > MAX_PROMPT_BYTES:  # a size: 413, before the job's tokenizer sees it
        raise UploadTooLarge(f"prompt is {size} bytes, over the limit of {MAX_PROMPT_BYTES}")
    return check_prompt(prompt)


def build_request(fields: dict, files: dict[str, bytes], config: ServeConfig,
                  kinds: set[str], segmenter: str | None = None,
                  has_ranker: bool = False, text_segmenter: str | None = None,
                  variant=None) -> EditRequest:
    """A checked EditRequest from form/JSON `fields` and uploaded `files` (bytes).

    fields: mode (default inpaint), model (the pipeline kind: "fill", "kontext",
    "klein"; default the first of SERVED_MODES[mode] served here), prompt, options (a
    JSON object of EditOptions fields; mask_text needs a text segmenter), priority
    ("interactive" | "batch"), points / labels / box (inpaint/edit masks from clicks, with
    a segmenter). files: image (required), mask (white = repaint), reference (a list of
    bytes: edit mode's further images; a FLUX.2 [klein] inpaint's one reference:
    `max_references`).
    kinds: the pipelines served ("fill", "kontext", "klein"). has_ranker: the Fill
    folder has a `ranker/` (else rank is refused: it would download a CLIP model).
    variant: the served model's (mlx_edit.variants; None: `served_variant`). Raises
    InputError, UploadTooLarge."""
    mode = fields.get("mode") or "inpaint"
    if mode not in SERVED_MODES:
        raise InputError(f"mode must be one of {', '.join(SERVED_MODES)}, got {mode!r}")
    kind = serving_kind(mode, fields.get("model") or None, config, kinds)
    variant = variant or served_variant(kind, mode, config)
    prompt = request_prompt(fields)
    priority = fields.get("priority") or "interactive"
    if priority not in PRIORITIES:
        raise InputError(f"priority must be interactive or batch, got {priority!r}")
    options = _options(fields, mode, config, variant)
    if options.rank and not has_ranker:
        raise InputError("rank needs a ranker/ in this server's model folder")
    if "image" not in files:
        raise InputError("image is required (a PNG, JPEG or WebP upload)")
    image = load_image(open_image(files["image"], "image", config.max_pixels))
    refs = _references(files.get("reference") or [], image, mode, variant, config)
    mask = _click_mask(fields, segmenter, image.size)
    text, options = _text_mask(options, text_segmenter)
    if text is not None and (mask is not None or "mask" in files):
        raise InputError("send one of mask, points/box or options.mask_text")
    if mask is not None:
        options = dataclasses.replace(options, segment_model=segmenter)
    elif text is not None:
        mask = text
    elif "mask" in files:
        mask = load_mask(open_image(files["mask"], "mask", config.max_pixels), image.size)
        mask = np.asarray(mask, np.float32)
    if mode == "inpaint" and mask is None:
        raise InputError("inpaint needs a mask (an image, white = repaint), points/box or "
                         "options.mask_text")
    if mode == "outpaint" and mask is not None:
        raise InputError("outpaint takes no mask: set left/right/top/bottom in options")
    if mode == "outpaint":  # the canvas is allocated by the job: refused before queuing
        check_canvas(image.width + options.left + options.right,
                     image.height + options.top + options.bottom)
    return EditRequest(mode, kind, prompt, image, mask, options, PRIORITIES[priority], refs)


def _references(uploads: list[bytes], image, mode: str, variant,
                config: ServeConfig) -> list:
    """The reference uploads of a `mode` request as RGB PIL images, at most
    `max_references(mode, variant)`; on FLUX.2 [klein] the image (edit mode) and each
    reference checked by klein's rules (conditioning.klein.check_reference) before the job
    queues. Raises InputError, UploadTooLarge."""
    most = max_references(mode, variant)
    if len(uploads) > most:
        raise InputError(f"{mode} takes no reference images (they are edit mode's, or "
                         "one for a FLUX.2 [klein] inpaint)" if not most else
                         f"{mode} takes at most {most} reference image"
                         f"{'s' if most > 1 else ''} on {variant.title}, got {len(uploads)}")
    refs = [load_image(open_image(b, f"reference {i + 1}", config.max_pixels))
            for i, b in enumerate(uploads)]
    if variant.family == "flux2":  # klein's reference rules, before the job queues
        from mlx_edit.conditioning.klein import check_reference

        for what, ref in [("image", image)] * (mode == "edit") + [
                (f"reference {i + 1}", r) for i, r in enumerate(refs)]:
            check_reference(ref, what)
    return refs


async def read_fields(request, known, where: str = "the request",
                      file_fields: tuple[str, ...] = FILE_FIELDS,
                      max_files: int = len(FILE_FIELDS),
                      repeated: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(fields, files as bytes) of a Starlette request's multipart form or JSON body (its
    `file_fields` base64). A file field named "x[]", or named in `repeated`, may repeat: a
    list of bytes (in a JSON body: a list of base64 strings, at most max_files). Fields
    not in `known` (an endpoint's schema, serve/schema.py; "x[]" counts as "x") are
    refused: Unprocessable (422) naming them. Raises InputError, UploadTooLarge."""
    from starlette.exceptions import HTTPException

    aliases = {k: k[:-2] for k in file_fields if k.endswith("[]")}
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("application/json"):
        body = parse_json(await request.body(), "the JSON body")
        if not isinstance(body, dict):
            raise InputError("the JSON body must be an object")
        check_fields(body, known, where)
        files = {k: decode_base64(body.pop(k), k) for k in file_fields
                 if k in body and k not in repeated}
        for k in repeated:
            values = body.pop(k, [])
            if not isinstance(values, list) or len(values) > max_files:
                raise InputError(f"{k} must be a list of up to {max_files} base64 images")
            files[k] = [decode_base64(v, f"{k} {i + 1}") for i, v in enumerate(values)]
        return body, files
    if not ctype.startswith("multipart/form-data"):
        raise InputError("send multipart/form-data or application/json")
    try:
        form = await request.form(max_files=max_files, max_fields=32,
                                  max_part_size=MAX_FIELD_BYTES)
    except HTTPException as e:  # Starlette's 400 for a form field over max_part_size
        if "maximum size" in str(e.detail):
            raise UploadTooLarge(f"a form field is over this server's limit of "
                                 f"{MAX_FIELD_BYTES} bytes (send images as files)") from None
        raise
    check_fields(dict(form.multi_items()), known, where, aliases)
    fields, files = {}, {}
    for key, value in form.multi_items():
        if isinstance(value, str):
            fields[key] = value
        elif key not in file_fields:
            raise InputError(f"{key} must be a text field, not a file; the files are "
                             f"{', '.join(file_fields)}")
        elif key in aliases or key in repeated:
            files.setdefault(key, []).append(await value.read())
        else:
            files[key] = await value.read()
    return fields, files


def build_mask_request(fields: dict, files: dict[str, bytes], config: ServeConfig,
                       segmenter: str | None, text_segmenter: str | None = None
                       ) -> tuple[Image.Image, Any]:
    """(image, `segment.Points` / `Box` prompts or a `text_segment.TextMask`) of a
    `/v1/masks` request: an image upload and points / labels / box fields, or text
    (+ threshold, instances). Raises InputError (no segmenter, no image, no prompt, a
    bad threshold or instances), UploadTooLarge."""
    if "image" not in files:
        raise InputError("image is required (a PNG, JPEG or WebP upload)")
    image = load_image(open_image(files["image"], "image", config.max_pixels))
    if any(k in fields for k in ("text", "threshold", "instances")):
        if any(k in fields for k in ("points", "labels", "box")):
            raise InputError("send points/box or text, not both")
        if text_segmenter is None:
            raise InputError(NO_TEXT_SEGMENTER)
        from mlx_edit.editing.text_segment import TextMask

        return image, TextMask(
            check_phrase(fields.get("text"), "text"),
            check_threshold(_json_field(fields, "threshold", MASK_THRESHOLD), "threshold"),
            check_instances(fields.get("instances", "all"), "instances"))
    prompts = _click_mask(fields, segmenter, image.size)
    if prompts is None:
        raise InputError("send points ([[x, y], ...], labels [1 | 0, ...]) or a box "
                         "([x0, y0, x1, y1]) to segment")
    return image, prompts
