"""Step caches outside parity: the `--cache` spec, the CLI's report, ControlNet residuals and
IP-Adapter inputs through the cached pieces, and the configs' errors."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage import data

from mlx_edit.cli import main
from mlx_edit.sampling.cache_spec import parse_cache
from mlx_edit.models.flux import FluxConfig, cache_units
from mlx_edit.models.layers import ControlResiduals, IPAdapterKV
from mlx_edit.sampling.cache import (
    FLUX_MAG_RATIOS, FirstBlockCache, MagCache, TaylorSeer, describe, start, state_bytes,
    taylor_units,
)
from mlx_edit.sampling.denoise import PromptEmbeds, denoise
from mlx_edit.sampling.latents import image_ids, model_input, text_ids
from contexts import random_transformer

CFG = dict(in_channels=384, out_channels=64, num_layers=2, num_single_layers=2,
           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
           pooled_projection_dim=24, axes_dims_rope=(4, 6, 6))
SIGMAS = np.linspace(1.0, 0.0, 9, dtype=np.float32)
H, W, L, B = 4, 6, 7, 2


@pytest.mark.parametrize("spec, expected", [
    ("fbc:0.12", FirstBlockCache(threshold=0.12)),
    ("fbc", FirstBlockCache()),
    ("taylorseer:4,before=2,order=2,dtype=float32,lite",
     TaylorSeer(cache_interval=4, disable_cache_before_step=2, max_order=2,
                taylor_factors_dtype=mx.float32, use_lite_mode=True)),
    ("taylorseer:disable_cache_after_step=20", TaylorSeer(disable_cache_after_step=20)),
    ("mag:0.1,max_skip=2,retention=0.3",
     MagCache(threshold=0.1, max_skip_steps=2, retention_ratio=0.3, mag_ratios=FLUX_MAG_RATIOS)),
    ("mag:calibrate", MagCache(calibrate=True)),
])
def test_parse_cache(spec, expected):
    assert parse_cache(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("teacache:0.4", "unknown cache 'teacache'"),
    ("fbc:abc", "fbc threshold=abc"),
    ("mag:speed=2", "mag has no setting 'speed'"),
    ("taylorseer:dtype=int8", "dtype must be one of"),
])
def test_parse_cache_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_cache(spec)


def test_config_errors():
    with pytest.raises(ValueError, match="mag_ratios"):
        MagCache()
    units = cache_units(FluxConfig.from_dict(CFG))
    with pytest.raises(ValueError, match="hooks nothing"):
        taylor_units(TaylorSeer(cache_identifiers=["ff"]), units)
    with pytest.raises(ValueError, match="both hooked"):
        taylor_units(TaylorSeer(cache_identifiers=[r"transformer_blocks\.0(\.attn)?"]), units)
    assert taylor_units(TaylorSeer(use_lite_mode=True), units) == {
        **{n: "skip" for n in units if n.count(".") == 1}, "proj_out": "cache"}
    assert describe(MagCache(mag_ratios=FLUX_MAG_RATIOS)) == (
        "MagCache(threshold=0.06, max_skip_steps=3, retention_ratio=0.2, mag_ratios=FLUX, "
        "calibrate=False)")


@pytest.fixture(scope="module")
def setup():
    model, keys = random_transformer(CFG)
    n, hidden = H * W, model.config.hidden_size
    args = (mx.random.normal((B, n, 64), key=next(keys)),
            mx.random.normal((1, n, 320), key=next(keys)), image_ids(H, W),
            PromptEmbeds(mx.random.normal((1, L, 48), key=next(keys)),
                         mx.random.normal((1, 24), key=next(keys))), SIGMAS, 30.0)
    residuals = [mx.random.normal((B, n, hidden), key=next(keys)) * 0.1 for _ in range(3)]
    kv = mx.random.normal((2, B, 2, 5, 16), key=next(keys))
    control = ControlResiduals(double=residuals[:2], single=residuals[2:])
    extras = dict(controls=[lambda lat, t, i: control],
                  ip=[IPAdapterKV(k=[kv[0], kv[0]], v=[kv[1], kv[1]], scale=[0.5, 0.7])])
    return model, args, extras


def _final(model, args, **kwargs):
    return np.array(list(denoise(model, *args, **kwargs))[-1][1])


@pytest.mark.parametrize("cache", [
    FirstBlockCache(threshold=0.0), TaylorSeer(disable_cache_before_step=len(SIGMAS)),
    MagCache(max_skip_steps=0, mag_ratios=FLUX_MAG_RATIOS),
])
def test_never_skip_with_controlnet_and_ip_adapter_equals_uncached(setup, cache):
    model, args, extras = setup
    plain = _final(model, args, **extras)
    assert not np.array_equal(plain, _final(model, args))  # the extras change the result
    np.testing.assert_array_equal(_final(model, args, cache=cache, **extras), plain)


@pytest.mark.parametrize("cache", [
    FirstBlockCache(threshold=10.0), TaylorSeer(cache_interval=2, disable_cache_before_step=2),
    MagCache(threshold=1.0, retention_ratio=0.0, mag_ratios=FLUX_MAG_RATIOS),
])
def test_skipping_uses_controlnet_and_ip_adapter(setup, cache):
    # the residuals / adapter still change a cached run's result on skipped steps
    model, args, extras = setup
    stats: dict = {}
    with_extras = np.array(list(denoise(model, *args, cache=cache, stats=stats, **extras))[-1][1])
    assert stats["transformer_skipped"] > 0
    for drop in ("controls", "ip"):
        kept = {k: v for k, v in extras.items() if k != drop}
        assert not np.allclose(_final(model, args, cache=cache, **kept), with_extras)


def test_calibration_reports_ratios(setup):
    model, args, _ = setup
    stats: dict = {}
    list(denoise(model, *args, cache=MagCache(calibrate=True), stats=stats))
    ratios = stats["cache_info"]["mag_ratios"]
    assert len(ratios) == len(SIGMAS) - 1 and ratios[0] == 1.0
    assert all(r > 0 for r in ratios) and stats["transformer_skipped"] == 0


def test_start_rejects_unknown_config(setup):
    with pytest.raises(ValueError, match="unknown step cache"):
        start(object(), setup[0], 4)


def test_cli_reports_evaluations(tiny_mlx, tmp_path):
    d = tmp_path
    Image.fromarray(data.astronaut()).resize((96, 80)).save(d / "in.png")
    mask = np.zeros((80, 96), np.uint8)
    mask[20:60, 30:70] = 255
    Image.fromarray(mask).save(d / "mask.png")
    r = CliRunner().invoke(main, [str(a) for a in (
        "inpaint", "--model", tiny_mlx, "--image", d / "in.png", "--mask", d / "mask.png",
        "--prompt", "a hat", "--steps", 6, "--seed", 1, "--output", d / "out.png",
        "--metadata", "--cache", "fbc:100")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "evals 1/6" in r.output
    text = Image.open(d / "out.png").text
    assert text["cache"] == "FirstBlockCache(threshold=100.0)"
    assert (text["transformer_evals"], text["transformer_skipped"]) == ("1", "5")
    assert text["cache_steps"] == "Csssss"
    stats = json.loads((d / "out.json").read_text())["stats"]
    assert stats["transformer_evals"] == 1 and len(stats["cache_info"]["relative_change"]) == 6
    bad = CliRunner().invoke(main, ["inpaint", "--cache", "fbc:x", "--prompt", "p", "--image",
                                    str(d / "in.png"), "--mask", str(d / "mask.png")])
    assert bad.exit_code == 2 and "fbc threshold=x" in bad.output


@pytest.mark.parametrize("cache", [
    FirstBlockCache(threshold=0.0), MagCache(mag_ratios=FLUX_MAG_RATIOS),
    TaylorSeer(max_order=2), TaylorSeer(use_lite_mode=True, taylor_factors_dtype=None),
])
def test_state_bytes_is_what_the_cache_keeps(setup, cache):
    model, (latents, cond, ids, embeds, sigmas, _), _ = setup
    state = start(cache, model, 4)
    b, n = latents.shape[:2]
    rope = model.rope(ids, text_ids(L))
    txt = mx.broadcast_to(embeds.txt, (b, L, 48))
    pooled = mx.broadcast_to(embeds.pooled, (b, 24))
    for i in range(3):
        v = state.velocity(model_input(latents, cond), txt, mx.full((b,), float(sigmas[i])),
                           pooled, mx.full((b,), 30.0), rope, [], [])
        mx.eval(v, *state.arrays())
    kept = sum(a.nbytes for a in state.arrays())
    assert kept == state_bytes(cache, model.config, b, n, L, 4) > 0


def test_memory_estimate_counts_the_cache():
    from mlx_edit.editing.memory import estimate

    plain = estimate(1024, 1024)
    taylor = estimate(1024, 1024, cache=TaylorSeer())
    fbc = estimate(1024, 1024, cache=FirstBlockCache(0.1))
    # FLUX.1 at 1024 px: 4096 image + 512 text tokens, hidden 3072, float32 residuals;
    # TaylorSeer: 57 attention outputs x 2 bfloat16 factors
    assert fbc["cache_state"] == pytest.approx(2 * 4096 * 3072 * 4 / 1e9)
    assert taylor["cache_state"] == pytest.approx(57 * 2 * 4608 * 3072 * 2 / 1e9)
    assert taylor["activations_denoise"] == pytest.approx(
        plain["activations_denoise"] + taylor["cache_state"])
    assert "cache_state" not in plain
    # true CFG keeps one state per branch (the prompt's and the negative prompt's)
    both = estimate(1024, 1024, cache=FirstBlockCache(0.1), cache_branches=2)
    assert both["cache_state"] == pytest.approx(2 * fbc["cache_state"])


def test_edit_memory_check_counts_a_cache_state_per_cfg_branch(monkeypatch):
    from mlx_edit import variants
    from mlx_edit.editing import large, memory
    from mlx_edit.imaging.stitch import CropPlan
    from mlx_edit.options import EditOptions

    asked = []

    class Models:  # what check_memory reads of a pipeline's Models
        low_memory = False
        variant_info = variants.VARIANTS["fill"]

        def memory_estimate(self, *args, **kw):
            asked.append(kw["cache_branches"])
            return "estimate"

    monkeypatch.setattr(memory, "check_fits", lambda est, low_memory: None)
    plan = CropPlan((64, 64), (0, 0, 64, 64), (64, 64), False)
    for o in (EditOptions(), EditOptions(negative_prompt="blur", true_cfg_scale=3.0),
              EditOptions(negative_prompt="blur")):
        large.check_memory(Models(), plan, o, 1, FirstBlockCache(0.1))
    assert asked == [1, 2, 1]


def _rel(x, ref) -> float:
    return float(np.abs(x - ref).max() / np.abs(ref).max())


SKIPPING = [
    FirstBlockCache(threshold=10.0), TaylorSeer(cache_interval=2, disable_cache_before_step=2),
    TaylorSeer(cache_interval=3, disable_cache_before_step=1, max_order=2, use_lite_mode=True),
    MagCache(threshold=1.0, retention_ratio=0.0, mag_ratios=FLUX_MAG_RATIOS),
]


@pytest.mark.parametrize("true_cfg", [False, True])
@pytest.mark.parametrize("cache", SKIPPING)
def test_compiled_cache_equals_eager(setup, cache, true_cfg):
    # the cached pieces under mx.compile (with ControlNet residuals and an IP-Adapter
    # through the traced arguments, and a negative prompt's branch): same decisions, same
    # latents up to fused rounding
    model, args, extras = setup
    if true_cfg:
        extras = {**extras, **_cfg_args(setup)[2]}
    runs = {}
    for compile in (False, True):
        stats: dict = {}
        latents = list(denoise(model, *args, cache=cache, compile=compile, stats=stats, **extras))
        runs[compile] = stats, np.array(latents[-1][1])
    for key in ("cache_steps", "cache_steps_negative"):
        assert runs[True][0].get(key) == runs[False][0].get(key)
    assert ("cache_steps_negative" in runs[True][0]) == true_cfg
    assert runs[True][0]["transformer_skipped"] > 0
    assert _rel(runs[True][1], runs[False][1]) <= 1e-5


def _cfg_args(setup):
    model, (latents, cond, ids, embeds, sigmas, guidance), extras = setup
    key = mx.random.key(7)
    negative = PromptEmbeds(mx.random.normal((1, L, 48), key=key),
                            mx.random.normal((1, 24), key=mx.random.split(key)[0]))
    return model, (latents, cond, ids, embeds, sigmas, guidance), dict(negative=negative,
                                                                        true_cfg_scale=3.0)


@pytest.mark.parametrize("cache", [
    FirstBlockCache(threshold=0.0), TaylorSeer(disable_cache_before_step=len(SIGMAS)),
    MagCache(max_skip_steps=0, mag_ratios=FLUX_MAG_RATIOS),
])
def test_never_skip_with_true_cfg_equals_uncached(setup, cache):
    model, args, cfg = _cfg_args(setup)
    plain = _final(model, args, **cfg)
    assert not np.array_equal(plain, _final(model, args))  # the negative prompt counts
    stats: dict = {}
    cached = np.array(list(denoise(model, *args, cache=cache, stats=stats, **cfg))[-1][1])
    np.testing.assert_array_equal(cached, plain)
    steps = len(SIGMAS) - 1
    assert stats["cache_steps"] == stats["cache_steps_negative"] == "C" * steps
    assert (stats["transformer_evals"], stats["transformer_skipped"]) == (2 * steps, 0)


def test_true_cfg_keeps_one_cache_state_per_branch(setup):
    # FBC decides per branch on that branch's own residuals: the prompt's and the negative
    # prompt's first-block changes differ, and a threshold between them splits the patterns
    model, args, cfg = _cfg_args(setup)
    stats: dict = {}
    list(denoise(model, *args, cache=FirstBlockCache(0.0), stats=stats, **cfg))
    pos, neg = ([c for c in info["relative_change"] if c is not None]
                for info in stats["cache_info"])
    assert pos != neg
    assert len(pos) == len(neg) == len(SIGMAS) - 2
