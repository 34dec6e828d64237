"""kernels.qk_norm_rope (q/k RMSNorm + RoPE + joint sequence): the reference against a naive numpy
computation on the CPU; the CUDA / Metal kernels against the reference where those back-ends exist."""

import mlx.core as mx
import numpy as np
import pytest

from flashdiff.kernels import qk_norm_rope, qk_norm_rope_reference
from flashdiff.kernels.qk_rope import launch_config
from helpers import qk_rope_sources


def naive(sources, heads, dh, cos, sin, eps):
    """float64 numpy: per-head RMSNorm (weight), interleaved rotation, concatenation over streams."""
    qs, ks, vs = [], [], []
    for t, wq, wk in sources:
        t = np.array(t.astype(mx.float32), dtype=np.float64)
        b, length, _ = t.shape
        u = t[..., : 3 * heads * dh].reshape(b, length, 3, heads, dh)
        for part, w, acc in ((0, wq, qs), (1, wk, ks)):
            x = u[:, :, part]
            x = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * np.array(w.astype(mx.float32), dtype=np.float64)
            acc.append(x)
        vs.append(u[:, :, 2])
    q, k, v = (np.concatenate(a, axis=1) for a in (qs, ks, vs))
    c = np.array(cos, dtype=np.float64)[None, :, None, :]
    s = np.array(sin, dtype=np.float64)[None, :, None, :]

    def rot(x):
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x0 * c - x1 * s, x0 * s + x1 * c
        return out

    return rot(q), rot(k), v


@pytest.mark.parametrize("lengths,heads,dh,extra", [((5, 11), 3, 16, 0), ((7,), 2, 64, 40), ((1, 4), 1, 128, 0)])
def test_reference_matches_naive(lengths, heads, dh, extra):
    sources, cos, sin = qk_rope_sources(lengths, heads, dh, extra)
    q, k, v = qk_norm_rope(sources, heads, dh, cos, sin, 1e-6)
    nq, nk, nv = naive(sources, heads, dh, cos, sin, 1e-6)
    for ours, want in ((q, nq), (k, nk), (v, nv)):
        assert ours.shape == want.shape == (2, sum(lengths), heads, dh)
        np.testing.assert_allclose(np.array(ours), want, rtol=2e-5, atol=2e-5)


def test_reference_bf16_close_to_naive():
    sources, cos, sin = qk_rope_sources((9, 13), 2, 64, dtype=mx.bfloat16)
    q, k, _ = qk_norm_rope(sources, 2, 64, cos, sin, 1e-6)
    nq, nk, _ = naive(sources, 2, 64, cos, sin, 1e-6)
    assert q.dtype == mx.bfloat16
    for ours, want in ((q, nq), (k, nk)):
        err = np.abs(np.array(ours.astype(mx.float32)) - want).max() / np.abs(want).max()
        assert err < 2e-2


def test_bad_arguments():
    sources, cos, sin = qk_rope_sources((5, 6), 2, 16)
    with pytest.raises(ValueError, match="one or two"):
        qk_norm_rope(sources * 2, 2, 16, cos, sin, 1e-6)
    with pytest.raises(ValueError, match="cos/sin"):
        qk_norm_rope(sources, 2, 16, cos[:-1], sin[:-1], 1e-6)
    with pytest.raises(ValueError, match=r">= 3\*H\*Dh"):
        qk_norm_rope(sources, 3, 16, cos, sin, 1e-6)
    t, wq, wk = sources[0]
    with pytest.raises(ValueError, match="norm weights"):
        qk_norm_rope([(t, wq[:8], wk)], 2, 16, cos[:5], sin[:5], 1e-6)
    with pytest.raises(TypeError, match="dtype"):
        qk_norm_rope([(t, wq, wk), (sources[1][0].astype(mx.float16), wq, wk)], 2, 16, cos, sin, 1e-6)
    with pytest.raises(ValueError, match="even"):
        qk_norm_rope([(t[..., :45], wq[:15], wk[:15])], 1, 15, cos[:5, :7], sin[:5, :7], 1e-6)


def test_launch_config():
    sources, _, _ = qk_rope_sources((5, 11), 3, 64, extra=8)
    template, shape, grid, group = launch_config(sources, 3, 64)
    t = dict(template)
    assert (t["NB"], t["LA"], t["LB"], t["SA"], t["SB"], t["H"], t["DH"]) == (2, 5, 11, 3 * 3 * 64 + 8, 3 * 3 * 64, 3, 64)
    assert shape == (2, 16, 3, 64) and grid == (2 * 16 * 3 * 32, 1, 1) and group == (256, 1, 1)
    template, shape, _, _ = launch_config(sources[:1], 3, 64)
    assert dict(template)["LB"] == 0 and shape == (2, 5, 3, 64)


GPU_CASES = [((5, 11), 3, 64, 0), ((512, 4096), 2, 128, 0), ((37,), 3, 128, 96), ((1, 300), 1, 128, 0)]


def _gpu_case(backend, lengths, heads, dh, extra, dtype):
    sources, cos, sin = qk_rope_sources(lengths, heads, dh, extra, dtype=dtype, seed=3)
    ref = qk_norm_rope_reference(sources, heads, dh, cos, sin, 1e-6)
    out = qk_norm_rope(sources, heads, dh, cos, sin, 1e-6, backend=backend)
    for o, r in zip(out, ref):
        assert o.shape == r.shape and o.dtype == r.dtype
        o32, r32 = np.array(o.astype(mx.float32)), np.array(r.astype(mx.float32))
        tol = 1e-5 if dtype == mx.float32 else 2e-2
        np.testing.assert_allclose(o32, r32, rtol=tol, atol=tol * np.abs(r32).max())


@pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX with the CUDA back-end (an NVIDIA GPU)")
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("lengths,heads,dh,extra", GPU_CASES)
def test_cuda_kernel_matches_reference(lengths, heads, dh, extra, dtype):
    _gpu_case("cuda", lengths, heads, dh, extra, dtype)


@pytest.mark.skipif(not mx.metal.is_available(), reason="needs Apple silicon (Metal); the Metal kernel has never run")
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("lengths,heads,dh,extra", GPU_CASES)
def test_metal_kernel_matches_reference(lengths, heads, dh, extra, dtype):
    _gpu_case("metal", lengths, heads, dh, extra, dtype)
