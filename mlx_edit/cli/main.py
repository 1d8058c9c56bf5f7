"""`mlx-edit`: inpaint and outpaint photos with FLUX.1 Fill, restyle them with FLUX.1
Canny/Depth-dev, from the terminal.

The edit options, their defaults, ranges and help come from `mlx_edit.options` (the CLI
re-types none). Everything a run reads or writes is checked before any model loads:
the options, every input file, every output path (never an input, even with
--overwrite; its folder must exist and be writable). Outputs (images and sidecars) are
written together when the edit succeeded, or not at all. Errors are one line on stderr
with exit status 2 (`mlx_edit.cli.errors`). Heavy imports happen inside the commands so
`--help` is instant.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import click

from mlx_edit import __version__
from mlx_edit.cli.conditioning import conditioning_options, pop_conditioning
from mlx_edit.cli.cache import CacheSpec
from mlx_edit.cli.errors import OneLineGroup
from mlx_edit.cli.help import CONTEXT, SECTIONS, EditCommand
from mlx_edit.cli.lora import apply_loras, lora_option, parse_lora_specs
from mlx_edit.cli.progress import PhaseBars, phase_line
from mlx_edit.cli.prompt_cache import cache_stats, open_prompt_cache, prompt_cache_options
from mlx_edit.imaging.blend import BLEND_METHODS, COLOR_MATCH_METHODS
from mlx_edit.options import FIELDS, RESTYLE_CONTROL_TYPES, TILE_MODES, check_used, default
from mlx_edit.progress import reporting

SPEC_FIELDS = ("ip_adapters", "redux", "controlnets")  # from conditioning_options
# fields whose library default is None
_TYPES = {"guidance": float, "prompt_2": str, "steps": int, "negative_prompt": str,
          "width": int, "height": int, "rank": str, "keep_best": int, "rank_model": str,
          "segment_model": str, "window_batch": int, "mask_text": str,
          "text_segment_model": str}
_SHORT = {"num_images": "-n"}
_METAVAR = {int: "N", float: "F", str: "TEXT"}
_CHOICES = {"control_type": RESTYLE_CONTROL_TYPES, "tile_mode": TILE_MODES,
            "color_match": COLOR_MATCH_METHODS, "blend": BLEND_METHODS, "rank": ("clip",)}
_BFL_FILE = {"inpaint": "flux1-fill-dev.safetensors", "outpaint": "flux1-fill-dev.safetensors",
             "restyle": "flux1-canny-dev.safetensors", "edit": "flux1-kontext-dev.safetensors"}


def _mode_default(name: str, mode: str) -> str | None:
    """The default shown for an option whose library default is None because it is the
    variant's, resolved once the model is known (steps, guidance): `mode`'s FLUX.1
    variant's, and klein's where klein serves `mode`; restyle's guidance follows
    --control-type. None for other options."""
    from mlx_edit import variants

    if name == "guidance" and mode == "restyle":
        return "30, 10 for --control-type depth"
    if name not in ("steps", "guidance"):
        return None
    shown = f"{getattr(variants.for_edit(mode), name):g}"
    klein = variants.VARIANTS["klein"]
    if mode in klein.edits:
        shown += f"; klein {klein.steps}" if name == "steps" else "; klein: unused"
    return shown


def _field_option(name: str, mode: str):
    """The click option of EditOptions field `name` in `mode`'s command: the library's
    default (the mode's own where it depends on it) and help."""
    value, text = default(name), FIELDS[name][1]
    flag = "--" + name.replace("_", "-")
    kind = _TYPES.get(name, type(value))
    if _mode_default(name, mode) is not None:  # None: the model's variant decides
        return click.option(flag, name, type=kind, default=None, metavar=_METAVAR[kind],
                            show_default=_mode_default(name, mode), help=text)
    if name == "seed":  # the CLI's one deliberate difference: a random seed
        return click.option(flag, type=int, default=None, metavar="N",
                            help=f"{text} [default: random]")
    if name == "global_pass":
        return click.option(flag, is_flag=True, default=value, help=text)
    if name in ("paste_back", "crop_to_mask", "keep_size", "auto_resize", "soft_mask"):
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=value, help=text,
                            show_default=value is not None)
    if name == "cache":  # a spec string, parsed into its config by the option type
        return click.option(flag, type=CacheSpec(), default=None, help=text)
    if name in _CHOICES:
        choices = _CHOICES[name]
        return click.option(flag, type=click.Choice(choices), default=value,
                            show_default=True, help=text)
    decls = [flag, *([_SHORT[name]] if name in _SHORT else [])]
    return click.option(*decls, name, type=kind, default=value, metavar=_METAVAR.get(kind),
                        show_default=value is not None, help=text)


def mode_fields(mode: str) -> list[str]:
    """The EditOptions fields `mode`'s command has as options (specs come separately)."""
    return [f for f, (modes, _) in FIELDS.items() if mode in modes and f not in SPEC_FIELDS]


def edit_options(mode: str):
    """Add the run options and `mode`'s EditOptions fields to a click command."""
    from mlx_edit import variants

    default_model = ("black-forest-labs/FLUX.1-Canny-dev (FLUX.1-Depth-dev for "
                     "--control-type depth)" if mode == "restyle"
                     else variants.for_edit(mode).repo)
    prompt = (click.option("--instruction", "--prompt", "-p", "prompt", required=True,
                           help="The edit to make, e.g. 'make the car red'.")
              if mode == "edit" else
              click.option("--prompt", "-p", required=True, help="What to paint."))
    opts = [
        prompt,
        click.option("--model", "-m", default=None, show_default=default_model,
                     help="Hugging Face repo id, diffusers folder or mlx-edit folder."),
        click.option("--transformer", type=click.Path(exists=True, path_type=Path),
                     default=None, help="A BFL single-file transformer "
                     f"({_BFL_FILE[mode]}) used with --model's other parts."),
        click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
                     help="Output PNG (default: <image>-edit.png; -0, -1... with -n)."),
        *[_field_option(f, mode) for f in mode_fields(mode)],
        click.option("--quantize", "-q", type=click.Choice(["4", "8"]), default=None,
                     help="Quantize the transformer at load (bits)."),
        click.option("--low-memory", is_flag=True,
                     help="One model in memory at a time (VAE, transformer, VAE, each freed "
                          "after use; MLX's cache capped): lower peak, slower."),
        click.option("--metadata", is_flag=True, help="Also write a JSON sidecar."),
        click.option("--overwrite", is_flag=True,
                     help="Replace existing outputs (never an input file)."),
    ]

    def decorate(f):
        for opt in reversed(opts):
            f = opt(f)
        return prompt_cache_options(lora_option(f))
    return decorate


def output_paths(output: Path, n: int, metadata: bool) -> list[tuple[Path, Path | None]]:
    """(PNG, sidecar or None) per image: `output`, or output-0.png, output-1.png..."""
    if output.suffix.lower() != ".png":
        raise click.UsageError(f"--output {output} must end in .png (PNG keeps the metadata)")
    pngs = [output] if n == 1 else [output.with_name(f"{output.stem}-{i}.png") for i in range(n)]
    return [(p, p.with_suffix(".json") if metadata else None) for p in pngs]


def _flagged(e: Exception) -> click.UsageError:
    """An EditOptions message ("steps must be ...") with the field named as its flag."""
    msg = str(e)
    field = msg.split(" ", 1)[0]
    if field in FIELDS:
        msg = "--" + field.replace("_", "-") + msg[len(field):]
    return click.UsageError(msg)


def build_options(mode: str, opts: dict, specs: dict, variant=None):
    """EditOptions from the command's values (popped from `opts`), checked now, defaults
    resolved for `variant` (mlx_edit.variants; None: FLUX.1's for the mode)."""
    from mlx_edit.imaging.images import InputError
    from mlx_edit.options import EditOptions

    values = {f: opts.pop(f) for f in mode_fields(mode)}
    if values["seed"] is None:
        values["seed"] = int.from_bytes(os.urandom(3), "big")
    values.update({k: v for k, v in specs.items() if v})
    try:
        return EditOptions.from_dict(values, mode, variant)
    except InputError as e:
        raise _flagged(e) from None


def model_variant(mode: str, model: str | None):
    """The variant (mlx_edit.variants) `mode` runs on `--model` (its model_index.json;
    None: FLUX.1's default repo): a FLUX.2 [klein] folder runs edit and inpaint with
    FluxKlein. click.UsageError for a mode the folder's model does not serve."""
    from mlx_edit import variants
    from mlx_edit.weights.sources import read_model_index

    try:
        return variants.for_folder(read_model_index(model), mode)
    except ValueError as e:
        raise click.UsageError(f"--model {model}: {e}") from None


def check_inputs(image: Path, mask: Path | None, others: list[Path]) -> tuple[int, int]:
    """Read every input image now (missing, unreadable, empty mask): one-line errors.
    Returns the image's (width, height)."""
    from mlx_edit.imaging.images import load_image, load_mask

    size = load_image(image).size
    if mask is not None:
        with warnings.catch_warnings():  # the edit itself warns about a resized mask
            warnings.simplefilter("ignore")
            load_mask(mask, size)
    for other in others:
        load_image(other)
    return size


def click_mask(opts: dict, mask: Path | None, required: bool):
    """The edit's mask: the --mask path, or the --mask-point/--mask-negative/--mask-box
    clicks as segment.Points/Box prompts (popped from opts), or None when neither was
    given (--mask-text, an option, is segmented by the edit itself) and none is
    `required`. Raises click.UsageError for two kinds of mask or (required) none."""
    points, negatives, boxes = (opts.pop(k) for k in ("mask_point", "mask_negative",
                                                      "mask_box"))
    given = [mask is not None, bool(points or negatives or boxes),
             opts.get("mask_text") is not None]
    if sum(given) > 1:
        raise click.UsageError("give one of --mask, --mask-point/--mask-box or --mask-text")
    if not given[1]:
        if required and not any(given):
            raise click.UsageError("give --mask, or --mask-point/--mask-box or --mask-text "
                                   "to segment one")
        return mask
    from mlx_edit.editing.segment import Box, Points

    clicks = [*points, *negatives]
    spec = [Points(tuple(clicks), tuple([1] * len(points) + [0] * len(negatives)))] \
        if clicks else []
    return spec + [Box(*b) for b in boxes]


def click_metadata(clicks: list | None, segment_model: str | None, root: Path) -> dict:
    """What an output records of a mask made from clicks: mask_points, mask_negative,
    mask_box (as given, px) and the SAM 2.1 checkpoint used (str values, like `.info`)."""
    if not clicks:
        return {}
    from mlx_edit.editing.segment import Box, find_segmenter

    points = [p for c in clicks if not isinstance(c, Box)
              for p in zip(c.xy, c.labels or [1] * len(c.xy))]
    meta = {"mask_points": [list(xy) for xy, label in points if label == 1],
            "mask_negative": [list(xy) for xy, label in points if label == 0],
            "mask_box": [[b.x0, b.y0, b.x1, b.y1] for b in clicks if isinstance(b, Box)],
            "segment_model": find_segmenter(segment_model, root)}
    return {k: str(v) for k, v in meta.items() if v}


def mask_prompt_options(f):
    """--mask-point / --mask-negative / --mask-box: a mask from clicks (SAM 2.1)."""
    from mlx_edit.cli.mask import _coords

    for opt in reversed([
        click.option("--mask-point", multiple=True, callback=_coords(2), metavar="X,Y",
                     help="Segment the object under this pixel as the mask (repeatable)."),
        click.option("--mask-negative", multiple=True, callback=_coords(2), metavar="X,Y",
                     help="A pixel not on the object (with --mask-point)."),
        click.option("--mask-box", multiple=True, callback=_coords(4), metavar="X0,Y0,X1,Y1",
                     help="Segment the object in this box as the mask."),
    ]):
        f = opt(f)
    return f


def _run(mode: str, image: Path, mask, opts: dict, specs: dict,
         control_image: Path | None = None, references: tuple[Path, ...] = ()) -> None:
    """Check everything, load the model, run one edit with a progress bar, write the
    outputs together (never over an input). mask: a path, click prompts or None;
    references: edit's further images."""
    t0 = time.perf_counter()
    clicks = None if mask is None or isinstance(mask, Path) else mask
    mask = None if clicks is not None else mask
    variant, options, prompt, references = _check_edit(mode, mask, clicks, opts, specs,
                                                       references)
    inputs = _check_inputs(mode, image, mask, clicks, control_image, references, options,
                           opts, variant)
    kept = min(options.keep_best or options.num_images, options.num_images)  # --rank
    outputs = _check_outputs(image, kept, opts, inputs)
    cache = open_prompt_cache(opts)  # a folder that cannot be made fails before any load
    from mlx_edit.sampling.ranks import rank_group, stop_together

    ranks = rank_group()  # mlx.launch: rank 0 shows the progress and writes the outputs
    if ranks is not None:
        stop_together(ranks)  # mlx.launch stopping this rank (another failed): one line
    bars = PhaseBars(None if ranks is None or ranks.rank() == 0 else open(os.devnull, "w"))
    try:
        with reporting(bars):
            pipe = _load(mode, opts, variant)
            pipe.disk_prompt_cache = cache
            images = _edit(pipe, mode, image, clicks or mask, control_image, references,
                           prompt, options, bars)
    finally:
        bars.close()
    if ranks is not None and ranks.rank() != 0:
        return  # mlx.launch: every rank holds the same result, rank 0 writes it
    pipe.last_stats.update(cache_stats(pipe.disk_prompt_cache))
    pipe.last_stats["total_s"] = time.perf_counter() - t0  # up to the outputs' writing
    _write_outputs(pipe, image, images, outputs, clicks, options, opts, inputs, t0)


def _check_edit(mode: str, mask, clicks, opts: dict, specs: dict,
                references: tuple[Path, ...]) -> tuple:
    """(variant, EditOptions, prompt, references with klein's --reference) of a command,
    checked before any model loads (UsageError / InputError)."""
    from mlx_edit.options import check_prompt

    variant = model_variant(mode, opts["model"])
    options = build_options(mode, opts, specs, variant)
    if mode in ("restyle", "edit"):  # before the model loads (the API checks it again)
        from mlx_edit.imaging.images import InputError

        try:
            check_used(options, masked=mask is not None or clicks is not None
                       or options.mask_text is not None)
        except InputError as e:
            raise _flagged(e) from None
    opts["lora"] = parse_lora_specs(opts.get("lora", ()))  # scales, local files: now
    prompt = check_prompt(opts["prompt"], "instruction" if mode == "edit" else "prompt")
    reference = opts.pop("reference", None)  # klein inpaint's reference image
    if reference is not None and variant.family != "flux2":
        raise click.UsageError("--reference is FLUX.2 [klein]'s (inpaint with a klein "
                               "--model); FLUX.1 Fill takes image prompts: --redux")
    return variant, options, prompt, (*references, *([reference] if reference else []))


def _check_inputs(mode: str, image: Path, mask: Path | None, clicks, control_image,
                  references: tuple[Path, ...], options, opts: dict, variant) -> list[Path]:
    """The command's input files (outputs never overwrite them), after checking them:
    readable images and mask, klein's reference rules, click prompts inside the photo,
    an outpaint canvas within limits; all before any model loads (InputError)."""
    from mlx_edit.imaging.images import load_image

    inputs = [p for p in (image, mask, control_image, opts["transformer"]) if p is not None]
    inputs += options.input_files() + list(references)
    w, h = check_inputs(image, mask,
                        [p for p in inputs[1:] if p not in (mask, opts["transformer"])])
    if variant.family == "flux2":  # klein's reference rules, before any model loads
        from mlx_edit.conditioning.klein import check_reference

        for path in [image] * (mode == "edit") + list(references):
            check_reference(load_image(path), f"image {path}")
    if clicks:  # click prompts checked against the photo before any model loads
        from mlx_edit.editing.segment import prompt_arrays, prompts_from_specs

        prompt_arrays(**prompts_from_specs(clicks), image_size=(h, w), input_size=1024)
    if mode == "outpaint":  # before the model loads, and before the canvas is allocated
        from mlx_edit.options import check_canvas

        check_canvas(w + options.left + options.right, h + options.top + options.bottom)
    return inputs


def _check_outputs(image: Path, kept: int, opts: dict, inputs: list[Path]) -> list:
    """The (png, sidecar or None) paths of `kept` outputs, checked writable and not over
    an input or an existing file (unless --overwrite)."""
    from mlx_edit.imaging.images import check_output

    output = opts["output"] or image.with_name(f"{image.stem}-edit.png")
    outputs = output_paths(output, kept, opts["metadata"])
    for png, sidecar in outputs:
        for path in (png, sidecar):
            if path is not None:
                check_output(path, opts["overwrite"], inputs)
    return outputs


def _write_outputs(pipe, image: Path, images: list, outputs: list, clicks, options,
                   opts: dict, inputs: list[Path], t0: float) -> None:
    """Write the images (with their metadata, the input's ICC profile and the optional
    JSON sidecars) together, print their paths and the phase timings line."""
    from mlx_edit.imaging.images import (
        json_writer, load_image, png_writer, typed_metadata, write_together)

    icc = load_image(image).info.get("icc_profile")
    files = []
    for (png, sidecar), img in zip(outputs, images):
        meta = {**img.info, **click_metadata(clicks, options.segment_model, pipe.root)}
        meta.pop("icc_profile", None)
        files.append((png, png_writer(img, meta, icc)))
        if sidecar is not None:
            files.append((sidecar, json_writer({**typed_metadata(meta),
                                                "stats": pipe.last_stats})))
    t_write = time.perf_counter()
    write_together(files, overwrite=opts["overwrite"], protect=inputs)
    for png, _ in outputs:
        click.echo(str(png))
    wall = time.perf_counter() - t0
    click.echo(phase_line({**pipe.last_stats, "write_s": time.perf_counter() - t_write},
                          wall), err=True)


def _load(mode: str, opts: dict, variant):
    """The pipeline of `mode` on `variant`'s family (FluxKlein for FLUX.2; FluxKontext for
    edit, else FluxFill) with its LoRAs."""
    from mlx_edit import variants
    from mlx_edit.editing.klein import FluxKlein
    from mlx_edit.editing.kontext import FluxKontext
    from mlx_edit.editing.pipeline import FluxFill

    cls = FluxKlein if variant.family == "flux2" else FluxKontext if mode == "edit" \
        else FluxFill
    pipe = cls.from_pretrained(
        opts["model"] or variants.for_edit(mode).repo,
        quantize=int(opts["quantize"]) if opts["quantize"] else None,
        transformer=opts["transformer"], low_memory=opts["low_memory"])
    apply_loras(pipe, opts["lora"])
    return pipe


def _edit(pipe, mode: str, image: Path, mask, control_image, references, prompt: str,
          options, progress) -> list:
    """Run `mode`'s edit reporting to `progress` (mlx_edit.progress); returns the images."""
    if mode == "inpaint" and references:  # FluxKlein: its reference image
        return pipe.inpaint(image, mask, prompt, options, reference=references[0],
                            progress=progress)
    if mode == "inpaint":
        return pipe.inpaint(image, mask, prompt, options, progress=progress)
    if mode == "restyle":
        return pipe.restyle(image, control_image, prompt, options, mask=mask,
                            progress=progress)
    if mode == "edit":
        return pipe.edit([image, *references], prompt, options, mask=mask,
                         progress=progress)
    return pipe.outpaint(image, prompt, options, progress=progress)


@click.group(cls=OneLineGroup, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="mlx-edit")
def main():
    """Edit photos with FLUX.1 on Apple MLX: inpaint (a mask painted or from clicks),
    outpaint, edit by instruction (Kontext), restyle; batches and a server.
    `mlx-edit COMMAND --help` shows a command's options. Errors: one line on stderr, exit
    status 2 (MLX_EDIT_DEBUG=1: traceback)."""


_IMAGE = click.Path(path_type=Path, dir_okay=False)


@main.command(cls=EditCommand, section=SECTIONS["edit"])
@click.option("--image", "-i", required=True, type=_IMAGE, help="Photo to edit.")
@click.option("--mask", type=_IMAGE, default=None,
              help="White = repaint, black = keep (any size; resized with a warning).")
@click.option("--reference", type=_IMAGE, default=None,
              help="FLUX.2 [klein] --model only: a reference image for the repainted area.")
@edit_options("inpaint")
@conditioning_options
@mask_prompt_options
def inpaint(image, mask, **opts):
    """Repaint the white area of MASK in IMAGE following PROMPT (or the object under
    --mask-point / in --mask-box, segmented with SAM 2.1, or the instances of
    --mask-text, SAM 3)."""
    mask = click_mask(opts, mask, required=True)
    _run("inpaint", image, mask, opts, pop_conditioning(opts))


@main.command(cls=EditCommand, section=SECTIONS["edit"])
@click.option("--image", "-i", required=True, type=_IMAGE, help="Photo to extend.")
@edit_options("outpaint")
@conditioning_options
def outpaint(image, **opts):
    """Extend IMAGE by LEFT/RIGHT/TOP/BOTTOM pixels, painting the new area from PROMPT."""
    _run("outpaint", image, None, opts, pop_conditioning(opts))


@main.command(cls=EditCommand, section=SECTIONS["edit"])
@click.option("--image", "-i", required=True, type=_IMAGE, help="Photo to restyle.")
@click.option("--control-image", type=_IMAGE, default=None,
              help="Structure to keep: a photo (canny edges are computed), an edge map or a "
                   "depth map, framed like --image (default: --image itself, for canny).")
@click.option("--mask", type=_IMAGE, default=None,
              help="Restyle only the white area (default: the whole image).")
@edit_options("restyle")
def restyle(image, control_image, mask, **opts):
    """Repaint IMAGE (or its MASK area) from PROMPT, keeping its edges or depth, with the
    FLUX.1 Canny-dev / Depth-dev models (default --guidance 30, 10 for depth)."""
    if control_image is None and opts["control_type"] != "canny":
        raise click.UsageError(f"--control-type {opts['control_type']} needs --control-image "
                               "(a ready-made map)")
    if opts["model"] is None:
        opts["model"] = ("black-forest-labs/FLUX.1-Depth-dev" if opts["control_type"] == "depth"
                         else "black-forest-labs/FLUX.1-Canny-dev")
    _run("restyle", image, mask, opts, {}, control_image)


@main.command(cls=EditCommand, section=SECTIONS["edit"])
@click.option("--image", "-i", "images", required=True, multiple=True, type=_IMAGE,
              help="Photo to edit; repeat to add reference images (the first is edited).")
@click.option("--mask", type=_IMAGE, default=None,
              help="Edit only the white area (Kontext inpainting; default: everywhere).")
@edit_options("edit")
@mask_prompt_options
def edit(images, mask, **opts):
    """Edit IMAGE following INSTRUCTION with FLUX.1 Kontext [dev] (default --model
    black-forest-labs/FLUX.1-Kontext-dev; 28 steps, guidance 2.5; output at the image's
    preferred Kontext size unless --width/--height or --keep-size), or with a FLUX.2
    [klein] --model (4 steps, guidance unused; Base: 50 steps, true CFG at guidance 4;
    every --image a reference, output at the first one's size up to ~1 MP)."""
    mask = click_mask(opts, mask, required=False)
    _run("edit", images[0], mask, opts, {}, references=tuple(images[1:]))


def _register_commands() -> None:
    """Commands that live in their own modules (conversion, parity, batch)."""
    from mlx_edit.cli.batch import batch_command
    from mlx_edit.cli.convert import convert_command
    from mlx_edit.cli.mask import mask_command
    from mlx_edit.cli.serve import serve_command
    from mlx_edit.parity import parity_command

    main.add_command(mask_command, "mask", section=SECTIONS["edit"])
    main.add_command(batch_command, "batch", section=SECTIONS["many"])
    main.add_command(serve_command, "serve", section=SECTIONS["many"])
    main.add_command(convert_command, "convert", section=SECTIONS["models"])
    main.add_command(parity_command, "parity", section=SECTIONS["models"])


_register_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
