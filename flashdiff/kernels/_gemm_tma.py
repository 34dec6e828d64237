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
gather kernel, or a one-warp kernel ``tensor_maps`` for the dense form; ``publish_maps_code`` writes
that warp's code, which ``_gemm_mixed`` runs in each CTA): a zeroed map in shared memory, every field
set with ``tensormap.replace``, copied to global memory with a release fence; the GEMM acquires it
(``fence.proxy.tensormap``) before use. Hopper only (sm_90a PTX).
Measured on the H200 (benchmarks/README.md): 596-702 TFLOP/s on dense problems at M >= 4608 (MLX's
cuBLAS GEMM 0.86-1.01x of it on the same leases), bit-identical to MLX's GEMM; the cp.async kernels
of ``_gemm_sm90`` reached 456-505. Nsight Compute at the MoE shape (session 5): this kernel keeps the
tensor pipe 75.6% busy (446 us at 1.65 GHz) where cuBLAS's 192x192, 2x1-cluster kernel for the dense
GEMM of the same FLOPs keeps it 90.6% busy (370 us at 1.62 GHz).

``_gemm_tma_forms._SOURCE_PERSISTENT`` (engine "wgmma persistent", the default on sm_90 since session 10):
one CTA per multiprocessor walks the tiles, the producer's stage ring running on across tiles, and the
consumers hand each finished tile to three storer warps through a shared-memory buffer, so its stores
overlap the next tile's wgmmas: 416-418 us for the MoE GEMM above under Nsight Compute (tensor pipe 86.7%
busy) against 449 us (78.7%) for this kernel in the same run. Its session 5 form, which stored from
registers, ran at 456 us. Engine "wgmma persistent gather" (opt-in) copies x's routed rows with cp.async
in the producer warpgroup instead of reading gathered rows (455-460 us in session 12 against 405-414 us + the
gather). For moe_gemm the rows are gathered by the layout kernel's launch (``_moe_layout.moe_prologue``, which
passes its xs and maps to ``launch``), or by ``gather_slots`` under FLASHDIFF_MOE_GATHER=kernel.
(A 2-CTA cluster form was tried and removed in session 6: see ``_gemm_tma_forms``.)
"""

import functools
import os

import mlx.core as mx

from ._gemm_cuda import TILE_SETUP
from ._gemm_sm90 import _EPILOGUE_CONSUMERS, _HEADER, BN, BK, BM, STAGES
from ._jit import cuda_kernel

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


def publish_maps_code(maps, dst: str = "fd_maps_addr(tmaps)", name: str = "maps") -> str:
    """Body code for one warp (all 32 lanes): encode the tensor maps `maps`, each (pointer, rows, box rows)
    over a row-major (rows, K) tensor of IS_BF16's 2-byte type, in shared memory, then publish them at the
    128-byte-aligned global address `dst` (an expression), 128 bytes apart, with the release fence that
    the user's ``fd_acquire_map`` pairs with."""
    zero = "".join(f"    {name}[lane{f' + {32 * i}' if i else ''}] = 0u;\n" for i in range(len(maps)))
    fills = "".join(f"      fd_tmap_fill<IS_BF16>(s0{f' + {128 * i}' if i else ''}, {ptr}, K, {rows}, 2ull * K, {box});\n"
                    for i, (ptr, rows, box) in enumerate(maps))
    copies = "".join(
        '    asm volatile("tensormap.cp_fenceproxy.global.shared::cta.tensormap::generic.release.gpu.sync.aligned [%0], [%1], 128;"\n'
        f'                 :: "l"(g{f" + {128 * i}" if i else ""}), "r"(s0{f" + {128 * i}" if i else ""}) : "memory");\n'
        for i in range(len(maps)))
    return f"""
  {{
    __shared__ __align__(128) unsigned {name}[{32 * len(maps)}];
    const int lane = threadIdx.x & 31;
{zero}    __syncwarp();
    const unsigned s0 = (unsigned)__cvta_generic_to_shared({name});
    if (lane == 0) {{
{fills}    }}
    __syncwarp();
    const unsigned long long g = {dst};
{copies}  }}
"""


def _maps_code(a: str, a_rows: str) -> str:
    """One warp encodes the GEMM's tensor maps into `tmaps`: map 0 = `a` as (a_rows, K), boxes of 128
    rows; map 1 = w as (W_ROWS = E * N, K), boxes of 256 rows."""
    return publish_maps_code([(a, a_rows, 128), ("w", "W_ROWS", 256)])


_MAPS_SOURCE = _maps_code("x", "X_ROWS")  # dense form: launched with one warp
# the quantized form's (``_gemm_tma_dequant_persistent``): the map over x alone, and its counters zeroed
_ZERO_WORK = r"""
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < WORK; i += gridDim.x * blockDim.x) work[i] = 0;
"""
_MAPS_SOURCE_WORK = publish_maps_code([("x", "X_ROWS", 128)]) + _ZERO_WORK

# Grouped form: xs[s] = x[slot_row[s] / A_DIV] for every slot naming a row, CPT 16-byte chunks per
# thread (empty slots are left as they are: their products are never stored); warp 0 of block 0
# first encodes the maps over xs and w.
_GATHER_ROWS = r"""
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
_GATHER_SOURCE = "\n  if (blockIdx.x == 0 && threadIdx.x < 32)\n" + _maps_code("xs", "SLOTS") + _GATHER_ROWS
_GATHER_SOURCE_WORK = ("\n  if (blockIdx.x == 0 && threadIdx.x < 32)\n" + publish_maps_code([("xs", "SLOTS", 128)]) + _ZERO_WORK
                       + _GATHER_ROWS)

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

# The consumer warpgroups' K loop (shared with _gemm_tma_dequant): wait for a stage, issue its wgmmas with one
# group in flight, release the stage the previous group used.
_CONSUMER_LOOP = r"""  // consumers: warpgroup wg owns rows wg * 64 .. + 63 of the tile
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

""" + _CONSUMER_LOOP + _EPILOGUE_CONSUMERS


@functools.cache
def _maps_kernel(work: bool = False):
    if work:  # the x map alone + the quantized form's counters
        return cuda_kernel(name="flashdiff_gemm_tensor_maps_work", input_names=["x"],
                           output_names=["tmaps", "work"], source=_MAPS_SOURCE_WORK, header=_MAP_HEADER)
    return cuda_kernel(name="flashdiff_gemm_tensor_maps", input_names=["x", "w"], output_names=["tmaps"],
                       source=_MAPS_SOURCE, header=_MAP_HEADER)


@functools.cache
def _gather_kernel(work: bool = False):
    if work:
        return cuda_kernel(name="flashdiff_gather_slots_work", input_names=["x", "slot_row"],
                           output_names=["xs", "tmaps", "work"], source=_GATHER_SOURCE_WORK, header=_MAP_HEADER)
    return cuda_kernel(name="flashdiff_gather_slots", input_names=["x", "slot_row", "w"],
                       output_names=["xs", "tmaps"], source=_GATHER_SOURCE, header=_MAP_HEADER)


@functools.cache
def _kernel(form: str = ""):
    from . import _gemm_tma_forms as forms
    source = {"": _SOURCE, "_persistent": forms._SOURCE_PERSISTENT}[form]
    return cuda_kernel(
        name="flashdiff_grouped_gemm_tma" + form, input_names=["x", "w", "slot_row", "tile_expert", "tmaps"],
        output_names=["out"], source=source, header=_GEMM_HEADER,
        shared_memory=forms.SMEM_BYTES_PERSISTENT if form else SMEM_BYTES,
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


def _map_template(x, w):
    return [("IS_BF16", x.dtype == mx.bfloat16), ("K", x.shape[-1]), ("W_ROWS", w.shape[0] * w.shape[1])]


def tensor_maps(x, w, stream=None, work=0):
    """The dense form's TMA tensor maps, encoded on the device by one warp: (MAP_BYTES,) uint8 with
    x as (rows, K) and w (E, N, K) as (E * N, K) in boxes of 256 rows.
    work > 0 (``_gemm_tma_dequant_persistent``, w None): the map over x alone, and (work,) int32 zeros."""
    if work:
        return _maps_kernel(True)(
            inputs=[x], template=[("IS_BF16", x.dtype == mx.bfloat16), ("K", x.shape[-1]), ("X_ROWS", x.shape[0]),
                                  ("WORK", work)],
            output_shapes=[(MAP_BYTES,), (work,)], output_dtypes=[mx.uint8, mx.int32], grid=(32, 1, 1),
            threadgroup=(32, 1, 1), stream=stream,
        )
    (maps,) = _maps_kernel()(
        inputs=[x, w], template=_map_template(x, w) + [("X_ROWS", x.shape[0])],
        output_shapes=[(MAP_BYTES,)], output_dtypes=[mx.uint8], grid=(32, 1, 1), threadgroup=(32, 1, 1),
        stream=stream,
    )
    return maps


def gather_slots(x, slot_row, a_div, w, stream=None, work=0):
    """The grouped form's input: x's rows in slot order (slots * BM rows; rows of empty slots unset), so
    TMA reads each tile as one box, and the tensor maps over it and w (as ``tensor_maps``).
    work > 0 (w None): the map over xs alone, and (work,) int32 zeros as a third output."""
    slots, k = slot_row.shape[0], x.shape[-1]
    cpt = next(c for c in (4, 2, 1) if (k // 8) % c == 0)
    template = [("T", x.dtype), ("SLOTS", slots), ("A_DIV", a_div), ("CPT", cpt)]
    launch = dict(grid=(max(slots * k // 8 // cpt, 32), 1, 1), threadgroup=(256, 1, 1), stream=stream)
    if work:
        return _gather_kernel(True)(
            inputs=[x, slot_row], template=template + [("IS_BF16", x.dtype == mx.bfloat16), ("K", k), ("WORK", work)],
            output_shapes=[(slots, k), (MAP_BYTES,), (work,)], output_dtypes=[x.dtype, mx.uint8, mx.int32], **launch)
    xs, maps = _gather_kernel()(
        inputs=[x, slot_row, w], template=template + _map_template(x, w),
        output_shapes=[(slots, k), (MAP_BYTES,)], output_dtypes=[x.dtype, mx.uint8], **launch,
    )
    return xs, maps


def launch(x, w, slot_row, tile_expert, tiles, out_rows, template, direct, a_div, stream, form="", maps=None):
    """Run the TMA kernel with ``_gemm_cuda._launch``'s template: x is used as it is for the dense
    form (row s = slot s), gathered into slot order first for the grouped one (unless `maps` is given: then x
    is gathered already and these are its tensor maps, ``_moe_layout.moe_prologue``). form: "" (one CTA per
    tile), "_persistent" / "_persistent_gather" (one CTA per multiprocessor walks the tiles; the gather
    form copies x's routed rows in the producer, no gather kernel)."""
    n = w.shape[1]
    gather_a = form == "_persistent_gather"
    if maps is None and (direct or gather_a):
        maps = tensor_maps(x, w, stream)
    elif maps is None:
        x, maps = gather_slots(x, slot_row, a_div, w, stream)
    tiles_n = (n + BN - 1) // BN
    if form.startswith("_persistent"):
        template = template + [("TILES_M", tiles), ("GATHER_A", gather_a)]
        grid = (min(tiles * tiles_n, num_sms()) * THREADS, 1, 1)
    else:
        grid = (tiles_n * THREADS, tiles, 1)
    (out,) = _kernel(form.replace("_gather", ""))(
        inputs=[x, w, slot_row, tile_expert, maps], template=template, output_shapes=[(out_rows, n)],
        output_dtypes=[x.dtype], grid=grid, threadgroup=(THREADS, 1, 1), stream=stream,
    )
    return out
