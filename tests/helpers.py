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
