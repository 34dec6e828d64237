"""Packing of a quantized weight for the mixed-input GEMM (``_gemm_mixed``'s PACKED mode) and back.

``pack_weight`` runs the mixed GEMM's producer code once over the weight (``mx.quantize`` layout) into blocks laid out
as the kernel's stages hold them (one block per 192-row weight tile and 64-wide K tile: the codes in the consumers'
lane order, then the rows' scale | bias pairs). ``dequantize_packed`` turns the blocks back into the dequantized
weight on the GPU (bit-identical to ``mx.dequantize``: the packed layers' large-M path), and ``unpack_weight`` into
mx.quantize's arrays on the host (for saving). All three are re-exported by ``_gemm_mixed``.
"""

import functools

import mlx.core as mx

from ._gemm_mixed import _HEADER, _TILE_CODE, BK, WT, block_bytes, packed_words
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
# apart: a warp's stores, 8 rows x 4 lanes, fall in 32 banks), then written as 16-byte row chunks. A packed layer's
# path at large M: dequantize + GEMM.
_UNPACK_SOURCE = r"""
  constexpr int WT = 192, BK = 64, KT = K / BK, LDW = 36;
  constexpr int GPT = BK >= GROUP ? BK / GROUP : 1;
  constexpr int ROW_BYTES = BK * BITS / 8, C_BYTES = WT * ROW_BYTES, BLOCK_BYTES = C_BYTES + WT * GPT * 4;
  __shared__ __align__(16) unsigned tile[WT * LDW];  // the block's 192 x 64 values as pairs, row r at word r * LDW
  const int tile_w = blockIdx.x, kt = blockIdx.y;
  const unsigned char* block = reinterpret_cast<const unsigned char*>(packed) + ((size_t)tile_w * KT + kt) * BLOCK_BYTES;
  const unsigned* sbs = reinterpret_cast<const unsigned*>(block + C_BYTES);
  for (int u = threadIdx.x; u < WT * 4; u += 128) {  // (row, lane t) of the consumers' layout, t fastest
    const int row = u >> 2, t = u & 3;
    unsigned s2[GPT], b2[GPT];
#pragma unroll
    for (int gi = 0; gi < GPT; ++gi) {
      const unsigned sb = sbs[row * GPT + gi];
      s2[gi] = __byte_perm(sb, 0u, 0x1010);
      b2[gi] = __byte_perm(sb, 0u, 0x3232);
    }
    unsigned* dst = tile + row * LDW;  // pair c holds columns 2c, 2c + 1
    if (BITS == 4) {  // pair j: k16 step j / 2, columns 2t, 2t + 1 (+ 8 if j is odd), as the consumers' fragments
      const uint2 z = *reinterpret_cast<const uint2*>(block + row * ROW_BYTES + t * 8);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int kk = j >> 1, gi = GPT == 2 ? kk >> 1 : 0;
        const unsigned zz = j < 4 ? z.x : z.y;
        dst[kk * 8 + 4 * (j & 1) + t] = fd_dq_pair<IS_BF16, 4>((zz >> (4 * (j & 3))) & 0x000F000Fu, s2[gi], b2[gi]);
      }
    } else {  // word kk: codes (2t, 2t + 8, 2t + 1, 2t + 9) of k16 step kk
      const uint4 z = *reinterpret_cast<const uint4*>(block + row * ROW_BYTES + t * 16);
      const unsigned zs[4] = {z.x, z.y, z.z, z.w};
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const int gi = GPT == 2 ? kk >> 1 : 0;
        dst[kk * 8 + t] = fd_dq_pair<IS_BF16, 8>(zs[kk] & 0x00FF00FFu, s2[gi], b2[gi]);
        dst[kk * 8 + 4 + t] = fd_dq_pair<IS_BF16, 8>((zs[kk] >> 8) & 0x00FF00FFu, s2[gi], b2[gi]);
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
    expected = packed_words(n, k, bits, group_size)
    if k % BK or packed.dtype != mx.uint32 or packed.shape != (expected,) or dtype not in (mx.bfloat16, mx.float16):
        raise ValueError(f"dequantize_packed needs pack_weight's ({expected},) uint32 blocks for N={n}, K={k} (a multiple "
                         f"of {BK}), bits={bits}, group_size={group_size}, and a bf16 / fp16 dtype; got {packed.shape} "
                         f"{packed.dtype}, {dtype}.")
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
