"""The request schema of every server endpoint, as pydantic models: one source for the
OpenAPI document (`/openapi.json`, `/docs`) and for refusing unknown fields.

`EditOptionsModel` is built from `mlx_edit.options.FIELDS` and the `EditOptions`
dataclass (its types, defaults and help texts), so a new option is declared once. The
form models list every field an endpoint reads; `uploads.check_fields` refuses any other one
(HTTP 422, naming it), top-level and inside `options` alike. Values are checked where
they are used (`EditOptions.from_dict`, serve/uploads.py): InputError, HTTP 400.

The OpenAI Images API (serve/openai_api.py) takes OpenAI's fields
(https://platform.openai.com/docs/api-reference/images): those that mean nothing here
(`OPENAI_IGNORED`: quality, background, user, ...) are accepted, named in the response's
`X-Ignored-Fields` header and logged; `options` (a JSON object of EditOptions fields) is
this server's addition (`extra_body` in OpenAI's clients).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from mlx_edit.options import FIELDS, EditOptions
from mlx_edit.serve.uploads import MODEL_KINDS, PATH_OPTIONS

STRICT = ConfigDict(extra="forbid")
OPENAI_IGNORED = ("quality", "background", "user", "output_format", "output_compression",
                  "moderation", "style", "input_fidelity", "partial_images", "stream")


def _options_model() -> type[BaseModel]:
    """EditOptions' fields served over HTTP (not those naming files on the server)."""
    hints = typing.get_type_hints(EditOptions)
    defaults = {f.name: f.default for f in dataclasses.fields(EditOptions)}
    fields = {name: (hints[name],
                     Field(defaults[name] if not isinstance(defaults[name], tuple)
                           else None, description=f"{help_} Modes: {', '.join(modes)}."))
              for name, (modes, help_) in FIELDS.items() if name not in PATH_OPTIONS}
    return create_model("EditOptions", __config__=STRICT, **fields)


EditOptionsModel = _options_model()
OPTIONS_HELP = "A JSON object of EditOptions fields (schema EditOptions)."


class EditForm(BaseModel):
    """`POST /v1/edits`: multipart fields (files: image, mask) or a JSON body (image and
    mask base64)."""

    model_config = STRICT
    image: bytes = Field(description="The photo (PNG, JPEG or WebP): a file, or base64 "
                                   "in a JSON body.")
    mask: bytes | None = Field(None, description="White = repaint (a file, or base64).")
    reference: list[bytes] | None = Field(None, description="Edit mode: further images "
                                          "(up to 4); a FLUX.2 [klein] inpaint: one, for "
                                          "the repainted area. Repeat the file field, or "
                                          "a list of base64 in a JSON body.")
    prompt: str = Field(description="What to paint, or the instruction (edit mode).")
    mode: Literal["inpaint", "outpaint", "edit"] = "inpaint"
    model: Literal[MODEL_KINDS] | None = Field(
        None, description="The served model that runs it (GET /v1/health `serves`: the "
                          "models of each mode). Default: inpaint/outpaint fill, edit "
                          "kontext, else klein.")
    options: str | dict | None = Field(None, description=OPTIONS_HELP)
    priority: Literal["interactive", "batch"] = "interactive"
    points: str | list | None = Field(None, description="Clicks [[x, y], ...] px (JSON), "
                                                        "with a segmenter.")
    labels: str | list | None = Field(None, description="1 (object) | 0 (background) per "
                                                        "point (JSON).")
    box: str | list | None = Field(None, description="[x0, y0, x1, y1] px (JSON).")


class MaskForm(BaseModel):
    """`POST /v1/masks`: an image and clicks or a box (SAM 2.1), or a phrase (SAM 3)."""

    model_config = STRICT
    image: bytes = Field(description="The photo: a file, or base64 in a JSON body.")
    points: str | list | None = None
    labels: str | list | None = None
    box: str | list | None = None
    text: str | None = Field(None, description="Every instance of this phrase (SAM 3), "
                                               "with a text segmenter.")
    threshold: str | float | None = Field(None, description="With text: keep instances "
                                                            "scoring above this, [0, 1).")
    instances: str | int | None = Field(None, description="With text: all (merged), best, "
                                                          "or an index N by score.")


_IGNORED_HELP = "OpenAI's; accepted and ignored (named in the X-Ignored-Fields header)."


class _OpenAIFields(BaseModel):
    model_config = STRICT
    prompt: str
    model: str | None = Field(None, description="A model this server serves (GET "
                                                "/v1/models); default: the one that fits.")
    n: int = Field(1, description="Images to return (options.num_images).")
    size: str | None = Field(None, description="WIDTHxHEIGHT px, or auto. Default "
                                               "(edits): the input image's size.")
    response_format: Literal["b64_json", "url"] = "b64_json"
    options: str | dict | None = Field(None, description="mlx-edit's addition: "
                                                         + OPTIONS_HELP)
    quality: Any = Field(None, description=_IGNORED_HELP)
    background: Any = Field(None, description=_IGNORED_HELP)
    user: Any = Field(None, description=_IGNORED_HELP)
    output_format: Any = Field(None, description=_IGNORED_HELP + " Images are PNG.")
    output_compression: Any = Field(None, description=_IGNORED_HELP)
    moderation: Any = Field(None, description=_IGNORED_HELP)
    input_fidelity: Any = Field(None, description=_IGNORED_HELP)
    partial_images: Any = Field(None, description=_IGNORED_HELP)
    stream: bool = Field(False, description="Only false (progress: POST /v1/edits and "
                                            "its events).")


class ImagesEditForm(_OpenAIFields):
    """`POST /v1/images/edits` (OpenAI Images API), multipart."""

    image: bytes = Field(description="The image to edit (files image or image[]: several "
                                     "are references, the first is edited).")
    mask: bytes | None = Field(None, description="PNG whose transparent pixels "
                                                 "(alpha 0) are edited, OpenAI's way.")


class ImagesGenerateBody(_OpenAIFields):
    """`POST /v1/images/generations` (OpenAI Images API), JSON."""

    style: Any = Field(None, description=_IGNORED_HELP)


def form_body(model: type[BaseModel], json_too: bool = False) -> dict:
    """`openapi_extra` declaring `model` as the request body (multipart, and JSON)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    content = {"multipart/form-data": {"schema": ref}}
    if json_too:
        content["application/json"] = {"schema": ref}
    return {"requestBody": {"required": True, "content": content}}


def json_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` declaring `model` as the JSON request body."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


SCHEMAS = (EditOptionsModel, EditForm, MaskForm, ImagesEditForm, ImagesGenerateBody)


def add_components(openapi: dict) -> dict:
    """`openapi` with the schemas of SCHEMAS (and their definitions) as components."""
    comps = openapi.setdefault("components", {}).setdefault("schemas", {})
    for model in SCHEMAS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        comps.update(schema.pop("$defs", {}))
        comps[model.__name__] = schema
    return openapi
