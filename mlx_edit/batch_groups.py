"""Real batches for `mlx-edit batch`: manifest lines that share a canvas and the options
the denoise loop sees are denoised together along the batch axis.

Each line of a group is prepared on its own (its own image and mask conditioning, prompt
embeddings and seeded noise: `FluxFill.inpaint_job` / `outpaint_job`,
`FluxKontext.edit_job`), the prepared jobs are stacked into one EditJob (latents,
channels, T5 sequences, CLIP pooled vectors and Kontext reference tokens concatenated
on axis 0), run through the one denoise loop (`FluxPipeline.steps`), split back, and each
line is finished (decode, paste back) and written as it would be alone. Every row of the
batch only ever meets its own data in the transformer (attention and normalisation are
per row), so a grouped line's image equals its one-by-one image up to float rounding
(tests/test_batch_groups.py states the tolerance).

Lines run alone (the per-line path, `batch.run_line`) when stacking cannot hold: per-step
hooks (soft masks, Kontext masks, ControlNets), image prompts (IP-Adapter, Redux: their
models and tokens are per line), a step cache (its skip decisions would be the batch's),
true CFG, and the passes after the loop (seam_fix, rank, detail_pass / global_pass). The group size is bounded by
`--batch-size` and by the memory estimate (mlx_edit.editing.memory) of the group's images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_edit import batch

from mlx_edit.editing import large
from mlx_edit.sampling.denoise import EditJob, PromptEmbeds

def stack_key(line: batch.Line) -> tuple | None:
    """What two lines must share to be denoised together, known before any model loads:
    mode, image size and the options the canvas, schedule or text length depend on.
    None: the line runs alone (see the module docstring)."""
    o = line.options
    alone = (o.soft_mask or o.seam_fix or o.rank or large.refine_strength(o)
             or o.controlnets or o.ip_adapters or o.redux or o.cache is not None
             or (o.negative_prompt is not None and o.true_cfg_scale > 1.0)
             or (line.mode == "edit" and line.mask is not None))
    if alone:
        return None
    return (line.mode, line.size, o.effective_steps, o.effective_guidance, o.strength,
            o.max_sequence_length, o.crop_to_mask, o.left, o.right,
            o.top, o.bottom, o.overlap, o.width, o.height, o.keep_size, o.auto_resize,
            len(line.references))


def chunks(lines: list[batch.Line], batch_size: int) -> list[list[batch.Line]]:
    """`lines` in run order, cut into candidate groups of at most `batch_size` lines with
    the same `stack_key` (a line that runs alone is a chunk of one). Ordered by mode (one
    model kind resident at a time), key, then prompt (a repeated prompt is encoded once)."""
    keyed = [(stack_key(ln), ln) for ln in lines]
    keyed.sort(key=lambda kl: (kl[1].mode, kl[0] is None, str(kl[0]), kl[1].prompt,
                               kl[1].number))
    out: list[list[batch.Line]] = []
    for key, ln in keyed:
        last = out[-1] if out else None
        if (key is not None and batch_size > 1 and last and len(last) < batch_size
                and stack_key(last[0]) == key):
            last.append(ln)
        else:
            out.append([ln])
    return out


def prepare_line(pipe, line: batch.Line) -> EditJob:
    """The line's prepared EditJob (not denoised), on its mode's pipeline."""
    if line.mode == "inpaint":
        extra = {"reference": line.references[0]} if line.references else {}  # klein's
        return pipe.inpaint_job(line.image, line.mask, line.prompt, line.options, **extra)
    if line.mode == "outpaint":
        return pipe.outpaint_job(line.image, line.prompt, line.options)
    return pipe.edit_job([line.image, *line.references], line.prompt, line.options,
                         mask=line.mask)


def paste_back(line: batch.Line) -> bool:
    """Whether the line's edit pastes back into the original (as its edit method does)."""
    return {"inpaint": line.options.paste_back, "outpaint": True}.get(
        line.mode, line.mask is not None)


def signature(job: EditJob) -> tuple | None:
    """What the denoise loop needs equal across a stack (canvas, schedule, guidance,
    shapes and dtypes, reference token ids); None for a job with per-step hooks."""
    if (job.controls or job.ip or job.after_step or job.hook or job.cache is not None
            or job.negative is not None or job.windows is not None):  # windows: alone
        return None

    def shape(a):
        return None if a is None else (tuple(a.shape[1:]), str(a.dtype))
    ids = None if job.token_ids is None else np.asarray(job.token_ids).tobytes()
    return (job.plan.model_size, np.asarray(job.sigmas).tobytes(), job.guidance,
            shape(job.latents), shape(job.conditioning), shape(job.embeds.txt),
            shape(job.embeds.pooled), shape(job.tokens), ids, job.reference_kv)


def stack(jobs: list[EditJob]) -> EditJob:
    """One EditJob of `jobs` (equal `signature`s) along the batch axis: each job's rows
    (its num_images) in order; a per-job (1, ...) input is repeated for its rows."""
    rows = [j.latents.shape[0] for j in jobs]

    def cat(arrays):
        if arrays[0] is None:
            return None
        return mx.concatenate([mx.broadcast_to(a, (n, *a.shape[1:]))
                               for a, n in zip(arrays, rows)], axis=0)
    first = jobs[0]
    embeds = PromptEmbeds(cat([j.embeds.txt for j in jobs]),
                          cat([j.embeds.pooled for j in jobs]))
    return EditJob(first.original, first.plan, first.blend, cat([j.latents for j in jobs]),
                   cat([j.conditioning for j in jobs]), embeds, first.guidance,
                   first.sigmas, [s for j in jobs for s in j.seeds], {},
                   tokens=cat([j.tokens for j in jobs]), token_ids=first.token_ids,
                   reference_kv=first.reference_kv)


def split(stacked: EditJob, jobs: list[EditJob]) -> None:
    """Give each job its rows of the stacked job's latents, and the loop's stats (the
    group's denoise time shared out per line: `denoise_s`; the whole: `group_denoise_s`)."""
    start, lines = 0, len(jobs)
    for j in jobs:
        n = j.latents.shape[0]
        j.latents = stacked.latents[start:start + n]
        start += n
        j.stats.update(stacked.stats, group_lines=lines,
                       group_denoise_s=stacked.stats["denoise_s"],
                       denoise_s=stacked.stats["denoise_s"] / lines)


def denoise_together(pipe, jobs: list[EditJob]) -> None:
    """Run `jobs` (equal `signature`s) through the one denoise loop as one batch; each
    job ends with its own final latents (then `pipe.finish` it). One job runs as it is
    (with any hooks it has)."""
    if len(jobs) == 1:
        for _ in pipe.steps(jobs[0]):
            pass
        return
    stacked = stack(jobs)
    for _ in pipe.steps(stacked):
        pass
    split(stacked, jobs)


@dataclass
class Prepared:
    """A line with its prepared job and the seconds preparing it took."""

    line: batch.Line
    job: EditJob
    seconds: float


def fits(pipe, model_size: tuple[int, int], images: int, memo: dict) -> bool:
    """Whether `images` rows on a model_size canvas fit this machine by the memory
    estimate (the low-memory peak with `pipe.low_memory`); memoised in `memo`."""
    from mlx_edit.editing.memory import GB, available_memory

    if (model_size, images) not in memo:
        est = pipe.memory_estimate(*model_size, images)
        need = est["peak_low_memory" if pipe.low_memory else "peak"]
        memo[model_size, images] = need <= available_memory() / GB
    return memo[model_size, images]


def partition(pipe, prepared: list[Prepared], memo: dict) -> list[list[Prepared]]:
    """Prepared lines in groups of equal `signature` whose images together fit (first
    fit, in order); a job without a signature is a group of its own."""
    groups: list[tuple[tuple | None, list[Prepared]]] = []
    for p in prepared:
        sig = signature(p.job)
        for g_sig, members in groups:
            images = sum(m.job.latents.shape[0] for m in members) + p.job.latents.shape[0]
            if sig is not None and g_sig == sig and fits(pipe, p.job.plan.model_size,
                                                         images, memo):
                members.append(p)
                break
        else:
            groups.append((sig, [p]))
    return [members for _, members in groups]


def run_lines(pipes: Callable[[str], object], lines: list[batch.Line], folder: Path,
              digests: dict[str, str], rank: int, batch_size: int) -> Iterator[dict]:
    """Edit and write `lines` (this rank's pending ones), grouped into real batches of at
    most `batch_size` lines (1: every line alone); yields each line's result record as
    `batch.run_line` makes it (plus `group_lines` / `group_denoise_s` in a grouped
    line's stats). A failed line is recorded and the rest go on."""
    memo: dict = {}
    for chunk in chunks(lines, batch_size):
        if len(chunk) == 1:
            yield batch.run_line(pipes, chunk[0], folder, digests[chunk[0].id], rank)
            continue
        pipe, prepared = pipes(chunk[0].mode), []
        for ln in chunk:
            start = batch.now()
            try:
                prepared.append(Prepared(ln, prepare_line(pipe, ln), batch.now() - start))
            except Exception as e:  # noqa: BLE001  (recorded; the batch goes on)
                yield batch.close_record(batch.new_record(ln, digests[ln.id], rank),
                                         start, error=e)
        for group in partition(pipe, prepared, memo):
            yield from run_group(pipes, group, folder, digests, rank)


def run_group(pipes, group: list[Prepared], folder: Path, digests: dict[str, str],
              rank: int) -> Iterator[dict]:
    """Denoise a group's jobs together, then finish and write each line; yields their
    records. A group whose loop fails (e.g. out of memory) is redone line by line, so
    each line records its own outcome."""
    pipe, start = pipes(group[0].line.mode), batch.now()
    try:
        denoise_together(pipe, [p.job for p in group])
    except Exception:  # noqa: BLE001  (each line then fails or succeeds on its own)
        for p in group:
            yield batch.run_line(pipes, p.line, folder, digests[p.line.id], rank)
        return
    share = (batch.now() - start) / len(group)
    for p in group:
        rec = batch.new_record(p.line, digests[p.line.id], rank)
        start = batch.now() - p.seconds - share  # the line's seconds: its own + its share
        try:
            outputs = batch.write_line(p.line, pipe.finish(p.job, paste_back(p.line)), folder)
            rec = batch.close_record(rec, start, outputs=outputs,
                                     stats={**pipe.load_stats, **p.job.stats})
        except Exception as e:  # noqa: BLE001  (recorded; the batch goes on)
            rec = batch.close_record(rec, start, error=e)
        yield rec
