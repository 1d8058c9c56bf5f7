"""`mlx-edit mask`: a mask PNG from clicks and boxes on a photo, with SAM 2.1.

    mlx-edit mask --image IMG --point X,Y [--point X,Y ...] [--negative X,Y ...]
        [--box X0,Y0,X1,Y1 ...] [--model REPO_OR_PATH] --output mask.png [--overwrite]
    mlx-edit mask --image IMG --all [--points-per-side 32] --output masks.png
    mlx-edit mask --image IMG --text "the red car" [--box X0,Y0,X1,Y1 ...]
        [--instances all|best|N] [--threshold 0.3] [--each] [--model SAM3_FOLDER]
        --output mask.png


The points (and at most one box) describe one object; several boxes without points are
several objects, whose masks are united. One click uses SAM's three candidate masks and
keeps the best by predicted IoU; more prompts ask for one mask (SAM's advice). The PNG is
8-bit grey, 255 inside the mask, at the photo's own size (after EXIF orientation), ready
for `mlx-edit inpaint --mask`. `--all` runs the automatic mask generator
(mlx_edit.editing.automask) instead and writes `masks-0.png, masks-1.png, ...` (largest first)
and `masks.json` (file, bbox, area, predicted_iou, stability_score, point per mask).
`--text` finds the instances of a phrase with SAM 3 (mlx_edit.editing.text_segment), with
`--box`es as positive exemplars of what the phrase means (SAM 3's text + box prompt): all
merged (default), the best, or the N-th by score, those scoring above --threshold; with
`--each`, one file per chosen instance, `mask-0.png, mask-1.png, ...` (highest score
first). No instance above the threshold is a one-line error naming the phrase and the
best score.
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
              help="A box around the object (repeatable without --point: one object each; "
                   "with --text, an example of what the phrase means).")
@click.option("--text", "-t", default=None, metavar="PHRASE",
              help="Segment every instance of this phrase (SAM 3), e.g. 'the sky'.")
@click.option("--instances", default="all", show_default=True, metavar="all|best|N",
              help="With --text: all instances merged, the best, or the N-th by score.")
@click.option("--threshold", type=float, default=0.3, show_default=True,
              help="With --text: keep instances scoring above this, [0, 1).")
@click.option("--each", is_flag=True,
              help="With --text: one file per instance (OUTPUT-0.png, OUTPUT-1.png, ...).")
@click.option("--model", "-m", default=None, show_default=DEFAULT_SEGMENTER,
              help="SAM 2.1 checkpoint (SAM 3 with --text, default facebook/sam3): Hugging "
                   "Face repo id or transformers folder, or a model folder with a "
                   "segmenter/ (text-segmenter/) as inpaint --model.")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Output mask PNG.")
@click.option("--all", "all_masks", is_flag=True,
              help="Every object (automatic masks): numbered PNGs and a JSON index.")
@click.option("--points-per-side", type=click.IntRange(1, 128), default=32, show_default=True,
              help="With --all: the click grid is N x N.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def mask_command(image, points, negatives, boxes, text, instances, threshold, each, model,
                 output, all_masks, points_per_side, overwrite):
    """Segment an object of IMAGE from clicks and boxes (or every instance of a phrase:
    --text) and write its mask as a PNG."""
    from PIL import Image

    from mlx_edit.imaging.images import InputError, save_png
    from mlx_edit.weights.core import WeightLoadError

    from mlx_edit.editing.segment import find_segmenter

    if output.suffix.lower() != ".png":
        raise click.UsageError(f"output {output} must end in .png")
    if text is not None:
        if points or negatives or all_masks:
            raise click.UsageError("--text finds the objects itself: give no "
                                   "--point/--negative/--all (--box: exemplars)")
        return _text_masks(image, text, list(boxes), instances, threshold, each, model,
                           output, overwrite)
    if each or instances != "all" or threshold != 0.3:
        raise click.UsageError("--instances, --threshold and --each choose the instances of "
                               "--text: give --text too")
    model = find_segmenter(model)
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


def _text_masks(image: Path, text: str, boxes: list, instances: str, threshold: float,
                each: bool, model: str | None, output: Path, overwrite: bool) -> None:
    """`--text`: the chosen instances of a phrase (SAM 3; `boxes`: positive exemplar boxes
    in pixels), merged into `output`, or one file each (`--each`: `{stem}-{i}.png`); every
    value, box and output checked before the model loads, the files written together."""
    from PIL import Image

    from mlx_edit.editing.text_segment import (
        TextSegmenter, exemplar_arrays, find_text_segmenter)
    from mlx_edit.imaging.images import InputError, load_image, png_writer, write_together
    from mlx_edit.options import check_instances, check_phrase, check_threshold
    from mlx_edit.weights.core import WeightLoadError
    from mlx_edit.weights.sam3 import resolve_sam3

    try:
        phrase = check_phrase(text, "--text")
        threshold = check_threshold(threshold, "--threshold")
        instances = check_instances(instances, "--instances")
        photo = load_image(image)
        if boxes:
            exemplar_arrays(boxes, None, (photo.height, photo.width))
        if output.resolve() == image.resolve():
            raise InputError(f"refusing to write {output}: it is the input image")
        taken = [p for p in sorted(output.parent.glob(f"{output.stem}-*.png"))
                 if p.stem[len(output.stem) + 1:].isdigit()] if each else [output]
        if not overwrite and [p for p in taken if p.exists()]:
            raise InputError(f"{taken[0]} already exists; pass --overwrite to replace it")
        seg = TextSegmenter.from_pretrained(resolve_sam3(find_text_segmenter(model)))
        seg.set_image(photo)
        masks, scores = _chosen(seg.detect(phrase, boxes or None, threshold=threshold),
                                phrase, instances, threshold, each)
        paths = [output.with_name(f"{output.stem}-{i}.png") for i in range(len(masks))] \
            if each else [output]
        write_together([(p, png_writer(Image.fromarray(m.astype("uint8") * 255, "L")))
                        for p, m in zip(paths, masks)], overwrite=overwrite, protect=[image])
    except (InputError, WeightLoadError) as e:
        raise click.UsageError(" ".join(str(e).split())) from None
    for path, m, score in zip(paths, masks, scores):
        click.echo(f"wrote {path} (score {score:.3f}, {m.mean():.1%} of the image)")


def _chosen(found, phrase: str, instances, threshold: float, each: bool):
    """(masks (M, H, W) bool, scores (M,)): `select_instances`, or with `each` and
    instances "all" every instance found."""
    from mlx_edit.editing.text_segment import select_instances

    masks, scores = select_instances(found, phrase, instances, threshold)
    if each and instances == "all":
        return found.masks, found.scores
    return masks, scores
