"""Tiled denoising (mlx_edit.sampling.tiles, MultiDiffusion): window geometry, weights that
sum to 1 at every token, and the loop's windowed step equal to the weighted average of
the windows' steps (and velocities) computed one by one, so no seam logic can drift;
ControlNet inputs cropped per window likewise.

A small random-weight transformer (MLX init, float32) as in test_compile.py; no torch.
"""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_edit.conditioning.controlnet import make_control_fn
from mlx_edit.models.controlnet import ControlNetConfig, FluxControlNet
from mlx_edit.sampling import compiled, tiles
from mlx_edit.sampling.cache import FirstBlockCache
from mlx_edit.sampling.denoise import PromptEmbeds, denoise
from mlx_edit.sampling.latents import image_ids, model_input, text_ids
from contexts import random_transformer

CFG = dict(in_channels=384, out_channels=64, num_layers=1, num_single_layers=1,
           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
           pooled_projection_dim=24, axes_dims_rope=(4, 6, 6))
GH, GW, L, B = 6, 10, 5, 2  # canvas token grid, text tokens, batch
SIGMAS = np.array([1.0, 0.6, 0.0], dtype=np.float32)


@given(gh=st.integers(1, 40), gw=st.integers(1, 40), budget=st.integers(1, 300),
       overlap=st.integers(0, 12), kind=st.sampled_from(tiles.RAMPS))
@settings(max_examples=150, deadline=None)
def test_weights_sum_to_one_everywhere(gh, gw, budget, overlap, kind):
    w = tiles.plan_windows((gh, gw), budget, overlap, kind)
    h, ww = w.size
    assert h * ww <= max(budget, 1) or (h, ww) == (gh, gw) and gh * gw <= budget
    assert h <= gh and ww <= gw
    assert (w.weights > 0).all()
    np.testing.assert_allclose(w.coverage(), 1.0, atol=1e-6)
    for t, left in w.origins:  # inside the canvas
        assert 0 <= t <= gh - h and 0 <= left <= gw - ww


def test_geometry_examples():
    assert tiles.axis_starts(10, 10, 2) == [0]
    assert tiles.axis_starts(10, 4, 2) == [0, 2, 4, 6]
    starts = tiles.axis_starts(169, 64, 16)  # a 2704 px wide window, 1024 px windows
    assert starts[0] == 0 and starts[-1] == 169 - 64 and len(starts) == 4
    assert min(a + 64 - b for a, b in zip(starts, starts[1:])) >= 16
    assert tiles.window_shape((64, 64), 4096) == (64, 64)  # fits: one window
    assert tiles.window_shape((135, 169), 4096) == (57, 71)  # the grid's aspect
    assert tiles.window_shape((20, 300), 4096) == (20, 40)  # aspect capped at 2
    one = tiles.plan_windows((6, 10), 60, 2)
    assert one.count == 1 and (one.weights == 1.0).all()
    r = tiles.ramp(5, "linear")
    np.testing.assert_allclose(r + r[::-1], 1.0)
    c = tiles.ramp(5, "cosine")
    np.testing.assert_allclose(c + c[::-1], 1.0)
    with pytest.raises(ValueError, match="ramp"):
        tiles.ramp(3, "gaussian")


def test_ramp_values_and_edge_orientation():
    """The documented ramps (cosine by default) and their orientation: a window's weights
    rise over its left overlap and fall over its right one; an empty grid is refused."""
    np.testing.assert_allclose(tiles.ramp(3), np.sin(np.pi / 8 * np.arange(1, 4)) ** 2)
    np.testing.assert_allclose(tiles.ramp(3, "linear"), [0.25, 0.5, 0.75])
    first, second = tiles.axis_weights([0, 2], 4, "linear")
    np.testing.assert_allclose(first, [1, 1, 2 / 3, 1 / 3])
    np.testing.assert_allclose(second, [1 / 3, 2 / 3, 1, 1])
    for grid, budget in (((0, 5), 10), ((5, 0), 10), ((4, 4), 0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            tiles.window_shape(grid, budget)


@pytest.fixture(scope="module")
def setup():
    model, keys = random_transformer(CFG)
    n = GH * GW
    latents = mx.random.normal((B, n, 64), key=next(keys))
    cond = mx.random.normal((1, n, 320), key=next(keys))
    embeds = PromptEmbeds(mx.random.normal((1, L, 48), key=next(keys)),
                          mx.random.normal((1, 24), key=next(keys)))
    return model, latents, cond, embeds


def _run(model, latents, cond, embeds, windows=None, **kw):
    steps = list(denoise(model, latents, cond, image_ids(GH, GW), embeds, SIGMAS, 30.0,
                         windows=windows, compile=False, **kw))
    return np.array(steps[-1][1])


@pytest.mark.parametrize("batch", [1, 2])
def test_one_window_covering_the_canvas_is_the_plain_loop(setup, batch):
    model, latents, cond, embeds = setup
    one = tiles.plan_windows((GH, GW), GH * GW, 2, batch=batch)
    assert one.count == 1
    np.testing.assert_array_equal(_run(model, latents, cond, embeds, one),
                                  _run(model, latents, cond, embeds))


def _windows_one_by_one(model, latents, cond, embeds, windows):
    """(weighted average of the windows' next latents, of their velocities) of step 0,
    each window run alone with 0-based ids: the definition, written independently."""
    (h, w), c = windows.size, latents.shape[-1]
    grid = np.array(latents).reshape(B, GH, GW, c)
    cgrid = np.array(cond).reshape(1, GH, GW, -1)
    step = compiled.make_step(model, compile=False)
    ids, t_ids = image_ids(h, w), text_ids(L)
    rope = model.rope(ids, t_ids)
    txt = mx.broadcast_to(embeds.txt, (B, L, 48))
    pooled = mx.broadcast_to(embeds.pooled, (B, 24))
    t, g = mx.full((B,), float(SIGMAS[0])), mx.full((B,), 30.0)
    nxt, vel = np.zeros_like(grid), np.zeros_like(grid)
    for (top, left), wk in zip(windows.origins, windows.weights):
        x = mx.array(grid[:, top:top + h, left:left + w].reshape(B, h * w, c))
        k = mx.array(cgrid[:, top:top + h, left:left + w].reshape(1, h * w, -1))
        y = step(x, k, ids, txt, t_ids, t, pooled, g, rope,
                 compiled.step_dt(SIGMAS[0], SIGMAS[1]))
        v = model(model_input(x, k), ids, txt, t_ids, t, pooled, g, rope=rope)
        wk = wk.reshape(1, h, w, 1)
        nxt[:, top:top + h, left:left + w] += wk * np.array(y).reshape(B, h, w, c)
        vel[:, top:top + h, left:left + w] += wk * np.array(v).reshape(B, h, w, c)
    return nxt.reshape(B, -1, c), vel.reshape(B, -1, c)


@pytest.mark.parametrize("batch", [1, 3])
def test_windowed_step_is_the_weighted_average_of_window_steps(setup, batch):
    model, latents, cond, embeds = setup
    windows = tiles.plan_windows((GH, GW), 24, 2, batch=batch)  # 4x6 windows
    assert windows.count > 2 and windows.size == (4, 6)
    stats = {}
    got = next(iter(denoise(model, latents, cond, image_ids(GH, GW), embeds, SIGMAS, 30.0,
                            windows=windows, compile=False, stats=stats)))[1]
    got = np.array(got)
    assert stats["transformer_evals"] == windows.count  # one evaluation per window
    expected, velocity = _windows_one_by_one(model, latents, cond, embeds, windows)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() / scale < 1e-5
    # Euler is linear: the same as latents + dt * (weighted average of the velocities)
    euler = np.array(latents) + (SIGMAS[1] - SIGMAS[0]) * velocity
    assert np.abs(got - euler).max() / scale < 1e-5


def test_windows_refuse_a_step_cache(setup):
    model, latents, cond, embeds = setup
    windows = tiles.plan_windows((GH, GW), 24, 2)
    with pytest.raises(ValueError, match="step cache and tiled"):
        _run(model, latents, cond, embeds, windows, cache=FirstBlockCache(0.1))


@pytest.fixture(scope="module")
def controlnet(setup):
    """A random ControlNet of the transformer's widths, its ControlFn for the loop (the
    pipeline's make_control_fn) and its control term (1, N, hidden)."""
    _, _, _, embeds = setup
    net = FluxControlNet(ControlNetConfig.from_dict(dict(
        CFG, in_channels=64, num_layers=1, num_single_layers=1, guidance_embeds=True)))
    mx.eval(net.parameters())
    control_cond = mx.random.normal((1, GH * GW, 64), key=mx.random.key(9))
    ctx = SimpleNamespace(num_steps=len(SIGMAS) - 1, embeds=embeds, guidance=30.0,
                          plan=SimpleNamespace(model_size=(GW * 16, GH * 16)))
    spec = SimpleNamespace(start=0.0, end=1.0, label="test", guidance=None, scale=0.8)
    return net, make_control_fn(net, control_cond, None, spec, ctx), \
        net.embed_control(control_cond)


def test_controlnet_inputs_are_cropped_per_window(setup, controlnet):
    """One window = the plain loop exactly; several = the weighted average of the windows'
    steps, each with the ControlNet run on its own crops and 0-based ids."""
    model, latents, cond, embeds = setup
    net, control_fn, control = controlnet
    one = tiles.plan_windows((GH, GW), GH * GW, 2)
    np.testing.assert_array_equal(
        _run(model, latents, cond, embeds, one, controls=[control_fn]),
        _run(model, latents, cond, embeds, controls=[control_fn]))
    windows = tiles.plan_windows((GH, GW), 24, 2, batch=2)
    got = np.array(next(iter(denoise(model, latents, cond, image_ids(GH, GW), embeds, SIGMAS,
                                     30.0, windows=windows, controls=[control_fn],
                                     compile=False)))[1])
    (h, w), c = windows.size, 64
    step = compiled.make_step(model, compile=False)
    ids, t_ids = image_ids(h, w), text_ids(L)
    txt, pooled = mx.broadcast_to(embeds.txt, (B, L, 48)), mx.broadcast_to(embeds.pooled, (B, 24))
    t, g = mx.full((B,), float(SIGMAS[0])), mx.full((B,), 30.0)
    expected = np.zeros((B, GH, GW, c), np.float32)
    for origin, wk in zip(windows.origins, windows.weights):
        x = tiles.crop(latents, (GH, GW), origin, (h, w))
        k = tiles.crop(cond, (GH, GW), origin, (h, w))
        r = net(x, ids, txt, t, pooled, g, control=tiles.crop(control, (GH, GW), origin, (h, w)),
                scale=0.8, rope=net.rope(ids, L))
        y = step(x, k, ids, txt, t_ids, t, pooled, g, model.rope(ids, t_ids),
                 compiled.step_dt(SIGMAS[0], SIGMAS[1]), controlnet=[r])
        top, left = origin
        expected[:, top:top + h, left:left + w] += \
            wk.reshape(1, h, w, 1) * np.array(y).reshape(B, h, w, c)
    expected = expected.reshape(B, -1, c)
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-5


def test_windows_with_reference_tokens_and_true_cfg(setup):
    """Kontext-like reference tokens are appended to every window; true CFG batches the
    negative prompt per window: one window still equals the plain loop exactly."""
    model, latents, cond, embeds = setup
    tokens = mx.random.normal((1, 8, 384), key=mx.random.key(5))
    token_ids = mx.concatenate([mx.ones((8, 1)), image_ids(2, 4)[:, 1:]], axis=1)
    neg = PromptEmbeds(embeds.txt * 0.5, embeds.pooled * 0.5)
    kw = dict(tokens=tokens, token_ids=token_ids, negative=neg, true_cfg_scale=2.0)
    one = tiles.plan_windows((GH, GW), GH * GW, 2)
    np.testing.assert_array_equal(_run(model, latents, cond, embeds, one, **kw),
                                  _run(model, latents, cond, embeds, **kw))
    several = _run(model, latents, cond, embeds, tiles.plan_windows((GH, GW), 24, 2, batch=2),
                   **kw)
    assert np.isfinite(several).all() and several.shape == (B, GH * GW, 64)


def _corner_mask() -> np.ndarray:
    keep = np.zeros((GH, GW), bool)
    keep[0:2, 0:3] = True  # only the top-left window (of 2 x 2) holds mask tokens
    return keep


def test_windows_without_mask_tokens_are_skipped_weights_unchanged_on_the_mask():
    full = tiles.plan_windows((GH, GW), 24, 2)
    keep = _corner_mask()
    kept = tiles.plan_windows((GH, GW), 24, 2, keep=keep)
    assert (full.count, kept.count) == (4, 1)
    assert kept.covered.sum() == 4 * 6 and kept.covered[keep].all()
    np.testing.assert_array_equal(kept.coverage()[kept.covered], 1.0)
    # on mask tokens the kept window's weights are the full plan's, bit for bit
    (t, left), (h, w) = kept.origins[0], kept.size
    k = full.origins.index((t, left))
    on = keep[t:t + h, left:left + w].reshape(-1)
    np.testing.assert_array_equal(kept.weights[0][on], full.weights[k][on])


def test_skipped_windows_equal_the_unskipped_run_where_the_source_is_kept(setup):
    """With the source kept outside the mask (keep_source, Kontext with a mask), a run
    that skips the windows without mask tokens equals the run that evaluates them all,
    exactly (window batch 1: the same evaluations on the same crops), with a quarter of
    the transformer evaluations: the skipped windows' tokens are reset to the source at
    every step anyway."""
    from mlx_edit.sampling.denoise import keep_source
    from mlx_edit.sampling.latents import pack_latent_mask

    model, latents, cond, embeds = setup
    keep = _corner_mask()
    pixels = np.kron(keep, np.ones((16, 16))).astype(np.float32)  # 16 px per token
    source = mx.random.normal((1, GH * GW, 64), key=mx.random.key(7))
    hook = keep_source(pack_latent_mask(mx.array(pixels)[None]), source, latents, SIGMAS)
    runs = {}
    for name, windows in (("all", tiles.plan_windows((GH, GW), 24, 2)),
                          ("kept", tiles.plan_windows((GH, GW), 24, 2, keep=keep))):
        stats = {}
        runs[name] = _run(model, latents, cond, embeds, windows, after_step=hook,
                          stats=stats)
        runs[name + "_evals"] = stats["transformer_evals"]
    np.testing.assert_array_equal(runs["kept"], runs["all"])
    assert (runs["all_evals"], runs["kept_evals"]) == (8, 2)  # 4 and 1 windows x 2 steps


def test_tokens_no_window_covers_keep_their_latents_in_the_loop(setup):
    """Without a hook, tokens outside every kept window are not evaluated: they keep
    their latents through the loop (the pipeline then sets them to the source's,
    large.fill_uncovered); covered tokens are denoised as usual."""
    from mlx_edit.editing import large

    model, latents, cond, embeds = setup
    kept = tiles.plan_windows((GH, GW), 24, 2, keep=_corner_mask())
    got = _run(model, latents, cond, embeds, kept)
    out = kept.covered.reshape(-1)
    np.testing.assert_array_equal(got[:, ~out], np.array(latents)[:, ~out])
    assert not np.allclose(got[:, out], np.array(latents)[:, out])
    source = mx.random.normal((1, GH * GW, 64), key=mx.random.key(3))
    filled = np.array(large.fill_uncovered(mx.array(got), kept, source))
    np.testing.assert_array_equal(filled[:, ~out], np.broadcast_to(np.array(source)[:, ~out],
                                                                 filled[:, ~out].shape))
    np.testing.assert_array_equal(filled[:, out], got[:, out])
