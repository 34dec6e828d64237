"""CPU tests for flashdiff.kernels: each public function against a naive float32/float64 computation."""

import math
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from flashdiff.kernels import (QuantizedLinear, attention, moe_gemm, quantize_model, quantized_linear,
                               resolve_backend, swap_quantized_linears)
from flashdiff.kernels.moe import moe_sorted, moe_windowed
from helpers import QMODES

TOL = {mx.float32: 1e-4, mx.float16: 3e-3, mx.bfloat16: 2e-2}


def np32(a):
    return np.array(a.astype(mx.float32))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def naive_attention(q, k, v, scale, mask=None, key_multiplier=None):
    q, k, v = (np32(a).astype(np.float64) for a in (q, k, v))
    if key_multiplier is not None:
        k = k * np.array(key_multiplier, np.float64)[:, None, :, None]
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if mask is not None:
        m = np.array(mask) if mask.dtype == mx.bool_ else np32(mask)
        s = np.where(m, s, -np.inf) if m.dtype == bool else s + m.astype(np.float64)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bhqd", p, v)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 37, 53, 16), (1, 2, 129, 129, 128), (2, 4, 5, 300, 64)])
@pytest.mark.parametrize("mask_kind", [None, "key_bool", "full_bool", "additive"])
def test_attention_matches_naive(dtype, shape, mask_kind):
    b, h, lq, lk, d = shape
    mx.random.seed(0)
    q, k, v = (mx.random.normal((b, h, n, d)).astype(dtype) for n in (lq, lk, lk))
    mask = None
    if mask_kind == "key_bool":
        mask = mx.arange(lk)[None, None, None, :] < mx.array([lk, lk - 7][:b])[:, None, None, None]
    elif mask_kind == "full_bool":
        mask = mx.random.uniform(shape=(b, h, lq, lk)) > 0.3
        mask[..., 0] = True  # no fully-masked rows
    elif mask_kind == "additive":
        mask = mx.random.normal((lq, lk)).astype(dtype)
    scale = 1 / math.sqrt(d)
    ref = naive_attention(q, k, v, scale, mask)
    for backend in (None, "reference"):
        out = attention(q, k, v, scale, mask, backend=backend)
        assert out.shape == q.shape and out.dtype == dtype
        assert rel_err(np32(out), ref) < TOL[dtype]


def test_attention_matches_torch_sdpa():
    mx.random.seed(1)
    q, k, v = (mx.random.normal((2, 3, 41, 32)) for _ in range(3))
    mask = mx.random.uniform(shape=(2, 1, 41, 41)) > 0.2
    mask[..., 0] = True
    out = attention(q, k, v, 0.2, mask)
    tt = [torch.from_numpy(np.array(a)) for a in (q, k, v, mask)]
    ref = torch.nn.functional.scaled_dot_product_attention(*tt[:3], attn_mask=tt[3], scale=0.2)
    np.testing.assert_allclose(np.array(out), ref.numpy(), atol=1e-5, rtol=1e-4)


def test_attention_gqa_and_hidream_key_multiplier():
    mx.random.seed(2)
    q = mx.random.normal((2, 4, 33, 32))
    k, v = mx.random.normal((2, 2, 47, 32)), mx.random.normal((2, 2, 47, 32))
    km = (mx.arange(47)[None, :] < mx.array([[40], [47]])).astype(mx.float32)
    out = attention(q, k, v, 0.125, key_multiplier=km)
    ref = naive_attention(q, k, v, 0.125, key_multiplier=km)
    assert rel_err(np.array(out), ref) < 1e-5
    # multiplicative mask: masked keys score 0 (not -inf), so it differs from a boolean key mask
    boolean = attention(q, k, v, 0.125, km[:, None, None, :] > 0)
    assert rel_err(np.array(boolean), ref) > 1e-3


@pytest.mark.parametrize("mask_kind", [None, "key_bool", "full_bool", "additive"])
def test_attention_blhd_layout(mask_kind):
    """layout="blhd": q (B, Lq, H, D), k / v (B, Lk, Hk, D) in, (B, Lq, H, D) out; the same numbers as the
    head-major call, with GQA and HiDream's key multiplier."""
    b, h, hk, lq, lk, d = 2, 4, 2, 29, 41, 32
    mx.random.seed(5)
    q, k, v = (mx.random.normal((b, n, heads, d)) for n, heads in ((lq, h), (lk, hk), (lk, hk)))
    mask = None
    if mask_kind == "key_bool":
        mask = mx.arange(lk)[None, None, None, :] < mx.array([lk, lk - 9])[:, None, None, None]
    elif mask_kind == "full_bool":
        mask = mx.random.uniform(shape=(b, h, lq, lk)) > 0.3
        mask[..., 0] = True
    elif mask_kind == "additive":
        mask = mx.random.normal((1, 1, 1, lk))
    km = (mx.arange(lk)[None, :] < mx.array([[35], [41]])).astype(mx.float32)
    t = (0, 2, 1, 3)
    out = attention(q, k, v, 0.17, mask, key_multiplier=km, layout="blhd")
    assert out.shape == (b, lq, h, d)
    ref = naive_attention(q.transpose(t), k.transpose(t), v.transpose(t), 0.17, mask, key_multiplier=km)
    assert rel_err(np.array(out), ref.transpose(t)) < 1e-5


def test_attention_dispatch_rule(monkeypatch):
    """Which path the default CUDA dispatch takes, on a (pretended) Hopper: the sm_90 kernel for key masks,
    for long unmasked sequences (Lq * Lk >= SM90_MIN_SCORES, aligned or not) and for shorter ones with a length
    that is not a multiple of 128 (Lq * Lk >= SM90_MIN_SCORES_ODD), cuDNN's SDPA otherwise; FLASHDIFF_ATTENTION=sdpa
    turns ours off."""
    import importlib

    from flashdiff.kernels import _gemm_cuda

    attention_module = importlib.import_module("flashdiff.kernels.attention")  # the package exports the function

    monkeypatch.setattr(attention_module, "resolve_backend", lambda backend=None: "cuda")
    monkeypatch.setattr(_gemm_cuda, "is_sm90", lambda: True)
    path = attention_module._path
    n = math.isqrt(attention_module.SM90_MIN_SCORES)
    short, long = mx.zeros((1, 24, 4621, 128), mx.bfloat16), mx.zeros((1, 24, n + 3, 128), mx.bfloat16)
    aligned = mx.zeros((1, 24, -(-n // 128) * 128, 128), mx.bfloat16)  # long, a multiple of 128
    below = mx.zeros((1, 24, n - 128, 128), mx.bfloat16)  # aligned, under the bound
    wider = mx.zeros((1, 24, n + 256, 128), mx.bfloat16)  # aligned; (n - 128) * (n + 256) > n * n
    key_mask = mx.ones((1, 1, 1, 4621), mx.bool_)
    odd_n = math.isqrt(attention_module.SM90_MIN_SCORES_ODD - 1) + 1  # the shortest length at the odd bound
    assert odd_n * odd_n >= attention_module.SM90_MIN_SCORES_ODD > (odd_n - 1) ** 2 and odd_n < n
    odd = -(-odd_n // 128) * 128 + 5  # over the odd bound, not a multiple of 128
    mid_aligned = mx.zeros((1, 24, -(-odd_n // 128) * 128, 128), mx.bfloat16)  # over the odd bound, a multiple of 128
    odd_over = mx.zeros((1, 24, odd, 128), mx.bfloat16)
    odd_below = mx.zeros((1, 24, odd_n - 1 if (odd_n - 1) % 128 else odd_n - 2, 128), mx.bfloat16)
    assert path(short, short, None, None) == "cuda_wgmma"  # 4621: odd, over the odd bound (since session 16)
    assert path(short[:, :, :4599], short[:, :, :4599], None, None) == "sdpa"  # odd, under it
    assert path(odd_over, odd_over, None, None) == "cuda_wgmma"
    assert path(odd_below, odd_below, None, None) == "sdpa"
    assert path(mid_aligned, mid_aligned, None, None) == "sdpa"
    assert path(mid_aligned, odd_over, None, None) == "cuda_wgmma"  # odd keys
    assert path(odd_over, mid_aligned, None, None) == "cuda_wgmma"  # odd queries
    assert path(long, long, None, None) == "cuda_wgmma"
    assert path(aligned, aligned, None, None) == "cuda_wgmma"
    assert path(below, below, None, None) == "sdpa"
    assert path(below, aligned, None, None) == "sdpa"
    assert path(below, wider, None, None) == "cuda_wgmma"  # Lq * Lk over the bound
    assert path(short, short, key_mask, None) == "cuda_wgmma"
    assert path(short, short, key_mask.astype(mx.bfloat16), None) == "cuda_wgmma"
    assert path(short, short, mx.ones((1, 1, 4621, 4621), mx.bool_), None) == "sdpa"  # not a key mask
    assert path(short[..., :64], short[..., :64], key_mask, None) == "sdpa"  # head dim 64
    assert path(short.astype(mx.float32), short.astype(mx.float32), key_mask, None) == "sdpa"
    assert path(long, long, None, "sdpa") == "sdpa"
    assert path(odd_below, odd_below, None, "cuda_wgmma") == "cuda_wgmma"
    monkeypatch.setenv("FLASHDIFF_ATTENTION", "sdpa")
    assert path(long, long, None, None) == "sdpa" and path(odd_over, odd_over, None, None) == "sdpa"
    monkeypatch.delenv("FLASHDIFF_ATTENTION")
    monkeypatch.setattr(_gemm_cuda, "is_sm90", lambda: False)
    assert path(long, long, key_mask[..., :n], None) == "sdpa"


def test_attention_bad_arguments():
    q = mx.zeros((1, 2, 8, 16))
    with pytest.raises(ValueError, match="same shape"):
        attention(q, q, mx.zeros((1, 2, 9, 16)), 1.0)
    with pytest.raises(ValueError, match="disagree"):
        attention(q, mx.zeros((1, 3, 8, 16)), mx.zeros((1, 3, 8, 16)), 1.0)
    with pytest.raises(ValueError, match=r"\(B, H, L, D\)"):
        attention(q[0], q[0], q[0], 1.0)
    with pytest.raises(TypeError, match="dtype"):
        attention(q, q.astype(mx.float16), q, 1.0)
    with pytest.raises(ValueError, match="broadcast"):
        attention(q, q, q, 1.0, mx.ones((3, 8), mx.bool_))
    with pytest.raises(TypeError, match="boolean"):
        attention(q, q, q, 1.0, mx.ones((8, 8), mx.int32))
    with pytest.raises(ValueError, match="key_multiplier"):
        attention(q, q, q, 1.0, key_multiplier=mx.ones((1, 7)))
    with pytest.raises(ValueError, match="Unknown kernel backend"):
        attention(q, q, q, 1.0, backend="tpu")
    with pytest.raises(ValueError, match="layout"):
        attention(q, q, q, 1.0, layout="bshd")


def test_dispatch(monkeypatch):
    assert resolve_backend() == ("cuda" if mx.cuda.is_available() else "metal" if mx.metal.is_available()
                                 else "reference") or mx.default_device() == mx.cpu
    monkeypatch.setenv("FLASHDIFF_KERNELS", "reference")
    assert resolve_backend() == "reference"
    if not mx.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            resolve_backend("cuda")


def _quant(n, k, mode, bits, group, dtype=mx.float32, seed=0):
    mx.random.seed(seed)
    w = (mx.random.normal((n, k)) * 0.05).astype(dtype)
    out = mx.quantize(w, group, bits, mode=mode)
    return out[0], out[1], (out[2] if len(out) > 2 else None)


@pytest.mark.parametrize("mode,bits,group", QMODES)
def test_quantized_linear_matches_dequantize_matmul(mode, bits, group):
    w, s, b = _quant(48, 256, mode, bits, group)
    x = mx.random.normal((3, 37, 256))
    bias = mx.random.normal((48,))
    wd = np.array(mx.dequantize(w, s, b, group_size=group, bits=bits, mode=mode, dtype=mx.float32), np.float64)
    ref = np.array(x, np.float64) @ wd.T + np.array(bias, np.float64)
    out = quantized_linear(x, w, s, b, bits, group, mode, bias=bias)
    assert out.shape == (3, 37, 48) and out.dtype == mx.float32
    np.testing.assert_allclose(np.array(out), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_quantized_linear_half_dtypes(dtype):
    w, s, b = _quant(64, 128, "affine", 4, 64, dtype=dtype)
    x = mx.random.normal((50, 128)).astype(dtype)
    ref = np32(x).astype(np.float64) @ np32(mx.dequantize(w, s, b, group_size=64, bits=4)).astype(np.float64).T
    out = quantized_linear(x, w, s, b, 4, 64)
    assert out.dtype == dtype and rel_err(np32(out), ref) < TOL[dtype]


def test_quantized_linear_bounds_live_scratch():
    """Each layer's dequantization waits for its input, so only ~one layer's scratch is alive."""
    n_layers, k = 8, 1024
    ws = [_quant(k, k, "affine", 4, 64, seed=i) for i in range(n_layers)]
    x = mx.random.normal((16, k))
    mx.eval(ws, x)

    def peak(fn):
        mx.eval(x)
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        y = x
        for w, s, b in ws:
            y = fn(y, w, s, b)
        mx.eval(y)
        return mx.get_peak_memory() - base

    naive = peak(lambda y, w, s, b: y @ mx.dequantize(w, s, b, group_size=64, bits=4).T)
    ours = peak(lambda y, w, s, b: quantized_linear(y, w, s, b, 4, 64))
    scratch = k * k * 4
    assert ours <= 5 * scratch, (ours, naive)
    assert ours < naive


def test_quantized_linear_bad_arguments():
    w, s, b = _quant(32, 128, "affine", 4, 64)
    x = mx.zeros((4, 128))
    with pytest.raises(ValueError, match="bits=7"):
        quantized_linear(x, w, s, b, 7, 64)
    with pytest.raises(ValueError, match="group_size=16"):
        quantized_linear(x, w, s, b, 4, 16)
    with pytest.raises(ValueError, match="do not"):
        quantized_linear(x, w, s, b, 8, 64)
    with pytest.raises(ValueError, match="K=128"):
        quantized_linear(mx.zeros((4, 100)), w, s, b, 4, 64)
    with pytest.raises(ValueError, match="needs `biases`"):
        quantized_linear(x, w, s, None, 4, 64)
    with pytest.raises(TypeError, match="uint32"):
        quantized_linear(x, w.astype(mx.float32), s, b, 4, 64)
    with pytest.raises(TypeError, match="float"):
        quantized_linear(x.astype(mx.int32), w, s, b, 4, 64)
    with pytest.raises(ValueError, match="bias must"):
        quantized_linear(x, w, s, b, 4, 64, bias=mx.zeros((31,)))
    with pytest.raises(ValueError, match="Unsupported quantization mode"):
        quantized_linear(x, w, s, b, 4, 64, mode="int4")
    wf, sf, _ = _quant(32, 128, "mxfp4", 4, 32)
    with pytest.raises(ValueError, match="no biases"):
        quantized_linear(x, wf, sf, b, mode="mxfp4")
    with pytest.raises(ValueError, match="bits=4, group_size=32"):
        quantized_linear(x, wf, sf, None, 4, 64, mode="mxfp4")


def test_quantized_linear_path_choice(monkeypatch):
    """FLASHDIFF_QLINEAR: a bad value is a clear error on every backend; each fused kernel (fused =
    _gemm_tma_dequant, mixed = _gemm_mixed, persistent = _gemm_tma_dequant_persistent) is taken only on CUDA
    sm_90 for arguments it supports, and none by default (qgemm.FUSED_DEFAULT)."""
    from flashdiff.kernels import _gemm_mixed, _gemm_tma_dequant, qgemm
    w, s, b = _quant(32, 128, "affine", 4, 64)
    x = mx.random.normal((64, 128)).astype(mx.bfloat16)
    monkeypatch.setenv("FLASHDIFF_QLINEAR", "fastest")
    with pytest.raises(ValueError, match="FLASHDIFF_QLINEAR='fastest'"):
        quantized_linear(x, w, s, b, 4, 64)
    for module in (_gemm_tma_dequant, _gemm_mixed):
        monkeypatch.setattr(module, "is_sm90", lambda: True)  # as on an H200: the arguments decide
    args = (x, s.astype(mx.bfloat16), 4, 64, "affine", 128, 32)
    for choice, impl, want in [("fused", "cuda", _gemm_tma_dequant), ("fused", "reference", None),
                               ("mixed", "cuda", _gemm_mixed), ("MIXED", "cuda", _gemm_mixed), ("mixed", "metal", None),
                               ("dequant", "cuda", None), ("auto", "cuda", None), ("FUSED", "cuda", _gemm_tma_dequant)]:
        monkeypatch.setenv("FLASHDIFF_QLINEAR", choice)
        assert qgemm._fused_path(impl, *args) is want, (choice, impl)
    assert not qgemm.FUSED_DEFAULT
    from flashdiff.kernels import _gemm_cuda, _gemm_tma_dequant_persistent
    monkeypatch.setattr(_gemm_cuda, "is_sm90", lambda: True)
    monkeypatch.setenv("FLASHDIFF_QLINEAR", "persistent")
    assert qgemm._fused_path("cuda", *args) is _gemm_tma_dequant_persistent
    assert qgemm._fused_path("metal", *args) is None
    for bad in [(x, s.astype(mx.bfloat16), 3, 64, "affine", 128, 32), (x, s.astype(mx.float16), 4, 64, "affine", 128, 32),
                (x, s.astype(mx.bfloat16), 4, 32, "mxfp4", 128, 32), (x, s.astype(mx.bfloat16), 4, 64, "affine", 128, 36)]:
        assert qgemm._fused_path("cuda", *bad) is None
    monkeypatch.setenv("FLASHDIFF_GEMM_ENGINE", "wgmma tma")  # only the persistent engine has the storer warps
    assert qgemm._fused_path("cuda", *args) is None
    monkeypatch.delenv("FLASHDIFF_GEMM_ENGINE")
    for choice in ("fused", "mixed"):
        monkeypatch.setenv("FLASHDIFF_QLINEAR", choice)
        assert qgemm._fused_path("cuda", x, s.astype(mx.bfloat16), 3, 64, "affine", 128, 32) is None  # 3-bit codes
        assert qgemm._fused_path("cuda", x, s.astype(mx.float16), 4, 64, "affine", 128, 32) is None  # scales' dtype != x's
        assert qgemm._fused_path("cuda", x, s.astype(mx.bfloat16), 4, 64, "affine", 96, 32) is None  # K % 64
        assert qgemm._fused_path("cuda", x, s.astype(mx.bfloat16), 4, 32, "mxfp4", 128, 32) is None
        assert qgemm._fused_path("cuda", x, s.astype(mx.bfloat16), 4, 64, "affine", 128, 36) is None  # N % 8


def test_moe_dequant_inside_gemm_is_opt_in(monkeypatch):
    """moe_gemm's quantized experts are dequantized before the GEMM (by default in the layout kernel's launch, or
    "separate") unless FLASHDIFF_GEMM_DEQUANT=fused (measured slower, session 11); a bad value is a clear error;
    only the persistent sm_90 engine and paired formats qualify for "fused"."""
    from flashdiff.kernels import _gemm_cuda, _moe_layout
    x = mx.zeros((8, 128), mx.bfloat16)
    s = mx.zeros((4, 32, 2), mx.bfloat16)
    monkeypatch.setattr(_gemm_cuda, "is_sm90", lambda: True)
    assert _gemm_cuda.dequant_choice() == "merged"  # the default: in the layout kernel's launch
    assert _moe_layout.gather_in_layout()  # so are x's routed rows gathered, for the persistent engine
    with monkeypatch.context() as m:
        m.setenv("FLASHDIFF_MOE_GATHER", "kernel")
        assert not _moe_layout.gather_in_layout()
        m.setenv("FLASHDIFF_MOE_GATHER", "layout")
        m.setenv("FLASHDIFF_GEMM_ENGINE", "wgmma persistent gather")  # copies the rows itself
        assert not _moe_layout.gather_in_layout()
        m.setenv("FLASHDIFF_MOE_GATHER", "both")
        with pytest.raises(ValueError, match="FLASHDIFF_MOE_GATHER='both'"):
            _moe_layout.gather_in_layout()
    assert not _gemm_cuda.quantized_gemm_available(x, s, 4, 64, "affine", 128, 32)
    monkeypatch.setenv("FLASHDIFF_GEMM_DEQUANT", "separate")
    assert not _gemm_cuda.quantized_gemm_available(x, s, 4, 64, "affine", 128, 32)
    monkeypatch.setenv("FLASHDIFF_GEMM_DEQUANT", "fused")
    assert _gemm_cuda.quantized_gemm_available(x, s, 4, 64, "affine", 128, 32)
    assert not _gemm_cuda.quantized_gemm_available(x, s, 5, 64, "affine", 128, 32)  # no paired path
    assert not _gemm_cuda.quantized_gemm_available(x, s.astype(mx.float32), 4, 64, "affine", 128, 32)
    monkeypatch.setenv("FLASHDIFF_GEMM_ENGINE", "wgmma tma")
    assert not _gemm_cuda.quantized_gemm_available(x, s, 4, 64, "affine", 128, 32)
    monkeypatch.setattr(_gemm_cuda, "is_sm90", lambda: False)
    monkeypatch.delenv("FLASHDIFF_GEMM_ENGINE")
    assert not _gemm_cuda.quantized_gemm_available(x, s, 4, 64, "affine", 128, 32)
    monkeypatch.setenv("FLASHDIFF_GEMM_DEQUANT", "always")
    with pytest.raises(ValueError, match="FLASHDIFF_GEMM_DEQUANT='always'"):
        _gemm_cuda.quantized_gemm_available(x, s, 4, 64, "affine", 128, 32)


@pytest.mark.parametrize("mode,bits,group", [("affine", 4, 64), ("affine", 8, 32), ("nvfp4", 4, 16)])
def test_quantized_linear_module_interchangeable(mode, bits, group, tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(64, 128)
            self.blocks = [nn.Linear(128, 128, bias=False), nn.Sequential(nn.Linear(128, 32))]

        def __call__(self, x):
            x = self.blocks[0](self.proj(x))
            return self.blocks[1](x)

    mx.random.seed(3)
    net = Net()
    x = mx.random.normal((2, 33, 64))
    nn.quantize(net, group_size=group, bits=bits, mode=mode)
    ref = net(x)
    net.save_weights(str(tmp_path / "q.safetensors"))
    keys = {k for k, _ in nn.utils.tree_flatten(net.parameters())}
    swap_quantized_linears(net)
    assert type(net.proj) is QuantizedLinear and type(net.blocks[1].layers[0]) is QuantizedLinear
    assert {k for k, _ in nn.utils.tree_flatten(net.parameters())} == keys
    np.testing.assert_allclose(np.array(net(x)), np.array(ref), atol=1e-4, rtol=1e-4)
    fresh = quantize_model(Net(), group_size=group, bits=bits, mode=mode)
    fresh.load_weights(str(tmp_path / "q.safetensors"))
    np.testing.assert_allclose(np.array(fresh(x)), np.array(ref), atol=1e-4, rtol=1e-4)
    lin = nn.Linear(64, 40)
    ql = QuantizedLinear.from_linear(lin, group, bits, mode)
    ref2 = nn.QuantizedLinear.from_linear(lin, group, bits, mode)(x)
    np.testing.assert_allclose(np.array(ql(x)), np.array(ref2), atol=1e-4, rtol=1e-4)


def naive_moe(x, w, ids):
    x, w, ids = np32(x).astype(np.float64), np32(w).astype(np.float64), np.array(ids)
    t, k = ids.shape
    xs = np.broadcast_to(x[:, None, :], (t, k, x.shape[-1])) if x.ndim == 2 else x
    return np.einsum("tjk,tjnk->tjn", xs, w[ids])


@pytest.mark.parametrize("per_slot", [False, True])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_moe_gemm_dense(per_slot, dtype):
    mx.random.seed(4)
    t, top_k, e, k_in, n = 37, 2, 4, 64, 48
    x = mx.random.normal((t, top_k, k_in) if per_slot else (t, k_in)).astype(dtype)
    w = (mx.random.normal((e, n, k_in)) * 0.1).astype(dtype)
    ids = mx.stack([mx.random.permutation(e)[:top_k] for _ in range(t)]).astype(mx.int32)
    ref = naive_moe(x, w, ids)
    outs = [moe_gemm(x, w, ids)]
    if dtype == mx.float32:  # the rejected alternatives (MLX's CPU gather_mm is float32-only)
        outs += [moe_sorted(x, w, ids), moe_windowed(x, w, ids, window=8)]
        skewed = mx.zeros_like(ids) + mx.arange(top_k, dtype=ids.dtype)  # every token to experts 0..k-1
        assert rel_err(np32(moe_windowed(x, w, skewed, window=8)), naive_moe(x, w, skewed)) < TOL[dtype]
    for out in outs:
        assert out.shape == (t, top_k, n) and out.dtype == dtype
        assert rel_err(np32(out), ref) < TOL[dtype]


@pytest.mark.parametrize("mode,bits,group", [("affine", 4, 64), ("affine", 8, 32), ("affine", 3, 128), ("mxfp4", 4, 32),
                                             ("nvfp4", 4, 16), ("mxfp8", 8, 32)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("per_slot", [False, True])
def test_moe_sorted_quantized(mode, bits, group, dtype, per_slot):
    """The Metal dispatch of moe_gemm (``moe_sorted``: rows sorted by expert, mx.gather_qmm on the packed
    experts) against a naive product with the dequantized weights, skewed and random routing.
    (On the CPU: MLX's CPU gather kernels run float32 / float16; bf16 accumulates in bf16 there.)"""
    mx.random.seed(11)
    t, top_k, e, k_in, n = 45, 2, 4, 128, 40
    x = mx.random.normal((t, top_k, k_in) if per_slot else (t, k_in)).astype(dtype)
    q = mx.quantize((mx.random.normal((e, n, k_in)) * 0.1).astype(dtype), group, bits, mode=mode)
    wq, s, b = q[0], q[1], (q[2] if len(q) > 2 else None)
    wd = mx.dequantize(wq, s, b, group, bits, mode=mode).astype(mx.float32)
    for ids in (mx.stack([mx.random.permutation(e)[:top_k] for _ in range(t)]).astype(mx.int32),
                mx.zeros((t, top_k), mx.int32) + mx.arange(top_k, dtype=mx.int32)):
        out = moe_sorted(x, wq, ids, s, b, bits, group, mode)
        assert out.shape == (t, top_k, n) and out.dtype == dtype
        assert rel_err(np32(out), naive_moe(x.astype(mx.float32), wd, ids)) < TOL[dtype]


@pytest.mark.parametrize("t, top_k, e, routing", [(300, 2, 4, "random"), (1, 1, 3, "random"), (200, 4, 8, "random"),
                                                   (150, 2, 4, "skewed"), (129, 1, 1, "random")])
@pytest.mark.parametrize("per_slot", [False, True])
def test_moe_grouped_schedule(t, top_k, e, routing, per_slot):
    """The grouped-GEMM schedule that the CUDA kernels run, with their MLX twins on the CPU: every
    routed row sits in exactly one slot of its expert's tile-aligned segment, tiles past the last
    segment are marked -1, and the grouped product equals the naive MoE."""
    from flashdiff.kernels.moe import grouped_gemm_reference, grouped_layout, moe_grouped
    mx.random.seed(8)
    k_in, n, tile = 32, 24, 128
    if routing == "skewed":  # experts 0 and 1 only: the others get no rows
        ids = mx.stack([mx.zeros((t,), mx.int32), mx.ones((t,), mx.int32)], axis=1)
    else:
        ids = mx.argsort(mx.random.uniform(shape=(t, e)), axis=-1)[:, :top_k].astype(mx.int32)
    slot_row, tile_expert = grouped_layout(ids, e, tile)
    slots, tiles, flat = slot_row.tolist(), tile_expert.tolist(), ids.reshape(-1).tolist()
    assert len(slots) == len(tiles) * tile == (t * top_k + e * (tile - 1)) // tile * tile
    assert sorted(r for r in slots if r >= 0) == list(range(t * top_k))
    for s, r in enumerate(slots):
        if r >= 0:
            assert tiles[s // tile] == flat[r]
    used = [x for x in tiles if x >= 0]
    assert used == sorted(used) and all(x == -1 for x in tiles[len(used):])
    x = mx.random.normal((t, top_k, k_in) if per_slot else (t, k_in))
    w = mx.random.normal((e, n, k_in)) * 0.1
    out = moe_grouped(x, w, ids, grouped_gemm_reference, grouped_layout)
    assert out.shape == (t, top_k, n)
    assert rel_err(np32(out), naive_moe(x, w, ids)) < TOL[mx.float32]


@pytest.mark.parametrize("mode,bits,group", [("affine", 4, 64), ("affine", 3, 32), ("affine", 8, 128),
                                             ("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)])
def test_moe_gemm_quantized(mode, bits, group):
    mx.random.seed(5)
    t, top_k, e, k_in, n = 29, 2, 4, 128, 40
    w = mx.random.normal((e, n, k_in)) * 0.1
    q = mx.quantize(w, group, bits, mode=mode)
    s, b = q[1], (q[2] if len(q) > 2 else None)
    wd = mx.dequantize(q[0], s, b, group_size=group, bits=bits, mode=mode, dtype=mx.float32)
    x = mx.random.normal((t, k_in))
    ids = mx.random.randint(0, e, (t, top_k)).astype(mx.uint32)
    out = moe_gemm(x, q[0], ids, scales=s, biases=b, bits=bits, group_size=group, mode=mode)
    np.testing.assert_allclose(np.array(out), naive_moe(x, wd, ids), atol=1e-4, rtol=1e-4)


def test_moe_gemm_bad_arguments():
    x, w = mx.zeros((8, 64)), mx.zeros((4, 32, 64))
    ids = mx.zeros((8, 2), mx.int32)
    with pytest.raises(ValueError, match="must be"):
        moe_gemm(mx.zeros((8, 63)), w, ids)
    with pytest.raises(ValueError, match="must be"):
        moe_gemm(mx.zeros((7, 64)), w, ids)
    with pytest.raises(ValueError, match="integer"):
        moe_gemm(x, w, ids.astype(mx.float32))
    with pytest.raises(ValueError, match=r"\(E, N, K\)"):
        moe_gemm(x, w[0], ids)
    with pytest.raises(TypeError, match="scales="):
        moe_gemm(x, w.astype(mx.uint32), ids)
    q, s, b = mx.quantize(mx.zeros((4, 32, 64)), 64, 4)
    with pytest.raises(ValueError, match="bits=5"):
        moe_gemm(x, q, ids, scales=s, biases=b, bits=5, group_size=64)


def test_dequant_launch_shapes():
    from flashdiff.kernels._dequant import MAX_GRID_Y, dequant_launch

    assert dequant_launch(3072, 3072) == ((384, 3072, 1), (128, 1, 1))  # 3 full blocks per row
    assert dequant_launch(27648, 2560) == ((320, 27648, 1), (64, 1, 1))
    assert dequant_launch(100000, 64) == ((8, MAX_GRID_Y, 1), (8, 1, 1))  # rows looped beyond grid y
    assert dequant_launch(40, 384) == ((48, 40, 1), (48, 1, 1))


@pytest.mark.parametrize("rows, k", [(3072, 3072), (27648, 2560), (7, 72), (1, 16), (5, 40), (130, 4096)])
def test_flat_dequant_launch_covers_every_chunk_once(rows, k):
    """The flat CUDA dequantize kernel's grid against its chunk mapping (warp w, lane l: chunks
    w * 32 * CPT + l + 32 j, j < CPT, those below ROWS * K / 8), emulated here: every 8-element chunk
    of the weight is written by exactly one thread, whatever the tail."""
    import numpy as np
    from flashdiff.kernels import _dequant

    src = _dequant._CUDA_SOURCE_FLAT
    assert "* (32 * CPT)" in src and "+ (threadIdx.x & 31)" in src and "base + 32 * j" in src
    (threads, gy, gz), (block, _, _) = _dequant.flat_launch(rows, k)
    assert (gy, gz) == (1, 1) and threads % 32 == 0
    launched = -(-threads // block) * block  # MLX launches whole threadgroups
    t = np.arange(launched)
    base = (t >> 5) * (32 * _dequant.FLAT_CPT) + (t & 31)
    chunks = (base[:, None] + 32 * np.arange(_dequant.FLAT_CPT)[None, :]).ravel()
    written = chunks[chunks < rows * k // 8]
    assert np.array_equal(np.sort(written), np.arange(rows * k // 8))


@pytest.mark.parametrize("name, sms", [("NVIDIA H200", 132), ("NVIDIA H100 80GB HBM3", 132),
                                       ("NVIDIA H100 PCIe", 114), ("NVIDIA H20", 78), ("NVIDIA H200 NVL", 132)])
def test_persistent_gemm_grid_size_by_device_name(monkeypatch, name, sms):
    """The persistent GEMM's CTA count comes from the device name ("H20" must not match "H200")."""
    from flashdiff.kernels import _gemm_tma

    monkeypatch.delenv("FLASHDIFF_NUM_SMS", raising=False)
    monkeypatch.setattr(mx, "device_info", lambda: {"device_name": name})
    _gemm_tma.num_sms.cache_clear()
    try:
        assert _gemm_tma.num_sms() == sms
    finally:
        _gemm_tma.num_sms.cache_clear()


def test_mixed_gemm_packed_arguments_name_the_problem():
    """pack_weight, mixed_gemm_packed and packed_gemv (the sm_90 mixed GEMM's packed layout) refuse what they cannot
    take before any kernel is built: bits / group, non-uint32 codes, K not a multiple of 64, scales of the wrong shape,
    a packed buffer of the wrong size for (N, K, bits, group), a 1-D or float32 x (the mixed GEMM); 32 rows or more, a
    1-D or integer x, float32 scales (packed_gemv); the wrong blocks, a float32 output (dequantize_packed)."""
    from flashdiff.kernels import _gemm_mixed

    w = mx.random.normal((200, 256)).astype(mx.bfloat16)
    wq, s, b = mx.quantize(w, 64, 4)
    with pytest.raises(ValueError, match="bits=3"):
        _gemm_mixed.pack_weight(wq, s, b, 3, 64)
    with pytest.raises(ValueError, match="uint32 codes"):
        _gemm_mixed.pack_weight(wq.astype(mx.int32), s, b, 4, 64)
    with pytest.raises(ValueError, match="scales"):
        _gemm_mixed.pack_weight(wq, s[:, :2], b, 4, 64)
    wq96, s96, b96 = mx.quantize(w[:, :96], 32, 4)
    with pytest.raises(ValueError, match="K=96"):
        _gemm_mixed.pack_weight(wq96, s96, b96, 4, 32)
    x = mx.zeros((8, 256), mx.bfloat16)
    right = -(-200 // _gemm_mixed.WT) * (256 // _gemm_mixed.BK) * _gemm_mixed.block_bytes(4, 64) // 4
    with pytest.raises(ValueError, match=f"\\({right},\\) uint32 blocks"):
        _gemm_mixed.mixed_gemm_packed(x, mx.zeros((right - 4,), mx.uint32), 200, 4, 64)
    with pytest.raises(ValueError, match="bf16 / fp16 x2"):
        _gemm_mixed.mixed_gemm_packed(x.astype(mx.float32), mx.zeros((right,), mx.uint32), 200, 4, 64)
    # packed_gemv (few rows): 32 rows or more, a 1-D x, an integer x, the wrong blocks, float32 scales
    from flashdiff.kernels import _gemm_mixed_pack

    blocks = mx.zeros((right,), mx.uint32)
    for bad, what in ((mx.zeros((32, 256), mx.bfloat16), "x2 (32, 256)"), (mx.zeros((256,), mx.bfloat16), "x2 (256,)"),
                      (mx.zeros((2, 256), mx.int32), "int32")):
        with pytest.raises(ValueError, match=re.escape(what)):
            _gemm_mixed_pack.packed_gemv(bad, blocks, 200, 4, 64, mx.bfloat16)
    with pytest.raises(ValueError, match=f"\({right},\) uint32 blocks"):
        _gemm_mixed_pack.packed_gemv(x[:2], blocks[:-4], 200, 4, 64, mx.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        _gemm_mixed_pack.packed_gemv(x[:2], blocks, 200, 4, 64, mx.float32)
    # dequantize_packed: the wrong blocks (size, dtype, K not a multiple of 64), a float32 output
    for bad_blocks in (blocks[:-4], blocks.astype(mx.int32)):
        with pytest.raises(ValueError, match=re.escape(f"dequantize_packed needs pack_weight's ({right},) uint32 blocks "
                                                       "for N=200, K=256")):
            _gemm_mixed_pack.dequantize_packed(bad_blocks, 200, 256, 4, 64, mx.bfloat16)
    with pytest.raises(ValueError, match="dequantize_packed: K=96 is not a multiple of 64"):
        _gemm_mixed_pack.dequantize_packed(blocks, 200, 96, 4, 64, mx.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        _gemm_mixed_pack.dequantize_packed(blocks, 200, 256, 4, 64, mx.float32)
    with pytest.raises(ValueError, match=re.escape("2-D x2 (M, K), got (256,)")):
        _gemm_mixed.mixed_gemm_packed(x[0], blocks, 200, 4, 64)


def test_packed_gemm_rule_follows_the_waves(monkeypatch):
    """qgemm.packed_gemm_wins: the mixed GEMM for calls of up to PACKED_MAX_M rows whose 192 x 128 tiles fill the last
    wave of CTAs (132 multiprocessors: the H200 cases session 18 measured), dequantize + GEMM elsewhere."""
    from flashdiff.kernels import _gemm_tma, qgemm

    monkeypatch.setenv("FLASHDIFF_NUM_SMS", "132")
    _gemm_tma.num_sms.cache_clear()
    try:
        cases = {(1024, 3072): True, (1024, 12288): True, (2048, 3072): True, (1536, 12288): True,
                 (1536, 3072): False, (512, 3072): False, (512, 12288): False, (4608, 3072): False, (3072, 3072): False}
        assert {c: qgemm.packed_gemm_wins(*c) for c in cases} == cases
    finally:
        _gemm_tma.num_sms.cache_clear()


def test_packing_is_off_the_gpu_and_its_setting_checked(monkeypatch):
    """pack_quantized_linears packs nothing on the CPU; on sm_90 it packs with FLASHDIFF_QLINEAR_PACKED=1 (or by
    PACKED_DEFAULT), not with 0 or with a FLASHDIFF_QLINEAR path picked; a bad value names the accepted ones."""
    import mlx.nn as nn

    from flashdiff.kernels import QuantizedLinear, pack_quantized_linears, qgemm

    linear = nn.Linear(128, 64)
    linear.set_dtype(mx.bfloat16)
    model = nn.Sequential(QuantizedLinear.from_linear(linear, 64, 4))
    assert qgemm.packable(model.layers[0])
    assert pack_quantized_linears(model) == 0 and type(model.layers[0]) is QuantizedLinear
    monkeypatch.setattr(qgemm, "resolve_backend", lambda backend=None: "cuda")
    monkeypatch.setattr(qgemm._gemm_cuda, "is_sm90", lambda: True)
    assert qgemm.packing_enabled() == qgemm.PACKED_DEFAULT
    monkeypatch.setenv("FLASHDIFF_QLINEAR_PACKED", "1")
    assert qgemm.packing_enabled()
    for name, value in (("FLASHDIFF_QLINEAR_PACKED", "0"), ("FLASHDIFF_QLINEAR", "dequant")):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            assert not qgemm.packing_enabled()
    monkeypatch.setenv("FLASHDIFF_QLINEAR_PACKED", "yes")
    with pytest.raises(ValueError, match="FLASHDIFF_QLINEAR_PACKED='yes'"):
        qgemm.packing_enabled()
    odd = nn.Linear(96, 64)  # K not a multiple of 64
    odd.set_dtype(mx.bfloat16)
    assert not qgemm.packable(QuantizedLinear.from_linear(odd, 32, 4))
    assert not qgemm.packable(QuantizedLinear.from_linear(nn.Linear(128, 64), 64, 4))  # float32 scales
    assert not qgemm.packable(linear)  # not quantized
