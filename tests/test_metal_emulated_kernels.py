"""CPU emulation of the element-wise Metal kernels that no machine here can run: the dequantize kernel
(flashdiff/kernels/_dequant.py) and the attention prologue (flashdiff/kernels/qk_rope.py).

The Metal source is compiled as C++ (g++, C++20) with a small shim for the Metal builtins it uses
(``simd_sum`` over 32 host threads with a barrier, ``as_type``, ``ldexp``, ``precise::rsqrt``), with the
template arguments and grid the Python wrappers compute, and run over the whole grid on the CPU. It
checks indexing, grid coverage and the arithmetic against the reference; it cannot check what the
Metal compiler accepts or how fast the kernels run (see tests/test_kernels_metal.py for the GPU tests).
"""

import shutil

import mlx.core as mx
import numpy as np
import pytest

from flashdiff.kernels import _dequant, qk_rope
from helpers import compile_and_run_cpp, qk_rope_sources

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU emulation needs g++ (C++20)")

_SHIM = r"""
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>
typedef unsigned int uint;
typedef unsigned long ulong;
typedef unsigned char uchar;
struct uint3 { uint x, y, z; };
#define device
using std::ldexp;
template <typename To, typename From> To as_type(From x) { To y; std::memcpy(&y, &x, sizeof(y)); return y; }
namespace emu { thread_local int lane; thread_local float* slots; thread_local std::barrier<>* bar; }
inline float simd_sum(float x) {
  emu::slots[emu::lane] = x;
  emu::bar->arrive_and_wait();
  float s = 0.0f;
  for (int i = 0; i < 32; ++i) s += emu::slots[i];
  emu::bar->arrive_and_wait();
  return s;
}
namespace metal { namespace precise { inline float rsqrt(float x) { return 1.0f / std::sqrt(x); } } }
template <typename T> std::vector<T> read(const char* path, size_t n) {
  std::vector<T> x(n);
  FILE* f = std::fopen(path, "rb");
  if (!f || std::fread(x.data(), sizeof(T), n, f) != n) { std::fprintf(stderr, "read %s\n", path); std::exit(2); }
  std::fclose(f);
  return x;
}
template <typename T> void write(const char* path, const std::vector<T>& x) {
  FILE* f = std::fopen(path, "wb");
  std::fwrite(x.data(), sizeof(T), x.size(), f);
  std::fclose(f);
}
"""


# ---------------------------------------------------------------- dequantize

_DEQUANT_MAIN = r"""
template <typename T, typename ST, long ROWS, int K, int BITS, int GROUP, int MODE>
void fd_kernel(const uint32_t* w, const ST* scales, const ST* biases, T* out,
               uint3 thread_position_in_grid, uint3 threads_per_grid) {
BODY
}
int main() {
  const size_t nw = size_t(EMU_ROWS) * EMU_K * EMU_BITS / 32, ns = size_t(EMU_ROWS) * EMU_K / EMU_GROUP;
  auto w = read<uint32_t>("w.bin", nw);
  auto s = read<EMU_ST>("scales.bin", ns);
  auto b = read<EMU_ST>("biases.bin", EMU_MODE == 0 ? ns : 1);
  std::vector<float> out(size_t(EMU_ROWS) * EMU_K, NAN);  // elements the grid misses stay NaN
  const uint3 grid{EMU_GX, EMU_GY, 1};
  for (uint y = 0; y < grid.y; ++y) for (uint x = 0; x < grid.x; ++x)
    fd_kernel<float, EMU_ST, EMU_ROWS, EMU_K, EMU_BITS, EMU_GROUP, EMU_MODE>(
        w.data(), s.data(), b.data(), out.data(), uint3{x, y, 0}, grid);
  write("out.bin", out);
  return 0;
}
"""


def emulate_dequantize(tmp_path, w, scales, biases, bits, group, mode):
    rows, k = w.shape[0], w.shape[1] * 32 // bits
    (gx, gy, _), _ = _dequant.dequant_launch(rows, k)
    np.asarray(w).tofile(tmp_path / "w.bin")
    affine = mode == "affine"
    stype = "float" if affine else "uint8_t"
    np.asarray(scales).tofile(tmp_path / "scales.bin")
    (np.asarray(biases) if affine else np.zeros(1, np.uint8)).tofile(tmp_path / "biases.bin")
    defines = dict(EMU_ROWS=rows, EMU_K=k, EMU_BITS=bits, EMU_GROUP=group, EMU_MODE=_dequant.MODES[mode],
                   EMU_ST=stype, EMU_GX=gx, EMU_GY=gy)
    src = "".join(f"#define {n} {v}\n" for n, v in defines.items())
    compile_and_run_cpp(tmp_path, src + _SHIM + _dequant._METAL_HEADER + _DEQUANT_MAIN.replace("BODY", _dequant._METAL_SOURCE),
                        ["-Wno-unused-variable"])
    return np.fromfile(tmp_path / "out.bin", np.float32).reshape(rows, k)


@pytest.mark.parametrize("rows,k,mode,bits,group", [
    (7, 384, "affine", 4, 64), (5, 256, "affine", 3, 32), (3, 640, "affine", 5, 128), (4, 256, "affine", 6, 64),
    (6, 128, "affine", 8, 32), (2, 192, "affine", 2, 64), (3, 96, "mxfp4", 4, 32), (3, 64, "nvfp4", 4, 16),
    (3, 96, "mxfp8", 8, 32)])
def test_emulated_metal_dequantize(tmp_path, rows, k, mode, bits, group):
    mx.random.seed(2)
    wf = mx.random.normal((rows, k))
    q = mx.quantize(wf, group, bits, mode=mode)
    w, s, b = q[0], q[1], (q[2] if len(q) > 2 else None)
    ref = mx.dequantize(w, s, b, group_size=group, bits=bits, mode=mode, dtype=mx.float32)
    out = emulate_dequantize(tmp_path, w, s, b, bits, group, mode)
    np.testing.assert_array_equal(out, np.array(ref))


def test_emulated_metal_dequantize_rows_beyond_grid_y(tmp_path):
    """More rows than the grid's y extent (65535): each thread loops over rows y, y + 65535, ..."""
    rows = _dequant.MAX_GRID_Y + 9
    w, s, b = mx.quantize(mx.random.normal((rows, 32)), 32, 4)
    out = emulate_dequantize(tmp_path, w, s, b, 4, 32, "affine")
    np.testing.assert_array_equal(out, np.array(mx.dequantize(w, s, b, group_size=32, bits=4)))


# ---------------------------------------------------------------- attention prologue

_ROPE_MAIN = r"""
template <typename T, int NB, int LA, int LB, int SA, int SB, int H, int DH>
void fd_kernel(const T* a, const T* bsrc, const T* wqa, const T* wka, const T* wqb, const T* wkb,
               const float* cosv, const float* sinv, const float* eps, T* q, T* k, T* v,
               uint3 thread_position_in_grid, uint thread_index_in_simdgroup) {
BODY
}
int main() {
  constexpr int NB = EMU_NB, LA = EMU_LA, LB = EMU_LB, SA = EMU_SA, SB = EMU_SB, H = EMU_H, DH = EMU_DH;
  auto a = read<float>("a.bin", size_t(NB) * LA * SA);
  auto bsrc = read<float>("bsrc.bin", size_t(NB) * (LB ? LB : LA) * SB);
  auto wqa = read<float>("wqa.bin", DH), wka = read<float>("wka.bin", DH);
  auto wqb = read<float>("wqb.bin", DH), wkb = read<float>("wkb.bin", DH);
  auto cosv = read<float>("cos.bin", size_t(LA + LB) * DH / 2), sinv = read<float>("sin.bin", size_t(LA + LB) * DH / 2);
  auto eps = read<float>("eps.bin", 1);
  const size_t n = size_t(NB) * (LA + LB) * H * DH;
  std::vector<float> q(n, NAN), k(n, NAN), v(n, NAN);  // rows the kernel misses stay NaN
  const uint threads = uint(EMU_GRID_X);
  for (uint base = 0; base < threads; base += 32) {  // one simdgroup at a time, its 32 lanes concurrently
    std::barrier<> bar(32);
    float slots[32];
    std::vector<std::thread> lanes;
    for (int lane = 0; lane < 32; ++lane) lanes.emplace_back([&, lane] {
      emu::lane = lane; emu::slots = slots; emu::bar = &bar;
      fd_kernel<float, NB, LA, LB, SA, SB, H, DH>(a.data(), bsrc.data(), wqa.data(), wka.data(), wqb.data(),
          wkb.data(), cosv.data(), sinv.data(), eps.data(), q.data(), k.data(), v.data(),
          uint3{base + lane, 0, 0}, uint(lane));
    });
    for (auto& t : lanes) t.join();
  }
  write("q.bin", q); write("k.bin", k); write("v.bin", v);
  return 0;
}
"""


@pytest.mark.parametrize("lengths,heads,dh,extra", [((3, 5), 2, 64, 0), ((4,), 1, 128, 40), ((1, 2), 3, 64, 0)])
def test_emulated_metal_qk_norm_rope(tmp_path, lengths, heads, dh, extra):
    sources, cos, sin = qk_rope_sources(lengths, heads, dh, extra, seed=6)
    template, shape, grid, _ = qk_rope.launch_config(sources, heads, dh)
    t = dict(template)
    (ta, wqa, wka), (tb, wqb, wkb) = sources[0], sources[-1]
    for name, arr in (("a", ta), ("bsrc", tb), ("wqa", wqa), ("wka", wka), ("wqb", wqb), ("wkb", wkb),
                      ("cos", cos), ("sin", sin), ("eps", mx.array([1e-6]))):
        np.asarray(arr.astype(mx.float32)).tofile(tmp_path / f"{name}.bin")
    defines = dict(EMU_NB=t["NB"], EMU_LA=t["LA"], EMU_LB=t["LB"], EMU_SA=t["SA"], EMU_SB=t["SB"], EMU_H=t["H"],
                   EMU_DH=t["DH"], EMU_GRID_X=grid[0])
    src = "".join(f"#define {n} {v}\n" for n, v in defines.items())
    compile_and_run_cpp(tmp_path, src + _SHIM + _ROPE_MAIN.replace("BODY", qk_rope._METAL_SOURCE),
                        ["-Wno-unused-variable"])
    ref = qk_rope.qk_norm_rope_reference(sources, heads, dh, cos, sin, 1e-6)
    for name, r in zip("qkv", ref):
        out = np.fromfile(tmp_path / f"{name}.bin", np.float32).reshape(shape)
        np.testing.assert_allclose(out, np.array(r), rtol=1e-5, atol=1e-5)
