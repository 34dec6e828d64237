"""The persistent TMA GEMM over quantized weights: its storer warps dequantize the weights while it runs.

``_gemm_tma_forms._SOURCE_PERSISTENT`` with one change of role: the weights come packed (affine 4 / 8-bit with
scales and biases in x.dtype: the dequantize kernel's paired path, ``_dequant.fd_dq_chunk``, bit-identical to
``mx.dequantize``) and are dequantized into an x.dtype scratch ``w_deq`` (E * N rows of K, an output of the
kernel) by the same kernel's storer warps, which otherwise sit idle through the wgmmas. The work is cut into
units (expert, column tile of 256 weight rows, k tile of 64): exactly the weight box one TMA load reads. Any
storer warp of any CTA claims the next unit from a global counter (``work[0]``), dequantizes it and counts it
done in its column's counter (``work[1 + column]``, after a fence: release). The TMA thread waits (acquire
load) once per tile, for the KT units of the tile's column, and orders its reads after them with a
generic-to-async proxy fence. (A wait before every k tile's load instead put an L2 round trip in front of
each stage and ran the MoE GEMM at 660 us, tensor pipe 49% busy: session 11.) A storer claims units while
the consumers compute the tile it is to store next (it polls the epilogue barrier between units), and the
rest once its CTA has no tile left; units of experts that no tile uses are counted unread. Deadlock-free
for any grid and residency: only TMA threads wait for units, and every running storer warp claims units
until none is left, each finished without waiting (a warp claims its next unit one ahead, and starts it at its
next poll, which no unbounded wait precedes: after a ready epilogue barrier come only the tile's stores).

Why: moe_gemm with quantized experts spends ~45 us dequantizing HiDream's 4 x 6912 x 2560 experts (141 MB
of bf16 written, memory-bound) before a ~400-416 us GEMM on the one stream (0.76-0.83x of a dense GEMM,
session 10); here the dequantization overlaps the wgmmas.
Measured (session 11, H200, benchmarks/README.md): exact, but slower, so opt-in (FLASHDIFF_GEMM_DEQUANT=fused
for moe_gemm, FLASHDIFF_QLINEAR=persistent for quantized_linear). Three storer warps per SM dequantize the
experts at ~1.3 TB/s at best (~110 us alone, against 45 us for the dequantize kernel's full occupancy); with
the first wave waiting ~20 us for its columns, the kernel takes 461-464 us against 445 us for dequantize kernel
+ GEMM under Nsight Compute; moe_gemm compiled + streamed 0.75x of dense against 0.80x for the default path;
quantized_linear at 1024 rows 0.48-0.71x of bf16 against 0.80-0.89x.

Each CTA encodes its own tensor map over ``w_deq`` (the scratch is this kernel's output, so no earlier
kernel knows its address) with ``_gemm_tma.publish_maps_code`` (warp 8, before its TMA thread starts).
The counters (``work``, 1 + E * column tiles int32) are zeroed by the kernel before it (``gather_slots`` for the
grouped form, ``tensor_maps`` for the dense one, each with `work` as an extra output) and passed in as an
input that this kernel then updates: a buffer nothing else reads.
"""

import functools

import mlx.core as mx

from . import _gemm_tma, _gemm_tma_forms
from ._dequant import DEQUANT_CODE, PAIRED_ASM, paired
from ._gemm_sm90 import BN
from ._jit import cuda_kernel

_HELPERS = r"""
// non-blocking: whether the phase of this parity has completed
__device__ __forceinline__ bool fd_mbar_test(unsigned bar, int parity) {
  unsigned done;
  asm volatile("{\n.reg .pred p;\nmbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
               : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  return done != 0u;
}
__device__ __forceinline__ int fd_ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
// the next two: for benchmarks/probe_dequant_persistent_variants.py ("relaxed_spin"); the kernel uses neither
__device__ __forceinline__ int fd_ld_relaxed(const int* p) {
  int v;
  asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void fd_fence_acq_rel() { asm volatile("fence.acq_rel.gpu;\n" ::: "memory"); }
// generic-proxy global writes (the storers' stores) ordered with async-proxy reads (TMA)
__device__ __forceinline__ void fd_fence_proxy_global() { asm volatile("fence.proxy.async.global;\n" ::: "memory"); }
"""

# launch bounds through the signature mx.fast.cuda_kernel writes (as _gemm_tma_dequant does): without them ptxas
# gave this kernel 170 registers, more than 384 threads may have (168)
_LAUNCH_BOUNDS = r"""
#undef __global__
#define __global__ __attribute__((global)) __launch_bounds__(384, 1)
"""
HEADER = _gemm_tma._GEMM_HEADER + PAIRED_ASM + DEQUANT_CODE + _HELPERS + _LAUNCH_BOUNDS

# One storer warp's unit: claim it, dequantize it, count it done. Lane l reads 16 bytes of codes (SEG elements
# of one weight row, within one scale group since K and the group are multiples of 32) per step, DQ_BATCH
# steps' loads in flight at once, from addresses clamped into the tensor (straight-line loads, no branches);
# the codes are then shuffled so that each store instruction writes 4 whole 128-byte rows (lane L: chunk L % 8
# of one row); slots outside the unit (rows past N, k past K) are not stored. Session 11 on the H200: with each
# lane storing its own 16-byte loads' output (32 half-written sectors per instruction) the stores alone took
# ~140 us of the kernel, the loads and arithmetic ~60 us (benchmarks/probe_dequant_persistent_variants.py).
_DEQUANT_UNIT = r"""
  // DEQUANT: unit u = (expert, column tile, KU k tiles), in that order of significance; UPC units per column
  constexpr int KU = 2, UPC = (KT + KU - 1) / KU, UNITS = E_COUNT * TILES_N * UPC, WORDS = K * BITS / 32;
  constexpr int SEG = 128 / BITS, CPL = SEG / 8, LPR = BK / SEG, RPS = 32 / LPR, STEPS = BN / RPS, DQ_BATCH = 8;
  int* counters = const_cast<int*>(work);  // zeroed by the kernel before this one; only this kernel reads it
  auto expert_used = [&](int e) {  // a tile multiplies by expert e (tile_expert ascends, -1s at the end)
    if (DIRECT) return true;
    int lo = 0, hi = TILES_M;
    while (lo < hi) {
      const int mid = (lo + hi) / 2, te = tile_expert[mid];
      if (te >= 0 && te < e) lo = mid + 1; else hi = mid;
    }
    return lo < TILES_M && tile_expert[lo] == e;
  };
  int next_u = -1, used_e = -1;  // this warp's next claimed unit (claimed one unit ahead); the expert last looked up
  bool used = false;
  auto dequant_unit = [&]() -> bool {  // whole warp; false once every unit is claimed
    int u = next_u;
    if (lane == 0) {
      if (u < 0) u = atomicAdd(counters, 1);
      next_u = u < UNITS ? atomicAdd(counters, 1) : UNITS;  // its latency overlaps this unit
    }
    u = __shfl_sync(0xffffffffu, u, 0);
    if (u >= UNITS) return false;
    const int column = u / UPC, e = column / TILES_N, row0 = column % TILES_N * BN;
    if (e != used_e) {
      used_e = e;
      used = expert_used(e);
    }
    if (used) {
      for (int kt = u % UPC * KU; kt < min(KT, u % UPC * KU + KU); ++kt) {
       const int k = kt * BK + lane % LPR * SEG;
       for (int b = 0; b < STEPS; b += DQ_BATCH) {  // step i: rows row0 + RPS i + lane / LPR
        uint4 q[DQ_BATCH];
        unsigned sb[DQ_BATCH];
#pragma unroll
        for (int j = 0; j < DQ_BATCH; ++j) {
          const int r = row0 + (b + j) * RPS + lane / LPR;
          const bool ok = r < N && k < K;
          const size_t row = (size_t)e * N + (ok ? r : 0), g = row * (K / GROUP) + (ok ? k : 0) / GROUP;
          q[j] = *reinterpret_cast<const uint4*>(wq + row * WORDS + (ok ? k : 0) * BITS / 32);
          sb[j] = (unsigned)*reinterpret_cast<const unsigned short*>(scales + g)
                | ((unsigned)*reinterpret_cast<const unsigned short*>(biases + g) << 16);
        }
        // stores: 4 rows x 8 chunks of 16 bytes per warp instruction (whole 128-byte rows), lane L writing chunk
        // L % 8 of row 4 i + L / 8 of step j, whose codes it takes from their loader with shuffles
        const int c = lane % 8, k_out = kt * BK + 8 * c, part = c % CPL * (BITS / 4);
#pragma unroll
        for (int j = 0; j < DQ_BATCH; ++j) {
#pragma unroll
          for (int i = 0; i < RPS / 4; ++i) {
            const int rl = 4 * i + lane / 8, src = rl * LPR + c / CPL, r = row0 + (b + j) * RPS + rl;
            unsigned qw[4] = {(unsigned)__shfl_sync(0xffffffffu, (int)q[j].x, src), (unsigned)__shfl_sync(0xffffffffu, (int)q[j].y, src),
                              (unsigned)__shfl_sync(0xffffffffu, (int)q[j].z, src), (unsigned)__shfl_sync(0xffffffffu, (int)q[j].w, src)};
            const unsigned sbv = (unsigned)__shfl_sync(0xffffffffu, (int)sb[j], src);
            const unsigned words[2] = {part == 0 ? qw[0] : part == 1 ? qw[1] : part == 2 ? qw[2] : qw[3], part == 0 ? qw[1] : qw[3]};
            if (r < N && k_out < K)
              *reinterpret_cast<uint4*>(w_deq + ((size_t)e * N + r) * K + k_out) =
                  fd_dq_chunk<IS_BF16, BITS>(words, __byte_perm(sbv, 0u, 0x1010), __byte_perm(sbv, 0u, 0x3232));
          }
        }
       }
      }
      fd_fence_proxy_global();
    }
    __syncwarp();
    if (lane == 0) {
      __threadfence();  // the warp's stores, then the count (release)
      atomicAdd(counters + 1 + column, 1);
    }
    return true;
  };
"""

# (anchor in _SOURCE_PERSISTENT, what replaces it): each anchor occurs once
_EDITS = [
    ("  T* epi = reinterpret_cast<T*>(fd_smem + STAGES * STAGE_BYTES);  // the finished tile, BM rows of EPI_LD\n",
     None),  # + _DEQUANT_UNIT after it
    ("      fd_mbar_wait(fd_smem_addr(&epi_full), n_t & 1);\n",
     "      for (;;) {  // units while the consumers finish the tile\n"
     "        int ready = lane == 0 ? (int)fd_mbar_test(fd_smem_addr(&epi_full), n_t & 1) : 0;\n"
     "        if (__shfl_sync(0xffffffffu, ready, 0) || !dequant_unit()) break;\n"
     "      }\n"
     "      fd_mbar_wait(fd_smem_addr(&epi_full), n_t & 1);\n"),
    ("      ++n_t;\n    }\n    return;\n  }\n",
     "      ++n_t;\n    }\n    while (dequant_unit()) {}  // units nobody has claimed yet\n    return;\n  }\n"),
    ("    if (!GATHER_A && p != 0) return;\n    if (p == 0) {\n      fd_acquire_map(maps);\n      fd_acquire_map(maps + 128);\n    }\n",
     "    const unsigned long long b_map = fd_maps_addr(wmaps) + 128ull * blockIdx.x;  // this CTA's map over w_deq\n"
     + _gemm_tma.publish_maps_code([("w_deq", "W_ROWS", 256)], "b_map", "wmap").replace("\n", "\n  ")[:-2]
     + "    if (p != 0) return;\n    fd_acquire_map(maps);\n    fd_acquire_map(b_map);\n"),
    ("      const int b_row = expert * N + tile_n * BN;\n",
     "      const int b_row = expert * N + tile_n * BN;\n"
     "      while (fd_ld_acquire(work + 1 + expert * TILES_N + tile_n) < UPC) __nanosleep(64);  // its weights are in w_deq\n"
     "      fd_fence_proxy_global();\n"),
    ("fd_tma_load(a_dst + A_BYTES, maps + 128, kt * BK, b_row, full);",
     "fd_tma_load(a_dst + A_BYTES, b_map, kt * BK, b_row, full);"),
]


def _source() -> str:
    src = _gemm_tma_forms._SOURCE_PERSISTENT
    for anchor, new in _EDITS:
        if src.count(anchor) != 1:
            raise AssertionError(f"the persistent source changed: {anchor!r} occurs {src.count(anchor)} times")
        src = src.replace(anchor, anchor + _DEQUANT_UNIT if new is None else new)
    return src


SOURCE = _source()


def supported(x, scales, bits, group_size, mode, k, n) -> bool:
    """What the kernel takes: x bf16 / fp16, affine 4 / 8-bit codes with scales in x.dtype, K and N % 8."""
    return paired(x.dtype, scales.dtype, bits, mode) and k % 8 == 0 and n % 8 == 0


def work_ints(experts: int, n: int) -> int:
    """Length of the counter array: the claim counter + one count of finished units per column tile."""
    return 1 + experts * -(-n // BN)


@functools.cache
def _kernel():
    return cuda_kernel(
        name="flashdiff_grouped_gemm_tma_persistent_dequant",
        input_names=["x", "wq", "scales", "biases", "slot_row", "tile_expert", "tmaps", "work"],
        output_names=["out", "w_deq", "wmaps"], source=SOURCE, header=HEADER,
        shared_memory=_gemm_tma_forms.SMEM_BYTES_PERSISTENT,
    )


def launch(x, wq, scales, biases, bits, group_size, slot_row, tile_expert, tiles, out_rows, template, direct, a_div,
           stream=None):
    """``_gemm_tma.launch``'s persistent form over quantized weights wq (E, N, K * bits / 32) with scales /
    biases (E, N, K / group_size) in x.dtype; template as ``_gemm_cuda._launch`` builds it. Returns out."""
    e, n = wq.shape[0], wq.shape[1]
    k = x.shape[-1]
    counters = work_ints(e, n)
    if direct:
        maps, work = _gemm_tma.tensor_maps(x, None, stream, work=counters)
    else:
        x, maps, work = _gemm_tma.gather_slots(x, slot_row, a_div, None, stream, work=counters)
    tiles_n = -(-n // BN)
    grid = min(tiles * tiles_n, _gemm_tma.num_sms())
    template = template + [("TILES_M", tiles), ("GATHER_A", False), ("W_ROWS", e * n), ("E_COUNT", e), ("BITS", bits),
                           ("GROUP", group_size)]
    out, _, _ = _kernel()(
        inputs=[x, wq, scales, biases, slot_row, tile_expert, maps, work], template=template,
        output_shapes=[(out_rows, n), (e, n, k), (128 * grid + 128,)], output_dtypes=[x.dtype, x.dtype, mx.uint8],
        grid=(grid * _gemm_tma.THREADS, 1, 1), threadgroup=(_gemm_tma.THREADS, 1, 1), stream=stream,
    )
    return out
