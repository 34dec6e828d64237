"""Tensor-core GEMMs for CUDA with row indirection: the grouped (MoE) GEMM and the dense GEMM.

Grouped: for every padded slot s with slot_row[s] >= 0 (the routed row r)

    out[r, n] = sum_k x[r // A_DIV, k] * w[tile_expert[s // BM], n, k]

Slots come in tiles of BM = 128 rows and one tile multiplies by one expert's (N, K) weight
(tile_expert[tile] < 0: the whole tile is skipped; slot_row[s] < 0: an empty slot, nothing
written). ``_moe_layout.layout`` builds slot_row and tile_expert on the device (rows grouped by expert, each
expert's segment padded to whole tiles), and ``_moe_layout.moe_prologue`` (what moe_gemm runs) does so in the
launch that also gathers x's routed rows for the TMA GEMMs and dequantizes quantized experts, so the GEMM runs
only the routed rows (plus at most BM - 1 padding rows per expert) with static shapes and no host sync. A_DIV =
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

from ._jit import cuda_kernel
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


@functools.cache
def _kernel():
    return cuda_kernel(
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
