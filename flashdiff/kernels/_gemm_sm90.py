"""The grouped GEMM of ``_gemm_cuda`` for Hopper (sm_90a): warpgroup MMA (``wgmma``).

Same contract and template arguments as the mma.sync kernel in ``_gemm_cuda`` (slot rows, one
expert per 128-row tile, tile_expert < 0 skips a tile); ``_gemm_cuda._launch`` runs either. Inside:
- CTA tile BM x BN x BK = 128 x 256 x 64, two warpgroups (256 threads); each warpgroup owns 64 rows
  and issues ``wgmma.mma_async.m64n256k16`` with both operands read from shared memory through
  matrix descriptors (K-major, 128-byte swizzle; 128 float32 accumulators per thread).
- Shared tiles are [rows][64] bf16/fp16 = 128 bytes per row, 1024-byte aligned, the 16-byte chunk c
  of row r stored at chunk c ^ (r % 8): the layout the 128B-swizzle descriptor expects.
- Four stages filled by ``cp.async`` from all threads (two tiles ahead) while one wgmma group stays
  in flight (MMA_IN_FLIGHT): iteration k waits for tile k, fences the generic-proxy writes for the
  async proxy, synchronises, issues the loads of tile k + 2 into the stage wgmma k - 2 has
  released, then the four k16 wgmmas of tile k, and waits until at most one group (tile k) is
  pending. ptxas serialises consecutive wgmmas in this form (warning C7514); without it
  (engine "wgmma wait") the H200 measured the same within +-10% either way, shape by shape.
- Grouped raster (8 row tiles per group) so CTAs running together reuse both operands from L2.
- Epilogue through shared memory (rows padded by 8 elements), 16-byte stores to the slots' rows.
Measured (benchmarks/README.md, MoE): 456-505 TFLOP/s on dense problems at M >= 4608, where MLX's
cuBLAS GEMM reached 670-720 on the same leases. ``_SOURCE_WS`` (engine "wgmma ws": one producer
warpgroup, mbarrier hand-off to two consumer warpgroups) measured 410-470, so it is opt-in only.
Only sm_90 has wgmma. ``_gemm_tma`` (the same MMA block fed by TMA) measured 596-702 TFLOP/s and is
the default there; these cp.async forms stay selectable (engine=) for comparison.
"""

import functools

from ._gemm_cuda import CP_ASYNC_HEADER, TILE_SETUP
from ._jit import cuda_kernel

BM, BN, BK, STAGES, THREADS = 128, 256, 64, 4, 256
SMEM_BYTES = STAGES * (BM + BN) * BK * 2 + 1024  # + room to align the tiles to 1024 bytes


def wgmma_asm(name: str, n: int, dtype: str, a_regs: bool = False, trans_b: bool = False,
              overwrite: bool = False) -> str:
    """The inline-assembly wrapper ``name(d, ...)`` of one ``wgmma.mma_async.m64{n}k16`` form with float32
    accumulators (d: n / 2 per thread): A from shared memory (descriptor da) or from registers (a[4], the
    m64k16 A fragment); B by descriptor db, K-major, or MN-major (imm-trans-b = 1) when trans_b.
    overwrite: d = A . B (scale-d false: the hardware ignores d's values, so d needs no zeroing first; d stays a
    read-write operand, as CUTLASS passes it, so that the compiler keeps it in the same registers), else d += A . B."""
    acc = n // 2
    regs = ", ".join(f"%{i}" for i in range(acc))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(acc))
    if a_regs:
        sig, a_op, ins = "const unsigned (&a)[4], unsigned long long db", "{" + ", ".join(f"%{acc + i}" for i in range(4)) + "}", \
            '"r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db)'
        tail = f"%{acc + 4}, p, 1, 1, {int(trans_b)}"
    else:
        sig, a_op, ins = "unsigned long long da, unsigned long long db", f"%{acc}", '"l"(da), "l"(db)'
        tail = f"%{acc + 1}, p, 1, 1, 0, {int(trans_b)}"
    return (
        f"__device__ __forceinline__ void {name}(float (&d)[{acc}], {sig}) {{\n"
        f'  asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, {0 if overwrite else 1}, 0;\\n"\n'
        f'    "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{dtype}.{dtype} {{{regs}}}, {a_op}, {tail};\\n}}\\n"\n'
        f"    : {outs}\n"
        f"    : {ins});\n"
        "}\n"
    )


_HEADER = CP_ASYNC_HEADER + r"""
// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ unsigned long long fd_desc(unsigned addr) {
  return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}
// a descriptor moved `bytes` (a multiple of 16) further along shared memory: its low word's start address (16-byte
// units, 14 bits) grows; no carry leaves it while the address stays inside the 228 KB of shared memory. One integer
// add where fd_desc of the moved address takes three or four (CUTLASS's descriptor iterator does the same).
__device__ __forceinline__ unsigned long long fd_desc_add(unsigned long long desc, unsigned bytes) {
  return (desc & 0xFFFFFFFF00000000ull) | (unsigned)((unsigned)desc + (bytes >> 4));
}
__device__ __forceinline__ void fd_fence_acc(float (&d)[128]) {
#pragma unroll
  for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(d[i]) :: "memory");
}
__device__ __forceinline__ void fd_mbar_init(unsigned bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count));
}
__device__ __forceinline__ void fd_mbar_wait(unsigned bar, int parity) {
  asm volatile("{\n.reg .pred done;\nWAIT_%=:\n"
               "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
               "@!done bra WAIT_%=;\n}\n" :: "r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void fd_mbar_arrive(unsigned bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(bar) : "memory");
}
// arrives on the barrier once all earlier cp.async of this thread have landed
__device__ __forceinline__ void fd_mbar_arrive_cp_async(unsigned bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" :: "r"(bar) : "memory");
}
""" + wgmma_asm("fd_wgmma_bf16", 256, "bf16") + wgmma_asm("fd_wgmma_f16", 256, "f16") + r"""
// One K tile of this warpgroup's 64 x 256 block: d += A . B^T as KSTEPS k16 wgmmas on the swizzled
// shared tiles at a_addr / b_addr (rows of 128 bytes), committed as one wgmma group.
template <bool BF16, int KSTEPS>
__device__ __forceinline__ void fd_wgmma_tile(float (&d)[128], unsigned a_addr, unsigned b_addr) {
  fd_fence_acc(d);
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) {
    if (BF16) fd_wgmma_bf16(d, fd_desc(a_addr + kk * 32), fd_desc(b_addr + kk * 32));
    else fd_wgmma_f16(d, fd_desc(a_addr + kk * 32), fd_desc(b_addr + kk * 32));
  }
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
"""

_EPILOGUE = r"""
  // Epilogue: d[4j + {0,1}] is (row, 8j + col0 + {0,1}), d[4j + {2,3}] the same 8 rows below.
  constexpr int LDC = BN + 8;
  T* Cs = reinterpret_cast<T*>(fd_smem);
  const int row = wg * 64 + warp_in_wg * 16 + (lane >> 2), col0 = (lane & 3) * 2;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    const int c = 8 * j + col0;
    Cs[row * LDC + c] = (T)d[4 * j];
    Cs[row * LDC + c + 1] = (T)d[4 * j + 1];
    Cs[(row + 8) * LDC + c] = (T)d[4 * j + 2];
    Cs[(row + 8) * LDC + c + 1] = (T)d[4 * j + 3];
  }
  __syncthreads();
  const int chunk = tid & 31, col = tile_n * BN + chunk * 8;  // 32 chunks of 8 per row, 8 rows per pass
#pragma unroll 4
  for (int r = tid >> 5; r < BM; r += 8) {
    const int dst = slot_of(tile_m * BM + r);
    if (dst >= 0 && col < N)
      *reinterpret_cast<uint4*>(out + (size_t)dst * N + col) = *reinterpret_cast<const uint4*>(Cs + r * LDC + chunk * 8);
  }
"""

# The epilogue when a producer warpgroup has left: only the 256 consumer threads synchronise (named barrier 1).
_EPILOGUE_CONSUMERS = _EPILOGUE.replace("__syncthreads();", r'asm volatile("bar.sync 1, 256;\n" ::: "memory");')

# Warp-specialised variant: warpgroup 2 only loads (cp.async, completion signalled on a "full" mbarrier
# per stage), warpgroups 0 and 1 only multiply (each releases a stage on its "empty" mbarrier), so
# the two warpgroups are not lock-stepped by __syncthreads and one's wgmma fills the other's waits.
_SOURCE_WS = r"""
  constexpr int BM = 128, BN = 256, BK = 64, STAGES = 4;
  constexpr int A_BYTES = BM * BK * 2, STAGE_BYTES = (BM + BN) * BK * 2;
  extern __shared__ __align__(1024) unsigned char fd_smem_raw[];
  __shared__ __align__(8) unsigned long long full_bar[STAGES], empty_bar[STAGES];
  __shared__ int a_src_row[BM];
  unsigned char* fd_smem = fd_smem_raw + ((1024u - (fd_smem_addr(fd_smem_raw) & 1023u)) & 1023u);
  const unsigned smem_base = fd_smem_addr(fd_smem);
""" + TILE_SETUP + r"""
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int r = tid; r < BM; r += blockDim.x) {
    const int slot = slot_of(tile_m * BM + r);
    a_src_row[r] = slot < 0 ? -1 : slot / A_DIV;
  }
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      fd_mbar_init(fd_smem_addr(&full_bar[s]), 128);   // one cp.async arrival per producer thread
      fd_mbar_init(fd_smem_addr(&empty_bar[s]), 256);  // every consumer thread
    }
  }
  __syncthreads();
  constexpr int KT = (K + BK - 1) / BK;

  if (warp >= 8) {  // producer thread p loads chunk p % 8 of rows p / 8 + 16 i
    const T* wexp = w + (size_t)expert * N * K;
    const int kc = tid & 7, r0 = (tid - 256) >> 3;
    for (int kt = 0; kt < KT; ++kt) {
      const int s = kt % STAGES;
      fd_mbar_wait(fd_smem_addr(&empty_bar[s]), ((kt / STAGES) & 1) ^ 1);
      const unsigned a_dst = smem_base + s * STAGE_BYTES, b_dst = a_dst + A_BYTES;
      const int k = kt * BK + kc * 8;
      const bool k_ok = k < K;
#pragma unroll
      for (int i = 0; i < BM / 16; ++i) {
        const int r = r0 + 16 * i, src = a_src_row[r];
        const bool ok = k_ok && src >= 0;
        fd_cp_async16(a_dst + r * 128 + ((kc ^ (r & 7)) << 4), ok ? x + (size_t)src * K + k : x, ok);
      }
#pragma unroll
      for (int i = 0; i < BN / 16; ++i) {
        const int r = r0 + 16 * i, n = tile_n * BN + r;
        const bool ok = k_ok && n < N;
        fd_cp_async16(b_dst + r * 128 + ((kc ^ (r & 7)) << 4), ok ? wexp + (size_t)n * K + k : w, ok);
      }
      fd_mbar_arrive_cp_async(fd_smem_addr(&full_bar[s]));
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
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    const unsigned a_addr = smem_base + s * STAGE_BYTES + wg * 64 * 128, b_addr = smem_base + s * STAGE_BYTES + A_BYTES;
    fd_wgmma_tile<IS_BF16, BK / 16>(d, a_addr, b_addr);
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    fd_fence_acc(d);
    fd_mbar_arrive(fd_smem_addr(&empty_bar[s]));
  }
  asm volatile("bar.sync 1, 256;\n" ::: "memory");  // both warpgroups done reading the stages
""" + _EPILOGUE_CONSUMERS

_SOURCE = r"""
  constexpr int BM = 128, BN = 256, BK = 64, STAGES = 4;
  constexpr int A_BYTES = BM * BK * 2, STAGE_BYTES = (BM + BN) * BK * 2;
  extern __shared__ __align__(1024) unsigned char fd_smem_raw[];
  unsigned char* fd_smem = fd_smem_raw + ((1024u - (fd_smem_addr(fd_smem_raw) & 1023u)) & 1023u);
  const unsigned smem_base = fd_smem_addr(fd_smem);

""" + TILE_SETUP + r"""
  const int tid = threadIdx.x, wg = tid >> 7, lane = tid & 31, warp_in_wg = (tid & 127) >> 5;
  const T* wexp = w + (size_t)expert * N * K;

  // Loads: chunk kc = tid % 8 of rows tid / 8 + 32 * i: 4 rows of A, 8 rows of B per thread.
  const int kc = tid & 7, r0 = tid >> 3;
  const T* a_src[4];
  const T* b_src[8];
  bool a_ok[4], b_ok[8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int slot = slot_of(tile_m * BM + r0 + 32 * i), src = slot < 0 ? -1 : slot / A_DIV;
    a_ok[i] = src >= 0;
    a_src[i] = x + (size_t)(src < 0 ? 0 : src) * K + kc * 8;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int n = tile_n * BN + r0 + 32 * i;
    b_ok[i] = n < N;
    b_src[i] = wexp + (size_t)(n < N ? n : 0) * K + kc * 8;
  }
  auto load_tile = [&](int kt) {
    const unsigned a_dst = smem_base + (kt % STAGES) * STAGE_BYTES, b_dst = a_dst + A_BYTES;
    const bool k_ok = kt * BK + kc * 8 < K;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = r0 + 32 * i;
      const bool ok = k_ok && a_ok[i];
      fd_cp_async16(a_dst + r * 128 + ((kc ^ (r & 7)) << 4), ok ? a_src[i] + kt * BK : x, ok);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int r = r0 + 32 * i;
      const bool ok = k_ok && b_ok[i];
      fd_cp_async16(b_dst + r * 128 + ((kc ^ (r & 7)) << 4), ok ? b_src[i] + kt * BK : w, ok);
    }
  };

  float d[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) d[i] = 0.0f;

  constexpr int KT = (K + BK - 1) / BK;
  load_tile(0);
  fd_cp_async_commit();
  if (KT > 1) load_tile(1);
  fd_cp_async_commit();
  for (int kt = 0; kt < KT; ++kt) {
    fd_cp_async_wait<1>();  // tile kt has landed (tile kt + 1 may be in flight)
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();        // ... for every thread; and wgmma kt - 2 is done everywhere
    if (kt + 2 < KT) load_tile(kt + 2);
    fd_cp_async_commit();
    const unsigned a_addr = smem_base + (kt % STAGES) * STAGE_BYTES + wg * 64 * 128;
    const unsigned b_addr = smem_base + (kt % STAGES) * STAGE_BYTES + A_BYTES;
    fd_wgmma_tile<IS_BF16, BK / 16>(d, a_addr, b_addr);
    if (MMA_IN_FLIGHT) asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
    else asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    fd_fence_acc(d);
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  fd_fence_acc(d);
  fd_cp_async_wait<0>();
  __syncthreads();

""" + _EPILOGUE


THREADS_WS = 384  # two consumer warpgroups + one producer warpgroup


@functools.cache
def _kernel(warp_specialized: bool = False):
    return cuda_kernel(
        name="flashdiff_grouped_gemm_sm90" + ("_ws" if warp_specialized else ""),
        input_names=["x", "w", "slot_row", "tile_expert"], output_names=["out"],
        source=_SOURCE_WS if warp_specialized else _SOURCE, header=_HEADER, shared_memory=SMEM_BYTES,
    )
