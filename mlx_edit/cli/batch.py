"""`mlx-edit batch MANIFEST.jsonl --output-dir DIR`: many edits from a JSON Lines manifest
(mlx_edit.batch), resumable, shared out over the ranks of `mlx.launch`.

Every line, and every output against every input of the manifest and the files already
in DIR (batch.check_outputs), is checked before any model loads (one `line N: ...` error
per bad line on stderr, exit 2 unless --skip-invalid). Lines already done (same
parameters, outputs present) are skipped, so re-running after Ctrl-C or a kill resumes. Under `mlx.launch`
each rank takes a balanced share; rank 0 merges `DIR/results.jsonl` when all finish.
Exit status 1 when some line failed (its record says why), 0 when all succeeded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from mlx_edit.batch import DEFAULT_GROUP_LINES
from mlx_edit.cli.prompt_cache import open_prompt_cache, prompt_cache_options
from mlx_edit.options import FIELDS


def _defaults(steps, guidance, seed, max_sequence_length, sets) -> dict:
    """Shared options (given ones only): the flags, then each --set KEY=VALUE (VALUE is
    JSON, else a string)."""
    d = {k: v for k, v in (("steps", steps), ("guidance", guidance), ("seed", seed),
                           ("max_sequence_length", max_sequence_length)) if v is not None}
    for item in sets:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in FIELDS:
            raise click.UsageError(f"--set {item!r}: give KEY=VALUE with KEY an edit option "
                                   f"({', '.join(FIELDS)})")
        try:
            d[key] = json.loads(value)
        except json.JSONDecodeError:
            d[key] = value
    return d


def _variant_for(opts: dict):
    """mode -> the variant (mlx_edit.variants) its lines run on: --edit-model's for edit,
    --model's for the others (their model_index.json; ValueError: not served)."""
    from mlx_edit import variants
    from mlx_edit.weights.sources import read_model_index

    index = {kind: read_model_index(opts[kind]) for kind in ("model", "edit_model")}
    return lambda mode: variants.for_folder(
        index["edit_model" if mode == "edit" else "model"], mode)


def _pipes(opts: dict, cache):
    """mode -> its pipeline, loaded on first use (FluxFill for inpaint/outpaint,
    FluxKontext for edit; FluxKlein for a FLUX.2 [klein] folder); one kind resident at a
    time."""
    loaded: dict = {}
    variant_for = _variant_for(opts)

    def get(mode: str):
        from mlx_edit import variants

        kind = "edit" if mode == "edit" else "inpaint"
        if kind not in loaded:
            loaded.clear()
            if variant_for(mode).family == "flux2":
                from mlx_edit.editing.klein import FluxKlein as cls
            elif kind == "edit":
                from mlx_edit.editing.kontext import FluxKontext as cls
            else:
                from mlx_edit.editing.fill import FluxFill as cls
            model = opts["edit_model" if kind == "edit" else "model"]
            pipe = cls.from_pretrained(
                model or variants.for_edit(kind).repo,
                quantize=int(opts["quantize"]) if opts["quantize"] else None,
                low_memory=opts["low_memory"])
            pipe.disk_prompt_cache = cache
            loaded[kind] = pipe
        return loaded[kind]
    return get


def _barrier(group) -> None:
    import mlx.core as mx

    if group.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))


def _validated(manifest: Path, defaults: dict, skip_invalid: bool, folder: Path,
               overwrite: bool, opts: dict):
    """The manifest's valid lines (each mode checked against its model's variant) whose
    outputs are safe to write (batch.check_outputs); the bad ones listed, then refused
    unless `skip_invalid`."""
    from mlx_edit import batch

    lines, errors = batch.read_manifest(manifest, defaults, _variant_for(opts))
    lines, unsafe = batch.check_outputs(lines, folder, manifest, overwrite)
    errors = sorted(errors + unsafe, key=lambda e: int(e.split(":")[0].split()[1]))
    for e in errors:
        click.echo(f"{manifest}: {e}", err=True)
    if errors and not skip_invalid:
        raise click.UsageError(f"{len(errors)} invalid line(s) in {manifest} (listed above); "
                               "fix them or pass --skip-invalid")
    return lines, batch.skipped_records(errors)


def _check_models(lines: list, opts: dict) -> None:
    """Find (or download) the model of every kind the lines need before any line runs:
    click.UsageError in one line naming the option to pass, else none."""
    from mlx_edit import variants
    from mlx_edit.weights.core import WeightLoadError
    from mlx_edit.weights.sources import resolve

    for kind, key in (("inpaint", "model"), ("edit", "edit_model")):
        needing = [ln.number for ln in lines if (ln.mode == "edit") == (kind == "edit")]
        if not needing:
            continue
        variant = variants.for_edit(kind)
        model = opts[key] or variant.repo
        try:
            resolve(model)
        except WeightLoadError as e:  # the hub's reason, by name: its text is long
            cause = type(e.__cause__).__name__ if e.__cause__ else str(e)
            raise click.UsageError(
                f"line {needing[0]} needs a {variant.title} model: {model} is not available "
                f"here ({cause}); pass --{key.replace('_', '-')} REPO_OR_FOLDER") from None


@click.command("batch")
@click.argument("manifest", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--output-dir", "-o", required=True, type=click.Path(path_type=Path),
              help="Folder for <id>.png outputs and results.jsonl (created).")
@click.option("--model", "-m", default=None, help="Fill model for inpaint/outpaint lines "
              "(repo id or folder; default black-forest-labs/FLUX.1-Fill-dev), or a FLUX.2 "
              "[klein] folder for inpaint lines.")
@click.option("--edit-model", default=None, help="Kontext model for edit lines "
              "(default black-forest-labs/FLUX.1-Kontext-dev), or a FLUX.2 [klein] folder.")
@click.option("--quantize", "-q", type=click.Choice(["4", "8"]), default=None,
              help="Quantize the transformer at load (bits).")
@click.option("--low-memory", is_flag=True, help="One model resident at a time.")
@click.option("--skip-invalid", is_flag=True, help="Run the valid lines, skip bad ones "
              "(recorded in results.jsonl as skipped; exit status 1).")
@click.option("--overwrite", is_flag=True, help="Replace files in OUTPUT_DIR that this "
              "batch did not write (<id>.png, results.jsonl); an input never.")
@click.option("--steps", type=int, default=None, help="Default steps for every line.")
@click.option("--guidance", type=float, default=None, help="Default guidance.")
@click.option("--seed", type=int, default=None,
              help="Default seed (default: derived from each line's id).")
@click.option("--max-sequence-length", type=int, default=None, help="Default T5 tokens.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Default of any edit option for the lines that take it (repeatable).")
@prompt_cache_options
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Most lines denoised together in one batch (same size and options); "
              "default: as many as the memory estimate allows, at most "
              f"{DEFAULT_GROUP_LINES}; 1: one line at a time.")
def batch_command(manifest, output_dir, steps, guidance, seed, max_sequence_length, sets,
                  skip_invalid, overwrite, **opts):
    """Run the edits of MANIFEST (JSON Lines: image, mask or mask_points/mask_box, prompt,
    optional mode, references, id and edit options) into OUTPUT_DIR; resumable; under
    mlx.launch, shared over the ranks."""

    defaults = _defaults(steps, guidance, seed, max_sequence_length, sets)
    output_dir = output_dir.expanduser()
    if not output_dir.parent.is_dir():
        raise click.UsageError(f"the folder of --output-dir does not exist: {output_dir.parent}")
    if output_dir.exists() and not output_dir.is_dir():
        raise click.UsageError(f"--output-dir {output_dir} is a file, not a folder")
    lines, skipped = _validated(manifest, defaults, skip_invalid, output_dir, overwrite,
                                 opts)
    _check_models(lines, opts)
    output_dir.mkdir(exist_ok=True)
    sys.exit(_run(lines, output_dir, opts, skipped))


def _finished(folder: Path, pending: list, records: dict) -> int:
    """Lines of `pending` that any rank has finished since this run read `records` (their
    new records in the output folder: every rank's when the folder is shared)."""
    from mlx_edit import batch

    latest = batch.read_records(folder)
    return sum(ln.id in latest and latest[ln.id].get("finished")
               != records.get(ln.id, {}).get("finished") for ln in pending)


def _work(mine: list, pipes, folder: Path, digests: dict, group, state) -> int:
    """Run this rank's lines (in real batches: mlx_edit.batch_groups), appending each
    record to its part file; rank 0 shows the whole batch's progress (with ETA), other
    ranks only their failures. Returns the number of lines that failed here."""
    from tqdm import tqdm

    from mlx_edit import batch, batch_groups

    lines, pending, records, batch_size = state
    rank, size = group.rank(), group.size()
    part, failed, before = folder / f".results.{rank}.jsonl", 0, len(lines) - len(pending)
    with tqdm(total=len(lines), initial=before, unit="edit", file=sys.stderr,
              desc="batch", disable=rank != 0) as bar:
        for rec in batch_groups.run_lines(pipes, mine, folder, digests, rank, batch_size):
            batch.append_record(part, rec)
            if rec["status"] != "ok":
                failed += 1
                tqdm.write(f"line {rec['line']} ({rec['id']}) failed: {rec['error']}",
                           sys.stderr)
            if size == 1:
                bar.update(1)
            else:
                bar.n = before + _finished(folder, pending, records)
                bar.refresh()
    return failed


def _run(lines: list, folder: Path, opts: dict, skipped: list) -> int:
    """Skip the done lines, run this rank's share, merge on rank 0 (with the `skipped`
    invalid lines' records); the exit status."""
    import mlx.core as mx

    from mlx_edit import batch
    from mlx_edit.sampling.ranks import local_edits

    group = mx.distributed.init()
    rank, size = group.rank(), group.size()
    run = {"model": opts["model"], "edit_model": opts["edit_model"],
           "quantize": opts["quantize"]}
    digests = {ln.id: ln.param_hash(run) for ln in lines}
    records = batch.read_records(folder)
    pending = [ln for ln in lines if not batch.is_done(ln, records.get(ln.id), folder,
                                                       digests[ln.id])]
    batch.remove_stale_temps(folder, lines)
    _barrier(group)  # every rank has read the records before any rank writes one
    share = batch.shard([ln.pixels for ln in pending], size)[rank]
    mine = [pending[i] for i in share]  # run order and groups: batch_groups.chunks
    pipes = _pipes(opts, open_prompt_cache(opts))
    batch_size = opts["batch_size"] or batch.DEFAULT_GROUP_LINES
    with local_edits():  # each rank edits its own lines: windows, CFG stay local
        failed = _work(mine, pipes, folder, digests, group, (lines, pending, records,
                                                             batch_size))
    _barrier(group)
    if rank == 0:
        path = batch.merge_results(folder, [ln.id for ln in lines], skipped)
        latest = batch.read_records(folder)
        ok = sum(latest.get(ln.id, {}).get("status") == "ok" for ln in lines)
        invalid = f", {len(skipped)} invalid skipped" if skipped else ""
        click.echo(f"{ok}/{len(lines) + len(skipped)} ok ({len(lines) - len(pending)} done "
                   f"before{invalid}); results: {path}", err=True)
        return 0 if ok == len(lines) and not skipped else 1
    return 1 if failed else 0
