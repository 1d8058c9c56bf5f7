"""diffusers' cache hooks for the step-cache parity tests (tests/test_cache*.py): our cache
configs as diffusers' configs, and the hooks' per-call decision read from their state."""

from __future__ import annotations

import mlx.core as mx
import torch
from diffusers import hooks

from mlx_edit.sampling.cache import FirstBlockCache, MagCache, TaylorSeer


def diffusers_config(cfg, steps: int):
    """The diffusers FirstBlockCacheConfig / TaylorSeerCacheConfig / MagCacheConfig with
    the same settings as our `cfg` (MagCache over `steps` inference steps)."""
    if isinstance(cfg, FirstBlockCache):
        return hooks.FirstBlockCacheConfig(threshold=cfg.threshold)
    if isinstance(cfg, MagCache):
        return hooks.MagCacheConfig(
            threshold=cfg.threshold, max_skip_steps=cfg.max_skip_steps,
            retention_ratio=cfg.retention_ratio, num_inference_steps=steps,
            mag_ratios=list(cfg.mag_ratios))
    assert isinstance(cfg, TaylorSeer)
    dtype = {mx.bfloat16: torch.bfloat16, mx.float32: torch.float32}[cfg.taylor_factors_dtype]
    return hooks.TaylorSeerCacheConfig(
        cache_interval=cfg.cache_interval, disable_cache_before_step=cfg.disable_cache_before_step,
        disable_cache_after_step=cfg.disable_cache_after_step, max_order=cfg.max_order,
        taylor_factors_dtype=dtype, use_lite_mode=cfg.use_lite_mode,
        cache_identifiers=cfg.cache_identifiers,
        skip_predict_identifiers=cfg.skip_predict_identifiers)


def decision(transformer, cfg) -> bool:
    """Whether the hooks computed the call that just ran, read from their state in the
    current cache context (call it inside the transformer's `cache_context`)."""
    if isinstance(cfg, TaylorSeer):
        hook = next(h for m in transformer.modules() if getattr(m, "_diffusers_hook", None)
                    and (h := m._diffusers_hook.get_hook("taylorseer_cache")))
        state = hook.state_manager.get_state()  # every hooked unit decides alike
        return state.last_update_step == state.current_step
    name = "fbc_leader_block_hook" if isinstance(cfg, FirstBlockCache) else "mag_cache_leader_block_hook"
    hook = transformer.transformer_blocks[0]._diffusers_hook.get_hook(name)
    return hook.state_manager.get_state().should_compute


def pattern(decisions) -> str:
    """Decisions as our stats' `cache_steps`: C computed, s skipped or predicted."""
    return "".join("C" if d else "s" for d in decisions)
