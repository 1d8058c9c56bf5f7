"""Step cache specs: `kind[:value][,key=value...]` strings (the CLI's `--cache`, batch
manifests, `EditOptions.cache`) parsed into the configs of mlx_edit/sampling/cache.py.

    fbc:0.12                        FirstBlockCache(threshold=0.12)
    taylorseer:5,before=3,order=1   TaylorSeer(cache_interval=5, ...)
    mag:0.06,max_skip=3             MagCache with FLUX.1-dev's magnitude ratios
"""

from __future__ import annotations

import math
import numbers

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
    try:
        return float(text) if field in ("threshold", "retention_ratio") else int(text)
    except ValueError:
        kind = "a number" if field in ("threshold", "retention_ratio") else "an integer"
        raise ValueError(f"{text!r} is not {kind}") from None


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
    return check_cache(cls(**kwargs))


# (config class, field) -> (integer?, low, high, None allowed?): the range of each number.
RANGES = {
    (FirstBlockCache, "threshold"): (False, 0.0, 1000.0, False),  # > ~1: skip all but one
    (TaylorSeer, "cache_interval"): (True, 1, 1000, False),
    (TaylorSeer, "disable_cache_before_step"): (True, 1, 1000, False),  # 0: nothing to predict from
    (TaylorSeer, "disable_cache_after_step"): (True, 0, 1000, True),
    (TaylorSeer, "max_order"): (True, 0, 8, False),
    (MagCache, "threshold"): (False, 0.0, 1000.0, False),
    (MagCache, "max_skip_steps"): (True, 0, 1000, False),
    (MagCache, "retention_ratio"): (False, 0.0, 1.0, False),
    (MagCache, "num_inference_steps"): (True, 1, 1000, True),
}
KIND_OF = {FirstBlockCache: "fbc", TaylorSeer: "taylorseer", MagCache: "mag"}


def check_cache(cfg):
    """`cfg` (a cache config) with every number finite, of its type and in range
    (RANGES), and MagCache's ratios finite and positive; else ValueError naming the
    setting (`fbc threshold must be ...`). Returns cfg."""
    kind = KIND_OF[type(cfg)]
    for (cls, name), (integer, lo, hi, optional) in RANGES.items():
        if cls is not type(cfg):
            continue
        v = getattr(cfg, name)
        if v is None and optional:
            continue
        ok_type = (isinstance(v, numbers.Integral) if integer else isinstance(v, numbers.Real)) \
            and not isinstance(v, bool)
        if not ok_type:
            raise ValueError(f"{kind} {name} must be {'an integer' if integer else 'a number'}, "
                             f"got {v!r}")
        if integer and not lo <= v <= hi:
            raise ValueError(f"{kind} {name} must be in {lo}..{hi}, got {v}")
        if not math.isfinite(v) or not lo <= v <= hi:
            raise ValueError(f"{kind} {name} must be a finite number in [{lo:g}, {hi:g}], "
                             f"got {v}")
    ratios = getattr(cfg, "mag_ratios", None)
    if ratios is not None and not all(math.isfinite(r) and r > 0 for r in map(float, ratios)):
        raise ValueError("mag mag_ratios must be finite positive numbers, got a NaN, inf or <= 0")
    return cfg
