"""A plain FlashAttention-2 style forward kernel for CUDA (mx.fast.cuda_kernel, WMMA bf16/f16).

One block = 4 warps = 64 query rows (16 per warp); loop over 64-key tiles held in shared memory:
S = Q K^T (tensor cores) -> online softmax in float32 (exp2, scale * log2e folded in) -> O += P V,
with the O accumulator kept in shared memory (float32) so that per-row rescaling stays simple.
Keys beyond Lk are masked, so odd lengths need no padding. Supports an optional per-key additive
bias (B, Lk) (boolean key masks become 0 / -inf biases). D in {64, 128}; GQA by head division.

Measured on the H200 this is slower than cuDNN's SDPA (see benchmarks/README.md, Kernels), so
``attention`` keeps ``mx.fast.scaled_dot_product_attention`` on CUDA; this kernel stays as the
tested baseline for fusions (RoPE / q-k norm prologues) that cuDNN cannot take.
"""

import functools
import math

import mlx.core as mx

from ._jit import cuda_kernel
_HEADER = r"""
#include <mma.h>
"""

_SOURCE = r"""
  using namespace nvcuda;
  constexpr int BQ = 64, BK = 64;
  constexpr int LDQ = D + 8, LDS = BK + 4, LDP = BK + 8, LDO = D + 4;
  constexpr float LOG2E = 1.4426950408889634f;
  const float NEG_INF = __int_as_float(0xff800000);
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = Qs + BQ * LDQ;
  T* Vs = Ks + BK * LDQ;
  float* Ss = reinterpret_cast<float*>(Vs + BK * LDQ);
  T* Ps = reinterpret_cast<T*>(Ss + BQ * LDS);
  float* Os = reinterpret_cast<float*>(Ps + BQ * LDP);
  float* Ms = Os + BQ * LDO;
  float* Ls = Ms + BQ;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int q0 = blockIdx.x * BQ;
  const int bh = blockIdx.y;
  const int b = bh / H, h = bh % H;
  const int hk = h / (H / HK);
  const T* qp = q + ((size_t)bh * LQ) * D;
  const T* kp = k + ((size_t)(b * HK + hk) * LK) * D;
  const T* vp = v + ((size_t)(b * HK + hk) * LK) * D;
  const float scale_log2 = scale[0] * LOG2E;
  constexpr int VPR = D / 8;  // 16-byte vectors per row

  for (int i = tid; i < BQ * VPR; i += 128) {
    int r = i / VPR, c = (i % VPR) * 8;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (q0 + r < LQ) val = *reinterpret_cast<const uint4*>(qp + (size_t)(q0 + r) * D + c);
    *reinterpret_cast<uint4*>(Qs + r * LDQ + c) = val;
  }
  for (int i = tid; i < BQ * LDO; i += 128) Os[i] = 0.0f;
  if (tid < BQ) { Ms[tid] = NEG_INF; Ls[tid] = 0.0f; }

  const int r = warp * 16 + lane / 2;   // softmax row owned by this lane pair
  const int half = lane & 1;
  for (int k0 = 0; k0 < LK; k0 += BK) {
    __syncthreads();
    for (int i = tid; i < BK * VPR; i += 128) {
      int rr = i / VPR, c = (i % VPR) * 8;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
      if (k0 + rr < LK) {
        kv = *reinterpret_cast<const uint4*>(kp + (size_t)(k0 + rr) * D + c);
        vv = *reinterpret_cast<const uint4*>(vp + (size_t)(k0 + rr) * D + c);
      }
      *reinterpret_cast<uint4*>(Ks + rr * LDQ + c) = kv;
      *reinterpret_cast<uint4*>(Vs + rr * LDQ + c) = vv;
    }
    __syncthreads();
    // S = Q K^T for this warp's 16 rows x 64 keys
#pragma unroll
    for (int n = 0; n < BK / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fa, Qs + warp * 16 * LDQ + kk * 16, LDQ);
        wmma::load_matrix_sync(fb, Ks + n * 16 * LDQ + kk * 16, LDQ);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(Ss + warp * 16 * LDS + n * 16, acc, LDS, wmma::mem_row_major);
    }
    __syncwarp();
    // online softmax: two lanes per row, 32 keys each
    const float m_old = Ms[r], l_old = Ls[r];
    float mx_ = NEG_INF;
#pragma unroll 8
    for (int j = 0; j < 32; ++j) {
      const int c = half * 32 + j, key = k0 + c;
      float s = Ss[r * LDS + c] * scale_log2;
      if (key >= LK) s = NEG_INF;
      else if (HAS_BIAS) s += kbias[(size_t)b * LK + key] * LOG2E;
      Ss[r * LDS + c] = s;
      mx_ = fmaxf(mx_, s);
    }
    mx_ = fmaxf(mx_, __shfl_xor_sync(0xffffffffu, mx_, 1));
    const float m_new = fmaxf(m_old, mx_);
    const float m_use = (m_new == NEG_INF) ? 0.0f : m_new;
    const float alpha = exp2f(m_old - m_use);
    float sum = 0.0f;
#pragma unroll 8
    for (int j = 0; j < 32; ++j) {
      const int c = half * 32 + j;
      const float p = exp2f(Ss[r * LDS + c] - m_use);
      Ps[r * LDP + c] = (T)p;
      sum += p;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    for (int d = half * (D / 2); d < (half + 1) * (D / 2); ++d) Os[r * LDO + d] *= alpha;
    __syncwarp();
    if (half == 0) { Ms[r] = m_new; Ls[r] = l_old * alpha + sum; }
    __syncwarp();
    // O += P V for this warp's 16 rows
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, Os + warp * 16 * LDO + n * 16, LDO, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fa, Ps + warp * 16 * LDP + kk * 16, LDP);
        wmma::load_matrix_sync(fb, Vs + kk * 16 * LDQ + n * 16, LDQ);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(Os + warp * 16 * LDO + n * 16, acc, LDO, wmma::mem_row_major);
    }
    __syncwarp();
  }
  __syncwarp();
  if (q0 + r < LQ) {
    const float l = Ls[r];
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    T* op = out + ((size_t)bh * LQ + q0 + r) * D;
    for (int d = half * (D / 2); d < (half + 1) * (D / 2); ++d) op[d] = (T)(Os[r * LDO + d] * inv);
  }
"""


def _smem_bytes(d: int, itemsize: int = 2) -> int:
    bq = bk = 64
    return (bq * (d + 8) + 2 * bk * (d + 8)) * itemsize + bq * (bk + 4) * 4 + bq * (bk + 8) * itemsize \
        + bq * (d + 4) * 4 + 2 * bq * 4


@functools.cache
def _kernel(d: int, has_bias: bool):
    names = ["q", "k", "v", "scale", "kbias"]  # kbias is a dummy when has_bias is False
    return cuda_kernel(
        name=f"flashdiff_attention_d{d}" + ("_bias" if has_bias else ""), input_names=names,
        output_names=["out"], source=_SOURCE, header=_HEADER, shared_memory=_smem_bytes(d),
    )


def flash_attention_cuda(q, k, v, scale, key_bias=None):
    """q (B,H,Lq,D), k/v (B,Hk,Lk,D) in bf16/f16, key_bias None or (B, Lk) additive float32."""
    b, h, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    if d not in (64, 128) or q.dtype not in (mx.bfloat16, mx.float16):
        raise ValueError(f"flash_attention_cuda supports D in (64, 128) and bf16/f16, got D={d}, {q.dtype}.")
    inputs = [q, k, v, mx.array([scale], dtype=mx.float32)]
    inputs.append(mx.zeros((1,), mx.float32) if key_bias is None else key_bias.astype(mx.float32))
    (out,) = _kernel(d, key_bias is not None)(
        inputs=inputs,
        template=[("T", q.dtype), ("D", d), ("H", h), ("HK", hk), ("LQ", lq), ("LK", lk),
                  ("HAS_BIAS", key_bias is not None)],
        output_shapes=[q.shape], output_dtypes=[q.dtype],
        grid=(math.ceil(lq / 64) * 128, b * h, 1), threadgroup=(128, 1, 1),
    )
    return out
