"""The opt-in persistent form of the sm_90 attention (``_attention_sm90``): exact on the H200, and slower.

Written in session 7 after that session's device time was spent, for what its measurements left: at
4608 tokens the one-CTA-per-tile kernel ran at 0.88x cuDNN against 0.99x at 16384, and fitting both to
waves x (key tiles + c) gives c ~ 4.8 tile-times of fixed cost per CTA (launch, the Q / first K latency,
S_0's softmax and the last P V with nothing beside them, the O stores). Here one CTA per SM walks the
tiles t = blockIdx.x, + gridDim.x, ... (query block t % QT of head row t / QT, so the CTAs in flight
share heads) as one pipeline: the producer's K / V ring runs on across tiles and Q is double-buffered,
so the next tile's loads are in flight while this one finishes; the consumers issue tile t + 1's S_0
together with tile t's last P V, run S_0's softmax during it, then write tile t's O. Same MMA steps
(``_CONSUMER_STEPS``), barriers, register split and ping-pong turns as ``_SOURCE``. Checked by nvcc and
by the CPU emulation (tests/test_cuda_emulation.py, with grids of fewer CTAs than tiles). Session 8 ran
it on the H200: its four GPU tests (tests/test_kernels_cuda.py, ``persistent=True``) passed as written,
but it measured no faster than the per-tile kernel (4608 tokens: 0.592 ms against 0.549 ms; 4621: 0.606
against 0.614; 16384: 5.81 against 5.61; benchmarks/results/attention-dispatch-persistent-h200-s8.json),
so it stays opt-in and is never dispatched. Session 16: the steps inside a tile run from a loop of their own, as long as
the per-tile form's (511 against 514 SASS instructions; one loop over every step had carried the tile bookkeeping,
589 on its hot path). The four GPU tests passed; queued, it took 5.561 against 5.276 ms at 16384 tokens (5% slower;
9-10% in the session's earlier runs of the old loop) and 0.531 against 0.492 at 4608
(benchmarks/results/attention-dispatch-persistent-h200-s16.json, one run). Still slower, so still opt-in.
"""

from ._attention_sm90 import _CONSUMER_STEPS, BM, BN, D, STAGES

Q_BUFFERS = 2
SMEM_BYTES_PERSISTENT = Q_BUFFERS * BM * D * 2 + STAGES * 2 * BN * D * 2 + 1024  # 2 Q + K, V stages + alignment

# Template: as _SOURCE (``main_template``), plus BH (= B * H). Grid: x = CTAs (at most one per SM and per tile; 384 threads
# each), y = 1. Inputs and output as _SOURCE.
_SOURCE_PERSISTENT = r"""
  constexpr int BM = 128, BN = 128, STAGES = 2, CHUNK = 128 * 128;  // a chunk: 128 rows x 64 columns
  constexpr int Q_BYTES = 2 * CHUNK, TILE_BYTES = 2 * CHUNK;        // one Q buffer; one K or V tile
  constexpr int NT = (LK + BN - 1) / BN, QT = (LQ + BM - 1) / BM, TILES = QT * BH;
  // O *= corr on every tile: with the per-warp skip of the per-tile form, ptxas grew this loop from 995 to 1591
  // SASS instructions (nvcc 13.0, session 13)
  constexpr bool SKIP_UNMOVED = false;
  constexpr int MAX_CHAINS = 4;  // softmax: independent max chains per row
  constexpr float LOG2E = 1.4426950408889634f;
  const float NEG_INF = __int_as_float(0xff800000);
  extern __shared__ __align__(1024) unsigned char fd_smem_raw[];
  __shared__ __align__(8) unsigned long long q_full[2], q_empty[2], k_full[STAGES], k_empty[STAGES], v_full[STAGES],
      v_empty[STAGES];
  unsigned char* fd_smem = fd_smem_raw + ((1024u - (fd_smem_addr(fd_smem_raw) & 1023u)) & 1023u);
  const unsigned smem_base = fd_smem_addr(fd_smem);  // two Q buffers, K stages, V stages
  const unsigned k_base = smem_base + 2 * Q_BYTES, v_base = k_base + STAGES * TILE_BYTES;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const unsigned long long maps = fd_maps_addr(tmaps);
  const int my_tiles = (int)blockIdx.x < TILES ? (TILES - 1 - (int)blockIdx.x) / (int)gridDim.x + 1 : 0;
  // the tile in hand: its query block, head row, batch, KV head row and where they sit in the maps
  int m0 = 0, bh = 0, batch = 0, kv_bh = 0, q_col = 0, q_row = 0, kv_col = 0, kv_row = 0;
  auto locate = [&](int tile) {
    bh = tile / QT;
    m0 = (tile % QT) * BM;
    batch = bh / H;
    kv_bh = batch * HK + (bh % H) / (H / HK);
    q_col = SEQ_MAJOR ? (bh % H) * 128 : 0;
    q_row = SEQ_MAJOR ? batch * LQ : bh * LQ;
    kv_col = SEQ_MAJOR ? (kv_bh % HK) * 128 : 0;
    kv_row = SEQ_MAJOR ? batch * LK : kv_bh * LK;
  };
  if (tid == 0) {
    for (int b = 0; b < 2; ++b) {
      fd_mbar_init(fd_smem_addr(&q_full[b]), 1);   // the TMA thread's expect_tx arrival
      fd_mbar_init(fd_smem_addr(&q_empty[b]), 8);  // each consumer warp, after the tile's last S
    }
    for (int s = 0; s < STAGES; ++s) {
      fd_mbar_init(fd_smem_addr(&k_full[s]), 1);
      fd_mbar_init(fd_smem_addr(&v_full[s]), 1);
      fd_mbar_init(fd_smem_addr(&k_empty[s]), 8);
      fd_mbar_init(fd_smem_addr(&v_empty[s]), 8);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (my_tiles == 0) return;

  if (warp >= 8) {  // producer warpgroup: Q of each tile into its buffer, then its K and V tiles into the ring
    fd_regs_producer();
    if (tid == 256) {
      fd_acquire_map(maps);
      fd_acquire_map(maps + 128);
      fd_acquire_map(maps + 256);
      int ring = 0;  // K / V tiles loaded so far: stage ring % STAGES, phase from ring / STAGES
      for (int i = 0; i < my_tiles; ++i) {
        locate((int)blockIdx.x + i * (int)gridDim.x);
        const unsigned qf = fd_smem_addr(&q_full[i & 1]), qd = smem_base + (i & 1) * Q_BYTES;
        fd_mbar_wait(fd_smem_addr(&q_empty[i & 1]), ((i >> 1) & 1) ^ 1);
        fd_mbar_expect_tx(qf, Q_BYTES);
        fd_tma_load(qd, maps, q_col, q_row + m0, qf);
        fd_tma_load(qd + CHUNK, maps, q_col + 64, q_row + m0, qf);
        for (int j = 0; j < NT; ++j, ++ring) {
          const int s = ring % STAGES, phase = ((ring / STAGES) & 1) ^ 1;
          const unsigned kf = fd_smem_addr(&k_full[s]), vf = fd_smem_addr(&v_full[s]);
          const unsigned kd = k_base + s * TILE_BYTES, vd = v_base + s * TILE_BYTES;
          fd_mbar_wait(fd_smem_addr(&k_empty[s]), phase);
          fd_mbar_expect_tx(kf, TILE_BYTES);
          fd_tma_load(kd, maps + 128, kv_col, kv_row + j * BN, kf);
          fd_tma_load(kd + CHUNK, maps + 128, kv_col + 64, kv_row + j * BN, kf);
          fd_mbar_wait(fd_smem_addr(&v_empty[s]), phase);
          fd_mbar_expect_tx(vf, TILE_BYTES);
          fd_tma_load(vd, maps + 256, kv_col, kv_row + j * BN, vf);
          fd_tma_load(vd + CHUNK, maps + 256, kv_col + 64, kv_row + j * BN, vf);
        }
      }
    }
    return;
  }

  // consumers: step i = (tile i / NT, key tile i % NT) of this CTA's tiles; slot i issues S_i with
  // P_{i-1} V_{i-1}, whatever tiles they belong to, so tile boundaries need no pipeline drain
  fd_regs_consumer();
  const int wg = warp >> 2, t = lane & 3;
  const int r0 = wg * 64 + (warp & 3) * 16 + (lane >> 2);
  const float sl2 = __int_as_float(SCALE_BITS) * LOG2E;
  float o[64], sc[64];
  float kb[32];  // tile j's key bias (HAS_BIAS), loaded before its scores are waited for
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = sc[i] = 0.0f;  // sc defined once: each S MMA overwrites it
  float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.0f, 0.0f}, corr[2];
  unsigned a[8][4];  // P_{i-1} as the A fragments of O += P V
""" + _CONSUMER_STEPS + r"""  // O / l of a finished tile (l summed over the 4 lanes of each row), then O cleared for the next
  auto store = [&](float (&l)[2], int tm0, int tbh, int tbatch) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
      l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
      l[h] = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = tm0 + r0 + 8 * h;
      if (row < LQ) {
        T* dst = out + (SEQ_MAJOR ? ((size_t)(tbatch * LQ + row) * H + tbh % H) * 128 : ((size_t)tbh * LQ + row) * 128) + 2 * t;
#pragma unroll
        for (int c = 0; c < 16; ++c)
          *reinterpret_cast<unsigned*>(dst + 8 * c) = fd_pack2<T>(o[4 * c + 2 * h] * l[h], o[4 * c + 2 * h + 1] * l[h]);
      }
    }
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.0f;
  };
  const int steps = my_tiles * NT;
  if (PINGPONG && wg == 1) fd_bar_arrive(2);  // warpgroup 0 issues first
  // step 0: S_0 of the first tile alone
  locate((int)blockIdx.x);
  fd_mbar_wait(fd_smem_addr(&q_full[0]), 0);
  on_tile(0, fetch_bias);
  load_scores(0);
  if (PINGPONG) fd_bar_sync(2 + wg);
  fd_mma_ss128<IS_BF16>(sc, smem_base + wg * 64 * 128, k_base, CHUNK);
  if (PINGPONG) fd_bar_arrive(3 - wg);
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  fd_fence64(sc);
  if (lane == 0) {
    fd_mbar_arrive(fd_smem_addr(&k_empty[0]));
    if (NT == 1) fd_mbar_arrive(fd_smem_addr(&q_empty[0]));  // Q's last S
  }
  on_tile(0, softmax);
  rescale_and_pack();
  // step i (key tile j of this CTA's tile tile_i) issues S_i with P_{i-1} V_{i-1}, whatever tiles they belong to, so
  // tile boundaries need no pipeline drain. `first` (a compile-time flag): step i opens tile tile_i, and closes the
  // one before it (its Q, its sums, its O store). Session 16: steps inside a tile (first false) run from an inner loop
  // of their own, without the tile bookkeeping (one loop over all steps carried it in each: 589 SASS instructions per
  // step on the hot path against the per-tile form's 514, and 6-10% slower on the H200).
  auto step = [&](int i, int j, int tile_i, auto first_flag) {
    constexpr bool first = decltype(first_flag)::value;
    const int s = i % STAGES, sp = (i - 1) % STAGES;
    const int p_m0 = m0, p_bh = bh, p_batch = batch;  // the closed tile's (first)
    if (first) {
      locate((int)blockIdx.x + tile_i * (int)gridDim.x);
      fd_mbar_wait(fd_smem_addr(&q_full[tile_i & 1]), (tile_i >> 1) & 1);
    }
    on_tile(j, fetch_bias);
    load_scores(i);
    fd_mbar_wait(fd_smem_addr(&v_full[sp]), ((i - 1) / STAGES) & 1);
    if (PINGPONG) fd_bar_sync(2 + wg);
    fd_mma_ss128<IS_BF16>(sc, smem_base + (tile_i & 1) * Q_BYTES + wg * 64 * 128, k_base + s * TILE_BYTES, CHUNK);
    fd_fence64(o);
    fd_mma_rs128<IS_BF16>(o, a, v_base + sp * TILE_BYTES, CHUNK);
    if (PINGPONG) fd_bar_arrive(3 - wg);
    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");  // S_i has landed
    fd_fence64(sc);
    if (lane == 0) {
      fd_mbar_arrive(fd_smem_addr(&k_empty[s]));
      if (j == NT - 1) fd_mbar_arrive(fd_smem_addr(&q_empty[tile_i & 1]));
    }
    float l_done[2] = {l_run[0], l_run[1]};  // the closed tile's sums, before the new tile's softmax
    if (first) {
      m_run[0] = m_run[1] = NEG_INF;
      l_run[0] = l_run[1] = 0.0f;
    }
    on_tile(j, softmax);
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");  // P_{i-1} V_{i-1} has landed
    fd_fence64(o);
    if (lane == 0) fd_mbar_arrive(fd_smem_addr(&v_empty[sp]));
    if (first) store(l_done, p_m0, p_bh, p_batch);
    rescale_and_pack();
  };
  int i = 1;
  for (int tile_i = 0; tile_i < my_tiles; ++tile_i) {
    for (int j = 1; j < NT; ++j, ++i) step(i, j, tile_i, fd_flag<false>{});
    if (tile_i + 1 < my_tiles) step(i++, 0, tile_i + 1, fd_flag<true>{});
  }
  // the last P V (warpgroup 1 gives no turn after it: its partner has none left to take)
  fd_mbar_wait(fd_smem_addr(&v_full[(steps - 1) % STAGES]), ((steps - 1) / STAGES) & 1);
  if (PINGPONG) fd_bar_sync(2 + wg);
  fd_fence64(o);
  fd_mma_rs128<IS_BF16>(o, a, v_base + ((steps - 1) % STAGES) * TILE_BYTES, CHUNK);
  if (PINGPONG && wg == 0) fd_bar_arrive(3);
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  fd_fence64(o);
  store(l_run, m0, bh, batch);
"""
