"""Metal kernels: the custom Metal attention (``backend="metal_flash"``) and the Metal dequantize /
quantized_linear / moe paths (``backend="metal"``) against the pure-MLX reference.

The GPU tests are skipped unless ``mx.metal.is_available()``: no Apple GPU is available to this
project, so these kernels have never been compiled or run. What runs everywhere: the launch
parameters (grid, threadgroup, template, inputs), the threadgroup-memory budget, a scan of the source
for CUDA-only spellings, the clear errors on non-Metal machines, and a CPU emulation of the attention
kernel body (compiled as C++ with a shim for the Metal builtins, 256 host threads per threadgroup).
"""

import functools
import math
import re
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from flashdiff.kernels import _attention_metal as am
from flashdiff.kernels import _gemm_metal as gm
from flashdiff.kernels import attention, attention_reference
from flashdiff.kernels._dequant import _METAL_SOURCE as DEQUANT_METAL_SOURCE
from helpers import (MOE_QUANT_CASES, QLINEAR_CASES, QMODES, check_dequantize, check_moe_gemm,
                     check_quantized_linear, compile_and_run_cpp, rel_err)

metal_only = pytest.mark.skipif(
    not mx.metal.is_available(),
    reason="needs MLX's Metal back-end (an Apple GPU); the Metal kernels are untested on this project's machines")

TOL = {mx.float32: 1e-4, mx.float16: 3e-3, mx.bfloat16: 1e-2}


# ---------------------------------------------------------------- CPU: launch parameters and source

@pytest.mark.parametrize("q_shape,k_shape,bias,grid", [
    ((1, 2, 300, 128), (1, 2, 300, 128), False, (5 * 256, 2, 1)),
    ((2, 3, 64, 64), (2, 3, 77, 64), True, (256, 6, 1)),
    ((1, 4, 65, 128), (1, 2, 1000, 128), True, (2 * 256, 4, 1)),
    ((3, 1, 1, 64), (3, 1, 5, 64), False, (256, 3, 1)),
])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_launch_params(q_shape, k_shape, bias, grid, dtype):
    b, h, lq, d = q_shape
    p = am.launch_params(q_shape, k_shape, k_shape, dtype, (b, k_shape[2]) if bias else None)
    assert p["grid"] == grid and p["threadgroup"] == (256, 1, 1)
    assert p["grid"][0] % p["threadgroup"][0] == 0  # whole threadgroups: grid counts threads
    assert p["template"] == [("T", dtype), ("D", d), ("H", h), ("HK", k_shape[1]), ("LQ", lq),
                             ("LK", k_shape[2]), ("HAS_BIAS", bias)]
    assert p["output_shapes"] == [q_shape] and p["output_dtypes"] == [dtype]


def test_launch_params_errors():
    ok = (1, 2, 10, 128)
    with pytest.raises(ValueError, match="head dim D in"):
        am.launch_params((1, 2, 10, 80), (1, 2, 10, 80), (1, 2, 10, 80), mx.float16)
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        am.launch_params(ok, ok, ok, mx.int32)
    with pytest.raises(ValueError, match="multiple of k heads"):
        am.launch_params((1, 3, 10, 128), ok, ok, mx.float16)
    with pytest.raises(ValueError, match="one shape"):
        am.launch_params(ok, ok, (1, 2, 11, 128), mx.float16)
    with pytest.raises(ValueError, match=r"key_bias must be \(B, Lk\)"):
        am.launch_params(ok, ok, ok, mx.float16, (1, 1, 1, 10))


def _source_constants():
    """The constexpr ints of the kernel source, evaluated with a given D."""
    consts = {}
    for line in re.findall(r"constexpr int ([^;]+);", am._SOURCE):
        for part in line.split(","):
            name, expr = (s.strip() for s in part.split("="))
            consts[name] = expr
    return consts


@pytest.mark.parametrize("d", am.HEAD_DIMS)
def test_source_constants_and_threadgroup_memory(d):
    env = {"D": d}
    for name, expr in _source_constants().items():
        env[name] = eval(expr, {}, dict(env))
    assert (env["BQ"], env["BK"], env["NSG"], env["NT"]) == (am.BQ, am.BK, am.SIMDGROUPS, am.THREADS)
    arrays = re.findall(r"threadgroup float \w+\[([^\]]+)\];", am._SOURCE)
    assert len(arrays) == 4
    assert 4 * sum(eval(a, {}, env) for a in arrays) == am.threadgroup_bytes(d) <= am.MAX_THREADGROUP_BYTES


CUDA_ONLY = ["__syncthreads", "__shared__", "threadIdx", "blockIdx", "blockDim", "__shfl", "wmma", "nvcuda",
             "exp2f", "fmaxf", "__int_as_float", "extern ", "uint4", "make_uint4", "__global__", "__device__",
             "#pragma unroll", "__forceinline__", "reinterpret_cast", "__align__", "__fadd_rn", "<mma.h>"]


@pytest.mark.parametrize("name,source", [("attention", am._HEADER + am._SOURCE),
                                         ("dequantize", DEQUANT_METAL_SOURCE),
                                         ("grouped gemm", gm._HEADER + gm._SOURCE)])
def test_metal_source_has_no_cuda_spellings(name, source):
    code = re.sub(r"//[^\n]*", "", source)  # the comments quote the CUDA kernel on purpose
    assert [s for s in CUDA_ONLY if s in code] == []
    if name == "attention":
        for needed in ("simdgroup_matrix<float, 8, 8>", "metal::simdgroup_load", "metal::simdgroup_store",
                       "metal::simdgroup_multiply_accumulate", "threadgroup_position_in_grid",
                       "simdgroup_index_in_threadgroup", "thread_index_in_simdgroup"):
            assert needed in source
        for name_ in am.INPUT_NAMES + ("out",):  # every input/output is used by name
            assert re.search(rf"\b{name_}\b", am._SOURCE)
        assert "INFINITY" not in code and "inf" not in re.findall(r"\w+", code)  # masks are finite (MASKED)
    if name == "grouped gemm":
        for name_ in gm.INPUT_NAMES + ("out",):
            assert re.search(rf"\b{name_}\b", gm._SOURCE)
        consts = dict(re.findall(r"(\w+) = (\d+)", re.search(r"constexpr int ([^;]+);", gm._SOURCE).group(1)))
        assert (int(consts["BM"]), int(consts["BN"]), int(consts["BK"]), int(consts["NT"])) == (gm.BM, gm.BN, gm.BK, gm.THREADS)
        arrays = re.findall(r"threadgroup (?:float|int) \w+\[([^\]]+)\];", gm._SOURCE)  # 4-byte elements
        assert len(arrays) == 4
        assert 4 * sum(eval(a, {}, {k: int(v) for k, v in consts.items()}) for a in arrays) <= am.MAX_THREADGROUP_BYTES


def test_kernel_is_built_lazily():
    code = ("import mlx.core as mx; from flashdiff.kernels import _attention_metal as am; "
            "am.launch_params((1, 2, 9, 64), (1, 2, 9, 64), (1, 2, 9, 64), mx.float16); "
            "assert am._kernel.cache_info().currsize == 0")  # nothing built at import or by launch_params
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.skipif(mx.metal.is_available(), reason="checks the error on machines without Metal")
def test_metal_flash_errors_without_metal():
    q = mx.zeros((1, 2, 8, 128))
    with pytest.raises(RuntimeError, match="Metal back-end"):
        attention(q, q, q, 0.1, backend="metal_flash")
    with pytest.raises(RuntimeError, match="Metal back-end"):
        attention(q, q, q, 0.1, mx.ones((1, 1, 1, 8), mx.bool_), backend="metal_flash")
    with pytest.raises(ValueError, match="head dim"):
        attention(mx.zeros((1, 2, 8, 80)), mx.zeros((1, 2, 8, 80)), mx.zeros((1, 2, 8, 80)), 0.1,
                  backend="metal_flash")
    with pytest.raises(ValueError, match="key masks shaped"):
        attention(q, q, q, 0.1, mx.ones((1, 2, 8, 8), mx.bool_), backend="metal_flash")


# ---------------------------------------------------------------- CPU: emulation of the kernel body

_SHIM = r"""
#include <barrier>
#include <cmath>
#include <cstdio>
#include <memory>
#include <thread>
#include <vector>
typedef unsigned int uint;
typedef unsigned long ulong;
typedef unsigned short ushort;
struct uint3 { uint x, y, z; };
#define device
#define threadgroup
namespace emu {
struct Simd { std::barrier<>* bar; float slot[32]; };
thread_local int lane;
thread_local Simd* simd;
thread_local std::barrier<>* group;
}
namespace metal {
enum class mem_flags { mem_none, mem_device, mem_threadgroup };
inline void threadgroup_barrier(mem_flags) { emu::group->arrive_and_wait(); }
inline void simdgroup_barrier(mem_flags) { emu::simd->bar->arrive_and_wait(); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float exp2(float x) { return std::exp2(x); }
inline float simd_shuffle_xor(float x, ushort m) {
  emu::simd->slot[emu::lane] = x;
  emu::simd->bar->arrive_and_wait();
  float y = emu::simd->slot[emu::lane ^ m];
  emu::simd->bar->arrive_and_wait();
  return y;
}
// Every lane holds the whole matrix (the hardware spreads it over the lanes; the kernel never
// relies on that layout). Only float matrices and float memory, as simdgroup_load requires.
template <typename T, int C, int R> struct simdgroup_matrix { T e[R][C]; };
template <typename T, int C, int R> simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(const T v) {
  simdgroup_matrix<T, C, R> m;
  for (int i = 0; i < R; ++i) for (int j = 0; j < C; ++j) m.e[i][j] = v;
  return m;
}
using M8 = simdgroup_matrix<float, 8, 8>;
inline void simdgroup_load(M8& d, const float* src, ulong ld) {
  for (int i = 0; i < 8; ++i) for (int j = 0; j < 8; ++j) d.e[i][j] = src[i * ld + j];
}
inline void simdgroup_store(const M8& a, float* dst, ulong ld) {
  if (emu::lane == 0) for (int i = 0; i < 8; ++i) for (int j = 0; j < 8; ++j) dst[i * ld + j] = a.e[i][j];
}
inline void simdgroup_multiply_accumulate(M8& d, const M8& a, const M8& b, const M8& c) {
  M8 t;
  for (int i = 0; i < 8; ++i) for (int j = 0; j < 8; ++j) {
    float s = c.e[i][j];
    for (int x = 0; x < 8; ++x) s += a.e[i][x] * b.e[x][j];
    t.e[i][j] = s;
  }
  d = t;
}
inline void simdgroup_multiply(M8& d, const M8& a, const M8& b) {
  simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<float, 8, 8>(0.0f));
}
}
// One threadgroup: nt host threads (lane = t % 32, simdgroup = t / 32) running body(t) concurrently.
template <typename F> void emu_run_threadgroup(int nt, F body) {
  std::barrier<> group(nt);
  std::vector<std::unique_ptr<std::barrier<>>> bars;
  std::vector<emu::Simd> simds(nt / 32);
  for (int s = 0; s < nt / 32; ++s) { bars.emplace_back(new std::barrier<>(32)); simds[s].bar = bars[s].get(); }
  std::vector<std::thread> threads;
  for (int t = 0; t < nt; ++t) threads.emplace_back([&, t] {
    emu::lane = t % 32; emu::simd = &simds[t / 32]; emu::group = &group;
    body(t);
  });
  for (auto& th : threads) th.join();
}
"""

_MAIN = r"""
template <typename T, int D, int H, int HK, int LQ, int LK, bool HAS_BIAS>
void fd_kernel(const T* q, const T* k, const T* v, const float* scale, const float* kbias, T* out,
               uint3 threadgroup_position_in_grid, uint thread_index_in_threadgroup,
               uint simdgroup_index_in_threadgroup, uint thread_index_in_simdgroup) {
BODY
}

static std::vector<float> read(const char* path, size_t n) {
  std::vector<float> x(n);
  FILE* f = std::fopen(path, "rb");
  if (!f || std::fread(x.data(), 4, n, f) != n) { std::fprintf(stderr, "read %s\n", path); std::exit(2); }
  std::fclose(f);
  return x;
}

int main() {
  using T = EMU_T;
  constexpr int B = EMU_B, H = EMU_H, HK = EMU_HK, LQ = EMU_LQ, LK = EMU_LK, D = EMU_D, NT = EMU_THREADS;
  const size_t nq = size_t(B) * H * LQ * D, nk = size_t(B) * HK * LK * D;
  auto cast = [](const std::vector<float>& x) { return std::vector<T>(x.begin(), x.end()); };
  auto q = cast(read("q.bin", nq)), k = cast(read("k.bin", nk)), v = cast(read("v.bin", nk));
  auto scale = read("scale.bin", 1), bias = read("kbias.bin", EMU_NBIAS);
  std::vector<T> out(nq, T(NAN));  // rows the kernel forgets stay NaN
  for (uint gy = 0; gy < uint(EMU_GRID_Y); ++gy) for (uint gx = 0; gx < uint(EMU_GRID_X / NT); ++gx)
    emu_run_threadgroup(NT, [&](int t) {
      fd_kernel<T, D, H, HK, LQ, LK, EMU_HAS_BIAS>(q.data(), k.data(), v.data(), scale.data(), bias.data(),
          out.data(), uint3{gx, gy, 0}, uint(t), uint(t / 32), uint(t % 32));
    });
  FILE* f = std::fopen("out.bin", "wb");
  for (size_t i = 0; i < nq; ++i) { float x = float(out[i]); std::fwrite(&x, 4, 1, f); }
  std::fclose(f);
  return 0;
}
"""


def run_emulation(tmp_path, defines, header, source, main):
    """Build a Metal kernel body as C++ (threadgroup arrays become statics shared by the threadgroup's
    host threads, the Metal includes dropped) inside `main` with `defines`, then run it in tmp_path."""
    body = re.sub(r"^(\s*)threadgroup ((?:float|int) \w+\[)", r"\1static \2", source, flags=re.M)
    header = "\n".join(ln for ln in header.splitlines() if not ln.startswith("#include"))
    src = "".join(f"#define {n} {val}\n" for n, val in defines.items())
    compile_and_run_cpp(tmp_path, src + _SHIM + header + main.replace("BODY", body), ["-Wno-unknown-pragmas"])


def emulate(tmp_path, q, k, v, scale, key_bias, ctype="float"):
    """Run the kernel body on the CPU with the wrapper's own inputs (kernel_inputs), template and grid
    (launch_params); threadgroups run one after another, their 256 threads concurrently."""
    p = am.launch_params(q.shape, k.shape, v.shape, q.dtype, None if key_bias is None else key_bias.shape)
    inputs = am.kernel_inputs(q, k, v, scale, key_bias)
    for name, a in zip(am.INPUT_NAMES, inputs):
        np.asarray(a.astype(mx.float32)).tofile(tmp_path / f"{name}.bin")
    t = dict(p["template"][1:])
    defines = dict(EMU_T=ctype, EMU_B=q.shape[0], EMU_H=t["H"], EMU_HK=t["HK"], EMU_LQ=t["LQ"], EMU_LK=t["LK"],
                   EMU_D=t["D"], EMU_HAS_BIAS=str(t["HAS_BIAS"]).lower(), EMU_THREADS=p["threadgroup"][0],
                   EMU_GRID_X=p["grid"][0], EMU_GRID_Y=p["grid"][1], EMU_NBIAS=inputs[4].size)
    run_emulation(tmp_path, defines, am._HEADER, am._SOURCE, _MAIN)
    return np.fromfile(tmp_path / "out.bin", np.float32).reshape(q.shape)


def _inputs(b, h, hk, lq, lk, d, dtype=mx.float32, seed=0):
    mx.random.seed(seed)
    return [mx.random.normal((bb, hh, n, d)).astype(dtype) for bb, hh, n in ((b, h, lq), (b, hk, lk), (b, hk, lk))]


def _key_mask(kind, b, lk, dtype=mx.float32, lengths=None):
    if kind is None:
        return None
    if kind == "key_bool":
        lengths = lengths or [lk - 7 * i for i in range(b)]
        return mx.arange(lk)[None, None, None, :] < mx.array(lengths)[:, None, None, None]
    return mx.random.normal((b, 1, 1, lk)).astype(dtype)  # additive key bias


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU emulation needs g++ (C++20)")
@pytest.mark.parametrize("b,h,hk,lq,lk,d,mask_kind,ctype", [
    (1, 2, 2, 70, 37, 64, None, "float"),             # two query blocks, key remainder 37 = 2*16 + 5
    (2, 4, 2, 9, 53, 128, "key_bool", "float"),       # GQA, boolean key mask (-inf bias), D = 128
    (2, 1, 1, 5, 19, 64, "additive", "_Float16"),     # additive key bias, half-precision storage
])
def test_emulated_kernel_matches_reference(tmp_path, b, h, hk, lq, lk, d, mask_kind, ctype):
    from flashdiff.kernels.attention import _key_bias

    dtype = mx.float16 if ctype == "_Float16" else mx.float32
    q, k, v = _inputs(b, h, hk, lq, lk, d, dtype)
    mask = _key_mask(mask_kind, b, lk)
    scale = 1 / math.sqrt(d)
    out = emulate(tmp_path, q, k, v, scale, None if mask is None else _key_bias(mask, b, lk), ctype)
    ref = attention_reference(*(a.astype(mx.float32) for a in (q, k, v)), scale, mask)
    # float32: only the summation order differs; _Float16: inputs identical, output rounded to half
    assert rel_err(mx.array(out), ref) < (1e-5 if ctype == "float" else 1e-3)


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU emulation needs g++ (C++20)")
def test_emulated_kernel_fully_masked_row_is_zero(tmp_path):
    """A batch whose keys are all masked gives 0 (as the CUDA kernel), not NaN (as softmax of -inf)."""
    from flashdiff.kernels.attention import _key_bias

    q, k, v = _inputs(2, 1, 1, 3, 21, 64, seed=1)
    mask = _key_mask("key_bool", 2, 21, lengths=[17, 0])
    out = emulate(tmp_path, q, k, v, 0.125, _key_bias(mask, 2, 21), "float")
    ref = attention_reference(q[:1], k[:1], v[:1], 0.125, mask[:1])
    assert rel_err(mx.array(out[:1]), ref) < 1e-5
    assert np.all(out[1] == 0.0)


# ---------------------------------------------------------------- Metal GPU (skipped without Metal)

@metal_only
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
@pytest.mark.parametrize("shape", [(1, 2, 300, 300, 128), (2, 3, 129, 77, 64), (1, 4, 64, 1000, 128),
                                   (2, 3, 37, 53, 128), (1, 1, 1, 5, 64)])
@pytest.mark.parametrize("mask_kind", [None, "key_bool", "additive"])
def test_attention_metal_flash(dtype, shape, mask_kind):
    b, h, lq, lk, d = shape
    q, k, v = _inputs(b, h, h, lq, lk, d, dtype, seed=3)
    mask = _key_mask(mask_kind, b, lk)
    scale = 1 / math.sqrt(d)
    ref = attention_reference(*(a.astype(mx.float32) for a in (q, k, v)), scale, mask)
    out = attention(q, k, v, scale, mask, backend="metal_flash")
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@metal_only
def test_attention_metal_flash_gqa_and_key_multiplier():
    q, k, v = _inputs(1, 4, 2, 200, 333, 128, mx.bfloat16, seed=4)
    km = (mx.arange(333)[None, :] < 300).astype(mx.bfloat16)
    ref = attention(*(a.astype(mx.float32) for a in (q, k, v)), 0.1, key_multiplier=km, backend="reference")
    assert rel_err(attention(q, k, v, 0.1, key_multiplier=km, backend="metal_flash"), ref) < 1e-2


@metal_only
@pytest.mark.parametrize("mode,bits,group", QMODES)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_dequantize_metal(mode, bits, group, dtype):
    check_dequantize("metal", mode, bits, group, dtype)


# ---------------------------------------------------------------- CPU: emulation of the grouped GEMM

_GEMM_MAIN = r"""
template <typename T, int K, int N, int A_DIV>
void fd_kernel(const T* x, const T* w, const int* slot_row, const int* tile_expert, T* out,
               uint3 threadgroup_position_in_grid, uint thread_index_in_threadgroup,
               uint simdgroup_index_in_threadgroup) {
BODY
}

template <typename V> static std::vector<V> read_bin(const char* path, size_t n) {
  std::vector<V> a(n);
  FILE* f = std::fopen(path, "rb");
  if (!f || std::fread(a.data(), sizeof(V), n, f) != n) { std::fprintf(stderr, "read %s\n", path); std::exit(2); }
  std::fclose(f);
  return a;
}

int main() {
  constexpr int K = EMU_K, N = EMU_N, NT = EMU_THREADS;
  auto x = read_bin<float>("x.bin", EMU_XN);
  auto w = read_bin<float>("w.bin", EMU_WN);
  auto slot_row = read_bin<int>("slot_row.bin", EMU_SLOTS);
  auto tile_expert = read_bin<int>("tile_expert.bin", EMU_GRID_Y);
  std::vector<float> out(size_t(EMU_OUT_ROWS) * N, NAN);  // rows no slot names stay NaN
  for (uint gy = 0; gy < uint(EMU_GRID_Y); ++gy) for (uint gx = 0; gx < uint(EMU_GRID_X / NT); ++gx)
    emu_run_threadgroup(NT, [&](int t) {
      fd_kernel<float, K, N, EMU_A_DIV>(x.data(), w.data(), slot_row.data(), tile_expert.data(), out.data(),
                                        uint3{gx, gy, 0}, uint(t), uint(t / 32));
    });
  FILE* f = std::fopen("out.bin", "wb");
  std::fwrite(out.data(), 4, out.size(), f);
  std::fclose(f);
  return 0;
}
"""


def emulate_grouped_gemm(tmp_path, x, w, slot_row, tile_expert, out_rows, a_div):
    """The Metal grouped GEMM body on the CPU with the wrapper's template and grid (launch_params);
    threadgroups one after another, their 128 threads concurrently."""
    p = gm.launch_params(x.shape, w.shape, mx.float32, tile_expert.shape[0], out_rows, a_div)
    for name, a in (("x", x), ("w", w)):
        np.asarray(a.astype(mx.float32)).tofile(tmp_path / f"{name}.bin")
    for name, a in (("slot_row", slot_row), ("tile_expert", tile_expert)):
        np.asarray(a.astype(mx.int32)).tofile(tmp_path / f"{name}.bin")
    t = dict(p["template"][1:])
    defines = dict(EMU_K=t["K"], EMU_N=t["N"], EMU_A_DIV=t["A_DIV"], EMU_THREADS=p["threadgroup"][0],
                   EMU_GRID_X=p["grid"][0], EMU_GRID_Y=p["grid"][1], EMU_XN=x.size, EMU_WN=w.size,
                   EMU_SLOTS=slot_row.size, EMU_OUT_ROWS=out_rows)
    run_emulation(tmp_path, defines, gm._HEADER, gm._SOURCE, _GEMM_MAIN)
    return np.fromfile(tmp_path / "out.bin", np.float32).reshape(out_rows, w.shape[1])


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU emulation needs g++ (C++20)")
@pytest.mark.parametrize("t, top_k, e, k_in, n, per_slot, routing", [
    (100, 2, 4, 40, 72, False, "random"),   # K % 16 != 0, N % 64 != 0, A_DIV = 2
    (70, 2, 3, 64, 64, True, "random"),     # one input row per slot (A_DIV = 1)
    (90, 2, 4, 48, 16, False, "skewed"),    # experts 2 and 3 get no rows: their tiles are skipped
])
def test_emulated_grouped_gemm_matches_reference(tmp_path, t, top_k, e, k_in, n, per_slot, routing):
    from flashdiff.kernels.moe import grouped_gemm_reference, grouped_layout

    mx.random.seed(12)
    x = mx.random.normal((t * top_k if per_slot else t, k_in))
    w = mx.random.normal((e, n, k_in)) * 0.1
    if routing == "skewed":
        ids = mx.zeros((t, top_k), mx.int32) + mx.arange(top_k, dtype=mx.int32)
    else:
        ids = mx.argsort(mx.random.uniform(shape=(t, e)), axis=-1)[:, :top_k].astype(mx.int32)
    slot_row, tile_expert = grouped_layout(ids, e, tile=gm.BM)
    a_div = 1 if per_slot else top_k
    out = emulate_grouped_gemm(tmp_path, x, w, slot_row, tile_expert, t * top_k, a_div)
    ref = grouped_gemm_reference(x, w, slot_row, tile_expert, t * top_k, a_div)
    assert np.isfinite(out).all()  # every routed row written once
    np.testing.assert_allclose(out, np.array(ref), rtol=1e-5, atol=1e-5)


def test_grouped_gemm_metal_launch_and_errors():
    p = gm.launch_params((300, 256), (4, 200, 256), mx.bfloat16, tiles=13, out_rows=600, a_div=2)
    assert p["grid"] == (4 * gm.THREADS, 13, 1) and p["threadgroup"] == (gm.THREADS, 1, 1)
    assert p["output_shapes"] == [(600, 200)] and dict(p["template"])["K"] == 256
    with pytest.raises(ValueError, match="disagree on K"):
        gm.launch_params((300, 128), (4, 200, 256), mx.bfloat16, 13, 600, 2)
    if not mx.metal.is_available():
        with pytest.raises(RuntimeError, match="Metal back-end"):
            gm.grouped_gemm(mx.zeros((4, 8)), mx.zeros((1, 8, 8)), mx.zeros((64,), mx.int32),
                            mx.zeros((1,), mx.int32), 4)


@metal_only
@pytest.mark.parametrize("per_slot", [False, True])
def test_grouped_gemm_metal(per_slot):
    """The Metal grouped GEMM on the GPU against MLX ops on the same schedule (bf16, fp16)."""
    from flashdiff.kernels.moe import grouped_gemm_reference, grouped_layout, moe_grouped

    mx.random.seed(13)
    t, top_k, e, k_in, n = 300, 2, 4, 200, 136
    ids = mx.argsort(mx.random.uniform(shape=(t, e)), axis=-1)[:, :top_k].astype(mx.int32)
    layout = functools.partial(grouped_layout, tile=gm.BM)
    for dtype in (mx.bfloat16, mx.float16):
        x = mx.random.normal((t, top_k, k_in) if per_slot else (t, k_in)).astype(dtype)
        w = (mx.random.normal((e, n, k_in)) * 0.05).astype(dtype)
        ref = moe_grouped(x.astype(mx.float32), w.astype(mx.float32), ids, grouped_gemm_reference, layout)
        assert rel_err(moe_grouped(x, w, ids, gm.grouped_gemm, layout), ref) < TOL[dtype]


@metal_only
@pytest.mark.parametrize("mode,bits,group", QLINEAR_CASES)
@pytest.mark.parametrize("m", [5, 300])
def test_quantized_linear_metal(mode, bits, group, m):
    check_quantized_linear("metal", mode, bits, group, m)


@metal_only
@pytest.mark.parametrize("quantized", MOE_QUANT_CASES)
@pytest.mark.parametrize("per_slot", [False, True])
def test_moe_gemm_metal(quantized, per_slot):
    check_moe_gemm("metal", quantized, per_slot)


@metal_only
@pytest.mark.parametrize("quantized", MOE_QUANT_CASES)
@pytest.mark.parametrize("per_slot", [False, True])
def test_moe_gemm_metal_default(quantized, per_slot):
    """The default Metal path (moe_sorted: MLX's gather_mm / gather_qmm), not our Metal kernels."""
    check_moe_gemm(None, quantized, per_slot)
