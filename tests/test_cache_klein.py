"""Step caches on FLUX.2 [klein] (mlx_edit/sampling/cache.py through `Flux2Pieces`).

- First Block Cache at threshold 0 equals the uncached edit exactly, through the one
  denoise loop, on the tiny torch-free klein folder; `--cache fbc:...` from the CLI
  records its decisions (TaylorSeer's refusal: tests/test_klein_cli.py).
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


def _inputs(k: int):
    rng = np.random.default_rng(0)
    x, txt = rng.standard_normal((1, 12, 128)), rng.standard_normal((1, 5, 192))
    steps = [(x + 0.02 * i * rng.standard_normal(x.shape), 1.0 - 0.2 * i) for i in range(k)]
    return [(a.astype(np.float32), float(t)) for a, t in steps], txt.astype(np.float32)


@pytest.mark.parity
def test_cache_decisions_on_flux2(tmp_path, import_script):
    """MagCache vs diffusers' hooks (decisions and outputs <= 1e-4 relative); First Block
    Cache vs our uncached forward (diffusers' FBC fails on FLUX.2, see the module doc)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from cache_hooks import decision, diffusers_config, pattern

    from mlx_edit.weights.flux2 import load_flux2_transformer
    torch.manual_seed(0)
    cfg = import_script("klein_fixtures").PRESETS["tiny"]["transformer"]
    ref = diffusers.Flux2Transformer2DModel(**cfg).eval()
    ref.save_pretrained(tmp_path / "transformer")
    ours = load_flux2_transformer(tmp_path / "transformer", mx.float32)
    calls, txt = _inputs(5)
    ids, t_ids = np.zeros((12, 4), np.float32), np.zeros((5, 4), np.float32)
    rope = ours.rope(mx.array(ids), mx.array(t_ids))

    def mine(state, x, t):
        return np.array(state.velocity(mx.array(x), mx.array(txt), mx.array([t]), None, None,
                                       rope, (), ()))

    mag = cache.MagCache(threshold=0.3, mag_ratios=cache.FLUX_MAG_RATIOS)
    ref.enable_cache(diffusers_config(mag, len(calls)))
    state, theirs = cache.start(mag, ours, len(calls)), []
    with torch.no_grad(), ref.cache_context("cond"):
        for x, t in calls:
            want = ref(hidden_states=torch.from_numpy(x),
                       encoder_hidden_states=torch.from_numpy(txt),
                       timestep=torch.tensor([t]), img_ids=torch.from_numpy(ids),
                       txt_ids=torch.from_numpy(t_ids), guidance=None).sample.numpy()
            theirs.append(decision(ref, mag))
            got = mine(state, x, t)
            assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert pattern(state.computed) == pattern(theirs) and "s" in pattern(theirs)
    ref.disable_cache()

    plain = [np.array(ours(mx.array(x), mx.array(ids), mx.array(txt), mx.array(t_ids),
                           mx.array([t]))) for x, t in calls]
    zero = cache.start(cache.FirstBlockCache(0.0), ours, len(calls))
    assert all(np.array_equal(mine(zero, x, t), p) for (x, t), p in zip(calls, plain))
    fbc = cache.start(cache.FirstBlockCache(10.0), ours, len(calls))
    outs = [mine(fbc, x, t) for x, t in calls]
    assert pattern(fbc.computed) == "Cssss" and np.array_equal(outs[0], plain[0])
    # a skipped call: the first block's output on this call + the tail residual of call 0
    x, ctx, vec = ours.embed(mx.array(calls[1][0]), mx.array(txt), mx.array([calls[1][1]]))
    head, _ = ours.blocks(x, ctx, ours.modulations(vec), rope, stop=1)
    want = np.array(ours.final(head + fbc.tail_residual, vec))
    np.testing.assert_allclose(outs[1], want, rtol=1e-5, atol=1e-6)
