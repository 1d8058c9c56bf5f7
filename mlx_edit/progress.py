"""Progress of an edit, phase by phase: the one progress mechanism of mlx-edit.

An edit method (`FluxFill.inpaint`, ..., `FluxKontext.edit`) takes a callback
`progress(step, total[, job])` that sees the denoise steps (windows x steps when tiled;
`wants_job`: the EditJob too). A callback that sets `wants_phases = True` sees every
phase instead, as `progress(done, total, phase=name)` (the denoise steps with
phase="denoise", still with the job when it `wants_job`):

    load / load_<model>   model weights read (from_pretrained; low_memory reloads)
    segment               SAM 2.1: the mask from clicks or boxes (load + image + masks)
    load_text_segmenter   SAM 3 loaded for a mask from words (freed after text_segment)
    text_segment          SAM 3: the mask from words (image + phrase + instances)
    text_encode           CLIP-L then T5 (done 1, 2), or a cached prompt
    vae_encode            per VAE tile (mlx_edit.editing.tiling), or one pass
    denoise               windows x steps
    vae_decode            per VAE tile, or one pass
    paste_back            stitch, colour match, blend

Every phase reports (name, 0, total) when it starts (total 0: not counted) and then its
counts; a two-pass edit's second run and a seam repair label theirs ("refine vae_encode",
`labelled`). Events reach the callback through a context variable set by `reporting`
around the edit (a thread's own: the server's worker thread has its own), so the code
that does the work (tiling, component loads, the text encoders) reports without a
callback argument. `Phase` also times the phase into an edit's stats (`<name>_s`,
`<name>_peak_gb`); `phase_line` sums them against the wall time.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_sink: ContextVar[Callable | None] = ContextVar("mlx_edit_progress", default=None)
_label: ContextVar[str] = ContextVar("mlx_edit_progress_label", default="")

# stats keys that time a phase of an edit (seconds), in the order of an edit; their sum
# and the wall time give "other" (what no phase timed: mask preparation, planning...).
PHASE_KEYS = ("load_s", "load_transformer_s", "load_vae_s", "segment_s",
              "load_text_segmenter_s", "text_segment_s", "text_encode_s",
              "image_prompts_s", "vae_encode_s", "control_prepare_s", "denoise_s",
              "vae_decode_s", "paste_back_s", "rank_s", "write_s")


@contextmanager
def reporting(progress: Callable | None) -> Iterator[None]:
    """Within: phase events go to `progress` (None: the enclosing one's stay)."""
    if progress is None:
        yield
        return
    token = _sink.set(progress)
    try:
        yield
    finally:
        _sink.reset(token)


def reports_progress(method):
    """Decorator of an edit method taking `progress=`: its whole call reports to it."""
    @functools.wraps(method)
    def wrapper(*args, progress=None, **kwargs):
        with reporting(progress):
            return method(*args, progress=progress, **kwargs)
    return wrapper


@contextmanager
def labelled(label: str) -> Iterator[None]:
    """Within: phase names are prefixed with `label` (a second run: "refine"; "" adds
    nothing)."""
    token = _label.set(f"{_label.get()}{label} " if label else _label.get())
    try:
        yield
    finally:
        _label.reset(token)


def report(phase: str, done: int, total: int) -> None:
    """Send a phase event to the current callback, if it wants phases."""
    progress = _sink.get()
    if progress is not None and getattr(progress, "wants_phases", False):
        progress(done, total, phase=_label.get() + phase)


def denoise_step(progress: Callable | None, step: int, total: int, job) -> None:
    """A denoise step to `progress` (given to `pipeline.run`): `(step, total[, job])`,
    with phase="denoise" (labelled) when it wants phases."""
    if progress is None:
        return
    args = (job,) if getattr(progress, "wants_job", False) else ()
    if getattr(progress, "wants_phases", False):
        progress(step, total, *args, phase=_label.get() + "denoise")
    else:
        progress(step, total, *args)


def ticks(phase: str, total: int) -> Callable[[int], None]:
    """`tick(done)`: report `phase` at `done` of `total` (after reporting 0 now)."""
    report(phase, 0, total)
    return lambda done: report(phase, done, total)


class Phase:
    """Times a phase into `stats` (`<name>_s` added to, `<name>_peak_gb`: MLX's peak
    during it) and reports its start (`report(name, 0, total)`; stats None: reports only)."""

    def __init__(self, stats: dict | None, name: str, total: int = 0):
        self.stats, self.name, self.total = stats, name, total

    def __enter__(self):
        report(self.name, 0, self.total)
        if self.stats is not None:
            import mlx.core as mx  # here: the CLI imports this module before its heavy parts

            mx.reset_peak_memory()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.stats is None:
            return
        key = f"{self.name}_s"
        self.stats[key] = self.stats.get(key, 0.0) + time.perf_counter() - self.t0
        import mlx.core as mx

        peak = mx.get_peak_memory() / 1e9
        self.stats[f"{self.name}_peak_gb"] = max(peak, self.stats.get(f"{self.name}_peak_gb", 0))


def add_stats(first: dict, second: dict) -> dict:
    """Stats of two runs of one edit (a second pass): seconds and counts added, peaks the
    larger, anything else the second's."""
    out = {**first, **second}
    for k in set(first) & set(second):
        a, b = first[k], second[k]
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            out[k] = max(a, b) if k.endswith("_gb") else a + b
    return out


def add_run(pipe, before: dict) -> None:
    """`pipe.last_stats` := `before` (an earlier run of the same edit) plus the last run's
    own stats (the pipeline's load_stats counted once)."""
    run = {k: v for k, v in pipe.last_stats.items() if k not in pipe.load_stats}
    pipe.last_stats = add_stats(before, run)


def phase_seconds(stats: dict) -> float:
    """Seconds of `stats` timed by a phase (PHASE_KEYS)."""
    return sum(stats.get(k, 0.0) for k in PHASE_KEYS)
