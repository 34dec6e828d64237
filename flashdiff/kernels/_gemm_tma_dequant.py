"""The sm_90 TMA GEMM with the weight dequantized inside it: y = x @ dequantize(w).T (+ bias), one kernel,
no dequantized copy of the weight in memory. Affine 4- and 8-bit weights (``mx.quantize`` layout), the
scales/biases in x's dtype (bf16 or fp16), K a multiple of 64.

Same CTA tile, consumer warpgroups, barriers and epilogue as ``_gemm_tma._SOURCE`` (128 x 256 x 64, two
consumer warpgroups issuing ``wgmma.m64n256k16`` from 128B-swizzled shared tiles); what changes is the
producer warpgroup. Per K tile:
- thread 256 issues the input tile's TMA load, as before;
- all 128 producer threads build the weight tile: each loads its share of the packed codes (16-byte
  loads, coalesced along the rows, ``BITS`` per thread) and the rows' scales and biases,
  two K tiles ahead at 4 bits, one at 8 (held in registers while the current tile is converted), turns
  every 8 codes into one 16-byte chunk of x.dtype values and stores it where the 128-byte swizzle puts it,
  then fences its
  shared-memory writes for the asynchronous proxy (wgmma reads through it) and arrives on the stage's
  "full" barrier (129 arrivals: the TMA thread's expect_tx and one per producer thread). (Two producer
  warpgroups, 512 threads, do not compile: at 128 registers per thread at launch ptxas cannot
  allocate the consumers' m64n256 wgmma, C7602, whatever setmaxnreg raises them to later.)
- Dequantizing two codes at once (``fd_dq_pair``): the codes go into the mantissas of a packed pair of
  x.dtype values whose exponent makes them 128 + m (bf16, 7-bit m) or 1024 + q (fp16), the offset is
  subtracted exactly, then one paired multiply by the scale and one paired add of the bias round as
  ``mx.dequantize`` rounds (the product to the scales' dtype, then the sum). For bf16 8-bit codes the
  8th bit decides whether 128 comes off (``(~p & 0x80) * 0x86`` is 0x4300, bf16 128.0, where it is clear).
  Integer and paired-half ops only: float conversions (I2F / F2F) run at a sixteenth of that rate.
- Bias (optional) is added in the epilogue in float32 before the rounding to x.dtype, as cuBLAS's
  epilogue in ``mx.addmm`` does.
The dense form only (one weight). ``quantized_linear`` uses it only when asked (FLASHDIFF_QLINEAR=fused,
on sm_90, for arguments ``supported`` accepts); by default it dequantizes into a scratch and runs cuBLAS.

Measured on the H200 (session 8, benchmarks/README.md): exact (bit-identical without bias to the TMA
GEMM on MLX's CPU dequantize), but 272 us against cuBLAS's 129 us per streamed call at 4608 x 3072 ->
3072 4-bit, 79 us against 38 at 1024 rows. The producer warpgroup, one warp per scheduler, needs about
twice the MMA's time per K tile, and the base TMA GEMM is 0.8x cuBLAS at these shapes. A variant that loaded
the scales and biases as separate registers took 18% less time but failed its bit-exact GPU cases, and was
reverted. Session 4 had tried the same design and removed it; this one stays, opt-in, because it
needs no dequantized scratch.
"""

import functools

import mlx.core as mx

from . import _gemm_tma
from ._dequant import DEQUANT_CODE, PAIRED_ASM
from ._gemm_cuda import TILE_SETUP, group_m, is_sm90
from ._gemm_sm90 import _EPILOGUE_CONSUMERS
from ._jit import cuda_kernel

THREADS = _gemm_tma.THREADS
SMEM_BYTES = _gemm_tma.SMEM_BYTES


_ASM_HELPERS = r"""__device__ __forceinline__ uint4 fd_ldg16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ void fd_sts16(unsigned addr, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" :: "r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}
__device__ __forceinline__ void fd_fence_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
"""

# launch bounds through the signature mx.fast.cuda_kernel writes (as _attention_sm90 does): without them
# ptxas gave the f16 8-bit form 169 registers, which 384 threads cannot launch with (168 at most)
_LAUNCH_BOUNDS = r"""
#undef __global__
#define __global__ __attribute__((global)) __launch_bounds__(384, 1)
"""
_HEADER = _gemm_tma._GEMM_HEADER + PAIRED_ASM + _ASM_HELPERS + DEQUANT_CODE + _LAUNCH_BOUNDS

_PRODUCER = r"""
  if (warp >= 8) {  // producer warpgroup
    // thread p: part c (16 bytes of codes) of rows r0 + RSTEP j of the tile's 256 weight rows; the codes,
    // scales and biases of tiles kt + 1 .. kt + PF are in flight while tile kt is converted
    constexpr int LPR = BITS / 2, VPT = 2 * LPR, RSTEP = 128 / LPR, CPV = 16 / BITS;
    constexpr int PF = BITS == 4 ? 2 : 1;  // tiles in flight (8-bit codes two tiles ahead spilled 68 bytes)
    constexpr int WPR = K * BITS / 32, GPR = K / GROUP;  // words, groups per weight row
    const int p = tid - 256, c = p % LPR, r0 = p / LPR;
    if (p == 0) fd_acquire_map(maps);
    uint4 pk[PF][VPT];
    unsigned sb[PF][VPT];  // scale bits | bias bits << 16
    auto fetch = [&](int kt, uint4 (&dst)[VPT], unsigned (&dsb)[VPT]) {
#pragma unroll
      for (int j = 0; j < VPT; ++j) {
        const int n = tile_n * BN + r0 + RSTEP * j;
        if (kt < KT && n < N) {
          const size_t row = (size_t)expert * N + n;
          dst[j] = fd_ldg16(wq + row * WPR + kt * 2 * BITS + c * 4);
          const size_t g = row * GPR + (kt * BK + c * (128 / BITS)) / GROUP;
          dsb[j] = (unsigned)*reinterpret_cast<const unsigned short*>(scales + g)
                 | ((unsigned)*reinterpret_cast<const unsigned short*>(biases + g) << 16);
        } else {  // rows past N: zeros (0 * 0 + 0); tiles past K: never converted
          dst[j] = make_uint4(0u, 0u, 0u, 0u);
          dsb[j] = 0u;
        }
      }
    };
#pragma unroll
    for (int u = 0; u < PF; ++u) fetch(u, pk[u], sb[u]);
    for (int kt0 = 0; kt0 < KT; kt0 += PF) {
#pragma unroll
      for (int u = 0; u < PF; ++u) {
        const int kt = kt0 + u;
        if (kt >= KT) break;
        const int s = kt % STAGES;
        const unsigned full = fd_smem_addr(&full_bar[s]), a_dst = smem_base + s * STAGE_BYTES, b_dst = a_dst + A_BYTES;
        uint4 cur[VPT];
        unsigned cur_sb[VPT];
#pragma unroll
        for (int j = 0; j < VPT; ++j) {
          cur[j] = pk[u][j];
          cur_sb[j] = sb[u][j];
        }
        fetch(kt + PF, pk[u], sb[u]);  // refill this slot with the tile PF ahead
        fd_mbar_wait(fd_smem_addr(&empty_bar[s]), ((kt / STAGES) & 1) ^ 1);
        if (p == 0) {
          fd_mbar_expect_tx(full, A_BYTES);
          fd_tma_load(a_dst, maps, kt * BK, tile_m * BM, full);
        }
#pragma unroll
        for (int j = 0; j < VPT; ++j) {
          const int r = r0 + RSTEP * j;
          const unsigned s2 = __byte_perm(cur_sb[j], 0u, 0x1010), b2 = __byte_perm(cur_sb[j], 0u, 0x3232);
          const unsigned words[4] = {cur[j].x, cur[j].y, cur[j].z, cur[j].w};
#pragma unroll
          for (int i = 0; i < CPV; ++i) {
            const int ch = c * CPV + i;
            fd_sts16(b_dst + r * 128 + ((ch ^ (r & 7)) << 4), fd_dq_chunk<IS_BF16, BITS>(words + i * (BITS / 4), s2, b2));
          }
        }
        fd_fence_async_smem();
        fd_mbar_arrive(full);
      }
    }
    return;
  }
"""

_EPILOGUE_BIAS = (_EPILOGUE_CONSUMERS
                  .replace("(T)d[4 * j];", "(T)(d[4 * j] + bias_at(c));")
                  .replace("(T)d[4 * j + 1];", "(T)(d[4 * j + 1] + bias_at(c + 1));")
                  .replace("(T)d[4 * j + 2];", "(T)(d[4 * j + 2] + bias_at(c));")
                  .replace("(T)d[4 * j + 3];", "(T)(d[4 * j + 3] + bias_at(c + 1));"))

_SOURCE = r"""
  constexpr int BM = 128, BN = 256, BK = 64, STAGES = 4;
  constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2, STAGE_BYTES = A_BYTES + B_BYTES;
  extern __shared__ __align__(1024) unsigned char fd_smem_raw[];
  __shared__ __align__(8) unsigned long long full_bar[STAGES], empty_bar[STAGES];
  unsigned char* fd_smem = fd_smem_raw + ((1024u - (fd_smem_addr(fd_smem_raw) & 1023u)) & 1023u);
  const unsigned smem_base = fd_smem_addr(fd_smem);
""" + TILE_SETUP + r"""
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const unsigned long long maps = fd_maps_addr(tmaps);
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      fd_mbar_init(fd_smem_addr(&full_bar[s]), 129);  // the TMA thread's expect_tx + every producer thread
      fd_mbar_init(fd_smem_addr(&empty_bar[s]), 256);  // every consumer thread
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  constexpr int KT = K / BK;
""" + _PRODUCER + "\n" + _gemm_tma._CONSUMER_LOOP + r"""  auto bias_at = [&](int c) -> float { return HAS_BIAS ? (float)bias[tile_n * BN + c] : 0.0f; };
""" + _EPILOGUE_BIAS


def supported(x, scales, bits: int, group_size: int, mode: str, k: int, n: int) -> bool:
    """Whether the fused kernel takes these arguments (else dequantize + GEMM)."""
    return (mode == "affine" and bits in (4, 8) and x.dtype in (mx.bfloat16, mx.float16) and scales.dtype == x.dtype
            and k % 64 == 0 and n % 8 == 0 and x.size // k > 0 and is_sm90())


@functools.cache
def _kernel():
    return cuda_kernel(
        name="flashdiff_dequant_gemm_tma",
        input_names=["x", "wq", "scales", "biases", "bias", "slot_row", "tile_expert", "tmaps"],
        output_names=["out"], source=_SOURCE, header=_HEADER, shared_memory=SMEM_BYTES,
    )


def template(dtype, m: int, k: int, n: int, bits: int, group_size: int, has_bias: bool):
    return [("T", dtype), ("IS_BF16", dtype == mx.bfloat16), ("K", k), ("N", n), ("A_DIV", 1), ("DIRECT", True),
            ("M_ROWS", m), ("THREADS", THREADS), ("GROUP_M", group_m()), ("BITS", bits), ("GROUP", group_size),
            ("HAS_BIAS", has_bias)]


def dequant_gemm(x2, wq, scales, biases, bits: int, group_size: int, bias=None, stream=None):
    """x2 (M, K) @ dequantize(wq, scales, biases).T (+ bias) -> (M, N) in x2.dtype, one kernel (plus the
    one-warp kernel that encodes x2's tensor map). Arguments as ``supported`` accepts them."""
    m, k = x2.shape
    n = wq.shape[0]
    maps = _gemm_tma.tensor_maps(x2, wq.reshape(1, n, -1), stream)
    dummy = mx.zeros((1,), mx.int32)
    has_bias = bias is not None
    (out,) = _kernel()(
        inputs=[x2, wq, scales, biases, bias.astype(x2.dtype) if has_bias else dummy, dummy, dummy, maps],
        template=template(x2.dtype, m, k, n, bits, group_size, has_bias), output_shapes=[(m, n)],
        output_dtypes=[x2.dtype], grid=(-(-n // _gemm_tma.BN) * THREADS, -(-m // _gemm_tma.BM), 1),
        threadgroup=(THREADS, 1, 1), stream=stream,
    )
    return out
