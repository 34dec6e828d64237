"""CUDA kernels against the pure-MLX reference (run on the CPU stream). Skipped without CUDA."""

import math

import mlx.core as mx
import pytest

from flashdiff.kernels import _gemm_cuda, _moe_layout, attention, attention_reference, dequantize
from helpers import (MOE_QUANT_CASES, QLINEAR_CASES, QMODES, check_dequantize, check_moe_gemm,
                     check_quantized_linear, check_same_layout, quant, rel_err)

pytestmark = pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX with the CUDA back-end (an NVIDIA GPU)")



@pytest.mark.parametrize("mode,bits,group", QMODES)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_dequantize_kernel(mode, bits, group, dtype):
    check_dequantize("cuda", mode, bits, group, dtype)


@pytest.mark.parametrize("bits, group", [(4, 64), (8, 64), (4, 32), (8, 128)])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("shape", [(3, 40, 384), (3072, 3072)])
def test_dequantize_kernel_paired_path_exact(bits, group, dtype, shape):
    """The flat kernel's paired path (affine 4/8-bit, scales in the output's dtype) bit-identical to MLX's
    CPU dequantize in that dtype, and to the kernel's own float path (FLASHDIFF_DEQUANT_FLOAT=1)."""
    import os

    from flashdiff.kernels import _dequant

    w, s, b = quant(shape, "affine", bits, group, dtype=dtype, seed=4)
    out = dequantize(w, s, b, bits, group, "affine", dtype=dtype, backend="cuda")
    ref = mx.dequantize(w, s, b, group_size=group, bits=bits, dtype=dtype, stream=mx.cpu)
    assert _dequant.paired(dtype, s.dtype, bits, "affine")
    assert mx.array_equal(out.view(mx.uint16), ref.view(mx.uint16)).item()
    os.environ["FLASHDIFF_DEQUANT_FLOAT"] = "1"
    try:
        floated = dequantize(w, s, b, bits, group, "affine", dtype=dtype, backend="cuda")
        mx.eval(floated)
    finally:
        del os.environ["FLASHDIFF_DEQUANT_FLOAT"]
    assert mx.array_equal(floated.view(mx.uint16), out.view(mx.uint16)).item()


@pytest.mark.parametrize("mode,bits,group", QLINEAR_CASES)
@pytest.mark.parametrize("m", [5, 300])
def test_quantized_linear_cuda(mode, bits, group, m):
    check_quantized_linear("cuda", mode, bits, group, m)


FUSED_CASES = [(m, k, n, with_bias, bits, group)
               for m, k, n, with_bias in [(300, 512, 200, True), (200, 320, 264, False), (1024, 3072, 3072, True)]
               for bits, group in [(4, 64), (8, 64), (4, 32), (8, 128)] if k % group == 0]


def _fused_quantized_linear(monkeypatch, path, kernel, seed, bits, group, dtype, m, k, n, with_bias):
    """quantized_linear under FLASHDIFF_QLINEAR=path (the sm_90 kernel module `kernel` must take the case),
    checked against float32 on MLX's CPU dequantize (rel. L2 < 1e-2); returns (x, bias, w_deq, out). MLX's
    CPU dequantize is the reference our kernels match (its CUDA kernel rounds q * s + b once, a fused
    multiply-add, where the CPU rounds the product and then the sum: 1 ulp apart in some elements)."""
    from flashdiff.kernels import quantized_linear
    if not _gemm_cuda.is_sm90():
        pytest.skip(f"FLASHDIFF_QLINEAR={path} needs an sm_90 GPU")
    monkeypatch.setenv("FLASHDIFF_QLINEAR", path)
    mx.random.seed(seed)
    w = (mx.random.normal((n, k)) * 0.05).astype(dtype)
    wq, s, b = mx.quantize(w, group, bits)
    x = mx.random.normal((m, k)).astype(dtype)
    bias = mx.random.normal((n,)).astype(dtype) if with_bias else None
    assert kernel.supported(x, s, bits, group, "affine", k, n)
    out = quantized_linear(x, wq, s, b, bits, group, "affine", bias=bias)
    w_deq = mx.dequantize(wq, s, b, group, bits, stream=mx.cpu)
    ref = x.astype(mx.float32) @ w_deq.astype(mx.float32).T + (0 if bias is None else bias.astype(mx.float32))
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out, ref) < 1e-2
    return x, bias, w_deq, out, ref


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("m, k, n, with_bias, bits, group", FUSED_CASES)
def test_quantized_linear_cuda_fused(monkeypatch, bits, group, dtype, m, k, n, with_bias):
    """The fused dequantize GEMM (_gemm_tma_dequant) as quantized_linear runs it (FLASHDIFF_QLINEAR=fused):
    without bias bit-identical to the TMA GEMM on mx.dequantize's weight (same MMA order: every
    dequantized value equal to MLX's CPU dequantize), with bias against dequantize + matmul + bias."""
    from flashdiff.kernels import _gemm_tma_dequant
    x, bias, w_deq, out, ref = _fused_quantized_linear(monkeypatch, "fused", _gemm_tma_dequant, bits + group + m,
                                                       bits, group, dtype, m, k, n, with_bias)
    if not with_bias:
        same = _gemm_cuda.dense_gemm(x, w_deq, engine="wgmma tma")
        diff = mx.abs(out.astype(mx.float32) - same.astype(mx.float32))
        assert mx.array_equal(out, same).item(), (f"max |diff| {diff.max().item()} in {(diff > 0).sum().item()} of "
                                                  f"{diff.size} elements; rel_err vs float32 {rel_err(same, ref)}")


MIXED_CASES = FUSED_CASES + [(129, 448, 392, False, 8, 32), (4608, 3072, 3072, False, 4, 64)]


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("m, k, n, with_bias, bits, group", MIXED_CASES)
def test_quantized_linear_cuda_mixed(monkeypatch, bits, group, dtype, m, k, n, with_bias):
    """The mixed-input GEMM (_gemm_mixed) as quantized_linear runs it (FLASHDIFF_QLINEAR=mixed): against
    float32 on MLX's CPU dequantize (rel. L2 < 1e-2), and within a few bf16 roundings of the TMA GEMM on that
    weight (rel. L2 < 2e-3; the share of bit-identical elements is in the message)."""
    from flashdiff.kernels import _gemm_mixed
    x, bias, w_deq, out, _ = _fused_quantized_linear(monkeypatch, "mixed", _gemm_mixed, bits + group + m + 7,
                                                     bits, group, dtype, m, k, n, with_bias)
    same = _gemm_cuda.dense_gemm(x, w_deq, engine="wgmma tma")
    if bias is not None:
        same = (same.astype(mx.float32) + bias.astype(mx.float32)).astype(dtype)
    equal = (out == same).astype(mx.float32).mean().item()
    # with a bias the comparison rounds twice (GEMM, then + bias) where the kernel rounds once
    assert rel_err(out, same) < (5e-3 if with_bias else 2e-3), f"{equal:.4f} of the elements bit-identical to the TMA GEMM"


@pytest.mark.parametrize("m, k, n, with_bias, bits, group", [(200, 320, 264, False, 4, 64), (300, 512, 200, True, 8, 64),
                                                           (129, 448, 392, False, 8, 32), (1024, 3072, 3072, True, 4, 64)])
def test_mixed_gemm_packed_cuda(m, k, n, with_bias, bits, group):
    """The mixed GEMM in PACKED mode (pack_weight's blocks, one bulk copy per stage) equals the unpacked mixed GEMM bit
    for bit, and the unpacked one is within rel. L2 1e-2 of float32 on MLX's CPU dequantize."""
    from flashdiff.kernels import _gemm_mixed
    if not _gemm_cuda.is_sm90():
        pytest.skip("the mixed GEMM needs an sm_90 GPU")
    mx.random.seed(m + k + bits)
    w = (mx.random.normal((n, k)) * 0.05).astype(mx.bfloat16)
    wq, s, b = mx.quantize(w, group, bits)
    x = mx.random.normal((m, k)).astype(mx.bfloat16)
    bias = mx.random.normal((n,)).astype(mx.bfloat16) if with_bias else None
    plain = _gemm_mixed.mixed_gemm(x, wq, s, b, bits, group, bias)
    packed = _gemm_mixed.mixed_gemm_packed(x, _gemm_mixed.pack_weight(wq, s, b, bits, group), n, bits, group, bias)
    w_deq = mx.dequantize(wq, s, b, group, bits, stream=mx.cpu).astype(mx.float32)
    ref = x.astype(mx.float32) @ w_deq.T + (0 if bias is None else bias.astype(mx.float32))
    assert rel_err(plain, ref) < 1e-2
    assert mx.array_equal(packed, plain).item()


@pytest.mark.parametrize("quantized", MOE_QUANT_CASES)
@pytest.mark.parametrize("per_slot", [False, True])
def test_moe_gemm_cuda(quantized, per_slot):
    check_moe_gemm("cuda", quantized, per_slot)


@pytest.mark.parametrize("t, e, k_in, n, routing", [
    (300, 4, 256, 192, "random"), (1000, 4, 72, 40, "random"), (129, 8, 2560, 264, "random"),
    (500, 4, 256, 128, "one expert"), (3, 4, 64, 64, "random")])
@pytest.mark.parametrize("engine", ["mma", "wgmma", "wgmma wait", "wgmma ws", "wgmma tma", "wgmma persistent",
                                    "wgmma persistent gather"])
def test_grouped_gemm_cuda(t, e, k_in, n, routing, engine):
    """The grouped tensor-core GEMM (MoE path) against MLX ops on the same schedule: K tails
    (K % 32 != 0), N tails (N % 128 != 0), experts with no rows, a single routed row per expert."""
    import functools
    from flashdiff.kernels.moe import grouped_gemm_reference, grouped_layout, moe_grouped
    if engine != "mma" and not _gemm_cuda.is_sm90():
        pytest.skip("wgmma needs an sm_90 GPU")
    gemm = functools.partial(_gemm_cuda.grouped_gemm, engine=engine)
    mx.random.seed(5)
    top_k = 2
    x = mx.random.normal((t, k_in)).astype(mx.bfloat16)
    w = (mx.random.normal((e, n, k_in)) * 0.05).astype(mx.bfloat16)
    if routing == "one expert":
        ids = mx.stack([mx.zeros((t,), mx.int32), mx.full((t,), 2, mx.int32)], axis=1)
    else:
        ids = mx.argsort(mx.random.uniform(shape=(t, e)), axis=-1)[:, :top_k].astype(mx.int32)
    ref = moe_grouped(x.astype(mx.float32), w.astype(mx.float32), ids, grouped_gemm_reference, grouped_layout)
    out = moe_grouped(x, w, ids, gemm)
    assert out.shape == (t, top_k, n) and out.dtype == mx.bfloat16
    assert rel_err(out, ref) < 1e-2
    out16 = moe_grouped(x.astype(mx.float16), w.astype(mx.float16), ids, gemm)
    assert rel_err(out16, ref) < 2e-3
    x3 = mx.random.normal((t, top_k, k_in)).astype(mx.bfloat16)  # one input row per slot
    ref3 = moe_grouped(x3.astype(mx.float32), w.astype(mx.float32), ids, grouped_gemm_reference, grouped_layout)
    assert rel_err(moe_grouped(x3, w, ids, gemm), ref3) < 1e-2


@pytest.mark.parametrize("t, e, k_in, n, top_k", [(4096, 4, 2560, 6912, 2), (777, 3, 200, 264, 2), (129, 8, 72, 40, 4)])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_gather_form_equals_persistent_cuda(t, e, k_in, n, top_k, dtype):
    """The persistent GEMM's gather form (the loader warps copy x's routed rows with cp.async; no gather kernel)
    is bit-identical to the persistent form over gathered rows (same wgmmas in the same order): HiDream's MoE
    shape, K and N tails, (T, K) and (T, k, K) inputs."""
    import functools
    from flashdiff.kernels.moe import grouped_gemm_reference, grouped_layout, moe_grouped
    if not _gemm_cuda.is_sm90():
        pytest.skip("wgmma needs an sm_90 GPU")
    mx.random.seed(9)
    w = (mx.random.normal((e, n, k_in)) * 0.05).astype(dtype)
    ids = mx.argsort(mx.random.uniform(shape=(t, e)), axis=-1)[:, :top_k].astype(mx.int32)
    for x in (mx.random.normal((t, k_in)).astype(dtype), mx.random.normal((t, top_k, k_in)).astype(dtype)):
        outs = [moe_grouped(x, w, ids, functools.partial(_gemm_cuda.grouped_gemm, engine=engine))
                for engine in ("wgmma persistent", "wgmma persistent gather")]
        mx.eval(outs)
        assert mx.array_equal(outs[0], outs[1]).item(), f"max diff {mx.abs(outs[0] - outs[1]).max().item()}"
        ref = moe_grouped(x.astype(mx.float32), w.astype(mx.float32), ids, grouped_gemm_reference, grouped_layout)
        assert rel_err(outs[1], ref) < 1e-2


@pytest.mark.parametrize("t, top_k, e", [(4096, 2, 4), (77, 1, 1), (1000, 4, 64), (300, 2, 300)])
def test_moe_layout_cuda(t, top_k, e):
    """The layout kernel places rows as grouped_layout does (helpers.check_same_layout)."""
    mx.random.seed(6)
    ids = mx.argsort(mx.random.uniform(shape=(t, e)), axis=-1)[:, :top_k].astype(mx.int32)
    slot, tiles = _moe_layout.layout(ids, e)
    check_same_layout(slot, tiles, ids, e)


@pytest.mark.parametrize("m, k_in, n", [(1024, 3072, 3072), (777, 72, 40), (129, 2560, 264), (5, 64, 8)])
@pytest.mark.parametrize("engine", ["mma", "wgmma", "wgmma ws", "wgmma tma", "wgmma persistent",
                                    "wgmma persistent gather"])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_dense_gemm_cuda(m, k_in, n, engine, dtype):
    if engine != "mma" and not _gemm_cuda.is_sm90():
        pytest.skip("wgmma needs an sm_90 GPU")
    mx.random.seed(7)
    x = mx.random.normal((m, k_in)).astype(dtype)
    w = (mx.random.normal((n, k_in)) * 0.05).astype(dtype)
    ref = x.astype(mx.float32) @ w.astype(mx.float32).T
    out = _gemm_cuda.dense_gemm(x, w, engine=engine)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, ref) < (1e-2 if dtype == mx.bfloat16 else 2e-3)


@pytest.mark.parametrize("backend", ["cuda", "cuda_flash", "cuda_wgmma"])
@pytest.mark.parametrize("shape", [(1, 2, 300, 300, 128), (2, 3, 129, 77, 64), (1, 4, 64, 1000, 128),
                                   (2, 2, 4621, 4621, 128)])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_cuda(backend, shape, masked):
    """Each CUDA attention path against the float32 reference: odd lengths (key and query tails inside
    a tile), more keys than queries, batch > 1 with per-batch key masks."""
    b, h, lq, lk, d = shape
    if backend == "cuda_wgmma" and (d != 128 or not _gemm_cuda.is_sm90()):
        pytest.skip("the wgmma attention needs head dim 128 on an sm_90 GPU")
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


@pytest.mark.parametrize("lk", [141, 150, 300, 230, 13, 4621, 4700])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_cuda_wgmma_last_key_tile(lk, masked):
    """The sm_90 kernel's last, partial key tile (run after its loop, its P V over ceil((Lk % 128) / 16) k16 steps only,
    session 17) with the tail's keys carrying a large share of each row's weight, so that a tail key lost or misread
    fails: against the float32 reference, with and without a key mask."""
    if not _gemm_cuda.is_sm90():
        pytest.skip("the wgmma attention needs an sm_90 GPU")
    mx.random.seed(lk)
    first_tail_key = (lk - 1) // 128 * 128
    q = mx.random.normal((1, 2, 200, 128)) * 0.3 + 1.0
    k = mx.random.normal((1, 2, lk, 128)) * 0.5
    k = mx.where((mx.arange(lk) >= first_tail_key)[None, None, :, None], 0.25 + 0.2 * mx.random.normal(k.shape), k)
    v = mx.random.normal((1, 2, lk, 128))
    q, k, v = (a.astype(mx.bfloat16) for a in (q, k, v))
    mask = (mx.arange(lk) < lk - 2)[None, None, None, :] if masked else None
    ref = attention_reference(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), 0.088, mask)
    out = attention(q, k, v, 0.088, mask, backend="cuda_wgmma")
    assert rel_err(out, ref) < 1e-2


def test_attention_cuda_flash_gqa_and_key_multiplier():
    mx.random.seed(4)
    q = mx.random.normal((1, 4, 200, 128)).astype(mx.bfloat16)
    k, v = (mx.random.normal((1, 2, 333, 128)).astype(mx.bfloat16) for _ in range(2))
    km = (mx.arange(333)[None, :] < 300).astype(mx.bfloat16)
    ref = attention(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), 0.1, key_multiplier=km,
                    backend="reference")
    for backend in ("cuda", "cuda_flash") + (("cuda_wgmma",) if _gemm_cuda.is_sm90() else ()):
        assert rel_err(attention(q, k, v, 0.1, key_multiplier=km, backend=backend), ref) < 1e-2, backend


def test_attention_cuda_wgmma_float16_additive_key_bias():
    """The sm_90 attention in float16 with an additive (not boolean) key mask, two query tiles, one KV tail."""
    if not _gemm_cuda.is_sm90():
        pytest.skip("the wgmma attention needs an sm_90 GPU")
    mx.random.seed(6)
    q, k, v = (mx.random.normal((1, 3, 257, 128)).astype(mx.float16) for _ in range(3))
    bias = (mx.random.uniform(shape=(1, 1, 1, 257)) * -4).astype(mx.float16)
    ref = attention_reference(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), 0.09, bias)
    out = attention(q, k, v, 0.09, bias, backend="cuda_wgmma")
    assert out.dtype == mx.float16 and rel_err(out, ref) < 5e-3


@pytest.mark.parametrize("masked", [False, True])
def test_attention_cuda_wgmma_seq_major(masked):
    """The sm_90 kernel on (B, L, H, 128) inputs (layout="blhd", as joint_attention passes them): batch 2
    (rows past a batch's end are the next batch's), GQA, odd lengths, per-batch key masks."""
    if not _gemm_cuda.is_sm90():
        pytest.skip("the wgmma attention needs an sm_90 GPU")
    mx.random.seed(8)
    b, h, hk, lq, lk = 2, 4, 2, 333, 461
    q, k, v = (mx.random.normal((b, n, heads, 128)).astype(mx.bfloat16) for n, heads in ((lq, h), (lk, hk), (lk, hk)))
    mask = (mx.arange(lk)[None, None, None, :] < mx.array([lk - 3, 200])[:, None, None, None]) if masked else None
    t = (0, 2, 1, 3)
    ref = attention_reference(*(a.transpose(t).astype(mx.float32) for a in (q, k, v)), 0.088, mask).transpose(t)
    out = attention(q, k, v, 0.088, mask, backend="cuda_wgmma", layout="blhd")
    assert out.shape == (b, lq, h, 128) and rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("seq_major", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_cuda_wgmma_persistent(seq_major, masked):
    """The persistent form of the sm_90 kernel (passed on the H200 in session 8) against the reference:
    more tiles than SMs (each CTA walks several, across heads and batches), odd lengths, GQA, key masks."""
    if not _gemm_cuda.is_sm90():
        pytest.skip("the wgmma attention needs an sm_90 GPU")
    from flashdiff.kernels._attention_sm90 import flash_attention_sm90
    from flashdiff.kernels.attention import _key_bias

    mx.random.seed(10)
    b, h, hk, lq, lk = 2, 8, 4, 2333, 1461  # 19 query blocks x 16 head rows = 304 tiles
    q, k, v = (mx.random.normal((b, heads, n, 128)).astype(mx.bfloat16) for n, heads in ((lq, h), (lk, hk), (lk, hk)))
    mask = (mx.arange(lk)[None, None, None, :] < mx.array([lk - 3, 700])[:, None, None, None]) if masked else None
    ref = attention_reference(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), 0.088, mask)
    t = (0, 2, 1, 3)
    args = [mx.contiguous(a.transpose(t)) for a in (q, k, v)] if seq_major else [q, k, v]
    out = flash_attention_sm90(*args, 0.088, None if mask is None else _key_bias(mask, b, lk), seq_major=seq_major,
                               persistent=True)
    assert rel_err(out.transpose(t) if seq_major else out, ref) < 1e-2


def test_attention_cuda_default_dispatch():
    """The default path on this GPU, for a key-masked Qwen-Image-like call (joint length 4096 + 93, one
    batch row padded), an unmasked odd one over the odd-length bound and an unmasked long one: each against
    the reference."""
    from flashdiff.kernels.attention import SM90_MIN_SCORES, SM90_MIN_SCORES_ODD

    mx.random.seed(9)
    t = (0, 2, 1, 3)
    cases = ((4189, 4150), (math.isqrt(SM90_MIN_SCORES_ODD) + 13, None), (math.isqrt(SM90_MIN_SCORES) + 3, None))
    for lk, mask_len in cases:
        q, k, v = (mx.random.normal((1, 2, lk, 128)).astype(mx.bfloat16) for _ in range(3))
        mask = None if mask_len is None else (mx.arange(lk) < mask_len)[None, None, None, :]
        ref = attention_reference(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), 0.088, mask)
        assert rel_err(attention(q, k, v, 0.088, mask), ref) < 1e-2
        blhd = [mx.contiguous(a.transpose(t)) for a in (q, k, v)]
        assert rel_err(attention(*blhd, 0.088, mask, layout="blhd").transpose(t), ref) < 1e-2


def test_dequantize_kernel_more_rows_than_grid_y():
    """Rows beyond CUDA's gridDim.y limit (65535) are covered by the kernel's row loop."""
    w, s, b = quant((70001, 64), "affine", 4, 32)
    ref = mx.dequantize(w, s, b, group_size=32, bits=4, dtype=mx.float32, stream=mx.cpu)
    out = dequantize(w, s, b, 4, 32, "affine", dtype=mx.float32, backend="cuda")
    assert mx.array_equal(out, ref).item()


def _bits_equal(a, b):
    return mx.array_equal(a.view(mx.uint16), b.view(mx.uint16)).item()


@pytest.mark.parametrize("t, e, k_in, n, routing", [(300, 4, 256, 192, "random"), (129, 8, 2560, 264, "random"),
                                                    (500, 4, 256, 296, "one expert"), (2048, 4, 2560, 6912, "random")])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_moe_gemm_over_quantized_experts_cuda(t, e, k_in, n, routing, bits, dtype, monkeypatch):
    """moe_gemm with affine experts whose scales are in x.dtype, under FLASHDIFF_GEMM_DEQUANT=fused, takes the
    persistent GEMM that dequantizes them inside itself (_gemm_tma_dequant_persistent): bit-identical to the
    default dequantize + persistent GEMM, twice in a row (fresh counters each call), and near the reference."""
    from flashdiff.kernels import moe_gemm
    if not _gemm_cuda.is_sm90():
        pytest.skip("the fused form needs an sm_90 GPU")
    mx.random.seed(t + bits)
    x = mx.random.normal((t, k_in)).astype(dtype)
    if routing == "one expert":
        ids = mx.stack([mx.zeros((t,), mx.int32), mx.full((t,), 2, mx.int32)], axis=1)
    else:
        ids = mx.argsort(mx.random.uniform(shape=(t, e)), axis=-1)[:, :2].astype(mx.int32)
    w, s, b = quant((e, n, k_in), "affine", bits, 64, dtype=dtype, seed=bits)
    kw = dict(scales=s, biases=b, bits=bits, group_size=64)
    assert not _gemm_cuda.quantized_gemm_available(x, s, bits, 64, "affine", k_in, n)  # opt-in
    separate = moe_gemm(x, w, ids, backend="cuda", **kw)
    monkeypatch.setenv("FLASHDIFF_GEMM_DEQUANT", "fused")
    assert _gemm_cuda.quantized_gemm_available(x, s, bits, 64, "affine", k_in, n)
    fused = [moe_gemm(x, w, ids, backend="cuda", **kw) for _ in range(2)]
    assert _bits_equal(fused[0], separate) and _bits_equal(fused[1], separate)
    if t * n <= 300 * 296:
        ref = moe_gemm(x.astype(mx.float32), w, ids, backend="reference", **kw)
        assert rel_err(fused[0], ref) < (1e-2 if dtype == mx.bfloat16 else 3e-3)


@pytest.mark.parametrize("t, e, k_in, n", [(300, 4, 256, 192), (1000, 5, 384, 264), (4096, 4, 2560, 6912)])
@pytest.mark.parametrize("mode, bits, group, dtype", [(None, None, None, mx.bfloat16), (None, None, None, mx.float16),
                                                      ("affine", 4, 64, mx.bfloat16), ("affine", 8, 64, mx.float16),
                                                      ("affine", 3, 32, mx.bfloat16), ("mxfp4", 4, 32, mx.bfloat16)])
def test_moe_gemm_prologue_cuda(t, e, k_in, n, mode, bits, group, dtype, monkeypatch):
    """moe_gemm by default (the layout kernel's launch also gathers x's routed rows where the GEMM engine reads
    gathered rows, and dequantizes quantized experts) is bit-identical to the layout, dequantize and gather kernels
    on their own (FLASHDIFF_GEMM_DEQUANT=separate, FLASHDIFF_MOE_GATHER=kernel), twice in a row, for (T, K) and
    (T, k, K) inputs."""
    from flashdiff.kernels import moe_gemm
    mx.random.seed(t + (bits or 0))
    ids = mx.argsort(mx.random.uniform(shape=(t, e)), axis=-1)[:, :2].astype(mx.int32)
    if mode is None:
        w, kw = (mx.random.normal((e, n, k_in)) * 0.05).astype(dtype), {}
    else:
        w, s, b = quant((e, n, k_in), mode, bits, group, dtype=dtype, seed=bits)
        kw = dict(scales=s, biases=b, bits=bits, group_size=group, mode=mode)
    for x in (mx.random.normal((t, k_in)).astype(dtype), mx.random.normal((t, 2, k_in)).astype(dtype)):
        default = [moe_gemm(x, w, ids, backend="cuda", **kw) for _ in range(2)]
        with monkeypatch.context() as m:
            m.setenv("FLASHDIFF_GEMM_DEQUANT", "separate")
            m.setenv("FLASHDIFF_MOE_GATHER", "kernel")
            apart = moe_gemm(x, w, ids, backend="cuda", **kw)
        assert _bits_equal(default[0], apart) and _bits_equal(default[1], apart)
        if t * n <= 300 * 296:
            ref = moe_gemm(x.astype(mx.float32), w.astype(mx.float32) if mode is None else w, ids, backend="reference",
                           **kw)
            assert rel_err(default[0], ref) < (1e-2 if dtype == mx.bfloat16 else 3e-3)


@pytest.mark.parametrize("m, k, n", [(300, 256, 520), (1024, 3072, 3072), (4608, 3072, 12288)])
@pytest.mark.parametrize("bits", [4, 8])
def test_dense_gemm_over_quantized_weights_cuda(m, k, n, bits):
    """dense_gemm_quantized bit-identical to dense_gemm (the persistent engine) over dequantize's weight."""
    from flashdiff.kernels import _dequant
    if not _gemm_cuda.is_sm90():
        pytest.skip("the fused form needs an sm_90 GPU")
    mx.random.seed(m + bits)
    x = mx.random.normal((m, k)).astype(mx.bfloat16)
    w, s, b = quant((n, k), "affine", bits, 64, seed=bits)
    out = _gemm_cuda.dense_gemm_quantized(x, w, s, b, bits, 64)
    w_deq = _dequant.dequantize(w, s, b, bits, 64, "affine", dtype=mx.bfloat16, backend="cuda")
    assert _bits_equal(out, _gemm_cuda.dense_gemm(x, w_deq, engine="wgmma persistent"))


@pytest.mark.parametrize("m, k, n, bits, group, with_bias", [(1024, 3072, 3072, 4, 64, True), (2048, 3072, 3072, 8, 32, False),
                                                             (4608, 3072, 3072, 8, 64, False), (1024, 512, 392, 8, 32, True),
                                                             (300, 512, 264, 4, 128, True), (1, 3072, 18432, 4, 64, True),
                                                             (2, 3072, 9216, 8, 64, False), (17, 1024, 392, 4, 128, True),
                                                             (31, 512, 264, 8, 32, True)])
def test_packed_layer_cuda(m, k, n, bits, group, with_bias):
    """pack_quantized_linears on the GPU, then the packed layer against the same QuantizedLinear before packing
    (dequantize + cuBLAS): where packed_gemm_wins (the mixed GEMM) within a few bf16 roundings (rel. L2 < 2e-3, 5e-3
    with a bias: the kernel rounds once, the GEMM then + bias twice); below SMALL_M rows (packed_gemv, which does not
    round the weight to bf16) within 4e-3 of float32 x @ dequantize(w).T; elsewhere (dequantize_packed + the same GEMM)
    bit for bit; and model_weights gives back mx.quantize's arrays bit for bit (unpack_weight)."""
    import mlx.nn as nn

    from flashdiff.engine.components import model_weights
    from flashdiff.kernels import PackedQuantizedLinear, QuantizedLinear, pack_quantized_linears, qgemm

    if not _gemm_cuda.is_sm90():
        pytest.skip("packed layers need an sm_90 GPU")
    mx.random.seed(m + n + bits)
    linear = nn.Linear(k, n, bias=with_bias)
    linear.set_dtype(mx.bfloat16)
    model = nn.Sequential(QuantizedLinear.from_linear(linear, group, bits))
    before = {key: mx.array(v) for key, v in model_weights(model).items()}
    x = mx.random.normal((m, k)).astype(mx.bfloat16)
    ref = model(x)
    mx.eval(ref, before)
    assert pack_quantized_linears(model, force=True) == 1 and isinstance(model.layers[0], PackedQuantizedLinear)
    y = model(x)
    if m < qgemm.SMALL_M:  # packed_gemv against float32 (session 19, H200: 2.2-2.4e-3; quantized_matmul 1.7-3.4e-3)
        w32 = mx.dequantize(before["layers.0.weight"], before["layers.0.scales"], before["layers.0.biases"], group,
                            bits).astype(mx.float32)
        ref32 = x.astype(mx.float32) @ w32.T + (before["layers.0.bias"].astype(mx.float32) if with_bias else 0)
        assert rel_err(y, ref32) < 4e-3
    elif qgemm.packed_gemm_wins(m, n):
        assert rel_err(y, ref) < (5e-3 if with_bias else 2e-3)
    else:
        assert mx.array_equal(y, ref).item()
    after = model_weights(model)
    assert sorted(after) == sorted(before)
    assert all(mx.array_equal(after[key], before[key]).item() for key in before)
