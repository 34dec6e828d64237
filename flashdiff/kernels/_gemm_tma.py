"""The sm_90 grouped GEMM with both operands loaded by TMA (engine "wgmma tma").

Same contract and tiles as ``_gemm_sm90`` (128 x 256 x 64, two consumer warpgroups issuing
``wgmma.m64n256k16`` from 128B-swizzled shared tiles, grouped raster, shared-memory epilogue that
writes each slot's row), with a third, producer warpgroup of which one thread works:
- per stage it issues two ``cp.async.bulk.tensor.2d`` (TMA) loads, the input tile (128 rows x 64 k)
  and the weight tile (256 rows x 64 k of the tile's expert); the tensor-memory unit writes the
  128B-swizzled layout the wgmma descriptors read, zero-fills past K and past the tensors' last
  rows, and completes a "full" mbarrier with the bytes written. No thread spends issue slots or
  registers on addresses, which is what held the cp.async kernels at ~480 TFLOP/s;
- consumers keep one wgmma group in flight and release the previous stage on its "empty" mbarrier.
TMA reads boxes of consecutive rows, so for the grouped (MoE) form a small kernel first gathers x's
routed rows into slot order (``gather_slots``: tiles * 128 rows of K, 16-byte copies); the dense form
reads x as it is.

Tensor maps (the 128-byte descriptors TMA reads) are normally encoded on the host by the driver;
``mx.fast.cuda_kernel`` gives no host hook, so one warp encodes them on the device (warp 0 of the
gather kernel, or a one-warp kernel ``tensor_maps`` for the dense form): a zeroed map in shared
memory, every field set with ``tensormap.replace``, copied to global memory with a release fence;
the GEMM acquires it (``fence.proxy.tensormap``) before use. Hopper only (sm_90a PTX).
Measured on the H200 (benchmarks/README.md): 596-702 TFLOP/s on dense problems at M >= 4608 (MLX's
cuBLAS GEMM 0.86-1.01x of it on the same leases), bit-identical to MLX's GEMM; the cp.async kernels
of ``_gemm_sm90`` reached 456-505. Nsight Compute at the MoE shape (session 5): this kernel keeps the
tensor pipe 75.6% busy (446 us at 1.65 GHz) where cuBLAS's 192x192, 2x1-cluster kernel for the dense
GEMM of the same FLOPs keeps it 90.6% busy (370 us at 1.62 GHz).

``_SOURCE_PERSISTENT`` (engines "wgmma persistent" and "wgmma persistent gather", opt-in): one CTA
per multiprocessor walks the tiles, the producer's stage ring running on across tiles, and the
epilogue stores straight from registers; the gather form copies x's routed rows with cp.async in
the producer warpgroup instead of running ``gather_slots``. Both are exact (GPU tests) but measured
no faster: 456 us for the same MoE GEMM under Nsight Compute, and within the run-to-run noise of
this kernel in the benchmarks (benchmarks/README.md, session 5), so the per-CTA kernel stays default.

``_SOURCE_CLUSTER`` (engine "wgmma cluster", opt-in, **never yet run on a GPU**: compiled with nvcc
only): 2-CTA clusters over pairs of row tiles that share one weight tile through TMA multicast (see the
comment above the source).
"""

import functools
import os

import mlx.core as mx

from ._gemm_cuda import TILE_SETUP
from ._gemm_sm90 import _EPILOGUE_CONSUMERS, _HEADER, BN, BK, BM, STAGES

THREADS = 384  # two consumer warpgroups + one producer warpgroup
SMEM_BYTES = STAGES * (BM + BN) * BK * 2 + 1024
MAP_BYTES = 3 * 128  # two 128-byte maps + room to align them to 128 bytes

_MAP_HEADER = r"""
// Fill a zeroed 2D tile-mode tensor map in shared memory: a row-major (rows, cols) tensor of 2-byte
// elements, row_bytes apart, read in boxes of box_rows x 64 columns with the 128-byte swizzle.
template <bool BF16>
__device__ void fd_tmap_fill(unsigned map, const void* base, unsigned cols, unsigned rows,
                             unsigned long long row_bytes, unsigned box_rows) {
  asm volatile("tensormap.replace.tile.global_address.shared::cta.b1024.b64 [%0], %1;" :: "r"(map), "l"(base) : "memory");
  asm volatile("tensormap.replace.tile.rank.shared::cta.b1024.b32 [%0], 1;" :: "r"(map) : "memory");  // rank - 1
  asm volatile("tensormap.replace.tile.global_dim.shared::cta.b1024.b32 [%0], 0, %1;" :: "r"(map), "r"(cols) : "memory");
  asm volatile("tensormap.replace.tile.global_dim.shared::cta.b1024.b32 [%0], 1, %1;" :: "r"(map), "r"(rows) : "memory");
  asm volatile("tensormap.replace.tile.global_stride.shared::cta.b1024.b64 [%0], 0, %1;" :: "r"(map), "l"(row_bytes) : "memory");
  asm volatile("tensormap.replace.tile.box_dim.shared::cta.b1024.b32 [%0], 0, 64;" :: "r"(map) : "memory");
  asm volatile("tensormap.replace.tile.box_dim.shared::cta.b1024.b32 [%0], 1, %1;" :: "r"(map), "r"(box_rows) : "memory");
  asm volatile("tensormap.replace.tile.element_stride.shared::cta.b1024.b32 [%0], 0, 1;" :: "r"(map) : "memory");
  asm volatile("tensormap.replace.tile.element_stride.shared::cta.b1024.b32 [%0], 1, 1;" :: "r"(map) : "memory");
  if (BF16) asm volatile("tensormap.replace.tile.elemtype.shared::cta.b1024.b32 [%0], 10;" :: "r"(map) : "memory");
  else asm volatile("tensormap.replace.tile.elemtype.shared::cta.b1024.b32 [%0], 6;" :: "r"(map) : "memory");
  asm volatile("tensormap.replace.tile.interleave_layout.shared::cta.b1024.b32 [%0], 0;" :: "r"(map) : "memory");
  asm volatile("tensormap.replace.tile.swizzle_mode.shared::cta.b1024.b32 [%0], 3;" :: "r"(map) : "memory");  // 128B
  asm volatile("tensormap.replace.tile.fill_mode.shared::cta.b1024.b32 [%0], 0;" :: "r"(map) : "memory");    // zeros
}
// The maps live in a byte buffer at the first 128-byte boundary.
__device__ __forceinline__ unsigned long long fd_maps_addr(const void* buf) {
  return ((unsigned long long)buf + 127) & ~127ull;
}
"""


def _maps_code(a: str, a_rows: str) -> str:
    """One warp encodes the GEMM's tensor maps into `tmaps`: map 0 = `a` as (a_rows, K), boxes of 128
    rows; map 1 = w as (W_ROWS = E * N, K), boxes of B_BOX rows (256; 128 for the cluster form)."""
    return r"""
  {
    __shared__ __align__(128) unsigned maps[64];
    const int lane = threadIdx.x & 31;
    maps[lane] = 0u;
    maps[lane + 32] = 0u;
    __syncwarp();
    const unsigned s0 = (unsigned)__cvta_generic_to_shared(maps);
    if (lane == 0) {
      fd_tmap_fill<IS_BF16>(s0, A_PTR, K, A_ROWS, 2ull * K, 128);
      fd_tmap_fill<IS_BF16>(s0 + 128, w, K, W_ROWS, 2ull * K, B_BOX);
    }
    __syncwarp();
    const unsigned long long g = fd_maps_addr(tmaps);
    asm volatile("tensormap.cp_fenceproxy.global.shared::cta.tensormap::generic.release.gpu.sync.aligned [%0], [%1], 128;"
                 :: "l"(g), "r"(s0) : "memory");
    asm volatile("tensormap.cp_fenceproxy.global.shared::cta.tensormap::generic.release.gpu.sync.aligned [%0], [%1], 128;"
                 :: "l"(g + 128), "r"(s0 + 128) : "memory");
  }
""".replace("A_PTR", a).replace("A_ROWS", a_rows)


_MAPS_SOURCE = _maps_code("x", "X_ROWS")  # dense form: launched with one warp

# Grouped form: xs[s] = x[slot_row[s] / A_DIV] for every slot naming a row, CPT 16-byte chunks per
# thread (empty slots are left as they are: their products are never stored); warp 0 of block 0
# first encodes the maps over xs and w.
_GATHER_SOURCE = r"""
  if (blockIdx.x == 0 && threadIdx.x < 32)
""" + _maps_code("xs", "SLOTS") + r"""
  constexpr int CHUNKS = K / 8, SPAN = CHUNKS / CPT;  // a thread copies chunks c, c + SPAN, ...
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (size_t)SLOTS * SPAN) return;
  const int s = i / SPAN, c = i % SPAN, r = slot_row[s];
  if (r < 0) return;
  const uint4* src = reinterpret_cast<const uint4*>(x + (size_t)(r / A_DIV) * K) + c;
  uint4* dst = reinterpret_cast<uint4*>(xs + (size_t)s * K) + c;
  uint4 v[CPT];
#pragma unroll
  for (int j = 0; j < CPT; ++j) v[j] = src[j * SPAN];
#pragma unroll
  for (int j = 0; j < CPT; ++j) dst[j * SPAN] = v[j];
"""

_GEMM_HEADER = _HEADER + _MAP_HEADER + r"""
__device__ __forceinline__ void fd_mbar_expect_tx(unsigned bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void fd_tma_load(unsigned dst, unsigned long long map, int col, int row, unsigned bar) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
               :: "r"(dst), "l"(map), "r"(col), "r"(row), "r"(bar) : "memory");
}
__device__ __forceinline__ void fd_acquire_map(unsigned long long map) {
  asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;\n" :: "l"(map) : "memory");
}
// two floats rounded to T (bf16 / fp16), packed low then high: one 4-byte store
template <typename T>
__device__ __forceinline__ unsigned fd_pack2(float lo, float hi) {
  __align__(4) T h[2] = {(T)lo, (T)hi};
  return *reinterpret_cast<const unsigned*>(h);
}
"""

_SOURCE = r"""
  constexpr int BM = 128, BN = 256, BK = 64, STAGES = 4;
  constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2, STAGE_BYTES = A_BYTES + B_BYTES;
  extern __shared__ __align__(1024) unsigned char fd_smem_raw[];
  __shared__ __align__(8) unsigned long long full_bar[STAGES], empty_bar[STAGES];
  __shared__ int slot_rows[BM];
  unsigned char* fd_smem = fd_smem_raw + ((1024u - (fd_smem_addr(fd_smem_raw) & 1023u)) & 1023u);
  const unsigned smem_base = fd_smem_addr(fd_smem);
""" + TILE_SETUP + r"""
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const unsigned long long maps = fd_maps_addr(tmaps);
  // Never read. Register allocation: with this loop ptxas (nvcc 13.0) gives the TMA form 154 registers;
  // without it, or with the epilogue reading these instead of slot_of, 201-203: over the 170 that each
  // of 384 threads may have, and the launch would fail (tests/test_cuda_sources.py checks the count).
  for (int r = tid; r < BM; r += blockDim.x) slot_rows[r] = slot_of(tile_m * BM + r);
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      fd_mbar_init(fd_smem_addr(&full_bar[s]), 1);     // the TMA thread's expect_tx arrival
      fd_mbar_init(fd_smem_addr(&empty_bar[s]), 256);  // every consumer thread
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  constexpr int KT = (K + BK - 1) / BK;

  if (warp >= 8) {  // producer warpgroup: one thread issues both loads of each stage
    if (tid == 256) {
      fd_acquire_map(maps);
      fd_acquire_map(maps + 128);
      const int b_row = expert * N + tile_n * BN;
      for (int kt = 0; kt < KT; ++kt) {
        const int s = kt % STAGES;
        const unsigned full = fd_smem_addr(&full_bar[s]), a_dst = smem_base + s * STAGE_BYTES;
        fd_mbar_wait(fd_smem_addr(&empty_bar[s]), ((kt / STAGES) & 1) ^ 1);
        fd_mbar_expect_tx(full, STAGE_BYTES);
        fd_tma_load(a_dst, maps, kt * BK, tile_m * BM, full);
        fd_tma_load(a_dst + A_BYTES, maps + 128, kt * BK, b_row, full);
      }
    }
    return;
  }

  // consumers: warpgroup wg owns rows wg * 64 .. + 63 of the tile
  const int wg = warp >> 2, warp_in_wg = warp & 3;
  float d[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) d[i] = 0.0f;
  for (int kt = 0; kt < KT; ++kt) {
    const int s = kt % STAGES;
    fd_mbar_wait(fd_smem_addr(&full_bar[s]), (kt / STAGES) & 1);
    const unsigned a_addr = smem_base + s * STAGE_BYTES + wg * 64 * 128, b_addr = smem_base + s * STAGE_BYTES + A_BYTES;
    fd_wgmma_tile<IS_BF16, BK / 16>(d, a_addr, b_addr);
    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");  // tile kt - 1 is done with its stage
    fd_fence_acc(d);
    if (kt > 0) fd_mbar_arrive(fd_smem_addr(&empty_bar[(kt - 1) % STAGES]));
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  fd_fence_acc(d);
  asm volatile("bar.sync 1, 256;\n" ::: "memory");  // both warpgroups done reading the stages
""" + _EPILOGUE_CONSUMERS


# Persistent form (engine "wgmma persistent"): one CTA per SM walks the tiles t = blockIdx.x,
# + gridDim.x, ... in the same grouped-raster order. The producer's stage ring runs on across tiles,
# so the loads of tile i + 1 are in flight while the consumers finish tile i and write it; the
# epilogue stores each thread's accumulator pairs straight to the slots' rows (4-byte stores; no
# shared-memory round trip, so the stages stay the producer's). Same MMA block and barriers as above;
# the last stage of each tile is released after the final wgmma wait.
_SOURCE_PERSISTENT = r"""
  constexpr int BM = 128, BN = 256, BK = 64, STAGES = 4;
  constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2, STAGE_BYTES = A_BYTES + B_BYTES;
  constexpr int TILES_N = (N + BN - 1) / BN, TILES_ALL = TILES_M * TILES_N, KT = (K + BK - 1) / BK;
  extern __shared__ __align__(1024) unsigned char fd_smem_raw[];
  __shared__ __align__(8) unsigned long long full_bar[STAGES], empty_bar[STAGES];
  unsigned char* fd_smem = fd_smem_raw + ((1024u - (fd_smem_addr(fd_smem_raw) & 1023u)) & 1023u);
  const unsigned smem_base = fd_smem_addr(fd_smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const unsigned long long maps = fd_maps_addr(tmaps);
  // tile t -> (row tile, column tile): groups of GROUP_M row tiles, column-major inside a group
  auto coords = [](int t, int& tile_m, int& tile_n) {
    const int first_m = t / (GROUP_M * TILES_N) * GROUP_M, group_m = min(TILES_M - first_m, GROUP_M);
    const int r = t % (GROUP_M * TILES_N);
    tile_m = first_m + r % group_m;
    tile_n = r / group_m;
  };
  auto slot_of = [&](int s) -> int { return DIRECT ? (s < M_ROWS ? s : -1) : slot_row[s]; };
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      // the TMA thread's expect_tx arrival (+ one cp.async arrival per producer thread)
      fd_mbar_init(fd_smem_addr(&full_bar[s]), GATHER_A ? 129 : 1);
      fd_mbar_init(fd_smem_addr(&empty_bar[s]), 256);  // every consumer thread
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warp >= 8) {  // producer warpgroup, tile after tile
    // GATHER_A: all 128 threads copy the input tile from x's routed rows with cp.async (chunk kc of
    // rows r0 + 16 i, 128B-swizzled as TMA would write it) and arrive when their copies land; thread
    // 256 also issues the weight tile's TMA. Otherwise thread 256 alone issues both TMA loads.
    const int p = tid - 256, kc = p & 7, r0 = p >> 3;
    if (!GATHER_A && p != 0) return;
    if (p == 0) {
      fd_acquire_map(maps);
      fd_acquire_map(maps + 128);
    }
    int it = 0;  // stages issued so far (the ring position runs on across tiles)
    for (int t = blockIdx.x; t < TILES_ALL; t += gridDim.x) {
      int tile_m, tile_n;
      coords(t, tile_m, tile_n);
      const int expert = DIRECT ? 0 : tile_expert[tile_m];
      if (expert < 0) continue;
      const int b_row = expert * N + tile_n * BN;
      int src[GATHER_A ? BM / 16 : 1];
      if (GATHER_A) {
#pragma unroll
        for (int i = 0; i < BM / 16; ++i) {
          const int slot = slot_of(tile_m * BM + r0 + 16 * i);
          src[i] = slot < 0 ? -1 : slot / A_DIV;
        }
      }
      for (int kt = 0; kt < KT; ++kt, ++it) {
        const int s = it % STAGES;
        const unsigned full = fd_smem_addr(&full_bar[s]), a_dst = smem_base + s * STAGE_BYTES;
        fd_mbar_wait(fd_smem_addr(&empty_bar[s]), ((it / STAGES) & 1) ^ 1);
        if (p == 0) {
          fd_mbar_expect_tx(full, GATHER_A ? B_BYTES : STAGE_BYTES);
          if (!GATHER_A) fd_tma_load(a_dst, maps, kt * BK, tile_m * BM, full);
          fd_tma_load(a_dst + A_BYTES, maps + 128, kt * BK, b_row, full);
        }
        if (GATHER_A) {
          const int k = kt * BK + kc * 8;
#pragma unroll
          for (int i = 0; i < BM / 16; ++i) {
            const int r = r0 + 16 * i;
            const bool ok = k < K && src[i] >= 0;
            fd_cp_async16(a_dst + r * 128 + ((kc ^ (r & 7)) << 4), ok ? x + (size_t)src[i] * K + k : x, ok);
          }
          fd_mbar_arrive_cp_async(full);
        }
      }
    }
    return;
  }

  // consumers: warpgroup wg owns rows wg * 64 .. + 63 of each tile
  const int wg = warp >> 2, warp_in_wg = warp & 3;
  const int row = wg * 64 + warp_in_wg * 16 + (lane >> 2), col0 = (lane & 3) * 2;
  float d[128];
  int it = 0;
  for (int t = blockIdx.x; t < TILES_ALL; t += gridDim.x) {
    int tile_m, tile_n;
    coords(t, tile_m, tile_n);
    if (!DIRECT && tile_expert[tile_m] < 0) continue;
#pragma unroll
    for (int i = 0; i < 128; ++i) d[i] = 0.0f;
    for (int kt = 0; kt < KT; ++kt, ++it) {
      const int s = it % STAGES;
      fd_mbar_wait(fd_smem_addr(&full_bar[s]), (it / STAGES) & 1);
      if (GATHER_A) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // cp.async wrote A
      const unsigned a_addr = smem_base + s * STAGE_BYTES + wg * 64 * 128, b_addr = smem_base + s * STAGE_BYTES + A_BYTES;
      fd_wgmma_tile<IS_BF16, BK / 16>(d, a_addr, b_addr);
      asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");  // stage it - 1 is read
      fd_fence_acc(d);
      if (kt > 0) fd_mbar_arrive(fd_smem_addr(&empty_bar[(it - 1) % STAGES]));
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    fd_fence_acc(d);
    fd_mbar_arrive(fd_smem_addr(&empty_bar[(it - 1) % STAGES]));
    // d[4j + {0,1}] is (row, 8j + col0 + {0,1}) of the tile, d[4j + {2,3}] the same 8 rows below
    const int dst0 = slot_of(tile_m * BM + row), dst1 = slot_of(tile_m * BM + row + 8);
    T* out0 = out + (size_t)(dst0 < 0 ? 0 : dst0) * N + tile_n * BN + col0;
    T* out1 = out + (size_t)(dst1 < 0 ? 0 : dst1) * N + tile_n * BN + col0;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      if (tile_n * BN + 8 * j + col0 < N) {
        if (dst0 >= 0) *reinterpret_cast<unsigned*>(out0 + 8 * j) = fd_pack2<T>(d[4 * j], d[4 * j + 1]);
        if (dst1 >= 0) *reinterpret_cast<unsigned*>(out1 + 8 * j) = fd_pack2<T>(d[4 * j + 2], d[4 * j + 3]);
      }
    }
  }
"""


# Cluster form (engine "wgmma cluster", opt-in, NOT YET RUN ON A GPU: written after the session-5
# profile showed cuBLAS's 2x1-cluster kernel keeping the tensor pipe 90.6% busy against this kernel's
# 75.6%, with 1.7x fewer DRAM bytes). CTAs 2c and 2c + 1 along x form a cluster computing row tiles
# 2p and 2p + 1 of one column tile. When both tiles use one expert, each CTA's producer loads its own
# input tile and half of the weight tile (128 rows), multicast into both CTAs' stage, so the pair
# reads the weight tile from L2 once; a stage is refilled only when the consumer warps of both CTAs
# have released it (one arrival per warp on each CTA's "empty" barrier, the peer's through mapa).
# Otherwise (a pair straddling two experts, or a skipped tile) each CTA loads its whole weight tile
# itself and nothing crosses CTAs. Every thread passes two cluster barriers: after the barriers are
# initialised, and before exit (no CTA leaves while its peer may still signal it).
_CLUSTER_HEADER = _GEMM_HEADER + r"""
__device__ __forceinline__ unsigned fd_cluster_rank() {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ void fd_cluster_sync() {
  asm volatile("barrier.cluster.arrive.aligned;\nbarrier.cluster.wait.aligned;\n" ::: "memory");
}
// arrive on the mbarrier at shared offset `bar` in CTA `rank` of this cluster
__device__ __forceinline__ void fd_mbar_arrive_cluster(unsigned bar, unsigned rank) {
  asm volatile("{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
               "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" :: "r"(bar), "r"(rank) : "memory");
}
// a TMA box written to offset `dst` of every CTA in `mask`, completing the mbarrier at `bar` in each
__device__ __forceinline__ void fd_tma_load_multicast(unsigned dst, unsigned long long map, int col, int row,
                                                      unsigned bar, unsigned short mask) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster"
               " [%0], [%1, {%2, %3}], [%4], %5;\n"
               :: "r"(dst), "l"(map), "r"(col), "r"(row), "r"(bar), "h"(mask) : "memory");
}
// mx.fast.cuda_kernel writes the kernel's signature itself: the cluster shape comes in through __global__
#undef __global__
#define __global__ __attribute__((global)) __cluster_dims__(2, 1, 1)
"""

_SOURCE_CLUSTER = r"""
  constexpr int BM = 128, BN = 256, BK = 64, STAGES = 4;
  constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2, STAGE_BYTES = A_BYTES + B_BYTES, B_HALF = B_BYTES / 2;
  constexpr int TILES_N = (N + BN - 1) / BN, KT = (K + BK - 1) / BK, GROUP_P = GROUP_M > 1 ? GROUP_M / 2 : 1;
  extern __shared__ __align__(1024) unsigned char fd_smem_raw[];
  __shared__ __align__(8) unsigned long long full_bar[STAGES], empty_bar[STAGES];
  unsigned char* fd_smem = fd_smem_raw + ((1024u - (fd_smem_addr(fd_smem_raw) & 1023u)) & 1023u);
  const unsigned smem_base = fd_smem_addr(fd_smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const unsigned rank = fd_cluster_rank(), peer = rank ^ 1u;
  // cluster c -> (pair of row tiles, column tile), grouped raster over pairs
  const int c = (blockIdx.y * gridDim.x + blockIdx.x) >> 1, pairs = gridDim.y;
  const int first_p = c / (GROUP_P * TILES_N) * GROUP_P, group_p = min(pairs - first_p, GROUP_P);
  const int pair = first_p + (c % (GROUP_P * TILES_N)) % group_p, tile_n = (c % (GROUP_P * TILES_N)) / group_p;
  const int tile_m = 2 * pair + (int)rank;
  auto expert_of = [&](int t) -> int { return t >= TILES_M ? -1 : (DIRECT ? 0 : tile_expert[t]); };
  const int expert = expert_of(tile_m);
  const bool shared_b = expert >= 0 && expert == expert_of(2 * pair + (int)peer);
  auto slot_of = [&](int s) -> int { return DIRECT ? (s < M_ROWS ? s : -1) : slot_row[s]; };
  const unsigned long long maps = fd_maps_addr(tmaps);
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      fd_mbar_init(fd_smem_addr(&full_bar[s]), 1);                     // the TMA thread's expect_tx arrival
      fd_mbar_init(fd_smem_addr(&empty_bar[s]), shared_b ? 16 : 8);  // each consumer warp reading the stage
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncwarp();
  fd_cluster_sync();  // both CTAs' barriers exist before either signals the other's

  if (expert >= 0 && warp >= 8) {  // producer warpgroup: one thread issues the loads of each stage
    if (tid == 256) {
      fd_acquire_map(maps);
      fd_acquire_map(maps + 128);
      const int b_row = expert * N + tile_n * BN;
      for (int kt = 0; kt < KT; ++kt) {
        const int s = kt % STAGES;
        const unsigned full = fd_smem_addr(&full_bar[s]), a_dst = smem_base + s * STAGE_BYTES;
        fd_mbar_wait(fd_smem_addr(&empty_bar[s]), ((kt / STAGES) & 1) ^ 1);
        fd_mbar_expect_tx(full, STAGE_BYTES);  // own input tile + both halves of the weight tile
        fd_tma_load(a_dst, maps, kt * BK, tile_m * BM, full);
        if (shared_b) {
          fd_tma_load_multicast(a_dst + A_BYTES + rank * B_HALF, maps + 128, kt * BK, b_row + (int)rank * (BN / 2),
                                full, (unsigned short)3);
        } else {
          fd_tma_load(a_dst + A_BYTES, maps + 128, kt * BK, b_row, full);
          fd_tma_load(a_dst + A_BYTES + B_HALF, maps + 128, kt * BK, b_row + BN / 2, full);
        }
      }
    }
    __syncwarp();
  } else if (expert >= 0) {  // consumers: warpgroup wg owns rows wg * 64 .. + 63 of the tile
    const int wg = warp >> 2, warp_in_wg = warp & 3;
    float d[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) d[i] = 0.0f;
    for (int kt = 0; kt < KT; ++kt) {
      const int s = kt % STAGES;
      fd_mbar_wait(fd_smem_addr(&full_bar[s]), (kt / STAGES) & 1);
      const unsigned a_addr = smem_base + s * STAGE_BYTES + wg * 64 * 128, b_addr = smem_base + s * STAGE_BYTES + A_BYTES;
      fd_wgmma_tile<IS_BF16, BK / 16>(d, a_addr, b_addr);
      asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");  // tile kt - 1 is done with its stage
      fd_fence_acc(d);
      if (kt > 0 && lane == 0) {
        const unsigned bar = fd_smem_addr(&empty_bar[(kt - 1) % STAGES]);
        fd_mbar_arrive(bar);
        if (shared_b) fd_mbar_arrive_cluster(bar, peer);
      }
      __syncwarp();
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    fd_fence_acc(d);
    asm volatile("bar.sync 1, 256;\n" ::: "memory");  // both warpgroups done reading the stages
""" + _EPILOGUE_CONSUMERS + r"""
  }
  __syncwarp();
  fd_cluster_sync();  // neither CTA leaves while the other may still signal its barriers
"""


@functools.cache
def _maps_kernel():
    return mx.fast.cuda_kernel(name="flashdiff_gemm_tensor_maps", input_names=["x", "w"], output_names=["tmaps"],
                               source=_MAPS_SOURCE, header=_MAP_HEADER)


@functools.cache
def _gather_kernel():
    return mx.fast.cuda_kernel(name="flashdiff_gather_slots", input_names=["x", "slot_row", "w"],
                               output_names=["xs", "tmaps"], source=_GATHER_SOURCE, header=_MAP_HEADER)


_FORMS = {"": (_SOURCE, _GEMM_HEADER), "_persistent": (_SOURCE_PERSISTENT, _GEMM_HEADER),
          "_cluster": (_SOURCE_CLUSTER, _CLUSTER_HEADER)}


@functools.cache
def _kernel(form: str = ""):
    source, header = _FORMS[form]
    return mx.fast.cuda_kernel(
        name="flashdiff_grouped_gemm_tma" + form, input_names=["x", "w", "slot_row", "tile_expert", "tmaps"],
        output_names=["out"], source=source, header=header, shared_memory=SMEM_BYTES,
    )


@functools.cache
def num_sms() -> int:
    """Multiprocessors, from the device name (MLX's device_info gives no count): 132 on H100 SXM / H200,
    114 on H100 PCIe, 78 on H20. The persistent grid is correct for any count; this only sizes it.
    FLASHDIFF_NUM_SMS overrides."""
    if os.environ.get("FLASHDIFF_NUM_SMS"):
        return int(os.environ["FLASHDIFF_NUM_SMS"])
    words = str(mx.device_info().get("device_name", "")).replace("-", " ").split()
    if "H20" in words:
        return 78
    return 114 if "H100" in words and "PCIe" in words else 132


def _map_template(x, w, b_box=BN):
    return [("IS_BF16", x.dtype == mx.bfloat16), ("K", x.shape[-1]), ("W_ROWS", w.shape[0] * w.shape[1]),
            ("B_BOX", b_box)]


def tensor_maps(x, w, stream=None, b_box=BN):
    """The dense form's TMA tensor maps, encoded on the device by one warp: (MAP_BYTES,) uint8 with
    x as (rows, K) and w (E, N, K) as (E * N, K) in boxes of b_box rows."""
    (maps,) = _maps_kernel()(
        inputs=[x, w], template=_map_template(x, w, b_box) + [("X_ROWS", x.shape[0])],
        output_shapes=[(MAP_BYTES,)], output_dtypes=[mx.uint8], grid=(32, 1, 1), threadgroup=(32, 1, 1),
        stream=stream,
    )
    return maps


def gather_slots(x, slot_row, a_div, w, stream=None, b_box=BN):
    """The grouped form's input: x's rows in slot order (slots * BM rows; rows of empty slots unset), so
    TMA reads each tile as one box, and the tensor maps over it and w (as ``tensor_maps``)."""
    slots, k = slot_row.shape[0], x.shape[-1]
    cpt = next(c for c in (4, 2, 1) if (k // 8) % c == 0)
    xs, maps = _gather_kernel()(
        inputs=[x, slot_row, w], template=[("T", x.dtype), ("SLOTS", slots), ("A_DIV", a_div), ("CPT", cpt)]
        + _map_template(x, w, b_box),
        output_shapes=[(slots, k), (MAP_BYTES,)], output_dtypes=[x.dtype, mx.uint8],
        grid=(max(slots * k // 8 // cpt, 32), 1, 1), threadgroup=(256, 1, 1), stream=stream,
    )
    return xs, maps


def cluster_grid(tiles: int, n: int):
    """The cluster form's grid in CTAs: x = 2 per column tile (one cluster), y = pairs of row tiles."""
    return 2 * ((n + BN - 1) // BN), (tiles + 1) // 2


def launch(x, w, slot_row, tile_expert, tiles, out_rows, template, direct, a_div, stream, form=""):
    """Run the TMA kernel with ``_gemm_cuda._launch``'s template: x is used as it is for the dense
    form (row s = slot s), gathered into slot order first for the grouped one. form: "" (one CTA per
    tile), "_persistent" / "_persistent_gather" (one CTA per multiprocessor walks the tiles; the gather
    form copies x's routed rows in the producer, no gather kernel) or "_cluster" (2-CTA clusters over
    pairs of row tiles sharing the weight tile)."""
    n = w.shape[1]
    gather_a = form == "_persistent_gather"
    b_box = BN // 2 if form == "_cluster" else BN
    if direct or gather_a:
        maps = tensor_maps(x, w, stream, b_box)
    else:
        x, maps = gather_slots(x, slot_row, a_div, w, stream, b_box)
    tiles_n = (n + BN - 1) // BN
    if form.startswith("_persistent"):
        template = template + [("TILES_M", tiles), ("GATHER_A", gather_a)]
        grid = (min(tiles * tiles_n, num_sms()) * THREADS, 1, 1)
    elif form == "_cluster":
        template = template + [("TILES_M", tiles)]
        gx, gy = cluster_grid(tiles, n)
        grid = (gx * THREADS, gy, 1)
    else:
        grid = (tiles_n * THREADS, tiles, 1)
    (out,) = _kernel(form.replace("_gather", ""))(
        inputs=[x, w, slot_row, tile_expert, maps], template=template, output_shapes=[(out_rows, n)],
        output_dtypes=[x.dtype], grid=grid, threadgroup=(THREADS, 1, 1), stream=stream,
    )
    return out
