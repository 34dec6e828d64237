"""The persistent form of the TMA GEMM (``_gemm_tma``): same tiles, MMA block, barriers and tensor maps.

``_SOURCE_PERSISTENT`` (engines "wgmma persistent" / "wgmma persistent gather"); ``_gemm_tma.launch`` runs
it (form="_persistent", "_persistent_gather"). Session 5: exact and no faster than the per-CTA kernel.
Session 10: the epilogue handed to storer warps (below); 7% faster than the per-CTA kernel on HiDream's
MoE GEMM under Nsight Compute, exact in the GPU tests, and the default engine on sm_90 since.

A 2-CTA cluster form (TMA multicast of the shared weight tile) was written in session 5 and removed in
session 6 after its first GPU runs: mx.fast.cuda_kernel gives no way to set a cluster launch attribute,
a compile-time ``__cluster_dims__`` kernel is invisible to MLX's check that keeps CUDA graphs with
cluster kernels from being updated in place (a later call of another kernel ran the cluster kernel),
and its results were wrong even with graphs off (benchmarks/results/cluster-gemm-h200-s6.json).
"""

from ._gemm_sm90 import BK, BM, BN

# three stages of A and B + the epilogue buffer (BM rows of BN + 8) + room to align to 1024 bytes
SMEM_BYTES_PERSISTENT = 3 * (BM + BN) * BK * 2 + BM * (BN + 8) * 2 + 1024

# Persistent form (engines "wgmma persistent" / "... gather"): one CTA per SM walks the tiles t = blockIdx.x,
# + gridDim.x, ... in the same grouped-raster order. The producer's stage ring runs on across tiles,
# so the loads of tile i + 1 are in flight while the consumers finish tile i. Same MMA block and
# barriers as _gemm_tma._SOURCE; the last stage of each tile is released after the final wgmma wait.
# Epilogue (session 10): the consumers write the tile, rounded, into an epilogue buffer in shared memory
# (rows EPI_LD apart: conflict-free) and go on to the next tile's wgmmas; the producer warpgroup's storer
# warps copy it to the slots' rows with 16-byte stores, one warp instruction per 256-column row, and release
# the buffer. Three stages instead of four, so that the buffer fits (SMEM_BYTES_PERSISTENT).
# Loads: without GATHER_A one thread (256) issues both TMA loads per stage (x gathered into slot order by
# ``_gemm_tma.gather_slots`` first) and warps 9-11 store; with GATHER_A (session 12) the producer warpgroup's 128
# threads copy the input tile from x's routed rows with cp.async (thread 256 still issues the weight tile's TMA),
# so no gather kernel runs first, and store each finished tile a few stages into the next one. Session 12 on
# the H200 (HiDream's MoE GEMM, Nsight Compute): 455-460 us (storing at stage 2 or 4 of the next tile) against
# 409-412 us + 19 us of gather kernel for the form without GATHER_A; a first version with two loader warps (+ two
# storer warps) took 485 us, with one 805 us: the cp.async copies are limited by the warps issuing them. Opt-in.
# (Session 5's gather form had all 128 threads copy and stored from registers: no faster than gather + TMA then.)
_SOURCE_PERSISTENT = r"""
  constexpr int BM = 128, BN = 256, BK = 64, STAGES = 3, EPI_LD = BN + 8;
  // producer warpgroup: without GATHER_A thread 256 issues the TMA loads and warps 9-11 store finished tiles; with
  // GATHER_A its 128 threads copy x's routed rows with cp.async (thread 256 also issues the weight tile's TMA) and
  // store each finished tile between two stages of the next one
  constexpr int LOAD_WARPS = GATHER_A ? 4 : 1, STORE_WARPS = GATHER_A ? 4 : 3;
  constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2, STAGE_BYTES = A_BYTES + B_BYTES;
  constexpr int TILES_N = (N + BN - 1) / BN, TILES_ALL = TILES_M * TILES_N, KT = (K + BK - 1) / BK;
  extern __shared__ __align__(1024) unsigned char fd_smem_raw[];
  __shared__ __align__(8) unsigned long long full_bar[STAGES], empty_bar[STAGES], epi_full, epi_empty;
  unsigned char* fd_smem = fd_smem_raw + ((1024u - (fd_smem_addr(fd_smem_raw) & 1023u)) & 1023u);
  const unsigned smem_base = fd_smem_addr(fd_smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const unsigned long long maps = fd_maps_addr(tmaps);
  // tile t -> (row tile, column tile): groups of GROUP_M row tiles, column-major inside a group
  auto coords = [&](int t, int& tile_m, int& tile_n) {
    const int first_m = t / (GROUP_M * TILES_N) * GROUP_M, group_m = min(TILES_M - first_m, GROUP_M);
    const int r = t % (GROUP_M * TILES_N);
    tile_m = first_m + r % group_m;
    tile_n = r / group_m;
  };
  auto slot_of = [&](int s) -> int { return DIRECT ? (s < M_ROWS ? s : -1) : slot_row[s]; };
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      // the TMA thread's expect_tx arrival (+ one cp.async arrival per loader thread)
      fd_mbar_init(fd_smem_addr(&full_bar[s]), GATHER_A ? 1 + 32 * LOAD_WARPS : 1);
      fd_mbar_init(fd_smem_addr(&empty_bar[s]), 256);  // every consumer thread
    }
    fd_mbar_init(fd_smem_addr(&epi_full), 256);  // every consumer thread: the tile is in the buffer
    fd_mbar_init(fd_smem_addr(&epi_empty), 32 * STORE_WARPS);  // every storing thread: the buffer is free
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  T* epi = reinterpret_cast<T*>(fd_smem + STAGES * STAGE_BYTES);  // the finished tile, BM rows of EPI_LD
  // a finished tile's rows sw, sw + STORE_WARPS, ... from the epilogue buffer to their slots, one 16-byte store per
  // lane per 256-column row; lane i holds the slots of this warp's rows i and i + 32, read before the buffer's wait
  auto row_slots = [&](int tile_m, int sw, int& slot_a, int& slot_b) {
    const int ra = sw + STORE_WARPS * lane, rb = sw + STORE_WARPS * (lane + 32);
    slot_a = ra < BM ? slot_of(tile_m * BM + ra) : -1;
    slot_b = rb < BM ? slot_of(tile_m * BM + rb) : -1;
  };
  auto store_rows = [&](int tile_n, int sw, int slot_a, int slot_b) {
    const int col = tile_n * BN + lane * 8;
    for (int i = 0; sw + STORE_WARPS * i < BM; ++i) {
      const int dst = __shfl_sync(0xffffffffu, i < 32 ? slot_a : slot_b, i & 31);
      if (dst >= 0 && col < N)
        *reinterpret_cast<uint4*>(out + (size_t)dst * N + col) = *reinterpret_cast<const uint4*>(epi + (sw + STORE_WARPS * i) * EPI_LD + lane * 8);
    }
  };
  if (!GATHER_A && warp >= 9) {  // storers, tile after tile
    const int sw = warp - 9;
    int n_t = 0;
    for (int t = blockIdx.x; t < TILES_ALL; t += gridDim.x) {
      int tile_m, tile_n;
      coords(t, tile_m, tile_n);
      if (!DIRECT && tile_expert[tile_m] < 0) continue;
      int slot_a, slot_b;
      row_slots(tile_m, sw, slot_a, slot_b);
      fd_mbar_wait(fd_smem_addr(&epi_full), n_t & 1);
      store_rows(tile_n, sw, slot_a, slot_b);
      fd_mbar_arrive(fd_smem_addr(&epi_empty));
      ++n_t;
    }
    return;
  }
  if (warp >= 8) {  // loaders, tile after tile
    // GATHER_A: the 128 threads copy the input tile from x's routed rows with cp.async (chunk kc of rows
    // r0 + 16 i, 128B-swizzled as TMA would write it) and arrive when their copies land; thread 256 also
    // issues the weight tile's TMA. Otherwise thread 256 alone issues both TMA loads.
    const int p = tid - 256, kc = p & 7, r0 = p >> 3;
    if (!GATHER_A && p != 0) return;
    if (p == 0) {
      fd_acquire_map(maps);
      fd_acquire_map(maps + 128);
    }
    int it = 0;  // stages issued so far (the ring position runs on across tiles)
    // GATHER_A: the finished tile these warps store next (stored once the ring is STAGES + 1 stages into the next
    // tile, when the consumers are long done with its epilogue; the last one after the loop)
    int pend_m = -1, pend_n = 0, stored = 0;
    auto store_pending = [&]() {
      int slot_a, slot_b;
      row_slots(pend_m, warp - 8, slot_a, slot_b);
      fd_mbar_wait(fd_smem_addr(&epi_full), stored++ & 1);
      store_rows(pend_n, warp - 8, slot_a, slot_b);
      fd_mbar_arrive(fd_smem_addr(&epi_empty));
      pend_m = -1;
    };
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
          if (pend_m >= 0 && kt == min(KT - 1, STAGES + 1)) store_pending();
        }
      }
      if (GATHER_A) {
        pend_m = tile_m;
        pend_n = tile_n;
      }
    }
    if (GATHER_A && pend_m >= 0) store_pending();
    return;
  }

  // consumers: warpgroup wg owns rows wg * 64 .. + 63 of each tile
  const int wg = warp >> 2, warp_in_wg = warp & 3;
  const int row = wg * 64 + warp_in_wg * 16 + (lane >> 2), col0 = (lane & 3) * 2;
  float d[128];
  int it = 0, n_t = 0;
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
    fd_mbar_wait(fd_smem_addr(&epi_empty), (n_t & 1) ^ 1);  // the storers are done with the previous tile
    unsigned* e0 = reinterpret_cast<unsigned*>(epi + row * EPI_LD + col0);
    unsigned* e1 = reinterpret_cast<unsigned*>(epi + (row + 8) * EPI_LD + col0);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      e0[4 * j] = fd_pack2<T>(d[4 * j], d[4 * j + 1]);
      e1[4 * j] = fd_pack2<T>(d[4 * j + 2], d[4 * j + 3]);
    }
    fd_mbar_arrive(fd_smem_addr(&epi_full));
    ++n_t;
  }
"""
