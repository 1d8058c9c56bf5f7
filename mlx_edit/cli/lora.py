"""The repeatable `--lora PATH_OR_REPO[:SCALE]` option of the editing commands.

    @lora_option
    def inpaint(..., **opts): ...
    specs = parse_lora_specs(opts.pop("lora", ()))   # before any model loads
    apply_loras(pipe, specs)                          # after the pipeline is built

A source is a .safetensors file, a Hugging Face repo id (`owner/name`, with one
.safetensors file) or `owner/name:file.safetensors`; a trailing `:NUMBER` is the strength
(default 1.0). Several LoRAs are summed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import click

PARAM = "lora"

_OPTION = click.option(
    "--lora", PARAM, multiple=True, metavar="PATH_OR_REPO[:SCALE]",
    help="Apply a FLUX LoRA, repeatable (SCALE 1.0 by default; owner/name:file.safetensors "
         "picks a repo's file). Formats: diffusers, kohya, ComfyUI, XLabs, fal, BFL control.")


def lora_option(f: Callable) -> Callable:
    """Add the repeatable --lora option to a click command."""
    return _OPTION(f)


def parse_lora_specs(values: Sequence[str]) -> list[tuple[str, float]]:
    """[(source, scale)] from --lora values, checked before any model loads: the scale
    (weights.lora.split_spec) and a local source (a file, not a folder; repo ids are
    fetched when applied). click.BadParameter for an empty source; InputError /
    WeightLoadError pass through."""
    from mlx_edit.weights.lora import locate, split_spec
    from mlx_edit.weights.sources import is_repo_id

    specs = []
    for value in values:
        source, scale = split_spec(value)
        if not source:
            raise click.BadParameter(f"--lora {value!r}: give PATH_OR_REPO[:SCALE]")
        if not is_repo_id(source.split(":")[0]):
            locate(source)
        specs.append((source, 1.0 if scale is None else scale))
    return specs


def apply_loras(pipe, specs: Sequence[tuple[str, float]]) -> list[str]:
    """Load every (source, scale) of `parse_lora_specs` into `pipe` (FluxFill.load_lora);
    returns the adapter names. WeightLoadError / InputError pass through (the caller
    turns them into usage errors)."""
    return [pipe.load_lora(source, scale) for source, scale in specs]
