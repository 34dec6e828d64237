"""Importable test helpers (conftest fixtures are not importable by name)."""
import subprocess

import mlx.core as mx

from conftest import assert_close, to_numpy, torch_state_to_mx  # noqa: F401


def qk_rope_sources(lengths, heads, dh, extra=0, dtype=mx.float32, seed=0):
    """Inputs of kernels.qk_norm_rope: one (t, q_weight, k_weight) per stream (the first stream with
    `extra` columns after [q | k | v]) and cos/sin for the joint sequence."""
    mx.random.seed(seed)
    sources = []
    for i, length in enumerate(lengths):
        t = mx.random.normal((2, length, 3 * heads * dh + (extra if i == 0 else 0))).astype(dtype)
        wq, wk = (1.0 + 0.3 * mx.random.normal((dh,))).astype(dtype), (1.0 + 0.3 * mx.random.normal((dh,))).astype(dtype)
        sources.append((t, wq, wk))
    ang = mx.random.uniform(-20, 20, (sum(lengths), dh // 2))
    return sources, mx.cos(ang), mx.sin(ang)


def compile_and_run_cpp(tmp_path, source: str, extra_flags=()):
    """Build `source` with g++ (C++20, -Wall -Werror) in tmp_path and run it there (the Metal kernel
    emulations: they read and write their arrays as .bin files in tmp_path)."""
    (tmp_path / "emu.cpp").write_text(source)
    cmd = ["g++", "-std=c++20", "-O1", "-pthread", "-Wall", "-Werror", *extra_flags, "emu.cpp", "-o", "emu"]
    build = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    subprocess.run(["./emu"], cwd=tmp_path, check=True, timeout=300)


CUDA_TYPES = {mx.bfloat16: "__nv_bfloat16", mx.float16: "__half", mx.float32: "float", mx.int32: "int32_t",
              mx.uint32: "uint32_t", mx.uint8: "uint8_t"}


def cuda_kernel_source(name, header, source, inputs, outputs, template):
    """The translation unit ``mx.fast.cuda_kernel`` builds (MLX 0.32 custom_kernel.cpp: inputs as
    const pointers, then outputs, template values as constexpr/using lines, then the body), with the
    CUDA headers in place of MLX's device utilities. inputs / outputs: [(name, mx dtype)]."""
    params = [f"const {CUDA_TYPES[t]}* {n}" for n, t in inputs] + [f"{CUDA_TYPES[t]}* {n}" for n, t in outputs]
    lines = []
    for key, value in template:
        if isinstance(value, bool):
            lines.append(f"  constexpr bool {key} = {'true' if value else 'false'};")
        elif isinstance(value, int):
            lines.append(f"  constexpr int {key} = {value};")
        else:
            lines.append(f"  using {key} = {CUDA_TYPES[value]};")
    return ("#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cstdint>\n" + header
            + "\nnamespace mlx::core::cu {\n__global__ void " + name + "(" + ", ".join(params) + ") {\n"
            + "\n".join(lines) + "\n" + source + "\n}\n}  // namespace mlx::core::cu\n")


def nvcc_compile(tmp_path, source: str, arch: str = "sm_90a"):
    """Compile with nvcc for `arch` (what MLX's NVRTC does on an H200); returns ptxas's report."""
    path = tmp_path / "kernel.cu"
    path.write_text(source)
    cc = arch.replace("sm_", "compute_")
    proc = subprocess.run(["nvcc", "-std=c++17", f"-gencode=arch={cc},code={arch}", "-c", str(path),
                           "-o", str(tmp_path / "kernel.o"), "-Xptxas", "-v"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr
