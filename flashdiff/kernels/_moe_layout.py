"""The MoE GEMM's routing layout on CUDA, and the launch that also gathers and dequantizes its inputs.

``layout`` (the CUDA twin of ``moe.grouped_layout``): slot_row and tile_expert for ``_gemm_cuda.grouped_gemm``,
built on the device in one small kernel: the routed rows grouped by expert, each expert's segment padded to whole
BM-row tiles, a block per RPB routed rows, each block counting all rows itself so that none waits for another
(6.8 us for HiDream's 8192 routed rows on the H200 in session 10, where one block took 13 us); static shapes and
no host synchronisation.

``moe_prologue`` (session 12, what moe_gemm runs on CUDA): the same kernel in one launch with
- the gather of x's routed rows into slot order for the TMA GEMMs (``_gemm_tma``'s xs and tensor maps): the
  kernel has four times the blocks (GATHER_RPB routed rows each) and each copies the rows it has just placed;
- for quantized experts, the flat dequantize kernel's blocks (``_dequant._CUDA_SOURCE_FLAT``) after the layout's,
  so the latency-bound layout runs beside the memory-bound dequantization.
Nsight Compute on the H200 (benchmarks/README.md, session 12): layout + gather 23.5-24.3 us in one launch
(6.8 + 19 us apart), with the dequantization 62.6-64.3 us (46 + 7 + 19 us apart); moe_gemm over quantized experts
0.82-0.84x of a dense GEMM of the same FLOPs against 0.76-0.78x with the dequantize kernel on its own.
"""

import functools
import os

import mlx.core as mx

from ._gemm_cuda import BM, default_engine
from ._jit import cuda_kernel

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
    return cuda_kernel(name="flashdiff_moe_layout", input_names=["expert_ids"],
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
    return cuda_kernel(
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
