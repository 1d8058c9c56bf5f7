"""The job queue: one worker thread runs edits in priority order on the resident models.

A bounded heap holds waiting jobs (interactive before batch, then first come first
served); `submit` refuses a job when `max_queue` are waiting (QueueFull, HTTP 429). The
worker calls `run_edit(request, progress)`; `progress(step, total, phase=..., **preview)` gets
every phase of the edit (mlx_edit.progress: model load, segment, text encode, VAE tiles,
denoise steps...) and emits it as a "phase" event (a "step" event, with its preview if
any, for denoise steps); after a step it raises `Cancelled` when the job was cancelled,
so a running edit stops after the step in progress (the pipeline's generator closes and
frees what it holds).
`call(fn)` runs short work that needs the models (a mask from clicks) on the worker
thread ahead of the queue: at once when idle, else between two steps of the running edit.
Results are PNG bytes kept in memory (nothing is written to disk, so a killed server
leaves no partial file); finished jobs are evicted oldest first beyond `keep_jobs` jobs
or `keep_bytes` bytes of PNGs.
"""

from __future__ import annotations

import heapq
import io
import itertools
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from PIL import Image

from mlx_edit.imaging.images import png_writer
from mlx_edit.serve.uploads import EditRequest

FINISHED = ("done", "failed", "cancelled")
BAD_INPUT = ("InputError", "EmptyMaskError")  # a failed job's error_type: the request's fault
log = logging.getLogger("mlx_edit.serve")


class QueueFull(Exception):
    """max_queue jobs are waiting (HTTP 429)."""


class Conflict(Exception):
    """The job is not in a state that allows the request (HTTP 409)."""


class UnknownJob(KeyError):
    """No job with this id (never submitted, or evicted) (HTTP 404)."""

    def __str__(self) -> str:
        return f"no job {self.args[0]} (unknown, or evicted from the store)"


class Cancelled(Exception):
    """Raised from the progress callback of a cancelled job to stop its edit."""


@dataclass(eq=False)
class Job:
    """One edit's state: queued -> running -> done | failed | cancelled. phase: the
    running phase's name; step/total: denoise progress; stats: phase timings (s); images: PNG bytes (with metadata);
    events: what `/events` streams ({"event": kind, ...}; the newest PREVIEWS_KEPT step
    events keep their "preview" JPEG)."""

    request: EditRequest
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: str = "queued"
    step: int = 0
    total: int = 0
    phase: str | None = None  # the running phase (mlx_edit.progress): load, denoise...
    error: str | None = None
    error_type: str | None = None  # the failure's exception class name
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    stats: dict = field(default_factory=dict)
    images: list[bytes] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)
    preview_at: list[int] = field(default_factory=list)  # events holding a preview

    def emit(self, event: str, **data) -> None:
        self.events.append({"event": event, **data})  # list.append is atomic

    def summary(self) -> dict:
        """The job as `GET /v1/jobs/{id}` shows it (JSON-ready)."""
        return {"id": self.id, "state": self.state, "mode": self.request.mode,
                "priority": "batch" if self.request.priority else "interactive",
                "step": self.step, "total": self.total, "phase": self.phase,
                "progress": self.step / self.total if self.total else 0.0,
                "cancel_requested": self.cancel.is_set(), "error": self.error,
                "created": self.created, "started": self.started, "finished": self.finished,
                "timings": self.stats, "images": len(self.images)}


def to_png(image: Image.Image) -> bytes:
    """`image` as PNG bytes, its `.info` metadata (str values) as text chunks."""
    meta = {k: v for k, v in image.info.items() if isinstance(v, str) and k.isascii()}
    buf = io.BytesIO()
    png_writer(image, meta)(buf)
    return buf.getvalue()


CALLS = object()  # what `_next` returns when quick calls wait


PREVIEWS_KEPT = 8  # step previews a job's events keep (older ones lose theirs)


def _keep_previews(job: Job, keep: int) -> None:
    """Strip the preview of job events beyond the newest `keep` that have one (bounded
    memory; list item assignment is atomic, so a stream sees one version or the other)."""
    while len(job.preview_at) > keep:
        i = job.preview_at.pop(0)
        job.events[i] = {k: v for k, v in job.events[i].items()
                         if not k.startswith("preview")}


class JobRunner:
    """The queue, its worker thread and the store of jobs (thread-safe).

    run_edit(request, progress) -> (PIL images, phase timings dict): runs on the worker
    thread only (MLX streams and the models are used from that one thread)."""

    def __init__(self, run_edit: Callable, *, max_queue: int, keep_jobs: int,
                 keep_bytes: int):
        self._run_edit = run_edit
        self.max_queue, self.keep_jobs, self.keep_bytes = max_queue, keep_jobs, keep_bytes
        self._lock = threading.Condition()
        self._heap: list[tuple[int, int, Job]] = []
        self._seq = itertools.count()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._done: OrderedDict[str, int] = OrderedDict()  # finished id -> PNG bytes
        self._calls: deque[tuple[Callable, Future]] = deque()
        self.running: Job | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="mlx-edit-worker",
                                        daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Jobs waiting to run."""
        with self._lock:
            return sum(1 for _, _, j in self._heap if j.state == "queued")

    def submit(self, request: EditRequest) -> Job:
        """Queue `request`; raises QueueFull when max_queue jobs are waiting."""
        job = Job(request)
        with self._lock:
            if self._closed:
                raise Conflict("the server is shutting down")
            if sum(1 for _, _, j in self._heap if j.state == "queued") >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting): retry "
                                "later")
            job.emit("queued", position=len(self._heap))
            self._jobs[job.id] = job
            heapq.heappush(self._heap, (request.priority, next(self._seq), job))
            self._lock.notify()
        return job

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn()` on the worker thread (where the models live) ahead of the queue: now
        when idle, else between two steps of the running edit. Returns its Future. Raises
        QueueFull (max_queue calls waiting), Conflict (shutting down)."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise Conflict("the server is shutting down")
            if len(self._calls) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are waiting: retry later")
            self._calls.append((fn, future))
            self._lock.notify()
        return future

    def _run_calls(self) -> None:
        """Run the waiting calls (worker thread); their errors go to their futures."""
        while True:
            with self._lock:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # the caller's error, never the worker's
                    future.set_exception(e)

    def get(self, job_id: str) -> Job:
        """The job, or UnknownJob (unknown or evicted)."""
        with self._lock:
            if job_id not in self._jobs:
                raise UnknownJob(job_id)
            return self._jobs[job_id]

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job now, or a running one after its current step. Raises
        UnknownJob, Conflict (already finished)."""
        with self._lock:
            job = self.get(job_id)
            if job.state in FINISHED:
                raise Conflict(f"job {job_id} is already {job.state}")
            job.cancel.set()
            if job.state == "queued":
                self._finish(job, "cancelled")
        return job

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker: waiting jobs are cancelled, a running one after its step."""
        with self._lock:
            self._closed = True
            for _, _, job in self._heap:
                if job.state == "queued":
                    job.cancel.set()
                    self._finish(job, "cancelled")
            if self.running is not None:
                self.running.cancel.set()
            for _, future in self._calls:
                future.cancel()
            self._calls.clear()
            self._lock.notify_all()
        self._thread.join(timeout)

    def _next(self) -> Job | None:
        with self._lock:
            while True:
                while self._heap and self._heap[0][2].state != "queued":
                    heapq.heappop(self._heap)  # cancelled while waiting
                if self._closed:
                    return None
                if self._calls:
                    return CALLS
                if self._heap:
                    job = heapq.heappop(self._heap)[2]
                    job.state, job.started, self.running = "running", time.time(), job
                    return job
                self._lock.wait()

    def _loop(self) -> None:
        while (job := self._next()) is not None:
            if job is CALLS:
                self._run_calls()
                continue
            job.emit("running")
            try:
                images, stats = self._run_edit(job.request, self._progress(job))
                job.images = [to_png(im) for im in images]
                job.stats = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
                state = "done"
            except Cancelled:
                state = "cancelled"
            except Exception as e:  # any failure is the job's, never the worker's
                job.error_type = type(e).__name__
                if job.error_type not in BAD_INPUT + ("WeightLoadError",):
                    log.exception("job %s failed", job.id)
                job.error, state = " ".join(str(e).split()) or type(e).__name__, "failed"
            with self._lock:
                self.running = None
                self._finish(job, state)

    def _progress(self, job: Job) -> Callable[..., None]:
        def progress(step: int, total: int, phase: str = "denoise", **preview) -> None:
            if step == 0 or phase.rsplit(" ", 1)[-1] != "denoise":
                job.phase = phase  # load, segment, text_encode, vae_encode (tiles)...
                job.emit("phase", phase=phase, done=step, total=total)
                return
            job.phase, job.step, job.total = phase, step, total
            job.emit("step", step=step, total=total, phase=phase, **preview)
            if preview:
                job.preview_at.append(len(job.events) - 1)
                _keep_previews(job, PREVIEWS_KEPT)
            self._run_calls()  # quick calls (masks) between two steps
            if job.cancel.is_set():
                raise Cancelled
        progress.wants_phases = True  # every phase (mlx_edit.progress), not only steps
        return progress

    def _finish(self, job: Job, state: str) -> None:
        """Record the end of `job` (lock held) and evict the oldest finished jobs."""
        job.state, job.finished = state, time.time()
        job.request.image = job.request.mask = None  # inputs are not kept, only results
        job.request.references = []
        job.stats = {"queued_s": (job.started or job.finished) - job.created,
                     "run_s": job.finished - (job.started or job.finished), **job.stats}
        job.emit(state, **({"error": job.error} if job.error else {}),
                 images=len(job.images))
        self._done[job.id] = sum(len(b) for b in job.images)
        while len(self._done) > self.keep_jobs or \
                (len(self._done) > 1 and sum(self._done.values()) > self.keep_bytes):
            old, _ = self._done.popitem(last=False)
            self._jobs.pop(old, None)
