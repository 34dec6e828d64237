"""Packing of a quantized weight for the mixed-input GEMM (``_gemm_mixed``'s PACKED mode) and back.

``pack_weight`` runs the mixed GEMM's producer code once over the weight (``mx.quantize`` layout) into blocks laid out
as the kernel's stages hold them (one block per 192-row weight tile and 64-wide K tile: the codes in the consumers'
lane order, then the rows' scale | bias pairs). ``dequantize_packed`` turns the blocks back into the dequantized
weight on the GPU (bit-identical to ``mx.dequantize``: the packed layers' large-M path), and ``unpack_weight`` into
mx.quantize's arrays on the host (for saving). All three are re-exported by ``_gemm_mixed``. ``packed_gemv`` (session
19) multiplies a few rows (< 32: the modulation layers) by the blocks directly, with no dequantized copy.
"""

import functools

import mlx.core as mx

from ._gemm_mixed import _HEADER, _TILE_CODE, BK, WT, block_bytes, check_packed, packed_words
from ._jit import cuda_kernel

# One CTA of 128 threads per (weight tile, K tile): the producer's fetch + store of that tile into its block of
# `packed`, so that PACKED main kernels copy each stage's codes with one bulk copy instead.
_PACK_SOURCE = r"""
  constexpr int WT = 192, BK = 64, KT = K / BK;
  constexpr int GPT = BK >= GROUP ? BK / GROUP : 1;
  constexpr int ROW_BYTES = BK * BITS / 8, C_BYTES = WT * ROW_BYTES, BLOCK_BYTES = C_BYTES + WT * GPT * 4;
  const int p = threadIdx.x, tile_w = blockIdx.x, kt = blockIdx.y;
""" + _TILE_CODE + r"""
  uint4 cur[UPT];
  unsigned cur_sb[SPT];
  fetch(kt, cur, cur_sb);
  store(reinterpret_cast<unsigned char*>(packed) + ((size_t)tile_w * KT + kt) * BLOCK_BYTES, cur, cur_sb);
"""

# One CTA of 128 threads per block of pack_weight's output: the block's codes (in the consumers' lane order) and its
# rows' scale | bias pairs back to the (N, K) weight in T, with fd_dq_pair as the dequantize kernel (_dequant) uses
# it, so every value is bit-identical to mx.dequantize's. The pairs are gathered in shared memory (rows 36 words
# apart: a warp's stores, 8 rows x 4 lanes, fall in 32 banks), then written as 16-byte row chunks. Each thread loads
# its 6 (row, lane) units' codes and pairs before converting any (session 19; H200, session 20: 25.5 / 30.0 us at
# 12288 x 3072 4 / 8-bit, against 25.1 / 29.0 for the default dequantize kernel). A packed layer's path at large M:
# dequantize + GEMM.
_UNPACK_SOURCE = r"""
  constexpr int WT = 192, BK = 64, KT = K / BK, LDW = 36;
  constexpr int GPT = BK >= GROUP ? BK / GROUP : 1;
  constexpr int ROW_BYTES = BK * BITS / 8, C_BYTES = WT * ROW_BYTES, BLOCK_BYTES = C_BYTES + WT * GPT * 4;
  __shared__ __align__(16) unsigned tile[WT * LDW];  // the block's 192 x 64 values as pairs, row r at word r * LDW
  const int tile_w = blockIdx.x, kt = blockIdx.y;
  const unsigned char* block = reinterpret_cast<const unsigned char*>(packed) + ((size_t)tile_w * KT + kt) * BLOCK_BYTES;
  const unsigned* sbs = reinterpret_cast<const unsigned*>(block + C_BYTES);
  constexpr int UNITS = WT * 4 / 128, WORDS = BITS / 2;  // (row, lane t) units per thread; code words per unit
  unsigned codes[UNITS][WORDS], sb[UNITS][GPT];
#pragma unroll
  for (int i = 0; i < UNITS; ++i) {  // every load first (session 19: the loop had one unit's loads in flight)
    const int u = threadIdx.x + 128 * i, row = u >> 2, t = u & 3;  // (row, lane t) of the consumers' layout
    const unsigned* src = reinterpret_cast<const unsigned*>(block + row * ROW_BYTES + t * 4 * WORDS);
    if (BITS == 4) {
      const uint2 z = *reinterpret_cast<const uint2*>(src);
      codes[i][0] = z.x;
      codes[i][1] = z.y;
    } else {
      const uint4 z = *reinterpret_cast<const uint4*>(src);
      codes[i][0] = z.x;
      codes[i][1] = z.y;
      codes[i][2] = z.z;
      codes[i][3] = z.w;
    }
#pragma unroll
    for (int gi = 0; gi < GPT; ++gi) sb[i][gi] = sbs[row * GPT + gi];
  }
#pragma unroll
  for (int i = 0; i < UNITS; ++i) {
    const int u = threadIdx.x + 128 * i, row = u >> 2, t = u & 3;
    unsigned s2[GPT], b2[GPT];
#pragma unroll
    for (int gi = 0; gi < GPT; ++gi) {
      s2[gi] = __byte_perm(sb[i][gi], 0u, 0x1010);
      b2[gi] = __byte_perm(sb[i][gi], 0u, 0x3232);
    }
    unsigned* dst = tile + row * LDW;  // pair c holds columns 2c, 2c + 1
    if (BITS == 4) {  // pair j: k16 step j / 2, columns 2t, 2t + 1 (+ 8 if j is odd), as the consumers' fragments
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int kk = j >> 1, gi = GPT == 2 ? kk >> 1 : 0;
        const unsigned zz = codes[i][j >> 2];
        dst[kk * 8 + 4 * (j & 1) + t] = fd_dq_pair<IS_BF16, 4>((zz >> (4 * (j & 3))) & 0x000F000Fu, s2[gi], b2[gi]);
      }
    } else {  // word kk: codes (2t, 2t + 8, 2t + 1, 2t + 9) of k16 step kk
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const int gi = GPT == 2 ? kk >> 1 : 0;
        dst[kk * 8 + t] = fd_dq_pair<IS_BF16, 8>(codes[i][kk] & 0x00FF00FFu, s2[gi], b2[gi]);
        dst[kk * 8 + 4 + t] = fd_dq_pair<IS_BF16, 8>((codes[i][kk] >> 8) & 0x00FF00FFu, s2[gi], b2[gi]);
      }
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < WT * 8; c += 128) {  // 16-byte chunk c % 8 of row c / 8
    const int row = c >> 3, n = tile_w * WT + row;
    if (n < N)
      *reinterpret_cast<uint4*>(out + (size_t)n * K + kt * BK + (c & 7) * 8) = *reinterpret_cast<const uint4*>(tile + row * LDW + (c & 7) * 4);
  }
"""



# Few rows (M < qgemm.SMALL_M: a modulation layer's one row per image): y = x W^T straight from the packed blocks, no
# dequantized copy. A CTA of 128 threads covers 32 weight rows, thread (row r, lane t) the 16 columns of each K tile
# that consumer lane t holds (one 8- or 16-byte load per K tile; the 4 lanes of a row read adjacent bytes), over the
# K tiles of split blockIdx.y. Per group and lane: s * sum(q x) + b * sum(x) over the lane's columns, with q exact in
# float (2^23 + q as float bits, less 2^23) and x read in its own dtype (fd_x_pair); the 4 lanes' sums are added by
# shuffles, each split's partial sums go to `partial` (KSPLIT, M, N) and are summed by the caller.
_GEMV_SOURCE = r"""
  constexpr int WT = 192, BK = 64, KT = K / BK;
  constexpr int GPT = BK >= GROUP ? BK / GROUP : 1;
  constexpr int ROW_BYTES = BK * BITS / 8, C_BYTES = WT * ROW_BYTES, BLOCK_BYTES = C_BYTES + WT * GPT * 4;
  const int t = threadIdx.x & 3, n = blockIdx.x * 32 + (threadIdx.x >> 2);  // rows past N read the zero padding
  const int tile = n / WT, row = n % WT, kt0 = blockIdx.y * KT / KSPLIT, kt1 = (blockIdx.y + 1) * KT / KSPLIT;
  const float two23 = 8388608.0f;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;
  const unsigned char* blocks = reinterpret_cast<const unsigned char*>(packed) + (size_t)tile * KT * BLOCK_BYTES;
#pragma unroll 2
  for (int kt = kt0; kt < kt1; ++kt) {
    const unsigned char* block = blocks + (size_t)kt * BLOCK_BYTES;
    float q[16];  // the codes of columns col(i), i = 0..15 (as fd_dq_pair's pairs: i = 2 pair + half)
    int col[8];   // first column of pair i within the K tile
    if (BITS == 4) {  // word j >> 2, nibbles 4 (j & 3) and 16 + 4 (j & 3): pair j at k16 step j / 2, + 8 if j is odd
      const uint2 z = *reinterpret_cast<const uint2*>(block + row * ROW_BYTES + t * 8);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const unsigned zz = (j < 4 ? z.x : z.y) >> (4 * (j & 3));
        q[2 * j] = __int_as_float((int)((zz & 0xFu) | 0x4B000000u)) - two23;
        q[2 * j + 1] = __int_as_float((int)(((zz >> 16) & 0xFu) | 0x4B000000u)) - two23;
        col[j] = (j >> 1) * 16 + 8 * (j & 1) + 2 * t;
      }
    } else {  // word kk: codes of columns (2t, 2t + 8, 2t + 1, 2t + 9) of k16 step kk
      const uint4 z = *reinterpret_cast<const uint4*>(block + row * ROW_BYTES + t * 16);
      const unsigned zs[4] = {z.x, z.y, z.z, z.w};
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        q[4 * kk] = __int_as_float((int)((zs[kk] & 0xFFu) | 0x4B000000u)) - two23;
        q[4 * kk + 1] = __int_as_float((int)(((zs[kk] >> 16) & 0xFFu) | 0x4B000000u)) - two23;
        q[4 * kk + 2] = __int_as_float((int)(((zs[kk] >> 8) & 0xFFu) | 0x4B000000u)) - two23;
        q[4 * kk + 3] = __int_as_float((int)((zs[kk] >> 24) | 0x4B000000u)) - two23;
        col[2 * kk] = kk * 16 + 2 * t;
        col[2 * kk + 1] = kk * 16 + 8 + 2 * t;
      }
    }
    const unsigned* sbs = reinterpret_cast<const unsigned*>(block + C_BYTES) + row * GPT;
    float sc[GPT], bi[GPT];
#pragma unroll
    for (int gi = 0; gi < GPT; ++gi) {
      const unsigned sb = sbs[gi];
      sc[gi] = fd_half_to_float<IS_BF16>(sb & 0xFFFFu);
      bi[gi] = fd_half_to_float<IS_BF16>(sb >> 16);
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const auto* xr = x + (size_t)m * K + kt * BK;
      float dot[GPT], xsum[GPT];
#pragma unroll
      for (int gi = 0; gi < GPT; ++gi) dot[gi] = xsum[gi] = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {  // pair i: k16 step i / 2 (group i / 4 of the tile when GPT is 2)
        const float2 xv = fd_x_pair(xr + col[i]);
        const int gi = GPT == 2 ? i >> 2 : 0;
        dot[gi] = fmaf(q[2 * i], xv.x, fmaf(q[2 * i + 1], xv.y, dot[gi]));
        xsum[gi] += xv.x + xv.y;
      }
#pragma unroll
      for (int gi = 0; gi < GPT; ++gi) acc[m] = fmaf(sc[gi], dot[gi], fmaf(bi[gi], xsum[gi], acc[m]));
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], 1);
    acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], 2);
  }
  if (n < N) {
#pragma unroll
    for (int m = 0; m < M; ++m)
      if ((m & 3) == t) partial[((size_t)blockIdx.y * M + m) * N + n] = acc[m];
  }
"""

# 16 bits of a bf16 / fp16 value (the low half of h) to float; two adjacent elements of x (float32, bf16 or fp16) as
# floats. The CPU emulation has its own versions.
_GEMV_HEADER = r"""
template <bool BF16>
__device__ __forceinline__ float fd_half_to_float(unsigned h) {
  if (BF16) return __int_as_float((int)(h << 16));
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short)h));
  return f;
}
__device__ __forceinline__ float2 fd_x_pair(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ float2 fd_x_pair(const __nv_bfloat16* p) {
  const unsigned u = *reinterpret_cast<const unsigned*>(p);
  return make_float2(__int_as_float((int)(u << 16)), __int_as_float((int)(u & 0xFFFF0000u)));
}
__device__ __forceinline__ float2 fd_x_pair(const __half* p) {
  const unsigned u = *reinterpret_cast<const unsigned*>(p);
  return make_float2(fd_half_to_float<false>(u & 0xFFFFu), fd_half_to_float<false>(u >> 16));
}
"""


@functools.cache
def _pack_kernel():
    return cuda_kernel(name="flashdiff_mixed_pack", input_names=["wq", "scales", "biases"],
                       output_names=["packed"], source=_PACK_SOURCE, header=_HEADER)


def pack_weight(wq, scales, biases, bits: int, group_size: int, stream=None):
    """The quantized weight (``mx.quantize`` layout, (N, K * bits / 32) codes) rearranged as the mixed GEMM's stages
    hold it: for each 192-row weight tile and 64-wide K tile, one block of ``block_bytes`` (codes in the consumers'
    lane order, then the rows' scale | bias pairs; rows past N zero). The same bytes as the originals plus padding
    to whole tiles; ``mixed_gemm_packed`` reads it with one bulk copy per stage (session 15's experiment: the producer
    warpgroup's loads and rearrangement are most of its instructions)."""
    if bits not in (4, 8) or group_size not in (32, 64, 128):
        raise ValueError(f"pack_weight takes affine 4- or 8-bit weights in groups of 32, 64 or 128, got bits={bits}, "
                         f"group_size={group_size}.")
    if wq.ndim != 2 or wq.dtype != mx.uint32:
        raise ValueError(f"pack_weight needs mx.quantize's (N, K * bits / 32) uint32 codes, got {wq.shape} {wq.dtype}.")
    n, k = wq.shape[0], wq.shape[1] * 32 // bits
    if k % BK or scales.shape != (n, k // group_size) or biases.shape != scales.shape or scales.dtype not in (
            mx.bfloat16, mx.float16) or biases.dtype != scales.dtype:
        raise ValueError(f"pack_weight needs K a multiple of {BK} and bf16 / fp16 scales and biases of shape "
                         f"{(n, k // group_size)}, got K={k}, scales {scales.shape} {scales.dtype}, biases "
                         f"{biases.shape} {biases.dtype}.")
    tiles, kt = -(-n // WT), k // BK
    (packed,) = _pack_kernel()(
        inputs=[wq, scales, biases], template=[("K", k), ("N", n), ("BITS", bits), ("GROUP", group_size)],
        output_shapes=[(packed_words(n, k, bits, group_size),)], output_dtypes=[mx.uint32],
        grid=(tiles * 128, kt, 1), threadgroup=(128, 1, 1), stream=stream)
    return packed


@functools.cache
def _unpack_kernel():
    return cuda_kernel(name="flashdiff_mixed_unpack", input_names=["packed"], output_names=["out"],
                       source=_UNPACK_SOURCE, header=_HEADER)


def dequantize_packed(packed, n: int, k: int, bits: int, group_size: int, dtype, stream=None):
    """``pack_weight``'s blocks back to the dequantized (N, K) weight in `dtype` (the scales' dtype when packed: bf16
    or fp16), every value bit-identical to ``mx.dequantize`` of the original codes."""
    check_packed("dequantize_packed", packed, n, k, bits, group_size)
    if dtype not in (mx.bfloat16, mx.float16):
        raise ValueError(f"dequantize_packed gives bf16 / fp16 (the packed scales' dtype), got {dtype}.")
    (out,) = _unpack_kernel()(
        inputs=[packed], template=[("T", dtype), ("IS_BF16", dtype == mx.bfloat16), ("K", k), ("N", n), ("BITS", bits),
                                   ("GROUP", group_size)],
        output_shapes=[(n, k)], output_dtypes=[dtype], grid=(-(-n // WT) * 128, k // BK, 1), threadgroup=(128, 1, 1),
        stream=stream)
    return out


def unpack_weight(packed, n: int, k: int, bits: int, group_size: int, dtype):
    """The inverse of ``pack_weight``, on the host (numpy; for saving a packed model, not for speed): (wq, scales,
    biases) as ``mx.quantize`` made them, bit for bit, from the blocks of an (N, K) weight."""
    import numpy as np

    tiles, kts, gpt = -(-n // WT), k // BK, max(BK // group_size, 1)
    row_bytes = BK * bits // 8
    c_bytes = WT * row_bytes
    raw = np.array(packed).view(np.uint8).reshape(tiles, kts, block_bytes(bits, group_size))
    words = np.ascontiguousarray(raw[:, :, :c_bytes]).view(np.uint32).reshape(tiles, kts, WT, 4, row_bytes // 16)
    q = np.zeros((tiles, kts, WT, BK), np.uint8)  # codes by (tile, K tile, row, column)
    for t in range(4):  # consumer lane t: columns 2t, 2t + 1 (+ 8) of each k16 step
        if bits == 4:  # word j // 4 of the lane's two, nibbles 4 (j & 3) and 16 + 4 (j & 3): pair j
            for j in range(8):
                col = (j >> 1) * 16 + 8 * (j & 1) + 2 * t
                z = words[:, :, :, t, j >> 2] >> (4 * (j & 3))
                q[..., col], q[..., col + 1] = z & 15, (z >> 16) & 15
        else:  # word kk: bytes (2t, 2t + 8, 2t + 1, 2t + 9) of k16 step kk
            for kk in range(4):
                z = words[:, :, :, t, kk]
                for byte, col in enumerate((2 * t, 2 * t + 8, 2 * t + 1, 2 * t + 9)):
                    q[..., kk * 16 + col] = (z >> (8 * byte)) & 255
    q = q.transpose(0, 2, 1, 3).reshape(tiles * WT, k)[:n]
    if bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)
    wq = np.ascontiguousarray(q).view(np.uint32)
    sb = np.ascontiguousarray(raw[:, :, c_bytes:]).view(np.uint32).reshape(tiles, kts, WT, gpt)
    # K tile kt holds groups (kt BK) / group_size + gi; a group of 128 is held by both its K tiles (take the first)
    step = max(group_size // BK, 1)
    sb = sb[:, ::step].transpose(0, 2, 1, 3).reshape(tiles * WT, -1)[:n]
    as_dtype = lambda a: mx.array(np.ascontiguousarray(a).astype(np.uint16)).view(dtype)  # noqa: E731
    return mx.array(wq), as_dtype(sb & 0xFFFF), as_dtype(sb >> 16)


@functools.cache
def _gemv_kernel():
    return cuda_kernel(name="flashdiff_mixed_packed_gemv", input_names=["x", "packed"], output_names=["partial"],
                       source=_GEMV_SOURCE, header=_GEMV_HEADER)


GEMV_ROWS = 32  # packed_gemv takes fewer rows than this (qgemm.SMALL_M: where quantized_linear calls quantized_matmul)
GEMV_CTAS = 8 * 132  # split K until about this many CTAs (8 of 4 warps per H200 multiprocessor: loads in flight)


def gemv_splits(n: int, k: int) -> int:
    """How many K ranges ``packed_gemv`` splits an (N, K) weight into: enough CTAs of 32 rows for GEMV_CTAS, at
    least one K tile each."""
    return max(1, min(k // BK, -(-GEMV_CTAS // -(-n // 32))))


def packed_gemv(x2, packed, n: int, bits: int, group_size: int, weight_dtype, bias=None, stream=None):
    """y = x2 @ W.T (+ bias) for few rows (x2 (M, K), M < GEMV_ROWS) from ``pack_weight``'s blocks of an (N, K) weight, no
    dequantized copy: float32 sums of q x per group, then s * that + b * sum(x) (the weight's values are not rounded to
    `weight_dtype` first, as MLX's quantized_matmul does not round them). x2 float32, bf16 or fp16. One kernel, and
    one more to add up its K splits (none where there is one) before the bias and the rounding to x2's dtype.
    Returns (M, N) in x2's dtype."""
    if x2.ndim != 2 or not 0 < x2.shape[0] < GEMV_ROWS or x2.dtype not in (mx.float32, mx.bfloat16, mx.float16):
        raise ValueError(f"packed_gemv needs x2 (M, K) with 0 < M < {GEMV_ROWS} in float32 / bf16 / fp16, got x2 "
                         f"{x2.shape} {x2.dtype}.")
    m, k = x2.shape
    check_packed("packed_gemv", packed, n, k, bits, group_size)
    if weight_dtype not in (mx.bfloat16, mx.float16):
        raise ValueError(f"packed_gemv: the packed scales are bf16 / fp16, got weight_dtype {weight_dtype}.")
    splits = gemv_splits(n, k)
    (partial,) = _gemv_kernel()(
        inputs=[x2, packed], template=[("IS_BF16", weight_dtype == mx.bfloat16), ("K", k), ("N", n), ("M", m),
                                       ("BITS", bits), ("GROUP", group_size), ("KSPLIT", splits)],
        output_shapes=[(splits * m * n,)], output_dtypes=[mx.float32], grid=(-(-n // 32) * 128, splits, 1),
        threadgroup=(128, 1, 1), stream=stream)
    y = partial.reshape(m, n) if splits == 1 else partial.reshape(splits, m, n).sum(axis=0)
    if bias is not None:
        y = y + bias.astype(mx.float32)
    return y.astype(x2.dtype)

