"""Quantized-weight formats (as produced by ``mx.quantize``) and dequantization kernels.

Formats (row-major weight (..., N, K), quantized along K in groups):
- affine, bits in {2,3,4,5,6,8}, group 32/64/128: packed codes q (uint32 words, little-endian bit
  stream: element j of a row sits at bit j*bits), float scales s and biases b per group,
  value = q * s + b.
- mxfp4 (bits 4, group 32): FP4 E2M1 codes, uint8 E8M0 scale per group (2^(e-127)).
- nvfp4 (bits 4, group 16): FP4 E2M1 codes, uint8 FP8 E4M3 scale per group.
- mxfp8 (bits 8, group 32): FP8 E4M3 codes, uint8 E8M0 scale per group.

Every 8 consecutive elements of a row occupy exactly ``bits`` whole bytes, so a GPU thread
dequantizes 8-element chunks, each from ``bits`` bytes, for every format. Two CUDA kernels with the
same per-chunk steps: the flat one (default; 4 chunks per thread, every load and store coalesced
across the warp; 1.11x the other by geometric mean over 30 shape/format pairs on the H200, 1.55x on
HiDream's stacked 4-bit experts, benchmarks/results/dequant-h200-s5-coalesced.json) and the
row-per-grid-y one (one chunk per thread; FLASHDIFF_DEQUANT_ROWS=1), which the Metal kernel mirrors.
The reference is ``mx.dequantize``, matched bit for bit: affine rounds q * s and then + b to the
scales' dtype (as MLX does), fp modes are exact products.

The flat kernel's paired path (``paired``: affine 4/8-bit with scales in the output's bf16/fp16, what
quantized_linear and moe_gemm ask for) computes two values per instruction with no float conversions
(``DEQUANT_CODE``: the codes placed in the mantissas of a packed pair, the offset subtracted, one
paired multiply and one paired add, rounding as above). Session 9 on the H200 (Nsight Compute,
benchmarks/results/ncu-dequant-paired-h200-s9.csv): 7.7 / 9.0 us against 8.1 / 9.8 us for the float
path at 3072 x 3072 (4 / 8 bits), the same within 5% at the larger shapes, which memory bandwidth
bounds; bit-identical everywhere. FLASHDIFF_DEQUANT_FLOAT=1 takes the float path (side-by-side runs).
"""

import functools
import os

import mlx.core as mx

from ._jit import cuda_kernel

MODES = {"affine": 0, "mxfp4": 1, "nvfp4": 2, "mxfp8": 3}
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUPS = (32, 64, 128)
FP_FORMATS = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}


def check_quantized(w, scales, biases, bits, group_size, mode):
    """Validate ``mx.quantize`` outputs; return (bits, group_size, N, K) with defaults filled in."""
    if mode not in MODES:
        raise ValueError(f"Unsupported quantization mode {mode!r}; supported: {sorted(MODES)}.")
    if mode == "affine":
        bits = 4 if bits is None else bits
        group_size = 64 if group_size is None else group_size
        if bits not in AFFINE_BITS:
            raise ValueError(f"Unsupported affine bits={bits}; supported: {AFFINE_BITS}.")
        if group_size not in AFFINE_GROUPS:
            raise ValueError(f"Unsupported affine group_size={group_size}; supported: {AFFINE_GROUPS}.")
        if biases is None:
            raise ValueError("mode='affine' needs `biases` (the third output of mx.quantize).")
        if not mx.issubdtype(scales.dtype, mx.floating) or biases.dtype != scales.dtype:
            raise TypeError(
                f"affine scales/biases must share one float dtype, got {scales.dtype} / {biases.dtype}."
            )
        if biases.shape != scales.shape:
            raise ValueError(f"biases shape {biases.shape} != scales shape {scales.shape}.")
    else:
        want = FP_FORMATS[mode]
        bits = want[0] if bits is None else bits
        group_size = want[1] if group_size is None else group_size
        if (bits, group_size) != want:
            raise ValueError(f"mode={mode!r} needs bits={want[0]}, group_size={want[1]}; got {bits}, {group_size}.")
        if biases is not None:
            raise ValueError(f"mode={mode!r} has no biases; pass biases=None.")
        if scales.dtype != mx.uint8:
            raise TypeError(f"mode={mode!r} scales must be uint8 (from mx.quantize), got {scales.dtype}.")
    if w.dtype != mx.uint32:
        raise TypeError(f"quantized weight must be uint32 (packed by mx.quantize), got {w.dtype}.")
    if w.ndim < 2 or scales.shape[:-1] != w.shape[:-1]:
        raise ValueError(f"weight {w.shape} and scales {scales.shape} must agree on all but the last axis.")
    k = w.shape[-1] * 32 // bits
    if w.shape[-1] * 32 % bits or scales.shape[-1] * group_size != k:
        raise ValueError(
            f"weight {w.shape} with bits={bits} holds K={k} per row, but scales {scales.shape} with "
            f"group_size={group_size} cover {scales.shape[-1] * group_size}: bits/group_size do not "
            "match the arrays."
        )
    return bits, group_size, w.shape[-2], k


# ---------------------------------------------------------------- CUDA
_CUDA_HEADER = r"""
__device__ __forceinline__ float fd_e2m1(unsigned int c) {
  unsigned int e = (c >> 1) & 3u, m = c & 1u;  // 0, 0.5, 1, 1.5, 2, 3, 4, 6
  float v = (e == 0u) ? 0.5f * (float)m : ldexpf(1.0f + 0.5f * (float)m, (int)e - 1);
  return (c & 8u) ? -v : v;
}
__device__ __forceinline__ float fd_e4m3(unsigned int c) {
  unsigned int e = (c >> 3) & 15u, m = c & 7u;
  float v = (e == 0u) ? ldexpf((float)m, -9) : ldexpf((float)(8u + m), (int)e - 10);
  if (e == 15u && m == 7u) v = __int_as_float(0x7fc00000);
  return (c & 0x80u) ? -v : v;
}
__device__ __forceinline__ float fd_e8m0(unsigned int c) {
  return c == 0u ? __int_as_float(0x00400000) : __int_as_float((int)(c << 23));
}
"""

def _paired_op(op: str) -> str:
    """fd_h2_<op>: one paired bf16 / fp16 instruction on packed 32-bit words (low half = first element)."""
    return (f"template <bool BF16>\n__device__ __forceinline__ unsigned fd_h2_{op}(unsigned a, unsigned b) {{\n"
            "  unsigned r;\n"
            f'  if (BF16) asm("{op}.rn.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));\n'
            f'  else asm("{op}.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));\n'
            "  return r;\n}\n")


PAIRED_ASM = "\n// Paired x.dtype arithmetic on packed 32-bit words (low half = first element).\n" + "".join(
    _paired_op(op) for op in ("sub", "mul", "add")) + r"""template <bool BF16>
__device__ __forceinline__ unsigned fd_h2_fma(unsigned a, unsigned b, unsigned c) {  // a b + c, rounded once
  unsigned r;
  if (BF16) asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  else asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}
// (z & mask) | bits as one LOP3 (nvcc emitted two for the expression: session 15's SASS)
__device__ __forceinline__ unsigned fd_and_or(unsigned z, unsigned mask, unsigned bits) {
  unsigned v;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(v) : "r"(z), "r"(mask), "r"(bits));
  return v;
}
// PTX prmt.b32 with the whole selector: a nibble with bit 3 set gives its byte's sign bit in all 8 bits
// (__byte_perm keeps only bits 0..2 of each nibble)
__device__ __forceinline__ unsigned fd_prmt(unsigned a, unsigned b, unsigned sel) {
  unsigned v;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(v) : "r"(a), "r"(b), "r"(sel));
  return v;
}
"""

# Plain C++ over PAIRED_ASM's helpers (the CPU emulation compiles it as written against its own versions of
# them, tests/cuda_emulation.py). Used by the flat dequantize kernel and the fused dequantize GEMM.
DEQUANT_CODE = r"""
// Two codes, q0 in bits 0..7 and q1 in bits 16..23 of p (each < 2^BITS), to the pair (q0 s + b, q1 s + b).
template <bool BF16, int BITS>
__device__ __forceinline__ unsigned fd_dq_pair(unsigned p, unsigned s2, unsigned b2) {
  unsigned v, sub;
  if (BF16 && BITS == 8) {  // bf16 0x4300 | m is 128 + m for a 7-bit m; 128 comes off where bit 7 is clear
    v = (p & 0x007F007Fu) | 0x43004300u;
    sub = (~p & 0x00800080u) * 0x86u;
  } else {  // bf16 0x4300 | q = 128 + q (q < 16); fp16 0x6400 | q = 1024 + q (q < 256)
    const unsigned magic = BF16 ? 0x43004300u : 0x64006400u;
    v = p | magic;
    sub = magic;
  }
  return fd_h2_add<BF16>(fd_h2_mul<BF16>(fd_h2_sub<BF16>(v, sub), s2), b2);
}
// bf16 only, 4 bits: the codes in bits 0..3 and 16..19 of z (other bits ignored), s2 / b2 the scale and bias pairs,
// ns2 = -128 s2 (exact). The same values as fd_dq_pair, in three instructions instead of four or five: with
// v = 128 + q, v s - 128 s is q s exactly, so fma(v, s, -128 s) rounds q s once, as mul(v - 128, s) does.
__device__ __forceinline__ unsigned fd_dq4_bf16_pair(unsigned z, unsigned s2, unsigned ns2, unsigned b2) {
  return fd_h2_add<true>(fd_h2_fma<true>(fd_and_or(z, 0x000F000Fu, 0x43004300u), s2, ns2), b2);
}
// bf16 only, 8 bits: the codes in bytes 0 and 2 of z (HI false) or 1 and 3 (HI true). v = 128 + (q & 127) is q
// where bit 7 is set, so fma(v, s, c) with c = -128 s where it is clear and +0 where set rounds q s once (the sign
// bits replicated by one prmt select c); then + b. Four or five instructions where fd_dq_pair takes six or seven.
template <bool HI>
__device__ __forceinline__ unsigned fd_dq8_bf16_pair(unsigned z, unsigned s2, unsigned ns2, unsigned b2) {
  const unsigned v = fd_and_or(HI ? z >> 8 : z, 0x007F007Fu, 0x43004300u);
  const unsigned high = fd_prmt(z, 0u, HI ? 0xBB99u : 0xAA88u);  // 0xffff in each half whose code is >= 128
  return fd_h2_add<true>(fd_h2_fma<true>(v, s2, ns2 & ~high), b2);
}
// 8 consecutive codes (one uint32 word at 4 bits, two at 8 bits) to one 16-byte chunk of x.dtype values.
template <bool BF16, int BITS>
__device__ __forceinline__ uint4 fd_dq_chunk(const unsigned* wd, unsigned s2, unsigned b2) {
  uint4 o;
  if (BITS == 4) {  // pair j = codes (j, j + 4)
    const unsigned w = wd[0];
    const unsigned p0 = fd_dq_pair<BF16, BITS>(w & 0x000F000Fu, s2, b2), p1 = fd_dq_pair<BF16, BITS>((w >> 4) & 0x000F000Fu, s2, b2);
    const unsigned p2 = fd_dq_pair<BF16, BITS>((w >> 8) & 0x000F000Fu, s2, b2), p3 = fd_dq_pair<BF16, BITS>((w >> 12) & 0x000F000Fu, s2, b2);
    o.x = __byte_perm(p0, p1, 0x5410);
    o.y = __byte_perm(p2, p3, 0x5410);
    o.z = __byte_perm(p0, p1, 0x7632);
    o.w = __byte_perm(p2, p3, 0x7632);
  } else {  // per word: pairs (0, 2) and (1, 3)
    unsigned r[2][2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const unsigned a = fd_dq_pair<BF16, BITS>(wd[h] & 0x00FF00FFu, s2, b2), b = fd_dq_pair<BF16, BITS>((wd[h] >> 8) & 0x00FF00FFu, s2, b2);
      r[h][0] = __byte_perm(a, b, 0x5410);
      r[h][1] = __byte_perm(a, b, 0x7632);
    }
    o.x = r[0][0]; o.y = r[0][1]; o.z = r[1][0]; o.w = r[1][1];
  }
  return o;
}
"""

CUDA_KERNEL_HEADER = PAIRED_ASM + _CUDA_HEADER + DEQUANT_CODE  # the CUDA kernels' header


# Row-per-grid-y kernel (FLASHDIFF_DEQUANT_ROWS=1; the Metal kernel's twin). One thread: 8 consecutive
# elements (chunk c) of a row, read from BITS bytes. Grid: x = chunks of a row, y = rows (a block loops
# over rows y, y + gridDim.y, ... when there are more than 65535).
_CUDA_SOURCE = r"""
  const unsigned int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= (unsigned int)(K / 8)) return;
  for (unsigned long long row = blockIdx.y; row < (unsigned long long)ROWS; row += gridDim.y) {
  const unsigned char* src = reinterpret_cast<const unsigned char*>(w) + row * (K / 8) * BITS + (unsigned long long)c * BITS;
  unsigned long long packed = 0;
  if (BITS == 4) {
    packed = *reinterpret_cast<const unsigned int*>(src);
  } else if (BITS == 8) {
    packed = *reinterpret_cast<const unsigned long long*>(src);
  } else {
#pragma unroll
    for (int i = 0; i < BITS; ++i) packed |= (unsigned long long)src[i] << (8 * i);
  }
  const unsigned long long g = row * (K / GROUP) + (unsigned long long)(c * 8) / GROUP;
  float s, b = 0.0f;
  if (MODE == 0) {
    s = (float)scales[g];
    b = (float)biases[g];
  } else if (MODE == 2) {
    s = fd_e4m3((unsigned int)scales[g]);
  } else {
    s = fd_e8m0((unsigned int)scales[g]);
  }
  alignas(16) T vals[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    unsigned int q = (unsigned int)((packed >> (i * BITS)) & ((1ull << BITS) - 1ull));
    float v;
    // affine: like mx.dequantize, q * s and + b each rounded to the scales' dtype ST
    if (MODE == 0) v = (float)(ST)__fadd_rn((float)(ST)__fmul_rn((float)q, s), b);
    else if (MODE == 3) v = fd_e4m3(q) * s;
    else v = fd_e2m1(q) * s;
    vals[i] = (T)v;
  }
  T* dst = out + row * K + (unsigned long long)c * 8;
  if (sizeof(T) == 2) {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(vals);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) dst[i] = vals[i];
  }
  }
"""

# The flat CUDA kernel: the weight as one array of 8-element chunks (element e is in group e / GROUP,
# since K is a multiple of GROUP); warp w takes chunks w * 32 * CPT .. + 32 * CPT - 1 and lane l the
# chunks j * 32 + l of them, so each of a thread's CPT loads and 16-byte stores is coalesced across
# the warp, and the CPT loads are all issued before the first value is computed.
_CUDA_SOURCE_FLAT = r"""
  constexpr unsigned long long CHUNKS = (unsigned long long)ROWS * (K / 8);
  const unsigned long long base = (((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5) * (32 * CPT)
                                  + (threadIdx.x & 31);
  unsigned long long packed[CPT];
  float s[CPT], b[CPT];
  unsigned sb[CPT];
#pragma unroll
  for (int j = 0; j < CPT; ++j) {
    const unsigned long long c = base + 32 * j;
    packed[j] = 0;
    s[j] = 0.0f;
    b[j] = 0.0f;
    sb[j] = 0u;
    if (c >= CHUNKS) continue;
    const unsigned char* src = reinterpret_cast<const unsigned char*>(w) + c * BITS;
    if (BITS == 4) {
      packed[j] = *reinterpret_cast<const unsigned int*>(src);
    } else if (BITS == 8) {
      packed[j] = *reinterpret_cast<const unsigned long long*>(src);
    } else {
#pragma unroll
      for (int i = 0; i < BITS; ++i) packed[j] |= (unsigned long long)src[i] << (8 * i);
    }
    const unsigned long long g = c * 8 / GROUP;
    if (PAIRED) {  // the scale's and the bias's bits, packed (scale | bias << 16)
      sb[j] = (unsigned)*reinterpret_cast<const unsigned short*>(scales + g)
            | ((unsigned)*reinterpret_cast<const unsigned short*>(biases + g) << 16);
    } else if (MODE == 0) {
      s[j] = (float)scales[g];
      b[j] = (float)biases[g];
    } else if (MODE == 2) {
      s[j] = fd_e4m3((unsigned int)scales[g]);
    } else {
      s[j] = fd_e8m0((unsigned int)scales[g]);
    }
  }
#pragma unroll
  for (int j = 0; j < CPT; ++j) {
    const unsigned long long c = base + 32 * j;
    if (c >= CHUNKS) continue;
    T* dst = out + c * 8;
    if (PAIRED) {  // two values per instruction, no float conversions (fd_dq_chunk)
      const unsigned wd[2] = {(unsigned)packed[j], (unsigned)(packed[j] >> 32)};
      *reinterpret_cast<uint4*>(dst) = fd_dq_chunk<IS_BF16, BITS>(wd, __byte_perm(sb[j], 0u, 0x1010), __byte_perm(sb[j], 0u, 0x3232));
      continue;
    }
    alignas(16) T vals[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      unsigned int q = (unsigned int)((packed[j] >> (i * BITS)) & ((1ull << BITS) - 1ull));
      float v;
      // affine: like mx.dequantize, q * s and + b each rounded to the scales' dtype ST
      if (MODE == 0) v = (float)(ST)__fadd_rn((float)(ST)__fmul_rn((float)q, s[j]), b[j]);
      else if (MODE == 3) v = fd_e4m3(q) * s[j];
      else v = fd_e2m1(q) * s[j];
      vals[i] = (T)v;
    }
    if (sizeof(T) == 2) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(vals);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) dst[i] = vals[i];
    }
  }
"""

# ---------------------------------------------------------------- Metal (untested: no Apple GPU here)
_METAL_HEADER = r"""
inline float fd_e2m1(uint c) {
  uint e = (c >> 1) & 3u, m = c & 1u;  // 0, 0.5, 1, 1.5, 2, 3, 4, 6
  float v = (e == 0u) ? 0.5f * float(m) : ldexp(1.0f + 0.5f * float(m), int(e) - 1);
  return (c & 8u) ? -v : v;
}
inline float fd_e4m3(uint c) {
  uint e = (c >> 3) & 15u, m = c & 7u;
  float v = (e == 0u) ? ldexp(float(m), -9) : ldexp(float(8u + m), int(e) - 10);
  if (e == 15u && m == 7u) v = NAN;
  return (c & 0x80u) ? -v : v;
}
inline float fd_e8m0(uint c) {
  return c == 0u ? as_type<float>(0x00400000u) : as_type<float>(c << 23);
}
"""

_METAL_SOURCE = r"""
  const uint c = thread_position_in_grid.x;
  if (c >= uint(K / 8)) return;
  for (ulong row = thread_position_in_grid.y; row < ulong(ROWS); row += threads_per_grid.y) {
  const device uchar* src = (const device uchar*)(w) + row * (K / 8) * BITS + ulong(c) * BITS;
  ulong packed = 0;
  for (int i = 0; i < BITS; ++i) packed |= ulong(src[i]) << (8 * i);
  const ulong g = row * (K / GROUP) + ulong(c * 8) / GROUP;
  float s, b = 0.0f;
  if (MODE == 0) {
    s = float(scales[g]);
    b = float(biases[g]);
  } else if (MODE == 2) {
    s = fd_e4m3(uint(scales[g]));
  } else {
    s = fd_e8m0(uint(scales[g]));
  }
  device T* dst = out + row * K + ulong(c) * 8;
  for (int i = 0; i < 8; ++i) {
    uint q = uint((packed >> (i * BITS)) & ((1ul << BITS) - 1ul));
    float v;
    if (MODE == 0) v = float(ST(float(ST(float(q) * s)) + b));  // rounded as mx.dequantize does
    else if (MODE == 3) v = fd_e4m3(q) * s;
    else v = fd_e2m1(q) * s;
    dst[i] = T(v);
  }
  }
"""


@functools.cache
def _kernel(backend: str, affine: bool, flat: bool = True):
    inputs = ["w", "scales", "biases"]  # fp modes get a dummy `biases` (the source names it)
    if backend == "cuda":
        return cuda_kernel(
            name="flashdiff_dequant" + ("_affine" if affine else "_fp") + ("_flat" if flat else ""),
            input_names=inputs, output_names=["out"], source=_CUDA_SOURCE_FLAT if flat else _CUDA_SOURCE,
            header=CUDA_KERNEL_HEADER,
        )
    return mx.fast.metal_kernel(
        name="flashdiff_dequant" + ("_affine" if affine else "_fp"),
        input_names=inputs, output_names=["out"], source=_METAL_SOURCE, header=_METAL_HEADER,
    )


def dequantize(w, scales, biases=None, bits=None, group_size=None, mode="affine", dtype=mx.bfloat16,
               backend="reference", stream=None):
    """``mx.dequantize`` with a custom GPU kernel: (..., N, packed) -> (..., N, K) in ``dtype``."""
    bits, group_size, _, k = check_quantized(w, scales, biases, bits, group_size, mode)
    return dequantize_checked(w, scales, biases, bits, group_size, k, mode, dtype, backend, stream)


def dequantize_checked(w, scales, biases, bits, group_size, k, mode, dtype, backend, stream=None):
    """``dequantize`` for arrays ``check_quantized`` has passed (bits, group_size, K as it returned):
    callers that checked already (quantized_linear, moe_gemm) skip the second check's host time."""
    if backend == "reference":
        out = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode, stream=stream)
        return out.astype(dtype, stream=stream)
    rows = 1
    for d in w.shape[:-1]:
        rows *= d
    affine = mode == "affine"
    # FLASHDIFF_DEQUANT_ROWS=1: the earlier row-per-grid-y CUDA kernel (kept for side-by-side measurement)
    flat = backend == "cuda" and not os.environ.get("FLASHDIFF_DEQUANT_ROWS")
    template, grid, group = _launch(dtype, scales.dtype if affine else mx.float32, rows, k, bits, group_size,
                                    mode, flat, flat and not os.environ.get("FLASHDIFF_DEQUANT_FLOAT"))
    inputs = [w, scales, biases if affine else _dummy_biases()]
    (out,) = _kernel(backend, affine, flat)(
        inputs=inputs, template=template, output_shapes=[(*w.shape[:-1], k)], output_dtypes=[dtype],
        grid=grid, threadgroup=group, stream=stream,
    )
    return out


def paired(dtype, scale_dtype, bits: int, mode: str) -> bool:
    """Whether the flat CUDA kernel takes its paired path (``fd_dq_chunk``): affine 4/8-bit codes whose
    scales are in the output's dtype, bf16 or fp16 (what quantized_linear and moe_gemm ask for)."""
    return mode == "affine" and bits in (4, 8) and dtype == scale_dtype and dtype in (mx.bfloat16, mx.float16)


@functools.lru_cache(maxsize=1024)
def _launch(dtype, scale_dtype, rows, k, bits, group_size, mode, flat, allow_paired=True):
    """Template arguments, grid and threadgroup of one dequantize launch (cached: a model calls the
    same few shapes thousands of times, and building them showed in the host time per call).
    allow_paired=False (FLASHDIFF_DEQUANT_FLOAT=1): the float path everywhere, for side-by-side runs."""
    template = [("T", dtype), ("ST", scale_dtype), ("ROWS", rows), ("K", k), ("BITS", bits),
                ("GROUP", group_size), ("MODE", MODES[mode])]
    if flat:
        template += [("CPT", FLAT_CPT), ("PAIRED", allow_paired and paired(dtype, scale_dtype, bits, mode)),
                     ("IS_BF16", dtype == mx.bfloat16)]
        grid, group = flat_launch(rows, k)
    else:
        grid, group = dequant_launch(rows, k)
    return template, grid, group


@functools.cache
def _dummy_biases():
    """The fp modes' stand-in for `biases` (their kernel source names the input but never reads it)."""
    return mx.zeros((1,), dtype=mx.float32)


FLAT_CPT = 4  # chunks per thread of the flat CUDA kernel


def flat_launch(rows: int, k: int):
    """Grid (in threads) and threadgroup of the flat CUDA kernel: one warp per 32 * FLAT_CPT chunks."""
    warps = -(-rows * (k // 8) // (32 * FLAT_CPT))
    return (warps * 32, 1, 1), (256, 1, 1)


MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y; the kernels loop over rows beyond it


def dequant_launch(rows: int, k: int):
    """Grid (in threads: x = 8-element chunks of a row, y = rows) and threadgroup of the kernels.
    The threadgroup width divides the chunks of a row when it can (no idle threads at row ends)."""
    chunks = k // 8
    width = next((t for t in (256, 128, 64, 32) if chunks % t == 0), min(chunks, 256))
    return (chunks, min(rows, MAX_GRID_Y), 1), (width, 1, 1)
