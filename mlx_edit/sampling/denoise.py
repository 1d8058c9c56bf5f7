"""The one denoise loop and the data it runs on (prepared before the loop).

Flow-match Euler over the FLUX transformer (diffusers FluxFillPipeline denoising loop,
pipelines/flux/pipeline_flux_fill.py); every conditioning (Fill or control latents,
ControlNet hooks, IP-Adapter keys/values) enters through explicit arguments, so inpaint,
outpaint and restyle change what is prepared, never the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_edit.imaging.stitch import CropPlan
from mlx_edit.sampling import cache as step_cache
from mlx_edit.sampling import ranks
from mlx_edit.models.flux import FluxTransformer
from mlx_edit.models.layers import ControlResiduals, IPAdapterKV
from mlx_edit.sampling.compiled import compile_enabled, make_step, step_dt, step_inputs
from mlx_edit.sampling.tiles import Windows, windowed_advance
from mlx_edit.sampling.sampler import model_timesteps

# A control hook: (packed latents, timestep (B,), step index) -> residuals or None; with
# windows (sampling.tiles) also `window=(grid, origin, size)`: latents are that crop.
ControlFn = Callable[[mx.array, mx.array, int], "ControlResiduals | None"]
# After step i: (i, latents at sigmas[i+1]) -> latents (e.g. the source kept outside a mask).
StepHook = Callable[[int, mx.array], mx.array]


@dataclass
class PromptEmbeds:
    """The transformer's text inputs for one prompt: the sequence (1, L, joint_dim) (FLUX.1:
    T5; FLUX.2: Qwen3's stacked hidden states) and the pooled vector (1, pooled_dim)
    (FLUX.1: CLIP's) or None (FLUX.2 has none)."""

    txt: mx.array
    pooled: mx.array | None = None


@dataclass
class EditJob:
    """Everything the denoise loop and the decoder need, prepared before the loop.

    latents: initial packed latents (B, N, 64); conditioning: channels (1|B, N, K) (Fill
    320, Canny/Depth 64) or None; tokens / token_ids: extra sequence tokens (1, M, 64) and
    their position ids (M, 3) appended after the latents (Kontext references) or None;
    reference_kv: the tokens enter as keys/values computed once (FLUX.2 KV variant,
    `compiled.step_inputs`), not as sequence tokens;
    cache: the step cache of the loop (None: every step evaluated);
    sigmas: float32 (n+1,); plan / blend: where the canvas maps back into the original.
    """

    original: Image.Image
    plan: CropPlan
    blend: np.ndarray
    latents: mx.array
    conditioning: mx.array | None
    embeds: PromptEmbeds
    guidance: float
    sigmas: np.ndarray
    seeds: list[int]
    metadata: dict
    controls: Sequence[ControlFn] = ()
    ip: Sequence[IPAdapterKV] = ()
    tokens: mx.array | None = None
    token_ids: mx.array | None = None
    after_step: StepHook | None = None
    noise: mx.array | None = None  # the initial noise (B, N, 64), for per-step source blends
    source: mx.array | None = None  # the canvas's packed latents (1, N, 64) when encoded
    negative: PromptEmbeds | None = None
    true_cfg_scale: float = 1.0
    stats: dict = field(default_factory=dict)
    hook: Callable[[int, mx.array], mx.array] | None = None  # per-step (soft masks)
    paste: dict = field(default_factory=dict)  # stitch_back options (color_match, method)
    cache: step_cache.CacheConfig | None = None
    windows: Windows | None = None  # tiled denoising (sampling.tiles) or None
    reference_kv: bool = False


def rank_split(job: EditJob) -> ranks.Split | None:
    """How the ranks of an mlx.launch run share `job` (sampling/ranks.py `split`, as
    `denoise` decides it), or None for one process."""
    return ranks.split(None if job.windows is None else job.windows.count,
                       job.negative is not None and job.true_cfg_scale > 1.0,
                       job.cache is not None)


def denoise(
    transformer: FluxTransformer, latents: mx.array, conditioning: mx.array | None,
    img_ids: mx.array, embeds: PromptEmbeds, sigmas: np.ndarray, guidance: float, *,
    controls: Sequence[ControlFn] = (), ip: Sequence[IPAdapterKV] = (),
    tokens: mx.array | None = None, token_ids: mx.array | None = None,
    after_step: StepHook | None = None, negative: PromptEmbeds | None = None,
    true_cfg_scale: float = 1.0, compile: bool | None = None,
    hook: Callable[[int, mx.array], mx.array] | None = None,
    cache: step_cache.CacheConfig | None = None, stats: dict | None = None,
    windows: Windows | None = None, reference_kv: bool = False,
) -> Iterator[tuple[int, mx.array]]:
    """The one denoise loop: flow-match Euler over the FLUX transformer.

    latents (B, N, 64) packed at sigmas[0]; conditioning (1|B, N, C) concatenated on the
    channel axis every step (Fill: 320 channels) or None; img_ids (N, 3); tokens (1|B, M,
    64) with token_ids (M, 3): reference tokens appended after the latents on the sequence
    axis, the velocity taken on the first N outputs (Kontext, BFL sampling.py denoise;
    diffusers FluxKontextPipeline). hook / after_step: applied to the latents before step
    i (at sigmas[i]; soft masks, sampling.soft_mask) / after it (`keep_source`).
    negative / true_cfg_scale: true CFG, `neg + scale * (pos - neg)` per step when scale
    > 1 (diffusers FluxKontextPipeline). cache: a step cache (sampling.cache) or None,
    with true CFG one state per branch; stats gets after every step `transformer_evals`
    / `transformer_skipped` (+ `cache_steps`, `cache_steps_negative`, `cache_info`).
    compile: the step under `mx.compile` (None: on a GPU only; sampling/compiled.py).
    windows: tiled denoising (sampling.tiles, MultiDiffusion): each step is the weighted
    average of the windows' steps on their crops of latents, conditioning and ControlNet
    inputs (hooks see the whole canvas). reference_kv: the tokens' keys/values are
    computed before the first step and every step attends to them (FLUX.2 KV variant,
    diffusers Flux2KleinKVPipeline; `compiled.step_inputs`). Under mlx.launch with
    several ranks the windows, or without windows true CFG's branches, are shared over
    the ranks (sampling/ranks.py `split`; every rank ends each step with the same
    latents). Yields (i, latents at sigmas[i+1]), evaluated, so the caller can report
    progress, preview or stop. Raises ValueError for a cache the transformer cannot run,
    or a cache with windows.
    """
    b, n = latents.shape[0], len(sigmas) - 1
    cfg = _true_cfg(negative, true_cfg_scale, cache, windows)
    inputs = step_inputs(transformer, embeds.txt, embeds.pooled, img_ids, b, guidance,
                         token_ids=token_ids, tokens=tokens, ip=ip, negative=cfg,
                         reference_kv=reference_kv)
    timesteps = model_timesteps(sigmas[:-1], dtype=latents.dtype)
    shared = ranks.split(None if windows is None else windows.count, cfg is not None,
                         cache is not None)
    kind, group = (None, None) if shared is None else (shared.kind, shared.group)
    step, states = _cached_step(transformer, cache, n, compile, cfg is not None, inputs.kv,
                                group if kind == "true_cfg" else None)
    advance = _plain(step, inputs, controls) if windows is None else \
        windowed_advance(step, transformer, inputs, windows, controls,
                         group if kind == "windows" else None)
    for i in range(n):
        t = mx.broadcast_to(timesteps[i], (b,))
        if hook is not None:
            latents = hook(i, latents)
        latents = advance(latents, conditioning, t,
                          step_dt(float(sigmas[i]), float(sigmas[i + 1])), i)
        if after_step is not None:
            latents = after_step(i, latents)
        mx.eval(latents, *(a for s in states for a in s.arrays()))
        if stats is not None:
            _count(stats, i, states, cfg is not None, 1 if windows is None else windows.count)
        yield i, latents


def _plain(step, inputs, controls: Sequence[ControlFn]):
    """advance(latents, conditioning, t, dt, i): one step on the whole canvas, with the
    ControlNets' residuals for step i."""
    def advance(latents, conditioning, t, dt, i):
        residuals = [r for fn in controls if (r := fn(latents, t, i)) is not None]
        return inputs.advance(step, latents, conditioning, t, dt, residuals)
    return advance


def _true_cfg(negative: PromptEmbeds | None, scale: float, cache, windows
              ) -> tuple[mx.array, mx.array, float] | None:
    """(negative txt, pooled, scale) when true CFG is on, else None; refuses a step
    cache with windows (ValueError)."""
    if windows is not None and cache is not None:
        raise ValueError("a step cache and tiled denoising (windows) together are not "
                         "supported: the cache's decisions assume one evaluation per step")
    if negative is None or scale <= 1.0:
        return None
    return negative.txt, negative.pooled, scale


def _cached_step(transformer: FluxTransformer, cache: step_cache.CacheConfig | None, n: int,
                 compile: bool | None, cfg: bool, kv=None, branches=None):
    """(the step function, the cache states: none, one, or with true CFG one per branch;
    kv: the references' keys/values the states' evaluations attend to; branches: the
    ranks sharing true CFG's branches (`make_step`) or None)."""
    compile = compile_enabled() if compile is None else compile
    states = [step_cache.start(cache, transformer, n, compile, kv)
              for _ in range(0 if cache is None else 1 + cfg)]
    forwards = [s.velocity for s in states] or [None]
    return make_step(transformer, compile=compile, forward=forwards[0],
                     negative_forward=forwards[-1], branches=branches), states


def _count(stats: dict, i: int, states: list[step_cache.StepCache], cfg: bool,
           per_step: int = 1) -> None:
    """Evaluations so far into `stats`; per_step: evaluations per computed step (windows)."""
    runs = [s.computed for s in states] or [[True] * (i + 1)] * (1 + cfg)
    stats["transformer_evals"] = sum(map(sum, runs)) * per_step
    stats["transformer_skipped"] = sum(len(r) - sum(r) for r in runs)
    # per step: C computed in full, s skipped or predicted; per branch with true CFG
    for key, state in zip(("cache_steps", "cache_steps_negative"), states):
        stats[key] = "".join("C" if c else "s" for c in state.computed)
    if states:
        stats["cache_info"] = states[0].info if len(states) == 1 else [s.info for s in states]


def keep_source(mask: mx.array, image_latents: mx.array, noise: mx.array,
                sigmas: np.ndarray) -> StepHook:
    """A StepHook keeping the source outside `mask`: after step i the latents become
    `(1 - mask) * noise_latents(image_latents, noise, sigmas[i+1]) + mask * latents`
    (diffusers FluxKontextInpaintPipeline / FluxInpaintPipeline's per-step blend; at the
    last sigma, 0, the source latents themselves).

    mask (1|B, N, 64) packed, 1 = generate (`latents.pack_latent_mask`); image_latents
    (1|B, N, 64) the source's packed latents; noise (B, N, 64) the run's initial noise.
    """
    from mlx_edit.sampling.sampler import noise_latents

    def after(i: int, latents: mx.array) -> mx.array:
        source = noise_latents(image_latents.astype(latents.dtype), noise,
                               float(sigmas[i + 1]))
        m = mask.astype(latents.dtype)
        return (1 - m) * source + m * latents

    return after


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], dtype: mx.Dtype) -> mx.array:
    """Gaussian noise (len(seeds), *shape), image i drawn from seed i alone (reproducible
    one by one: seed s gives the same image whether run alone or in a batch)."""
    return mx.stack([mx.random.normal(shape, key=mx.random.key(s)) for s in seeds]).astype(dtype)
