"""The compiled denoising step (mlx_edit/compiled.py) gives the uncompiled step's result.

A small random-weight transformer (MLX init, float32) runs three Euler steps three ways:
the pipeline's own loop body (transformer + sampler.euler_step), `make_step(compile=False)`
and `make_step(compile=True)`; with ControlNet residuals and an IP-Adapter too.
"""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest

from mlx_edit.sampling import compiled
from mlx_edit.sampling.latents import image_ids, model_input, text_ids
from mlx_edit.models.layers import ControlResiduals, IPAdapterKV
from mlx_edit.sampling.sampler import euler_step
from contexts import random_transformer

CFG = dict(in_channels=384, out_channels=64, num_layers=2, num_single_layers=2,
           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
           pooled_projection_dim=24, axes_dims_rope=(4, 6, 6))
SIGMAS = np.array([1.0, 0.75, 0.4, 0.0], dtype=np.float32)
H, W, L, B = 4, 6, 7, 2  # token grid, text tokens, batch


@pytest.fixture(scope="module")
def setup():
    model, keys = random_transformer(CFG)
    n, hidden = H * W, model.config.hidden_size
    args = dict(
        latents=mx.random.normal((B, n, 64), key=next(keys)),
        conditioning=mx.random.normal((1, n, 320), key=next(keys)),
        img_ids=image_ids(H, W), txt=mx.random.normal((B, L, 48), key=next(keys)),
        txt_ids=text_ids(L), pooled=mx.random.normal((B, 24), key=next(keys)),
        guidance=mx.full((B,), 30.0),
    )
    args["rope"] = model.rope(args["img_ids"], args["txt_ids"])
    residuals = [mx.random.normal((B, n, hidden), key=next(keys)) * 0.1 for _ in range(3)]
    kv = mx.random.normal((2, B, 2, 5, 16), key=next(keys))
    extras = dict(
        controlnet=[ControlResiduals(double=residuals[:2], single=residuals[2:])],
        ip=[IPAdapterKV(k=[kv[0], kv[0]], v=[kv[1], kv[1]], scale=[0.5, 0.7])],
    )
    return model, args, extras


def reference_loop(model, a, controlnet=(), ip=()):
    """The body of pipeline.denoise, step by step."""
    latents = a["latents"]
    for i in range(len(SIGMAS) - 1):
        t = mx.full((B,), float(SIGMAS[i]))
        v = model(model_input(latents, a["conditioning"]), a["img_ids"], a["txt"],
                  a["txt_ids"], t, a["pooled"], a["guidance"], controlnet=list(controlnet),
                  ip=list(ip), rope=a["rope"])
        latents = euler_step(latents, v, float(SIGMAS[i]), float(SIGMAS[i + 1]))
    return np.array(latents)


def step_loop(step, a, controlnet=(), ip=()):
    latents = a["latents"]
    for i in range(len(SIGMAS) - 1):
        t = mx.full((latents.shape[0],), float(SIGMAS[i]))
        latents = step(latents, a["conditioning"], a["img_ids"], a["txt"], a["txt_ids"], t,
                       a["pooled"], a["guidance"], a["rope"],
                       compiled.step_dt(SIGMAS[i], SIGMAS[i + 1]), controlnet=controlnet, ip=ip)
        mx.eval(latents)
    return np.array(latents)


def rel(x, ref) -> float:
    return float(np.abs(x - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("with_extras", [False, True])
def test_compiled_step_equals_uncompiled(setup, with_extras):
    model, a, extras = setup
    kw = extras if with_extras else {}
    ref = reference_loop(model, a, **kw)
    eager = step_loop(compiled.make_step(model, compile=False), a, **kw)
    fused = step_loop(compiled.make_step(model, compile=True), a, **kw)
    np.testing.assert_array_equal(eager, ref)  # the same graph, op for op
    assert rel(fused, ref) <= 1e-5  # fusion may reorder float math
    assert rel(fused, reference_loop(model, a)) > 1e-3 or not with_extras  # extras matter


def test_compiled_step_traces_once_per_shape(setup, monkeypatch):
    model, a, _ = setup
    traces = []
    original = compiled.model_input
    monkeypatch.setattr(compiled, "model_input",
                        lambda *x: traces.append(1) or original(*x))
    step = compiled.make_step(model, compile=True)
    step_loop(step, a)  # three steps, three sigmas: one trace
    assert len(traces) == 1
    b1 = {k: (v[:1] if k in ("latents", "txt", "pooled", "guidance") else v)
          for k, v in a.items()}
    step_loop(step, b1)  # a new batch size retraces once
    assert len(traces) == 2


def test_compiled_step_sees_updated_weights(setup):
    model, a, _ = setup
    step = compiled.make_step(model, compile=True)
    before = step_loop(step, a)
    saved = model.final_layer.linear.bias
    model.final_layer.linear.bias = saved + 1.0
    try:
        after = step_loop(step, a)
        eager = step_loop(compiled.make_step(model, compile=False), a)
    finally:
        model.final_layer.linear.bias = saved
    assert rel(after, eager) <= 1e-5 and rel(after, before) > 1e-3


def test_compile_switch(monkeypatch, setup):
    model = setup[0]
    monkeypatch.setenv("MLX_EDIT_COMPILE", "0")
    assert compiled.make_step(model).compiled is False
    monkeypatch.setenv("MLX_EDIT_COMPILE", "1")
    assert compiled.make_step(model).compiled is True
    monkeypatch.delenv("MLX_EDIT_COMPILE")
    # default: off on the CPU backend (measured slower there), on for a GPU
    assert compiled.compile_enabled() is (mx.default_device() == mx.gpu)
