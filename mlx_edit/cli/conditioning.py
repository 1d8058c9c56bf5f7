"""Repeatable conditioning options of `mlx-edit inpaint|outpaint`, paired by one rule.

    @conditioning_options
    def inpaint(..., **opts):
        specs = pop_conditioning(opts)   # {"controlnets", "ip_adapters", "redux"}: spec lists

Groups: `--controlnet` (with --control-image, --control-type, --control-mode,
--control-scale, --control-start, --control-end, --canny-low, --canny-high),
`--ip-adapter` (with --ip-image, --ip-scale), `--redux` (with --redux-image,
--redux-strength). Click cannot see how options interleave, so values pair by position.
The one pairing rule (`spread`): a per-group value is given 0 times (default), once
(applies to every group) or once per group, in order; any other count is a one-line
usage error naming the option. Images: each --controlnet needs its own --control-image;
one --ip-adapter takes any number of --ip-image (their tokens concatenated), several
adapters pair with as many images; one --redux serves every --redux-image, or one each.
Only parsing here: the spec classes (which import mlx) are imported inside the parsers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import click

from mlx_edit.options import CONTROL_TYPES, DEFAULT_CANNY

CONTROL_PARAMS = ("controlnet", "control_image", "control_type", "control_mode",
                  "control_scale", "control_start", "control_end", "canny_low", "canny_high")
IMAGE_PROMPT_PARAMS = ("ip_adapter", "ip_image", "ip_scale", "redux", "redux_image",
                       "redux_strength")
PARAMS = CONTROL_PARAMS + IMAGE_PROMPT_PARAMS

_OPTIONS = (
    click.option("--controlnet", multiple=True, metavar="REPO_OR_PATH",
                 help="ControlNet: Hugging Face repo id, diffusers folder or XLabs .safetensors "
                      "(repeatable: one group per ControlNet)."),
    click.option("--control-image", multiple=True, metavar="IMG",
                 type=click.Path(path_type=Path),
                 help="Control image for the matching --controlnet (same framing as the image)."),
    click.option("--control-type", multiple=True, type=click.Choice(CONTROL_TYPES),
                 metavar="|".join(CONTROL_TYPES),
                 help="Preprocessing, and the Union mode it implies (default: none = use the "
                      "image as a ready-made map)."),
    click.option("--control-mode", multiple=True, type=int, metavar="N",
                 help="Explicit Union mode (canny 0, tile 1, depth 2, blur 3, pose 4, gray 5, "
                      "low quality 6)."),
    click.option("--control-scale", multiple=True, type=float, metavar="F",
                 help="Residual scale in [0, 2] (default 1.0)."),
    click.option("--control-start", multiple=True, type=float, metavar="F",
                 help="Fraction of the schedule where the ControlNet starts (default 0)."),
    click.option("--control-end", multiple=True, type=float, metavar="F",
                 help="Fraction of the schedule where it stops (default 1)."),
    click.option("--canny-low", multiple=True, type=float, metavar="F",
                 help=f"Canny low threshold, 0-255 scale (default {DEFAULT_CANNY[0]:g})."),
    click.option("--canny-high", multiple=True, type=float, metavar="F",
                 help=f"Canny high threshold, 0-255 scale (default {DEFAULT_CANNY[1]:g})."),
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
)


def conditioning_options(f: Callable) -> Callable:
    """Add every repeatable conditioning option (PARAMS) to a click command."""
    for option in reversed(_OPTIONS):
        f = option(f)
    return f


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def spread(name: str, values: Sequence, n: int, per: str, default) -> list:
    """The pairing rule: no value -> `default` for all n groups; one -> all; n -> one
    each, in order; else click.UsageError naming `--name` and `per` (the group flag)."""
    if not values:
        return [default] * n
    if len(values) in (1, n):
        return list(values) * (n // len(values))
    raise click.UsageError(f"{_flag(name)} given {len(values)} times for {n} {per}: give it "
                           f"once (applies to all) or once per {per.split()[-1]}, in order")


def _need_group(group: str, given: dict) -> None:
    used = [_flag(k) for k, v in given.items() if v]
    if used:
        raise click.UsageError(f"{', '.join(used)} given without {_flag(group)}")


def _check_images(images: Sequence, option: str) -> None:
    for img in images:
        if Path(img).is_dir():
            raise click.UsageError(f"{option} {img} is a folder, not an image file")
        if not Path(img).is_file():
            raise click.UsageError(f"{option} {img} does not exist")


def _validated(spec):
    from mlx_edit.imaging.images import InputError

    try:
        spec.validate()
    except InputError as e:
        raise click.BadParameter(str(e)) from None
    return spec


def parse_control_groups(controlnet: Sequence[str] = (), control_image: Sequence = (),
                         **columns: Sequence) -> list:
    """One ControlNetSpec per --controlnet; `columns` are the other CONTROL_PARAMS.
    Raises click.UsageError (counts, options without --controlnet, missing image) and
    click.BadParameter (a value out of range)."""
    from mlx_edit.conditioning.controlnet import ControlNetSpec

    n, per = len(controlnet), "--controlnet"
    if n == 0:
        _need_group("controlnet", {"control_image": control_image, **columns})
        return []
    if len(control_image) != n:
        raise click.UsageError(f"{n} --controlnet but {len(control_image)} --control-image: "
                               "each ControlNet needs its own control image, in order")
    defaults = dict(control_type="none", control_mode=None, control_scale=1.0,
                    control_start=0.0, control_end=1.0, canny_low=DEFAULT_CANNY[0],
                    canny_high=DEFAULT_CANNY[1])
    cols = [spread(k, columns.get(k, ()), n, per, d) for k, d in defaults.items()]
    specs = [_validated(ControlNetSpec(model, str(image), *rest))
             for model, image, *rest in zip(controlnet, control_image, *cols)]
    _check_images(control_image, "--control-image")
    return specs


def _scale(text: str) -> float | list[float]:
    try:
        values = [float(p.strip()) for p in str(text).split(",")]
    except ValueError:
        raise click.UsageError(f"--ip-scale {text!r}: expected a number or a comma list of "
                               "numbers") from None
    return values[0] if len(values) == 1 else values


def _check_pairing(flag: str, models: Sequence, image_flag: str, images: Sequence,
                   what: str) -> None:
    """click.UsageError unless `images` are given and readable (`_check_images`) and
    there is one of `models` for all, or one per image."""
    if not images:
        raise click.UsageError(f"{flag} needs at least one {image_flag}")
    _check_images(images, image_flag)
    if len(models) not in (1, len(images)):
        raise click.UsageError(f"{len(models)} {flag} for {len(images)} {image_flag}: "
                               f"give one {what}, or one per image")


def parse_ip_adapters(adapters: Sequence[str], images: Sequence, scales: Sequence[str] = ()
                      ) -> list:
    """IPAdapterSpecs (pairing in the module doc). Raises click.UsageError/BadParameter."""
    from mlx_edit.conditioning.image_prompts import IPAdapterSpec

    if not adapters:
        _need_group("ip_adapter", {"ip_image": images, "ip_scale": scales})
        return []
    _check_pairing("--ip-adapter", adapters, "--ip-image", images, "adapter")
    groups = [list(images)] if len(adapters) == 1 else [[img] for img in images]
    parsed = spread("ip_scale", [_scale(s) for s in scales], len(adapters), "--ip-adapter", 1.0)
    return [_validated(IPAdapterSpec(a, g if len(g) > 1 else g[0], s))
            for a, g, s in zip(adapters, groups, parsed)]


def parse_redux(models: Sequence[str], images: Sequence, strengths: Sequence[float] = ()
                ) -> list:
    """ReduxSpecs, one per image (pairing in the module doc)."""
    from mlx_edit.conditioning.image_prompts import ReduxSpec

    if not models:
        _need_group("redux", {"redux_image": images, "redux_strength": strengths})
        return []
    _check_pairing("--redux", models, "--redux-image", images, "Redux model")
    models = spread("redux", models, len(images), "--redux-image", None)
    values = spread("redux_strength", strengths, len(images), "--redux-image", 1.0)
    return [_validated(ReduxSpec(m, img, s)) for m, img, s in zip(models, images, values)]


def pop_conditioning(opts: dict) -> dict:
    """Pop PARAMS from a command's `**opts` and parse them: {"controlnets", "ip_adapters",
    "redux"} -> spec lists (empty when unused). Raises click.UsageError/BadParameter."""
    v = {name: tuple(opts.pop(name, ()) or ()) for name in PARAMS}
    return {
        "controlnets": parse_control_groups(**{k: v[k] for k in CONTROL_PARAMS}),
        "ip_adapters": parse_ip_adapters(v["ip_adapter"], v["ip_image"], v["ip_scale"]),
        "redux": parse_redux(v["redux"], v["redux_image"], v["redux_strength"]),
    }

