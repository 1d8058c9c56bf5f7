"""Tiled denoising of large canvases (MultiDiffusion, Bar-Tal et al. 2023, "MultiDiffusion:
Fusing Diffusion Paths for Controlled Image Generation"; the weighted windows of Mixture
of Diffusers, Jiménez 2023).

The canvas is denoised at its own resolution in overlapping windows no larger than a
model-size budget. At every step each window's step is computed on its own crop of the
packed latents and of the channel conditioning (Fill, Canny/Depth), with its own 0-based
position ids (reference tokens, Kontext, appended as usual), and the canvas becomes the
weighted average of the windows' updated latents. Flow-match Euler is linear, so that
average equals `latents + dt * sum_k W_k v_k` (the weighted average of the windows'
velocities): the compiled step is reused as it is.

Geometry and weights are pure functions (numpy) in token units (one packed token =
2 latent pixels = 16 image pixels for FLUX); `windowed_advance` is the per-step
evaluation the one denoise loop (`sampling.denoise.denoise(windows=...)`) calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_edit.models.flux import FluxTransformer
from mlx_edit.models.layers import ControlResiduals
from mlx_edit.sampling.compiled import StepFn, StepInputs
from mlx_edit.sampling.latents import image_ids
from mlx_edit.sampling.ranks import all_gather, share

RAMPS = ("cosine", "linear")
MAX_ASPECT = 2.0  # windows no more elongated than this (FLUX degrades on extreme aspects)


def window_shape(grid: tuple[int, int], max_tokens: int,
                 max_aspect: float = MAX_ASPECT) -> tuple[int, int]:
    """(h, w) tokens of the windows tiling a (gh, gw) token grid: the whole grid when it
    has at most `max_tokens` tokens, else at most `max_tokens` tokens with the grid's
    aspect, each side clamped to the grid, the aspect to [1/max_aspect, max_aspect].
    Raises ValueError for an empty grid or a budget under one token."""
    gh, gw = grid
    if gh < 1 or gw < 1 or max_tokens < 1:
        raise ValueError(f"window_shape: grid {grid} and budget {max_tokens} must be >= 1")
    if gh * gw <= max_tokens:
        return gh, gw
    aspect = min(max(gw / gh, 1 / max_aspect), max_aspect)
    h = max(1, min(gh, int(math.sqrt(max_tokens / aspect))))
    # a side clamped to the grid frees the other, up to the aspect bound
    w = max(1, min(gw, max_tokens // h, int(max_aspect * h)))
    h = max(1, min(gh, max_tokens // w, int(max_aspect * w)))
    return h, w


def axis_starts(length: int, window: int, overlap: int) -> list[int]:
    """Starts of the fewest windows of `window` tokens covering [0, length) with
    neighbours overlapping by at least `overlap` tokens (clamped to half a window, so
    windows advance by at least half their size), spread evenly, the first at 0 and the
    last ending at `length`."""
    if window >= length:
        return [0]
    overlap = min(max(overlap, 0), window // 2)
    n = math.ceil((length - overlap) / (window - overlap))
    return [round(i * (length - window) / (n - 1)) for i in range(n)]


def ramp(n: int, kind: str = "cosine") -> np.ndarray:
    """n rising weights in (0, 1) (float64): linear (k+1)/(n+1) or cosine
    sin^2(pi/2 (k+1)/(n+1)); a ramp and its reverse sum to 1 at every k."""
    if kind not in RAMPS:
        raise ValueError(f"ramp must be one of {', '.join(RAMPS)}, got {kind!r}")
    x = np.arange(1, n + 1, dtype=np.float64) / (n + 1)
    return x if kind == "linear" else np.sin(0.5 * np.pi * x) ** 2


def axis_weights(starts: Sequence[int], window: int, kind: str = "cosine"
                 ) -> list[np.ndarray]:
    """Per window along one axis, weights (window,): 1, ramping up over the overlap with
    the previous window and down over the overlap with the next (the canvas edges stay
    at 1, so every token has weight > 0)."""
    out = []
    for i, s in enumerate(starts):
        w = np.ones(window, np.float64)
        if i > 0 and (left := starts[i - 1] + window - s) > 0:
            w[:left] *= ramp(left, kind)
        if i + 1 < len(starts) and (right := s + window - starts[i + 1]) > 0:
            w[window - right:] *= ramp(right, kind)[::-1]
        out.append(w)
    return out


@dataclass(frozen=True)
class Windows:
    """Overlapping windows over a packed-token grid and their normalised weights.

    grid: (gh, gw) tokens of the canvas; size: (h, w) tokens of every window; origins:
    (top, left) of each window; weights: float32 (n, h*w), summing to 1 over the windows
    covering each canvas token; batch: windows evaluated together (stacked on the batch
    axis; the last group may be smaller).
    """

    grid: tuple[int, int]
    size: tuple[int, int]
    origins: tuple[tuple[int, int], ...]
    weights: np.ndarray
    batch: int = 1

    @property
    def count(self) -> int:
        return len(self.origins)

    @property
    def tokens(self) -> int:
        """Image tokens of one window (what the model sees per evaluation)."""
        return self.size[0] * self.size[1]

    def groups(self, rank: int = 0, size: int = 1) -> list[list[int]]:
        """Window indices of rank `rank`'s share (of `size` ranks: `share`) in evaluation
        groups of at most `batch`."""
        k, mine = max(1, self.batch), share(self.count, size)[rank]
        return [mine[i : i + k] for i in range(0, len(mine), k)]

    @property
    def covered(self) -> np.ndarray:
        """(gh, gw) bool: tokens inside at least one window (all, unless windows without
        mask tokens were skipped: `plan_windows(keep=...)`)."""
        out = np.zeros(self.grid, bool)
        h, w = self.size
        for t, left in self.origins:
            out[t : t + h, left : left + w] = True
        return out

    def coverage(self) -> np.ndarray:
        """The weights summed on the canvas, (gh, gw) float64 (1 on covered tokens)."""
        total = np.zeros(self.grid, np.float64)
        h, w = self.size
        for (t, left), wk in zip(self.origins, self.weights):
            total[t : t + h, left : left + w] += wk.reshape(h, w)
        return total


def plan_windows(grid: tuple[int, int], max_tokens: int, overlap: int,
                 kind: str = "cosine", batch: int = 1, keep: np.ndarray | None = None
                 ) -> Windows:
    """The windows of a (gh, gw) token grid under a budget of `max_tokens` tokens per
    window, neighbours overlapping by >= `overlap` tokens, weights ramped (`kind`) over
    the overlaps and normalised to sum to 1 at every token. One window covering the
    whole grid when it fits the budget (weights exactly 1).
    keep: (gh, gw) bool, the tokens to generate (a mask): windows holding none of them
    are skipped (never evaluated) and the weights are normalised over the windows left,
    so on every `keep` token they equal the unskipped plan's (the same windows add up,
    in the same order); `Windows.covered` tells which tokens any window still covers."""
    h, w = window_shape(grid, max_tokens)
    rows, cols = axis_starts(grid[0], h, overlap), axis_starts(grid[1], w, overlap)
    wr, wc = axis_weights(rows, h, kind), axis_weights(cols, w, kind)
    origins = tuple((r, c) for r in rows for c in cols)
    raw = [np.outer(a, b) for a in wr for b in wc]
    if keep is not None:
        used = [k for k, (t, left) in enumerate(origins)
                if keep[t : t + h, left : left + w].any()]
        origins, raw = tuple(origins[k] for k in used), [raw[k] for k in used]
    total = np.zeros(grid, np.float64)
    for (t, left), wk in zip(origins, raw):
        total[t : t + h, left : left + w] += wk
    total[total == 0] = 1.0  # tokens no kept window covers (no weight to normalise)
    weights = np.stack([wk / total[t : t + h, left : left + w]
                        for (t, left), wk in zip(origins, raw)])
    return Windows(tuple(grid), (h, w), origins, weights.reshape(len(origins), h * w)
                   .astype(np.float32), max(1, int(batch)))


def crop(x: mx.array, grid: tuple[int, int], origin: tuple[int, int],
         size: tuple[int, int]) -> mx.array:
    """Window `origin`/`size` (tokens) of packed tokens x (B, gh*gw, C) -> (B, h*w, C)."""
    (t, left), (h, w) = origin, size
    b, _, c = x.shape
    return x.reshape(b, *grid, c)[:, t : t + h, left : left + w].reshape(b, h * w, c)


def windowed_advance(step: StepFn, transformer: FluxTransformer, inputs: StepInputs,
                     windows: Windows, controls: Sequence[Callable] = (), group=None
                     ) -> Callable[..., mx.array]:
    """`advance(latents (B, N, 64), conditioning (1|B, N, K) | None, timestep (B,), dt,
    i) -> latents at the next sigma`: every window's step on its crops, with 0-based ids
    (`inputs` are the whole canvas's, batch B), blended with the windows' weights.
    controls: ControlFns (sampling.denoise) called per window with its latents crop and
    `window=(grid, origin, size)` (ControlNets crop their control term and ids). Each
    group of `windows.batch` windows is evaluated before the next is built, so the peak
    is one window batch plus the canvas latents.
    group: the `mx.distributed` group of an mlx.launch run sharing the windows
    (sampling/ranks.py `split`) or None: each rank evaluates its `share`, the weighted
    updates of every window are gathered (`ranks.all_gather`, float32) and every rank
    adds them up in window order, as one process does: the same latents bit for bit."""
    h, w = windows.size
    rank, size = (0, 1) if group is None else (group.rank(), group.size())
    ids = image_ids(h, w, inputs.img_ids.shape[-1])  # the family's id axes
    per_k: dict[int, StepInputs] = {}
    weights = mx.array(windows.weights)[..., None]  # (n, h*w, 1)
    covered = windows.covered
    # skipped windows (plan_windows(keep=...)): tokens no window covers keep their latents
    frozen = None if covered.all() else mx.array(~covered.reshape(1, -1, 1))

    def place(out, j, part):  # window j's weighted update (B, h*w, C) onto the canvas
        (top, left), (b, _, c) = windows.origins[j], part.shape
        return out.at[:, top : top + h, left : left + w].add(part.reshape(b, h, w, c))

    def advance(latents, conditioning, timestep, dt, i):
        b, _, c = latents.shape
        out = mx.zeros((b, *windows.grid, c), dtype=mx.float32)
        mine = []  # with ranks: this rank's weighted updates, exchanged after its share
        for idx in windows.groups(rank, size):
            k = len(idx)
            if k not in per_k:
                per_k[k] = inputs.repeated(k, transformer, ids)
            crops = [crop(latents, windows.grid, windows.origins[j], (h, w)) for j in idx]
            cond = None if conditioning is None else mx.concatenate(
                [mx.broadcast_to(crop(conditioning, windows.grid, windows.origins[j],
                                      (h, w)), (b, h * w, conditioning.shape[-1]))
                 for j in idx], axis=0)
            t = mx.concatenate([timestep] * k, axis=0) if k > 1 else timestep
            residuals = _residuals(controls, crops, t[:b], i, windows, idx)
            y = per_k[k].advance(step, mx.concatenate(crops, axis=0), cond, t, dt,
                                 residuals).astype(mx.float32)
            parts = [weights[j] * y[n * b : (n + 1) * b] for n, j in enumerate(idx)]
            if size > 1:
                mine += parts
            else:
                for j, part in zip(idx, parts):
                    out = place(out, j, part)
            mx.eval(out, mine)  # bound the graph: one window batch alive at a time
        if size > 1:
            for j, update in enumerate(_every_window(mine, windows, group, (b, h * w, c))):
                out = place(out, j, update)
        out = out.reshape(b, -1, c).astype(latents.dtype)
        return out if frozen is None else mx.where(frozen, latents, out)

    return advance


def _every_window(mine: list[mx.array], windows: Windows, group, shape: tuple[int, ...]
                  ) -> list[mx.array]:
    """Every window's weighted update `shape` (B, h*w, C), in window order, from each
    rank's own (`mine`: its `share`, padded with zeros to the longest share for the
    exchange, `ranks.all_gather`)."""
    shares = share(windows.count, group.size())
    k = max(map(len, shares))
    pad = [mx.zeros(shape, mx.float32)] * (k - len(mine))
    every = all_gather(mx.stack(mine + pad), group)  # (size * k, B, h*w, C), rank-major
    return [every[r * k + s] for r, part in enumerate(shares) for s in range(len(part))]


def _residuals(controls, crops, timestep, i, windows: Windows, group) -> list:
    """Each ControlFn's residuals for the windows of `group`, stacked like their crops
    (window-major on the batch axis); ControlFns inactive at step i give none."""
    out = []
    for fn in controls:
        per = [fn(x, timestep, i, window=(windows.grid, windows.origins[j], windows.size))
               for x, j in zip(crops, group)]
        if per[0] is None:
            continue
        out.append(ControlResiduals(
            [mx.concatenate([r.double[d] for r in per], axis=0) for d in range(len(per[0].double))],
            [mx.concatenate([r.single[d] for r in per], axis=0) for d in range(len(per[0].single))],
            per[0].repeat))
    return out
