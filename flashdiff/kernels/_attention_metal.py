"""The Metal twin of ``_attention_cuda``: a FlashAttention-2 style forward via ``mx.fast.metal_kernel``.

STATUS: written and reviewed by reading only. It has NEVER been compiled or run on an Apple GPU
(this project has none). ``attention`` therefore never picks it automatically: on Metal the default
stays ``mx.fast.scaled_dot_product_attention`` (MLX's tested steel kernel); ``backend="metal_flash"``
forces this one. What has run is a CPU emulation of the kernel *body* (tests/test_kernels_metal.py
compiles the source below as C++ with a small shim for the Metal builtins and 256 host threads per
threadgroup, and compares it with the reference) -- that checks the indexing, barriers and the
online-softmax recurrence, not the Metal compiler's view of the source.

Algorithm (step by step the same as ``_attention_cuda``; the CUDA lines are quoted in the source):
one threadgroup = 64 query rows of one (batch, head); loop over key tiles: S = Q K^T -> online
softmax in float32 with exp2 (scale * log2e folded in) -> O = diag(alpha) O + P V; at the end
O / l. Keys beyond Lk are zero-filled and masked; an optional (B, Lk) additive key bias (boolean key
masks become 0 / -inf biases). GQA by head division. Output (B, H, Lq, D) in q.dtype.

Differences forced by Metal (32 KiB of threadgroup memory, 8x8 ``simdgroup_matrix``):
- 8 simdgroups x 8 query rows (CUDA: 4 warps x 16 rows); 16-key tiles (CUDA: 64).
- Every tile is float: K (stored transposed) and V are converted to float when staged in
  threadgroup memory, because ``simdgroup_load`` needs the matrix element type. Q and O live in
  registers as ``simdgroup_matrix<float, 8, 8>`` (CUDA keeps O in shared memory); the per-row
  rescaling of O is a multiplication by the diagonal matrix diag(alpha), so the code never depends on
  the (undocumented) lane layout of a simdgroup matrix.
- Masked keys get a large finite negative (-1e30, like Metal FlashAttention), not -inf, and their
  probability is set to exactly 0; a row whose keys are all masked returns 0 (as the CUDA kernel).
- Assumes 32 threads per simdgroup (every Apple GPU so far).
"""

import functools
import math

import mlx.core as mx

BQ, BK, SIMDGROUPS = 64, 16, 8  # query rows per threadgroup, keys per tile, simdgroups per threadgroup
THREADS = 32 * SIMDGROUPS
HEAD_DIMS = (64, 128)
DTYPES = (mx.float16, mx.bfloat16, mx.float32)
MASKED = -1.0e30  # score of a masked key (log2 domain), finite on purpose
MAX_THREADGROUP_BYTES = 32768  # Apple GPUs: 32 KiB of threadgroup memory per threadgroup

_HEADER = r"""
#include <metal_stdlib>
#include <metal_simdgroup>
#include <metal_simdgroup_matrix>
using fd_mat = metal::simdgroup_matrix<float, 8, 8>;
// unrolled loops keep the arrays of simdgroup matrices in registers (MLX's steel kernels do the same)
#define FD_UNROLL _Pragma("clang loop unroll(full)")
"""

_SOURCE = r"""
  // CUDA: constexpr int BQ = 64, BK = 64; LDQ/LDS/LDP/LDO paddings; LOG2E; NEG_INF
  constexpr int BQ = 64, BK = 16, NSG = 8, NT = 32 * NSG;
  constexpr int LDK = BK + 4;   // Kt: K transposed, D rows x BK keys
  constexpr int LDV = D + 4;    // Vs: BK keys x D
  constexpr int LDP = BK;       // per-simdgroup S/P scratch: 8 rows x BK keys
  constexpr int KPL = BK / 4;   // keys per lane in the softmax (4 lanes per row)
  constexpr float LOG2E = 1.4426950408889634f;
  constexpr float MASKED = -1.0e30f;
  static_assert(BQ == 8 * NSG, "one 8-row block of queries per simdgroup");
  static_assert(D % 8 == 0 && BK % 8 == 0 && BK % 4 == 0, "tile sizes must be multiples of 8");
  // CUDA: extern __shared__ smem -> Qs, Ks, Vs, Ss, Ps, Os, Ms, Ls
  threadgroup float Kt[D * LDK];
  threadgroup float Vs[BK * LDV];
  threadgroup float Pscr[NSG * 8 * LDP];
  threadgroup float Dscr[NSG * 64];

  // CUDA: tid = threadIdx.x, warp, lane; q0 = blockIdx.x * BQ; bh = blockIdx.y; b, h, hk; qp, kp, vp
  const int tid = int(thread_index_in_threadgroup);
  const int sg = int(simdgroup_index_in_threadgroup);
  const int lane = int(thread_index_in_simdgroup);
  const int q0 = int(threadgroup_position_in_grid.x) * BQ;
  const int bh = int(threadgroup_position_in_grid.y);
  const int b = bh / H, h = bh % H;
  const int hk = h / (H / HK);
  const device T* qp = q + ulong(bh) * LQ * D;
  const device T* kp = k + ulong(b * HK + hk) * LK * D;
  const device T* vp = v + ulong(b * HK + hk) * LK * D;
  const float scale_log2 = scale[0] * LOG2E;
  const int r0 = q0 + sg * 8;                   // first query row of this simdgroup
  threadgroup float* Ps = Pscr + sg * 8 * LDP;  // this simdgroup's S/P scratch
  threadgroup float* Dg = Dscr + sg * 64;       // this simdgroup's 8x8 diagonal scratch

  // CUDA: Qs <- q rows q0..q0+63 (zero beyond LQ). Here: Q -> registers, 8 columns at a time
  // through the scratch (converted to float; simdgroup_load needs float memory).
  fd_mat Qm[D / 8];
  FD_UNROLL
  for (int kk = 0; kk < D / 8; ++kk) {
    for (int e = lane; e < 64; e += 32) {
      const int rr = e / 8, cc = e % 8;
      Ps[rr * LDP + cc] = (r0 + rr < LQ) ? float(qp[ulong(r0 + rr) * D + kk * 8 + cc]) : 0.0f;
    }
    metal::simdgroup_barrier(metal::mem_flags::mem_threadgroup);
    metal::simdgroup_load(Qm[kk], Ps, LDP);
    metal::simdgroup_barrier(metal::mem_flags::mem_threadgroup);
  }
  // CUDA: Os[i] = 0; Ms = NEG_INF, Ls = 0. Here O in registers, m and l per lane: lane owns row
  // r = lane / 4 together with 3 neighbours (CUDA: a lane pair per row), quarter = its key slice.
  fd_mat Om[D / 8];
  FD_UNROLL
  for (int n = 0; n < D / 8; ++n) Om[n] = metal::make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  for (int e = lane; e < 64; e += 32) Dg[e] = 0.0f;  // off-diagonal entries stay 0
  const int r = lane / 4, quarter = lane % 4;
  float m_i = MASKED, l_i = 0.0f;

  for (int k0 = 0; k0 < LK; k0 += BK) {
    // CUDA: __syncthreads(); Ks, Vs <- keys k0..k0+BK-1 (zero beyond LK); __syncthreads()
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
    for (int i = tid; i < BK * D; i += NT) {
      const int rr = i / D, c = i % D;
      const bool ok = k0 + rr < LK;
      Kt[c * LDK + rr] = ok ? float(kp[ulong(k0 + rr) * D + c]) : 0.0f;
      Vs[rr * LDV + c] = ok ? float(vp[ulong(k0 + rr) * D + c]) : 0.0f;
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);

    // CUDA: S = Q K^T for this warp's rows (wmma) -> Ss. Here 8 rows x BK keys -> Ps.
    FD_UNROLL
    for (int n = 0; n < BK / 8; ++n) {
      fd_mat acc = metal::make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      FD_UNROLL
      for (int kk = 0; kk < D / 8; ++kk) {
        fd_mat kb;
        metal::simdgroup_load(kb, Kt + kk * 8 * LDK + n * 8, LDK);  // (K^T)[kk*8.., n*8..]
        metal::simdgroup_multiply_accumulate(acc, Qm[kk], kb, acc);
      }
      metal::simdgroup_store(acc, Ps + n * 8, LDP);
    }
    metal::simdgroup_barrier(metal::mem_flags::mem_threadgroup);

    // CUDA: online softmax: s = S * scale_log2; key >= LK masked; + kbias * LOG2E; row max
    float mx_ = MASKED;
    for (int j = 0; j < KPL; ++j) {
      const int c = quarter * KPL + j, key = k0 + c;
      float s = Ps[r * LDP + c] * scale_log2;
      if (key >= LK) s = MASKED;
      else if (HAS_BIAS) s = metal::max(s + kbias[ulong(b) * LK + key] * LOG2E, MASKED);
      Ps[r * LDP + c] = s;
      mx_ = metal::max(mx_, s);
    }
    // CUDA: __shfl_xor_sync(.., 1) over the lane pair; here over the 4 lanes of the row
    mx_ = metal::max(mx_, metal::simd_shuffle_xor(mx_, ushort(1)));
    mx_ = metal::max(mx_, metal::simd_shuffle_xor(mx_, ushort(2)));
    // CUDA: m_new = max(m_old, mx); alpha = exp2(m_old - m_use). Both finite here: no NaN.
    const float m_new = metal::max(m_i, mx_);
    const float alpha = metal::exp2(m_i - m_new);
    // CUDA: p = exp2(s - m_use) -> Ps (masked keys give exactly 0 here); row sum
    float sum = 0.0f;
    for (int j = 0; j < KPL; ++j) {
      const int c = quarter * KPL + j;
      const float s = Ps[r * LDP + c];
      const float p = s > MASKED ? metal::exp2(s - m_new) : 0.0f;
      Ps[r * LDP + c] = p;
      sum += p;
    }
    sum += metal::simd_shuffle_xor(sum, ushort(1));
    sum += metal::simd_shuffle_xor(sum, ushort(2));
    // CUDA: Ms[r] = m_new; Ls[r] = l_old * alpha + sum; Os[r, :] *= alpha
    m_i = m_new;
    l_i = l_i * alpha + sum;
    if (quarter == 0) Dg[r * 9] = alpha;  // diag(alpha)
    metal::simdgroup_barrier(metal::mem_flags::mem_threadgroup);

    // CUDA: O += P V (wmma, accumulator from Os). Here O = diag(alpha) O + P V in registers.
    fd_mat da;
    metal::simdgroup_load(da, Dg, 8);
    fd_mat Pm[BK / 8];
    FD_UNROLL
    for (int kk = 0; kk < BK / 8; ++kk) metal::simdgroup_load(Pm[kk], Ps + kk * 8, LDP);
    FD_UNROLL
    for (int n = 0; n < D / 8; ++n) {
      fd_mat o;
      metal::simdgroup_multiply(o, da, Om[n]);
      FD_UNROLL
      for (int kk = 0; kk < BK / 8; ++kk) {
        fd_mat vb;
        metal::simdgroup_load(vb, Vs + kk * 8 * LDV + n * 8, LDV);
        metal::simdgroup_multiply_accumulate(o, Pm[kk], vb, o);
      }
      Om[n] = o;
    }
  }

  // CUDA: inv = l > 0 ? 1 / l : 0; out[q0 + r, d] = Os[r, d] * inv for rows < LQ
  const float inv = l_i > 0.0f ? 1.0f / l_i : 0.0f;
  metal::simdgroup_barrier(metal::mem_flags::mem_threadgroup);
  if (quarter == 0) Dg[r * 9] = inv;  // diag(1 / l)
  metal::simdgroup_barrier(metal::mem_flags::mem_threadgroup);
  fd_mat dinv;
  metal::simdgroup_load(dinv, Dg, 8);
  device T* op = out + ulong(bh) * LQ * D;
  FD_UNROLL
  for (int n = 0; n < D / 8; ++n) {
    fd_mat o;
    metal::simdgroup_multiply(o, dinv, Om[n]);
    metal::simdgroup_store(o, Ps, LDP);
    metal::simdgroup_barrier(metal::mem_flags::mem_threadgroup);
    for (int e = lane; e < 64; e += 32) {
      const int rr = e / 8, cc = e % 8;
      if (r0 + rr < LQ) op[ulong(r0 + rr) * D + n * 8 + cc] = T(Ps[rr * LDP + cc]);
    }
    metal::simdgroup_barrier(metal::mem_flags::mem_threadgroup);
  }
"""

INPUT_NAMES = ("q", "k", "v", "scale", "kbias")  # kbias is a 1-element dummy when there is no bias


def threadgroup_bytes(d: int) -> int:
    """Threadgroup memory of the kernel for head dim d (the arrays declared at the top of _SOURCE)."""
    return 4 * (d * (BK + 4) + BK * (d + 4) + SIMDGROUPS * 8 * BK + SIMDGROUPS * 64)


def launch_params(q_shape, k_shape, v_shape, dtype, key_bias_shape=None) -> dict:
    """Validate shapes/dtype and return the kernel call's keyword arguments (all but ``inputs``).
    Pure Python: no Metal needed, so it is tested on every machine."""
    if len(q_shape) != 4 or len(k_shape) != 4 or tuple(k_shape) != tuple(v_shape):
        raise ValueError(f"flash_attention_metal expects q (B, H, Lq, D) and k, v (B, Hk, Lk, D) of one "
                         f"shape, got q {tuple(q_shape)}, k {tuple(k_shape)}, v {tuple(v_shape)}.")
    b, h, lq, d = q_shape
    hk, lk = k_shape[1], k_shape[2]
    if k_shape[0] != b or k_shape[3] != d or hk == 0 or h % hk:
        raise ValueError(f"q {tuple(q_shape)} and k {tuple(k_shape)} disagree: batch and head dim must "
                         "match and q heads must be a multiple of k heads.")
    if d not in HEAD_DIMS:
        raise ValueError(f"flash_attention_metal supports head dim D in {HEAD_DIMS}, got D={d}; "
                         "use the default backend (mx.fast.scaled_dot_product_attention) for other sizes.")
    if dtype not in DTYPES:
        raise ValueError(f"flash_attention_metal supports float16/bfloat16/float32, got {dtype}.")
    if min(lq, lk, b, h) < 1:
        raise ValueError(f"empty attention: q {tuple(q_shape)}, k {tuple(k_shape)}.")
    if key_bias_shape is not None and tuple(key_bias_shape) != (b, lk):
        raise ValueError(f"key_bias must be (B, Lk) = {(b, lk)}, got {tuple(key_bias_shape)}.")
    if threadgroup_bytes(d) > MAX_THREADGROUP_BYTES:  # guards edits of the tile sizes
        raise ValueError(f"tiles need {threadgroup_bytes(d)} bytes of threadgroup memory (> 32 KiB).")
    return dict(
        template=[("T", dtype), ("D", d), ("H", h), ("HK", hk), ("LQ", lq), ("LK", lk),
                  ("HAS_BIAS", key_bias_shape is not None)],
        output_shapes=[tuple(q_shape)], output_dtypes=[dtype],
        # grid counts threads: one threadgroup of THREADS threads per 64 query rows x (batch, head)
        grid=(math.ceil(lq / BQ) * THREADS, b * h, 1), threadgroup=(THREADS, 1, 1),
    )


@functools.cache
def _kernel():
    return mx.fast.metal_kernel(name="flashdiff_attention", input_names=list(INPUT_NAMES),
                                output_names=["out"], source=_SOURCE, header=_HEADER)


def flash_attention_metal(q, k, v, scale, key_bias=None):
    """q (B,H,Lq,D), k/v (B,Hk,Lk,D) in f16/bf16/f32 with D in (64, 128), key_bias None or (B, Lk)
    additive float32 (-inf allowed). Returns (B, H, Lq, D) in q.dtype. Untested: see the docstring."""
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    params = launch_params(q.shape, k.shape, v.shape, q.dtype, None if key_bias is None else key_bias.shape)
    if not mx.metal.is_available():
        raise RuntimeError("backend='metal_flash' needs MLX's Metal back-end (an Apple GPU); this MLX has "
                           "none. Use the default backend (or 'cuda_flash' on CUDA, 'reference' on CPU).")
    if mx.default_device() != mx.gpu:
        raise RuntimeError("backend='metal_flash' runs on the GPU; the default device is the CPU "
                           "(mx.set_default_device(mx.gpu), or use backend='reference').")
    (out,) = _kernel()(inputs=kernel_inputs(q, k, v, scale, key_bias), **params)
    return out


def kernel_inputs(q, k, v, scale, key_bias=None):
    """The kernel's inputs, in INPUT_NAMES order. A -inf bias (boolean key mask) is clamped to the
    finite MASKED value, which the kernel treats as masked (probability exactly 0)."""
    bias = mx.zeros((1,), mx.float32) if key_bias is None else mx.maximum(key_bias.astype(mx.float32), MASKED)
    return [q, k, v, mx.array([scale], dtype=mx.float32), bias]
