"""CUDA kernel bodies run on the CPU through tests/cuda_emulation.py (g++; no GPU).

First the TMA GEMM (``_gemm_tma``), which is exact on the H200: it passing here is what says the
emulation's model of TMA, the swizzle, the descriptors, mbarriers and wgmma is the one the hardware
has. Then the sm_90 attention (``_attention_sm90``; its GPU tests run on the H200 in session 7): its
maps and main kernels as written, against float64 softmax attention. What the emulation cannot see: timing (a stage
released while an asynchronous wgmma still reads it), register pressure, and anything in the parts of
the PTX the shim replaces (the fd_* device functions themselves). The last tests replay what the
Python launchers compute (templates, grids, buffers), with a recorder in place of mx.fast.cuda_kernel.
"""

import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from cuda_emulation import LaunchRecorder, bf16_bits, bf16_values, replay, run
from helpers import check_same_layout, softmax_attention_np
from flashdiff.kernels import _attention_sm90 as att
from flashdiff.kernels import _attention_sm90_forms as att_forms
from flashdiff.kernels import _gemm_mixed, _gemm_tma, _gemm_tma_dequant, _gemm_tma_dequant_persistent
from flashdiff.kernels._dispatch import float_bits

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


@pytest.mark.parametrize("m, k, n", [(200, 320, 312), (64, 200, 72)])
def test_emulated_tma_gemm_matches_matmul(tmp_path, m, k, n):
    """The dense TMA GEMM (maps kernel + GEMM kernel) as on the H200: K tails, N tails, more K tiles
    than stages (stage reuse through the empty barriers), row tails."""
    rng = np.random.default_rng(0)
    x = bf16_bits(rng.standard_normal((m, k)))
    w = bf16_bits(rng.standard_normal((n, k)) * 0.1)
    bm, bn = _gemm_tma.BM, _gemm_tma.BN
    tiles_m, tiles_n = -(-m // bm), -(-n // bn)
    maps_t = [("IS_BF16", True), ("K", k), ("W_ROWS", n), ("X_ROWS", m)]
    gemm_t = [("T", "bf16"), ("IS_BF16", True), ("K", k), ("N", n), ("A_DIV", 1), ("DIRECT", True),
              ("M_ROWS", m), ("THREADS", _gemm_tma.THREADS), ("GROUP_M", 8)]
    buffers = {"x": ("bf16", x), "w": ("bf16", w), "slot_row": ("i32", np.zeros(1, np.int32)),
               "tile_expert": ("i32", np.zeros(1, np.int32)), "tmaps": ("u8", _gemm_tma.MAP_BYTES),
               "out": ("bf16", m * n)}
    got = run(tmp_path, buffers, [
        (_gemm_tma._MAPS_SOURCE, maps_t, ["x", "w"], ["tmaps"], (1, 1), 32),
        (_gemm_tma._SOURCE, gemm_t, ["x", "w", "slot_row", "tile_expert", "tmaps"], ["out"], (tiles_n, tiles_m),
         _gemm_tma.THREADS),
    ], ["out"])["out"]
    ref = bf16_values(x).reshape(m, k).astype(np.float64) @ bf16_values(w).reshape(n, k).astype(np.float64).T
    np.testing.assert_allclose(bf16_values(got).reshape(m, n), ref, rtol=1e-2, atol=1e-2)


def test_emulated_grouped_tma_gemm_matches_per_expert_matmul(tmp_path):
    """The MoE form: the gather + maps kernel, then the grouped TMA GEMM over the schedule of
    moe.grouped_layout (padding slots, an expert without rows), each routed row through its expert."""
    import mlx.core as mx

    from flashdiff.kernels.moe import grouped_layout

    t, e, k, n, top_k = 300, 4, 256, 192, 2
    rng = np.random.default_rng(2)
    x = bf16_bits(rng.standard_normal((t, k)))
    w = bf16_bits(rng.standard_normal((e, n, k)) * 0.1)
    ids = np.stack([rng.permutation(3)[:top_k] for _ in range(t)]).astype(np.int32)  # expert 3: no rows
    slot_row, tile_expert = (np.array(a) for a in grouped_layout(mx.array(ids), e))
    slots, tiles = slot_row.size, tile_expert.size
    cpt = 4
    gather_threads = max(slots * k // 8 // cpt, 32)
    gather_t = [("T", "bf16"), ("SLOTS", slots), ("A_DIV", top_k), ("CPT", cpt), ("IS_BF16", True), ("K", k),
                ("W_ROWS", e * n)]
    gemm_t = [("T", "bf16"), ("IS_BF16", True), ("K", k), ("N", n), ("A_DIV", top_k), ("DIRECT", False),
              ("M_ROWS", t * top_k), ("THREADS", _gemm_tma.THREADS), ("GROUP_M", 8)]
    buffers = {"x": ("bf16", x), "w": ("bf16", w), "slot_row": ("i32", slot_row), "tile_expert": ("i32", tile_expert),
               "xs": ("bf16", slots * k), "tmaps": ("u8", _gemm_tma.MAP_BYTES), "out": ("bf16", t * top_k * n)}
    got = run(tmp_path, buffers, [
        (_gemm_tma._GATHER_SOURCE, gather_t, ["x", "slot_row", "w"], ["xs", "tmaps"], (-(-gather_threads // 256), 1), 256),
        (_gemm_tma._SOURCE, gemm_t, ["xs", "w", "slot_row", "tile_expert", "tmaps"], ["out"], (-(-n // _gemm_tma.BN), tiles),
         _gemm_tma.THREADS),
    ], ["out"])["out"]
    xf, wf = bf16_values(x).reshape(t, k).astype(np.float64), bf16_values(w).reshape(e, n, k).astype(np.float64)
    ref = np.einsum("tk,tjnk->tjn", xf, wf[ids]).reshape(t * top_k, n)
    np.testing.assert_allclose(bf16_values(got).reshape(t * top_k, n), ref, rtol=1e-2, atol=1e-2)


def _u16(a):
    """An MLX bf16 / fp16 array's bit patterns as numpy uint16."""
    import mlx.core as mx

    return np.array(a.view(mx.uint16))


def _affine_problem(rng, bits, group, mdt, m, k, n):
    """x (m, k), an (n, k) weight quantized (affine, bits, group) and dequantized by MLX, a bias (n,): all in
    mdt; the codes reach 0 and 2^bits - 1 (bit 7 at 8 bits) in every case."""
    import mlx.core as mx

    w = mx.array(rng.standard_normal((n, k)) * 0.05).astype(mdt)
    wq, scales, biases = mx.quantize(w, group, bits)
    w_deq = mx.dequantize(wq, scales, biases, group, bits)
    x = mx.array(rng.standard_normal((m, k))).astype(mdt)
    bias = mx.array(rng.standard_normal((n,))).astype(mdt)
    codes = np.array(wq).view(np.uint8)
    assert codes.min() == 0 and (codes.max() == 255 if bits == 8 else np.any((codes & 15) == 15))
    return x, wq, scales, biases, w_deq, bias


@pytest.mark.parametrize("bits, group, dtype, with_bias, m, k, n", [
    (4, 64, "bf16", False, 200, 320, 264), (8, 64, "bf16", True, 130, 256, 256), (4, 32, "f16", True, 64, 192, 72),
    (8, 128, "f16", False, 100, 384, 136), (4, 128, "bf16", True, 60, 256, 520)])
def test_emulated_dequant_gemm_matches_gemm_on_dequantized_weight(tmp_path, bits, group, dtype, with_bias, m, k, n):
    """The fused dequantize GEMM (_gemm_tma_dequant) against the TMA GEMM run on mx.dequantize's weight in
    the same emulation: without bias the two must agree bit for bit (same MMA order, so any difference is
    a dequantized value that differs from MLX's: rounding, code order, scale group, row or swizzle); with
    bias against float64. Cases: 4/8 bits, groups 32/64/128, bf16 and fp16, K tiles > stages, N and M tails,
    rows past N in the last column tile, codes 0 and 2^bits - 1 in every row (bit 7 at 8 bits)."""
    import mlx.core as mx

    mdt = mx.bfloat16 if dtype == "bf16" else mx.float16
    x, wq, scales, biases, w_deq, bias = _affine_problem(np.random.default_rng(bits * 100 + group), bits, group, mdt, m, k, n)
    tiles_m, tiles_n = -(-m // _gemm_tma.BM), -(-n // _gemm_tma.BN)
    maps_t = [("IS_BF16", dtype == "bf16"), ("K", k), ("W_ROWS", n), ("X_ROWS", m)]
    gemm_t = [("T", dtype), ("IS_BF16", dtype == "bf16"), ("K", k), ("N", n), ("A_DIV", 1), ("DIRECT", True),
              ("M_ROWS", m), ("THREADS", _gemm_tma.THREADS), ("GROUP_M", 8)]
    fused_t = gemm_t + [("BITS", bits), ("GROUP", group), ("HAS_BIAS", with_bias)]
    launched = _gemm_tma_dequant.template(mdt, m, k, n, bits, group, with_bias)
    assert [a for a, _ in launched] == [a for a, _ in fused_t] and launched[1:] == fused_t[1:]
    buffers = {"x": (dtype, _u16(x)), "w_deq": (dtype, _u16(w_deq)), "wq": ("u32", np.array(wq)),
               "scales": (dtype, _u16(scales)), "biases": (dtype, _u16(biases)), "bias": (dtype, _u16(bias)),
               "dummy": ("i32", np.zeros(1, np.int32)), "tmaps": ("u8", _gemm_tma.MAP_BYTES),
               "tmaps2": ("u8", _gemm_tma.MAP_BYTES), "ref": (dtype, m * n), "out": (dtype, m * n)}
    grid = (tiles_n, tiles_m)
    got = run(tmp_path, buffers, [
        (_gemm_tma._MAPS_SOURCE, maps_t, ["x", ("w", "w_deq")], ["tmaps"], (1, 1), 32),
        (_gemm_tma._SOURCE, gemm_t, ["x", ("w", "w_deq"), ("slot_row", "dummy"), ("tile_expert", "dummy"), "tmaps"],
         [("out", "ref")], grid, _gemm_tma.THREADS),
        (_gemm_tma._MAPS_SOURCE, maps_t, ["x", ("w", "wq")], [("tmaps", "tmaps2")], (1, 1), 32),
        (_gemm_tma_dequant._SOURCE, fused_t, ["x", "wq", "scales", "biases", ("bias", "bias" if with_bias else "dummy"),
                                              ("slot_row", "dummy"), ("tile_expert", "dummy"), ("tmaps", "tmaps2")],
         ["out"], grid, _gemm_tma_dequant.THREADS),
    ], ["ref", "out"], headers=_gemm_tma_dequant.DEQUANT_CODE)
    values = bf16_values if dtype == "bf16" else (lambda b: b.view(np.float16).astype(np.float32))
    out = values(got["out"]).reshape(m, n)
    if not with_bias:
        np.testing.assert_array_equal(got["out"], got["ref"])
    xf = np.array(x.astype(mx.float32), np.float64)
    ref = xf @ np.array(w_deq.astype(mx.float32), np.float64).T
    if with_bias:
        ref = ref + np.array(bias.astype(mx.float32), np.float64)
    np.testing.assert_allclose(out, ref, rtol=1e-2, atol=1e-2)


def _attention(tmp_path, q, k, v, scale, bias=None, pingpong=True, seq_major=False, persistent_ctas=0, body=None):
    """The maps and main kernels of _attention_sm90 on bf16 bit patterns q (B, H, Lq, 128), k / v (B, Hk, Lk, 128)
    (given to the kernels as (B, L, H, 128) when seq_major; the output comes back as (B, H, Lq, 128));
    persistent_ctas > 0: the persistent form (_attention_sm90_forms) on that many CTAs; body: the per-tile kernel's
    source in place of the shipped one."""
    b, h, lq, _ = q.shape
    hk, lk = k.shape[1], k.shape[2]
    if seq_major:
        q, k, v = (np.ascontiguousarray(a.transpose(0, 2, 1, 3)) for a in (q, k, v))
    cols = (h * 128, hk * 128) if seq_major else (128, 128)
    rows = (b * lq, b * lk) if seq_major else (b * h * lq, b * hk * lk)
    buffers = {"q": ("bf16", q), "k": ("bf16", k), "v": ("bf16", v), "tmaps": ("u8", att.MAP_BYTES),
               "scale": ("f32", np.array([scale], np.float32)),
               "kbias": ("f32", np.zeros(1, np.float32) if bias is None else bias.astype(np.float32)),
               "out": ("bf16", q.size)}
    maps_t = [("T", "bf16"), ("IS_BF16", True), ("Q_COLS", cols[0]), ("Q_ROWS", rows[0]), ("KV_COLS", cols[1]),
              ("KV_ROWS", rows[1])]
    main_t = [("T", "bf16"), ("IS_BF16", True), ("H", h), ("HK", hk), ("LQ", lq), ("LK", lk), ("HAS_BIAS", bias is not None),
              ("PINGPONG", pingpong), ("SEQ_MAJOR", seq_major), ("SCALE_BITS", float_bits(scale))]
    source, grid = body or att._SOURCE, (math.ceil(lq / att.BM), b * h)
    if persistent_ctas:
        source, grid = att_forms._SOURCE_PERSISTENT, (persistent_ctas, 1)
        main_t.append(("BH", b * h))
    got = run(tmp_path, buffers, [
        (att._MAPS_SOURCE, maps_t, ["q", "k", "v"], ["tmaps"], (1, 1), 32),
        (source, main_t, ["q", "k", "v", "tmaps", "scale", "kbias"], ["out"], grid, att.THREADS),
    ], ["out"])
    out = bf16_values(got["out"]).reshape(q.shape)
    return out.transpose(0, 2, 1, 3) if seq_major else out


def _attention_inputs(rng, b, h, hk, lq, lk, with_bias):
    """bf16 bit patterns q (B, H, Lq, 128), k / v (B, Hk, Lk, 128) and a key bias (B, Lk) or None (its first
    128 keys all -inf when there is more than one key tile)."""
    q, k, v = (bf16_bits(rng.standard_normal(shape)) for shape in ((b, h, lq, 128), (b, hk, lk, 128), (b, hk, lk, 128)))
    bias = None
    if with_bias:
        bias = rng.uniform(-3, 0, (b, lk))
        if lk > 128:
            bias[:, :128] = -np.inf
    return q, k, v, bias


@pytest.mark.parametrize("b, h, hk, lq, lk, with_bias", [(1, 2, 1, 200, 300, False), (2, 1, 1, 129, 77, True),
                                                          (1, 1, 1, 64, 257, True), (1, 1, 1, 130, 700, False)])
@pytest.mark.parametrize("pingpong, seq_major", [(True, False), (False, False), (True, True)])
def test_emulated_wgmma_attention_matches_softmax_attention(tmp_path, b, h, hk, lq, lk, with_bias, pingpong, seq_major):
    """The sm_90 attention's two kernels as written: query and key tails, GQA, batches, a key bias
    (with a whole first tile of -inf keys), many tiles through two stages (each stage refilled while
    the other is read); with and without the warpgroups' ping-pong turns; q/k/v/out head-major or
    sequence-major (B, L, H, 128) in memory."""
    q, k, v, bias = _attention_inputs(np.random.default_rng(1), b, h, hk, lq, lk, with_bias)
    out = _attention(tmp_path, q, k, v, 0.088, bias, pingpong, seq_major)
    qf, kf, vf = (bf16_values(a).astype(np.float64) for a in (q, k, v))
    np.testing.assert_allclose(out, softmax_attention_np(qf, kf, vf, 0.088, bias), rtol=2e-2, atol=2e-2)


def _tail_heavy_inputs(rng, lq, lk, with_bias):
    """q (1, 1, Lq, 128) and k / v (1, 1, Lk, 128) where the keys of the last key tile carry a large share of every
    row's weight (their k share q's common part; with a bias, the other keys are also pushed down), so that a
    tail key read wrongly, or left out, moves the output well past the tolerance."""
    q = rng.standard_normal((1, 1, lq, 128)) * 0.3 + 1.0
    k = rng.standard_normal((1, 1, lk, 128)) * 0.5
    first_tail_key = (lk - 1) // 128 * 128
    k[:, :, first_tail_key:] = 0.25 + 0.2 * rng.standard_normal((lk - first_tail_key, 128))
    bias = None
    if with_bias:
        bias = np.where(np.arange(lk) >= first_tail_key, 0.0, -1.5)[None, :] + rng.uniform(-0.5, 0, (1, lk))
    return bf16_bits(q), bf16_bits(k), bf16_bits(rng.standard_normal((1, 1, lk, 128))), bias


@pytest.mark.parametrize("lk", [141, 150, 300, 230, 13, 256])
@pytest.mark.parametrize("with_bias", [False, True])
def test_emulated_wgmma_attention_last_key_tile(tmp_path, lk, with_bias):
    """The last, partial key tile: its per-key tests in a compile-time copy of the loop's step, and its P V over only
    ceil((Lk % 128) / 16) k16 steps (Lk % 128 = 13, 22, 44, 102: 1, 2, 3, 7 steps; 13 keys in one tile, NT = 1;
    256: all 8), with the tail's keys carrying a large share of the weight (so a tail key lost or misread fails),
    against float64 softmax attention."""
    q, k, v, bias = _tail_heavy_inputs(np.random.default_rng(lk), 150, lk, with_bias)
    qf, kf, vf = (bf16_values(a).astype(np.float64) for a in (q, k, v))
    first_tail_key = (lk - 1) // 128 * 128
    s = np.einsum("bhqd,bhkd->bhqk", qf, kf) * 0.088 + (0 if bias is None else bias[:, None, None, :])
    p = np.exp(s - s.max(-1, keepdims=True))
    share = (p[..., first_tail_key:].sum(-1) / p.sum(-1)).mean()
    assert 0.3 < share < 0.99 or lk < 128, share  # the earlier keys count too
    out = _attention(tmp_path, q, k, v, 0.088, bias)
    np.testing.assert_allclose(out, softmax_attention_np(qf, kf, vf, 0.088, bias), rtol=2e-2, atol=2e-2)


def _settled_inputs(rng, lq, lk, with_bias):
    """q / k / v (1, 2 heads, L, 128; one K / V head) whose every row's largest score is key 0's: every q row carries
    a common part u = 1 and key 0 is 0.65 u (its bias, if any, the largest: 0). So each row's maximum is set by the
    first key tile and corr = 1 afterwards (where session 13's per-warp vote skipped O's rescale). Key 0 carries about half
    of each row's weight, the other keys the rest."""
    q = bf16_bits(rng.standard_normal((1, 2, lq, 128)) + 1.0)
    k = rng.standard_normal((1, 1, lk, 128))
    k[:, :, 0] = 0.65
    bias = None
    if with_bias:
        bias = rng.uniform(-1, 0, (1, lk))
        bias[:, 0] = 0.0
    return q, bf16_bits(k), bf16_bits(rng.standard_normal((1, 1, lk, 128))), bias


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("variant, persistent_ctas", [("shipped", 0), ("skip_unmoved", 0), ("shipped", 2)])
def test_emulated_wgmma_attention_with_maxima_set_by_the_first_tile(tmp_path, with_bias, variant, persistent_ctas):
    """Rows whose running maximum stops moving after the first key tile (corr is 1 for every row of a warp on every
    later tile), against float64 softmax attention: the shipped forms, and the variant probe's skip_unmoved, whose
    warps then skip O *= corr (session 13's vote, taken out in session 14)."""
    body = None
    if variant == "skip_unmoved":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
        import probe_attention_variants as probe

        body = probe.variant_sources(variant)[1]
    q, k, v, bias = _settled_inputs(np.random.default_rng(3), 200, 700, with_bias)
    qf, kf, vf = (bf16_values(a).astype(np.float64) for a in (q, k, v))
    s = np.einsum("bhqd,bkd->bhqk", qf, kf[:, 0]) * 0.088 + (0 if bias is None else bias[:, None, None, :])
    p0 = 1 / np.exp(s - s[..., :1]).sum(-1)  # key 0's weight
    assert (s.argmax(-1) == 0).all() and 0.2 < p0.mean() < 0.8, p0.mean()  # key 0 sets every row's max, not all
    out = _attention(tmp_path, q, k, v, 0.088, bias, persistent_ctas=persistent_ctas, body=body)
    np.testing.assert_allclose(out, softmax_attention_np(qf, kf, vf, 0.088, bias), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("b, h, hk, lq, lk, with_bias, ctas, seq_major", [
    (2, 2, 1, 200, 300, True, 3, False),   # 8 tiles over 3 CTAs: heads and batches change inside a CTA
    (1, 3, 3, 129, 77, False, 2, True),    # one key tile per query block (NT = 1), query tails
    (1, 1, 1, 384, 257, True, 1, False),   # one CTA walks 3 tiles, the Q buffers reused
    (1, 2, 2, 64, 130, False, 4, False),   # more CTAs than tiles (2): two have none
    (3, 1, 1, 100, 150, True, 1, True),    # (B, L, H, D), one CTA through 3 batches (stores mid-walk)
])
def test_emulated_persistent_attention_matches_softmax_attention(tmp_path, b, h, hk, lq, lk, with_bias, ctas, seq_major):
    """The persistent form (its GPU tests passed in session 8) as written: CTAs that walk several tiles, with the
    K / V ring and the Q buffers running on across them and each tile's last P V issued with the next
    tile's first S; key bias (its first tile all -inf where there are two), GQA, both layouts."""
    q, k, v, bias = _attention_inputs(np.random.default_rng(2), b, h, hk, lq, lk, with_bias)
    out = _attention(tmp_path, q, k, v, 0.088, bias, seq_major=seq_major, persistent_ctas=ctas)
    qf, kf, vf = (bf16_values(a).astype(np.float64) for a in (q, k, v))
    np.testing.assert_allclose(out, softmax_attention_np(qf, kf, vf, 0.088, bias), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bits, group, dtype, with_bias, m, k, n", [
    (4, 64, "bf16", False, 200, 320, 264), (8, 64, "bf16", True, 130, 256, 200), (4, 32, "f16", True, 64, 192, 72),
    (8, 128, "f16", False, 100, 384, 136), (4, 128, "bf16", True, 60, 256, 392), (8, 32, "bf16", False, 129, 448, 192)])
def test_emulated_mixed_gemm_matches_gemm_on_dequantized_weight(tmp_path, bits, group, dtype, with_bias, m, k, n):
    """The mixed-input GEMM (_gemm_mixed: the weight converted into wgmma's register operand) against the TMA
    GEMM on mx.dequantize's weight in the same emulation: without bias bit for bit (the same products summed
    in the same order, so a difference is a weight value, a fragment slot, a row or a token out of place);
    with bias against float64. Cases: 4/8 bits, groups 32/64/128, bf16/fp16, K tiles > stages (the ring and
    both fragment buffers reused), token and weight tails, codes 0 and 2^bits - 1 in every row."""
    import mlx.core as mx

    mdt = mx.bfloat16 if dtype == "bf16" else mx.float16
    x, wq, scales, biases, w_deq, bias = _affine_problem(np.random.default_rng(bits * 10 + group + k), bits, group, mdt, m, k, n)
    maps_t = [("IS_BF16", dtype == "bf16"), ("K", k), ("W_ROWS", n), ("X_ROWS", m)]
    gemm_t = [("T", dtype), ("IS_BF16", dtype == "bf16"), ("K", k), ("N", n), ("A_DIV", 1), ("DIRECT", True),
              ("M_ROWS", m), ("THREADS", _gemm_tma.THREADS), ("GROUP_M", 8)]
    mixed_t = [(a, dtype if a == "T" else v) for a, v in _gemm_mixed.template(mdt, m, k, n, bits, group, with_bias)]
    (gx, gy, _), (threads, _, _) = _gemm_mixed.grid(m, n)
    buffers = {"x": (dtype, _u16(x)), "w_deq": (dtype, _u16(w_deq)), "wq": ("u32", np.array(wq)),
               "scales": (dtype, _u16(scales)), "biases": (dtype, _u16(biases)), "bias": (dtype, _u16(bias)),
               "dummy": ("i32", np.zeros(1, np.int32)), "tmaps": ("u8", _gemm_tma.MAP_BYTES),
               "tmaps2": ("u8", _gemm_mixed.maps_bytes(m, n)), "ref": (dtype, m * n), "out": (dtype, m * n)}
    got = run(tmp_path, buffers, [
        (_gemm_tma._MAPS_SOURCE, maps_t, ["x", ("w", "w_deq")], ["tmaps"], (1, 1), 32),
        (_gemm_tma._SOURCE, gemm_t, ["x", ("w", "w_deq"), ("slot_row", "dummy"), ("tile_expert", "dummy"), "tmaps"],
         [("out", "ref")], (-(-n // _gemm_tma.BN), -(-m // _gemm_tma.BM)), _gemm_tma.THREADS),
        (_gemm_mixed._SOURCE, mixed_t, ["x", "wq", "scales", "biases", ("bias", "bias" if with_bias else "x")],
         ["out", ("tmaps", "tmaps2")], (gx // threads, gy), threads),
    ], ["ref", "out"], headers=_gemm_tma_dequant.DEQUANT_CODE + _gemm_mixed.MIXED_CODE)
    values = bf16_values if dtype == "bf16" else (lambda b: b.view(np.float16).astype(np.float32))
    if not with_bias:
        np.testing.assert_array_equal(got["out"], got["ref"])
    ref = np.array(x.astype(mx.float32), np.float64) @ np.array(w_deq.astype(mx.float32), np.float64).T
    if with_bias:
        ref = ref + np.array(bias.astype(mx.float32), np.float64)
    np.testing.assert_allclose(values(got["out"]).reshape(m, n), ref, rtol=1e-2, atol=1e-2)



@pytest.mark.parametrize("bits, group, dtype, with_bias, m, k, n", [
    (4, 64, "bf16", False, 200, 576, 264), (8, 32, "f16", True, 130, 320, 200), (4, 128, "bf16", True, 60, 384, 392)])
def test_emulated_mixed_gemm_packed_equals_unpacked(tmp_path, bits, group, dtype, with_bias, m, k, n):
    """pack_weight's kernel, then the mixed GEMM in PACKED mode (each stage's codes and scale | bias pairs by one bulk
    copy from the packed blocks), bit for bit against the unpacked mixed GEMM in the same emulation; every byte of
    the packed buffer written (it starts as 0xFF), in the block order and size the Python side computes. Cases:
    4/8 bits, groups 32/64/128, bf16/fp16, bias, K tiles > stages, a weight tile past N."""
    import mlx.core as mx

    mdt = mx.bfloat16 if dtype == "bf16" else mx.float16
    x, wq, scales, biases, _, bias = _affine_problem(np.random.default_rng(bits + group + n), bits, group, mdt, m, k, n)
    tiles, kt = -(-n // _gemm_mixed.WT), k // _gemm_mixed.BK
    packed_words = tiles * kt * _gemm_mixed.block_bytes(bits, group) // 4
    pack_t = [("K", k), ("N", n), ("BITS", bits), ("GROUP", group)]
    mixed_t = [(a, dtype if a == "T" else v) for a, v in _gemm_mixed.template(mdt, m, k, n, bits, group, with_bias)]
    packed_t = [(a, dtype if a == "T" else v) for a, v in _gemm_mixed.template(mdt, m, k, n, bits, group, with_bias, True)]
    (gx, gy, _), (threads, _, _) = _gemm_mixed.grid(m, n)
    buffers = {"x": (dtype, _u16(x)), "wq": ("u32", np.array(wq)), "scales": (dtype, _u16(scales)),
               "biases": (dtype, _u16(biases)), "bias": (dtype, _u16(bias)), "packed": ("u32", packed_words),
               "tmaps": ("u8", _gemm_mixed.maps_bytes(m, n)), "tmaps2": ("u8", _gemm_mixed.maps_bytes(m, n)),
               "ref": (dtype, m * n), "out": (dtype, m * n)}
    bias_in = ("bias", "bias" if with_bias else "x")
    got = run(tmp_path, buffers, [
        (_gemm_mixed._SOURCE, mixed_t, ["x", "wq", "scales", "biases", bias_in], [("out", "ref"), "tmaps"], (gx // threads, gy), threads),
        (_gemm_mixed._PACK_SOURCE, pack_t, ["wq", "scales", "biases"], ["packed"], (tiles, kt), 128),
        (_gemm_mixed._SOURCE, packed_t, ["x", ("wq", "packed"), ("scales", "x"), ("biases", "x"), bias_in],
         ["out", ("tmaps", "tmaps2")], (gx // threads, gy), threads),
    ], ["ref", "out", "packed"], headers=_gemm_tma_dequant.DEQUANT_CODE + _gemm_mixed.MIXED_CODE)
    assert not np.any(got["packed"] == 0xFFFFFFFF), "a packed word was never written"
    np.testing.assert_array_equal(got["out"], got["ref"])


@pytest.mark.parametrize("bits, group, dtype, k, n", [(4, 64, "bf16", 320, 264), (8, 32, "f16", 192, 200),
                                                     (4, 128, "f16", 384, 392), (8, 64, "bf16", 256, 192),
                                                     (4, 32, "bf16", 192, 136)])
def test_emulated_dequantize_packed_equals_mlx_dequantize(tmp_path, bits, group, dtype, k, n):
    """pack_weight's kernel, then dequantize_packed's (the packed blocks back to the (N, K) weight): every value bit for
    bit mx.dequantize's, every element written (the output starts as 0xFFFF, which no case's weights hold), the
    block order and sizes as the Python side computes them. Cases: 4/8 bits, groups 32/64/128, bf16/fp16, a weight
    tile past N (264, 200, 392, 136 rows), K tiles 3..6. And unpack_weight inverts the packing exactly."""
    import mlx.core as mx

    mdt = mx.bfloat16 if dtype == "bf16" else mx.float16
    _, wq, scales, biases, w_deq, _ = _affine_problem(np.random.default_rng(bits * group + n), bits, group, mdt, 1, k, n)
    tiles, kt = -(-n // _gemm_mixed.WT), k // _gemm_mixed.BK
    packed_words = tiles * kt * _gemm_mixed.block_bytes(bits, group) // 4
    buffers = {"wq": ("u32", np.array(wq)), "scales": (dtype, _u16(scales)), "biases": (dtype, _u16(biases)),
               "packed": ("u32", packed_words), "out": (dtype, n * k)}
    is_bf16 = dtype == "bf16"
    got = run(tmp_path, buffers, [
        (_gemm_mixed._PACK_SOURCE, [("K", k), ("N", n), ("BITS", bits), ("GROUP", group)], ["wq", "scales", "biases"],
         ["packed"], (tiles, kt), 128),
        (_gemm_mixed._UNPACK_SOURCE, [("T", dtype), ("IS_BF16", is_bf16), ("K", k), ("N", n), ("BITS", bits), ("GROUP", group)],
         ["packed"], ["out"], (tiles, kt), 128),
    ], ["out", "packed"], headers=_gemm_tma_dequant.DEQUANT_CODE + _gemm_mixed.MIXED_CODE)
    want = _u16(w_deq).reshape(-1)
    assert not np.any(got["out"] == 0xFFFF) and not np.any(want == 0xFFFF)
    np.testing.assert_array_equal(got["out"], want)
    # and unpack_weight (numpy, for saving a packed model) gives back mx.quantize's arrays bit for bit
    wq2, scales2, biases2 = _gemm_mixed.unpack_weight(mx.array(got["packed"]), n, k, bits, group, mdt)
    assert wq2.dtype == mx.uint32 and scales2.dtype == biases2.dtype == mdt
    np.testing.assert_array_equal(np.array(wq2), np.array(wq))
    np.testing.assert_array_equal(_u16(scales2), _u16(scales))
    np.testing.assert_array_equal(_u16(biases2), _u16(biases))


# the GEMV kernel's header as plain C++ for the shim (the real one converts fp16 with inline assembly)
GEMV_EMU_HEADER = r"""
struct float2 { float x, y; };
static inline float2 make_float2(float a, float b) { return float2{a, b}; }
template <bool BF16>
static inline float fd_half_to_float(unsigned h) {
  if (BF16) return __int_as_float((int)(h << 16));
  __half v; v.x = (uint16_t)h; return (float)v;
}
static inline float2 fd_x_pair(const float* p) { return float2{p[0], p[1]}; }
static inline float2 fd_x_pair(const __nv_bfloat16* p) { return float2{(float)p[0], (float)p[1]}; }
static inline float2 fd_x_pair(const __half* p) { return float2{(float)p[0], (float)p[1]}; }
"""


def _exact_affine_weight(wq, scales, biases, bits, group):
    """The (N, K) weight s q + b in float64 from mx.quantize's codes (not rounded to the scales' dtype)."""
    import mlx.core as mx

    raw = np.array(wq).view(np.uint8)
    q = np.stack([raw & 15, raw >> 4], axis=-1).reshape(raw.shape[0], -1) if bits == 4 else raw
    s, b = (np.array(a.astype(mx.float32), np.float64).repeat(group, axis=1) for a in (scales, biases))
    return s * q + b


@pytest.mark.parametrize("bits, group, dtype, x_dtype, m, k, n", [
    (4, 64, "bf16", "bf16", 1, 320, 264), (8, 32, "f16", "f16", 3, 192, 200), (4, 128, "f16", "f32", 2, 384, 88),
    (8, 64, "bf16", "f32", 5, 256, 192), (4, 32, "bf16", "bf16", 6, 192, 136), (8, 128, "bf16", "f16", 2, 512, 40)])
def test_emulated_packed_gemv(tmp_path, bits, group, dtype, x_dtype, m, k, n):
    """pack_weight's kernel, then packed_gemv's (few rows straight from the packed blocks): the split sums added up
    equal x @ (s q + b).T (float64, the weight not rounded) to float32 accuracy, every partial written (the output
    starts as 0xFF bytes: NaN). Cases: 4/8 bits, groups 32/64/128, bf16/fp16 scales, x in bf16 / fp16 / float32,
    1-6 rows (the lanes' row-store split), rows past N in the last CTA, 1-4 K splits."""
    import mlx.core as mx

    from flashdiff.kernels import _gemm_mixed_pack

    mdt = mx.bfloat16 if dtype == "bf16" else mx.float16
    x, wq, scales, biases, _, _ = _affine_problem(np.random.default_rng(bits * m + n), bits, group, mdt, m, k, n)
    x = x.astype({"bf16": mx.bfloat16, "f16": mx.float16, "f32": mx.float32}[x_dtype])
    tiles, kt = -(-n // _gemm_mixed.WT), k // _gemm_mixed.BK
    splits = min(kt, 1 + (n + k) % 4)  # (the launcher's rule picks KT splits at these sizes; vary them here)
    x_raw = np.array(x) if x_dtype == "f32" else _u16(x)
    buffers = {"wq": ("u32", np.array(wq)), "scales": (dtype, _u16(scales)), "biases": (dtype, _u16(biases)),
               "packed": ("u32", _gemm_mixed.packed_words(n, k, bits, group)), "x": (x_dtype, x_raw),
               "partial": ("f32", splits * m * n)}
    template = [("IS_BF16", dtype == "bf16"), ("K", k), ("N", n), ("M", m), ("BITS", bits), ("GROUP", group),
                ("KSPLIT", splits)]
    got = run(tmp_path, buffers, [
        (_gemm_mixed._PACK_SOURCE, [("K", k), ("N", n), ("BITS", bits), ("GROUP", group)], ["wq", "scales", "biases"],
         ["packed"], (tiles, kt), 128),
        (_gemm_mixed_pack._GEMV_SOURCE, template, ["x", "packed"], ["partial"], (-(-n // 32), splits), 128),
    ], ["partial"], headers=_gemm_tma_dequant.DEQUANT_CODE + _gemm_mixed.MIXED_CODE + GEMV_EMU_HEADER)
    partial = got["partial"].reshape(splits, m, n)
    assert np.all(np.isfinite(partial)), "a partial sum was never written"
    want = np.array(x.astype(mx.float32), np.float64) @ _exact_affine_weight(wq, scales, biases, bits, group).T
    np.testing.assert_allclose(partial.sum(axis=0, dtype=np.float64), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert _gemm_mixed_pack.gemv_splits(3072, 3072) == 11 and _gemm_mixed_pack.gemv_splits(18432, 3072) == 2
    assert _gemm_mixed_pack.gemv_splits(n, 64) == 1  # never more splits than K tiles


# ---- the same kernels as the Python launchers ask for them (templates, grids, buffers as computed there)

@pytest.fixture
def recorder(monkeypatch):
    """mx.fast.cuda_kernel replaced by a recorder (the kernel factories' caches cleared on both sides)."""
    import mlx.core as mx

    from flashdiff.kernels import _dequant, _gemm_mixed_pack, qk_rope

    from flashdiff.kernels import _gemm_cuda, _moe_layout

    caches = [att._kernel, att._maps_kernel, _gemm_tma._kernel, _gemm_tma._gather_kernel, _gemm_tma._maps_kernel,
              _dequant._kernel, qk_rope._kernel, _moe_layout._layout_kernel, _gemm_cuda._kernel, _gemm_mixed._kernel,
              _gemm_tma_dequant_persistent._kernel, _moe_layout._prologue_kernel, _gemm_mixed._pack_kernel,
              _gemm_mixed._unpack_kernel, _gemm_mixed_pack._gemv_kernel]
    for cache in caches:
        cache.cache_clear()
    rec = LaunchRecorder()
    monkeypatch.setattr(mx.fast, "cuda_kernel", rec.cuda_kernel)
    yield rec
    for cache in caches:
        cache.cache_clear()


def test_attention_backend_cuda_wgmma_as_launched(tmp_path, recorder):
    """attention(..., backend="cuda_wgmma") with a boolean key mask and GQA: the launches its Python
    code makes, run through the emulation, against the float32 reference."""
    import mlx.core as mx

    from flashdiff.kernels import attention, attention_reference

    mx.random.seed(3)
    q = mx.random.normal((2, 2, 150, 128)).astype(mx.bfloat16)
    k, v = (mx.random.normal((2, 1, 260, 128)).astype(mx.bfloat16) for _ in range(2))
    mask = mx.arange(260)[None, None, None, :] < mx.array([255, 140])[:, None, None, None]
    attention(q, k, v, 0.09, mask, backend="cuda_wgmma")
    assert [r["name"] for r in recorder.launches] == ["flashdiff_attention_sm90_maps", "flashdiff_attention_sm90"]
    (out,) = replay(tmp_path, recorder.launches)
    ref = attention_reference(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), 0.09, mask)
    np.testing.assert_allclose(bf16_values(out).reshape(q.shape), np.array(ref), rtol=2e-2, atol=2e-2)


def test_persistent_attention_as_launched(tmp_path, recorder, monkeypatch):
    """flash_attention_sm90(..., persistent=True) as its launcher sizes it (a grid of num_sms() CTAs, here
    3 by FLASHDIFF_NUM_SMS, over 2 x 2 x 2 = 8 tiles) with a boolean key mask through attention's bias."""
    import mlx.core as mx

    from flashdiff.kernels import _gemm_tma, attention_reference
    from flashdiff.kernels.attention import _key_bias

    monkeypatch.setenv("FLASHDIFF_NUM_SMS", "3")
    _gemm_tma.num_sms.cache_clear()
    try:
        mx.random.seed(4)
        q = mx.random.normal((2, 2, 190, 128)).astype(mx.bfloat16)
        k, v = (mx.random.normal((2, 1, 170, 128)).astype(mx.bfloat16) for _ in range(2))
        mask = mx.arange(170)[None, None, None, :] < mx.array([170, 100])[:, None, None, None]
        att.flash_attention_sm90(q, k, v, 0.09, _key_bias(mask, 2, 170), persistent=True)
    finally:
        _gemm_tma.num_sms.cache_clear()
    assert [r["name"] for r in recorder.launches] == ["flashdiff_attention_sm90_maps", "flashdiff_attention_sm90_persistent"]
    assert recorder.launches[-1]["grid"] == (3 * att.THREADS, 1, 1)
    (out,) = replay(tmp_path, recorder.launches)
    ref = attention_reference(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), 0.09, mask)
    np.testing.assert_allclose(bf16_values(out).reshape(q.shape), np.array(ref), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bits, group, with_bias", [(4, 64, True), (8, 32, False)])
def test_quantized_linear_mixed_as_launched(tmp_path, recorder, monkeypatch, bits, group, with_bias):
    """quantized_linear under FLASHDIFF_QLINEAR=mixed as it launches the mixed-input GEMM on an sm_90 GPU
    (one kernel; template, grid and shared memory as computed there), against float64."""
    import mlx.core as mx

    from flashdiff.kernels import quantized_linear

    monkeypatch.setenv("FLASHDIFF_QLINEAR", "mixed")
    monkeypatch.setattr(_gemm_mixed, "is_sm90", lambda: True)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)  # backend="cuda" as on the GPU
    rng = np.random.default_rng(bits)
    m, k, n = 140, 256, 200
    w = mx.array(rng.standard_normal((n, k)) * 0.05).astype(mx.bfloat16)
    wq, s, b = mx.quantize(w, group, bits)
    x = mx.array(rng.standard_normal((2, m // 2, k))).astype(mx.bfloat16)
    bias = mx.array(rng.standard_normal((n,))).astype(mx.bfloat16) if with_bias else None
    y = quantized_linear(x, wq, s, b, bits, group, bias=bias, backend="cuda")
    assert y.shape == (2, m // 2, n)
    names = [r["name"] for r in recorder.launches]
    assert names == ["flashdiff_mixed_gemm"], names  # its CTAs encode their own tensor maps
    assert recorder.launches[-1]["shared_memory"] == _gemm_mixed.smem_bytes(bits, group)
    out, _ = replay(tmp_path, recorder.launches, _gemm_tma_dequant.DEQUANT_CODE + _gemm_mixed.MIXED_CODE)
    w_deq = np.array(mx.dequantize(wq, s, b, group, bits, stream=mx.cpu).astype(mx.float32), np.float64)
    ref = np.array(x.astype(mx.float32), np.float64).reshape(m, k) @ w_deq.T
    if with_bias:
        ref = ref + np.array(bias.astype(mx.float32), np.float64)
    np.testing.assert_allclose(bf16_values(out).reshape(m, n), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("mode, bits, group", [("affine", 4, 64), ("affine", 3, 32), ("affine", 8, 128),
                                               ("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)])
@pytest.mark.parametrize("row_kernel", [False, True])
def test_cuda_dequantize_kernel_as_launched(tmp_path, recorder, monkeypatch, mode, bits, group, row_kernel):
    """The CUDA dequantize kernels (the flat default, and the row kernel under FLASHDIFF_DEQUANT_ROWS=1) as
    dequantize(..., backend="cuda") launches them, bit-identical to mx.dequantize in float32: the check
    the GPU tests make, here on every CI run."""
    import mlx.core as mx

    from flashdiff.kernels import _dequant, dequantize
    from helpers import quant

    if row_kernel:
        monkeypatch.setenv("FLASHDIFF_DEQUANT_ROWS", "1")
    w, s, b = quant((3, 40, 384), mode, bits, group)
    dequantize(w, s, b, bits, group, mode, dtype=mx.float32, backend="cuda")
    assert ("PAIRED", False) in recorder.launches[-1]["template"] or row_kernel
    (out,) = replay(tmp_path, recorder.launches, _dequant._CUDA_HEADER + _dequant.DEQUANT_CODE)
    ref = mx.dequantize(w, s, b, group_size=group, bits=bits, mode=mode, dtype=mx.float32, stream=mx.cpu)
    np.testing.assert_array_equal(out.reshape(ref.shape), np.array(ref))


@pytest.mark.parametrize("bits, group", [(4, 64), (8, 64), (4, 32), (8, 128)])
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_cuda_dequantize_paired_path_as_launched(tmp_path, recorder, bits, group, dtype_name):
    """The flat kernel's paired path (affine 4/8-bit, scales in the output's bf16/fp16: fd_dq_chunk, two
    values per instruction, no float conversions) as dequantize launches it, bit-identical to MLX's CPU
    dequantize in that dtype; the weights span the codes' whole range, with negative and tiny biases."""
    import mlx.core as mx

    from flashdiff.kernels import _dequant, dequantize
    from helpers import quant

    dtype = getattr(mx, dtype_name)
    w, s, b = quant((2, 24, 256), "affine", bits, group, dtype=dtype, seed=5)
    assert s.dtype == dtype and b.dtype == dtype
    dequantize(w, s, b, bits, group, "affine", dtype=dtype, backend="cuda")
    assert ("PAIRED", True) in recorder.launches[-1]["template"]
    (out,) = replay(tmp_path, recorder.launches, _dequant._CUDA_HEADER + _dequant.DEQUANT_CODE)
    ref = mx.dequantize(w, s, b, group_size=group, bits=bits, dtype=dtype, stream=mx.cpu)
    ref_bits = np.array(ref.view(mx.uint16))
    np.testing.assert_array_equal(np.asarray(out).view(np.uint16).reshape(ref_bits.shape), ref_bits)


@pytest.mark.parametrize("lengths, heads, dh, extra", [((5, 11), 3, 64, 0), ((37,), 3, 128, 96), ((1, 300), 1, 128, 0)])
@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_qk_norm_rope_kernel_as_launched(tmp_path, recorder, lengths, heads, dh, extra, bf16):
    """The fused attention prologue's CUDA kernel (q/k RMSNorm + RoPE + [text, image] + v copy) as its
    launcher asks for it, against the MLX reference, with the GPU tests' cases and tolerances."""
    import mlx.core as mx

    from flashdiff.kernels import qk_rope
    from helpers import qk_rope_sources

    dtype = mx.bfloat16 if bf16 else mx.float32
    sources, cos, sin = qk_rope_sources(lengths, heads, dh, extra, dtype=dtype, seed=3)
    outs = qk_rope._qk_norm_rope_gpu(sources, heads, dh, cos, sin, 1e-6, "cuda")
    got = replay(tmp_path, recorder.launches)
    ref = qk_rope.qk_norm_rope_reference(sources, heads, dh, cos, sin, 1e-6)
    for raw, o, r in zip(got, outs, ref):
        o32 = bf16_values(raw) if bf16 else raw
        r32 = np.array(r.astype(mx.float32))
        tol = 2e-2 if bf16 else 1e-5
        np.testing.assert_allclose(o32.reshape(o.shape), r32, rtol=tol, atol=tol * np.abs(r32).max())


@pytest.mark.parametrize("t, top_k, e, empty", [(1000, 2, 4, None), (300, 2, 300, None), (77, 1, 1, None),
                                                (600, 3, 64, 5), (129, 2, 3, 0)])
def test_layout_kernel_as_launched(tmp_path, recorder, t, top_k, e, empty):
    """_moe_layout.layout's kernel as it launches it (a block per 256 routed rows, each counting all rows
    itself; padding slots and tile experts split over the blocks), against moe.grouped_layout: several
    blocks, an expert without rows (`empty`), more experts than rows, one expert."""
    import mlx.core as mx

    from flashdiff.kernels import _moe_layout

    rng = np.random.default_rng(t + e)
    experts = [j for j in range(e) if j != empty] if e > 1 else [0]
    ids = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(t)]).astype(np.int32)
    _moe_layout.layout(mx.array(ids), e)
    assert recorder.launches[-1]["grid"][0] == -(-t * top_k // _moe_layout.RPB) * _moe_layout.RPB
    slot, tiles = replay(tmp_path, recorder.launches)
    check_same_layout(slot, tiles, ids, e)


@pytest.mark.parametrize("mode, bits, group, dtype_name, t, top_k, e, gather", [
    ("affine", 4, 64, "bfloat16", 1000, 2, 4, False), ("affine", 8, 32, "float16", 300, 2, 3, True),
    ("affine", 3, 32, "float32", 77, 1, 1, False), ("mxfp4", 4, 32, "bfloat16", 600, 3, 5, True),
    (None, None, None, "bfloat16", 1000, 2, 4, True), (None, None, None, "float16", 129, 4, 9, True)])
def test_moe_prologue_as_launched(tmp_path, recorder, mode, bits, group, dtype_name, t, top_k, e, gather):
    """_moe_layout.moe_prologue (the layout kernel's blocks, each also copying x's rows it placed into slot order when
    gathering, then the flat dequantize kernel's blocks for quantized experts, in one launch): its schedule is
    moe.grouped_layout's (several blocks, one expert, more slots than rows), xs holds each slot's row of x, and the
    experts are mx.dequantize's bit for bit, through the paired path (affine 4/8-bit in bf16 / fp16) and the float
    one (3-bit to float32, mxfp4)."""
    import mlx.core as mx

    from flashdiff.kernels import _dequant, _moe_layout
    from flashdiff.kernels._dequant import check_quantized
    from helpers import quant

    dtype = getattr(mx, dtype_name)
    rng = np.random.default_rng(t + e)
    ids = np.stack([rng.choice(e, top_k, replace=False) for _ in range(t)]).astype(np.int32)
    x = mx.array(rng.standard_normal((t, 384))).astype(dtype if dtype != mx.float32 else mx.bfloat16)
    kw = dict(x=x, a_div=top_k) if gather else {}
    if mode is None:
        w = mx.array(rng.standard_normal((e, 40, 384))).astype(dtype)
        _moe_layout.moe_prologue(mx.array(ids), e, w=w, **kw)
    else:
        w, s, b = quant((e, 40, 384), mode, bits, group, dtype=dtype if dtype != mx.float32 else mx.bfloat16, seed=3)
        k = check_quantized(w, s, b, bits, group, mode)[3]
        _moe_layout.moe_prologue(mx.array(ids), e, quantized=(w, s, b, bits, group, k, mode, dtype), **kw)
    (launch,) = recorder.launches
    dequant = "" if mode is None else f"_dequant_{'affine' if mode == 'affine' else 'fp'}"
    assert launch["name"] == "flashdiff_moe_layout" + ("_gather" if gather else "") + dequant
    if mode is not None:
        assert (("PAIRED", True) in launch["template"]) == (mode == "affine" and bits in (4, 8) and dtype != mx.float32)
    outs = replay(tmp_path, recorder.launches, _dequant._CUDA_HEADER + _dequant.DEQUANT_CODE)
    slot, tiles = outs[:2]
    check_same_layout(slot, tiles, ids, e)
    if gather:
        xs = np.asarray(outs[2]).view(np.uint16).reshape(-1, 384)
        named = slot >= 0
        np.testing.assert_array_equal(xs[named], _u16(x)[slot[named] // top_k])
    if mode is not None:
        ref = mx.dequantize(w, s, b, group_size=group, bits=bits, mode=mode, dtype=dtype, stream=mx.cpu)
        if dtype == mx.float32:
            np.testing.assert_array_equal(np.asarray(outs[-1]).reshape(ref.shape), np.array(ref))
        else:
            np.testing.assert_array_equal(np.asarray(outs[-1]).view(np.uint16).reshape(ref.shape), _u16(ref))


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("engine", ["wgmma persistent", "wgmma tma", "wgmma persistent gather"])
def test_cuda_moe_path_as_launched(tmp_path, recorder, monkeypatch, quantized, engine):
    """The CUDA MoE path as moe_gemm takes it on sm_90: (the dequantize kernel for 4-bit experts,) the
    layout kernel (warp matches, shared counters), gather + maps, the grouped TMA GEMM in its default
    persistent form and its per-tile form; against every routed row through its expert."""
    import mlx.core as mx

    from flashdiff.kernels import _dequant, _gemm_cuda
    from flashdiff.kernels.moe import moe_grouped

    monkeypatch.setattr(_gemm_cuda, "is_sm90", lambda: True)
    assert _gemm_cuda.default_engine() == "wgmma persistent"
    monkeypatch.setenv("FLASHDIFF_GEMM_ENGINE", engine)
    mx.random.seed(5)
    t, e, k, n = 333, 5, 128, 200
    x = mx.random.normal((t, k)).astype(mx.bfloat16)
    w = (mx.random.normal((e, n, k)) * 0.1).astype(mx.bfloat16)
    ids = mx.argsort(mx.random.uniform(shape=(t, e)), axis=-1)[:, :2].astype(mx.int32)
    if quantized:
        wq, s, b = mx.quantize(w, 64, 4)
        w_used = _dequant.dequantize(wq, s, b, 4, 64, "affine", dtype=mx.bfloat16, backend="cuda")
        w = mx.dequantize(wq, s, b, 64, 4, dtype=mx.float32, stream=mx.cpu)  # the reference's experts
    else:
        w_used = w
    moe_grouped(x, w_used, ids)
    names = [r["name"] for r in recorder.launches]
    gemm_name = "flashdiff_grouped_gemm_tma" + ("" if engine == "wgmma tma" else "_persistent")
    before = "flashdiff_gemm_tensor_maps" if engine.endswith("gather") else "flashdiff_gather_slots"
    assert names[-3:] == ["flashdiff_moe_layout", before, gemm_name], names
    (out,) = replay(tmp_path, recorder.launches, _dequant._CUDA_HEADER + _dequant.DEQUANT_CODE)
    xf, wf = np.array(x.astype(mx.float32)).astype(np.float64), np.array(w.astype(mx.float32)).astype(np.float64)
    ref = np.einsum("tk,tjnk->tjn", xf, wf[np.array(ids)]).reshape(t * 2, n)
    np.testing.assert_allclose(bf16_values(out).reshape(t * 2, n), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("engine", ["wgmma persistent", "wgmma tma"])
@pytest.mark.parametrize("per_slot", [False, True])
def test_moe_gemm_gathered_in_layout_as_launched(tmp_path, recorder, monkeypatch, engine, per_slot):
    """moe_gemm with bf16 experts on sm_90 as it launches by default: one layout kernel that also gathers x's routed
    rows and encodes the tensor maps (4 blocks of 64 routed rows), then the TMA GEMM (persistent on 2 CTAs, or a
    CTA per tile), with x (T, K) shared by a token's slots or (T, k, K) one row per slot; against numpy."""
    import mlx.core as mx

    from flashdiff.kernels import _gemm_cuda, moe_gemm

    monkeypatch.setenv("FLASHDIFF_NUM_SMS", "2")
    _gemm_tma.num_sms.cache_clear()
    monkeypatch.setattr(_gemm_cuda, "is_sm90", lambda: True)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    monkeypatch.setenv("FLASHDIFF_GEMM_ENGINE", engine)
    try:
        mx.random.seed(11)
        t, e, k, n = 120, 3, 192, 136
        x = mx.random.normal((t, 2, k) if per_slot else (t, k)).astype(mx.bfloat16)
        w = (mx.random.normal((e, n, k)) * 0.1).astype(mx.bfloat16)
        ids = mx.argsort(mx.random.uniform(shape=(t, e)), axis=-1)[:, :2].astype(mx.int32)
        moe_gemm(x, w, ids, backend="cuda")
        gemm = "flashdiff_grouped_gemm_tma" + ("_persistent" if engine == "wgmma persistent" else "")
        assert [r["name"] for r in recorder.launches] == ["flashdiff_moe_layout_gather", gemm]
        (out,) = replay(tmp_path, recorder.launches)
        xf, wf = np.array(x.astype(mx.float32), np.float64), np.array(w.astype(mx.float32), np.float64)
        ref = np.einsum("tjk,tjnk->tjn" if per_slot else "tk,tjnk->tjn", xf, wf[np.array(ids)]).reshape(t * 2, n)
        np.testing.assert_allclose(bf16_values(out).reshape(t * 2, n), ref, rtol=1e-2, atol=1e-2)
    finally:
        _gemm_tma.num_sms.cache_clear()


@pytest.mark.parametrize("bits, group, k", [(4, 64, 192), (8, 32, 224)])
def test_moe_over_quantized_experts_as_launched(tmp_path, recorder, monkeypatch, bits, group, k):
    """moe_gemm with quantized experts on sm_90 under FLASHDIFF_GEMM_DEQUANT=fused (the persistent GEMM whose storer
    warps dequantize them, 2 CTAs walking the tiles): the scratch holds mx.dequantize's experts bit for bit where a tile uses them (an expert
    without rows is never dequantized), and every routed row equals the other paths' (dequantize kernel, or the
    default: layout + dequantization in one launch; then the persistent GEMM) bit for bit; N and K past whole
    units (296 rows, K % 64 != 0 for the 8-bit case)."""
    import mlx.core as mx

    from flashdiff.kernels import _dequant, _gemm_cuda, _moe_layout, moe_gemm

    monkeypatch.setenv("FLASHDIFF_NUM_SMS", "2")
    _gemm_tma.num_sms.cache_clear()
    monkeypatch.setattr(_gemm_cuda, "is_sm90", lambda: True)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    monkeypatch.setenv("FLASHDIFF_GEMM_DEQUANT", "fused")
    try:
        mx.random.seed(bits)
        t, e, n = 150, 4, 296
        x = mx.random.normal((t, k)).astype(mx.bfloat16)
        w = (mx.random.normal((e, n, k)) * 0.1).astype(mx.bfloat16)
        wq, s, b = mx.quantize(w, group, bits)
        ids = mx.argsort(mx.random.uniform(shape=(t, e - 1)), axis=-1)[:, :2].astype(mx.int32)  # expert 3: no rows
        moe_gemm(x, wq, ids, scales=s, biases=b, bits=bits, group_size=group, backend="cuda")
        names = [r["name"] for r in recorder.launches]
        assert names == ["flashdiff_moe_layout", "flashdiff_gather_slots_work",
                         "flashdiff_grouped_gemm_tma_persistent_dequant"], names
        assert recorder.launches[-1]["grid"][0] == 2 * _gemm_tma.THREADS
        out, w_deq, _ = replay(tmp_path, recorder.launches, _dequant.DEQUANT_CODE)
        ref_w = np.array(mx.dequantize(wq, s, b, group, bits, stream=mx.cpu).view(mx.uint16)).reshape(e, n, k)
        w_deq = w_deq.reshape(e, n, k)
        np.testing.assert_array_equal(w_deq[:3], ref_w[:3])
        assert (w_deq[3] == 0xFFFF).all()  # the emulation's unwritten fill: expert 3's units were skipped

        # the other ways, bit for bit the same: the dequantize kernel on its own or in the layout kernel's launch
        # (FLASHDIFF_GEMM_DEQUANT separate / merged), x's rows gathered there too or by a kernel of their own
        # (FLASHDIFF_MOE_GATHER layout / kernel); the default: all three in one launch, then the GEMM
        gemm = ["flashdiff_grouped_gemm_tma_persistent"]
        for how, gather, names_want in [
                ("separate", "kernel", ["flashdiff_dequant_affine_flat", "flashdiff_moe_layout", "flashdiff_gather_slots"]),
                ("separate", "layout", ["flashdiff_dequant_affine_flat", "flashdiff_moe_layout_gather"]),
                ("merged", "kernel", ["flashdiff_moe_layout_dequant_affine", "flashdiff_gather_slots"]),
                ("merged", "layout", ["flashdiff_moe_layout_gather_dequant_affine"])]:
            recorder.launches.clear()
            monkeypatch.setenv("FLASHDIFF_GEMM_DEQUANT", how)
            monkeypatch.setenv("FLASHDIFF_MOE_GATHER", gather)
            moe_gemm(x, wq, ids, scales=s, biases=b, bits=bits, group_size=group, backend="cuda")
            names = [r["name"] for r in recorder.launches]
            assert names == names_want + gemm, names
            (tmp_path / f"{how}-{gather}").mkdir()
            (other,) = replay(tmp_path / f"{how}-{gather}", recorder.launches, _dequant._CUDA_HEADER + _dequant.DEQUANT_CODE)
            np.testing.assert_array_equal(out, other)
        monkeypatch.delenv("FLASHDIFF_GEMM_DEQUANT")
        monkeypatch.delenv("FLASHDIFF_MOE_GATHER")
        assert _gemm_cuda.dequant_choice() == "merged" and _moe_layout.gather_in_layout()
        xf = np.array(x.astype(mx.float32), np.float64)
        wf = bf16_values(ref_w).astype(np.float64)
        ref = np.einsum("tk,tjnk->tjn", xf, wf[np.array(ids)]).reshape(t * 2, n)
        np.testing.assert_allclose(bf16_values(out).reshape(t * 2, n), ref, rtol=2e-2, atol=2e-2)
    finally:
        _gemm_tma.num_sms.cache_clear()


def test_dense_gemm_over_quantized_weights_as_launched(tmp_path, recorder, monkeypatch):
    """dense_gemm_quantized (the same kernel, slot s = row s, maps + counters from tensor_maps) on 2 CTAs walking
    9 tiles, fp16: equal to x @ mx.dequantize(w).T through the emulated wgmmas."""
    import mlx.core as mx

    from flashdiff.kernels import _dequant, _gemm_cuda

    monkeypatch.setenv("FLASHDIFF_NUM_SMS", "2")
    _gemm_tma.num_sms.cache_clear()
    try:
        mx.random.seed(9)
        m, k, n = 300, 256, 520
        x = mx.random.normal((m, k)).astype(mx.float16)
        wq, s, b = mx.quantize((mx.random.normal((n, k)) * 0.1).astype(mx.float16), 64, 4)
        _gemm_cuda.dense_gemm_quantized(x, wq, s, b, 4, 64)
        assert [r["name"] for r in recorder.launches] == ["flashdiff_gemm_tensor_maps_work",
                                                          "flashdiff_grouped_gemm_tma_persistent_dequant"]
        out, w_deq, _ = replay(tmp_path, recorder.launches, _dequant.DEQUANT_CODE)
        ref_w = np.array(mx.dequantize(wq, s, b, 64, 4, stream=mx.cpu).view(mx.uint16))
        np.testing.assert_array_equal(w_deq.reshape(n, k), ref_w)
        f16 = lambda bits: bits.astype(np.uint16).view(np.float16).astype(np.float64)  # noqa: E731
        ref = np.array(x.astype(mx.float32), np.float64) @ f16(ref_w).T
        np.testing.assert_allclose(f16(out).reshape(m, n), ref, rtol=1e-2, atol=1e-2)
    finally:
        _gemm_tma.num_sms.cache_clear()


@pytest.mark.parametrize("engine, t, k, expert, grouped_kernels, dense_kernels", [
    ("wgmma tma", 250, 192, 1, ["flashdiff_gather_slots", "flashdiff_grouped_gemm_tma"],
     ["flashdiff_gemm_tensor_maps", "flashdiff_grouped_gemm_tma"]),
    ("mma", 150, 200, 2, ["flashdiff_grouped_gemm"], ["flashdiff_grouped_gemm"]),  # the default before Hopper
    ("wgmma persistent", 250, 320, 0, ["flashdiff_gather_slots", "flashdiff_grouped_gemm_tma_persistent"],
     ["flashdiff_gemm_tensor_maps", "flashdiff_grouped_gemm_tma_persistent"]),
    ("wgmma persistent gather", 250, 320, 2, ["flashdiff_gemm_tensor_maps", "flashdiff_grouped_gemm_tma_persistent"],
     ["flashdiff_gemm_tensor_maps", "flashdiff_grouped_gemm_tma_persistent"]),
])
def test_grouped_and_dense_gemm_as_launched(tmp_path, recorder, monkeypatch, engine, t, k, expert, grouped_kernels,
                                            dense_kernels):
    """_gemm_cuda.grouped_gemm (MoE schedule) and dense_gemm as their launchers run them: the TMA GEMM with
    gather + maps / maps, the mma.sync GEMM (cp.async stages, ldmatrix, mma.sync), and the persistent TMA
    GEMM on 2 CTAs (FLASHDIFF_NUM_SMS) that walk 3 tiles each, the epilogue buffer and the storer warps
    reused from tile to tile, K tiles past the 3 stages, with its input tiles by TMA from the gathered rows or
    (gather form) by the loader warps' cp.async from x's routed rows; against numpy."""
    from flashdiff.kernels import _gemm_tma

    monkeypatch.setenv("FLASHDIFF_NUM_SMS", "2")
    _gemm_tma.num_sms.cache_clear()
    try:
        _check_grouped_and_dense(tmp_path, recorder, engine, t, k, expert, grouped_kernels, dense_kernels)
    finally:
        _gemm_tma.num_sms.cache_clear()


def _check_grouped_and_dense(tmp_path, recorder, engine, t, k, expert, grouped_kernels, dense_kernels):
    import mlx.core as mx

    from flashdiff.kernels import _gemm_cuda
    from flashdiff.kernels.moe import grouped_layout

    mx.random.seed(4)
    x = mx.random.normal((t, k)).astype(mx.bfloat16)
    w = (mx.random.normal((3, 136, k)) * 0.1).astype(mx.bfloat16)
    ids = mx.argsort(mx.random.uniform(shape=(t, 3)), axis=-1)[:, :2].astype(mx.int32)
    slot_row, tile_expert = grouped_layout(ids, 3)
    _gemm_cuda.grouped_gemm(x, w, slot_row, tile_expert, 2 * t, 2, engine=engine)
    assert [r["name"] for r in recorder.launches] == grouped_kernels
    (tmp_path / "grouped").mkdir()
    (out,) = replay(tmp_path / "grouped", recorder.launches)
    xf, wf = np.array(x.astype(mx.float32)).astype(np.float64), np.array(w.astype(mx.float32)).astype(np.float64)
    ref = np.einsum("tk,tjnk->tjn", xf, wf[np.array(ids)]).reshape(2 * t, 136)
    np.testing.assert_allclose(bf16_values(out).reshape(2 * t, 136), ref, rtol=1e-2, atol=1e-2)

    recorder.launches.clear()
    _gemm_cuda.dense_gemm(x, w[expert], engine=engine)
    assert [r["name"] for r in recorder.launches] == dense_kernels
    (out,) = replay(tmp_path, recorder.launches)
    np.testing.assert_allclose(bf16_values(out).reshape(t, 136), xf @ wf[expert].T, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("bits, group, with_bias, sms, path", [(4, 64, True, 4, "mixed"), (8, 32, False, 4, "mixed"),
                                                               (4, 128, False, 7, "dequantize"), (8, 64, True, 7, "dequantize"),
                                                               (4, 64, True, 4, "gemv"), (8, 128, False, 7, "gemv")])
def test_packed_layer_as_launched(tmp_path, recorder, monkeypatch, bits, group, with_bias, sms, path):
    """pack_quantized_linears on an sm_90 GPU, then the packed layer's call, as their launchers ask for the kernels:
    pack_weight's, then the mixed GEMM where its 4 CTAs fill the last wave (FLASHDIFF_NUM_SMS=4: packed_gemm_wins) or
    dequantize_packed's where they do not (7 multiprocessors: 4 / 7 full), packed_gemv's for 2 rows (< SMALL_M), each
    replayed through the emulation against float64 / mx.dequantize. And model_weights of the packed model gives back mx.quantize's arrays (save_component's
    checkpoint layout), from the emulated pack's real blocks."""
    import mlx.core as mx
    import mlx.nn as nn

    from flashdiff.engine.components import model_weights
    from flashdiff.kernels import PackedQuantizedLinear, QuantizedLinear, _gemm_cuda, pack_quantized_linears, qgemm

    monkeypatch.setattr(_gemm_cuda, "is_sm90", lambda: True)
    monkeypatch.setattr(_gemm_mixed, "is_sm90", lambda: True)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    monkeypatch.setenv("FLASHDIFF_KERNELS", "cuda")  # as on the GPU (the CPU is the default device here)
    monkeypatch.setenv("FLASHDIFF_NUM_SMS", str(sms))
    monkeypatch.setattr(qgemm, "PACKED_MIN_M", 1)  # 140 rows: the waves alone choose here
    _gemm_tma.num_sms.cache_clear()
    m, k, n = (2 if path == "gemv" else 140), 256, 200
    linear = nn.Linear(k, n, bias=with_bias)
    linear.set_dtype(mx.bfloat16)
    model = nn.Sequential(QuantizedLinear.from_linear(linear, group, bits))
    wq, s, b = model.layers[0]["weight"], model.layers[0]["scales"], model.layers[0]["biases"]
    monkeypatch.setenv("FLASHDIFF_QLINEAR_PACKED", "1")
    assert pack_quantized_linears(model) == 1 and isinstance(model.layers[0], PackedQuantizedLinear)
    assert [r["name"] for r in recorder.launches] == ["flashdiff_mixed_pack"]
    x = mx.array(np.random.default_rng(bits).standard_normal((2, m // 2, k))).astype(mx.bfloat16)
    y = model(x)
    assert y.shape == (2, m // 2, n)
    names = [r["name"] for r in recorder.launches]
    w_deq = mx.dequantize(wq, s, b, group, bits, stream=mx.cpu)
    headers = _gemm_tma_dequant.DEQUANT_CODE + _gemm_mixed.MIXED_CODE
    for sub in ("call", "pack"):
        (tmp_path / sub).mkdir()
    if path == "mixed":
        assert names == ["flashdiff_mixed_pack", "flashdiff_mixed_gemm"], names
        out, _ = replay(tmp_path / "call", recorder.launches, headers)
        ref = np.array(x.astype(mx.float32), np.float64).reshape(m, k) @ np.array(w_deq.astype(mx.float32), np.float64).T
        if with_bias:
            ref = ref + np.array(linear.bias.astype(mx.float32), np.float64)
        np.testing.assert_allclose(bf16_values(out).reshape(m, n), ref, rtol=1e-2, atol=1e-2)
    elif path == "gemv":
        assert names == ["flashdiff_mixed_pack", "flashdiff_mixed_packed_gemv"], names
        (partial,) = replay(tmp_path / "call", recorder.launches, headers + GEMV_EMU_HEADER)
        got = partial.reshape(-1, m, n).sum(axis=0, dtype=np.float64)
        ref = np.array(x.astype(mx.float32), np.float64).reshape(m, k) @ _exact_affine_weight(wq, s, b, bits, group).T
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    else:
        assert names == ["flashdiff_mixed_pack", "flashdiff_mixed_unpack"], names
        (out,) = replay(tmp_path / "call", recorder.launches, headers)
        np.testing.assert_array_equal(out.reshape(n, k), _u16(w_deq))
    (packed,) = replay(tmp_path / "pack", recorder.launches[:1], headers)
    model.layers[0].packed = mx.array(packed)  # the pack kernel's real blocks in place of the recorder's placeholder
    saved = model_weights(model)
    assert sorted(saved) == sorted(["layers.0.weight", "layers.0.scales", "layers.0.biases"] + (["layers.0.bias"] if with_bias else []))
    np.testing.assert_array_equal(np.array(saved["layers.0.weight"]), np.array(wq))
    np.testing.assert_array_equal(_u16(saved["layers.0.scales"]), _u16(s))
    np.testing.assert_array_equal(_u16(saved["layers.0.biases"]), _u16(b))
    _gemm_tma.num_sms.cache_clear()
