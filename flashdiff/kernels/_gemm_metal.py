"""The Metal twin of ``_gemm_cuda``'s grouped GEMM (the MoE product over routed rows).

STATUS: written and reviewed by reading only. It has NEVER been compiled or run on an Apple GPU
(this project has none). ``moe_gemm`` therefore never picks it automatically: on Metal the default
is ``moe.moe_sorted`` (MLX's own gather_mm / gather_qmm); ``backend="metal"`` /
``FLASHDIFF_KERNELS=metal`` forces this one. What has run is a CPU emulation of the kernel body
(tests/test_kernels_metal.py compiles the source below as C++ with a shim for the Metal builtins,
128 host threads per threadgroup) against ``moe.grouped_gemm_reference``.

Same contract as ``_gemm_cuda.grouped_gemm``: for every slot s with slot_row[s] >= 0,
    out[slot_row[s], n] = sum_k x[slot_row[s] / A_DIV, k] * w[tile_expert[s / BM], n, k]
with tiles of BM slots (tile_expert < 0: the tile is skipped), zero fill past K and for empty slots,
and rows no slot names left unwritten. The schedule (slot_row, tile_expert) comes from
``moe.grouped_layout`` with tile=BM (MLX ops, tested on every backend) instead of a layout kernel.

Algorithm, step by step the CUDA mma.sync kernel's with Metal's tools:
- one threadgroup = BM x BN = 64 x 64 outputs of one expert (CUDA: 128 x 128), 4 simdgroups in 2 x 2,
  each 32 x 32 as 4 x 4 ``simdgroup_matrix<float, 8, 8>`` accumulators (CUDA: 4 warps, 64 x 64 each);
- per BK = 16 slice of K: the threadgroup stages the slots' rows of x (A, [row][k]) and the expert's
  rows of w transposed (B, [k][n], so ``simdgroup_load`` needs no transpose) as float in threadgroup
  memory (24 KiB with the C tile below; CUDA stages bf16 with cp.async, four stages deep), the
  tile's slot rows read once into threadgroup memory;
- epilogue through a float C tile in threadgroup memory, written to each slot's output row.
No double buffering and scalar staging loads: simple to review, not tuned.
"""

import functools

import mlx.core as mx

BM, BN, BK, THREADS = 64, 64, 16, 128
DTYPES = (mx.float16, mx.bfloat16, mx.float32)

_HEADER = r"""
#include <metal_stdlib>
#include <metal_simdgroup>
#include <metal_simdgroup_matrix>
using fd_mat = metal::simdgroup_matrix<float, 8, 8>;
#define FD_UNROLL _Pragma("clang loop unroll(full)")
"""

_SOURCE = r"""
  constexpr int BM = 64, BN = 64, BK = 16, NT = 128;
  threadgroup float As[BM * BK];  // the tile's slots' rows of x, [row][k]
  threadgroup float Bs[BK * BN];  // the expert's rows of w transposed, [k][n]
  threadgroup float Cs[BM * BN];  // epilogue
  threadgroup int rows[BM];       // each slot's routed row (CUDA: a_src_row / slot_of), read once
  const int tile_n = int(threadgroup_position_in_grid.x), tile_m = int(threadgroup_position_in_grid.y);
  const int expert = tile_expert[tile_m];
  if (expert < 0) return;  // the whole threadgroup: a tile past the last expert's segment
  const uint tid = thread_index_in_threadgroup;
  const int sm = int(simdgroup_index_in_threadgroup) / 2, sn = int(simdgroup_index_in_threadgroup) % 2;
  for (uint r = tid; r < uint(BM); r += NT) rows[r] = slot_row[tile_m * BM + int(r)];
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);

  fd_mat acc[4][4];
  FD_UNROLL for (int i = 0; i < 4; ++i)
    FD_UNROLL for (int j = 0; j < 4; ++j) acc[i][j] = metal::make_filled_simdgroup_matrix<float, 8, 8>(0.0f);

  for (int k0 = 0; k0 < K; k0 += BK) {
    for (uint e = tid; e < uint(BM * BK); e += NT) {
      const int r = int(e) / BK, c = int(e) % BK, k = k0 + c;
      const int src = rows[r];
      As[e] = (src >= 0 && k < K) ? float(x[ulong(src / A_DIV) * K + k]) : 0.0f;
      const int n = tile_n * BN + r;
      Bs[c * BN + r] = (n < N && k < K) ? float(w[(ulong(expert) * N + n) * K + k]) : 0.0f;
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
    FD_UNROLL for (int kk = 0; kk < BK; kk += 8) {
      fd_mat a[4], b[4];
      FD_UNROLL for (int i = 0; i < 4; ++i) metal::simdgroup_load(a[i], As + (sm * 32 + i * 8) * BK + kk, BK);
      FD_UNROLL for (int j = 0; j < 4; ++j) metal::simdgroup_load(b[j], Bs + kk * BN + sn * 32 + j * 8, BN);
      FD_UNROLL for (int i = 0; i < 4; ++i)
        FD_UNROLL for (int j = 0; j < 4; ++j) metal::simdgroup_multiply_accumulate(acc[i][j], a[i], b[j], acc[i][j]);
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  }

  FD_UNROLL for (int i = 0; i < 4; ++i)
    FD_UNROLL for (int j = 0; j < 4; ++j)
      metal::simdgroup_store(acc[i][j], Cs + (sm * 32 + i * 8) * BN + sn * 32 + j * 8, BN);
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  for (uint e = tid; e < uint(BM * BN); e += NT) {
    const int r = int(e) / BN, c = int(e) % BN, n = tile_n * BN + c;
    const int dst = rows[r];
    if (dst >= 0 && n < N) out[ulong(dst) * N + n] = T(Cs[e]);
  }
"""

INPUT_NAMES = ("x", "w", "slot_row", "tile_expert")


def supported(x, w) -> bool:
    return x.dtype in DTYPES and w.dtype == x.dtype


def launch_params(x_shape, w_shape, dtype, tiles: int, out_rows: int, a_div: int) -> dict:
    """The kernel call's keyword arguments but ``inputs`` (pure Python: tested on every machine)."""
    e, n, k = w_shape
    if x_shape[-1] != k:
        raise ValueError(f"x {tuple(x_shape)} and w {tuple(w_shape)} disagree on K.")
    return dict(template=[("T", dtype), ("K", k), ("N", n), ("A_DIV", a_div)],
                output_shapes=[(out_rows, n)], output_dtypes=[dtype],
                grid=(((n + BN - 1) // BN) * THREADS, tiles, 1), threadgroup=(THREADS, 1, 1))


@functools.cache
def _kernel():
    return mx.fast.metal_kernel(name="flashdiff_grouped_gemm", input_names=list(INPUT_NAMES),
                                output_names=["out"], source=_SOURCE, header=_HEADER)


def grouped_gemm(x, w, slot_row, tile_expert, out_rows: int, a_div: int = 1, stream=None):
    """``_gemm_cuda.grouped_gemm``'s contract with BM = 64-slot tiles (``grouped_layout(ids, E, tile=BM)``).
    Untested on Apple hardware: see the module docstring."""
    if not mx.metal.is_available():
        raise RuntimeError("The Metal grouped GEMM needs MLX's Metal back-end (an Apple GPU); use the default "
                           "backend (CUDA kernels on NVIDIA, the reference on CPU).")
    tiles = tile_expert.shape[0]
    if slot_row.shape != (tiles * BM,):
        raise ValueError(f"slot_row must be ({tiles * BM},) for {tiles} tiles of {BM}, got {slot_row.shape}.")
    params = launch_params(x.shape, w.shape, x.dtype, tiles, out_rows, a_div)
    (out,) = _kernel()(inputs=[x, w, slot_row.astype(mx.int32), tile_expert.astype(mx.int32)], stream=stream,
                       **params)
    return out
