"""The sm_90 attention kernel (``flashdiff/kernels/_attention_sm90.py``) without a GPU.

Its GPU tests are in tests/test_kernels_cuda.py (run on the H200 in session 7) and the kernels run as
written under tests/cuda_emulation.py (tests/test_cuda_emulation.py). These tests check on the CPU
what numpy can: its argument errors and its per-thread algorithm emulated in float64 numpy with the
register layouts it relies on (the m64nN accumulator layout and the m64k16 A-register layout of the
PTX ISA), against softmax attention. The emulation follows the source's formulas; the source lines
it follows are asserted to be there, so an edit of one shows up here.
"""

import mlx.core as mx
import numpy as np
import pytest

from flashdiff.kernels import _attention_sm90 as sm90
from flashdiff.kernels import attention
from helpers import softmax_attention_np

SOURCE_LINES = [
    "const int kv_bh = batch * HK + (bh % H) / (H / HK);",
    "const int r0 = wg * 64 + (warp & 3) * 16 + (lane >> 2);",
    "const int key = j * BN + 8 * c + 2 * t + e;",
    "const bool ok = !tail || key < LK;",
    "sc[4 * c + e] = ok ? sc[4 * c + e] * sl2 + bias : NEG_INF;",
    "if (tail && key >= LK) sc[4 * c + e] = sc[4 * c + 2 + e] = NEG_INF;",
    "base[h] = mx[h] == NEG_INF ? 0.0f : mx[h];",
    "corr[h] = fd_exp2(m_run[h] - base[h]);",
    "a[c >> 1][(c & 1) * 2] = fd_pack2<T>(sc[4 * c], sc[4 * c + 1]);",
    "a[c >> 1][(c & 1) * 2 + 1] = fd_pack2<T>(sc[4 * c + 2], sc[4 * c + 3]);",
    "l_run[h] = l_run[h] > 0.0f ? 1.0f / l_run[h] : 0.0f;",
    "fd_tma_load(vd, maps + 256, kv_col, kv_row + j * BN, vf);",
]


def emulate(q, k, v, scale, bias=None):
    """The consumer warpgroups' arithmetic, thread by thread, for every (batch, head, query block)."""
    b, h, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    k_rows = k.reshape(b * hk * lk, d)  # what the TMA maps over K and V hold: rows past Lk are the next
    v_rows = v.reshape(b * hk * lk, d)  # head's (or zeros past the tensor)
    out = np.zeros_like(q)
    lane = np.arange(32)
    g, t = lane >> 2, lane & 3
    for bh in range(b * h):
        batch = bh // h
        kv_bh = batch * hk + (bh % h) // (h // hk)
        for m0 in range(0, lq, 128):
            qb = np.zeros((128, d))
            rows = q.reshape(b * h * lq, d)[bh * lq + m0: bh * lq + m0 + 128]
            qb[: len(rows)] = rows  # TMA: the next head's rows, or zeros past the tensor
            for wg in range(2):
                o_mat = np.zeros((64, d))
                m_run = np.full((4, 32, 2), -np.inf)
                l_run = np.zeros((4, 32, 2))
                for j in range(-(-lk // 128)):
                    kt = np.zeros((128, d))
                    krows = k_rows[kv_bh * lk + j * 128: kv_bh * lk + j * 128 + 128]
                    kt[: len(krows)] = krows
                    vtile = np.zeros((128, d))  # keys x head dim: past Lk the next head's keys (p = 0 there)
                    vrows = v_rows[kv_bh * lk + j * 128: kv_bh * lk + j * 128 + 128]
                    vtile[: len(vrows)] = vrows
                    s_mat = qb[wg * 64: wg * 64 + 64] @ kt.T  # the accumulator of S = Q K^T
                    p_mat = np.zeros((64, 128))
                    tail = (j + 1) * 128 > lk
                    for w in range(4):
                        r0 = w * 16 + g  # rows within the warpgroup
                        sc = np.zeros((32, 64))
                        for c in range(16):
                            for e in range(2):
                                sc[:, 4 * c + e] = s_mat[r0, 8 * c + 2 * t + e]
                                sc[:, 4 * c + 2 + e] = s_mat[r0 + 8, 8 * c + 2 * t + e]
                        for c in range(16):
                            for e in range(2):
                                key = j * 128 + 8 * c + 2 * t + e
                                ok = (not tail) | (key < lk)
                                bk = np.where(ok, bias[batch, np.minimum(key, lk - 1)] / np.log(2) if bias is not None
                                              else 0.0, 0.0)
                                for hh in range(2):
                                    i = 4 * c + 2 * hh + e
                                    sc[:, i] = np.where(ok, sc[:, i] * scale / np.log(2) + bk, -np.inf)
                        mx_ = np.stack([np.maximum(m_run[w, :, hh], sc[:, [4 * c + 2 * hh + e for c in range(16)
                                                                           for e in range(2)]].max(1))
                                        for hh in range(2)], 1)
                        mx_ = np.maximum.reduce([mx_[lane ^ x] for x in (0, 1, 2, 3)])  # the two xor shuffles
                        base = np.where(mx_ == -np.inf, 0.0, mx_)
                        corr = np.exp2(m_run[w] - base)
                        m_run[w] = mx_
                        l_run[w] *= corr
                        a = np.zeros((32, 8, 4, 2))  # registers a[kk][r] as value pairs (low, high)
                        for c in range(16):
                            p = np.exp2(sc[:, 4 * c: 4 * c + 4] - np.repeat(base, 2, axis=1))
                            l_run[w, :, 0] += p[:, 0] + p[:, 1]
                            l_run[w, :, 1] += p[:, 2] + p[:, 3]
                            a[:, c >> 1, (c & 1) * 2] = p[:, 0:2]
                            a[:, c >> 1, (c & 1) * 2 + 1] = p[:, 2:4]
                        # the m64k16 A-register layout: register r of lane holds (row g + 8 (r & 1),
                        # k 2t + 8 (r >> 1) + {0, 1}) of the warp's 16 rows
                        for kk in range(8):
                            for r in range(4):
                                for e in range(2):
                                    p_mat[w * 16 + g + 8 * (r & 1), 16 * kk + 2 * t + 8 * (r >> 1) + e] = a[:, kk, r, e]
                        row_corr = np.empty(16)  # rows g and g + 8 of the warp: the quad's common factor
                        row_corr[:8], row_corr[8:] = corr[::4, 0], corr[::4, 1]
                        o_mat[w * 16: w * 16 + 16] *= row_corr[:, None]  # o *= corr before this tile's MMA
                    o_mat += p_mat @ vtile
                for w in range(4):
                    lsum = l_run[w][lane ^ 0] + l_run[w][lane ^ 1] + l_run[w][lane ^ 2] + l_run[w][lane ^ 3]
                    inv = np.where(lsum > 0, 1 / np.where(lsum > 0, lsum, 1), 0.0)
                    for hh in range(2):
                        row = m0 + wg * 64 + w * 16 + g + 8 * hh
                        keep = row < lq
                        out[bh // h, bh % h, row[keep]] = o_mat[w * 16 + g + 8 * hh][keep] * inv[keep, hh][:, None]
    return out


def test_source_has_the_emulated_lines():
    for line in SOURCE_LINES:
        assert line in sm90._SOURCE, line


@pytest.mark.parametrize("b, h, hk, lq, lk", [(1, 1, 1, 200, 300), (2, 4, 2, 129, 77), (1, 2, 1, 64, 257)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_emulated_kernel_matches_softmax_attention(b, h, hk, lq, lk, with_bias):
    """Query tails, key tails (keys past Lk inside the last tile come from the next head and must not
    count), GQA, batches; with a key bias whose first 128 keys are all -inf (a tile with no key yet
    for every row: the kernel's NaN guard)."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape) for shape in ((b, h, lq, 128), (b, hk, lk, 128), (b, hk, lk, 128)))
    bias = None
    if with_bias:
        bias = rng.uniform(-3, 0, (b, lk))
        bias[:, : min(128, lk - 1)] = -np.inf
    got = emulate(q, k, v, 0.088, bias)
    np.testing.assert_allclose(got, softmax_attention_np(q, k, v, 0.088, bias), rtol=1e-9, atol=1e-9)


def test_bad_arguments():
    q = mx.zeros((1, 2, 16, 64), mx.bfloat16)
    with pytest.raises(ValueError, match="head dim 128"):
        sm90.flash_attention_sm90(q, q, q, 0.1)
    q = mx.zeros((1, 2, 16, 128), mx.float32)
    with pytest.raises(ValueError, match="bf16/f16"):
        sm90.flash_attention_sm90(q, q, q, 0.1)
    q = mx.zeros((1, 2, 16, 128), mx.bfloat16)
    with pytest.raises(ValueError, match="bf16/f16"):
        sm90.flash_attention_sm90(q, q.astype(mx.float16), q, 0.1)
    with pytest.raises(ValueError, match=r"key_bias must be \(B, Lk\) = \(1, 16\)"):
        sm90.flash_attention_sm90(q, q, q, 0.1, mx.zeros((1, 15)))
    with pytest.raises(ValueError, match=r"\(1, 9\)"):  # sequence-major: Lk is axis 1
        sm90.flash_attention_sm90(q, mx.zeros((1, 9, 2, 128), mx.bfloat16), mx.zeros((1, 9, 2, 128), mx.bfloat16),
                                  0.1, mx.zeros((1, 16)), seq_major=True)
    with pytest.raises(ValueError, match="key masks"):
        attention(q, q, q, 0.1, mx.ones((1, 2, 16, 16), mx.bool_), backend="cuda_wgmma")
