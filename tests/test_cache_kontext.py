"""Step caches with FLUX.1 Kontext, with and without true CFG, against diffusers'
FluxKontextPipeline under its cache hooks (tiny fixture's `kontext-model/`, float32, CPU,
same injected noise, VAE posterior mode on both sides).

diffusers' Kontext pipeline sets no cache context, so its transformer call is wrapped in
`cache_context(...)` here by hand: "cond" for every call without true CFG; with it, the
pipeline calls the prompt's then the negative prompt's forward each step, wrapped in
"cond" / "uncond" (one cache state per branch, as diffusers' FluxPipeline does). Our loop
keeps one state per branch too. 28 steps, one reference image; per cache type the skip
decisions of each branch equal the hooks' and the final latents agree to 1e-4 relative.
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from skimage import data

from mlx_edit.editing.kontext import FluxKontext
from mlx_edit.sampling.cache import FLUX_MAG_RATIOS, FirstBlockCache, MagCache, TaylorSeer

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers.hooks")
from cache_hooks import decision, diffusers_config, pattern  # noqa: E402  (imports torch)

pytestmark = pytest.mark.parity
PROMPT, NEGATIVE = "make the astronaut's suit red", "blurry, low quality"
W, H, STEPS, GUIDANCE = 64, 48, 28, 2.5
CASES = {
    # weight-independent patterns (step index and ratios only)
    "taylor": TaylorSeer(cache_interval=4, disable_cache_before_step=2, max_order=1,
                         taylor_factors_dtype=mx.float32),
    "mag": MagCache(threshold=0.24, max_skip_steps=2, retention_ratio=0.1,
                    mag_ratios=FLUX_MAG_RATIOS),
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, import_script):
    out = tmp_path_factory.mktemp("kontext_cache") / "tiny"
    return import_script("make_mlx_checkpoint").build(out, "tiny", extras=("kontext-model",))


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(data.astronaut()).crop((0, 40, 300, 240)).resize((96, 64))


@pytest.fixture(scope="module")
def noise():
    n = np.random.default_rng(1).standard_normal((1, (W // 16) * (H // 16), 64))
    return n.astype(np.float32)


@pytest.fixture(scope="module")
def reference(ckpt, photo, noise):
    """run(cfg, true_cfg_scale) -> ({branch: decisions}, final latents) from diffusers."""
    import diffusers
    from diffusers.models.autoencoders import vae as dvae

    diffusers.utils.logging.set_verbosity_error()
    pipe = diffusers.FluxKontextPipeline.from_pretrained(ckpt / "kontext-model")
    pipe.set_progress_bar_config(disable=True)
    transformer, forward = pipe.transformer, pipe.transformer.forward
    record: dict = {}

    def cached_forward(*args, **kwargs):
        branches = ("cond", "uncond") if record["cfg_scale"] > 1 else ("cond",)
        branch = branches[record["calls"] % len(branches)]
        record["calls"] += 1
        with transformer.cache_context(branch):
            out = forward(*args, **kwargs)
            record["decisions"].setdefault(branch, []).append(
                decision(transformer, record["cache"]))
        return out

    transformer.forward = cached_forward

    def run(cache, cfg_scale: float):
        record.update(calls=0, decisions={}, cache=cache, cfg_scale=cfg_scale)
        transformer.enable_cache(diffusers_config(cache, STEPS))
        sample = dvae.DiagonalGaussianDistribution.sample
        dvae.DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mode()
        try:
            with torch.no_grad():
                latents = pipe(image=photo, prompt=PROMPT, height=H, width=W, max_area=W * H,
                               num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                               latents=torch.from_numpy(noise), max_sequence_length=32,
                               output_type="latent", return_dict=False, _auto_resize=False,
                               negative_prompt=NEGATIVE if cfg_scale > 1 else None,
                               true_cfg_scale=cfg_scale)[0]
        finally:
            dvae.DiagonalGaussianDistribution.sample = sample
            transformer.disable_cache()
        return record["decisions"], latents.numpy()

    return run


@pytest.fixture(scope="module")
def ours(ckpt, photo, noise):
    """run(cfg, true_cfg_scale) -> (stats, final latents) from our Kontext pipeline."""
    pipe = FluxKontext.from_pretrained(ckpt / "kontext-model", mx.float32)
    uncached: dict = {}

    def run(cache, cfg_scale: float):
        if cache is None and cfg_scale in uncached:
            return uncached[cfg_scale]
        ones = np.ones((H, W), np.float32)
        job = pipe.prepare(
            photo.resize((W, H)), ones, ones, PROMPT, steps=STEPS, guidance=GUIDANCE, seed=0,
            num_images=1, strength=1.0, crop_to_mask=False, prompt_2=None,
            max_sequence_length=32, noise=mx.array(noise), references=[photo],
            reference_resize=False, negative_prompt=NEGATIVE if cfg_scale > 1 else None,
            true_cfg_scale=cfg_scale, cache=cache)
        *_, (_, latents) = pipe.steps(job)
        result = {**job.stats, "metadata": job.metadata}, np.array(latents)
        if cache is None:
            uncached[cfg_scale] = result
        return result

    return run


def _rel(x, ref) -> float:
    return float(np.abs(x - ref).max() / np.abs(ref).max())


def _changes(stats: dict) -> list[float]:
    infos = stats["cache_info"]
    infos = infos if isinstance(infos, list) else [infos]  # one per branch with true CFG
    return [c for info in infos for c in info["relative_change"] if c is not None]


def _fbc_threshold(ours, cfg_scale: float, tries: int = 8) -> float:
    """A First Block Cache threshold for this fixture's random weights: a gap between the
    uncached run's first-block changes (widest first) whose run skips some steps with every
    change it decided on > 1% away from it (torch and MLX differ by ~1e-5 relative)."""
    changes = sorted(_changes(ours(FirstBlockCache(0.0), cfg_scale)[0]))
    for _, threshold in sorted(((b - a, (a + b) / 2) for a, b in zip(changes, changes[1:])),
                               reverse=True)[:tries]:
        stats, _ = ours(FirstBlockCache(threshold), cfg_scale)
        if stats["transformer_skipped"] and all(
                abs(c - threshold) > 0.01 * threshold for c in _changes(stats)):
            return threshold
    raise AssertionError(f"no FBC threshold with a 1% margin among the gaps of {changes}")


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("name", ["fbc", *CASES])
def test_kontext_cache_matches_diffusers_hooks(reference, ours, name, cfg_scale):
    cache = CASES.get(name) or FirstBlockCache(_fbc_threshold(ours, cfg_scale))
    decisions, ref_latents = reference(cache, cfg_scale)
    stats, latents = ours(cache, cfg_scale)
    keys = {"cond": "cache_steps", "uncond": "cache_steps_negative"}
    assert list(decisions) == ["cond", "uncond"][: 1 + (cfg_scale > 1)]
    for branch, made in decisions.items():
        assert len(made) == STEPS and 0 < made.count(False), (branch, made)
        assert stats[keys[branch]] == stats["metadata"][keys[branch]] == pattern(made), branch
    skipped = sum(made.count(False) for made in decisions.values())
    assert stats["transformer_skipped"] == skipped  # both branches
    assert stats["transformer_evals"] + skipped == STEPS * len(decisions)
    err = _rel(latents, ref_latents)
    assert err <= 1e-4, name
    # skipping changed the result (by 2e-4 to 9e-3 here; the parity error is ~1.4e-6)
    assert _rel(latents, ours(None, cfg_scale)[1]) > max(10 * err, 1e-4)
