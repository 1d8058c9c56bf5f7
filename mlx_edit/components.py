"""Which pipeline components are in memory: loaded on demand, freed after their phase.

`FluxFill` keeps its transformer and VAE in a `Components`. By default both are loaded
once and stay. With `low_memory` each is loaded when a phase needs it and released when
that phase ends (`using`), so text encoding, VAE encode, denoising and VAE decode each
hold only their own weights: the peak is the largest component plus its activations
instead of all of them together (mlx_edit.memory, `peak_low_memory`), paid for by
reading the weights again for every edit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
import mlx.nn as nn

# MLX keeps freed buffers in a cache for reuse; by default it may grow to the memory
# limit, so after a phase its freed weights and activations would still be held. Low
# memory caps it at 256 MB: enough to recycle the small per-step buffers (modulation,
# norms, RoPE) without going back to the allocator, while larger freed buffers are
# returned at once, so the process footprint stays near the active memory the estimate
# counts. Large activations are then re-allocated each step (a malloc on the CPU backend;
# not measured on Metal).
LOW_MEMORY_CACHE_BYTES = 256 * 2**20


def limit_cache(nbytes: int = LOW_MEMORY_CACHE_BYTES) -> int:
    """Cap MLX's buffer cache at `nbytes` for the whole process (every model, every
    pipeline) and empty it; returns the previous limit (bytes) for a caller that wants to
    restore it with `mx.set_cache_limit`."""
    previous = mx.set_cache_limit(nbytes)
    mx.clear_cache()
    return previous


class Components:
    """Named models built by their loaders on first use.

    loaders: {name: () -> nn.Module}; configs: {name: the model's config}, known without
    loading it. keep: True keeps a model once loaded (`release` is a no-op); False lets
    `release` / the end of `using` drop it and clear MLX's cache. `history` lists
    ("load" | "release", name) events in order (stats, tests).
    """

    def __init__(self, loaders: Mapping[str, Callable[[], nn.Module]],
                 configs: Mapping[str, Any], keep: bool = True):
        self._loaders, self._configs = dict(loaders), dict(configs)
        self._loaded: dict[str, nn.Module] = {}
        self.keep = keep
        self.history: list[tuple[str, str]] = []

    def config(self, name: str) -> Any:
        """The config of `name`: the loaded model's own when resident, else the one given."""
        return self._loaded[name].config if name in self._loaded else self._configs[name]

    @property
    def resident(self) -> tuple[str, ...]:
        """Names of the models in memory now."""
        return tuple(self._loaded)

    def get(self, name: str) -> nn.Module:
        """The model `name`, loaded now if it is not resident (KeyError: unknown name;
        the loader's errors, e.g. WeightLoadError, pass through)."""
        if name not in self._loaded:
            self._loaded[name] = self._loaders[name]()
            self.history.append(("load", name))
        return self._loaded[name]

    def release(self, *names: str) -> None:
        """Unless kept, drop the named models (all when none are named) and return MLX's
        cached buffers; their memory is freed once no other reference holds them."""
        if self.keep:
            return
        for name in names or tuple(self._loaded):
            if self._loaded.pop(name, None) is not None:
                self.history.append(("release", name))
        mx.clear_cache()

    @contextmanager
    def using(self, name: str, stats: dict | None = None) -> Iterator[None]:
        """The scope of a phase that needs `name`: loaded on entry (the seconds added to
        stats["load_<name>_s"] when it had to be loaded), released on exit (also on
        error) unless kept. Inside, reach the model through `get` (or the pipeline's
        property): a local reference would keep it alive after the release."""
        t0, loaded = time.perf_counter(), name in self._loaded
        self.get(name)
        if stats is not None and not loaded:
            key = f"load_{name}_s"
            stats[key] = stats.get(key, 0.0) + time.perf_counter() - t0
        try:
            yield
        finally:
            self.release(name)
