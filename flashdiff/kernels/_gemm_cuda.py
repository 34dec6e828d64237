"""Tensor-core GEMMs for CUDA with row indirection: the grouped (MoE) GEMM and the dense GEMM.

Grouped: for every padded slot s with slot_row[s] >= 0 (the routed row r)

    out[r, n] = sum_k x[r // A_DIV, k] * w[tile_expert[s // BM], n, k]

Slots come in tiles of BM = 128 rows and one tile multiplies by one expert's (N, K) weight
(tile_expert[tile] < 0: the whole tile is skipped; slot_row[s] < 0: an empty slot, nothing
written). ``layout`` builds slot_row and tile_expert on the device in one small kernel (rows grouped
by expert, each expert's segment padded to whole tiles; a block per 256 routed rows, each counting all
rows itself: 6.8 us for HiDream's 8192 on the H200 in session 10, where one block took 13 us), so the
GEMM runs only the routed rows (plus at most BM - 1 padding rows per expert) with static shapes and no
host sync. ``moe_prologue`` (session 12, what moe_gemm runs) is the same kernel with more blocks (64 routed rows
each) that also gather x's routed rows into slot order for the TMA GEMMs, and with the flat dequantize kernel's
blocks after them for quantized experts: one launch where there were three (benchmarks/README.md). A_DIV =
top_k when all of a token's slots share its input row. Dense (``dense_gemm``): the same kernels with slot s = row s.

Engines behind ``grouped_gemm`` / ``dense_gemm``: on Hopper ``_gemm_tma`` (wgmma fed by TMA; its
persistent form, engine "wgmma persistent", is the default since session 10: 416-418 us for HiDream's
MoE GEMM under Nsight Compute against 449 us for the one-CTA-per-tile form) or ``_gemm_sm90`` (wgmma fed
by cp.async, measured slower, kept selectable); elsewhere the Ampere-style kernel below (``mma.sync``,
any sm_80+ GPU):
- CTA tile BM x BN x BK = 128 x 128 x 32, 4 warps in 2 x 2, each warp 64 x 64 of the output as
  4 x 8 ``mma.sync.m16n8k16`` tiles with float32 accumulators (128 per thread).
- STAGES = 4 shared-memory stages filled by ``cp.async`` (16-byte chunks, zero-filled past K and
  for empty slots), so global loads of tile k+3 overlap the MMAs of tile k.
- Shared tiles are [rows][BK] with the 16-byte chunk index XOR-swizzled by (row >> 1) & 3: both the
  cp.async stores and the ``ldmatrix.x4`` fragment loads are free of bank conflicts.
- Epilogue: the accumulators go through shared memory (rows padded by 8 elements) so every output
  row is written with 16-byte stores.
Requirements (``supported``): x and w bf16 or fp16, K % 8 == 0, N % 8 == 0.
``grouped_gemm_quantized`` / ``dense_gemm_quantized`` take quantized weights instead (sm_90, persistent
engine; the weights dequantized by the kernel's storer warps, ``_gemm_tma_dequant_persistent``; opt-in).
No Metal twin yet: on Metal the callers keep MLX ops.
"""

import functools
import os

import mlx.core as mx

BM, BN, BK, STAGES, THREADS = 128, 128, 32, 4, 128
GROUP_M = 8  # row tiles per raster group (TILE_SETUP)
SMEM_BYTES = STAGES * (BM + BN) * BK * 2  # 64 KiB; the epilogue reuses it (BM * (BN + 8) * 2 bytes)

# cp.async helpers shared by both GEMM engines (``_gemm_sm90`` includes them in its header)
CP_ASYNC_HEADER = r"""
__device__ __forceinline__ unsigned fd_smem_addr(const void* p) {
  return (unsigned)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void fd_cp_async16(unsigned dst, const void* src, bool valid) {
  int n = valid ? 16 : 0;  // 0 source bytes: the 16 destination bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void fd_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void fd_cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory"); }
"""

# The first lines of every GEMM kernel body: which (row tile, column tile) this CTA computes, its
# expert, and slot -> routed row. Grouped raster: CTAs launched together cover GROUP_M row tiles x a
# run of column tiles, so both operands' tiles are reused from L2 (the plain order streams all of w
# once per row tile).
TILE_SETUP = r"""
  const int bid = blockIdx.y * gridDim.x + blockIdx.x, per_group = GROUP_M * gridDim.x;
  const int first_m = bid / per_group * GROUP_M;
  const int group_m = min((int)gridDim.y - first_m, GROUP_M);
  const int tile_m = first_m + (bid % per_group) % group_m, tile_n = (bid % per_group) / group_m;
  const int expert = DIRECT ? 0 : tile_expert[tile_m];
  if (expert < 0) return;
  // slot s -> routed row (output row; input row = routed row / A_DIV), or -1 for an empty slot
  auto slot_of = [&](int s) -> int { return DIRECT ? (s < M_ROWS ? s : -1) : slot_row[s]; };
"""

_HEADER = CP_ASYNC_HEADER + r"""
__device__ __forceinline__ void fd_ldmatrix_x4(unsigned (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
template <bool BF16>
__device__ __forceinline__ void fd_mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  if (BF16) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}
// element offset of (row, 16-byte chunk) in a [rows][32] tile, chunk XOR-swizzled
__device__ __forceinline__ int fd_swz(int row, int chunk) { return row * 32 + ((chunk ^ ((row >> 1) & 3)) << 3); }
"""

_SOURCE = r"""
  constexpr int BM = 128, BN = 128, BK = 32, STAGES = 4, WM = 64, WN = 64, MT = WM / 16, NT = WN / 8;
  extern __shared__ __align__(128) unsigned char fd_smem[];
  T* As = reinterpret_cast<T*>(fd_smem);        // [STAGES][BM][BK]
  T* Bs = As + STAGES * BM * BK;                // [STAGES][BN][BK]

""" + TILE_SETUP + r"""
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp >> 1, warp_n = warp & 1;
  const T* wexp = w + (size_t)expert * N * K;

  // Loads: per stage each thread copies chunk kc = tid % 4 of rows tid / 4 + 32 * i (i < 4) of A and B.
  const int kc = tid & 3;
  const T* a_src[4];
  const T* b_src[4];
  bool a_ok[4], b_ok[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = (tid >> 2) + 32 * i;
    const int slot = slot_of(tile_m * BM + r), src = slot < 0 ? -1 : slot / A_DIV;
    a_ok[i] = src >= 0;
    a_src[i] = x + (size_t)(src < 0 ? 0 : src) * K + kc * 8;
    const int n = tile_n * BN + r;
    b_ok[i] = n < N;
    b_src[i] = wexp + (size_t)(n < N ? n : 0) * K + kc * 8;
  }
  const unsigned as_base = fd_smem_addr(As), bs_base = fd_smem_addr(Bs);
  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * BK + kc * 8;
    const bool k_ok = k0 < K;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = (tid >> 2) + 32 * i;
      const int off = (stage * BM * BK + fd_swz(r, kc)) * 2;
      fd_cp_async16(as_base + off, k_ok && a_ok[i] ? a_src[i] + kt * BK : x, k_ok && a_ok[i]);
      fd_cp_async16(bs_base + off, k_ok && b_ok[i] ? b_src[i] + kt * BK : w, k_ok && b_ok[i]);
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

  constexpr int KT = (K + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load_stage(s, s);
    fd_cp_async_commit();
  }

  // ldmatrix row/chunk of this lane: A (16 x 16 block): rows lane % 16, chunk + lane / 16;
  // B (16 n x 16 k block): rows lane % 8 + 8 * (lane / 16), chunk + (lane / 8) % 2.
  const int a_row = warp_m * WM + (lane & 15), a_chunk = lane >> 4;
  const int b_row = warp_n * WN + (lane & 7) + ((lane >> 4) << 3), b_chunk = (lane >> 3) & 1;

  for (int kt = 0; kt < KT; ++kt) {
    fd_cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int next = kt + STAGES - 1;
    if (next < KT) load_stage(next % STAGES, next);
    fd_cp_async_commit();

    const int stage = kt % STAGES;
    const unsigned a_stage = as_base + stage * BM * BK * 2, b_stage = bs_base + stage * BN * BK * 2;
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      unsigned a[MT][4], b[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i)
        fd_ldmatrix_x4(a[i], a_stage + fd_swz(a_row + i * 16, kk * 2 + a_chunk) * 2);
#pragma unroll
      for (int j = 0; j < NT / 2; ++j) {
        unsigned r[4];
        fd_ldmatrix_x4(r, b_stage + fd_swz(b_row + j * 16, kk * 2 + b_chunk) * 2);
        b[2 * j][0] = r[0]; b[2 * j][1] = r[1]; b[2 * j + 1][0] = r[2]; b[2 * j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) fd_mma16816<IS_BF16>(acc[i][j], a[i], b[j][0], b[j][1]);
    }
  }
  fd_cp_async_wait<0>();
  __syncthreads();

  // Epilogue: accumulators -> shared C tile [BM][BN + 8] in T -> 16-byte row stores through c_rows.
  constexpr int LDC = BN + 8;
  T* Cs = reinterpret_cast<T*>(fd_smem);
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int r = warp_m * WM + i * 16 + (lane >> 2), c = warp_n * WN + j * 8 + (lane & 3) * 2;
      Cs[r * LDC + c] = (T)acc[i][j][0];
      Cs[r * LDC + c + 1] = (T)acc[i][j][1];
      Cs[(r + 8) * LDC + c] = (T)acc[i][j][2];
      Cs[(r + 8) * LDC + c + 1] = (T)acc[i][j][3];
    }
  __syncthreads();
  // 16 chunks of 8 per row; 128 threads write 8 rows per pass.
  const int chunk = tid & 15;
  const int col = tile_n * BN + chunk * 8;
#pragma unroll 4
  for (int r = tid >> 4; r < BM; r += THREADS / 16) {
    const int dst = slot_of(tile_m * BM + r);
    if (dst >= 0 && col < N)
      *reinterpret_cast<uint4*>(out + (size_t)dst * N + col) = *reinterpret_cast<const uint4*>(Cs + r * LDC + chunk * 8);
  }
"""


_LAYOUT_SOURCE = r"""
  // Block b places routed rows b * RPB .. + RPB - 1 (thread i: row b * RPB + i; NT threads per block, NT >= RPB)
  // and writes the padding slots and tile experts of its share of the slots. Every block first counts all R
  // rows per expert (`total`) and those before its own (`before`), so no block waits for another. Lanes of a warp with the same expert are
  // grouped (__match_any_sync); their leader adds them to its warp's own counter (no atomics: with shared
  // counters, and 4 rows per thread per round, it took 9.0-9.3 us for HiDream's 8192 rows on the H200; with
  // these counters and 4 rows 8.2-8.7 us; with IPT = 16 rows per round, so that the loads' latency is paid
  // less often, 6.8 us).
  constexpr int WARPS = NT / 32, IPT = 16;
  __shared__ int wcount[WARPS][MAX_E], total[MAX_E], before[MAX_E], seg_start[MAX_E + 1];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nt = blockDim.x, b = blockIdx.x, r_first = b * RPB;
  for (int e = tid; e < E; e += nt)
    for (int w = 0; w < WARPS; ++w) wcount[w][e] = 0;
  __syncthreads();
  auto count_rows = [&](int lo, int hi, int* sum) {  // rows lo .. hi - 1 into the warp counters, then their sum
    for (int base = lo; base < hi; base += IPT * nt) {  // whole warps iterate together, IPT loads in flight
      int ids[IPT];
#pragma unroll
      for (int j = 0; j < IPT; ++j) {
        const int r = base + j * nt + tid;
        ids[j] = r < hi ? expert_ids[r] : -1;
      }
#pragma unroll
      for (int j = 0; j < IPT; ++j) {
        const int e = ids[j];
        const bool valid = e >= 0 && e < E;
        const unsigned peers = __match_any_sync(0xffffffffu, valid ? e : -1);
        if (valid && lane == __ffs(peers) - 1) wcount[warp][e] += __popc(peers);
        __syncwarp();
      }
    }
    __syncthreads();
    for (int e = tid; e < E; e += nt) {
      int n = 0;
      for (int w = 0; w < WARPS; ++w) n += wcount[w][e];
      sum[e] = n;
    }
    __syncthreads();  // the sums are read before the counters run on
  };
  count_rows(0, min(r_first, R), before);
  count_rows(min(r_first, R), R, total);  // the counters run on: all R rows
  int* fill = before;  // each expert's next free slot for this block's rows
  if (tid == 0) {
    int run = 0;
    for (int e = 0; e < E; ++e) { seg_start[e] = run; fill[e] += run; run += (total[e] + TILE - 1) / TILE * TILE; }
    seg_start[E] = run;
  }
  __syncthreads();
  {
    const int r = r_first + tid, e = tid < RPB && r < R ? expert_ids[r] : -1;
    const bool valid = e >= 0 && e < E;
    const unsigned peers = __match_any_sync(0xffffffffu, valid ? e : -1);
    const int leader = __ffs(peers) - 1;
    int first = 0;
    if (valid && lane == leader) first = atomicAdd(&fill[e], __popc(peers));
    first = __shfl_sync(0xffffffffu, first, leader);
    if (valid) slot_row[first + __popc(peers & ((1u << lane) - 1u))] = r;
  }
  // this block's share of the slots, whole tiles: padding slots get -1, each tile its expert (-1 past the last)
  constexpr int TPB = (TILES + BLOCKS - 1) / BLOCKS;
  auto expert_of = [&](int s) {  // the segment holding slot s (the last expert starting at or before it), or -1
    if (s >= seg_start[E]) return -1;
    int lo = 0, hi = E - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (seg_start[mid] <= s) lo = mid; else hi = mid - 1;
    }
    return lo;
  };
  const int t_end = min(TILES, (b + 1) * TPB);
  for (int t = b * TPB + tid; t < t_end; t += nt) tile_expert[t] = expert_of(t * TILE);
  for (int s = b * TPB * TILE + tid; s < t_end * TILE; s += nt) {
    const int e = expert_of(s);
    if (e < 0 || s - seg_start[e] >= total[e]) slot_row[s] = -1;
  }
"""
RPB = 256  # threads per layout block (and its routed rows, but in moe_prologue's gathering form)

# The layout kernel that also gathers x's routed rows into slot order for the TMA GEMMs (xs, as
# ``_gemm_tma.gather_slots`` does, and the GEMM's tensor maps over xs and w: warp 0 of block 0 first), so no
# gather kernel runs after it: each block copies the rows it has just placed. GATHER_RPB routed rows per block of
# RPB threads, so that enough blocks copy at once (4 x HiDream's blocks); every block still counts all rows itself.
GATHER_RPB = 64
_PLACE = "    if (valid) slot_row[first + __popc(peers & ((1u << lane) - 1u))] = r;\n"
_GATHER_PLACED = r"""
  // this block's routed rows to their slots: xs[slot] = x[r / A_DIV], GPT 16-byte chunks per thread in flight
  __syncthreads();
  {
    constexpr int CHUNKS = K / 8, GPT = 8;
    const int rows = min(RPB, R - r_first);
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    uint4* xsv = reinterpret_cast<uint4*>(xs);
    for (int f0 = 0; f0 < rows * CHUNKS; f0 += GPT * nt) {
      uint4 v[GPT];
#pragma unroll
      for (int j = 0; j < GPT; ++j) {
        const int f = f0 + j * nt + tid, row = f / CHUNKS;
        if (f < rows * CHUNKS && placed[row] >= 0) v[j] = xv[(size_t)((r_first + row) / A_DIV) * CHUNKS + f % CHUNKS];
      }
#pragma unroll
      for (int j = 0; j < GPT; ++j) {
        const int f = f0 + j * nt + tid, row = f / CHUNKS;
        if (f < rows * CHUNKS && placed[row] >= 0) xsv[(size_t)placed[row] * CHUNKS + f % CHUNKS] = v[j];
      }
    }
  }
"""


def layout_gather_source(w_name: str = "w") -> str:
    """``_LAYOUT_SOURCE`` + the gather of each block's placed rows + the tensor maps over xs and `w_name` (the
    experts, or the dequantized experts when the same launch writes them)."""
    from . import _gemm_tma
    if _LAYOUT_SOURCE.count(_PLACE) != 1:
        raise AssertionError("the layout source changed: its placement line should occur once")
    maps = _gemm_tma.publish_maps_code([("xs", "SLOTS", 128), (w_name, "W_ROWS", 256)])
    placed = ("    if (tid < RPB) placed[tid] = valid ? first + __popc(peers & ((1u << lane) - 1u)) : -1;\n")
    return ("  __shared__ int placed[RPB];  // this block's rows' slots (-1: not routed)\n"
            "  if (blockIdx.x == 0 && threadIdx.x < 32)\n" + maps
            + _LAYOUT_SOURCE.replace(_PLACE, _PLACE + placed) + _GATHER_PLACED)

MAX_EXPERTS = 1024


@functools.cache
def _layout_kernel():
    return mx.fast.cuda_kernel(name="flashdiff_moe_layout", input_names=["expert_ids"],
                               output_names=["slot_row", "tile_expert"], source=_LAYOUT_SOURCE)


def _layout_launch(expert_ids, num_experts: int, rpb: int = RPB):
    """The layout kernel's template (rpb routed rows per block of RPB threads), its block count and the number of
    row tiles."""
    r = expert_ids.size
    tiles = (r + num_experts * (BM - 1)) // BM
    max_e = next(m for m in (8, 64, 256, MAX_EXPERTS) if num_experts <= m)
    blocks = max(-(-r // rpb), 1)
    template = [("E", num_experts), ("MAX_E", max_e), ("R", r), ("TILE", BM), ("TILES", tiles), ("RPB", rpb),
                ("NT", RPB), ("BLOCKS", blocks)]
    return template, blocks, tiles


def layout(expert_ids, num_experts: int, stream=None):
    """CUDA twin of ``moe.grouped_layout`` (same slot_row / tile_expert contract; rows within an
    expert's segment in any order: each row's result does not depend on its place)."""
    template, blocks, tiles = _layout_launch(expert_ids, num_experts)
    slot_row, tile_expert = _layout_kernel()(
        inputs=[expert_ids.reshape(-1).astype(mx.int32)], template=template,
        output_shapes=[(tiles * BM,), (tiles,)], output_dtypes=[mx.int32, mx.int32],
        grid=(blocks * RPB, 1, 1), threadgroup=(RPB, 1, 1), stream=stream,
    )
    return slot_row, tile_expert


def with_dequant_blocks(layout_source: str) -> str:
    """A layout kernel's blocks (the first BLOCKS), then the flat dequantize kernel's (``_dequant._CUDA_SOURCE_FLAT``,
    its block index counted from the end of the layout's), as one kernel."""
    from . import _dequant
    if _dequant._CUDA_SOURCE_FLAT.count("blockIdx.x") != 1:
        raise AssertionError("the flat dequantize source changed: it should name blockIdx.x once")
    return ("  if (blockIdx.x < BLOCKS) {\n" + layout_source + "  } else {\n"
            "  const unsigned fd_dq_block = blockIdx.x - BLOCKS;\n"
            + _dequant._CUDA_SOURCE_FLAT.replace("blockIdx.x", "fd_dq_block") + "  }\n")


@functools.cache
def _prologue_kernel(gather: bool, dequant: str):
    """The MoE prologue in one launch: the layout (+ the gather of x's routed rows and the GEMM's tensor maps)
    (+ the experts' dequantization: dequant "affine" / "fp", else "")."""
    from . import _dequant, _gemm_tma
    inputs, outputs = ["expert_ids"], ["slot_row", "tile_expert"]
    if gather:
        inputs, outputs = inputs + ["x", "w"], outputs + ["xs", "tmaps"]
    if dequant:
        inputs, outputs = (inputs if gather else inputs + ["w"]) + ["scales", "biases"], outputs + ["out"]
    source = layout_gather_source("out" if dequant else "w") if gather else _LAYOUT_SOURCE
    return mx.fast.cuda_kernel(
        name="flashdiff_moe_layout" + ("_gather" if gather else "") + (f"_dequant_{dequant}" if dequant else ""),
        input_names=inputs, output_names=outputs, source=with_dequant_blocks(source) if dequant else source,
        header=(_gemm_tma._MAP_HEADER if gather else "") + (_dequant.CUDA_KERNEL_HEADER if dequant else ""),
    )


def _joined_templates(*templates):
    """Template lists joined; a name two of them give must have the same value there."""
    out = {}
    for name, value in (pair for t in templates for pair in t):
        if name in out and out[name] != value:
            raise AssertionError(f"template argument {name}: {out[name]!r} and {value!r}")
        out[name] = value
    return list(out.items())


def moe_prologue(expert_ids, num_experts: int, *, x=None, a_div: int = 1, w=None, quantized=None, stream=None):
    """The MoE GEMM's prologue on CUDA in one launch: ``layout``'s schedule, plus
    - with x (rows, K): x's routed rows gathered into slot order (xs, what ``_gemm_tma.gather_slots`` writes) and
      the TMA GEMM's tensor maps over xs and the (dequantized) experts, each block copying the rows it placed
      (GATHER_RPB routed rows per block);
    - with quantized = (wq, scales, biases, bits, group_size, k, mode, dtype) (checked by ``check_quantized``): the
      experts dequantized by the flat dequantize kernel's blocks after the layout's (any mode), into dtype.
    The layout's blocks come first and are latency-bound, so they run beside the dequantization's memory-bound
    blocks instead of before them. Returns (slot_row, tile_expert, xs or None, maps or None, the experts: w, or
    the dequantized ones)."""
    from . import _dequant, _gemm_tma
    gather = x is not None
    template, blocks, tiles = _layout_launch(expert_ids, num_experts, GATHER_RPB if gather else RPB)
    inputs = [expert_ids.reshape(-1).astype(mx.int32)]
    shapes, dtypes = [(tiles * BM,), (tiles,)], [mx.int32, mx.int32]
    grid_blocks, dequant = blocks, ""
    if quantized is not None:
        wq, scales, biases, bits, group_size, k, mode, dtype = quantized
        affine = mode == "affine"
        dequant = "affine" if affine else "fp"
        dq_template, (dq_threads, _, _), (group, _, _) = _dequant._launch(
            dtype, scales.dtype if affine else mx.float32, wq.size // wq.shape[-1], k, bits, group_size, mode, True)
        if group != RPB:
            raise AssertionError(f"the layout's blocks ({RPB} threads) and the dequantize kernel's ({group}) differ")
        template = _joined_templates(template, dq_template)
        grid_blocks += -(-dq_threads // RPB)
        w_shape = (*wq.shape[:-1], k)
    else:
        w_shape = w.shape
    if gather:
        k_x = x.shape[-1]
        template = _joined_templates(template, [("K", k_x), ("A_DIV", a_div), ("SLOTS", tiles * BM),
                                      ("IS_BF16", x.dtype == mx.bfloat16), ("W_ROWS", w_shape[0] * w_shape[1])])
        inputs += [x, wq if quantized is not None else w]
        shapes, dtypes = shapes + [(tiles * BM, k_x), (_gemm_tma.MAP_BYTES,)], dtypes + [x.dtype, mx.uint8]
    if quantized is not None:
        inputs = (inputs if gather else inputs + [wq]) + [scales, biases if affine else _dequant._dummy_biases()]
        shapes, dtypes = shapes + [w_shape], dtypes + [dtype]
    outs = _prologue_kernel(gather, dequant)(
        inputs=inputs, template=template, output_shapes=shapes, output_dtypes=dtypes,
        grid=(grid_blocks * RPB, 1, 1), threadgroup=(RPB, 1, 1), stream=stream,
    )
    slot_row, tile_expert = outs[:2]
    xs, maps = (outs[2], outs[3]) if gather else (None, None)
    return slot_row, tile_expert, xs, maps, outs[-1] if quantized is not None else w


MOE_GATHER_CHOICES = ("layout", "kernel")


def gather_in_layout() -> bool:
    """Whether the MoE path gathers x's routed rows in the layout kernel's launch (``moe_prologue``): the GEMM engine
    is a TMA form that reads gathered rows ("wgmma persistent", the default on sm_90, or "wgmma tma") and
    FLASHDIFF_MOE_GATHER is "layout" (the default since session 12), not "kernel" (``_gemm_tma.gather_slots`` after
    the layout, for measurements)."""
    choice = os.environ.get("FLASHDIFF_MOE_GATHER", "layout")
    if choice not in MOE_GATHER_CHOICES:
        raise ValueError(f"FLASHDIFF_MOE_GATHER={choice!r}: use one of {MOE_GATHER_CHOICES}.")
    engine = os.environ.get("FLASHDIFF_GEMM_ENGINE") or default_engine()
    return choice == "layout" and engine in ("wgmma tma", "wgmma persistent")


@functools.cache
def _kernel():
    return mx.fast.cuda_kernel(
        name="flashdiff_grouped_gemm", input_names=["x", "w", "slot_row", "tile_expert"],
        output_names=["out"], source=_SOURCE, header=_HEADER, shared_memory=SMEM_BYTES,
    )


def supported(x, w) -> bool:
    """Shapes and dtypes the kernels take (else the caller keeps MLX ops)."""
    k, n = w.shape[-1], w.shape[-2]
    return x.dtype in (mx.bfloat16, mx.float16) and w.dtype == x.dtype and k % 8 == 0 and n % 8 == 0


@functools.cache
def is_sm90() -> bool:
    """Hopper (compute capability 9.0): the only architecture with wgmma.
    FLASHDIFF_NO_WGMMA=1 forces the mma.sync kernel (debugging)."""
    if os.environ.get("FLASHDIFF_NO_WGMMA"):
        return False
    info = mx.device_info()
    return (info.get("compute_capability_major"), info.get("compute_capability_minor")) == (9, 0)


ENGINES = ("mma", "wgmma", "wgmma wait", "wgmma ws", "wgmma tma", "wgmma persistent", "wgmma persistent gather")
# the TMA kernel's forms (``_gemm_tma.launch``) by engine
_TMA_FORMS = {"wgmma tma": "", "wgmma persistent": "_persistent", "wgmma persistent gather": "_persistent_gather"}


def group_m() -> int:
    """Row tiles per raster group (TILE_SETUP); FLASHDIFF_GEMM_GROUP_M overrides (measurements)."""
    return int(os.environ.get("FLASHDIFF_GEMM_GROUP_M", GROUP_M))


def default_engine() -> str:
    """The engine used when none is named and FLASHDIFF_GEMM_ENGINE is unset."""
    return "wgmma persistent" if is_sm90() else "mma"


def _template(x, k, n, a_div, direct, out_rows, threads):
    return [("T", x.dtype), ("IS_BF16", x.dtype == mx.bfloat16), ("K", k), ("N", n), ("A_DIV", a_div),
            ("DIRECT", direct), ("M_ROWS", out_rows), ("THREADS", threads), ("GROUP_M", group_m())]


DEQUANT_CHOICES = ("merged", "separate", "fused")


def dequant_choice() -> str:
    """How moe_gemm dequantizes quantized experts on CUDA (FLASHDIFF_GEMM_DEQUANT): "merged" (the default) in
    the layout kernel's launch (``moe_prologue``), "separate" by the dequantize kernel on its own
    before the layout (the default until session 12), "fused" inside the persistent GEMM (opt-in, slower)."""
    choice = os.environ.get("FLASHDIFF_GEMM_DEQUANT", "merged")
    if choice not in DEQUANT_CHOICES:
        raise ValueError(f"FLASHDIFF_GEMM_DEQUANT={choice!r}: use one of {DEQUANT_CHOICES}.")
    return choice


def quantized_gemm_available(x, scales, bits, group_size, mode, k, n, force=False) -> bool:
    """Whether ``grouped_gemm_quantized`` / ``dense_gemm_quantized`` take these weights here: sm_90 with the
    persistent engine (the default), affine 4 / 8-bit codes with scales in x.dtype (bf16 / fp16), K, N % 8.
    moe_gemm asks it; it answers yes only with FLASHDIFF_GEMM_DEQUANT=fused (opt-in: measured slower than
    dequantize + the bf16 GEMM in session 11, benchmarks/README.md); otherwise no, unless `force`
    (quantized_linear's FLASHDIFF_QLINEAR=persistent)."""
    from . import _gemm_tma_dequant_persistent as fused
    engine = os.environ.get("FLASHDIFF_GEMM_ENGINE") or default_engine()
    return ((dequant_choice() == "fused" or force) and is_sm90() and engine == "wgmma persistent"
            and fused.supported(x, scales, bits, group_size, mode, k, n))


def grouped_gemm_quantized(x, wq, slot_row, tile_expert, out_rows: int, a_div: int = 1, *, scales, biases, bits,
                           group_size, stream=None):
    """``grouped_gemm`` over quantized experts wq (E, N, K * bits / 32) with scales / biases (E, N, K / group_size):
    the persistent TMA GEMM whose storer warps dequantize the experts while it runs
    (``_gemm_tma_dequant_persistent``); only where ``quantized_gemm_available``."""
    from . import _gemm_tma, _gemm_tma_dequant_persistent as fused
    tiles = _tiles(slot_row, tile_expert)
    template = _template(x, x.shape[-1], wq.shape[1], a_div, False, out_rows, _gemm_tma.THREADS)
    return fused.launch(x, wq, scales, biases, bits, group_size, slot_row.astype(mx.int32),
                        tile_expert.astype(mx.int32), tiles, out_rows, template, False, a_div, stream)


def dense_gemm_quantized(x, wq, scales, biases, bits, group_size, *, stream=None):
    """x (M, K) @ dequantize(wq).T with the same kernel (slot s = row s); wq (N, K * bits / 32)."""
    from . import _gemm_tma, _gemm_tma_dequant_persistent as fused
    m, n = x.shape[0], wq.shape[0]
    tiles = -(-m // BM)
    dummy = mx.zeros((1,), dtype=mx.int32)
    template = _template(x, x.shape[-1], n, 1, True, m, _gemm_tma.THREADS)
    return fused.launch(x, wq[None], scales[None], biases[None], bits, group_size, dummy, dummy, tiles, m, template,
                        True, 1, stream)


def _launch(engine, x, w, slot_row, tile_expert, tiles, out_rows, a_div, direct, stream, maps=None):
    from . import _gemm_sm90, _gemm_tma
    engine = engine or os.environ.get("FLASHDIFF_GEMM_ENGINE") or default_engine()
    if engine not in ENGINES:
        raise ValueError(f"Unknown GEMM engine {engine!r}; use one of {ENGINES}.")
    if maps is not None and engine not in ("wgmma tma", "wgmma persistent"):
        raise ValueError(f"x gathered with its tensor maps is for the TMA engines that read gathered rows, not {engine!r}.")
    if tiles > 65535:  # CUDA's gridDim.y limit
        raise ValueError(f"{tiles} row tiles of {BM} exceed the 65535 the kernels launch; split the rows.")
    if engine == "mma":
        kernel, bn, threads = _kernel(), BN, THREADS
    elif engine in _TMA_FORMS:
        kernel, bn, threads = None, _gemm_tma.BN, _gemm_tma.THREADS
    elif engine == "wgmma ws":
        kernel, bn, threads = _gemm_sm90._kernel(True), _gemm_sm90.BN, _gemm_sm90.THREADS_WS
    else:
        kernel, bn, threads = _gemm_sm90._kernel(), _gemm_sm90.BN, _gemm_sm90.THREADS
    e, n, k = w.shape
    template = _template(x, k, n, a_div, direct, out_rows, threads)
    if engine in ("wgmma", "wgmma wait"):
        template.append(("MMA_IN_FLIGHT", engine == "wgmma"))
    if kernel is None:
        return _gemm_tma.launch(x, w, slot_row, tile_expert, tiles, out_rows, template, direct, a_div, stream,
                                _TMA_FORMS[engine], maps)
    (out,) = kernel(
        inputs=[x, w, slot_row, tile_expert], template=template,
        output_shapes=[(out_rows, n)], output_dtypes=[x.dtype],
        grid=(((n + bn - 1) // bn) * threads, tiles, 1), threadgroup=(threads, 1, 1), stream=stream,
    )
    return out


def grouped_gemm(x, w, slot_row, tile_expert, out_rows: int, a_div: int = 1, *, engine=None, stream=None,
                 gathered_maps=None):
    """x (rows_x, K); w (E, N, K); slot_row (tiles * BM,) int32; tile_expert (tiles,) int32.
    Returns (out_rows, N) in x.dtype: row slot_row[s] = x[slot_row[s] // a_div] @ w[tile_expert[s // BM]].T.
    Output rows that no slot names are left unwritten (``layout`` names every routed row once).
    engine: None (FLASHDIFF_GEMM_ENGINE if set, else "wgmma persistent" on sm_90, "mma" elsewhere), "mma"
    (mma.sync), "wgmma" / "wgmma wait" (cp.async loads, one / no MMA group in flight), "wgmma ws"
    (warp-specialised cp.async), "wgmma tma" (warp-specialised TMA, ``_gemm_tma``), its persistent
    forms "wgmma persistent" (the default on sm_90 since session 10: its epilogue overlaps the next tile's
    wgmmas) / "wgmma persistent gather" (measured slower; opt-in).
    gathered_maps: x is already in slot order with its tensor maps (``moe_prologue``'s xs and maps; the TMA engines
    "wgmma tma" / "wgmma persistent" only), so no gather kernel runs."""
    tiles = _tiles(slot_row, tile_expert)
    return _launch(engine, x, w, slot_row.astype(mx.int32), tile_expert.astype(mx.int32), tiles, out_rows,
                   a_div, False, stream, gathered_maps)


def _tiles(slot_row, tile_expert) -> int:
    """The grouped GEMMs' row tiles, once slot_row is checked against them."""
    tiles = tile_expert.shape[0]
    if slot_row.shape != (tiles * BM,):
        raise ValueError(f"slot_row must be ({tiles * BM},) for {tiles} tiles, got {slot_row.shape}.")
    return tiles


def dense_gemm(x, w, *, engine=None, stream=None):
    """x (M, K) @ w (N, K).T -> (M, N) in x.dtype with the same kernels (slot s = row s)."""
    m = x.shape[0]
    dummy = mx.zeros((1,), mx.int32)
    return _launch(engine, x, w.reshape(1, *w.shape[-2:]), dummy, dummy, (m + BM - 1) // BM, m, 1, True, stream)
