"""Step caches: fewer transformer evaluations per edit (First Block Cache, TaylorSeer, MagCache).

The configs carry diffusers' parameters with diffusers' meaning (hooks/first_block_cache.py
FirstBlockCacheConfig, hooks/taylorseer_cache.py TaylorSeerCacheConfig, hooks/mag_cache.py
MagCacheConfig), so a setting tuned there means the same here; tests/test_cache.py checks the
per-step skip decisions and the latents against those hooks on FluxTransformer2DModel;
tests/test_cache_klein.py MagCache's and TaylorSeer's against diffusers' on
Flux2Transformer2DModel (FLUX.2 [klein] runs all three through `Flux2Pieces`; diffusers'
First Block Cache fails on FLUX.2, its issue 14280).

`start(cache, transformer, num_steps, compile)` returns the per-edit state: a `StepCache`
whose `velocity(...)` replaces one transformer call in the denoise loop (true CFG: one
state per branch, as diffusers' cache_context "cond" / "uncond"). It composes the model's
pure pieces (`embed`, `blocks`, `add_control`, `final` in mlx_edit/models/flux.py) into
a few pure functions, optionally under `mx.compile`, with the decisions in Python between
them; the cached residuals and Taylor factors live in the state, never in the model.
Specs such as `fbc:0.12` are parsed in cache_spec.py.

As in diffusers, ControlNet residuals are added after every block on every step, skipped
blocks included (its forward loop adds them outside the hooked blocks); on a skipped step
they are thus added on top of a cached residual that already holds the last computed step's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_edit.models.flux import BlockPass, FluxTransformer, add_control, cache_units
from mlx_edit.models.flux2 import Flux2Transformer, ReferenceKV
from mlx_edit.sampling.compiled import traced

# diffusers' FLUX.1-dev magnitude ratios for 28 steps (hooks/mag_cache.py FLUX_MAG_RATIOS,
# from https://github.com/Zehong-Ma/MagCache); measured on real FLUX.1-dev, not on Fill.
FLUX_MAG_RATIOS = (
    1.0, 1.21094, 1.11719, 1.07812, 1.0625, 1.03906, 1.03125, 1.03906, 1.02344, 1.03125,
    1.02344, 0.98047, 1.01562, 1.00781, 1.0, 1.00781, 1.0, 1.00781, 1.0, 1.0, 0.99609,
    0.99609, 0.98047, 0.98828, 0.96484, 0.95703, 0.93359, 0.89062,
)
# TaylorSeer's default and lite-mode module patterns (re.fullmatch on diffusers' names).
_ATTENTION_UNITS = ("^blocks.*attn", "^transformer_blocks.*attn",
                    "^single_transformer_blocks.*attn", "^temporal_transformer_blocks.*attn")
_LITE_SKIP = ("^[^.]*block[^.]*\\.[^.]+$",)
_LITE_CACHE = ("^proj_out$",)


@dataclass
class FirstBlockCache:
    """First Block Cache (diffusers FirstBlockCacheConfig): after the first block, if the
    mean |change| of its residual relative to the last computed step's mean |residual| is
    <= `threshold`, the remaining blocks are skipped and their cached residual is added.
    threshold 0 never skips (a change of exactly 0 aside)."""

    threshold: float = 0.05


@dataclass
class TaylorSeer:
    """TaylorSeer (diffusers TaylorSeerCacheConfig, https://huggingface.co/papers/2503.06923):
    steps < disable_cache_before_step compute, then one step in `cache_interval` computes
    and the others extrapolate the hooked units' outputs by a Taylor series of order
    `max_order` in the step index (finite differences of the computed steps); steps >=
    disable_cache_after_step compute. Factors are stored in `taylor_factors_dtype`
    (None: the model's). Units (diffusers names, re.fullmatch): `cache_identifiers`
    (default: every block's attention) are predicted, `skip_predict_identifiers` return
    zeros; `use_lite_mode` predicts proj_out and zeroes the blocks. Only block, attention
    and proj_out names can be hooked here (`mlx_edit.models.flux.cache_units`; FLUX.2's
    units: `Flux2Transformer.blocks`). On klein KV the references never enter the
    sequence (`reference_kv`), while diffusers' extract call returns them and so restarts
    its image factors at the next call: the two agree when disable_cache_before_step >=
    max_order + 2 (the default 3 / 1 does; tests/test_flux2_kv.py)."""

    cache_interval: int = 5
    disable_cache_before_step: int = 3
    disable_cache_after_step: int | None = None
    max_order: int = 1
    taylor_factors_dtype: mx.Dtype | None = mx.bfloat16
    skip_predict_identifiers: list[str] | None = None
    cache_identifiers: list[str] | None = None
    use_lite_mode: bool = False


@dataclass
class MagCache:
    """MagCache (diffusers MagCacheConfig, https://github.com/Zehong-Ma/MagCache): after the
    first round(retention_ratio * num_inference_steps) steps, the product of the per-step
    magnitude ratios accumulates |1 - product| as an error; while it is <= `threshold` and
    at most `max_skip_steps` steps in a row, the whole block stack is replaced by the last
    computed residual. mag_ratios (resampled to num_inference_steps by nearest index) are
    required unless `calibrate` (never skip; the measured ratios go to the stats).
    num_inference_steps None (diffusers: 28) means the edit's own step count."""

    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    num_inference_steps: int | None = None
    mag_ratios: Sequence[float] | None = None
    calibrate: bool = False

    def __post_init__(self):
        if self.mag_ratios is None and not self.calibrate:
            raise ValueError("MagCache needs mag_ratios (FLUX: mlx_edit.sampling.cache."
                             "FLUX_MAG_RATIOS) or calibrate=True to measure them")


CacheConfig = FirstBlockCache | TaylorSeer | MagCache


def nearest_interp(ratios: Sequence[float], length: int) -> np.ndarray:
    """`ratios` resampled to `length` by nearest index, float32, as diffusers'
    mag_cache.nearest_interp (float32 grid, round half to even)."""
    src = np.asarray(ratios, np.float32)
    if length == 1:
        return src[-1:]
    grid = np.arange(length, dtype=np.float32) * np.float32((len(src) - 1) / (length - 1))
    return src[np.round(grid).astype(np.int64)]


def _relative_l1(x: mx.array, ref: mx.array) -> float:
    # mean|x - ref| / mean|ref|, diffusers FBCHeadBlockHook._should_compute_remaining_blocks
    return (mx.abs(x - ref).mean() / mx.abs(ref).mean()).item()


class StepCache:
    """Per-edit cache state. `velocity(img, txt, timestep, pooled, guidance, rope,
    controlnet, ip)` -> (B, N, out_channels) as `FluxTransformer.__call__` (img already
    joined with the conditioning); `computed[i]` says whether step i ran in full;
    `arrays()` the cached arrays (to evaluate with the latents); `info` diagnostics.

    The decisions run in Python between pure pieces of the forward (the model's arrays in,
    arrays out, no state), which run under `mx.compile` when `compile` (`_piece`)."""

    def __init__(self, model: FluxTransformer, num_steps: int, compile: bool = False):
        self.model, self.num_steps, self.compile = model, num_steps, compile
        self.n_double, self.n_single = len(model.double_blocks), len(model.single_blocks)
        self.computed: list[bool] = []
        self.info: dict = {}

    def _piece(self, fn):
        # fn(*arrays, controlnet=, ip=) -> arrays; compiled with the model as implicit input
        return traced(fn, self.model, self.compile)

    def arrays(self) -> list[mx.array]:
        return []

    def _controls(self, x, controlnet, start: int = 0) -> mx.array:
        return add_control(x, controlnet, start, self.n_double + self.n_single,
                           self.n_double, self.n_single)


class _FirstBlock(StepCache):
    def __init__(self, cfg: FirstBlockCache, model, num_steps, compile=False):
        super().__init__(model, num_steps, compile)
        if self.n_double + self.n_single < 2:
            raise ValueError("First Block Cache needs a transformer with at least two blocks")
        self.threshold = cfg.threshold
        self.head_residual = self.tail_residual = None
        self.info["relative_change"] = []
        self.head, self.rest, self.skipped = map(self._piece, (self._head, self._rest,
                                                               self._skipped))

    def arrays(self):
        return [a for a in (self.head_residual, self.tail_residual) if a is not None]

    def velocity(self, img, txt, timestep, pooled, guidance, rope, controlnet, ip):
        extras = dict(controlnet=controlnet, ip=ip)
        head_img, head_txt, head_raw, residual, vec = self.head(
            img, txt, timestep, pooled, guidance, rope, **extras)
        change = None if self.head_residual is None else _relative_l1(residual, self.head_residual)
        self.info["relative_change"].append(change)
        compute = change is None or change > self.threshold
        self.computed.append(compute)
        if not compute:
            return self.skipped(head_raw, self.tail_residual, vec, **extras)
        velocity, self.tail_residual = self.rest(head_img, head_txt, head_raw, vec, rope, **extras)
        self.head_residual = residual
        return velocity

    def _head(self, img, txt, timestep, pooled, guidance, rope, *, controlnet, ip):
        x, ctx, vec = self.model.embed(img, txt, timestep, pooled, guidance)
        head = self.model.blocks(x, ctx, vec, rope, stop=1, controlnet=controlnet, ip=ip)
        return head.img, head.txt, head.raw, head.raw - x, vec

    def _rest(self, head_img, head_txt, head_raw, vec, rope, *, controlnet, ip):
        rest = self.model.blocks(head_img, head_txt, vec, rope, start=1, controlnet=controlnet,
                                 ip=ip)
        return self.model.final(rest.img, vec), rest.raw - head_raw

    def _skipped(self, head_raw, tail_residual, vec, *, controlnet, ip):
        # diffusers: head output + cached tail residual, then every block's ControlNet residual
        return self.model.final(self._controls(tail_residual + head_raw, controlnet), vec)


class _Mag(StepCache):
    def __init__(self, cfg: MagCache, model, num_steps, compile=False):
        super().__init__(model, num_steps, compile)
        self.full, self.skipped = self._piece(self._full), self._piece(self._skipped)
        self.cfg = cfg
        self.steps = cfg.num_inference_steps or num_steps
        self.ratios = None if cfg.calibrate else nearest_interp(cfg.mag_ratios, self.steps)
        self.retention = int(cfg.retention_ratio * self.steps + 0.5)
        self.residual = None
        self.index = 0
        self._reset()
        if cfg.calibrate:
            self.info["mag_ratios"] = []

    def _reset(self):
        self.ratio, self.err, self.run = np.float32(1.0), np.float32(0.0), 0

    def arrays(self):
        return [] if self.residual is None else [self.residual]

    def _decide(self) -> bool:
        # float32 scalars: diffusers multiplies by 0-d float32 tensors of mag_ratios.
        if self.cfg.calibrate or self.index < self.retention:
            return True
        scale = self.ratios[self.index] if self.index < len(self.ratios) else np.float32(1.0)
        self.ratio = np.float32(self.ratio * scale)
        self.run += 1
        self.err = np.float32(self.err + np.abs(np.float32(1.0) - self.ratio))
        if (self.residual is not None and self.err <= np.float32(self.cfg.threshold)
                and self.run <= self.cfg.max_skip_steps):
            return False
        self._reset()
        return True

    def velocity(self, img, txt, timestep, pooled, guidance, rope, controlnet, ip):
        inputs, extras = (img, txt, timestep, pooled, guidance), dict(controlnet=controlnet, ip=ip)
        compute = self._decide()
        self.computed.append(compute)
        if compute:
            velocity, residual = self.full(*inputs, rope, **extras)
            if self.cfg.calibrate:
                self.info["mag_ratios"].append(self._ratio(residual))
            self.residual = residual
        else:
            velocity = self.skipped(*inputs, self.residual, **extras)
        self.index += 1
        if self.index >= self.steps:  # diffusers resets its state after num_inference_steps
            self.index, self.residual = 0, None
            self._reset()
        return velocity

    def _full(self, img, txt, timestep, pooled, guidance, rope, *, controlnet, ip):
        x, ctx, vec = self.model.embed(img, txt, timestep, pooled, guidance)
        out = self.model.blocks(x, ctx, vec, rope, controlnet=controlnet, ip=ip)
        return self.model.final(out.img, vec), out.raw - x

    def _skipped(self, img, txt, timestep, pooled, guidance, residual, *, controlnet, ip):
        # diffusers: the head returns input + residual, every block then passes (adding its
        # ControlNet residual); the unused text projection is never evaluated
        x, _, vec = self.model.embed(img, txt, timestep, pooled, guidance)
        return self.model.final(self._controls(x + residual, controlnet), vec)

    def _ratio(self, residual: mx.array) -> float:
        if self.residual is None:
            return 1.0
        norm = mx.linalg.norm(residual.astype(mx.float32), axis=-1)
        prev = mx.linalg.norm(self.residual.astype(mx.float32), axis=-1)
        return (norm / (prev + 1e-8)).mean().item()


class _Taylor(StepCache):
    def __init__(self, cfg: TaylorSeer, model, num_steps, compile=False):
        super().__init__(model, num_steps, compile)
        self.cfg = cfg
        self.modes = taylor_units(cfg, cache_units(model.config))
        self.full, self.predicted = self._piece(self._full), self._piece(self._predicted)
        self.factors: dict[str, list[dict[int, mx.array]]] = {}
        self.zeros: dict[str, list[tuple]] = {}
        self.last: int | None = None

    def arrays(self):
        return [f for outs in self.factors.values() for fs in outs for f in fs.values()]

    def _compute(self, step: int) -> bool:
        c = self.cfg
        return (step < c.disable_cache_before_step
                or (step - c.disable_cache_before_step - 1) % c.cache_interval == 0
                or (c.disable_cache_after_step is not None and step >= c.disable_cache_after_step))

    def velocity(self, img, txt, timestep, pooled, guidance, rope, controlnet, ip):
        inputs, extras = (img, txt, timestep, pooled, guidance, rope), dict(controlnet=controlnet,
                                                                          ip=ip)
        step = len(self.computed)
        self.computed.append(self._compute(step))
        if self.computed[-1]:
            velocity, taps = self.full(*inputs, **extras)
            self._update({name: taps[name] for name in self.modes}, step)
            return velocity
        replace = self._predict(step)
        if "proj_out" in replace:
            return replace["proj_out"][0]  # lite mode: no transformer evaluation at all
        return self.predicted(*inputs, replace, **extras)

    def _full(self, img, txt, timestep, pooled, guidance, rope, *, controlnet, ip):
        x, ctx, vec = self.model.embed(img, txt, timestep, pooled, guidance)
        out = self.model.blocks(x, ctx, vec, rope, controlnet=controlnet, ip=ip,
                                record=set(self.modes))
        velocity = self.model.final(out.img, vec)
        taps = {**out.taps, "proj_out": (velocity,)}
        return velocity, {name: taps[name] for name in self.modes}

    def _predicted(self, img, txt, timestep, pooled, guidance, rope, replace, *, controlnet, ip):
        x, ctx, vec = self.model.embed(img, txt, timestep, pooled, guidance)
        out = self.model.blocks(x, ctx, vec, rope, controlnet=controlnet, ip=ip, replace=replace)
        return self.model.final(out.img, vec)

    def _update(self, outputs: dict[str, tuple[mx.array, ...]], step: int):
        # diffusers TaylorSeerState.update: divided differences up to max_order
        dtype = self.cfg.taylor_factors_dtype
        for name, feats in outputs.items():
            if self.modes[name] == "skip":
                self.zeros[name] = [(f.shape, f.dtype) for f in feats]
                continue
            prev_all = self.factors.get(name, [])
            new_all = []
            for k, feat in enumerate(feats):
                new = {0: feat}
                prev = prev_all[k] if k < len(prev_all) and self.last is not None else {}
                for j in range(self.cfg.max_order):
                    p = prev.get(j)
                    if p is None or p.shape != new[j].shape:
                        break
                    new[j + 1] = (new[j] - p.astype(feat.dtype)) / (step - self.last)
                new_all.append({o: f if dtype is None else f.astype(dtype) for o, f in new.items()})
            self.factors[name] = new_all
        self.dtypes = {n: [f.dtype for f in fs] for n, fs in outputs.items()}
        self.last = step

    def _predict(self, step: int) -> dict[str, tuple[mx.array, ...]]:
        if self.last is None:
            raise ValueError("TaylorSeer cannot predict before a computed step "
                             "(disable_cache_before_step must be >= 1)")
        offset = step - self.last
        replace = {name: tuple(mx.zeros(s, d) for s, d in z) for name, z in self.zeros.items()}
        for name, outs in self.factors.items():
            preds = []
            for k, fs in enumerate(outs):
                dtype = self.dtypes[name][k]
                pred = mx.zeros(fs[0].shape, dtype)
                for order in range(len(fs)):
                    pred = pred + fs[order].astype(dtype) * (offset ** order / math.factorial(order))
                preds.append(pred)
            replace[name] = tuple(preds)
        return replace


def taylor_units(cfg: TaylorSeer, units: Sequence[str]) -> dict[str, str]:
    """unit name -> "cache" (Taylor-predicted) or "skip" (zeros when predicting), resolved
    as diffusers' apply_taylorseer_cache (re.fullmatch; "skip" wins when both match).
    Raises ValueError when nothing is hooked or a block and its attention both are."""
    inactive = list(cfg.skip_predict_identifiers or [])
    active = list(cfg.cache_identifiers or []) or list(_ATTENTION_UNITS)
    if cfg.use_lite_mode:
        active, inactive = list(_LITE_CACHE), list(_LITE_SKIP)
    modes = {}
    for name in units:
        if any(re.fullmatch(p, name) for p in inactive):
            modes[name] = "skip"
        elif any(re.fullmatch(p, name) for p in active):
            modes[name] = "cache"
    if not modes:
        raise ValueError(f"TaylorSeer hooks nothing: no identifier matches {list(units)}")
    nested = [n for n in modes if n.endswith(".attn") and n[: -len(".attn")] in modes]
    if nested:
        raise ValueError(f"TaylorSeer: a block and its attention both hooked ({nested}): "
                         "hook one of them")
    return modes


class Flux2Pieces:
    """A Flux2Transformer seen through FluxTransformer's hook points (`embed`, `blocks`,
    `final`), so the caches above run on FLUX.2 [klein] unchanged: `embed` takes (and
    ignores) FLUX.1's pooled vector, `blocks` builds the blocks' modulations from vec and
    returns a BlockPass whose `raw` is the image stream and whose taps are TaylorSeer's
    recorded units (FLUX.2 has no ControlNets or IP-Adapters). diffusers' hooks wrap the
    same units of Flux2Transformer2DModel (transformer_blocks[0] the First Block Cache's
    head). kv: the edit's cached reference
    keys/values (KV variant, `Flux2Transformer.reference_kv`, evaluated), attended to by
    every block; compiled pieces hold them as constants (a state lives for one edit)."""

    def __init__(self, model: Flux2Transformer, kv: ReferenceKV | None = None):
        self.model, self.config, self.kv = model, model.config, kv
        self.double_blocks, self.single_blocks = model.double_blocks, model.single_blocks

    @property
    def state(self):
        return self.model.state

    def embed(self, img, txt, timestep, pooled, guidance):
        return self.model.embed(img, txt, timestep, guidance)

    def blocks(self, x, ctx, vec, rope, *, start=0, stop=None, controlnet=(), ip=(),
               record=None, replace=None):
        if controlnet or ip:
            raise ValueError("FLUX.2 step caches take no ControlNets or IP-Adapters")
        taps = {}
        img, txt = self.model.blocks(x, ctx, self.model.modulations(vec), rope, start=start,
                                     stop=stop, kv=self.kv, replace=replace,
                                     record=record or (), taps=taps)
        return BlockPass(img, txt, img, taps)

    def final(self, x, vec):
        return self.model.final(x, vec)


def start(cache: CacheConfig, model: FluxTransformer | Flux2Transformer, num_steps: int,
          compile: bool = False, kv: ReferenceKV | None = None) -> StepCache:
    """A fresh per-edit state for `cache` on `model` over `num_steps` denoising steps, its
    pieces under `mx.compile` when `compile`. One state per sequence of evaluations: true
    CFG needs one for the prompt and one for the negative prompt (diffusers'
    cache_context("cond") / ("uncond")). kv: FLUX.2 reference keys/values every evaluation
    attends to (KV variant; `Flux2Pieces`). Raises ValueError for an unknown config or one
    the model cannot run."""
    kinds = {FirstBlockCache: _FirstBlock, TaylorSeer: _Taylor, MagCache: _Mag}
    if type(cache) not in kinds:
        raise ValueError(f"unknown step cache {cache!r}: use FirstBlockCache, TaylorSeer "
                         "or MagCache")
    if isinstance(model, Flux2Transformer):
        model = Flux2Pieces(model, kv)
    return kinds[type(cache)](cache, model, num_steps, compile)


def state_bytes(cache: CacheConfig | None, cfg, batch: int, image_tokens: int,
                text_tokens: int, dtype_size: int) -> int:
    """Bytes the cache keeps between steps for a FluxConfig `cfg` (an edit of `batch`
    images): First Block Cache two image-stream residuals, MagCache one, TaylorSeer
    max_order + 1 factors per predicted unit output (in taylor_factors_dtype; IP-Adapter
    outputs not counted). 0 for None."""
    if cache is None:
        return 0
    stream = batch * image_tokens * cfg.hidden_size * dtype_size
    if isinstance(cache, FirstBlockCache):
        return 2 * stream
    if isinstance(cache, MagCache):
        return stream
    size = dtype_size if cache.taylor_factors_dtype is None else cache.taylor_factors_dtype.size
    total = 0
    for name, mode in taylor_units(cache, cache_units(cfg)).items():
        if mode == "skip":  # zeros when predicting: only their shapes are kept
            continue
        if name == "proj_out":
            total += batch * image_tokens * cfg.out_channels
        else:
            total += batch * (image_tokens + text_tokens) * cfg.hidden_size
    return total * size * (cache.max_order + 1)


def describe(cache: CacheConfig) -> str:
    """A one-line description for metadata, e.g. `FirstBlockCache(threshold=0.12)`; FLUX's
    magnitude ratios are named, not listed."""
    fields = {k: v for k, v in vars(cache).items() if v is not None}
    if isinstance(cache, MagCache) and fields.get("mag_ratios") is not None:
        same = tuple(float(r) for r in cache.mag_ratios) == FLUX_MAG_RATIOS
        fields["mag_ratios"] = "FLUX" if same else f"<{len(cache.mag_ratios)} values>"
    if isinstance(cache, TaylorSeer) and cache.taylor_factors_dtype is not None:
        fields["taylor_factors_dtype"] = str(cache.taylor_factors_dtype).removeprefix("mlx.core.")
    return f"{type(cache).__name__}({', '.join(f'{k}={v}' for k, v in fields.items())})"


def cache_metadata(cache: CacheConfig | None, stats: dict) -> dict:
    """The metadata entries of an edit run with `cache`: its description and the
    transformer evaluations run / skipped (both branches with true CFG) and the per-step
    patterns, from `denoise`'s stats ({} without a cache)."""
    if cache is None:
        return {}
    meta = {"cache": describe(cache), "transformer_evals": stats.get("transformer_evals"),
            "transformer_skipped": stats.get("transformer_skipped"),
            "cache_steps": stats.get("cache_steps")}
    if "cache_steps_negative" in stats:  # true CFG: the negative prompt's branch
        meta["cache_steps_negative"] = stats["cache_steps_negative"]
    return meta
