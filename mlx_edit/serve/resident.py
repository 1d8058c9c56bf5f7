"""The server's resident models, evicted least recently used by estimated size.

Kinds: "fill" (FluxFill), "kontext" (FluxKontext), "klein" (FluxKlein), "segmenter"
(SAM 2.1 `Segmenter`), "text_segmenter" (SAM 3 `TextSegmenter`).
Each configured kind has a loader and a size (GB): for a pipeline, what stays loaded
between edits by mlx_edit.editing.memory's estimate from its configs (transformer + VAE + LoRAs;
the text encoders are freed after each prompt); for the segmenter its parameter bytes.
Before a model is made resident, the least recently used others are evicted until the
total fits `budget_gb` (None: no bound): before loading it when its size is known from
an earlier load (so two models that take turns are never both in memory), else right
after its first load. A model in use (`using`) is never evicted; one
larger than the whole budget is still loaded (alone), with a warning. Used from the
worker thread only (the models' MLX arrays live there).
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator

import mlx.core as mx

log = logging.getLogger("mlx_edit.serve")
GB = 1e9


def pipeline_gb(pipe) -> float:
    """GB a FluxPipeline keeps loaded between edits (mlx_edit.editing.memory weights estimate of
    the transformer, its LoRAs and the VAE, at its dtype and quantization)."""
    est = pipe.memory_estimate(64, 64)  # weights do not depend on the canvas
    return sum(v for k, v in est.items()
               if k in ("weights_transformer", "weights_vae", "weights_lora"))


def segmenter_gb(segmenter) -> float:
    """Parameter GB of a `Segmenter`'s SAM model, or of a `TextSegmenter`'s three."""
    from mlx.utils import tree_flatten

    models = [segmenter.model] if hasattr(segmenter, "model") else \
        [segmenter.vision, segmenter.text_encoder, segmenter.heads]
    return sum(v.nbytes for m in models for _, v in tree_flatten(m.parameters())) / GB


class Resident:
    """Models by kind, loaded on demand and evicted LRU against `budget_gb`.

    loaders: {kind: () -> model}; size: model -> GB (called once per load);
    preloaded: {kind: model} already made (their loader, if any, reloads them after an
    eviction; without one they are never evicted)."""

    def __init__(self, loaders: dict[str, Callable[[], object]],
                 size: Callable[[str, object], float], budget_gb: float | None = None,
                 preloaded: dict | None = None):
        self.loaders, self.size, self.budget_gb = dict(loaders), size, budget_gb
        self.models: OrderedDict[str, object] = OrderedDict()  # least recent first
        self.sizes: dict[str, float] = {}
        self.known: dict[str, float] = {}  # size of every kind loaded once (kept on eviction)
        self.in_use: set[str] = set()
        self.evictions: list[str] = []  # kinds evicted, in order (stats, tests)
        for kind, model in (preloaded or {}).items():
            self.models[kind] = model
            self.sizes[kind] = self.known[kind] = size(kind, model)

    @property
    def kinds(self) -> set[str]:
        """Every kind this server can serve (loaded or not)."""
        return set(self.loaders) | set(self.models)

    @property
    def total_gb(self) -> float:
        """Estimated GB of the resident models."""
        return sum(self.sizes[k] for k in self.models)

    def get(self, kind: str):
        """The model of `kind`, loaded (evicting others first) when not resident; marks
        it most recently used. KeyError: not configured."""
        if kind in self.models:
            self.models.move_to_end(kind)
            return self.models[kind]
        if kind not in self.loaders:
            raise KeyError(kind)
        if kind in self.known:  # evict before loading: never both in memory
            self._make_room(self.known[kind], kind)
        model = self.loaders[kind]()
        gb = self.known[kind] = self.size(kind, model)
        self._make_room(gb, kind)
        self.models[kind], self.sizes[kind] = model, gb
        return model

    @contextlib.contextmanager
    def using(self, kind: str) -> Iterator[object]:
        """`get(kind)`, protected from eviction until the block ends."""
        model = self.get(kind)
        self.in_use.add(kind)
        try:
            yield model
        finally:
            self.in_use.discard(kind)

    def _make_room(self, gb: float, kind: str) -> None:
        if self.budget_gb is None:
            return
        for old in list(self.models):
            if self.total_gb + gb <= self.budget_gb:
                break
            if old not in self.in_use and old in self.loaders:
                self.evict(old)
        if self.total_gb + gb > self.budget_gb:
            log.warning("%s (~%.1f GB) does not fit the resident budget of %.1f GB next to "
                        "%s: loaded anyway", kind, gb, self.budget_gb, list(self.models))

    def evict(self, kind: str) -> None:
        """Drop `kind` (its memory is freed once the worker holds no reference)."""
        self.models.pop(kind, None)
        self.sizes.pop(kind, None)
        self.evictions.append(kind)
        mx.clear_cache()
