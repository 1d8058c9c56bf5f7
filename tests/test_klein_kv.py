"""The FLUX.2 [klein] KV variant through FluxKlein against diffusers' Flux2KleinKVPipeline
(pipelines/flux2/pipeline_flux2_klein_kv.py) on the tiny klein fixture saved as a KV folder
(scripts/klein_fixtures.build_diffusers(kv=True)), float32 on the CPU, the same initial
noise on both sides: the latents after every step <= 1e-3 relative, the decoded image
PSNR >= 40 dB, with one and two references, and 10x closer to it than the same weights run
as plain klein; the references' keys/values are computed once per edit.
"""

from __future__ import annotations

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from mlx_edit.editing.klein import FluxKlein

pytestmark = pytest.mark.parity
torch = pytest.importorskip("torch")

from test_klein import (  # noqa: E402  (helpers and photo fixtures of the klein parity test)
    PROMPT,
    SEQ,
    _check,
    _nchw,
    _noise,
    _ours,
    _reference,
    photo,  # noqa: F401
    second,  # noqa: F401
)


@pytest.fixture(scope="module")
def kv_ckpt(tmp_path_factory, import_script):
    out = tmp_path_factory.mktemp("klein-kv") / "tiny"
    return import_script("klein_fixtures").build_diffusers(out, "tiny", kv=True)


@pytest.mark.parametrize("refs", [1, 2])
def test_kv_edit_matches_diffusers(kv_ckpt, photo, second, refs, monkeypatch):  # noqa: F811
    """Within float32's tolerances of diffusers, and at least 10x closer to it than the
    same weights run as plain klein (references in the sequence, attending to everything:
    on the tiny random weights that differs by only ~2e-4 relative, under the tolerance,
    so the comparison with the plain run is what shows the KV path ran)."""
    images = [photo, second][:refs]
    noise = _noise(10 + refs)
    pipe = FluxKlein.from_pretrained(kv_ckpt, mx.float32)
    assert pipe.variant == "klein-kv"
    job = pipe.edit_job(images, PROMPT, steps=3, seed=0, max_sequence_length=SEQ,
                        noise=mx.array(noise))
    assert job.reference_kv and job.tokens.shape[1] == [48, 102][refs - 1]
    plain_job = replace(job, reference_kv=False, stats={})
    model, calls = pipe.transformer, []
    monkeypatch.setattr(model, "reference_kv",
                        lambda *a, **k: calls.append(a[0].shape) or
                        type(model).reference_kv(model, *a, **k))
    ours = _ours(pipe, job)
    assert calls == [job.tokens.shape]  # once per edit, for 3 steps
    ref = _reference("Flux2KleinKVPipeline", kv_ckpt, image=images, num_inference_steps=3,
                     latents=_nchw(noise))
    _check(ours, ref)
    plain = _ours(pipe, plain_job)[0][-1]
    assert rel(ours[0][-1], ref[0][-1]) * 10 < rel(plain, ref[0][-1])


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())
