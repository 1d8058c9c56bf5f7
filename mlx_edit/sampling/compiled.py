"""One denoising step (transformer forward + flow-match Euler update), optionally compiled.

`make_step(transformer)` returns `step(...)`, the body of `sampling.denoise.denoise`'s
loop as one function, wrapped in `mx.compile` unless `compile=False`. Compilation traces
the graph once per input shape and fuses elementwise chains (modulation, gating, RoPE,
the Euler update) into single kernels; the result equals the uncompiled step up to float
rounding (tests/test_compile.py). Measured on the CPU backend (benchmarks/RESULTS.md): no gain
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
from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np

from mlx_edit.sampling.latents import model_input, text_ids
from mlx_edit.models.flux import FluxTransformer
from mlx_edit.models.flux2 import ReferenceKV
from mlx_edit.models.layers import ControlResiduals, IPAdapterKV
from mlx_edit.sampling.ranks import all_gather

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


def _guided_euler(latents: mx.array, v: mx.array, v_neg: mx.array | None, negative,
                  dt: mx.array) -> mx.array:
    """The Euler step with velocity v, or with true CFG (negative: (txt, pooled, scale))
    `v_neg + scale * (v - v_neg)`, as diffusers."""
    if v_neg is not None:
        v = v_neg + negative[2].astype(v.dtype) * (v - v_neg)
    return _euler(latents, v, dt)


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


def forward_transformer(transformer, x, img_ids, txt, txt_ids, timestep, pooled, guidance,
                        rope, controlnet=(), ip=(), kv=None) -> mx.array:
    """The transformer's velocity of every token (B, N [+ M], C). A family without a
    pooled text vector (FLUX.2, `pooled` None) has neither ControlNet residuals nor
    IP-Adapter keys (ValueError when given); kv: FLUX.2's cached reference keys/values
    (`ReferenceKV`, or its (double, single) lists) or None."""
    if pooled is not None:
        return transformer(x, img_ids, txt, txt_ids, timestep, pooled, guidance,
                           controlnet=controlnet, ip=ip, rope=rope)
    if controlnet or ip:
        raise ValueError("ControlNets and IP-Adapters are FLUX.1's: not for this model")
    return transformer(x, img_ids, txt, txt_ids, timestep, guidance, rope=rope, kv=kv)


def make_step(transformer: FluxTransformer, *, compile: bool | None = None,
              forward: Callable[..., mx.array] | None = None,
              negative_forward: Callable[..., mx.array] | None = None,
              branches=None) -> StepFn:
    """Build `step(latents, conditioning, img_ids, txt, txt_ids, timestep, pooled, guidance,
    rope, dt, *, controlnet=(), ip=(), tokens=None, negative=None, kv=None) -> latents at
    the next sigma` (in their dtype).

    Shapes as `denoise.denoise`: latents (B, N, 64) packed, conditioning (1|B, N, C),
    img_ids (N, 3), txt (B, L, joint_dim), txt_ids (L, 3), timestep (B,) (sigma, model
    dtype), pooled (B, pooled_dim), guidance (B,) or None, rope = transformer.rope(img_ids,
    txt_ids), dt = `step_dt(sigma, sigma_next)`; controlnet: ControlResiduals per
    ControlNet; ip: IPAdapterKV per adapter; tokens: (1|B, M, 64) reference tokens after
    the latents (velocity kept for the first N); negative: (txt, pooled, scale 0-d) for
    true CFG, a second forward per step (diffusers `true_cfg_scale`); kv: the references'
    cached keys/values (FLUX.2 KV variant, `Flux2Transformer.reference_kv`) or None (a
    step cache's forward holds its own: `cache.start(kv=)`).

    compile: None -> `compile_enabled()`; a new ControlNet count or IP-Adapter scale
    retraces. forward / negative_forward (default: forward): step caches' `velocity(img,
    txt, timestep, pooled, guidance, rope, controlnet, ip)` for the prompt / negative
    prompt in place of the transformer call. Their skip decisions are made in Python
    between pieces, so the step itself then runs eager and the caches compile their
    pieces (`cache.start(..., compile=)`); `step.compiled` says whether either is.
    branches: the `mx.distributed` group of an mlx.launch run sharing true CFG's branches
    (sampling/ranks.py `split`) or None: with true CFG on, rank 0 evaluates the prompt's
    velocity, rank 1 the negative prompt's (ranks past 1 none), the velocities are
    exchanged (`ranks.all_gather`) and every rank combines them as one process does (the
    same latents bit for bit when the step is not compiled).
    """
    compile = compile_enabled() if compile is None else compile
    negative_forward = negative_forward or forward

    def body(latents, conditioning, img_ids, txt, txt_ids, timestep, pooled, guidance, rope,
             dt, tokens, negative, kv, branch, *, controlnet, ip):
        x, n = model_input(latents, conditioning, tokens), latents.shape[1]

        def velocity(txt, pooled, fwd):
            if fwd is not None:  # a step cache's forward (mlx_edit.sampling.cache)
                return fwd(x, txt, timestep, pooled, guidance, rope, controlnet, ip)[:, :n]
            return forward_transformer(transformer, x, img_ids, txt, txt_ids, timestep,
                                       pooled, guidance, rope, controlnet, ip, kv)[:, :n]

        if branch is not None:  # one true-CFG branch of a split over ranks: its velocity
            return velocity(txt, pooled, forward) if branch == 0 else \
                velocity(negative[0], negative[1], negative_forward)
        v = velocity(txt, pooled, forward)
        v_neg = None if negative is None else \
            velocity(negative[0], negative[1], negative_forward)
        return _guided_euler(latents, v, v_neg, negative, dt)

    fn = traced(body, transformer, compile and forward is None)

    def step(latents, conditioning, img_ids, txt, txt_ids, timestep, pooled, guidance, rope,
             dt, *, controlnet=(), ip=(), tokens=None, negative=None, kv=None) -> mx.array:
        kv = None if kv is None else (list(kv[0]), list(kv[1]))  # mx.compile takes lists
        args = (latents, conditioning, img_ids, txt, txt_ids, timestep, pooled, guidance,
                rope, dt, tokens, negative, kv)
        if branches is None or negative is None:
            return fn(*args, None, controlnet=controlnet, ip=ip)
        rank = branches.rank()
        mine = fn(*args, rank, controlnet=controlnet, ip=ip) if rank < 2 else \
            mx.zeros(latents.shape, latents.dtype)  # a rank past the two branches: idle
        both = all_gather(mine[None], branches)  # (size, B, N, C): the ranks' velocities
        return _guided_euler(latents, both[0], both[1], negative, dt)

    step.compiled = compile  # type: ignore[attr-defined]
    return step


@dataclass(frozen=True)
class StepInputs:
    """What `make_step`'s step takes besides latents, conditioning, timestep and dt, for a
    batch of B: img_ids (N, 3), txt (B, L, joint_dim), txt_ids (L, 3), pooled (B, P),
    guidance (B,) or None, rope of [img_ids | token_ids], ip (IPAdapterKV, batch B),
    tokens (1|B, M, 64) with token_ids (M, 3) or None, negative (txt, pooled, scale) for
    true CFG or None; kv: the references' keys/values (`Flux2Transformer.reference_kv`,
    batch 1|B) in place of tokens (FLUX.2 KV variant) or None."""

    img_ids: mx.array
    txt: mx.array
    txt_ids: mx.array
    pooled: mx.array
    guidance: mx.array | None
    rope: mx.array
    ip: Sequence[IPAdapterKV] = ()
    tokens: mx.array | None = None
    token_ids: mx.array | None = None
    negative: tuple[mx.array, mx.array, mx.array] | None = None
    kv: ReferenceKV | None = None

    def advance(self, step: StepFn, latents: mx.array, conditioning: mx.array | None,
                timestep: mx.array, dt: mx.array,
                controlnet: Sequence[ControlResiduals] = ()) -> mx.array:
        """`step` on these inputs: latents (B, N, 64) at sigma -> at the next sigma."""
        return step(latents, conditioning, self.img_ids, self.txt, self.txt_ids, timestep,
                    self.pooled, self.guidance, self.rope, dt, controlnet=controlnet,
                    ip=self.ip, tokens=self.tokens, negative=self.negative, kv=self.kv)

    def repeated(self, k: int, transformer: FluxTransformer, img_ids: mx.array
                 ) -> StepInputs:
        """These inputs for k copies of the batch stacked on the batch axis (copy-major:
        [copy 0's B items, copy 1's, ...]; tiled denoising's window batches), with other
        image ids (N', 3) and their RoPE."""
        def rep(x):
            return None if x is None else mx.concatenate([x] * k, axis=0) if k > 1 else x
        neg = None if self.negative is None else (
            rep(self.negative[0]), rep(self.negative[1]), self.negative[2])
        ip = [IPAdapterKV([rep(a) for a in kv.k], [rep(a) for a in kv.v], kv.scale)
              for kv in self.ip]

        def rep_rows(x):  # batch 1 serves every copy
            return x if x is None or x.shape[0] == 1 else rep(x)
        kv = None if self.kv is None else ReferenceKV(
            *([tuple(map(rep_rows, pair)) for pair in pairs] for pairs in self.kv))
        return replace(self, img_ids=img_ids, rope=_rope(transformer, img_ids, self.token_ids,
                                                      self.txt_ids), txt=rep(self.txt),
                       pooled=rep(self.pooled), guidance=rep(self.guidance), ip=ip,
                       tokens=rep_rows(self.tokens), negative=neg, kv=kv)


def step_inputs(transformer: FluxTransformer, txt: mx.array, pooled: mx.array,
                img_ids: mx.array, batch: int, guidance: float, *,
                token_ids: mx.array | None = None, tokens: mx.array | None = None,
                ip: Sequence[IPAdapterKV] = (),
                negative: tuple[mx.array, mx.array, float] | None = None,
                reference_kv: bool = False) -> StepInputs:
    """StepInputs for a batch of `batch`: txt (1|batch, L, D) / pooled (1|batch, P) of
    the prompt broadcast (pooled None: a family without one, FLUX.2), text ids with as many
    axes as img_ids (`latents.text_ids`), RoPE of [img_ids | token_ids] built once,
    guidance as (batch,) when the transformer embeds it; negative: (txt, pooled, true CFG
    scale) or None. reference_kv (FLUX.2 KV variant, diffusers Flux2KleinKVPipeline): the
    reference tokens' keys/values are computed here, once per edit (their first step,
    `Flux2Transformer.reference_kv`), and every step attends to them (`StepInputs.kv`)
    instead of carrying the tokens."""
    t_ids = text_ids(txt.shape[1], img_ids.shape[-1])

    def b(x):
        return None if x is None else mx.broadcast_to(x, (batch, *x.shape[1:]))
    g = mx.full((batch,), guidance, dtype=mx.float32) \
        if transformer.config.guidance_embeds else None
    neg = None if negative is None else (
        b(negative[0]), b(negative[1]), mx.array(negative[2], dtype=mx.float32))
    kv = None
    if reference_kv and tokens is not None:
        kv = transformer.reference_kv(tokens, token_ids, None if g is None else g[:1])
        mx.eval(kv)  # evaluated: compiled step-cache pieces take them as constants
        tokens = token_ids = None
    return StepInputs(img_ids, b(txt), t_ids, b(pooled), g,
                      _rope(transformer, img_ids, token_ids, t_ids), tuple(ip), tokens,
                      token_ids, neg, kv)


def _rope(transformer: FluxTransformer, img_ids: mx.array, token_ids: mx.array | None,
          txt_ids: mx.array) -> mx.array:
    ids = img_ids if token_ids is None else mx.concatenate([img_ids, token_ids], axis=0)
    return transformer.rope(ids, txt_ids)
