"""Flow-match schedule and Euler step vs diffusers' FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import json
import types

import mlx.core as mx
import numpy as np
import pytest

from mlx_edit.sampling.sampler import (
    SchedulerConfig,
    compute_mu,
    euler_step,
    flux_sigmas,
    load_scheduler_config,
    model_timesteps,
    noise_latents,
    start_index,
)

# FLUX.1-dev / FLUX.1-Fill-dev scheduler/scheduler_config.json
FLUX_DEV = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
# FLUX.1-schnell: static shift 1.0
FLUX_SCHNELL = {**FLUX_DEV, "shift": 1.0, "use_dynamic_shifting": False}

# (steps, height_px, width_px, strength); 384x640 px is a 48x80 latent grid (960 tokens)
CASES = [
    (28, 1024, 1024, 1.0),
    (50, 384, 640, 1.0),
    (10, 384, 640, 0.7),
    (20, 768, 1344, 0.35),
    (4, 512, 512, 0.3),
    (7, 1360, 768, 0.99),
    (1, 256, 256, 1.0),
    (30, 2048, 1536, 0.05),
]


@pytest.fixture(scope="module")
def ref():
    """diffusers pieces, imported once (the import takes a few seconds)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux_fill import (
        FluxFillPipeline,
        calculate_shift,
        retrieve_timesteps,
    )

    return types.SimpleNamespace(
        torch=torch,
        Scheduler=FlowMatchEulerDiscreteScheduler,
        Pipe=FluxFillPipeline,
        calculate_shift=calculate_shift,
        retrieve_timesteps=retrieve_timesteps,
    )


def reference_schedule(ref, config, steps, height_px, width_px, strength):
    """FluxFillPipeline.__call__ step 4 (schedule) with a stub self for get_timesteps."""
    sched = ref.Scheduler.from_config(config)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    seq = (height_px // 8 // 2) * (width_px // 8 // 2)
    c = sched.config
    mu = ref.calculate_shift(
        seq,
        c.get("base_image_seq_len", 256),
        c.get("max_image_seq_len", 4096),
        c.get("base_shift", 0.5),
        c.get("max_shift", 1.15),
    )
    _, n = ref.retrieve_timesteps(sched, steps, "cpu", sigmas=sigmas, mu=mu)
    timesteps, n = ref.Pipe.get_timesteps(
        types.SimpleNamespace(scheduler=sched), n, strength, "cpu"
    )
    return sched, timesteps, n, seq, mu


@pytest.mark.parity
@pytest.mark.parametrize("steps,height_px,width_px,strength", CASES)
def test_sigmas_match_diffusers(ref, steps, height_px, width_px, strength):
    sched, timesteps, n, seq, mu = reference_schedule(
        ref, FLUX_DEV, steps, height_px, width_px, strength
    )
    cfg = SchedulerConfig.from_dict(FLUX_DEV)
    assert compute_mu(seq, cfg) == mu
    ours = flux_sigmas(steps, seq, cfg, strength)
    want = sched.sigmas[sched.begin_index :].numpy()
    assert ours.dtype == np.float32
    assert ours.shape == (n + 1,) == want.shape
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-7)
    assert ours[-1] == 0.0
    assert start_index(steps, strength) == sched.begin_index
    # the model timestep diffusers feeds: (t.to(latents dtype)) / 1000
    for dtype_t, dtype_m in ((ref.torch.float32, mx.float32), (ref.torch.bfloat16, mx.bfloat16)):
        want_t = (timesteps.to(dtype_t) / 1000).float().numpy()
        got_t = np.array(model_timesteps(ours[:-1], dtype=dtype_m).astype(mx.float32))
        np.testing.assert_array_equal(got_t, want_t)


@pytest.mark.parity
@pytest.mark.parametrize(
    "config",
    [
        FLUX_SCHNELL,
        {**FLUX_DEV, "use_dynamic_shifting": False},  # static shift 3.0
        {**FLUX_DEV, "time_shift_type": "linear"},
        {**FLUX_DEV, "shift_terminal": 0.1},
    ],
)
def test_sigmas_other_configs_match_diffusers(ref, config):
    for steps, h, w, strength in CASES[:4]:
        sched, _, n, seq, _ = reference_schedule(ref, config, steps, h, w, strength)
        ours = flux_sigmas(steps, seq, SchedulerConfig.from_dict(config), strength)
        want = sched.sigmas[sched.begin_index :].numpy()
        assert ours.shape == (n + 1,)
        np.testing.assert_allclose(ours, want, rtol=0, atol=1e-7)


@pytest.mark.parity
@pytest.mark.parametrize("strength", [0.0, 1e-17])
def test_strength_leaving_no_steps_raises_like_diffusers(ref, strength):
    _, _, n, seq, _ = reference_schedule(ref, FLUX_DEV, 10, 512, 512, strength)
    assert n < 1  # diffusers raises ValueError here too
    with pytest.raises(ValueError, match="denoising steps"):
        flux_sigmas(10, seq, SchedulerConfig.from_dict(FLUX_DEV), strength)


def test_flux_sigmas_rejects_bad_arguments():
    cfg = SchedulerConfig()
    for steps, strength in ((0, 1.0), (2.5, 1.0), (10, 1.5), (10, -0.1)):
        with pytest.raises(ValueError):
            flux_sigmas(steps, 256, cfg, strength)


def test_mu_endpoints_and_schedule_shape():
    cfg = SchedulerConfig()
    assert abs(compute_mu(256, cfg) - 0.5) < 1e-12
    assert abs(compute_mu(4096, cfg) - 1.15) < 1e-12
    s = flux_sigmas(28, 4096, cfg)
    assert s.shape == (29,) and s[0] == 1.0 and s[-1] == 0.0
    assert np.all(np.diff(s) < 0)
    # the shift pushes sigmas above the unshifted linspace
    assert np.all(s[1:-1] > np.linspace(1, 1 / 28, 28)[1:])


@pytest.mark.parity
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_euler_step_matches_scheduler_step(ref, strength):
    torch = ref.torch
    sched, timesteps, n, seq, _ = reference_schedule(ref, FLUX_DEV, 8, 384, 640, strength)
    sigmas = flux_sigmas(8, seq, SchedulerConfig.from_dict(FLUX_DEV), strength)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, seq, 64, generator=g)
    ours = mx.array(x.numpy())
    for i, t in enumerate(timesteps):
        v = torch.randn(2, seq, 64, generator=g)
        x = sched.step(v, t, x, return_dict=False)[0]
        ours = euler_step(ours, mx.array(v.numpy()), float(sigmas[i]), float(sigmas[i + 1]))
        assert ours.dtype == mx.float32
        err = np.abs(np.array(ours) - x.numpy()).max() / np.abs(x.numpy()).max()
        assert err <= 1e-6, (i, err)
    assert i == n - 1


@pytest.mark.parity
def test_euler_step_bfloat16_matches_scheduler_step(ref):
    torch = ref.torch
    sched, timesteps, _, seq, _ = reference_schedule(ref, FLUX_DEV, 4, 256, 256, 1.0)
    sigmas = flux_sigmas(4, seq, SchedulerConfig.from_dict(FLUX_DEV))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, seq, 64, generator=g).to(torch.bfloat16)
    v = torch.randn(1, seq, 64, generator=g).to(torch.bfloat16)
    want = sched.step(v, timesteps[0], x, return_dict=False)[0]
    got = euler_step(
        mx.array(x.float().numpy()).astype(mx.bfloat16),
        mx.array(v.float().numpy()).astype(mx.bfloat16),
        float(sigmas[0]),
        float(sigmas[1]),
    )
    assert got.dtype == mx.bfloat16 and want.dtype == torch.bfloat16
    # diffusers rounds dt * velocity to bfloat16 before its float32 add (the 0-d float32 dt
    # does not promote); we keep the product in float32 and round once, so we equal the
    # correctly rounded float32 update and differ from diffusers by at most one bfloat16 ulp
    # of the output plus one of the increment.
    dt = torch.tensor(np.float32(sigmas[1]) - np.float32(sigmas[0]))
    exact = (x.float() + dt * v.float()).to(torch.bfloat16).float().numpy()
    got, want = np.array(got.astype(mx.float32)), want.float().numpy()
    np.testing.assert_array_equal(got, exact)

    def ulp(a):
        return 2.0 ** (np.floor(np.log2(np.maximum(np.abs(a), 1e-30))) - 7)

    inc = (dt * v.float()).numpy()
    assert np.all(np.abs(got - want) <= ulp(np.maximum(np.abs(got), np.abs(want))) + ulp(inc))
    assert np.mean(got == want) > 0.5


@pytest.mark.parity
def test_noise_latents_matches_scale_noise(ref):
    torch = ref.torch
    sched, timesteps, _, seq, _ = reference_schedule(ref, FLUX_DEV, 10, 384, 640, 0.7)
    sigmas = flux_sigmas(10, seq, SchedulerConfig.from_dict(FLUX_DEV), 0.7)
    g = torch.Generator().manual_seed(2)
    image_latents = torch.randn(2, 16, 48, 80, generator=g)
    noise = torch.randn(2, 16, 48, 80, generator=g)
    want = sched.scale_noise(image_latents, timesteps[:1].repeat(2), noise).numpy()
    got = noise_latents(mx.array(image_latents.numpy()), mx.array(noise.numpy()), sigmas[0])
    assert got.dtype == mx.float32
    err = np.abs(np.array(got) - want).max() / np.abs(want).max()
    assert err <= 1e-6, err


def test_euler_step_reaches_data_for_constant_velocity():
    # x_t = (1 - s) x0 + s n has velocity n - x0; Euler over any schedule lands on x0
    x0 = mx.array(np.random.default_rng(0).standard_normal((1, 6, 4)).astype(np.float32))
    n = mx.array(np.random.default_rng(1).standard_normal((1, 6, 4)).astype(np.float32))
    sigmas = flux_sigmas(5, 1024, SchedulerConfig())
    x = noise_latents(x0, n, float(sigmas[0]))
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x = euler_step(x, n - x0, float(s), float(s_next))
    assert np.abs(np.array(x - x0)).max() < 1e-5


def test_load_scheduler_config(tmp_path):
    (tmp_path / "scheduler").mkdir()
    path = tmp_path / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**FLUX_SCHNELL, "some_future_key": 1}))
    for where in (tmp_path, tmp_path / "scheduler", path):
        cfg = load_scheduler_config(where)
        assert cfg.use_dynamic_shifting is False and cfg.shift == 1.0
    with pytest.raises(FileNotFoundError):
        load_scheduler_config(tmp_path / "missing")
    assert SchedulerConfig.from_dict(FLUX_DEV) == SchedulerConfig()


def test_unsupported_schedule_flags_fail_loudly():
    with pytest.raises(NotImplementedError):
        SchedulerConfig.from_dict({**FLUX_DEV, "use_karras_sigmas": True})
    with pytest.raises(ValueError):
        SchedulerConfig.from_dict({**FLUX_DEV, "time_shift_type": "cosine"})
