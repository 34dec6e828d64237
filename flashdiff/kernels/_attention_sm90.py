"""FlashAttention forward for Hopper (sm_90a): warpgroup MMA fed by TMA, head dim 128, bf16 / fp16.

``attention(..., backend="cuda_wgmma")``. Written in session 6 (checked then only by nvcc and by
tests/cuda_emulation.py); first run on the H200 in session 7, where it passed its GPU tests
(tests/test_kernels_cuda.py, backend "cuda_wgmma") and was timed against cuDNN (benchmarks/README.md).
Session 13 (no GPU) made four edits to the consumers' loop, each found in the SASS:
- the softmax's key-tail test is a compile-time flag (``on_tile``), so full key tiles carry no per-key compare
  and select (731 -> 588 instructions per tile at Lk = 4621; 585 at 4736);
- S's first k16 wgmma overwrites its accumulators (scale-d false) instead of the loop zeroing them (553);
- a warp none of whose rows' maxima moved skipped O's rescale (``SKIP_UNMOVED``; turned off again in session 14,
  where the H200 measured the vote slower than rescaling every tile);
- each row's maximum is taken in ``MAX_CHAINS`` = 4 independent chains.
The outputs are bit-identical in the emulation. Session 14 ran them on the H200: the GPU tests pass, and
benchmarks/probe_attention_variants.py timed each edit taken back (benchmarks/README.md, session 14).
Session 16: each MMA call makes its shared-memory descriptors once and moves them along by one add per k16 step
(``fd_desc_add``; 559 -> 514 instructions per key tile at LK 4736): 3-4% less time at 4608 / 4621 tokens on the H200,
where the kernel alone now matches cuDNN's (Nsight Compute: 403 against 406 us at 4608).
Session 17: where Lk is not a multiple of 128, the last key tile runs after the loop as a compile-time copy of its
step (the loop no longer carries that copy behind a branch on j: 673 -> 513 SASS instructions per tile at LK 4621),
and the last P V stops at Lk (ceil((Lk % 128) / 16) k16 steps of 8). Nsight Compute on the H200: 4621 414 against
420 us, 4700 412 against 434, 5000 498 against 510; aligned lengths unchanged (benchmarks/README.md, session 17).

Two kernels:
- ``_MAPS_SOURCE``: one warp encodes the three TMA tensor maps (Q, K and V as (rows, 128), boxes of
  128 rows x 64 columns with the 128-byte swizzle, as ``_gemm_tma`` does).
- ``_SOURCE``: one CTA per 128 query rows of one (batch, head); three warpgroups. The producer
  warpgroup gives up registers (``setmaxnreg``: 40 per thread, the consumers take 232) and its one thread
  loads Q once and then K and V tiles of 128 keys, each into two stages of its own (full / empty
  mbarriers). Consumer warpgroup w owns query rows 64w .. 64w + 63. Per key tile j it issues
  S_j = Q K_j^T (eight ``wgmma m64n128k16`` from shared memory) and O += P_{j-1} V_{j-1} (A = P from
  registers: the accumulator layout of m64nN is the A-register layout of m64k16, so no shuffles; B = V
  read MN-major straight from its TMA tiles, so V needs no transpose)
  together, waits for S_j alone, runs S_j's online softmax (float32, ex2.approx with scale * log2 e
  folded in, keys past Lk masked to -inf, row max / sum over the 4 lanes of a row) while P_{j-1} V_{j-1}
  is in flight, then rescales O once that has landed: FlashAttention-3's intra-warpgroup overlap. With
  ``pingpong`` the two consumer warpgroups take turns issuing (named barriers), so one's softmax runs
  during the other's MMAs. O / l stored at the end.
  Optional per-key additive bias (B, Lk) (boolean key masks become 0 / -inf).
"""

import functools
import math

import mlx.core as mx

from ._dispatch import float_bits
from ._gemm_sm90 import wgmma_asm
from ._gemm_tma import _GEMM_HEADER, _MAP_HEADER, num_sms
from ._jit import cuda_kernel

D = 128
BM = BN = 128
STAGES = 2
THREADS = 384  # two consumer warpgroups + one producer warpgroup
SMEM_BYTES = BM * D * 2 + STAGES * 2 * BN * D * 2 + 1024  # Q + stages of K and V + alignment room
MAP_BYTES = 4 * 128  # three 128-byte maps + room to align them


def _wgmma_n128(dtype: str, a_regs: bool, overwrite: bool = False) -> str:
    """m64n128k16 with float32 accumulators. A from shared memory (both operands K-major) or from
    registers (then B is MN-major: imm-trans-b = 1, N contiguous, as V's tiles are). overwrite: d = A . B."""
    name = f"fd_wgmma_{'rs' if a_regs else 'ss'}{'_first' if overwrite else ''}_{dtype}"
    return wgmma_asm(name, 128, dtype, a_regs, trans_b=a_regs, overwrite=overwrite)


_HEADER = _GEMM_HEADER + "".join(_wgmma_n128(dtype, a_regs, overwrite) for dtype in ("bf16", "f16")
                                 for a_regs, overwrite in ((False, False), (False, True), (True, False))) + r"""
// 2^x by the special-function unit (ex2.approx: ~2 ulp, 2^-inf = +0), not exp2f's accurate sequence
__device__ __forceinline__ float fd_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ void fd_fence64(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i]) :: "memory");
}
// d = A . B^T over 128 reduction elements held as two 64-column swizzled chunks CHUNK bytes apart:
// eight k16 MMAs, A (this warpgroup's 64 rows) and B (128 rows) from shared memory. The first one ignores d's
// values (scale-d false), so d needs no zeroing.
template <bool BF16>
__device__ __forceinline__ void fd_mma_ss128(float (&d)[64], unsigned a_addr, unsigned b_addr, unsigned chunk) {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  const unsigned long long da = fd_desc(a_addr), db = fd_desc(b_addr);  // then moved along: one add per step
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    const unsigned off = (kk >> 2) * chunk + (kk & 3) * 32;
    const unsigned long long dak = fd_desc_add(da, off), dbk = fd_desc_add(db, off);
    if (kk == 0 && BF16) fd_wgmma_ss_first_bf16(d, dak, dbk);
    else if (kk == 0) fd_wgmma_ss_first_f16(d, dak, dbk);
    else if (BF16) fd_wgmma_ss_bf16(d, dak, dbk);
    else fd_wgmma_ss_f16(d, dak, dbk);
  }
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// MN-major 128-byte-swizzled B (the PTX ISA's canonical ((T,8,m),(8,k)) : ((1,T,LBO),(8T,SBO))): rows of
// 64 N-contiguous elements, 8-row groups SBO = 1024 bytes apart along K, 64-element N blocks LBO apart
__device__ __forceinline__ unsigned long long fd_desc_mn(unsigned addr, unsigned lbo) {
  return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)(lbo >> 4) << 16) | (64ull << 32) | (1ull << 62);
}
// d += P . V with P's A fragments in registers (a[kk] for keys 16 kk .. 16 kk + 15) and V's tile as TMA
// loads it: [128 keys][64 dims] twice (dims 0..63, 64..127) CHUNK bytes apart, 128-byte rows swizzled
// KSTEPS < 8: only keys 0 .. 16 KSTEPS - 1 (a last, partial key tile's; P is 0 past LK)
template <bool BF16, int KSTEPS = 8>
__device__ __forceinline__ void fd_mma_rs128(float (&d)[64], const unsigned (&a)[8][4], unsigned b_addr, unsigned chunk) {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  const unsigned long long db = fd_desc_mn(b_addr, chunk);
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) {
    if (BF16) fd_wgmma_rs_bf16(d, a[kk], fd_desc_add(db, kk * 2048));
    else fd_wgmma_rs_f16(d, a[kk], fd_desc_add(db, kk * 2048));
  }
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// a compile-time flag passed as a value (fd_flag<true>{}): a generic lambda's `decltype(flag)::value`
template <bool B> struct fd_flag { static constexpr bool value = B; };
// named barriers 1..15 for the two consumer warpgroups (256 threads): wait for one's turn / give the turn
__device__ __forceinline__ void fd_bar_sync(int id) { asm volatile("bar.sync %0, 256;\n" :: "r"(id) : "memory"); }
__device__ __forceinline__ void fd_bar_arrive(int id) { asm volatile("bar.arrive %0, 256;\n" :: "r"(id) : "memory"); }
// the register split of warp specialisation: 40 per producer thread (at 24 its loop spilled), 232 per
// consumer thread (128 * 40 + 256 * 232 = 64512 = 384 * 168, the launch bounds' budget: the request is met)
__device__ __forceinline__ void fd_regs_producer() { asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory"); }
__device__ __forceinline__ void fd_regs_consumer() { asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory"); }
// launch bounds through the signature that mx.fast.cuda_kernel writes: 384 threads, one CTA per SM
#undef __global__
#define __global__ __attribute__((global)) __launch_bounds__(384, 1)
"""

# Template: T, IS_BF16, Q_COLS, Q_ROWS, KV_COLS, KV_ROWS: each tensor as a (rows, cols) matrix, head-major
# (B * H * L rows of 128) or sequence-major (B * L rows of H * 128). One warp. Inputs q, k, v (their
# addresses go into the maps); output tmaps.
_MAPS_SOURCE = r"""
  __shared__ __align__(128) unsigned maps[96];
  const int lane = threadIdx.x;
  maps[lane] = 0u;
  maps[lane + 32] = 0u;
  maps[lane + 64] = 0u;
  __syncwarp();
  const unsigned s0 = (unsigned)__cvta_generic_to_shared(maps);
  if (lane == 0) {  // boxes of 128 rows x 64 columns
    fd_tmap_fill<IS_BF16>(s0, q, Q_COLS, Q_ROWS, 2ull * Q_COLS, 128);
    fd_tmap_fill<IS_BF16>(s0 + 128, k, KV_COLS, KV_ROWS, 2ull * KV_COLS, 128);
    fd_tmap_fill<IS_BF16>(s0 + 256, v, KV_COLS, KV_ROWS, 2ull * KV_COLS, 128);
  }
  __syncwarp();
  const unsigned long long g = fd_maps_addr(tmaps);
#pragma unroll
  for (int i = 0; i < 3; ++i)
    asm volatile("tensormap.cp_fenceproxy.global.shared::cta.tensormap::generic.release.gpu.sync.aligned [%0], [%1], 128;"
                 :: "l"(g + 128 * i), "r"(s0 + 128 * i) : "memory");
"""

# The consumers' per-tile steps, shared with the persistent form (_attention_sm90_forms): they use o, sc,
# kb, a, m_run, l_run, corr, t, sl2, batch, NT, SKIP_UNMOVED and MAX_CHAINS of the kernel body around them.
# softmax and fetch_bias take `tail` as a compile-time flag, through on_tile: true only for the last key tile
# when Lk is not a multiple of BN. (As a run-time flag, ptxas kept its per-key tests in every tile: at LK = 4621
# the loop had 60 more FSEL and 35 more ISETP than at LK = 4736, nvcc 13.0 SASS, session 13.)
_CONSUMER_STEPS = r"""  // S_j's online softmax (sc[4c + e] is (row r0, key 8c + 2t + e), sc[4c + 2 + e] the same key, row
  // r0 + 8; m in log2 units), keys past Lk masked: sc becomes P_j (float), l and m updated, corr the
  // factor O must take once P_{j-1} V_{j-1} has landed
  // Each row's maximum over the tile is taken in MAX_CHAINS independent chains (chain (2c + e) % MAX_CHAINS),
  // then combined: max is exact in any order, and one chain of 32 dependent FMNMX per row held up the
  // exponentials behind it.
  auto row_max = [&](const float (&part)[MAX_CHAINS]) {
    float m = part[0];
#pragma unroll
    for (int i = 1; i < MAX_CHAINS; ++i) m = fmaxf(m, part[i]);
    return m;
  };
  auto softmax = [&](int j, auto tail_flag) {
    float mx[2] = {m_run[0], m_run[1]}, base[2];
    float part[2][MAX_CHAINS];
#pragma unroll
    for (int i = 0; i < MAX_CHAINS; ++i) part[0][i] = part[1][i] = NEG_INF;
    constexpr bool tail = decltype(tail_flag)::value;  // tile j reaches past Lk
    if (HAS_BIAS) {  // scores scaled and biased first: the row max is taken over those
#pragma unroll
      for (int c = 0; c < 16; ++c) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = j * BN + 8 * c + 2 * t + e, c4 = (2 * c + e) % MAX_CHAINS;
          const bool ok = !tail || key < LK;
          const float bias = ok ? kb[2 * c + e] * LOG2E : 0.0f;
          sc[4 * c + e] = ok ? sc[4 * c + e] * sl2 + bias : NEG_INF;
          sc[4 * c + 2 + e] = ok ? sc[4 * c + 2 + e] * sl2 + bias : NEG_INF;
          part[0][c4] = fmaxf(part[0][c4], sc[4 * c + e]);
          part[1][c4] = fmaxf(part[1][c4], sc[4 * c + 2 + e]);
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) mx[h] = fmaxf(mx[h], row_max(part[h]));
    } else {  // the row max over the raw scores (sl2 > 0), scaled once: p = 2^(s sl2 - m) by one fma
#pragma unroll
      for (int c = 0; c < 16; ++c) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = j * BN + 8 * c + 2 * t + e, c4 = (2 * c + e) % MAX_CHAINS;
          if (tail && key >= LK) sc[4 * c + e] = sc[4 * c + 2 + e] = NEG_INF;
          part[0][c4] = fmaxf(part[0][c4], sc[4 * c + e]);
          part[1][c4] = fmaxf(part[1][c4], sc[4 * c + 2 + e]);
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) mx[h] = fmaxf(mx[h], row_max(part[h]) * sl2);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      base[h] = mx[h] == NEG_INF ? 0.0f : mx[h];  // a row with no key yet: every p is 0, not NaN
      corr[h] = fd_exp2(m_run[h] - base[h]);
      m_run[h] = mx[h];
      l_run[h] *= corr[h];
    }
    const float mul = HAS_BIAS ? 1.0f : sl2;
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      sc[4 * c] = fd_exp2(fmaf(sc[4 * c], mul, -base[0]));
      sc[4 * c + 1] = fd_exp2(fmaf(sc[4 * c + 1], mul, -base[0]));
      sc[4 * c + 2] = fd_exp2(fmaf(sc[4 * c + 2], mul, -base[1]));
      sc[4 * c + 3] = fd_exp2(fmaf(sc[4 * c + 3], mul, -base[1]));
      l_run[0] += sc[4 * c] + sc[4 * c + 1];
      l_run[1] += sc[4 * c + 2] + sc[4 * c + 3];
    }
  };
  auto fetch_bias = [&](int j, auto tail_flag) {
    if (HAS_BIAS) {
      constexpr bool tail = decltype(tail_flag)::value;
#pragma unroll
      for (int c = 0; c < 16; ++c)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = j * BN + 8 * c + 2 * t + e;
          kb[2 * c + e] = !tail || key < LK ? kbias[(size_t)batch * LK + key] : 0.0f;
        }
    }
  };
  auto rescale_and_pack = [&]() {  // O *= corr; P_j (float) -> a
    // a warp none of whose 16 rows' maxima moved at this tile has corr == 1 on every row: O stays as it is
    // (bit for bit), and with SKIP_UNMOVED the warp skips the 64 multiplies
    if (!SKIP_UNMOVED || __any_sync(0xffffffffu, corr[0] != 1.0f || corr[1] != 1.0f)) {
#pragma unroll
      for (int c = 0; c < 16; ++c) {
        o[4 * c] *= corr[0];
        o[4 * c + 1] *= corr[0];
        o[4 * c + 2] *= corr[1];
        o[4 * c + 3] *= corr[1];
      }
    }
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      a[c >> 1][(c & 1) * 2] = fd_pack2<T>(sc[4 * c], sc[4 * c + 1]);
      a[c >> 1][(c & 1) * 2 + 1] = fd_pack2<T>(sc[4 * c + 2], sc[4 * c + 3]);
    }
  };
  auto on_tile = [&](int j, auto step) {  // step(j, tail flag): the per-key tests only in a last, partial tile
    if (LK % BN != 0 && j == NT - 1) step(j, fd_flag<true>{});
    else step(j, fd_flag<false>{});
  };
  auto load_scores = [&](int j) {  // wait for K_j (S_j = Q K_j^T overwrites sc: no zeroing)
    fd_mbar_wait(fd_smem_addr(&k_full[j % STAGES]), (j / STAGES) & 1);
  };
"""

# Template (``main_template``): T, IS_BF16, H, HK, LQ, LK, HAS_BIAS, PINGPONG, SEQ_MAJOR (q, k, v and out (B, L, H, 128)
# in memory, else (B, H, L, 128)), SCALE_BITS (the softmax scale's float32 bits: a compile-time constant). Grid: x =
# query blocks of 128 rows (384 threads each), y = B * H. Inputs q, k, v (read through the maps), tmaps, scale (1,)
# float32 (read only by benchmarks/probe_attention_variants.py's scale_from_memory), kbias (B, Lk) or a dummy; output
# out (B, H, LQ, 128).
_SOURCE = r"""
  constexpr int BM = 128, BN = 128, STAGES = 2, CHUNK = 128 * 128;  // a chunk: 128 rows x 64 columns
  constexpr int Q_BYTES = 2 * CHUNK, TILE_BYTES = 2 * CHUNK;        // Q; one K or V tile
  constexpr int NT = (LK + BN - 1) / BN;
  // the last P V's k16 steps: the last tile's keys up to LK (P is 0 past it), 16 per step
  constexpr int LAST_PV_STEPS = LK % BN == 0 ? BN / 16 : (LK % BN + 15) / 16;
  // rescale_and_pack: O *= corr on every tile. The per-warp skip (true: a vote per tile) was bit-identical but measured
  // slower on the H200 (session 14, benchmarks/probe_attention_variants.py: 0.507-0.514 ms against 0.527-0.551 at
  // 4608 tokens, 5.32-5.37 against 5.38-5.41 at 16384)
  constexpr bool SKIP_UNMOVED = false;
  constexpr int MAX_CHAINS = 4;  // softmax: independent max chains per row
  constexpr float LOG2E = 1.4426950408889634f;
  const float NEG_INF = __int_as_float(0xff800000);
  extern __shared__ __align__(1024) unsigned char fd_smem_raw[];
  __shared__ __align__(8) unsigned long long q_bar, k_full[STAGES], k_empty[STAGES], v_full[STAGES], v_empty[STAGES];
  unsigned char* fd_smem = fd_smem_raw + ((1024u - (fd_smem_addr(fd_smem_raw) & 1023u)) & 1023u);
  const unsigned smem_base = fd_smem_addr(fd_smem);  // Q, K stages, V stages
  const unsigned k_base = smem_base + Q_BYTES, v_base = k_base + STAGES * TILE_BYTES;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int m0 = blockIdx.x * BM, bh = blockIdx.y, batch = bh / H;
  const int kv_bh = batch * HK + (bh % H) / (H / HK);
  // where this head's tiles sit in the maps: (column of head dim 0, row of position 0)
  const int q_col = SEQ_MAJOR ? (bh % H) * 128 : 0, q_row = SEQ_MAJOR ? batch * LQ : bh * LQ;
  const int kv_col = SEQ_MAJOR ? (kv_bh % HK) * 128 : 0, kv_row = SEQ_MAJOR ? batch * LK : kv_bh * LK;
  const unsigned long long maps = fd_maps_addr(tmaps);
  if (tid == 0) {
    fd_mbar_init(fd_smem_addr(&q_bar), 1);
    for (int s = 0; s < STAGES; ++s) {
      fd_mbar_init(fd_smem_addr(&k_full[s]), 1);  // the TMA thread's expect_tx arrival
      fd_mbar_init(fd_smem_addr(&v_full[s]), 1);
      fd_mbar_init(fd_smem_addr(&k_empty[s]), 8);  // each consumer warp
      fd_mbar_init(fd_smem_addr(&v_empty[s]), 8);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warp >= 8) {  // producer warpgroup: gives registers to the consumers; one thread issues every load
    fd_regs_producer();
    if (tid == 256) {
      fd_acquire_map(maps);
      fd_acquire_map(maps + 128);
      fd_acquire_map(maps + 256);
      const unsigned qb = fd_smem_addr(&q_bar);
      fd_mbar_expect_tx(qb, Q_BYTES);
      fd_tma_load(smem_base, maps, q_col, q_row + m0, qb);
      fd_tma_load(smem_base + CHUNK, maps, q_col + 64, q_row + m0, qb);
      for (int j = 0; j < NT; ++j) {  // K_j into its stage, then V_j: each waits for its own stage
        const int s = j % STAGES, phase = ((j / STAGES) & 1) ^ 1;
        const unsigned kf = fd_smem_addr(&k_full[s]), vf = fd_smem_addr(&v_full[s]);
        const unsigned kd = k_base + s * TILE_BYTES, vd = v_base + s * TILE_BYTES;
        fd_mbar_wait(fd_smem_addr(&k_empty[s]), phase);
        fd_mbar_expect_tx(kf, TILE_BYTES);
        fd_tma_load(kd, maps + 128, kv_col, kv_row + j * BN, kf);               // K, head dims 0..63
        fd_tma_load(kd + CHUNK, maps + 128, kv_col + 64, kv_row + j * BN, kf);  // K, head dims 64..127
        fd_mbar_wait(fd_smem_addr(&v_empty[s]), phase);
        fd_mbar_expect_tx(vf, TILE_BYTES);
        fd_tma_load(vd, maps + 256, kv_col, kv_row + j * BN, vf);               // V, head dims 0..63
        fd_tma_load(vd + CHUNK, maps + 256, kv_col + 64, kv_row + j * BN, vf);  // V, head dims 64..127
      }
    }
    return;
  }

  // consumers: warpgroup wg owns query rows wg * 64 .. + 63; this thread rows r0 and r0 + 8 of them.
  // Per tile j: S_j = Q K_j^T and O += P_{j-1} V_{j-1} are issued together, then S_j's softmax runs while
  // P_{j-1} V_{j-1} is still in flight (O is rescaled only once it has landed). With PINGPONG the two
  // warpgroups take turns issuing (named barriers 2 and 3), so one's softmax overlaps the other's MMAs.
  fd_regs_consumer();
  const int wg = warp >> 2, t = lane & 3;
  const int r0 = wg * 64 + (warp & 3) * 16 + (lane >> 2);
  const float sl2 = __int_as_float(SCALE_BITS) * LOG2E;  // not scale[0]: a read per CTA of a host-written array
  float o[64], sc[64];
  float kb[32];  // tile j's key bias (HAS_BIAS), loaded before its scores are waited for
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = sc[i] = 0.0f;  // sc defined once: each S MMA overwrites it
  float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.0f, 0.0f}, corr[2];
  unsigned a[8][4];  // P_{j-1} as the A fragments of O += P V: keys 16 kk .. 16 kk + 15
  const unsigned q_addr = smem_base + wg * 64 * 128;
""" + _CONSUMER_STEPS + r"""  if (PINGPONG && wg == 1) fd_bar_arrive(2);  // warpgroup 0 issues first
  fd_mbar_wait(fd_smem_addr(&q_bar), 0);
  // tile 0: S_0 alone
  on_tile(0, fetch_bias);
  load_scores(0);
  if (PINGPONG) fd_bar_sync(2 + wg);
  fd_mma_ss128<IS_BF16>(sc, q_addr, k_base, CHUNK);
  if (PINGPONG) fd_bar_arrive(3 - wg);
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  fd_fence64(sc);
  if (lane == 0) fd_mbar_arrive(fd_smem_addr(&k_empty[0]));
  on_tile(0, softmax);
  rescale_and_pack();
  // tile j >= 1: S_j and P_{j-1} V_{j-1} in flight together. A partial last tile is a compile-time copy of its own
  // (`last`), after the loop: only it takes the per-key tests (the loop had them behind a branch on j in every tile:
  // 673 SASS instructions per tile at LK 4621, now 513; 514 at 4736). (Its S over only the first 16..64 keys, by a
  // narrower wgmma, made ptxas serialize every wgmma of the kernel: "insufficient register resources", nvcc 13.0.)
  auto step = [&](int j, auto last_flag) {
    constexpr bool last = decltype(last_flag)::value, tail = last && LK % BN != 0;
    const int s = j % STAGES, sp = (j - 1) % STAGES;
    fetch_bias(j, fd_flag<tail>{});
    load_scores(j);
    fd_mbar_wait(fd_smem_addr(&v_full[sp]), ((j - 1) / STAGES) & 1);
    if (PINGPONG) fd_bar_sync(2 + wg);
    fd_mma_ss128<IS_BF16>(sc, q_addr, k_base + s * TILE_BYTES, CHUNK);
    fd_fence64(o);
    fd_mma_rs128<IS_BF16>(o, a, v_base + sp * TILE_BYTES, CHUNK);
    if (PINGPONG) fd_bar_arrive(3 - wg);
    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");  // S_j has landed
    fd_fence64(sc);
    if (lane == 0) fd_mbar_arrive(fd_smem_addr(&k_empty[s]));
    softmax(j, fd_flag<tail>{});
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");  // P_{j-1} V_{j-1} has landed
    fd_fence64(o);
    if (lane == 0) fd_mbar_arrive(fd_smem_addr(&v_empty[sp]));
    rescale_and_pack();
  };
  constexpr int LOOP_END = LK % BN != 0 ? NT - 1 : NT;  // an aligned LK has no last-tile copy
  for (int j = 1; j < LOOP_END; ++j) step(j, fd_flag<false>{});
  if (LK % BN != 0 && NT > 1) step(NT - 1, fd_flag<true>{});
  // the last P V, over the last tile's keys up to LK only (warpgroup 1 gives no turn after it: its partner has none
  // left to take)
  fd_mbar_wait(fd_smem_addr(&v_full[(NT - 1) % STAGES]), ((NT - 1) / STAGES) & 1);
  if (PINGPONG) fd_bar_sync(2 + wg);
  fd_fence64(o);
  fd_mma_rs128<IS_BF16, LAST_PV_STEPS>(o, a, v_base + ((NT - 1) % STAGES) * TILE_BYTES, CHUNK);
  if (PINGPONG && wg == 0) fd_bar_arrive(3);
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  fd_fence64(o);
  // O / l: l summed over the 4 lanes of each row
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
    l_run[h] = l_run[h] > 0.0f ? 1.0f / l_run[h] : 0.0f;
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = m0 + r0 + 8 * h;
    if (row < LQ) {
      T* dst = out + (SEQ_MAJOR ? ((size_t)(batch * LQ + row) * H + bh % H) * 128 : ((size_t)bh * LQ + row) * 128) + 2 * t;
#pragma unroll
      for (int c = 0; c < 16; ++c)
        *reinterpret_cast<unsigned*>(dst + 8 * c) = fd_pack2<T>(o[4 * c + 2 * h] * l_run[h], o[4 * c + 2 * h + 1] * l_run[h]);
    }
  }
"""


@functools.cache
def _maps_kernel():
    return cuda_kernel(name="flashdiff_attention_sm90_maps", input_names=["q", "k", "v"],
                       output_names=["tmaps"], source=_MAPS_SOURCE, header=_MAP_HEADER)


def scale_input(scale: float) -> mx.array:
    """The (1,) float32 array passed as the main kernel's `scale` input (read only by the probe's scale_from_memory
    variant) and as its dummy bias: made from host data, so no kernel launch. MLX's CUDA allocator keeps host-made
    arrays in managed memory; benchmarks/probe_attention_dispatch.py's "device scalar" replaces this function to see
    whether such an input costs anything at launch."""
    return mx.array([scale], dtype=mx.float32)


def main_template(dtype, h, hk, lq, lk, has_bias, pingpong, seq_major, scale, bh=None):
    """The main kernel's template values (the persistent form's with bh = B * H)."""
    template = [("T", dtype), ("IS_BF16", dtype == mx.bfloat16), ("H", h), ("HK", hk), ("LQ", lq), ("LK", lk),
                ("HAS_BIAS", has_bias), ("PINGPONG", pingpong), ("SEQ_MAJOR", seq_major), ("SCALE_BITS", float_bits(scale))]
    return template + ([("BH", bh)] if bh is not None else [])


def main_kernel(name: str, source: str, header: str, persistent: bool):
    """The main kernel built from `source` / `header` with the launcher's inputs, output and shared memory (the
    shipped sources through ``_kernel``; benchmarks/probe_attention_variants.py builds edited ones)."""
    from ._attention_sm90_forms import SMEM_BYTES_PERSISTENT

    return cuda_kernel(name=name, input_names=["q", "k", "v", "tmaps", "scale", "kbias"], output_names=["out"],
                       source=source, header=header,
                       shared_memory=SMEM_BYTES_PERSISTENT if persistent else SMEM_BYTES)


@functools.cache
def _kernel(persistent: bool = False):
    if persistent:
        from ._attention_sm90_forms import _SOURCE_PERSISTENT
        return main_kernel("flashdiff_attention_sm90_persistent", _SOURCE_PERSISTENT, _HEADER, True)
    return main_kernel("flashdiff_attention_sm90", _SOURCE, _HEADER, False)


def tensor_maps(q, k, v, seq_major=False):
    """The maps kernel's output for contiguous q, k, v: their three TMA tensor maps (the arrays' addresses inside)."""
    b, h, lq = (q.shape[0], q.shape[2], q.shape[1]) if seq_major else q.shape[:3]
    hk, lk = (k.shape[2], k.shape[1]) if seq_major else k.shape[1:3]
    cols = (h * D, hk * D) if seq_major else (D, D)
    rows = (b * lq, b * lk) if seq_major else (b * h * lq, b * hk * lk)
    (maps,) = _maps_kernel()(
        inputs=[q, k, v], template=[("T", q.dtype), ("IS_BF16", q.dtype == mx.bfloat16), ("Q_COLS", cols[0]),
                                    ("Q_ROWS", rows[0]), ("KV_COLS", cols[1]), ("KV_ROWS", rows[1])],
        output_shapes=[(MAP_BYTES,)], output_dtypes=[mx.uint8], grid=(32, 1, 1), threadgroup=(32, 1, 1),
    )
    return maps


def flash_attention_sm90(q, k, v, scale, key_bias=None, pingpong=True, seq_major=False, persistent=False, _maps=None):
    """Head-major: q (B, H, Lq, 128), k / v (B, Hk, Lk, 128) -> (B, H, Lq, 128). seq_major: q (B, Lq, H, 128),
    k / v (B, Lk, Hk, 128) -> (B, Lq, H, 128), the layout the models' fused q/k/v projections give
    (no transposes). bf16 / fp16; key_bias None or (B, Lk) additive float.
    pingpong: the two consumer warpgroups take turns issuing their MMAs (FlashAttention-3's schedule).
    persistent: one CTA per SM walks the tiles (``_attention_sm90_forms``; exact on the H200, measured no faster, opt-in).
    The scale is compiled into the kernel (SCALE_BITS): each distinct value builds its own kernel once.
    _maps: ``tensor_maps`` of these very (contiguous) arrays, made earlier (benchmarks/probe_attention_dispatch.py
    times the main kernel alone this way); None: made here, a kernel launch ahead of the main one."""
    if seq_major:
        b, lq, h, d = q.shape
        lk, hk = k.shape[1], k.shape[2]
    else:
        b, h, lq, d = q.shape
        hk, lk = k.shape[1], k.shape[2]
    if d != D or q.dtype not in (mx.bfloat16, mx.float16) or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"flash_attention_sm90 supports head dim 128 in bf16/f16, got D={d}, {q.dtype}, "
                         f"{k.dtype}, {v.dtype}.")
    if key_bias is not None and tuple(key_bias.shape) != (b, lk):
        raise ValueError(f"key_bias must be (B, Lk) = {(b, lk)}, got {tuple(key_bias.shape)}.")
    # one contiguous copy for both kernels: the maps hold these arrays' addresses
    q, k, v = (mx.contiguous(a) for a in (q, k, v))
    maps = tensor_maps(q, k, v, seq_major) if _maps is None else _maps
    if key_bias is None and not scale > 0:  # the unbiased softmax takes its row max before scaling
        key_bias = mx.zeros((b, lk), mx.float32)
    scale_arr = scale_input(scale)  # also the dummy bias
    bias = scale_arr if key_bias is None else key_bias.astype(mx.float32)
    template = main_template(q.dtype, h, hk, lq, lk, key_bias is not None, pingpong, seq_major, scale,
                             b * h if persistent else None)
    tiles = math.ceil(lq / BM) * b * h
    if persistent:
        grid = (min(num_sms(), tiles) * THREADS, 1, 1)
    else:
        grid = (math.ceil(lq / BM) * THREADS, b * h, 1)
    (out,) = _kernel(persistent)(
        inputs=[q, k, v, maps, scale_arr, bias], template=template,
        output_shapes=[q.shape], output_dtypes=[q.dtype], grid=grid, threadgroup=(THREADS, 1, 1),
    )
    return out
