"""Run a Hopper TMA / wgmma kernel body on the CPU: the body compiled as C++ against a shim of the
device functions it calls (tests only; see tests/test_cuda_emulation.py).

What the shim models, one CTA at a time with one host thread per GPU thread:
- shared memory: `__shared__` objects and the dynamic buffer are static arrays (the program is built
  without PIE, so their addresses fit the kernels' 32-bit shared addresses);
- mbarriers (count, pending arrivals, transaction bytes, phase; `try_wait.parity` as the PTX ISA
  defines it), with a timeout that fails the run instead of hanging;
- plain bulk copies (cp.async.bulk) of 16-byte multiples, completing on their mbarrier at once;
- TMA tile loads: a box of rows x 64 two-byte elements, zero fill outside the tensor, written with
  the 128-byte swizzle (16-byte chunk c of the row at byte offset a lands at chunk c ^ ((a >> 7) & 7));
  the tensor map is the shim's own record, built by `fd_tmap_fill` and copied like the real one;
- wgmma m64nNk16 with float32 accumulators, run at the wait_group that retires it (as late as the
  hardware may: a stage released or an operand changed too early shows): A and B read through their shared-memory addresses with the same swizzle, 8-row groups
  1024 bytes apart (what `fd_desc` encodes), or A from the registers of the warpgroup's threads in the
  m64k16 A-fragment layout; each thread's accumulator elements in the m64nN layout;
- cp.async (16-byte copies landing at the cp.async.wait_group that retires them), ldmatrix x4 and
  mma.sync m16n8k16 in their PTX fragment layouts (the Ampere-style GEMM);
- warp shuffles and matches, integer atomics, acquire loads of global counters (spun on with a
  timeout), __syncwarp, __syncthreads and 256-thread named barriers (bar.sync, bar.arrive).
The model is the one the kernels are written against; `test_cuda_emulation.py` first runs the TMA
GEMM, which is exact on the H200, through it, so a wrong model shows up there, except in what the GEMM
does not use: the register-A operand (the PTX ISA's m64k16 A fragment, read from each issuing thread's
registers as they are when the group retires), which the attention's P . V (session 7) and the
mixed-input GEMM (session 9) use and which passed their GPU tests as modelled here.
"""

import re
from pathlib import Path

import numpy as np

from helpers import compile_and_run_cpp, template_lines

SHIM = r"""
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

struct __nv_bfloat16 {
  uint16_t x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) {
    uint32_t u; std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { x = 0x7fc0; return; }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    x = (uint16_t)(u >> 16);
  }
  operator float() const { uint32_t u = (uint32_t)x << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
struct __half {
  uint16_t x;
  __half() = default;
  __half(float f) { _Float16 h = (_Float16)f; std::memcpy(&x, &h, 2); }
  operator float() const { _Float16 h; std::memcpy(&h, &x, 2); return (float)h; }
};
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
static inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }
struct emu_dim3 { unsigned x, y, z; };
thread_local emu_dim3 threadIdx;
emu_dim3 blockIdx, blockDim, gridDim;
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
#define __device__
#define __forceinline__ inline
using std::max;
using std::min;

[[noreturn]] static void emu_fail(const char* what) { std::fprintf(stderr, "emulation: %s\n", what); std::exit(3); }

struct EmuBarrier {  // a reusable barrier for `count` threads
  std::mutex m; std::condition_variable cv; int count = 0, arrived = 0; long gen = 0;
  void wait() {
    std::unique_lock<std::mutex> lk(m);
    long g = gen;
    if (++arrived == count) { arrived = 0; ++gen; cv.notify_all(); return; }
    if (!cv.wait_for(lk, std::chrono::seconds(20), [&] { return gen != g; })) emu_fail("barrier timed out (a thread never arrived)");
  }
  void arrive() {  // bar.arrive: counts towards the barrier without waiting for it
    std::lock_guard<std::mutex> lk(m);
    if (++arrived == count) { arrived = 0; ++gen; cv.notify_all(); }
  }
};
static EmuBarrier emu_cta, emu_named[16], emu_warp[32], emu_wg[8], emu_consumers384;
static inline unsigned emu_tid_early();
static float emu_shfl[1024];
// each thread's register-A fragments ([k16 step][4 registers]) per issued register-A wgmma group, kept
// until the group retires (a ring: at most a few groups are in flight); the n-th group of every thread
// of a warpgroup is the same wgmma, so lane src's fragments of group n are emu_afrag_hist[src][n % 8]
static const unsigned* emu_afrag_hist[1024][8];
thread_local unsigned emu_afrag_seq = 0;
static inline unsigned emu_afrag_issue(const unsigned* a) {
  const unsigned n = emu_afrag_seq++;
  emu_afrag_hist[emu_tid_early()][n % 8] = a;
  return n;
}

alignas(1024) static unsigned char emu_dyn_smem[240 * 1024];

static inline unsigned emu_tid() { return threadIdx.x; }
static inline unsigned emu_tid_early() { return threadIdx.x; }
static inline void __syncthreads() { emu_cta.wait(); }
static inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp[emu_tid() / 32].wait(); }
static inline float __shfl_xor_sync(unsigned, float v, int m) {
  const unsigned t = emu_tid();
  emu_shfl[t] = v;
  emu_warp[t / 32].wait();
  const float r = emu_shfl[(t & ~31u) | ((t & 31u) ^ (unsigned)m)];
  emu_warp[t / 32].wait();
  return r;
}
static inline void emu_bar_sync(int id) { emu_named[id].wait(); }
static inline void fd_bar_sync(int id) { emu_named[id].wait(); }  // the attention's 256-thread named barriers
static inline void fd_bar_arrive(int id) { emu_named[id].arrive(); }
static inline void fd_regs_producer() {}  // setmaxnreg: registers are no resource here
template <bool B> struct fd_flag { static constexpr bool value = B; };  // as in _attention_sm90._HEADER
static inline void fd_regs_consumer() {}
static int emu_shfl_i[1024];
static inline int __shfl_sync(unsigned, int v, int src) {
  const unsigned t = emu_tid();
  emu_shfl_i[t] = v;
  emu_warp[t / 32].wait();
  const int r = emu_shfl_i[(t & ~31u) | ((unsigned)src & 31u)];
  emu_warp[t / 32].wait();
  return r;
}
static inline unsigned __match_any_sync(unsigned, int v) {  // the lanes holding the same value
  const unsigned t = emu_tid(), w0 = t & ~31u;
  emu_shfl_i[t] = v;
  emu_warp[t / 32].wait();
  unsigned m = 0;
  for (unsigned l = 0; l < 32; ++l) m |= (emu_shfl_i[w0 + l] == v ? 1u : 0u) << l;
  emu_warp[t / 32].wait();
  return m;
}
static inline int __any_sync(unsigned, int pred) {  // some lane of the warp holds a true predicate
  const unsigned t = emu_tid(), w0 = t & ~31u;
  emu_shfl_i[t] = pred != 0;
  emu_warp[t / 32].wait();
  int any = 0;
  for (unsigned l = 0; l < 32; ++l) any |= emu_shfl_i[w0 + l];
  emu_warp[t / 32].wait();
  return any;
}
static inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
// cross-CTA flags (the quantized persistent GEMM's units): a spin on a flag fails the run after 20 s
thread_local bool emu_spinning = false;
thread_local std::chrono::steady_clock::time_point emu_spin_since;
static inline int fd_ld_acquire(const int* p) {
  const int v = std::atomic_ref<int>(*const_cast<int*>(p)).load(std::memory_order_acquire);
  if (v != 0) emu_spinning = false;
  return v;
}
static inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
static inline void fd_fence_proxy_global() {}  // one proxy here
static inline void __nanosleep(unsigned) {
  const auto now = std::chrono::steady_clock::now();
  if (!emu_spinning) { emu_spinning = true; emu_spin_since = now; }
  else if (now - emu_spin_since > std::chrono::seconds(20)) emu_fail("spin wait on a flag timed out (a unit never done)");
  std::this_thread::sleep_for(std::chrono::microseconds(20));
}

static inline unsigned fd_smem_addr(const void* p) {
  const uintptr_t a = (uintptr_t)p;
  if (a >> 32) emu_fail("a shared address does not fit 32 bits (build without PIE)");
  return (unsigned)a;
}
static inline unsigned __cvta_generic_to_shared(const void* p) { return fd_smem_addr(p); }
static inline unsigned char* emu_ptr(unsigned a) { return (unsigned char*)(uintptr_t)a; }
static inline unsigned emu_swizzle(unsigned a) { return a ^ (((a >> 7) & 7u) << 4); }

// ---- mbarriers
struct EmuMbar { int count = 0, pending = 0; long tx = 0, phase = 0; };
static std::mutex emu_mbar_m;
static std::condition_variable emu_mbar_cv;
static std::map<unsigned, EmuMbar> emu_mbars;
static void emu_mbar_check(EmuMbar& b) {
  if (b.pending == 0 && b.tx == 0) { ++b.phase; b.pending = b.count; emu_mbar_cv.notify_all(); }
}
static EmuMbar& emu_mbar(unsigned bar) {
  auto it = emu_mbars.find(bar);
  if (it == emu_mbars.end()) emu_fail("mbarrier used before init");
  return it->second;
}
static inline void fd_mbar_init(unsigned bar, int count) {
  std::lock_guard<std::mutex> lk(emu_mbar_m);
  EmuMbar b; b.count = b.pending = count; emu_mbars[bar] = b;
}
static inline void fd_mbar_arrive(unsigned bar) {
  std::lock_guard<std::mutex> lk(emu_mbar_m);
  EmuMbar& b = emu_mbar(bar);
  if (b.pending <= 0) emu_fail("mbarrier: more arrivals than its count");
  --b.pending; emu_mbar_check(b);
}
static inline void fd_mbar_expect_tx(unsigned bar, unsigned bytes) {
  std::lock_guard<std::mutex> lk(emu_mbar_m);
  EmuMbar& b = emu_mbar(bar);
  b.tx += bytes;
  if (b.pending <= 0) emu_fail("mbarrier: more arrivals than its count");
  --b.pending; emu_mbar_check(b);
}
static void emu_complete_tx(unsigned bar, long bytes) {
  std::lock_guard<std::mutex> lk(emu_mbar_m);
  EmuMbar& b = emu_mbar(bar);
  b.tx -= bytes; emu_mbar_check(b);
}
static inline void fd_mbar_wait(unsigned bar, int parity) {  // returns once the phase of this parity completed
  std::unique_lock<std::mutex> lk(emu_mbar_m);
  if (!emu_mbar_cv.wait_for(lk, std::chrono::seconds(20), [&] { return (emu_mbar(bar).phase & 1) != parity; }))
    emu_fail("mbarrier wait timed out (a missing arrival or transaction bytes)");
}
static inline bool fd_mbar_test(unsigned bar, int parity) {  // mbarrier.test_wait.parity: no blocking
  std::lock_guard<std::mutex> lk(emu_mbar_m);
  return (emu_mbar(bar).phase & 1) != parity;
}

// ---- tensor maps and TMA
struct EmuMap { uint64_t magic, base, cols, rows, row_bytes, box_rows; };
template <bool BF16>
static void fd_tmap_fill(unsigned map, const void* base, unsigned cols, unsigned rows, unsigned long long row_bytes,
                         unsigned box_rows) {
  EmuMap m{0x7a4d4150ull, (uint64_t)(uintptr_t)base, cols, rows, row_bytes, box_rows};
  std::memcpy(emu_ptr(map), &m, sizeof m);
}
static inline unsigned long long fd_maps_addr(const void* buf) { return ((unsigned long long)(uintptr_t)buf + 127) & ~127ull; }
static inline void emu_copy_map(unsigned long long global, unsigned smem) { std::memcpy((void*)(uintptr_t)global, emu_ptr(smem), 128); }
static inline void fd_acquire_map(unsigned long long) {}
static inline void fd_tma_load(unsigned dst, unsigned long long map, int col, int row, unsigned bar) {
  EmuMap m; std::memcpy(&m, (const void*)(uintptr_t)map, sizeof m);
  if (m.magic != 0x7a4d4150ull) emu_fail("TMA load through a map that was never written");
  if (dst % 1024) emu_fail("TMA destination not 1024-byte aligned (128-byte swizzle)");
  for (unsigned r = 0; r < m.box_rows; ++r)
    for (int c = 0; c < 64; ++c) {
      const long gr = (long)row + r, gc = (long)col + c;
      uint16_t v = 0;
      if (gr >= 0 && gc >= 0 && (uint64_t)gr < m.rows && (uint64_t)gc < m.cols)
        std::memcpy(&v, (const unsigned char*)(uintptr_t)m.base + gr * m.row_bytes + gc * 2, 2);
      std::memcpy(emu_ptr(emu_swizzle(dst + r * 128 + c * 2)), &v, 2);
    }
  emu_complete_tx(bar, (long)m.box_rows * 128);
}

// a plain bulk copy (cp.async.bulk, no tensor map): `bytes` from global memory into shared memory
static inline void fd_bulk_load(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
  if (dst % 16 || (uintptr_t)src % 16 || bytes % 16) emu_fail("bulk copy not 16-byte aligned");
  std::memcpy(emu_ptr(dst), src, bytes);
  emu_complete_tx(bar, (long)bytes);
}

// ---- wgmma
static inline unsigned long long fd_desc(unsigned addr) { return addr; }
// an MN-major descriptor (the attention's V): bit 63 marks it, bits 32..62 carry the N-block stride (LBO)
static inline unsigned long long fd_desc_mn(unsigned addr, unsigned lbo) {
  return (unsigned long long)addr | ((unsigned long long)lbo << 32) | (1ull << 63);
}
template <bool BF16>
static inline float emu_elem(unsigned a) {
  uint16_t v; std::memcpy(&v, emu_ptr(a), 2);
  if (BF16) { __nv_bfloat16 b; b.x = v; return (float)b; }
  __half h; h.x = v; return (float)h;
}
template <bool BF16>
static inline float emu_operand(unsigned long long desc, int row, int k) {  // element (row, k), 128B swizzle
  if (desc >> 63) {  // MN-major: 128-byte rows of 64 row-contiguous elements per k, 8-k groups 1024 bytes
    const unsigned lbo = (unsigned)((desc >> 32) & 0x7fffffffu);  // apart, 64-row blocks lbo apart
    const unsigned lin = (unsigned)desc + (row / 64) * lbo + (k / 8) * 1024 + (k % 8) * 128 + (row % 64) * 2;
    return emu_elem<BF16>(emu_swizzle(lin));
  }
  const unsigned lin = (unsigned)desc + (row / 8) * 1024 + (row % 8) * 128 + k * 2;  // K-major
  return emu_elem<BF16>(emu_swizzle(lin));
}
// d += A (64 x 16) . B (N x 16)^T for this thread's accumulator elements (m64nN layout)
template <bool BF16, int N, bool A_REGS>
static void emu_wgmma(float* d, unsigned long long da, unsigned long long db, int kk, unsigned group = 0) {
  const unsigned tid = emu_tid(), lane = tid & 31, w = (tid / 32) % 4, g = lane >> 2, t = lane & 3;
  const unsigned wg0 = tid / 128 * 128;
  for (int i = 0; i < N / 2; ++i) {
    const int row = 16 * w + g + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * t + (i & 1);
    float acc = 0.0f;
    for (int k = 0; k < 16; ++k) {
      float a;
      if (A_REGS) {  // (row, k) lives in lane 4 (row % 8) + (k % 8) / 2 of warp row / 16, register (row % 16) / 8 + 2 (k / 8)
        const int rl = row % 16, src = wg0 + (row / 16) * 32 + 4 * (rl % 8) + (k % 8) / 2, reg = rl / 8 + 2 * (k / 8);
        const uint16_t bits = (uint16_t)(emu_afrag_hist[src][group % 8][kk * 4 + reg] >> (16 * (k % 2)));
        if (BF16) { __nv_bfloat16 b; b.x = bits; a = (float)b; } else { __half h; h.x = bits; a = (float)h; }
      } else {
        a = emu_operand<BF16>(da, row, k);
      }
      acc += a * emu_operand<BF16>(db, col, k);
    }
    d[i] += acc;
  }
}
// Asynchrony: an issued wgmma joins the open group; commit closes it; wait_group(n) runs every
// committed group but the newest n, in order. So operands are read, and accumulators written, as late
// as the hardware may: a stage released, or an operand register changed, before its wait shows up
// as a wrong result. Each wait is a warpgroup barrier on both sides (register-A reads cross threads).
thread_local std::vector<std::function<void()>> emu_open_group;
thread_local std::deque<std::vector<std::function<void()>>> emu_groups;
static inline void emu_wgmma_commit() { emu_groups.push_back(std::move(emu_open_group)); emu_open_group.clear(); }
static inline void emu_wgmma_wait(int n) {
  const unsigned wg = emu_tid() / 128;
  emu_wg[wg].wait();
  while ((int)emu_groups.size() > n) {
    for (auto& op : emu_groups.front()) op();
    emu_groups.pop_front();
  }
  emu_wg[wg].wait();
}
template <bool BF16, int KSTEPS>
static inline void fd_wgmma_tile(float (&d)[128], unsigned a_addr, unsigned b_addr) {
  for (int kk = 0; kk < KSTEPS; ++kk)
    emu_open_group.push_back([&d, a_addr, b_addr, kk] { emu_wgmma<BF16, 256, false>(d, a_addr + kk * 32, b_addr + kk * 32, 0); });
  emu_wgmma_commit();
}
template <bool BF16>
static inline void fd_mma_ss128(float (&d)[64], unsigned a_addr, unsigned b_addr, unsigned chunk) {
  for (int kk = 0; kk < 8; ++kk) {  // d = A . B^T: the first k16 step ignores d (scale-d false), at retirement
    const unsigned off = (kk >> 2) * chunk + (kk & 3) * 32;
    emu_open_group.push_back([&d, a_addr, b_addr, off, kk] {
      if (kk == 0) std::fill(d, d + 64, 0.0f);
      emu_wgmma<BF16, 128, false>(d, a_addr + off, b_addr + off, 0);
    });
  }
  emu_wgmma_commit();
}
template <bool BF16, int KSTEPS = 8>
static inline void fd_mma_rs128(float (&d)[64], const unsigned (&a)[8][4], unsigned b_addr, unsigned chunk) {
  const unsigned group = emu_afrag_issue(&a[0][0]);  // B = V, MN-major, as the kernel's header addresses it
  for (int kk = 0; kk < KSTEPS; ++kk) {
    const unsigned long long db = fd_desc_mn(b_addr + kk * 2048, chunk);
    emu_open_group.push_back([&d, db, kk, group] { emu_wgmma<BF16, 128, true>(d, 0, db, kk, group); });
  }
  emu_wgmma_commit();
}
// the mixed-input GEMM's (_gemm_mixed) K tile: A = this thread's fragments a[kk], B = the x tile, K-major
template <bool BF16>
static inline void fd_mma_rs_k64(float (&d)[64], const unsigned (&a)[4][4], unsigned b_addr) {
  const unsigned group = emu_afrag_issue(&a[0][0]);
  for (int kk = 0; kk < 4; ++kk) {
    const unsigned long long db = fd_desc(b_addr + kk * 32);
    emu_open_group.push_back([&d, db, kk, group] { emu_wgmma<BF16, 128, true>(d, 0, db, kk, group); });
  }
  emu_wgmma_commit();
}
static inline void fd_fence_frag(unsigned (&)[4][4]) {}
static inline void fd_bar_consumers() { emu_consumers384.wait(); }
// ---- the fused dequantize GEMM's helpers (_gemm_tma_dequant): paired bf16/fp16 arithmetic, each half
// computed in float (exact for a product of two 8-bit-mantissa values and a difference of the codes)
// and rounded to nearest even, as sub/mul/add.rn.{bf16,f16}x2 round
template <bool BF16>
static inline float emu_h(unsigned bits) {
  if (BF16) { __nv_bfloat16 b; b.x = (uint16_t)bits; return (float)b; }
  __half h; h.x = (uint16_t)bits; return (float)h;
}
template <bool BF16>
static inline unsigned emu_h_bits(float f) {
  if (BF16) return __nv_bfloat16(f).x;
  return __half(f).x;
}
template <bool BF16, typename F>
static inline unsigned emu_h2(unsigned a, unsigned b, F op) {
  return emu_h_bits<BF16>(op(emu_h<BF16>(a & 0xffffu), emu_h<BF16>(b & 0xffffu)))
       | (emu_h_bits<BF16>(op(emu_h<BF16>(a >> 16), emu_h<BF16>(b >> 16))) << 16);
}
template <bool BF16> static inline unsigned fd_h2_sub(unsigned a, unsigned b) { return emu_h2<BF16>(a, b, [](float x, float y) { return x - y; }); }
template <bool BF16> static inline unsigned fd_h2_mul(unsigned a, unsigned b) { return emu_h2<BF16>(a, b, [](float x, float y) { return x * y; }); }
template <bool BF16> static inline unsigned fd_h2_add(unsigned a, unsigned b) { return emu_h2<BF16>(a, b, [](float x, float y) { return x + y; }); }
// a b + c with one rounding: the float fma is exact wherever fd_h2_fma's callers use it (q s, q < 256, one 8- or
// 11-bit mantissa each), then rounded to the half type once
template <bool BF16> static inline unsigned fd_h2_fma(unsigned a, unsigned b, unsigned c) {
  const auto one = [](unsigned x, unsigned y, unsigned z) {
    return emu_h_bits<BF16>(std::fma(emu_h<BF16>(x), emu_h<BF16>(y), emu_h<BF16>(z)));
  };
  return one(a & 0xffffu, b & 0xffffu, c & 0xffffu) | (one(a >> 16, b >> 16, c >> 16) << 16);
}
static inline unsigned fd_and_or(unsigned z, unsigned mask, unsigned bits) { return (z & mask) | bits; }
static inline unsigned fd_prmt(unsigned a, unsigned b, unsigned sel) {  // prmt.b32, sign replication included
  const uint64_t v = (uint64_t)a | ((uint64_t)b << 32);
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) {
    const unsigned nib = (sel >> (4 * i)) & 15u;
    unsigned byte = (unsigned)(v >> (8 * (nib & 7u))) & 0xffu;
    if (nib & 8u) byte = (byte & 0x80u) ? 0xffu : 0u;
    r |= byte << (8 * i);
  }
  return r;
}
static inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (uint64_t)x | ((uint64_t)y << 32);
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
  return r;
}
static inline uint4 fd_ldg16(const void* p) { uint4 v; std::memcpy(&v, p, 16); return v; }
static inline void fd_sts16(unsigned addr, uint4 v) { std::memcpy(emu_ptr(addr), &v, 16); }
static inline void fd_fence_async_smem() {}
template <int N> static inline void emu_fence(float (&)[N]) {}
#define fd_fence_acc emu_fence<128>
#define fd_fence64 emu_fence<64>
template <typename T>
static inline unsigned fd_pack2(float lo, float hi) {
  T h[2] = {T(lo), T(hi)};
  unsigned u; std::memcpy(&u, h, 4); return u;
}
// ---- Ampere-style paths: cp.async (retired at cp.async.wait_group, like wgmma groups), ldmatrix, mma.sync
thread_local std::vector<std::function<void()>> emu_open_copies;
thread_local std::deque<std::vector<std::function<void()>>> emu_copy_groups;
static inline void fd_cp_async16(unsigned dst, const void* src, bool valid) {
  std::vector<unsigned char> bytes(16, 0);
  if (valid) std::memcpy(bytes.data(), src, 16);  // the source is read at issue, the destination written at the wait
  emu_open_copies.push_back([dst, bytes] { std::memcpy(emu_ptr(dst), bytes.data(), 16); });
}
static inline void fd_cp_async_commit() { emu_copy_groups.push_back(std::move(emu_open_copies)); emu_open_copies.clear(); }
template <int N>
static inline void fd_cp_async_wait() {
  while ((int)emu_copy_groups.size() > N) {
    for (auto& op : emu_copy_groups.front()) op();
    emu_copy_groups.pop_front();
  }
}
// cp.async.mbarrier.arrive.noinc: one arrival once this thread's cp.asyncs so far have landed (here: they land now)
static inline void fd_mbar_arrive_cp_async(unsigned bar) {
  for (auto& op : emu_open_copies) op();
  emu_open_copies.clear();
  fd_cp_async_wait<0>();
  fd_mbar_arrive(bar);
}
static unsigned emu_lane_u[1024][6];
static inline void fd_ldmatrix_x4(unsigned (&r)[4], unsigned addr) {  // four 8 x 8 b16 matrices, rows from lanes 8m .. 8m + 7
  const unsigned t = emu_tid(), w0 = t & ~31u, lane = t & 31u;
  emu_lane_u[t][0] = addr;
  emu_warp[t / 32].wait();
  for (int m = 0; m < 4; ++m) std::memcpy(&r[m], emu_ptr(emu_lane_u[w0 + 8 * m + lane / 4][0] + (lane % 4) * 4), 4);
  emu_warp[t / 32].wait();
}
template <bool BF16>
static inline float emu_half(unsigned reg, int hi) {
  const uint16_t bits = (uint16_t)(reg >> (16 * hi));
  if (BF16) { __nv_bfloat16 b; b.x = bits; return (float)b; }
  __half h; h.x = bits; return (float)h;
}
// m16n8k16, A row-major fragments (a0: row g, k 2t..; a1: row g + 8; a2, a3: k + 8), B "col" (b0: k 2t.., n g;
// b1: k + 8), C c0, c1: row g, n 2t, 2t + 1; c2, c3: row g + 8
template <bool BF16>
static inline void fd_mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  const unsigned t = emu_tid(), w0 = t & ~31u, lane = t & 31u, g = lane >> 2, tq = lane & 3;
  for (int i = 0; i < 4; ++i) emu_lane_u[t][i] = a[i];
  emu_lane_u[t][4] = b0;
  emu_lane_u[t][5] = b1;
  emu_warp[t / 32].wait();
  auto A = [&](int row, int k) {
    const unsigned src = w0 + 4 * (row % 8) + (k % 8) / 2;
    return emu_half<BF16>(emu_lane_u[src][(row / 8) + 2 * (k / 8)], k % 2);
  };
  auto B = [&](int k, int n) {
    const unsigned src = w0 + 4 * n + (k % 8) / 2;
    return emu_half<BF16>(emu_lane_u[src][4 + k / 8], k % 2);
  };
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), n = 2 * tq + (i & 1);
    float acc = 0.0f;
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, n);
    c[i] += acc;
  }
  emu_warp[t / 32].wait();
}
static inline int fd_swz(int row, int chunk) { return row * 32 + ((chunk ^ ((row >> 1) & 3)) << 3); }
static inline float fd_exp2(float x) { return std::exp2(x); }
static inline float __fadd_rn(float a, float b) { return a + b; }  // built with -ffp-contract=off: no fused multiply-add
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

static void emu_reset_cta(unsigned threads) {
  emu_cta.count = (int)threads;
  for (auto& b : emu_named) b.count = 256;
  for (auto& b : emu_warp) b.count = 32;
  for (auto& b : emu_wg) b.count = 128;
  emu_consumers384.count = 384;
  emu_mbars.clear();
}
"""

CTYPES = {"bf16": "__nv_bfloat16", "f16": "__half", "f32": "float", "i32": "int32_t", "u32": "uint32_t", "u8": "uint8_t"}

_ASM = [  # the inline-assembly statements kernel bodies use, and what the emulation does instead
    (re.compile(r'asm volatile\("fence\.mbarrier_init\.release\.cluster;\\n" ::: "memory"\);'), ";"),  # a statement still
    # generic-proxy writes (cp.async) made visible to wgmma: the shim's memory is one proxy
    (re.compile(r'asm volatile\("fence\.proxy\.async\.shared::cta;\\n" ::: "memory"\);'), ";"),
    (re.compile(r'asm volatile\("wgmma\.wait_group\.sync\.aligned (\d);\\n" ::: "memory"\);'), r"emu_wgmma_wait(\1);"),
    (re.compile(r'asm volatile\("bar\.sync 1, 256;\\n" ::: "memory"\);'), "emu_bar_sync(1);"),
    (re.compile(r'asm volatile\("tensormap\.cp_fenceproxy[^"]*"\s*:: "l"\((.*?)\), "r"\((.*?)\) : "memory"\);', re.S),
     r"emu_copy_map(\1, \2);"),
]


def preprocess(body: str) -> str:
    """The kernel body as C++ for the shim: shared objects become statics, assembly becomes shim calls."""
    body = re.sub(r"extern __shared__ __align__\(\d+\) unsigned char (\w+)\[\];", r"unsigned char* \1 = emu_dyn_smem;", body)
    body = re.sub(r"__shared__ __align__\((\d+)\)", r"alignas(\1) static", body).replace("__shared__", "static")
    body = re.sub(r"__align__\((\d+)\)", r"alignas(\1)", body)
    for pattern, repl in _ASM:
        body = pattern.sub(repl, body)
    if "asm" in body:
        raise AssertionError("the emulation has no model for: " + body[body.index("asm"):][:120])
    return body


SIZES = {"bf16": 2, "f16": 2, "f32": 4, "i32": 4, "u32": 4, "u8": 1}


def run(tmp_path, buffers, launches, outputs, headers=""):
    """Run kernel bodies (mx.fast.cuda_kernel sources) one after another in one process.
    buffers: {name: (tag, numpy array)} for inputs, or (tag, element count) for buffers the kernels write
    (prefilled with 0xFF bytes); launches: [(body, template, inputs, outputs, grid (x, y) in blocks,
    threads per block)], each input / output a buffer name or (kernel parameter name, buffer name);
    outputs: the buffer names to return, as numpy arrays of raw values. headers: kernel headers that are
    plain C++ once the shim is in (device functions without assembly), compiled in after it."""
    kernels, decls, calls = [], [], []
    for name, (tag, data) in buffers.items():
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data)
            data.tofile(tmp_path / f"{name}.bin")
            decls.append(f'  auto* {name} = ({CTYPES[tag]}*)emu_load("{name}.bin", {data.nbytes});')
        else:
            decls.append(f"  auto* {name} = ({CTYPES[tag]}*)emu_alloc({data * SIZES[tag]});")
    for n, (body, template, ins, outs, grid, threads) in enumerate(launches):
        ins, outs = ([(b, b) if isinstance(b, str) else b for b in names] for names in (ins, outs))  # (param, buffer)
        params = [f"const {CTYPES[buffers[b][0]]}* {p}" for p, b in ins] + [f"{CTYPES[buffers[b][0]]}* {p}" for p, b in outs]
        kernels.append(f"static void emu_kernel{n}(" + ", ".join(params) + ") {\n" + template_lines(template, CTYPES) + "\n"
                       + preprocess(body) + "\n}\n")
        args = ", ".join(b for _, b in ins + outs)
        calls.append(f"  emu_launch({grid[0]}u, {grid[1]}u, {threads}u, [=] {{ emu_kernel{n}({args}); }});")
    saves = []
    for name in outputs:
        tag, count = buffers[name]
        saves.append(f'  emu_save("{name}.out", {name}, {count * SIZES[tag]});')
    main = r"""
static void* emu_alloc(size_t n) { void* p = std::aligned_alloc(256, (n + 255) / 256 * 256); std::memset(p, 0xff, n); return p; }
static void* emu_load(const char* path, size_t n) {
  void* p = emu_alloc(n); FILE* f = std::fopen(path, "rb");
  if (!f || std::fread(p, 1, n, f) != n) emu_fail("input file");
  std::fclose(f); return p;
}
static void emu_save(const char* path, const void* p, size_t n) { FILE* f = std::fopen(path, "wb"); std::fwrite(p, 1, n, f); std::fclose(f); }
template <typename F>
static void emu_launch(unsigned gx, unsigned gy, unsigned threads, F body) {  // one CTA at a time
  gridDim = emu_dim3{gx, gy, 1u};
  blockDim = emu_dim3{threads, 1u, 1u};
  for (unsigned by = 0; by < gy; ++by)
    for (unsigned bx = 0; bx < gx; ++bx) {
      blockIdx = emu_dim3{bx, by, 0u};
      emu_reset_cta(threads);
      std::vector<std::thread> pool;
      for (unsigned t = 0; t < threads; ++t) pool.emplace_back([=] { threadIdx = emu_dim3{t, 0u, 0u}; body(); });
      for (auto& th : pool) th.join();
    }
}
int main() {
""" + "\n".join(decls + calls + saves) + "\n  return 0;\n}\n"
    compile_and_run_cpp(tmp_path, SHIM + headers + "".join(kernels) + main,
                        ["-O1", "-no-pie", "-fno-pie", "-fno-strict-aliasing", "-Wno-unknown-pragmas",
                         "-Wno-unused-variable", "-Wno-unused-but-set-variable", "-Wno-unused-function",
                         "-Wno-unused-local-typedefs", "-ffp-contract=off"])
    raw = {"bf16": np.uint16, "f16": np.uint16, "f32": np.float32, "i32": np.int32, "u32": np.uint32, "u8": np.uint8}
    return {name: np.fromfile(tmp_path / f"{name}.out", raw[buffers[name][0]]) for name in outputs}


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ---- replaying what the Python launchers ask mx.fast.cuda_kernel for

def _tag(dtype):
    import mlx.core as mx
    return {mx.bfloat16: "bf16", mx.float16: "f16", mx.float32: "f32", mx.int32: "i32", mx.uint32: "u32",
            mx.uint8: "u8"}[dtype]


def _raw(a):
    """An mx array's bytes as numpy (bf16 / f16 as their 16-bit patterns)."""
    import mlx.core as mx
    if a.dtype in (mx.bfloat16, mx.float16):
        return np.array(a.view(mx.uint16))
    return np.array(a)


def expand_includes(text: str) -> str:
    """`text` with each ``#include "/absolute/path"`` line replaced by that file's text, as NVRTC reads it."""
    return re.sub(r'#include "(/[^"]+)"[^\n]*', lambda m: Path(m.group(1)).read_text(), text)


class LaunchRecorder:
    """Stands in for mx.fast.cuda_kernel: each call is recorded (source, names, template, grid and
    threadgroup as the launcher computed them; its input arrays) and returns random placeholders of
    the output shapes, so that ``replay`` can tell a later input that is a recorded output or a copy of
    one (``astype`` to its own dtype, a reshape) by its bytes."""

    def __init__(self):
        self.launches = []

    def cuda_kernel(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                    atomic_outputs=False, shared_memory=0):
        import mlx.core as mx

        source = expand_includes(source)  # flashdiff.kernels._jit's include lines (mx.cuda.is_available patched)

        def call(*, inputs, template, output_shapes, output_dtypes, grid, threadgroup, stream=None, init_value=None,
                 verbose=False):
            outs = [mx.random.randint(-2 ** 30, 2 ** 30, shape).astype(dtype) if not mx.issubdtype(dtype, mx.floating)
                    else mx.random.normal(shape).astype(dtype) for shape, dtype in zip(output_shapes, output_dtypes)]
            mx.eval(outs)
            self.launches.append(dict(name=name, source=source, input_names=list(input_names),
                                      output_names=list(output_names), inputs=list(inputs), outputs=outs,
                                      template=list(template), grid=grid, threadgroup=threadgroup,
                                      shared_memory=shared_memory))
            return outs
        return call


def replay(tmp_path, launches, headers=""):
    """Run recorded launches in order through the emulation (an output of one launch that a later one
    takes is the same buffer); returns the last launch's outputs as numpy arrays of raw values.
    headers: as for ``run`` (the TMA / wgmma kernels' own headers are replaced by the shim)."""
    buffers, ids, specs, produced_bytes = {}, {}, [], {}

    def buffer_of(a, produced):
        key = id(a)
        if key not in ids:
            raw = _raw(a)
            same = None if produced else produced_bytes.get((_tag(a.dtype), raw.tobytes()))
            if same is not None:  # a copy of an earlier launch's output: that buffer
                ids[key] = same
            else:
                ids[key] = f"b{len(buffers)}"
                buffers[ids[key]] = (_tag(a.dtype), a.size if produced else raw)
                if produced:
                    produced_bytes[(_tag(a.dtype), raw.tobytes())] = ids[key]
        return ids[key]

    for rec in launches:
        ins = [(p, buffer_of(a, False)) for p, a in zip(rec["input_names"], rec["inputs"])]
        outs = [(p, buffer_of(a, True)) for p, a in zip(rec["output_names"], rec["outputs"])]
        template = [(k, v if isinstance(v, (bool, int)) else _tag(v)) for k, v in rec["template"]]
        (gx, gy, gz), (tx, ty, tz) = rec["grid"], rec["threadgroup"]
        if gz != 1 or ty != 1 or tz != 1:
            raise AssertionError(f"{rec['name']}: the emulation runs 1-D blocks over an x/y grid, got {rec['grid']} / {rec['threadgroup']}")
        if rec["shared_memory"] > 240 * 1024:
            raise AssertionError(f"{rec['name']}: {rec['shared_memory']} bytes of dynamic shared memory")
        block = min(tx, gx)  # as MLX's custom_kernel.cpp: block = min(threadgroup, grid), blocks rounded up
        specs.append((rec["source"], template, ins, outs, (-(-gx // tx), gy), block))
    last = [b for _, b in specs[-1][3]]
    got = run(tmp_path, buffers, specs, last, headers)
    return [got[b] for b in last]
