"""Attention and GELU split over CPU streams (mlx_edit/models/layers.py) equal the one-
kernel results, and GELU equals torch's tanh approximation (diffusers 'gelu-approximate')."""

import mlx_edit  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_edit.models import layers


@pytest.fixture
def streams(monkeypatch, request):
    """Pretend the machine has `request.param` cores (one stream each)."""
    monkeypatch.setattr(layers.os, "cpu_count", lambda: request.param)
    return request.param


def _qkv(heads, n, t, d=16, seed=0):
    g = np.random.default_rng(seed)
    q = g.standard_normal((2, heads, n, d)).astype(np.float32)
    k, v = (g.standard_normal((2, heads, t, d)).astype(np.float32) for _ in range(2))
    return mx.array(q), mx.array(k), mx.array(v)


@pytest.mark.parametrize("streams", [1, 2, 4], indirect=True)
@pytest.mark.parametrize("heads,n,t", [(3, 37, 37), (24, 20, 5), (1, 8, 8)])
def test_attention_over_streams_equals_one_kernel(streams, heads, n, t):
    q, k, v = _qkv(heads, n, t)
    assert len(layers.cpu_streams()) == (streams if streams > 1 else 0)
    got = np.array(layers.attention(q, k, v))
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=16**-0.5)
    ref = np.array(ref.transpose(0, 2, 1, 3).reshape(2, n, heads * 16))
    assert got.shape == (2, n, heads * 16)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parity
@pytest.mark.parametrize("streams", [1, 2, 4], indirect=True)
@pytest.mark.parametrize("heads,n,t", [(3, 37, 37), (24, 20, 5), (1, 8, 8)])
def test_attention_over_streams_matches_torch_sdpa(streams, heads, n, t):
    """Against torch's SDPA (the reference the transformer parity tests use)."""
    import torch

    q, k, v = _qkv(heads, n, t)
    got = np.array(layers.attention(q, k, v))
    tq, tk, tv = (torch.from_numpy(np.array(a)) for a in (q, k, v))
    want = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
    np.testing.assert_allclose(got, want.transpose(1, 2).reshape(2, n, -1).numpy(), atol=1e-5)


@pytest.mark.parametrize("streams", [1, 2, 3], indirect=True)
def test_gelu_tanh_equals_mlx_gelu_approx(streams):
    x = np.linspace(-12, 12, 7 * 301, dtype=np.float32).reshape(1, 7, 301)
    got = np.array(layers.gelu_tanh(mx.array(x)))
    np.testing.assert_allclose(got, np.array(nn.gelu_approx(mx.array(x))), rtol=2e-6, atol=2e-7)


@pytest.mark.parity
@pytest.mark.parametrize("streams", [1, 2, 3], indirect=True)
def test_gelu_tanh_matches_torch(streams):
    import torch

    x = np.linspace(-12, 12, 7 * 301, dtype=np.float32).reshape(1, 7, 301)
    got = np.array(layers.gelu_tanh(mx.array(x)))
    want = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-7)
    np.testing.assert_allclose(got, np.array(nn.gelu_approx(mx.array(x))), rtol=2e-6, atol=2e-7)


def test_split_over_streams_chunks_and_order(monkeypatch):
    monkeypatch.setattr(layers.os, "cpu_count", lambda: 4)
    seen = []

    def fn(a):
        seen.append(a.shape[1])
        return a * 2

    x = mx.arange(30, dtype=mx.float32).reshape(3, 10)
    out = layers.split_over_streams(fn, (x,), axis=1)
    assert seen == [2, 3, 3, 2]  # near-equal chunks, one per stream
    np.testing.assert_array_equal(np.array(out), np.arange(30).reshape(3, 10) * 2)
    seen.clear()
    layers.split_over_streams(fn, (x[:, :3],), axis=1)  # fewer items than streams
    assert seen == [1, 1, 1]


def test_no_streams_on_a_single_core(monkeypatch):
    monkeypatch.setattr(layers.os, "cpu_count", lambda: 1)
    assert layers.cpu_streams() == []
