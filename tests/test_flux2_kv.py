"""The FLUX.2 KV variant at the model level against diffusers' Flux2Transformer2DModel
with its KV processors (pipelines/flux2/pipeline_flux2_klein_kv.py): the first step
(`kv_cache_mode="extract"`, references prepended) and a later step (`"cached"`) equal
`reference_kv` + `__call__(kv=...)`; the cached keys/values equal diffusers'
`Flux2KVCache` (float32, CPU)."""

import mlx_edit  # noqa: F401  (loads OpenBLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the parity extra: every test here uses it

from test_flux2 import TINY, build_reference, rel_err  # noqa: E402

from mlx_edit.models.flux2 import Flux2Transformer  # noqa: E402
from mlx_edit.weights.flux2 import load_flux2_transformer  # noqa: E402

pytestmark = pytest.mark.parity
TOL = 1e-4


def kv_reference(cfg):
    from diffusers.models.transformers.transformer_flux2 import (
        Flux2KVAttnProcessor,
        Flux2KVParallelSelfAttnProcessor,
    )

    model = build_reference(cfg)
    for block in model.transformer_blocks:  # as Flux2KleinKVPipeline._set_kv_attn_processors
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in model.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    return model


def inputs(cfg, guidance: bool, batch=2, n_txt=5, seed=3):
    """Two references (2x3, 4x2 latents) repeated over the batch as the KV pipeline does,
    a 3x4 target, and two steps' latents/timesteps."""
    from diffusers import Flux2KleinKVPipeline as P

    g = np.random.default_rng(seed)
    c = cfg["in_channels"]
    refs = [torch.zeros(1, c, 2, 3), torch.zeros(1, c, 4, 2)]
    ref_ids = P._prepare_image_ids(refs).numpy().astype(np.float32)  # (1, R, 4)
    ids = P._prepare_latent_ids(torch.zeros(batch, c, 3, 4)).numpy().astype(np.float32)
    txt = g.standard_normal((batch, n_txt, cfg["joint_attention_dim"])).astype(np.float32)
    ref = g.standard_normal((1, ref_ids.shape[1], c)).astype(np.float32)
    return dict(
        ref=np.repeat(ref, batch, 0), ref_ids=np.repeat(ref_ids, batch, 0), img_ids=ids,
        steps=[(g.standard_normal((batch, ids.shape[1], c)).astype(np.float32),
                np.array(t[:batch], np.float32)) for t in ([1.0, 1.0], [0.6, 0.6])],
        txt=txt, txt_ids=P._prepare_text_ids(torch.from_numpy(txt)).numpy().astype(np.float32),
        guidance=np.array([4.0, 1.5][:batch], np.float32) if guidance else None,
    )


def run_diffusers(model, x):
    """(outputs of the extract step and the cached step, the cache)."""
    t = {k: torch.from_numpy(v) for k, v in x.items() if isinstance(v, np.ndarray)}
    common = dict(encoder_hidden_states=t["txt"], txt_ids=t["txt_ids"],
                  guidance=t.get("guidance"), return_dict=False)
    (img0, t0), (img1, t1) = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in x["steps"]]
    with torch.no_grad():
        first, cache = model(hidden_states=torch.cat([t["ref"], img0], 1), timestep=t0,
                             img_ids=torch.cat([t["ref_ids"], t["img_ids"]], 1),
                             kv_cache_mode="extract", num_ref_tokens=t["ref"].shape[1], **common)
        later = model(hidden_states=img1, timestep=t1, img_ids=t["img_ids"], kv_cache=cache,
                      kv_cache_mode="cached", **common)[0]
    return first.numpy(), later.numpy(), cache


def run_ours(model: Flux2Transformer, x, ref_batch=None):
    a = {k: mx.array(v) for k, v in x.items() if isinstance(v, np.ndarray)}
    guidance = a.get("guidance")
    if ref_batch is not None:  # references given once for the whole batch
        a["ref"], a["ref_ids"] = a["ref"][:ref_batch], a["ref_ids"][0]
        guidance = None if guidance is None else guidance[:ref_batch]
    kv = model.reference_kv(a["ref"], a["ref_ids"], guidance)
    outs = [np.array(model(mx.array(img), a["img_ids"], a["txt"], a["txt_ids"], mx.array(t),
                           a.get("guidance"), kv=kv)) for img, t in x["steps"]]
    return outs, kv


@pytest.fixture(scope="module", params=[False, True], ids=["klein", "guidance"])
def case(request, tmp_path_factory):
    cfg = {**TINY, "guidance_embeds": request.param}
    ref = kv_reference(cfg)
    folder = tmp_path_factory.mktemp("flux2_kv") / "transformer"
    ref.save_pretrained(folder, safe_serialization=True)
    x = inputs(cfg, guidance=request.param)
    return cfg, load_flux2_transformer(folder, mx.float32), x, run_diffusers(ref, x)


def test_first_and_later_steps_match_diffusers_kv(case):
    cfg, ours, x, (first, later, cache) = case
    (out0, out1), kv = run_ours(ours, x)
    assert out0.shape == first.shape == (2, x["img_ids"].shape[1], cfg["in_channels"])
    assert rel_err(out0, first) <= TOL
    assert rel_err(out1, later) <= TOL
    pairs = [(kv.double[i], cache.get_double(i)) for i in range(cfg["num_layers"])]
    pairs += [(kv.single[i], cache.get_single(i)) for i in range(cfg["num_single_layers"])]
    for (k, v), layer in pairs:  # diffusers (B, R, H, D), ours (B, H, R, D)
        k_ref, v_ref = (t.numpy().transpose(0, 2, 1, 3) for t in layer.get())
        assert rel_err(np.array(k), k_ref) <= TOL and rel_err(np.array(v), v_ref) <= TOL


@pytest.mark.parametrize("case", [False], ids=["klein"], indirect=True)
def test_references_given_once_serve_the_batch(case):
    """(klein, no guidance embedding: with per-row guidance the reference K/V are per row)"""
    cfg, ours, x, (first, later, _) = case
    assert not cfg["guidance_embeds"]
    (out0, out1), kv = run_ours(ours, x, ref_batch=1)
    assert kv.double[0][0].shape[0] == 1
    assert rel_err(out0, first) <= TOL and rel_err(out1, later) <= TOL


def test_references_matter_and_bytes(case):
    """Without the cache the output differs (the references are attended to), and
    `reference_kv_bytes` counts what `reference_kv` holds."""
    cfg, ours, x, (first, _, _) = case
    img, t = x["steps"][0]
    plain = np.array(ours(mx.array(img), mx.array(x["img_ids"]), mx.array(x["txt"]),
                          mx.array(x["txt_ids"]), mx.array(t),
                          None if x["guidance"] is None else mx.array(x["guidance"])))
    assert rel_err(plain, first) > 10 * TOL  # measured 8.6e-3 (klein)
    _, kv = run_ours(ours, x)
    held = sum(a.nbytes for pair in kv.double + kv.single for a in pair)
    assert held == ours.config.reference_kv_bytes(x["ref"].shape[1], batch=2, itemsize=4)


def test_taylorseer_on_cached_references_matches_diffusers_hooks(case):
    """TaylorSeer (diffusers' TaylorSeerCacheConfig hooks on the KV transformer: the first
    call extracts, later calls attend to the cache) vs ours with `reference_kv`'s K/V:
    the same computed / predicted calls, outputs <= 1e-4 relative. diffusers' extract call
    returns reference + target tokens, so its image factors restart at the next call
    (a shape change); ours never see the references, so the two agree once every factor
    comes from calls after the first: disable_cache_before_step >= max_order + 2."""
    from cache_hooks import decision, diffusers_config, pattern

    from mlx_edit.sampling import cache as step_cache
    cfg, ours, x, _ = case
    ref = kv_reference(cfg)  # the case's weights again (seeded)
    config = step_cache.TaylorSeer(cache_interval=2, disable_cache_before_step=3, max_order=1,
                                   taylor_factors_dtype=mx.float32)
    g = np.random.default_rng(7)
    base, _ = x["steps"][0]
    calls = [(base + 0.05 * i * g.standard_normal(base.shape).astype(np.float32),
              np.full(base.shape[0], 1.0 - 0.12 * i, np.float32)) for i in range(7)]
    t = {k: torch.from_numpy(v) for k, v in x.items() if isinstance(v, np.ndarray)}
    common = dict(encoder_hidden_states=t["txt"], txt_ids=t["txt_ids"],
                  guidance=t.get("guidance"), return_dict=False)
    a = {k: mx.array(v) for k, v in x.items() if isinstance(v, np.ndarray)}
    kv = ours.reference_kv(a["ref"], a["ref_ids"], a.get("guidance"))
    rope = ours.rope(a["img_ids"], a["txt_ids"])
    state = step_cache.start(config, ours, len(calls), kv=kv)
    ref.enable_cache(diffusers_config(config, len(calls)))
    theirs, kv_cache = [], None
    with torch.no_grad(), ref.cache_context("cond"):
        for i, (img, ts) in enumerate(calls):
            if i == 0:
                want, kv_cache = ref(hidden_states=torch.cat([t["ref"], torch.from_numpy(img)], 1),
                                     timestep=torch.from_numpy(ts), kv_cache_mode="extract",
                                     img_ids=torch.cat([t["ref_ids"], t["img_ids"]], 1),
                                     num_ref_tokens=t["ref"].shape[1], **common)
            else:
                want = ref(hidden_states=torch.from_numpy(img), timestep=torch.from_numpy(ts),
                           img_ids=t["img_ids"], kv_cache=kv_cache, kv_cache_mode="cached",
                           **common)[0]
            theirs.append(decision(ref, config))
            got = np.array(state.velocity(mx.array(img), a["txt"], mx.array(ts), None,
                                          a.get("guidance"), rope, (), ()))
            want = want.numpy()
            assert np.abs(got - want).max() <= TOL * np.abs(want).max(), i
    assert pattern(state.computed) == pattern(theirs) and "s" in pattern(theirs)
