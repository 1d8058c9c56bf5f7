"""`mlx-edit mask`: a mask PNG from clicks and boxes on a photo, with SAM 2.1.

    mlx-edit mask --image IMG --point X,Y [--point X,Y ...] [--negative X,Y ...]
        [--box X0,Y0,X1,Y1 ...] [--model REPO_OR_PATH] --output mask.png [--overwrite]
    mlx-edit mask --image IMG --all [--points-per-side 32] --output masks.png


The points (and at most one box) describe one object; several boxes without points are
several objects, whose masks are united. One click uses SAM's three candidate masks and
keeps the best by predicted IoU; more prompts ask for one mask (SAM's advice). The PNG is
8-bit grey, 255 inside the mask, at the photo's own size (after EXIF orientation), ready
for `mlx-edit inpaint --mask`. `--all` runs the automatic mask generator
(mlx_edit.editing.automask) instead and writes `masks-0.png, masks-1.png, ...` (largest first)
and `masks.json` (file, bbox, area, predicted_iou, stability_score, point per mask).
Exit status: 0 done, 2 a usage error (bad prompt, bad
image, unusable model; nothing is written).
"""

from __future__ import annotations

from pathlib import Path

import click

DEFAULT_SEGMENTER = "facebook/sam2.1-hiera-large"  # = mlx_edit.editing.segment.DEFAULT_SEGMENTER


def _coords(n: int):
    """A click callback parsing `n` comma-separated numbers per value."""
    def parse(ctx, param, values):
        out = []
        for v in values:
            try:
                nums = tuple(float(x) for x in v.split(","))
            except ValueError:
                nums = ()
            if len(nums) != n:
                raise click.BadParameter(f"{v!r}: expected {n} comma-separated numbers")
            out.append(nums)
        return out
    return parse


@click.command("mask")
@click.option("--image", "-i", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="The photo.")
@click.option("--point", "points", multiple=True, callback=_coords(2), metavar="X,Y",
              help="A pixel on the object (repeatable).")
@click.option("--negative", "negatives", multiple=True, callback=_coords(2), metavar="X,Y",
              help="A pixel not on the object (repeatable).")
@click.option("--box", "boxes", multiple=True, callback=_coords(4), metavar="X0,Y0,X1,Y1",
              help="A box around the object (repeatable without --point: one object each).")
@click.option("--model", "-m", default=None, show_default=DEFAULT_SEGMENTER,
              help="SAM 2.1 checkpoint: Hugging Face repo id or transformers folder, or a "
                   "model folder with a segmenter/ (as inpaint --model).")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Output mask PNG.")
@click.option("--all", "all_masks", is_flag=True,
              help="Every object (automatic masks): numbered PNGs and a JSON index.")
@click.option("--points-per-side", type=click.IntRange(1, 128), default=32, show_default=True,
              help="With --all: the click grid is N x N.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def mask_command(image, points, negatives, boxes, model, output, all_masks, points_per_side,
                 overwrite):
    """Segment an object of IMAGE from clicks and boxes and write its mask as a PNG."""
    from PIL import Image

    from mlx_edit.imaging.images import InputError, save_png
    from mlx_edit.weights.core import WeightLoadError

    from mlx_edit.editing.segment import find_segmenter

    model = find_segmenter(model)
    if output.suffix.lower() != ".png":
        raise click.UsageError(f"output {output} must end in .png")
    if all_masks:
        if points or negatives or boxes:
            raise click.UsageError("--all finds every object: give no --point/--negative/--box")
        return _all_masks(image, model, output, points_per_side, overwrite)
    clicks = list(points) + list(negatives)
    labels = [1] * len(points) + [0] * len(negatives)
    if clicks and len(boxes) > 1:
        raise click.UsageError("points with several --box: give one box per object without "
                               "points, or one box with the points")
    if output.resolve() == image.resolve():
        raise click.UsageError(f"refusing to write {output}: it is the input image")
    if output.exists() and not overwrite:
        raise click.UsageError(f"{output} already exists; pass --overwrite to replace it")
    from mlx_edit.editing.segment import mask_from_prompts

    try:  # the image and prompts are checked before the (slow) model load
        mask = mask_from_prompts(image, clicks or None, labels or None, list(boxes) or None,
                                 model=model)
    except (InputError, WeightLoadError) as e:
        raise click.UsageError(" ".join(str(e).split())) from None
    try:
        save_png(Image.fromarray(mask.astype("uint8") * 255, "L"), output,
                 overwrite=overwrite, protect=[image])
    except InputError as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"wrote {output} ({mask.mean():.1%} of the image)")


def _all_masks(image: Path, model: str, output: Path, points_per_side: int,
               overwrite: bool) -> None:
    """`--all`: automatic masks as `{stem}-{i}.png` plus a `{stem}.json` index."""
    from PIL import Image

    from mlx_edit.editing.automask import generate_masks
    from mlx_edit.imaging.images import InputError, load_image, save_json_sidecar, save_png
    from mlx_edit.editing.segment import Segmenter
    from mlx_edit.weights.core import WeightLoadError

    index_path = output.with_suffix(".json")
    try:
        photo = load_image(image)
        if index_path.exists() and not overwrite:
            raise InputError(f"{index_path} already exists; pass --overwrite to replace it")
        seg = Segmenter.from_pretrained(model)
    except (InputError, WeightLoadError) as e:
        raise click.UsageError(" ".join(str(e).split())) from None
    seg.set_image(photo)
    found = generate_masks(seg, points_per_side=points_per_side)
    entries = []
    try:
        for i, m in enumerate(found):
            path = output.with_name(f"{output.stem}-{i}.png")
            save_png(Image.fromarray(m.mask.astype("uint8") * 255, "L"), path,
                     overwrite=overwrite, protect=[image])
            entries.append(dict(file=path.name, bbox=list(m.bbox), area=m.area,
                                predicted_iou=round(m.predicted_iou, 4),
                                stability_score=round(m.stability_score, 4),
                                point=[round(float(v), 1) for v in m.point]))
        # the index last: it exists only when every mask it lists was written
        save_json_sidecar(index_path, {"image": str(image), "masks": entries},
                          overwrite=overwrite, protect=[image])
    except InputError as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"wrote {len(entries)} masks and {index_path}")
