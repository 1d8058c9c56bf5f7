"""Flow-match Euler sampling for FLUX: the shifted sigma schedule and the Euler step.

Reproduces diffusers' `FlowMatchEulerDiscreteScheduler` (schedulers/
scheduling_flow_match_euler_discrete.py) as configured by FLUX.1 checkpoints, together with
the schedule logic of `FluxFillPipeline.__call__` (pipelines/flux/pipeline_flux_fill.py:
`calculate_shift`, `retrieve_timesteps`, `get_timesteps`).

Conventions:
- `sigmas` run from ~1 (pure noise) down to 0 and carry the trailing 0, so step i goes from
  `sigmas[i]` to `sigmas[i + 1]` and there are `len(sigmas) - 1` steps.
- The transformer's `timestep` argument is sigma itself (a value in [0, 1]): the FLUX model
  multiplies it by 1000 inside its timestep embedding. diffusers passes
  `(1000 * sigma) / 1000`, rounded through float32 (and through the latents' dtype);
  `model_timesteps` reproduces that rounding bit for bit.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import mlx.core as mx
import numpy as np

SCHEDULER_CONFIG_NAME = "scheduler_config.json"


@dataclass
class SchedulerConfig:
    """`FlowMatchEulerDiscreteScheduler` settings.

    Defaults are FLUX.1-dev's (and FLUX.1-Fill-dev's) `scheduler/scheduler_config.json`;
    note `shift` (3.0) only matters when `use_dynamic_shifting` is False (FLUX.1-schnell:
    shift 1.0, no dynamic shifting). Flags that select schedules FLUX never uses (Karras,
    exponential, beta sigmas, inverted sigmas, stochastic sampling) are read so that a
    config setting them fails loudly instead of silently sampling a different schedule.
    """

    base_image_seq_len: int = 256
    base_shift: float = 0.5
    max_image_seq_len: int = 4096
    max_shift: float = 1.15
    num_train_timesteps: int = 1000
    shift: float = 3.0
    use_dynamic_shifting: bool = True
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None
    invert_sigmas: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    stochastic_sampling: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):  # a damaged config fails here, not in the first edit
            v, kind = getattr(self, f.name), str(f.type)
            if kind == "bool" and not isinstance(v, bool):
                raise ValueError(f"{f.name} must be true or false, got {v!r}")
            if kind in ("int", "float", "float | None") and not (
                    (v is None and "None" in kind) or (
                        isinstance(v, (int, float)) and not isinstance(v, bool)
                        and math.isfinite(v) and v >= 0)):
                raise ValueError(f"{f.name} must be a finite number >= 0, got {v!r}")
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(
                f"time_shift_type must be 'exponential' or 'linear', got {self.time_shift_type!r}"
            )
        unsupported = [
            name
            for name in (
                "invert_sigmas",
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "stochastic_sampling",
            )
            if getattr(self, name)
        ]
        if unsupported:
            raise NotImplementedError(f"scheduler options not supported: {unsupported}")

    @classmethod
    def from_dict(cls, d: dict) -> SchedulerConfig:
        """Build from a scheduler config dict; keys that are not fields are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def load_scheduler_config(path: str | Path) -> SchedulerConfig:
    """Read `scheduler_config.json` from a file path, a `scheduler/` folder or a model root.

    Raises FileNotFoundError naming the paths tried when no config is found.
    """
    path = Path(path)
    candidates = (
        [path]
        if path.is_file()
        else [
            path / SCHEDULER_CONFIG_NAME,
            path / "scheduler" / SCHEDULER_CONFIG_NAME,
        ]
    )
    for candidate in candidates:
        if candidate.is_file():
            return SchedulerConfig.from_dict(json.loads(candidate.read_text()))
    raise FileNotFoundError(f"no scheduler config found; tried {[str(c) for c in candidates]}")


def compute_mu(image_seq_len: int, cfg: SchedulerConfig) -> float:
    """Resolution-dependent shift `mu`, linear in the packed image token count.

    `image_seq_len` is (H/16)(W/16) for an H x W pixel image. Same float64 arithmetic, in the
    same order, as diffusers `calculate_shift` (pipeline_flux_fill.py); 1.15 at 1024x1024.
    """
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    b = cfg.base_shift - m * cfg.base_image_seq_len
    return image_seq_len * m + b


def empirical_mu(image_seq_len: int, steps: int) -> float:
    """FLUX.2's shift `mu`, fitted on the image token count and the number of steps
    (diffusers pipelines/flux2/pipeline_flux2_klein.py `compute_empirical_mu`, same float
    arithmetic): linear in the tokens above 4300, else interpolated between the fits at
    10 and 200 steps."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200, m_10 = a2 * image_seq_len + b2, a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * steps + (m_200 - 200.0 * a))


def _shift_sigmas(sigmas: np.ndarray, mu: float, cfg: SchedulerConfig) -> np.ndarray:
    # Mirrors set_timesteps steps 2-3 on a float32 array; numpy keeps float32 throughout
    # (Python scalars are weak), exactly as in diffusers.
    if cfg.use_dynamic_shifting:
        if cfg.time_shift_type == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
    else:
        sigmas = cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)
    if cfg.shift_terminal:
        one_minus_z = 1 - sigmas
        scale_factor = one_minus_z[-1] / (1 - cfg.shift_terminal)
        sigmas = 1 - (one_minus_z / scale_factor)
    return sigmas.astype(np.float32)


def start_index(steps: int, strength: float) -> int:
    """Index of the first sigma used at `strength` (diffusers `get_timesteps`).

    `t_start = int(max(steps - min(steps * strength, steps), 0))`, with the same float
    arithmetic, so e.g. steps=10, strength=0.7 gives t_start=2 (10*0.7 is 7.000000000000001).
    """
    init_timestep = min(steps * strength, steps)
    return int(max(steps - init_timestep, 0))


def flux_sigmas(
    steps: int, image_seq_len: int, cfg: SchedulerConfig, strength: float = 1.0,
    mu: float | None = None,
) -> np.ndarray:
    """The sigma schedule FluxFillPipeline samples with, trailing 0 included.

    Args:
        steps: num_inference_steps N >= 1 before strength truncation.
        image_seq_len: packed image tokens, (H/16)(W/16) for H x W pixels.
        cfg: scheduler settings (`load_scheduler_config`).
        strength: in [0, 1]; 1 denoises from pure noise. Below 1 the first
            `start_index(N, strength)` sigmas are dropped, as diffusers `get_timesteps` does.
        mu: the shift; None: `compute_mu(image_seq_len, cfg)` (FLUX.1). FLUX.2 passes
            `empirical_mu(image_seq_len, steps)`.

    Returns:
        float32 numpy array of shape (n + 1,), n = N - t_start steps: `linspace(1, 1/N, N)`
        (float64, then cast to float32 as `set_timesteps` does), shifted in float32 by
        `exp(mu) / (exp(mu) + 1/sigma - 1)` (or the static `shift` when dynamic shifting is
        off), then a 0 appended; `[t_start:]` of that.

    Raises:
        ValueError: steps < 1, strength outside [0, 1], or strength so small that no step
            remains (diffusers raises in that case too).
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    steps = int(steps)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    sigmas = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    mu = compute_mu(image_seq_len, cfg) if mu is None else mu
    sigmas = _shift_sigmas(sigmas, mu, cfg)
    sigmas = np.concatenate([sigmas, np.zeros(1, dtype=np.float32)])
    t_start = start_index(steps, strength)
    if steps - t_start < 1:
        raise ValueError(
            f"strength {strength} with {steps} steps leaves {steps - t_start} denoising steps; "
            f"raise strength to at least {1 / steps:.4g} or use more steps"
        )
    return sigmas[t_start:]


def model_timesteps(
    sigmas: np.ndarray, num_train_timesteps: int = 1000, dtype: mx.Dtype = mx.float32
) -> mx.array:
    """The transformer `timestep` values diffusers feeds for each sigma, shape (len(sigmas),).

    diffusers stores `t = float32(sigma * 1000)`, casts it to the latents' dtype and divides
    by 1000 in that dtype (pipeline_flux_fill.py denoising loop); the result equals sigma up
    to rounding. Pass the step sigmas (usually `sigmas[:-1]`).
    """
    t = np.asarray(sigmas, dtype=np.float32) * np.float32(num_train_timesteps)
    return mx.array(t).astype(dtype) / num_train_timesteps


def euler_step(latents: mx.array, velocity: mx.array, sigma: float, sigma_next: float) -> mx.array:
    """One flow-match Euler step: `latents + (sigma_next - sigma) * velocity`.

    Args:
        latents: (B, N, C) packed latents at noise level `sigma`, any float dtype.
        velocity: transformer output, same shape as latents.
        sigma, sigma_next: consecutive entries of `flux_sigmas` (floats).

    Returns:
        Latents at `sigma_next`, computed in float32 and cast back to `latents.dtype`, as
        diffusers `FlowMatchEulerDiscreteScheduler.step` upcasts (it casts to the model
        output's dtype, which is the latents' dtype in the FLUX pipelines). Identical to
        diffusers in float32. With bfloat16 velocity diffusers rounds `dt * velocity` to
        bfloat16 before its float32 add (its 0-d float32 dt does not promote; on CPU dt too);
        we round once at the end, so bfloat16 results may differ by one ulp.
    """
    dt = np.float32(sigma_next) - np.float32(sigma)
    out = latents.astype(mx.float32) + mx.array(dt) * velocity.astype(mx.float32)
    return out.astype(latents.dtype)


def noise_latents(image_latents: mx.array, noise: mx.array, sigma: float) -> mx.array:
    """Forward flow-matching process `sigma * noise + (1 - sigma) * image_latents`.

    Used for strength < 1 with `sigma = flux_sigmas(...)[0]` (diffusers `scale_noise`, via
    `prepare_latents`). Works on packed or unpacked latents of any shape; noise has the same
    shape. Like diffusers, sigma is cast to the latents' dtype and the result keeps that dtype.
    """
    s = mx.array(sigma, dtype=image_latents.dtype)
    return s * noise.astype(image_latents.dtype) + (1.0 - s) * image_latents
