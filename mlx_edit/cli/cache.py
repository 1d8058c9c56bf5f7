"""The `--cache` option of `mlx-edit inpaint|outpaint|restyle`: a step cache spec.

    --cache fbc:0.12                       First Block Cache, threshold 0.12
    --cache taylorseer:5,before=3,order=1  TaylorSeer, cache_interval 5 (also: after=N,
                                           dtype=bfloat16|float32, lite)
    --cache mag:0.06,max_skip=3            MagCache with FLUX.1-dev's magnitude ratios
                                           (also: retention=0.2, calibrate)

The first bare value is the main setting (threshold, or cache_interval for TaylorSeer);
`key=value` items accept diffusers' field names or the short names above. Settings mean
what they mean in diffusers' FirstBlockCacheConfig / TaylorSeerCacheConfig / MagCacheConfig
(mlx_edit/sampling/cache.py).
"""

from __future__ import annotations

from collections.abc import Callable

import click

KINDS = {"fbc": "threshold", "taylorseer": "cache_interval", "mag": "threshold"}
ALIASES = {
    "fbc": {},
    "taylorseer": {"interval": "cache_interval", "before": "disable_cache_before_step",
                   "after": "disable_cache_after_step", "order": "max_order",
                   "dtype": "taylor_factors_dtype", "lite": "use_lite_mode"},
    "mag": {"max_skip": "max_skip_steps", "retention": "retention_ratio"},
}
_FLAGS = {"use_lite_mode", "calibrate"}


def _value(field: str, text: str):
    import mlx.core as mx

    if field in _FLAGS:
        if text.lower() not in ("1", "true", "yes", "on"):
            raise ValueError(f"{field} is a flag: give it alone or =true")
        return True
    if field == "taylor_factors_dtype":
        dtypes = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32,
                  "none": None}
        if text.lower() not in dtypes:
            raise ValueError(f"dtype must be one of {', '.join(dtypes)}")
        return dtypes[text.lower()]
    if field in ("threshold", "retention_ratio"):
        return float(text)
    return int(text)


def parse_cache(spec: str):
    """`kind[:value][,key=value...]` -> a cache config (mlx_edit.sampling.cache).
    Raises ValueError naming what is wrong."""
    from mlx_edit.sampling.cache import FLUX_MAG_RATIOS, FirstBlockCache, MagCache, TaylorSeer

    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise ValueError(f"unknown cache {kind!r}: use {', '.join(KINDS)}")
    cls = {"fbc": FirstBlockCache, "taylorseer": TaylorSeer, "mag": MagCache}[kind]
    names = set(cls.__dataclass_fields__) - {"mag_ratios", "skip_predict_identifiers",
                                             "cache_identifiers", "num_inference_steps"}
    kwargs: dict = {}
    for i, item in enumerate(p.strip() for p in rest.split(",") if p.strip()):
        key, eq, text = item.partition("=")
        if not eq and i == 0 and key not in ALIASES[kind] and key not in names:
            key, text = KINDS[kind], item
        elif not eq:
            key, text = key, "true"
        field = ALIASES[kind].get(key.strip(), key.strip())
        if field not in names:
            raise ValueError(f"{kind} has no setting {key!r} (settings: {', '.join(sorted(names))})")
        try:
            kwargs[field] = _value(field, text.strip())
        except ValueError as e:
            raise ValueError(f"{kind} {key}={text}: {e}") from None
    if kind == "mag" and not kwargs.get("calibrate"):
        kwargs["mag_ratios"] = FLUX_MAG_RATIOS
    return cls(**kwargs)


class CacheSpec(click.ParamType):
    name = "KIND[:VALUE][,KEY=VALUE...]"

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            return parse_cache(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def cache_option(f: Callable) -> Callable:
    """Add `--cache` (a parsed cache config, or None) to a click command."""
    return click.option(
        "--cache", type=CacheSpec(), default=None,
        help="Skip transformer evaluations: fbc:0.12 (First Block Cache threshold), "
             "taylorseer:5 (cache interval), mag:0.06 (MagCache threshold); diffusers' "
             "settings. Default: none.")(f)


def cache_summary(stats: dict) -> str:
    """'  evals 20/28' (run / steps) for the phase line of an edit with a cache, else ''."""
    if "cache_steps" not in stats:
        return ""
    total = stats["transformer_evals"] + stats["transformer_skipped"]
    return f"  evals {stats['transformer_evals']}/{total}"
