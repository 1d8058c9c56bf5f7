"""Step cache specs: `kind[:value][,key=value...]` strings (the CLI's `--cache`, batch
manifests, `EditOptions.cache`) parsed into the configs of mlx_edit/sampling/cache.py.

    fbc:0.12                        FirstBlockCache(threshold=0.12)
    taylorseer:5,before=3,order=1   TaylorSeer(cache_interval=5, ...)
    mag:0.06,max_skip=3             MagCache with FLUX.1-dev's magnitude ratios
"""

from __future__ import annotations

import mlx.core as mx

from mlx_edit.sampling.cache import FLUX_MAG_RATIOS, FirstBlockCache, MagCache, TaylorSeer

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
