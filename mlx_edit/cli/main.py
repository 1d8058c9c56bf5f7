"""`mlx-edit`: inpaint and outpaint photos with FLUX.1 Fill, restyle them with FLUX.1
Canny/Depth-dev, from the terminal.

Heavy imports (mlx, the pipeline) happen inside the commands so `--help` is instant.
Usage errors exit with status 2 and a one-line message; nothing is written on error.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

import click

from mlx_edit import __version__
from mlx_edit.cli.cache import cache_option, cache_summary
from mlx_edit.cli.control import control_options, pop_control_specs
from mlx_edit.cli.image_prompts import image_prompt_kwargs, image_prompt_options


def _usage(message: str) -> click.UsageError:
    return click.UsageError(message)


def common_options(f):
    """Options shared by inpaint and outpaint."""
    opts = [
        click.option("--prompt", "-p", required=True, help="What to paint."),
        click.option("--prompt-2", default=None, help="T5 prompt (default: --prompt)."),
        click.option("--model", "-m", default=None, show_default="black-forest-labs/FLUX.1-Fill-dev",
                     help="Hugging Face repo id, diffusers folder or mlx-edit folder."),
        click.option("--transformer", type=click.Path(exists=True, path_type=Path),
                     default=None, help="A BFL single-file Fill transformer "
                     "(flux1-fill-dev.safetensors) used with --model's other parts."),
        click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
                     default=None, help="Output PNG (default: <image>-edit.png)."),
        click.option("--steps", type=int, default=50, show_default=True),
        click.option("--guidance", type=float, default=30.0, show_default=True),
        click.option("--seed", type=int, default=None, help="Random seed (default: random)."),
        click.option("--num-images", "-n", type=int, default=1, show_default=True,
                     help="Images generated as one batch (seeds seed, seed+1, ...)."),
        click.option("--crop-to-mask/--no-crop-to-mask", default=None,
                     help="Edit a ~1 MP window around the mask of a large photo and stitch "
                          "it back (default: automatic)."),
        click.option("--quantize", "-q", type=click.Choice(["4", "8"]), default=None,
                     help="Quantize the transformer at load (bits)."),
        click.option("--low-memory", is_flag=True,
                     help="Keep one model in memory at a time: load the VAE, then the "
                          "transformer, then the VAE again for each edit and free each after "
                          "use, and cap MLX's cache. Lower peak memory, slower (weights are "
                          "read again every run)."),
        click.option("--max-sequence-length", type=int, default=512, show_default=True),
        click.option("--metadata", is_flag=True, help="Also write a JSON sidecar."),
        click.option("--overwrite", is_flag=True, help="Replace an existing output file."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _default_output(image: Path, n: int) -> Path:
    return image.with_name(f"{image.stem}-edit.png")


def _outputs(output: Path, n: int) -> list[Path]:
    if n == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix or '.png'}") for i in range(n)]


def _check_outputs(paths: list[Path], inputs: list[Path], overwrite: bool) -> None:
    """Refuse before any work: existing outputs without --overwrite, or an input path."""
    for p in paths:
        if p.suffix.lower() != ".png":
            raise _usage(f"output {p} must end in .png (PNG keeps the metadata lossless)")
        if not p.parent.is_dir():
            raise _usage(f"output folder {p.parent} does not exist")
        for i in inputs:
            if i.exists() and p.exists() and p.resolve() == i.resolve():
                raise _usage(f"output {p} is an input file; choose another --output")
        if p.exists() and not overwrite:
            raise _usage(f"{p} exists; pass --overwrite to replace it or choose another --output")


def _run(kind: str, image: Path, mask: Path | None, opts: dict, edit_kwargs: dict,
         extra_inputs: tuple[Path, ...] = ()) -> None:
    """Load the model, run one edit with a progress bar, write the outputs (never over
    `image`, `mask` or `extra_inputs`)."""
    from mlx_edit.imaging.images import InputError, load_image, load_mask, save_json_sidecar, save_png
    from mlx_edit.weights.core import WeightLoadError

    if opts["steps"] < 1:
        raise _usage(f"--steps must be >= 1, got {opts['steps']}")
    if opts["num_images"] < 1:
        raise _usage(f"--num-images must be >= 1, got {opts['num_images']}")
    seed = opts["seed"] if opts["seed"] is not None else int.from_bytes(os.urandom(3), "big")
    output = opts["output"] or _default_output(image, opts["num_images"])
    outputs = _outputs(output, opts["num_images"])
    inputs = [image] + ([mask] if mask else []) + list(extra_inputs)
    _check_outputs(outputs, inputs, opts["overwrite"])
    try:  # validate inputs before the (slow) model load
        load_image(image)
        if mask is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load_mask(mask, load_image(image).size)
    except InputError as e:
        raise _usage(str(e)) from None

    from mlx_edit.pipeline import DEFAULT_MODEL, FluxFill

    model = opts["model"] or DEFAULT_MODEL
    try:
        pipe = FluxFill.from_pretrained(
            model, quantize=int(opts["quantize"]) if opts["quantize"] else None,
            transformer=opts["transformer"], low_memory=opts["low_memory"],
        )
    except WeightLoadError as e:  # wrong --model: a usage error
        raise _usage(str(e)) from None

    from tqdm import tqdm

    common = dict(steps=opts["steps"], guidance=opts["guidance"], seed=seed,
                  num_images=opts["num_images"], crop_to_mask=opts["crop_to_mask"],
                  prompt_2=opts["prompt_2"], max_sequence_length=opts["max_sequence_length"],
                  cache=opts.get("cache"))
    try:
        bar = tqdm(total=opts["steps"], unit="step", desc=kind, file=sys.stderr)

        def progress(step, total):
            bar.total = total
            bar.update(1)

        if kind == "inpaint":
            method = functools.partial(pipe.inpaint, image, mask, opts["prompt"])
        elif kind == "restyle":
            method = functools.partial(pipe.restyle, image, prompt=opts["prompt"], mask=mask)
        else:
            method = functools.partial(pipe.outpaint, image, opts["prompt"])
        images = method(**common, **edit_kwargs, progress=progress)
        bar.close()
    except (InputError, WeightLoadError) as e:
        raise _usage(str(e)) from None
    icc = load_image(image).info.get("icc_profile")
    for path, img in zip(outputs, images):
        meta = dict(img.info)
        save_png(img, path, meta, overwrite=opts["overwrite"], protect=inputs, icc_profile=icc)
        if opts["metadata"]:
            save_json_sidecar(path.with_suffix(".json"), {**meta, "stats": pipe.last_stats},
                              overwrite=opts["overwrite"], protect=inputs)
        click.echo(str(path))
    s = pipe.last_stats
    peak = max(v for k, v in s.items() if k.endswith("_peak_gb"))
    load = sum(v for k, v in s.items() if k.startswith("load") and k.endswith("_s"))
    click.echo(  # load: at start, plus the per-edit loads of --low-memory
        f"load {load:.1f}s  text {s['text_encode_s']:.1f}s  vae-enc {s['vae_encode_s']:.1f}s  "
        f"denoise {s['denoise_s']:.1f}s ({s['step_s']:.2f} s/step)  vae-dec {s['vae_decode_s']:.1f}s  "
        f"peak {peak:.2f} GB{cache_summary(s)}",
        err=True,
    )


@click.group()
@click.version_option(__version__, prog_name="mlx-edit")
def main():
    """Edit photos with FLUX.1 Fill on Apple MLX: inpaint, outpaint, convert, parity."""


@main.command()
@click.option("--image", "-i", required=True, type=click.Path(path_type=Path), help="Photo to edit.")
@click.option("--mask", required=True, type=click.Path(path_type=Path),
              help="White = repaint, black = keep (any size; resized with a warning).")
@click.option("--strength", type=float, default=1.0, show_default=True,
              help="< 1 starts from the photo (img2img style).")
@click.option("--grow-mask", type=float, default=0, show_default=True, help="Dilate the mask (px).")
@click.option("--feather", type=float, default=8, show_default=True, help="Soft blend width (px).")
@click.option("--no-paste-back", is_flag=True,
              help="Keep the model's pixels outside the mask too (default: exact originals).")
@common_options
@cache_option
@control_options
@image_prompt_options
def inpaint(image, mask, strength, grow_mask, feather, no_paste_back, **opts):
    """Repaint the white area of MASK in IMAGE following PROMPT."""
    extra = {**image_prompt_kwargs(opts), "controlnets": pop_control_specs(opts)}
    for path, what in ((image, "image"), (mask, "mask")):
        if not path.exists():
            raise _usage(f"{what} {path} does not exist")
    if not 0 < strength <= 1:
        raise _usage(f"--strength must be in (0, 1], got {strength}")
    if grow_mask < 0 or feather < 0:
        raise _usage("--grow-mask and --feather must be >= 0")
    _run("inpaint", image, mask, opts, dict(strength=strength, grow_mask=grow_mask,
                                             feather=feather, paste_back=not no_paste_back,
                                             **extra))


@main.command()
@click.option("--image", "-i", required=True, type=click.Path(path_type=Path), help="Photo to extend.")
@click.option("--left", type=int, default=0, show_default=True, help="px to add on the left.")
@click.option("--right", type=int, default=0, show_default=True)
@click.option("--top", type=int, default=0, show_default=True)
@click.option("--bottom", type=int, default=0, show_default=True)
@click.option("--overlap", type=int, default=32, show_default=True,
              help="px of the original regenerated along each seam.")
@common_options
@cache_option
@control_options
@image_prompt_options
def outpaint(image, left, right, top, bottom, overlap, **opts):
    """Extend IMAGE by LEFT/RIGHT/TOP/BOTTOM pixels, painting the new area from PROMPT."""
    extra = {**image_prompt_kwargs(opts), "controlnets": pop_control_specs(opts)}
    if not image.exists():
        raise _usage(f"image {image} does not exist")
    if min(left, right, top, bottom) < 0 or max(left, right, top, bottom) == 0:
        raise _usage("outpaint needs --left/--right/--top/--bottom >= 0, at least one > 0")
    _run("outpaint", image, None, opts, dict(left=left, right=right, top=top, bottom=bottom,
                                              overlap=overlap, **extra))


@main.command()
@click.option("--image", "-i", required=True, type=click.Path(path_type=Path),
              help="Photo to restyle.")
@click.option("--control-image", type=click.Path(path_type=Path), default=None,
              help="Structure to keep: a photo (canny edges are computed), an edge map or a "
                   "depth map, framed like --image (default: --image itself, for canny).")
@click.option("--control-type", type=click.Choice(["canny", "depth", "none"]), default="canny",
              show_default=True, help="canny: edges of --control-image; depth / none: "
                                      "--control-image is a ready-made map.")
@click.option("--mask", type=click.Path(path_type=Path), default=None,
              help="Restyle only the white area (default: the whole image).")
@click.option("--strength", type=float, default=1.0, show_default=True,
              help="< 1 starts from the photo (img2img style).")
@click.option("--grow-mask", type=float, default=0, show_default=True, help="Dilate the mask (px).")
@click.option("--feather", type=float, default=8, show_default=True, help="Soft blend width (px).")
@click.option("--no-paste-back", is_flag=True,
              help="With --mask: keep the model's pixels outside the mask too.")
@click.option("--canny-low", type=float, default=50.0, show_default=True,
              help="Canny low threshold (0-255 scale).")
@click.option("--canny-high", type=float, default=200.0, show_default=True)
@common_options
@cache_option
def restyle(image, control_image, control_type, mask, strength, grow_mask, feather,
            no_paste_back, canny_low, canny_high, **opts):
    """Repaint IMAGE (or its MASK area) from PROMPT, keeping its edges or depth, with the
    FLUX.1 Canny-dev / Depth-dev models (default --model: black-forest-labs/FLUX.1-Canny-dev,
    FLUX.1-Depth-dev for --control-type depth; default --guidance 30, 10 for depth)."""
    for path, what in ((image, "image"), (mask, "mask"), (control_image, "control image")):
        if path is not None and not path.exists():
            raise _usage(f"{what} {path} does not exist")
    if control_image is None and control_type != "canny":
        raise _usage(f"--control-type {control_type} needs --control-image (a ready-made map)")
    if not 0 < strength <= 1:
        raise _usage(f"--strength must be in (0, 1], got {strength}")
    if grow_mask < 0 or feather < 0:
        raise _usage("--grow-mask and --feather must be >= 0")
    if not 0 <= canny_low <= canny_high:
        raise _usage(f"--canny-low/--canny-high must satisfy 0 <= low <= high, got "
                     f"{canny_low}, {canny_high}")
    ctx = click.get_current_context()
    if ctx.get_parameter_source("guidance") == click.core.ParameterSource.DEFAULT:
        opts["guidance"] = None  # the pipeline picks BFL's default for the control type
    if opts["model"] is None:
        opts["model"] = ("black-forest-labs/FLUX.1-Depth-dev" if control_type == "depth"
                         else "black-forest-labs/FLUX.1-Canny-dev")
    _run("restyle", image, mask, opts,
         dict(control_image=control_image, control_type=control_type, strength=strength,
              grow_mask=grow_mask, feather=feather, paste_back=not no_paste_back,
              canny_low=canny_low, canny_high=canny_high),
         extra_inputs=(control_image,) if control_image else ())


def _register_commands() -> None:
    """Commands that live in their own modules (conversion, parity)."""
    from mlx_edit.cli.convert import convert_command
    from mlx_edit.parity import parity_command

    main.add_command(convert_command, "convert")
    main.add_command(parity_command, "parity")


_register_commands()

if __name__ == "__main__":  # pragma: no cover
    main()

