"""Step caches on FLUX.2 [klein] (mlx_edit/sampling/cache.py through `Flux2Pieces`).

- First Block Cache at threshold 0 equals the uncached edit exactly, through the one
  denoise loop, on the tiny torch-free klein folder; `--cache fbc:...` from the CLI
  records its decisions; TaylorSeer that never predicts equals it exactly too.
- TaylorSeer: per-call decisions and outputs equal diffusers' TaylorSeerCacheConfig hooks
  on Flux2Transformer2DModel (attention units, lite mode, block units, a skipped unit,
  bfloat16 factors).
- MagCache: per-call decisions and outputs equal diffusers' MagCacheConfig hooks on
  Flux2Transformer2DModel (same weights, float32). (As diffusers', its threshold 0 still
  skips a step whose interpolated magnitude ratio is exactly 1.0: err <= threshold.)
- First Block Cache: diffusers' hooks fail on Flux2Transformer2DModel (diffusers 0.42.1,
  its issue 14280: "TypeError: unsupported operand type(s) for -: 'Tensor' and 'list'",
  the FLUX.2 double block returns a list), so its decisions are checked against our own
  uncached run: threshold 0 equals it exactly, a skipped call is head + cached tail.
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage import data

from mlx_edit.cli import main
from mlx_edit.editing.klein import FluxKlein
from mlx_edit.sampling import cache


@pytest.fixture(scope="module")
def klein(tiny_klein_mlx):
    return tiny_klein_mlx


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(data.astronaut()).resize((96, 64))


def test_threshold_zero_equals_uncached(klein, photo):
    pipe = FluxKlein.from_pretrained(klein)
    run = dict(steps=4, seed=5, max_sequence_length=32)
    plain = np.asarray(pipe.edit([photo], "warmer", **run)[0])
    out = pipe.edit([photo], "warmer", **run, cache="fbc:0")[0]
    assert np.array_equal(np.asarray(out), plain) and out.info["cache_steps"] == "CCCC"
    never = pipe.edit([photo], "warmer", **run, cache="taylorseer:2,before=4")[0]
    assert np.array_equal(np.asarray(never), plain) and never.info["cache_steps"] == "CCCC"
    taylor = pipe.edit([photo], "warmer", **run, cache="taylorseer:2,before=1")[0]
    assert taylor.info["cache_steps"] == "CsCs"
    skipped = pipe.edit([photo], "warmer", **run, cache="fbc:10")[0]
    assert skipped.info["cache_steps"] == "Csss"
    assert not np.array_equal(np.asarray(skipped), plain)


def test_cli_cache(klein, tmp_path):
    Image.fromarray(data.coffee()).resize((80, 64)).save(tmp_path / "in.png")
    args = ["edit", "--model", klein, "-i", tmp_path / "in.png", "-p", "warmer", "--steps",
            3, "--seed", 1, "-o", tmp_path / "out.png"]
    r = CliRunner().invoke(main, [str(a) for a in [*args, "--cache", "fbc:0.1"]])
    assert r.exit_code == 0, r.output
    info = Image.open(tmp_path / "out.png").info
    assert info["cache"] == "FirstBlockCache(threshold=0.1)" and info["cache_steps"][0] == "C"
    r = CliRunner().invoke(main, [str(a) for a in [*args, "--overwrite", "--cache",
                                                  "taylorseer:2,before=1"]])
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "out.png").info["cache_steps"] == "CsC"


def _inputs(k: int):
    rng = np.random.default_rng(0)
    x, txt = rng.standard_normal((1, 12, 128)), rng.standard_normal((1, 5, 192))
    steps = [(x + 0.02 * i * rng.standard_normal(x.shape), 1.0 - 0.2 * i) for i in range(k)]
    return [(a.astype(np.float32), float(t)) for a, t in steps], txt.astype(np.float32)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, import_script):
    """(diffusers' Flux2Transformer2DModel, ours on the same random weights, float32)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from mlx_edit.weights.flux2 import load_flux2_transformer
    torch.manual_seed(0)
    cfg = import_script("klein_fixtures").PRESETS["tiny"]["transformer"]
    ref = diffusers.Flux2Transformer2DModel(**cfg).eval()
    folder = tmp_path_factory.mktemp("flux2") / "transformer"
    ref.save_pretrained(folder)
    return ref, load_flux2_transformer(folder, mx.float32)


IDS, T_IDS = np.zeros((12, 4), np.float32), np.zeros((5, 4), np.float32)


def _mine(ours, state, txt, x, t):
    rope = ours.rope(mx.array(IDS), mx.array(T_IDS))
    return np.array(state.velocity(mx.array(x), mx.array(txt), mx.array([t]), None, None,
                                   rope, (), ()))


def _against_hooks(pair, config, calls, txt) -> tuple[str, str]:
    """Each call through diffusers' hooks for `config` and through our state: outputs
    <= 1e-4 relative; (our pattern, theirs)."""
    import torch
    from cache_hooks import decision, diffusers_config, pattern
    ref, ours = pair
    ref.enable_cache(diffusers_config(config, len(calls)))
    state, theirs = cache.start(config, ours, len(calls)), []
    try:
        with torch.no_grad(), ref.cache_context("cond"):
            for x, t in calls:
                want = ref(hidden_states=torch.from_numpy(x),
                           encoder_hidden_states=torch.from_numpy(txt),
                           timestep=torch.tensor([t]), img_ids=torch.from_numpy(IDS),
                           txt_ids=torch.from_numpy(T_IDS), guidance=None).sample.numpy()
                theirs.append(decision(ref, config))
                got = _mine(ours, state, txt, x, t)
                assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    finally:
        ref.disable_cache()
    return pattern(state.computed), pattern(theirs)


@pytest.mark.parity
def test_cache_decisions_on_flux2(pair):
    """MagCache vs diffusers' hooks (decisions and outputs <= 1e-4 relative); First Block
    Cache vs our uncached forward (diffusers' FBC fails on FLUX.2, see the module doc)."""
    from cache_hooks import pattern
    _, ours = pair
    calls, txt = _inputs(5)
    mag = cache.MagCache(threshold=0.3, mag_ratios=cache.FLUX_MAG_RATIOS)
    mine, theirs = _against_hooks(pair, mag, calls, txt)
    assert mine == theirs and "s" in theirs

    rope = ours.rope(mx.array(IDS), mx.array(T_IDS))
    plain = [np.array(ours(mx.array(x), mx.array(IDS), mx.array(txt), mx.array(T_IDS),
                           mx.array([t]))) for x, t in calls]
    zero = cache.start(cache.FirstBlockCache(0.0), ours, len(calls))
    assert all(np.array_equal(_mine(ours, zero, txt, x, t), p) for (x, t), p in zip(calls, plain))
    fbc = cache.start(cache.FirstBlockCache(10.0), ours, len(calls))
    outs = [_mine(ours, fbc, txt, x, t) for x, t in calls]
    assert pattern(fbc.computed) == "Cssss" and np.array_equal(outs[0], plain[0])
    # a skipped call: the first block's output on this call + the tail residual of call 0
    x, ctx, vec = ours.embed(mx.array(calls[1][0]), mx.array(txt), mx.array([calls[1][1]]))
    head, _ = ours.blocks(x, ctx, ours.modulations(vec), rope, stop=1)
    want = np.array(ours.final(head + fbc.tail_residual, vec))
    np.testing.assert_allclose(outs[1], want, rtol=1e-5, atol=1e-6)


TAYLOR = {
    "attention": cache.TaylorSeer(cache_interval=2, disable_cache_before_step=2, max_order=1,
                                  taylor_factors_dtype=mx.float32),
    "lite": cache.TaylorSeer(cache_interval=3, disable_cache_before_step=2, max_order=2,
                             taylor_factors_dtype=mx.float32, use_lite_mode=True),
    "blocks": cache.TaylorSeer(cache_interval=2, disable_cache_before_step=3, max_order=2,
                               taylor_factors_dtype=mx.float32,
                               cache_identifiers=["^transformer_blocks\\.0\\.attn",
                                                  "^single_transformer_blocks\\.0$"]),
    "skip": cache.TaylorSeer(cache_interval=2, disable_cache_before_step=2, max_order=1,
                             taylor_factors_dtype=mx.float32,
                             cache_identifiers=["^transformer_blocks\\.0$"],
                             skip_predict_identifiers=["^single_transformer_blocks\\.0\\.attn"]),
    "bfloat16": cache.TaylorSeer(cache_interval=3, disable_cache_before_step=1,
                                 disable_cache_after_step=6),
}


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(TAYLOR))
def test_taylorseer_matches_diffusers_hooks(pair, name):
    """TaylorSeer vs diffusers' TaylorSeerCacheConfig hooks on Flux2Transformer2DModel:
    the same computed / predicted calls, outputs <= 1e-4 relative (bfloat16 factors
    included: both round the same float32 features)."""
    calls, txt = _inputs(8)
    mine, theirs = _against_hooks(pair, TAYLOR[name], calls, txt)
    assert mine == theirs and "s" in theirs, (mine, theirs)
