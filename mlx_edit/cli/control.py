"""Click options for ControlNets on `mlx-edit inpaint|outpaint`, grouped per ControlNet.

    @control_options
    def inpaint(..., **kwargs):
        specs = pop_control_specs(kwargs)      # list[ControlNetSpec], [] when none given
        pipe.inpaint(..., controlnets=specs)

Every option is repeatable. `--controlnet` starts a group; each group needs one
`--control-image`. The other options are given 0 times (defaults), once (the value applies
to every group) or once per `--controlnet`, in the same order; any other count is a usage
error naming the option. Click cannot see how options interleave, so groups are matched
by position: the first --control-scale goes with the first --controlnet, and so on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import click

from mlx_edit.conditioning.controlnet import CONTROL_TYPES, DEFAULT_CANNY, ControlNetSpec
from mlx_edit.imaging.images import InputError

PARAMS = ("controlnet", "control_image", "control_type", "control_mode", "control_scale",
          "control_start", "control_end", "canny_low", "canny_high")

_OPTIONS = (
    click.option("--controlnet", "controlnet", multiple=True, metavar="REPO_OR_PATH",
                 help="ControlNet: Hugging Face repo id, diffusers folder or XLabs .safetensors "
                      "(repeatable: one group per ControlNet)."),
    click.option("--control-image", "control_image", multiple=True,
                 type=click.Path(exists=True, dir_okay=False), metavar="IMG",
                 help="Control image for the matching --controlnet (same framing as the image)."),
    click.option("--control-type", "control_type", multiple=True,
                 type=click.Choice(CONTROL_TYPES), metavar="|".join(CONTROL_TYPES),
                 help="Preprocessing, and the Union mode it implies (default: none = use the "
                      "image as a ready-made map)."),
    click.option("--control-mode", "control_mode", multiple=True, type=int, metavar="N",
                 help="Explicit Union mode (canny 0, tile 1, depth 2, blur 3, pose 4, gray 5, "
                      "low quality 6)."),
    click.option("--control-scale", "control_scale", multiple=True, type=float, metavar="F",
                 help="Residual scale in [0, 2] (default 1.0)."),
    click.option("--control-start", "control_start", multiple=True, type=float, metavar="F",
                 help="Fraction of the schedule where the ControlNet starts (default 0)."),
    click.option("--control-end", "control_end", multiple=True, type=float, metavar="F",
                 help="Fraction of the schedule where it stops (default 1)."),
    click.option("--canny-low", "canny_low", multiple=True, type=float, metavar="F",
                 help=f"Canny low threshold, 0-255 scale (default {DEFAULT_CANNY[0]:g})."),
    click.option("--canny-high", "canny_high", multiple=True, type=float, metavar="F",
                 help=f"Canny high threshold, 0-255 scale (default {DEFAULT_CANNY[1]:g})."),
)


def control_options(f: Callable) -> Callable:
    """Add the repeatable ControlNet options (PARAMS) to a click command."""
    for option in reversed(_OPTIONS):
        f = option(f)
    return f


def _per_group(name: str, values: Sequence, n: int, default) -> list:
    if not values:
        return [default] * n
    if len(values) == 1:
        return list(values) * n
    if len(values) == n:
        return list(values)
    flag = "--" + name.replace("_", "-")
    raise click.UsageError(f"{flag} given {len(values)} times for {n} --controlnet: give it "
                           "once (applies to all) or once per --controlnet, in order")


def parse_control_groups(
    controlnet: Sequence[str] = (),
    control_image: Sequence[str] = (),
    control_type: Sequence[str] = (),
    control_mode: Sequence[int] = (),
    control_scale: Sequence[float] = (),
    control_start: Sequence[float] = (),
    control_end: Sequence[float] = (),
    canny_low: Sequence[float] = (),
    canny_high: Sequence[float] = (),
) -> list[ControlNetSpec]:
    """Zip the repeatable options into one ControlNetSpec per --controlnet.

    Raises click.UsageError (option counts, a control option without --controlnet) and
    click.BadParameter (a value out of range), each with a one-line message.
    """
    n = len(controlnet)
    options = dict(control_image=control_image, control_type=control_type,
                   control_mode=control_mode, control_scale=control_scale,
                   control_start=control_start, control_end=control_end,
                   canny_low=canny_low, canny_high=canny_high)
    if n == 0:
        if any(options.values()):
            flags = ", ".join("--" + k.replace("_", "-") for k, v in options.items() if v)
            raise click.UsageError(f"{flags} given without --controlnet")
        return []
    if len(control_image) != n:
        raise click.UsageError(f"{n} --controlnet but {len(control_image)} --control-image: "
                               "each ControlNet needs its own control image, in order")
    columns = [
        _per_group("control_type", control_type, n, "none"),
        _per_group("control_mode", control_mode, n, None),
        _per_group("control_scale", control_scale, n, 1.0),
        _per_group("control_start", control_start, n, 0.0),
        _per_group("control_end", control_end, n, 1.0),
        _per_group("canny_low", canny_low, n, DEFAULT_CANNY[0]),
        _per_group("canny_high", canny_high, n, DEFAULT_CANNY[1]),
    ]
    specs = []
    for model, image, *rest in zip(controlnet, control_image, *columns):
        ctype, mode, scale, start, end, low, high = rest
        spec = ControlNetSpec(model, image, ctype, mode, scale, start, end, low, high)
        try:
            spec.validate()
        except InputError as e:
            raise click.BadParameter(str(e)) from e
        specs.append(spec)
    return specs


def pop_control_specs(kwargs: dict) -> list[ControlNetSpec]:
    """Remove the PARAMS entries from a command's kwargs and parse them into specs."""
    return parse_control_groups(**{k: kwargs.pop(k, ()) or () for k in PARAMS})
