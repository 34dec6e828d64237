"""The sm_90 mixed-input GEMM: y = x @ dequantize(w).T (+ bias) with the quantized weight as wgmma's
*register* operand, one kernel, no dequantized copy of the weight. Affine 4- and 8-bit weights
(``mx.quantize`` layout), scales/biases in x's dtype (bf16 or fp16), K a multiple of 64.

Why a second fused design. ``_gemm_tma_dequant`` (sessions 4 and 8) has the producer warpgroup write the
dequantized weight tile into shared memory for wgmma to read back: 128 threads convert 16K values per K
tile, twice the MMA's time. Hopper's wgmma also takes its A operand from registers, and y^T = W x^T puts
the weight there: each consumer thread converts only the 32 weight values of its own A fragments per K
tile (two rows x 16 columns), with the paired-half arithmetic of ``_dequant.fd_dq_pair``, while the
previous tile's wgmmas run. This is how Hopper mixed-input GEMMs are usually built.

CTA tile: 192 weights x 128 tokens x 64 k (WT x TT x BK). Three consumer warpgroups each own 64 weight
rows and issue ``wgmma.m64n128k16`` (A = their converted fragments, B = the x tile, K-major, 128B
swizzle, loaded by TMA); 64 float32 accumulators per thread. 192 divides every N of FLUX, Wan and
HiDream, and 3072 / 192 x 1024 / 128 = 128 CTAs fill the H200's 132 SMs in one wave at M = 1024, where
the 128 x 256 tiles of ``_gemm_tma`` leave 36 idle. The producer warpgroup (threads 384..511):
- warp 12 first encodes the CTA's own tensor map over x (``_gemm_tma.publish_maps_code``, into a slot of
  the ``tmaps`` output; session 10: no separate encoding kernel), then thread 384 issues the x tile's
  TMA load per stage (as ``_gemm_tma``);
- all 128 copy the tile's packed codes and its rows' scales and biases from global memory (loaded four
  K tiles ahead at 4 bits, one at 8, into registers) into the stage, rearranged so that consumer lane (g, t) finds everything it needs
  for a row in one 8-byte (4-bit) or 16-byte (8-bit) shared load, already in the bit positions
  ``fd_dq_pair`` takes (4-bit: ``fd_mixed_nibbles``; 8-bit: one byte permute), then arrive on the stage's
  "full" barrier (129 arrivals: the TMA thread's expect_tx and one per producer thread).
A-fragment layout (PTX ISA, m64k16 with A in registers, as the attention's P operand): lane (g, t) of
warp w holds rows 16 w + g and + 8, columns 2t, 2t + 1, 2t + 8, 2t + 9 of each k16 step; register
r = (row is + 8) + 2 (column is + 8). Numerics: every weight value is bit-identical to MLX's CPU
dequantize (the product and then the sum rounded to x's dtype); bias added in float32 before the
final rounding, as in ``_gemm_tma_dequant``. Epilogue: accumulators (weight, token) -> a padded
[token][weight] shared tile -> 16-byte row stores.

Dense form only. ``quantized_linear`` uses it only when asked (FLASHDIFF_QLINEAR=mixed, on sm_90, for
arguments ``supported`` accepts). Emulated on the CPU bit for bit against the TMA GEMM on the dequantized
weight (tests/test_cuda_emulation.py; eight planted bugs fail it) and compiled with nvcc
(tests/test_cuda_sources.py: 122 registers, no spills).

Measured on the H200 (session 9, benchmarks/README.md): with two K tiles of 4-bit codes in flight, all 26
GPU cases of ``test_quantized_linear_cuda_mixed`` passed; with four (this source), the 8 that ran before
the device time ended passed, and its output at 1024 x 3072 -> 3072 equalled dequantize + cuBLAS's.
Speed, compiled and streamed: 0.82x of bf16 at 1024 x 3072 -> 3072 4-bit (dequantize + cuBLAS 0.81x
in the same run), 0.50-0.63x at 4608 rows. At 4608 x 3072 -> 12288 (probe_mixed_gemm_variants.py) the
producer's global loads cost 126 of its 796 us and the conversion 76; without either this tile shape
still took 670 us against 570 for the TMA GEMM and 511 for cuBLAS. So it stays opt-in.
Session 10 (each CTA encodes its map; all 26 GPU cases passed): the probe, streamed, put it at 53.0 us
against 62.4 us with the map kernel of session 9 at 1024 x 3072 -> 3072, but 193 against 183 us at
1024 x 3072 -> 12288 (512 CTAs each encoding a map). Compiled and streamed in benchmarks/kernels.py:
0.66x of bf16 at 1024 x 3072 -> 3072 against 0.79x for dequantize + cuBLAS in the same run, and
0.46-0.64x at the 1024-row FLUX shapes with N or K of 12288 and more (dequantize + cuBLAS 0.77-0.86x).

Session 15 (Nsight Compute at 1024 x 3072 -> 3072, 4-bit, benchmarks/results/ncu-mixed-*-h200-s15.*): 43.7 us
against cuBLAS's 27.7, the tensor pipe busy 50% of the time (cuBLAS 85%), 4.4x cuBLAS's warp instructions (the
producer's loads and rearrangement of the codes about a quarter of them, the consumers' conversion most of the
rest), the consumers' waits on the full barrier 15% of the stall samples. A deeper ring (8 stages) ran slower.
So ``PACKED`` mode: ``pack_weight`` runs the producer's tile code once into blocks laid out as the stages
hold them, and one producer thread copies each stage's block with a bulk copy (``fd_bulk_load``) beside the x
tile's TMA load. Bit-identical to the unpacked kernel (emulation and GPU tests). It takes 34.9 us there (tensor
pipe 64%). Streamed, it takes 13-28% less time than unpacked at the 1024-row shapes, but is still 0.78-0.91x of
bf16 (not measured beside dequantize + cuBLAS in that run; session 10 had that at 0.77-0.86x), and 0.70x at 4608
rows. Nothing dispatches it (quantized_linear takes MLX's layout, and packing per call would cost 42-97 us); it is
the base a fused path at M ~ 1024 would need, with fewer conversion instructions per code (the probe's one-LOP3
variant, benchmarks/probe_mixed_gemm_variants.py, took 5% less time).

Session 16: in bf16 each pair of codes is converted by one LOP3 (mask and exponent), one fma and one add
(``_dequant.fd_dq4_bf16_pair`` / ``fd_dq8_bf16_pair``): fma(128 + q, s, -128 s) is q s rounded once, as the multiply
of q was, so the values stay bit-identical (fp16 keeps sub, mul, add: -1024 s overflows fp16 above s = 64); and the
K tile's four wgmma descriptors are one descriptor moved along (``fd_desc_add``). The consumers' loop: 331 -> 252
SASS instructions per two K tiles at 4 bits, 387 -> 308 at 8. On the H200 (packed mode, Nsight Compute) 33.0 us at
1024 x 3072 -> 3072 against cuBLAS's 28.0 (0.85x; tensor pipe 70%), 126 against 104 at -> 12288 (0.82x); streamed,
4-7% less time than with session 15's conversion. Still not dispatched (benchmarks/README.md, session 16).

Session 18 (benchmarks/probe_mixed_timeline.py: %globaltimer / clock64 stamps in each CTA): without the conversion the
loop runs at the wgmmas' own 768 cycles per K tile, with it at 947 (alone it needs 400: beside the wgmmas the consumers'
ALU work issues at about half its rate, and it overflowed their shadow). The consumers' loop is now unrolled over the
stages, so each stage's addresses, barriers and descriptors are constants from fixed bases in the uniform datapath:
252 -> 200 SASS instructions per two K tiles, 859 cycles per K tile, 31.3 us against cuBLAS's 27.9 at 1024 x 3072 ->
3072 (0.89x). ``dequantize_packed`` reads the packed blocks back to the weight and ``unpack_weight`` to mx.quantize's
arrays, for qgemm.PackedQuantizedLinear (opt-in: FLASHDIFF_QLINEAR_PACKED=1), which runs this kernel in PACKED mode at
1024-2048 rows.

Session 20: with producer warps 13-15 converting the last 1-3 of each K tile's k16 steps for every consumer thread (commit
c601fca, template ASSIST; bit-identical) the kernel ran slower at every split (Nsight Compute, 1024 x 3072 -> 3072, 8-bit:
34.1 us as here, 40.9 / 44.2 / 49.7 assisted; cuBLAS 27.9), so this source does not have it. At 8 bits the consumers'
conversion instructions (5.5 per pair of codes) are what holds this tile at 0.82x of cuBLAS.

Session 22: a CTA-pair form (commit 7e42672, template PAIR): the two CTAs of a cluster of 2 along the tokens (compile-time
``__cluster_dims__``) shared each weight tile's conversion, each converting half of every K tile and sending it to the
other by st.async. It ran only with CUDA graphs off (MLX's graph cache cannot hold a cluster kernel:
benchmarks/probe_cluster_graph.py), was bit-identical on the H200, and slower: 42.1 against 33.3 us at 1024 x 3072 ->
3072, 8-bit (tensor pipe 52% against 69%), likely for want of shared-memory bandwidth (its exchange adds ~42 KB per K tile
to this kernel's ~92 KB). So it was removed (benchmarks/README.md, session 22).
"""

import functools

import mlx.core as mx

from . import _gemm_tma
from ._dequant import DEQUANT_CODE, PAIRED_ASM
from ._gemm_cuda import is_sm90
from ._gemm_sm90 import wgmma_asm
from ._gemm_tma import publish_maps_code
from ._jit import cuda_kernel

WT, TT, BK, STAGES = 192, 128, 64, 4  # weights, tokens, k per CTA tile; pipeline stages (as in _SOURCE)
THREADS = 512  # three consumer warpgroups + one producer warpgroup


def stage_bytes(bits: int, group_size: int) -> int:
    """One stage: the x tile (TT x BK, 1024-byte aligned for TMA), the codes, the packed scales | biases."""
    groups = max(BK // group_size, 1)
    raw = TT * BK * 2 + WT * BK * bits // 8 + WT * groups * 4
    return -(-raw // 1024) * 1024


def smem_bytes(bits: int, group_size: int) -> int:
    return STAGES * stage_bytes(bits, group_size) + 1024  # + room to align to 1024 bytes


# m64n128k16, A from registers, B K-major from shared memory (imm-trans-b = 0)
_MMA = wgmma_asm("fd_wgmma_rsk_bf16", 128, "bf16", a_regs=True) + wgmma_asm("fd_wgmma_rsk_f16", 128, "f16", a_regs=True) + r"""
__device__ __forceinline__ void fd_fence64(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i]) :: "memory");
}
// d += W . x^T over one K tile: four k16 wgmmas, A = this thread's fragments a[kk], B = the x tile at
// b_addr (TT rows of 128 bytes, 128B swizzle), committed as one group
template <bool BF16>
__device__ __forceinline__ void fd_mma_rs_k64(float (&d)[64], const unsigned (&a)[4][4], unsigned b_addr) {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  const unsigned long long db = fd_desc(b_addr);
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    if (BF16) fd_wgmma_rsk_bf16(d, a[kk], fd_desc_add(db, kk * 32));
    else fd_wgmma_rsk_f16(d, a[kk], fd_desc_add(db, kk * 32));
  }
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// `bytes` (a multiple of 16) from global `src` to shared `dst` (both 16-byte aligned), completing on mbarrier `bar`
__device__ __forceinline__ void fd_bulk_load(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
// keeps a wgmma's register operand live (unmoved, unreused) up to this point: the MMA reads it asynchronously
__device__ __forceinline__ void fd_fence_frag(unsigned (&a)[4][4]) {
#pragma unroll
  for (int i = 0; i < 16; ++i) asm volatile("" : "+r"(a[i / 4][i % 4]) :: "memory");
}
// the three consumer warpgroups (384 threads) only
__device__ __forceinline__ void fd_bar_consumers() { asm volatile("bar.sync 2, 384;\n" ::: "memory"); }
"""

# Plain C++ (the CPU emulation compiles it as written): the producer's rearrangement of 4-bit codes.
MIXED_CODE = r"""
// Four words w[0..3] of a row's K tile (codes 8 j .. 8 j + 7 in word j) to the word lane t reads: for
// j = 0..3, bits 4j..4j+3 = low nibble of byte t of w[j], bits 16+4j.. = its high nibble, so that
// (z >> 4j) & 0x000F000F is the pair of codes (8 j + 2 t, 8 j + 2 t + 1) where fd_dq_pair takes them.
__device__ __forceinline__ void fd_mixed_nibbles(const unsigned (&w)[4], unsigned (&z)[4]) {
  const unsigned lo01 = __byte_perm(w[0], w[1], 0x5140), hi01 = __byte_perm(w[0], w[1], 0x7362);
  const unsigned lo23 = __byte_perm(w[2], w[3], 0x5140), hi23 = __byte_perm(w[2], w[3], 0x7362);
  const unsigned r[4] = {__byte_perm(lo01, lo23, 0x5410), __byte_perm(lo01, lo23, 0x7632),
                         __byte_perm(hi01, hi23, 0x5410), __byte_perm(hi01, hi23, 0x7632)};  // byte t of w[0..3]
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const unsigned m = r[t] & 0x0F0F0F0Fu, h = (r[t] >> 4) & 0x0F0F0F0Fu;
    z[t] = __byte_perm(m | (m >> 4), h | (h >> 4), 0x6420);
  }
}
"""

_LAUNCH_BOUNDS = r"""
#undef __global__
#define __global__ __attribute__((global)) __launch_bounds__(512, 1)
"""
_HEADER = _gemm_tma._GEMM_HEADER + PAIRED_ASM + DEQUANT_CODE + _MMA + MIXED_CODE + _LAUNCH_BOUNDS

# The producer's work on one K tile of the weight: its global loads (`fetch`) and its stores in the layout the
# consumers read (`store`); shared by the main kernel's producer and the packing kernel (``pack_weight``).
_TILE_CODE = r"""
    constexpr int UPR = BITS == 4 ? 2 : 4;      // 16-byte units of codes per row per K tile
    constexpr int UPT = WT * UPR / 128;          // units per producer thread
    constexpr int SPT = (WT * GPT + 127) / 128;  // (row, group) scale | bias pairs per producer thread
    constexpr int WPR = K * BITS / 32;           // code words per weight row
    auto fetch = [&](int kt, uint4 (&dst)[UPT], unsigned (&dsb)[SPT]) {  // tile kt into registers (zeros past N / K)
#pragma unroll
      for (int i = 0; i < UPT; ++i) {
        const int unit = p + 128 * i, n = tile_w * WT + unit / UPR;
        dst[i] = make_uint4(0u, 0u, 0u, 0u);
        if (kt < KT && n < N)
          dst[i] = *reinterpret_cast<const uint4*>(wq + (size_t)n * WPR + kt * (BK * BITS / 32) + (unit % UPR) * 4);
      }
#pragma unroll
      for (int i = 0; i < SPT; ++i) {
        const int v = p + 128 * i, n = tile_w * WT + v / GPT;
        dsb[i] = 0u;
        if (v < WT * GPT && kt < KT && n < N) {
          const size_t g = (size_t)n * (K / GROUP) + (kt * BK) / GROUP + v % GPT;
          dsb[i] = (unsigned)*reinterpret_cast<const unsigned short*>(scales + g)
                 | ((unsigned)*reinterpret_cast<const unsigned short*>(biases + g) << 16);
        }
      }
    };
    // tile kt's codes, rearranged so that consumer lane (g, t) finds a row's in one 8-byte (4-bit) or 16-byte (8-bit)
    // shared load, and its rows' scale | bias pairs, into `block`: a stage's (after the x tile) or the packed weight's
    auto store = [&](unsigned char* block, const uint4 (&cur)[UPT], const unsigned (&cur_sb)[SPT]) {
#pragma unroll
      for (int i = 0; i < UPT; ++i) {
        const int unit = p + 128 * i, row = unit / UPR, part = unit % UPR;
        const unsigned w[4] = {cur[i].x, cur[i].y, cur[i].z, cur[i].w};
        unsigned z[4];
        if (BITS == 4) {  // words 4 part .. + 3: lane t's word `part` of its 8 bytes
          fd_mixed_nibbles(w, z);
#pragma unroll
          for (int t = 0; t < 4; ++t) *reinterpret_cast<unsigned*>(block + row * ROW_BYTES + t * 8 + part * 4) = z[t];
        } else {  // words 4 part .. + 3 = k16 step `part`: lane t's codes (2t, 2t + 8, 2t + 1, 2t + 9)
          z[0] = __byte_perm(w[0], w[2], 0x5140); z[1] = __byte_perm(w[0], w[2], 0x7362);
          z[2] = __byte_perm(w[1], w[3], 0x5140); z[3] = __byte_perm(w[1], w[3], 0x7362);
#pragma unroll
          for (int t = 0; t < 4; ++t) *reinterpret_cast<unsigned*>(block + row * ROW_BYTES + t * 16 + part * 4) = z[t];
        }
      }
#pragma unroll
      for (int i = 0; i < SPT; ++i) {
        const int v = p + 128 * i;
        if (v < WT * GPT) reinterpret_cast<unsigned*>(block + C_BYTES)[v] = cur_sb[i];
      }
    };
"""

_SOURCE = r"""
  constexpr int WT = 192, TT = 128, BK = 64, STAGES = 4, KT = K / BK;
  constexpr int GPT = BK >= GROUP ? BK / GROUP : 1;  // scale groups per row per K tile
  constexpr int X_BYTES = TT * BK * 2, ROW_BYTES = BK * BITS / 8, C_BYTES = WT * ROW_BYTES;
  constexpr int BLOCK_BYTES = C_BYTES + WT * GPT * 4;  // a stage's codes + scale | bias pairs (pack_weight's blocks)
  constexpr int STAGE_BYTES = (X_BYTES + BLOCK_BYTES + 1023) / 1024 * 1024;
  extern __shared__ __align__(1024) unsigned char fd_smem_raw[];
  __shared__ __align__(8) unsigned long long full_bar[STAGES], empty_bar[STAGES];
  unsigned char* fd_smem = fd_smem_raw + ((1024u - (fd_smem_addr(fd_smem_raw) & 1023u)) & 1023u);
  const unsigned smem_base = fd_smem_addr(fd_smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tile_w = blockIdx.x, tile_t = blockIdx.y;
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      // the TMA thread's expect_tx + every producer thread (packed: the expect_tx alone)
      fd_mbar_init(fd_smem_addr(&full_bar[s]), PACKED ? 1 : 129);
      fd_mbar_init(fd_smem_addr(&empty_bar[s]), 384);  // every consumer thread
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warp >= 12) {  // producer warpgroup
    const int p = tid - 384;
""" + _TILE_CODE + r"""    // K tiles of codes in flight: four at 4 bits (the H200 ran 1024 x 3072 -> 3072 in 51.9 us with four, 54.8
    // with two), one at 8 bits (two spilled 36-60 bytes under the 128 registers of 512 threads)
    constexpr int PF = BITS == 4 ? 4 : 1;
    uint4 pk[PF][UPT];
    unsigned psb[PF][SPT];
    if (!PACKED) {
#pragma unroll
      for (int u = 0; u < PF; ++u) fetch(u, pk[u], psb[u]);
    }
    // this CTA's tensor map over x, encoded by warp 12 while the first codes load (in a slot of its own:
    // no separate encoding kernel ahead of this one)
    const unsigned long long xmap = fd_maps_addr(tmaps) + 128ull * (blockIdx.y * gridDim.x + blockIdx.x);
    if (warp == 12)
""" + publish_maps_code([("x", "M_ROWS", "TT")], dst="xmap", name="xmap_smem") + r"""
    if (p == 0) fd_acquire_map(xmap);
    if (PACKED) {  // wq holds the blocks that `store` would write (pack_weight): one bulk copy per stage, by one thread
      if (p == 0)
        for (int kt = 0; kt < KT; ++kt) {
          const int s = kt % STAGES;
          const unsigned full = fd_smem_addr(&full_bar[s]);
          fd_mbar_wait(fd_smem_addr(&empty_bar[s]), ((kt / STAGES) & 1) ^ 1);
          fd_mbar_expect_tx(full, X_BYTES + BLOCK_BYTES);
          fd_tma_load(smem_base + s * STAGE_BYTES, xmap, kt * BK, tile_t * TT, full);
          fd_bulk_load(smem_base + s * STAGE_BYTES + X_BYTES,
                       reinterpret_cast<const unsigned char*>(wq) + ((size_t)tile_w * KT + kt) * BLOCK_BYTES, BLOCK_BYTES, full);
        }
      return;
    }
    for (int kt0 = 0; kt0 < KT; kt0 += PF)
#pragma unroll
    for (int u = 0; u < PF; ++u) {
      const int kt = kt0 + u;
      if (kt >= KT) break;
      const int s = kt % STAGES;
      uint4 cur[UPT];
      unsigned cur_sb[SPT];
#pragma unroll
      for (int i = 0; i < UPT; ++i) cur[i] = pk[u][i];
#pragma unroll
      for (int i = 0; i < SPT; ++i) cur_sb[i] = psb[u][i];
      fetch(kt + PF, pk[u], psb[u]);  // refill this slot with the tile PF ahead
      const unsigned full = fd_smem_addr(&full_bar[s]);
      unsigned char* stage = fd_smem + s * STAGE_BYTES;
      fd_mbar_wait(fd_smem_addr(&empty_bar[s]), ((kt / STAGES) & 1) ^ 1);
      if (p == 0) {
        fd_mbar_expect_tx(full, X_BYTES);
        fd_tma_load(smem_base + s * STAGE_BYTES, xmap, kt * BK, tile_t * TT, full);
      }
      store(stage + X_BYTES, cur, cur_sb);
      fd_mbar_arrive(full);
    }
    return;
  }

  // consumers: warpgroup wg owns weight rows wg * 64 .. + 63 of the tile; lane (g, t) rows r0 and r0 + 8
  const int wg = warp >> 2, g = lane >> 2, t = lane & 3, r0 = wg * 64 + (warp & 3) * 16 + g;
  float d[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) d[i] = 0.0f;
  unsigned fa[4][4], fb[4][4];  // A fragments of two K tiles: [k16 step][register]
  // the stages' barriers, addressed from two bases (their generic-to-shared conversion once, not per K tile)
  const unsigned full0 = fd_smem_addr(&full_bar[0]), empty0 = fd_smem_addr(&empty_bar[0]);
  auto convert = [&](int s, unsigned (&a)[4][4]) {  // stage s's codes into A fragments a
    const unsigned char* stage = fd_smem + s * STAGE_BYTES;
    const unsigned* sbs = reinterpret_cast<const unsigned*>(stage + X_BYTES + C_BYTES);
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int row = r0 + 8 * rr;
      unsigned s2[GPT], b2[GPT], ns2[GPT];
#pragma unroll
      for (int gi = 0; gi < GPT; ++gi) {
        const unsigned sb = sbs[row * GPT + gi];
        s2[gi] = __byte_perm(sb, 0u, 0x1010);
        b2[gi] = __byte_perm(sb, 0u, 0x3232);
        if (IS_BF16) ns2[gi] = fd_h2_mul<true>(s2[gi], 0xC300C300u);  // -128 s, exact
      }
      if (BITS == 4) {
        const uint2 z = *reinterpret_cast<const uint2*>(stage + X_BYTES + row * ROW_BYTES + t * 8);
#pragma unroll
        for (int j = 0; j < 8; ++j) {  // word j of the tile: k16 step j / 2, columns + 8 if j is odd
          const int kk = j >> 1, gi = GPT == 2 ? kk >> 1 : 0;
          const unsigned zz = j < 4 ? z.x : z.y;
          // bf16: one LOP3, one fma, one add per pair (session 16); fp16 keeps sub, mul, add (-1024 s overflows
          // fp16 for scales above 64)
          if (IS_BF16) a[kk][rr + 2 * (j & 1)] = fd_dq4_bf16_pair(zz >> (4 * (j & 3)), s2[gi], ns2[gi], b2[gi]);
          else a[kk][rr + 2 * (j & 1)] = fd_dq_pair<IS_BF16, 4>((zz >> (4 * (j & 3))) & 0x000F000Fu, s2[gi], b2[gi]);
        }
      } else {
        const uint4 z = *reinterpret_cast<const uint4*>(stage + X_BYTES + row * ROW_BYTES + t * 16);
        const unsigned zs[4] = {z.x, z.y, z.z, z.w};
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          const int gi = GPT == 2 ? kk >> 1 : 0;
          if (IS_BF16) {  // one fma per pair, as at 4 bits (session 16)
            a[kk][rr] = fd_dq8_bf16_pair<false>(zs[kk], s2[gi], ns2[gi], b2[gi]);
            a[kk][rr + 2] = fd_dq8_bf16_pair<true>(zs[kk], s2[gi], ns2[gi], b2[gi]);
          } else {
            a[kk][rr] = fd_dq_pair<IS_BF16, 8>(zs[kk] & 0x00FF00FFu, s2[gi], b2[gi]);
            a[kk][rr + 2] = fd_dq_pair<IS_BF16, 8>((zs[kk] >> 8) & 0x00FF00FFu, s2[gi], b2[gi]);
          }
        }
      }
    }
  };
  // tile kt (in stage s = kt % STAGES, a compile-time constant below): its wgmmas on fragments `cur` (converted
  // before), then, while they run, tile kt + 1's fragments into `nxt` (which tile kt - 1's wgmmas read: wait_group 1
  // has retired them). phase: the full barriers' parity in this pass over the stages (the next pass's is phase ^ 1).
  auto step = [&](int kt, int s, int phase, unsigned (&cur)[4][4], unsigned (&nxt)[4][4]) {
    fd_fence64(d);
    fd_mma_rs_k64<IS_BF16>(d, cur, smem_base + s * STAGE_BYTES);
    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
    fd_fence64(d);
    if (kt > 0) fd_mbar_arrive(empty0 + 8 * ((s + STAGES - 1) % STAGES));
    if (kt + 1 < KT) {
      fd_mbar_wait(full0 + 8 * ((s + 1) % STAGES), s + 1 < STAGES ? phase : phase ^ 1);
      convert((s + 1) % STAGES, nxt);
    }
    fd_fence_frag(cur);  // tile kt's wgmmas may still read `cur`: nothing may take its registers before here
  };
  fd_mbar_wait(full0, 0);
  convert(0, fa);
  // Unrolled over the stages (session 18): each stage's shared addresses, barriers and wgmma descriptors are then
  // constants from one base, which ptxas keeps in the uniform datapath (the loop, one K tile per step, took 126 SASS
  // instructions per K tile, 32 of them moving descriptors into uniform registers; now about 100)
  static_assert(STAGES % 2 == 0, "the fragments alternate fa, fb by K tile across passes");
  for (int kt = 0; kt < KT; kt += STAGES) {
    const int phase = (kt / STAGES) & 1;
#pragma unroll
    for (int u = 0; u < STAGES; ++u)
      if (kt + u < KT) {
        if (u & 1) step(kt + u, u, phase, fb, fa);
        else step(kt + u, u, phase, fa, fb);
      }
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  fd_fence64(d);
  fd_bar_consumers();  // every consumer is done with the stages: the epilogue tile reuses them

  // d[i]: weight row r0 + 8 ((i >> 1) & 1), token 8 (i >> 2) + 2 t + (i & 1)
  constexpr int LDC = WT + 8;
  T* Cs = reinterpret_cast<T*>(fd_smem);
  float bias_r[2] = {0.0f, 0.0f};
  if (HAS_BIAS) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int n = tile_w * WT + r0 + 8 * rr;
      bias_r[rr] = n < N ? (float)bias[n] : 0.0f;
    }
  }
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    const int rr = (i >> 1) & 1, tok = 8 * (i >> 2) + 2 * t + (i & 1);
    Cs[tok * LDC + r0 + 8 * rr] = (T)(d[i] + bias_r[rr]);
  }
  fd_bar_consumers();
  constexpr int CPR = WT / 8;  // 16-byte chunks per token row
  for (int c = tid; c < TT * CPR; c += 384) {
    const int tok = c / CPR, ch = c % CPR, m = tile_t * TT + tok, n = tile_w * WT + ch * 8;
    if (m < M_ROWS && n < N)
      *reinterpret_cast<uint4*>(out + (size_t)m * N + n) = *reinterpret_cast<const uint4*>(Cs + tok * LDC + ch * 8);
  }
"""


def supported(x, scales, bits: int, group_size: int, mode: str, k: int, n: int) -> bool:
    """Whether this kernel takes these arguments (else dequantize + GEMM)."""
    return (mode == "affine" and bits in (4, 8) and x.dtype in (mx.bfloat16, mx.float16) and scales.dtype == x.dtype
            and k % BK == 0 and n % 8 == 0 and x.size // k > 0 and is_sm90())


@functools.cache
def _kernel(bits: int, group_size: int):
    return cuda_kernel(
        name="flashdiff_mixed_gemm", input_names=["x", "wq", "scales", "biases", "bias"],
        output_names=["out", "tmaps"], source=_SOURCE, header=_HEADER, shared_memory=smem_bytes(bits, group_size),
    )


def template(dtype, m: int, k: int, n: int, bits: int, group_size: int, has_bias: bool, packed: bool = False):
    return [("T", dtype), ("IS_BF16", dtype == mx.bfloat16), ("K", k), ("N", n), ("M_ROWS", m), ("BITS", bits),
            ("GROUP", group_size), ("HAS_BIAS", has_bias), ("PACKED", packed)]


def block_bytes(bits: int, group_size: int) -> int:
    """One (weight tile, K tile) block of ``pack_weight``'s output: the codes and the packed scales | biases."""
    return WT * BK * bits // 8 + WT * max(BK // group_size, 1) * 4


def packed_words(n: int, k: int, bits: int, group_size: int) -> int:
    """The length of ``pack_weight``'s (uint32) output for an (N, K) weight: a block per weight tile and K tile."""
    return -(-n // WT) * (k // BK) * block_bytes(bits, group_size) // 4


def check_packed(caller: str, packed, n: int, k: int, bits: int, group_size: int):
    """Raises, naming `caller`, unless `packed` is what ``pack_weight`` makes of an (N, K) weight (K a multiple of BK)
    at these bits and group size: the one check of the packed blocks that every reader of them makes first."""
    if k % BK:
        raise ValueError(f"{caller}: K={k} is not a multiple of {BK}, which pack_weight's blocks need.")
    expected = packed_words(n, k, bits, group_size)
    if packed.dtype != mx.uint32 or packed.shape != (expected,):
        raise ValueError(f"{caller} needs pack_weight's ({expected},) uint32 blocks for N={n}, K={k}, bits={bits}, "
                         f"group_size={group_size}; got packed {packed.shape} {packed.dtype}.")


def grid(m: int, n: int):
    """(grid in threads, threadgroup): x = weight tiles of WT, y = token tiles of TT."""
    return (-(-n // WT) * THREADS, -(-m // TT), 1), (THREADS, 1, 1)


def maps_bytes(m: int, n: int) -> int:
    """The kernel's tensor-map scratch: one 128-byte map per CTA + room to align them to 128 bytes."""
    (gx, gy, _), (threads, _, _) = grid(m, n)
    return gx // threads * gy * 128 + 128


def mixed_gemm(x2, wq, scales, biases, bits: int, group_size: int, bias=None, stream=None):
    """x2 (M, K) @ dequantize(wq, scales, biases).T (+ bias) -> (M, N) in x2.dtype, one kernel (each CTA
    encodes its own tensor map over x2). Arguments as ``supported`` accepts them."""
    return _launch(x2, wq, scales, biases, wq.shape[0], bits, group_size, bias, False, stream)


def mixed_gemm_packed(x2, packed, n: int, bits: int, group_size: int, bias=None, stream=None):
    """``mixed_gemm`` on ``pack_weight``'s output for an (N, K) weight, K = x2's last axis."""
    if x2.ndim != 2:
        raise ValueError(f"mixed_gemm_packed needs a 2-D x2 (M, K), got {x2.shape}.")
    check_packed("mixed_gemm_packed", packed, n, x2.shape[1], bits, group_size)
    if x2.dtype not in (mx.bfloat16, mx.float16):
        raise ValueError(f"mixed_gemm_packed takes bf16 / fp16 x2 (the scales' dtype), got {x2.dtype}.")
    return _launch(x2, packed, x2, x2, n, bits, group_size, bias, True, stream)  # PACKED reads no scales / biases


def _launch(x2, wq, scales, biases, n, bits, group_size, bias, packed, stream):
    m, k = x2.shape
    has_bias = bias is not None
    dummy = mx.zeros((1,), x2.dtype)
    g, tg = grid(m, n)
    out, _ = _kernel(bits, group_size)(
        inputs=[x2, wq, scales, biases, bias.astype(x2.dtype) if has_bias else dummy],
        template=template(x2.dtype, m, k, n, bits, group_size, has_bias, packed),
        output_shapes=[(m, n), (maps_bytes(m, n),)], output_dtypes=[x2.dtype, mx.uint8], grid=g, threadgroup=tg,
        stream=stream,
    )
    return out


_PACK_NAMES = ("_PACK_SOURCE", "_UNPACK_SOURCE", "_pack_kernel", "_unpack_kernel", "dequantize_packed", "pack_weight",
               "unpack_weight")


def __getattr__(name):
    """The packing side (pack_weight and its inverses) lives in _gemm_mixed_pack, which imports this module's header
    and tile code; its names are reachable from here too, looked up when first asked for."""
    if name in _PACK_NAMES:
        from . import _gemm_mixed_pack

        return getattr(_gemm_mixed_pack, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
