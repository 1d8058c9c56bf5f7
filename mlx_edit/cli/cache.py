"""The `--cache` option of `mlx-edit inpaint|outpaint|restyle`: a step cache spec.

    --cache fbc:0.12                       First Block Cache, threshold 0.12
    --cache taylorseer:5,before=3,order=1  TaylorSeer, cache_interval 5 (also: after=N,
                                           dtype=bfloat16|float32, lite)
    --cache mag:0.06,max_skip=3            MagCache with FLUX.1-dev's magnitude ratios
                                           (also: retention=0.2, calibrate)

The first bare value is the main setting (threshold, or cache_interval for TaylorSeer);
`key=value` items accept diffusers' field names or the short names above. Settings mean
what they mean in diffusers' FirstBlockCacheConfig / TaylorSeerCacheConfig / MagCacheConfig
(mlx_edit/sampling/cache.py, parsed by sampling/cache_spec.py).
"""

from __future__ import annotations

import click

class CacheSpec(click.ParamType):
    name = "KIND[:VALUE][,KEY=VALUE...]"

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        from mlx_edit.sampling.cache_spec import parse_cache

        try:
            return parse_cache(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def cache_summary(stats: dict) -> str:
    """'  evals 20/28' (run / steps) for the phase line of an edit with a cache, else ''."""
    if "cache_steps" not in stats:
        return ""
    total = stats["transformer_evals"] + stats["transformer_skipped"]
    return f"  evals {stats['transformer_evals']}/{total}"
