"""CUDA kernels against the pure-MLX reference (run on the CPU stream). Skipped without CUDA."""

import math

import mlx.core as mx
import numpy as np
import pytest

from flashdiff.kernels import attention, attention_reference, dequantize, moe_gemm, quantized_linear

pytestmark = pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX with the CUDA back-end (an NVIDIA GPU)")

QMODES = [("affine", b, g) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)] + [
    ("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)]


def f64(a):
    return np.array(a.astype(mx.float32), dtype=np.float64)


def rel_err(a, b):
    a, b = f64(a), f64(b)
    assert np.isfinite(a).all()
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def quant(shape, mode, bits, group, dtype=mx.bfloat16, seed=0):
    mx.random.seed(seed)
    w = (mx.random.normal(shape) * 0.05).astype(dtype)
    q = mx.quantize(w, group, bits, mode=mode, stream=mx.cpu)
    return q[0], q[1], (q[2] if len(q) > 2 else None)


@pytest.mark.parametrize("mode,bits,group", QMODES)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_dequantize_kernel(mode, bits, group, dtype):
    w, s, b = quant((3, 40, 384), mode, bits, group)
    ref = mx.dequantize(w, s, b, group_size=group, bits=bits, mode=mode, dtype=mx.float32, stream=mx.cpu)
    out = dequantize(w, s, b, bits, group, mode, dtype=dtype, backend="cuda")
    assert out.shape == ref.shape and out.dtype == dtype
    # bf16: the reference rounds q*s and +b separately in bf16, the kernel once from float32: 1 ulp
    tol = 0.0 if dtype == mx.float32 else 2 ** -7
    np.testing.assert_allclose(f64(out), f64(ref), rtol=tol, atol=1e-7)


@pytest.mark.parametrize("mode,bits,group", [("affine", 4, 64), ("affine", 8, 64), ("affine", 3, 32),
                                             ("affine", 5, 128), ("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)])
@pytest.mark.parametrize("m", [5, 300])
def test_quantized_linear_cuda(mode, bits, group, m):
    w, s, b = quant((200, 512), mode, bits, group)
    mx.random.seed(1)
    x = mx.random.normal((m, 512)).astype(mx.bfloat16)
    bias = mx.random.normal((200,)).astype(mx.bfloat16)
    ref = quantized_linear(x, w, s, b, bits, group, mode, bias=bias, backend="reference")
    ref = mx.eval(ref) or ref
    out = quantized_linear(x, w, s, b, bits, group, mode, bias=bias, backend="cuda")
    assert out.dtype == mx.bfloat16 and out.shape == (m, 200)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("quantized", [None, ("affine", 4, 64), ("mxfp4", 4, 32), ("affine", 8, 64)])
@pytest.mark.parametrize("per_slot", [False, True])
def test_moe_gemm_cuda(quantized, per_slot):
    mx.random.seed(2)
    t, top_k, e, k_in, n = 300, 2, 4, 256, 192
    x = mx.random.normal((t, top_k, k_in) if per_slot else (t, k_in)).astype(mx.bfloat16)
    ids = mx.argsort(mx.random.uniform(shape=(t, e)), axis=-1)[:, :top_k].astype(mx.int32)
    if quantized is None:
        w = (mx.random.normal((e, n, k_in)) * 0.05).astype(mx.bfloat16)
        kw = {}
    else:
        mode, bits, group = quantized
        w, s, b = quant((e, n, k_in), mode, bits, group)
        kw = dict(scales=s, biases=b, bits=bits, group_size=group, mode=mode)
    ref = moe_gemm(x.astype(mx.float32), w, ids, backend="reference", **kw)
    out = moe_gemm(x, w, ids, backend="cuda", **kw)
    assert out.shape == (t, top_k, n) and out.dtype == mx.bfloat16
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("backend", ["cuda", "cuda_flash"])
@pytest.mark.parametrize("shape", [(1, 2, 300, 300, 128), (2, 3, 129, 77, 64), (1, 4, 64, 1000, 128)])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_cuda(backend, shape, masked):
    b, h, lq, lk, d = shape
    mx.random.seed(3)
    q, k, v = (mx.random.normal((b, h, n, d)).astype(mx.bfloat16) for n in (lq, lk, lk))
    mask = None
    if masked:
        lengths = mx.array([lk - 5 * i - 3 for i in range(b)])
        mask = mx.arange(lk)[None, None, None, :] < lengths[:, None, None, None]
    scale = 1 / math.sqrt(d)
    ref = attention_reference(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), scale, mask)
    out = attention(q, k, v, scale, mask, backend=backend)
    assert out.shape == q.shape and out.dtype == mx.bfloat16
    assert rel_err(out, ref) < 1e-2


def test_attention_cuda_flash_gqa_and_key_multiplier():
    mx.random.seed(4)
    q = mx.random.normal((1, 4, 200, 128)).astype(mx.bfloat16)
    k, v = (mx.random.normal((1, 2, 333, 128)).astype(mx.bfloat16) for _ in range(2))
    km = (mx.arange(333)[None, :] < 300).astype(mx.bfloat16)
    ref = attention(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), 0.1, key_multiplier=km,
                    backend="reference")
    for backend in ("cuda", "cuda_flash"):
        assert rel_err(attention(q, k, v, 0.1, key_multiplier=km, backend=backend), ref) < 1e-2


def test_dequantize_kernel_more_rows_than_grid_y():
    """Rows beyond CUDA's gridDim.y limit (65535) are covered by the kernel's row loop."""
    w, s, b = quant((70001, 64), "affine", 4, 32)
    ref = mx.dequantize(w, s, b, group_size=32, bits=4, dtype=mx.float32, stream=mx.cpu)
    out = dequantize(w, s, b, 4, 32, "affine", dtype=mx.float32, backend="cuda")
    assert mx.array_equal(out, ref).item()
