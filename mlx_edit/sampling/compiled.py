"""One denoising step (transformer forward + flow-match Euler update), optionally compiled.

`make_step(transformer)` returns `step(...)`, the body of `pipeline.denoise`'s loop as one
function, wrapped in `mx.compile` unless `compile=False`. Compilation traces the graph once
per input shape and fuses elementwise chains (modulation, gating, RoPE, the Euler update)
into single kernels; the result equals the uncompiled step up to float rounding
(tests/test_compile.py). Measured on the CPU backend (benchmarks/RESULTS.md): no gain
(8.29 s compiled vs 8.27 s eager per wide forward; 5.6% slower before attention/GELU were
split over CPU streams: MLX's generated CPU kernels are no faster than its built-in
ones), so it is on by default only on a GPU; not yet measured on Metal/CUDA.

Everything that changes from step to step is an array argument (latents, timestep, dt,
ControlNet residuals), so the trace is reused for every step of a run; the transformer's
parameters are declared as implicit inputs (`inputs=transformer.state`), so reloading or
updating weights in place is seen by later calls. Changing the model's structure
(quantizing it, adding layers) needs a new `make_step`.

With a step cache (mlx_edit/sampling/cache.py) the skip decisions read arrays between parts
of the forward, so the step runs eager and the cache compiles its pieces through `traced`
(the same ControlNet / IP-Adapter packing as the whole step).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

from mlx_edit.sampling.latents import model_input
from mlx_edit.models.flux import FluxTransformer
from mlx_edit.models.layers import ControlResiduals, IPAdapterKV

StepFn = Callable[..., mx.array]


def compile_enabled() -> bool:
    """The default for `make_step(compile=...)`: MLX_EDIT_COMPILE=1/0 forces it; otherwise
    on for a GPU and off on the CPU backend, where it measured no faster (wide preset,
    1024 + 512 tokens: 8.29 s compiled vs 8.27 s eager; benchmarks/RESULTS.md)."""
    value = os.environ.get("MLX_EDIT_COMPILE")
    if value is None:
        return mx.default_device() == mx.gpu
    return value not in ("0", "false", "no", "off")


def step_dt(sigma: float, sigma_next: float) -> mx.array:
    """`sigma_next - sigma` as a 0-d float32 array, rounded as `sampler.euler_step` does."""
    return mx.array(np.float32(sigma_next) - np.float32(sigma))


def _euler(latents: mx.array, velocity: mx.array, dt: mx.array) -> mx.array:
    # sampler.euler_step with dt as an array (a Python float would retrace every step).
    out = latents.astype(mx.float32) + dt * velocity.astype(mx.float32)
    return out.astype(latents.dtype)


def traced(fn: Callable[..., object], module, compile: bool) -> Callable[..., object]:
    """`fn(*args, controlnet=[...], ip=[...])` made traceable and, when `compile`, wrapped
    in `mx.compile` with `module.state` as implicit inputs; the result is called as
    `fn(*args, controlnet=(), ip=())`. args: arrays, trees of arrays and constants (None,
    numbers: part of the trace's key, so a new one retraces); fn returns a tree of arrays.

    ControlResiduals / IPAdapterKV are dataclasses, which `mx.compile` cannot take: their
    arrays travel as lists and their repeat flags / scales as constants. Used for the whole
    step and for a step cache's pieces (mlx_edit/sampling/cache.py)."""

    def body(args, residuals, repeats, ip_kv, ip_scales):
        controlnet = [ControlResiduals(list(d), list(s), rep)
                      for (d, s), rep in zip(residuals, repeats)]
        ip = [IPAdapterKV(list(k), list(v), list(sc)) for (k, v), sc in zip(ip_kv, ip_scales)]
        return fn(*args, controlnet=controlnet, ip=ip)

    run = mx.compile(body, inputs=module.state) if compile else body

    def call(*args, controlnet: Sequence[ControlResiduals] = (),
             ip: Sequence[IPAdapterKV] = ()):
        return run(args, [(list(r.double), list(r.single)) for r in controlnet],
                   tuple(bool(r.repeat) for r in controlnet), [(list(a.k), list(a.v)) for a in ip],
                   tuple(tuple(float(s) for s in a.scale) for a in ip))

    return call


def make_step(transformer: FluxTransformer, *, compile: bool | None = None,
              forward: Callable[..., mx.array] | None = None,
              negative_forward: Callable[..., mx.array] | None = None) -> StepFn:
    """Build `step(latents, conditioning, img_ids, txt, txt_ids, timestep, pooled, guidance,
    rope, dt, *, controlnet=(), ip=(), tokens=None, negative=None) -> latents at the next
    sigma` (in their dtype).

    Shapes as `denoise.denoise`: latents (B, N, 64) packed, conditioning (1|B, N, C),
    img_ids (N, 3), txt (B, L, joint_dim), txt_ids (L, 3), timestep (B,) (sigma, model
    dtype), pooled (B, pooled_dim), guidance (B,) or None, rope = transformer.rope(img_ids,
    txt_ids), dt = `step_dt(sigma, sigma_next)`; controlnet: ControlResiduals per
    ControlNet; ip: IPAdapterKV per adapter; tokens: (1|B, M, 64) reference tokens after
    the latents (velocity kept for the first N); negative: (txt, pooled, scale 0-d) for
    true CFG, a second forward per step (diffusers `true_cfg_scale`).

    compile: None -> `compile_enabled()`; a new ControlNet count or IP-Adapter scale
    retraces. forward / negative_forward (default: forward): step caches' `velocity(img,
    txt, timestep, pooled, guidance, rope, controlnet, ip)` for the prompt / negative
    prompt in place of the transformer call. Their skip decisions are made in Python
    between pieces, so the step itself then runs eager and the caches compile their
    pieces (`cache.start(..., compile=)`); `step.compiled` says whether either is.
    """
    compile = compile_enabled() if compile is None else compile
    negative_forward = negative_forward or forward

    def body(latents, conditioning, img_ids, txt, txt_ids, timestep, pooled, guidance, rope,
             dt, tokens, negative, *, controlnet, ip):
        x, n = model_input(latents, conditioning, tokens), latents.shape[1]

        def velocity(txt, pooled, fwd):
            if fwd is not None:  # a step cache's forward (mlx_edit.sampling.cache)
                return fwd(x, txt, timestep, pooled, guidance, rope, controlnet, ip)[:, :n]
            return transformer(x, img_ids, txt, txt_ids, timestep, pooled, guidance,
                               controlnet=controlnet, ip=ip, rope=rope)[:, :n]

        v = velocity(txt, pooled, forward)
        if negative is not None:  # true CFG: neg + scale * (pos - neg), as diffusers
            v_neg = velocity(negative[0], negative[1], negative_forward)
            v = v_neg + negative[2].astype(v.dtype) * (v - v_neg)
        return _euler(latents, v, dt)

    fn = traced(body, transformer, compile and forward is None)

    def step(latents, conditioning, img_ids, txt, txt_ids, timestep, pooled, guidance, rope,
             dt, *, controlnet=(), ip=(), tokens=None, negative=None) -> mx.array:
        return fn(latents, conditioning, img_ids, txt, txt_ids, timestep, pooled, guidance,
                  rope, dt, tokens, negative, controlnet=controlnet, ip=ip)

    step.compiled = compile  # type: ignore[attr-defined]
    return step
