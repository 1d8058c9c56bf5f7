"""CLI options for image prompts: `--ip-adapter/--ip-image/--ip-scale` and
`--redux/--redux-image/--redux-strength`, all repeatable, for `inpaint` and `outpaint`.

    @image_prompt_options          # on a click command
    def inpaint(..., **opts):
        extra = image_prompt_kwargs(opts)   # pops the options: {"ip_adapters", "redux"}

Pairing rules (errors are one-line click.UsageError messages):
- IP-Adapter: one --ip-adapter for any number of --ip-image (one adapter, their tokens
  concatenated), or as many adapters as images (paired in order). --ip-scale: none (1.0),
  one for all, or one per adapter; each is a float or a comma list of per-double-block
  floats (19 for FLUX.1; the length is checked against the transformer when it runs).
- Redux: one --redux for any number of --redux-image, or one per image (paired in
  order). --redux-strength: none (1.0), one for all, or one per image.
Only parsing here: no mlx import, so `--help` stays instant.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:  # imported inside the parsers: mlx_edit.conditioning.image_prompts imports mlx
    from mlx_edit.conditioning.image_prompts import IPAdapterSpec, ReduxSpec

OPTION_NAMES = ("ip_adapter", "ip_image", "ip_scale", "redux", "redux_image", "redux_strength")


def image_prompt_options(f):
    """Add the repeatable IP-Adapter and Redux options to a click command."""
    opts = [
        click.option("--ip-adapter", multiple=True, metavar="REPO_OR_PATH",
                     help="IP-Adapter (XLabs .safetensors, a folder with one, or repo id, e.g. "
                          "XLabs-AI/flux-ip-adapter). Repeatable."),
        click.option("--ip-image", multiple=True, type=click.Path(path_type=Path),
                     help="Reference image for the IP-Adapter(s). Repeatable."),
        click.option("--ip-scale", multiple=True, metavar="F[,F...]",
                     help="IP-Adapter strength: one float, or one per double block "
                          "(comma list). Repeatable: one per adapter. [default: 1.0]"),
        click.option("--redux", multiple=True, metavar="REPO_OR_PATH",
                     help="FLUX.1 Redux (folder or repo id, e.g. "
                          "black-forest-labs/FLUX.1-Redux-dev). Repeatable."),
        click.option("--redux-image", multiple=True, type=click.Path(path_type=Path),
                     help="Reference image for Redux. Repeatable."),
        click.option("--redux-strength", multiple=True, type=float,
                     help="Redux token multiplier per image (>= 0). Repeatable. [default: 1.0]"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _scale(text: str) -> float | list[float]:
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise click.UsageError(f"--ip-scale {text!r}: expected a number or a comma list of "
                               "numbers") from None
    if not all(v == v and abs(v) != float("inf") for v in values):
        raise click.UsageError(f"--ip-scale {text!r}: values must be finite")
    return values[0] if len(values) == 1 else values


def _check_images(images: Sequence[Path], option: str) -> None:
    for img in images:
        if not Path(img).is_file():
            raise click.UsageError(f"{option} {img} does not exist")


def _spread(values: Sequence, n: int, option: str, per: str, default):
    """None -> default for all; one -> all; n -> one each; else an error."""
    if not values:
        return [default] * n
    if len(values) == 1:
        return list(values) * n
    if len(values) == n:
        return list(values)
    raise click.UsageError(f"{len(values)} {option} values for {n} {per}: give one, or one "
                           f"per {per.rstrip('s')}")


def parse_ip_adapters(adapters: Sequence[str], images: Sequence[Path],
                      scales: Sequence[str] = ()) -> list[IPAdapterSpec]:
    """IPAdapterSpecs from the repeated option values (pairing rules in the module doc).
    Raises click.UsageError (missing image, counts that do not pair, bad scale)."""
    from mlx_edit.conditioning.image_prompts import IPAdapterSpec

    if not adapters:
        if images or scales:
            raise click.UsageError("--ip-image/--ip-scale need --ip-adapter")
        return []
    if not images:
        raise click.UsageError("--ip-adapter needs at least one --ip-image")
    _check_images(images, "--ip-image")
    if len(adapters) == 1:
        groups = [list(images)]
    elif len(adapters) == len(images):
        groups = [[img] for img in images]
    else:
        raise click.UsageError(f"{len(adapters)} --ip-adapter for {len(images)} --ip-image: "
                               "give one adapter, or one per image")
    parsed = _spread([_scale(s) for s in scales], len(adapters), "--ip-scale", "adapters", 1.0)
    return [IPAdapterSpec(a, g if len(g) > 1 else g[0], s)
            for a, g, s in zip(adapters, groups, parsed)]


def parse_redux(models: Sequence[str], images: Sequence[Path],
                strengths: Sequence[float] = ()) -> list[ReduxSpec]:
    """ReduxSpecs, one per image (pairing rules in the module doc).
    Raises click.UsageError (missing image, counts that do not pair, bad strength)."""
    from mlx_edit.conditioning.image_prompts import ReduxSpec

    if not models:
        if images or strengths:
            raise click.UsageError("--redux-image/--redux-strength need --redux")
        return []
    if not images:
        raise click.UsageError("--redux needs at least one --redux-image")
    _check_images(images, "--redux-image")
    if len(models) not in (1, len(images)):
        raise click.UsageError(f"{len(models)} --redux for {len(images)} --redux-image: give "
                               "one Redux model, or one per image")
    models = list(models) * len(images) if len(models) == 1 else list(models)
    values = _spread(strengths, len(images), "--redux-strength", "images", 1.0)
    for v in values:
        if not (v == v and 0 <= v < float("inf")):
            raise click.UsageError(f"--redux-strength must be a finite number >= 0, got {v}")
    return [ReduxSpec(m, img, s) for m, img, s in zip(models, images, values)]


def image_prompt_kwargs(opts: dict) -> dict:
    """Pop the image-prompt options from a command's `**opts` and parse them:
    {"ip_adapters": [IPAdapterSpec...], "redux": [ReduxSpec...]} (empty lists if unused).
    Raises click.UsageError."""
    v = {name: opts.pop(name, ()) or () for name in OPTION_NAMES}
    return {
        "ip_adapters": parse_ip_adapters(v["ip_adapter"], v["ip_image"], v["ip_scale"]),
        "redux": parse_redux(v["redux"], v["redux_image"], v["redux_strength"]),
    }
