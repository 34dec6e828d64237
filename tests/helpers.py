"""Importable test helpers (conftest fixtures are not importable by name)."""
import re
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np

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
    return ("#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cstdint>\n" + header
            + "\nnamespace mlx::core::cu {\n__global__ void " + name + "(" + ", ".join(params) + ") {\n"
            + template_lines(template, CUDA_TYPES) + "\n" + source + "\n}\n}  // namespace mlx::core::cu\n")


def template_lines(template, type_names) -> str:
    """A kernel's template values as MLX writes them into the body: constexpr bool / int lines, and
    `using` lines for types (type_names: the C++ name of each type value)."""
    lines = []
    for key, value in template:
        if isinstance(value, bool):
            lines.append(f"  constexpr bool {key} = {'true' if value else 'false'};")
        elif isinstance(value, int):
            lines.append(f"  constexpr int {key} = {value};")
        else:
            lines.append(f"  using {key} = {type_names[value]};")
    return "\n".join(lines)


def softmax_attention_np(q, k, v, scale, bias=None):
    """softmax(q k^T * scale + bias) v in numpy (float64 in, float64 out); k / v heads repeated for
    GQA; bias (B, Lk) additive per key."""
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = q @ k.swapaxes(-1, -2) * scale
    if bias is not None:
        s = s + bias[:, None, None, :]
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def _nvcc(tmp_path, source: str, arch: str, stem: str, *output_args):
    path = tmp_path / f"{stem}.cu"
    path.write_text(source)
    cc = arch.replace("sm_", "compute_")
    proc = subprocess.run(["nvcc", "-std=c++17", f"-gencode=arch={cc},code={arch}", str(path), *output_args],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def nvcc_compile(tmp_path, source: str, arch: str = "sm_90a"):
    """Compile with nvcc for `arch` (what MLX's NVRTC does on an H200); returns ptxas's report. Register
    counts are a guide, not a guarantee: a kernel at 154 registers here asked for more than 384 threads
    fit under MLX's NVRTC on the H200 (session 6, the removed cluster GEMM)."""
    return _nvcc(tmp_path, source, arch, "kernel", "-c", "-o", str(tmp_path / "kernel.o"), "-Xptxas", "-v").stderr


def nvdisasm_path():
    """The nvdisasm binary (the test extra nvidia-cuda-nvdisasm on Linux x86-64, or one on PATH), or None."""
    import shutil
    try:
        import nvidia

        for root in nvidia.__path__:
            for found in Path(root).glob("cu*/bin/nvdisasm"):
                return str(found)
    except ImportError:
        pass
    return shutil.which("nvdisasm")


def sass(tmp_path, source: str, arch: str = "sm_90a"):
    """`source` built by nvcc into a cubin and disassembled by nvdisasm: [(address, instruction)] with each
    branch's target label replaced by its address (`BRA 0x2350`)."""
    cubin = tmp_path / "kernel.cubin"
    _nvcc(tmp_path, source, arch, "kernel", "-cubin", "-o", str(cubin))
    text = subprocess.run([nvdisasm_path(), str(cubin)], capture_output=True, text=True, check=True).stdout
    labels, ins, pending = {}, [], []
    for line in text.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            addr = int(m.group(1), 16)
            labels.update({name: addr for name in pending})
            pending = []
            ins.append((addr, m.group(2)))
    resolve = lambda t: re.sub(r"`\((\.L_x_\d+)\)", lambda m: hex(labels[m.group(1)]), t)  # noqa: E731
    return [(a, resolve(t)) for a, t in ins]


def sass_loop(ins, min_mma: int, addresses: bool = False):
    """The shortest loop (a conditional backward branch and the instructions it spans) that holds at least
    `min_mma` HGMMA instructions: a kernel's main loop. Returns its instructions ((address, instruction) pairs
    with `addresses`)."""
    best = None
    for addr, text in ins:
        m = re.match(r"@!?P\d\s+BRA\s+0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [(a, t) for a, t in ins if int(m.group(1), 16) <= a <= addr]
            if sum("HGMMA" in t for _, t in body) >= min_mma and (best is None or len(body) < len(best)):
                best = body
    assert best is not None, f"no loop holds {min_mma} HGMMA instructions"
    return best if addresses else [t for _, t in best]


def attention_main_loop(tmp_path, lk, has_bias=False, persistent=False, dtype=mx.bfloat16, sources=None,
                        addresses=False):
    """The SASS of the sm_90 attention's main loop (S_j = Q K_j^T and P V: 8 + 8 wgmmas) at LQ = LK = lk, 24 heads:
    the shipped kernel (per-tile or persistent form), or sources = (header, body) in its place."""
    from flashdiff.kernels import _attention_sm90, _attention_sm90_forms

    header, body = sources or (_attention_sm90._HEADER,
                               _attention_sm90_forms._SOURCE_PERSISTENT if persistent else _attention_sm90._SOURCE)
    src = cuda_kernel_source(
        "attention_sm90", header, body,
        [("q", dtype), ("k", dtype), ("v", dtype), ("tmaps", mx.uint8), ("scale", mx.float32), ("kbias", mx.float32)],
        [("out", dtype)],
        _attention_sm90.main_template(dtype, 24, 24, lk, lk, has_bias, True, False, 128 ** -0.5, 24 if persistent else None))
    tmp_path.mkdir(parents=True, exist_ok=True)
    return sass_loop(sass(tmp_path, src), min_mma=16, addresses=addresses)


# ---------------------------------------------------------------- GPU kernel cases shared by the CUDA
# and Metal test files (tests/test_kernels_cuda.py, tests/test_kernels_metal.py): the same case,
# the backend named by the caller, the pure-MLX reference as the oracle.

QMODES = [("affine", b, g) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)] + [
    ("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)]  # every config mx.quantize makes
QLINEAR_CASES = [("affine", 4, 64), ("affine", 8, 64), ("affine", 3, 32), ("affine", 5, 128), ("mxfp4", 4, 32),
                 ("nvfp4", 4, 16), ("mxfp8", 8, 32)]
MOE_QUANT_CASES = [None, ("affine", 4, 64), ("mxfp4", 4, 32), ("affine", 8, 64)]


def f64(a):
    return np.array(a.astype(mx.float32), dtype=np.float64)


def rel_err(a, b):
    """Relative L2 error of mx array a against mx array b (a must be finite)."""
    a, b = f64(a), f64(b)
    assert np.isfinite(a).all()
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def quant(shape, mode, bits, group, dtype=mx.bfloat16, seed=0):
    mx.random.seed(seed)
    w = (mx.random.normal(shape) * 0.05).astype(dtype)
    q = mx.quantize(w, group, bits, mode=mode, stream=mx.cpu)
    return q[0], q[1], (q[2] if len(q) > 2 else None)


def check_dequantize(backend, mode, bits, group, dtype):
    from flashdiff.kernels import dequantize
    w, s, b = quant((3, 40, 384), mode, bits, group)
    ref = mx.dequantize(w, s, b, group_size=group, bits=bits, mode=mode, dtype=mx.float32, stream=mx.cpu)
    out = dequantize(w, s, b, bits, group, mode, dtype=dtype, backend=backend)
    assert out.shape == ref.shape and out.dtype == dtype
    # bf16: the reference rounds q*s and +b separately in bf16, the kernel once from float32: 1 ulp
    tol = 0.0 if dtype == mx.float32 else 2 ** -7
    np.testing.assert_allclose(f64(out), f64(ref), rtol=tol, atol=1e-7)


def check_quantized_linear(backend, mode, bits, group, m):
    from flashdiff.kernels import quantized_linear
    w, s, b = quant((200, 512), mode, bits, group)
    mx.random.seed(1)
    x = mx.random.normal((m, 512)).astype(mx.bfloat16)
    bias = mx.random.normal((200,)).astype(mx.bfloat16)
    ref = quantized_linear(x, w, s, b, bits, group, mode, bias=bias, backend="reference")
    mx.eval(ref)
    out = quantized_linear(x, w, s, b, bits, group, mode, bias=bias, backend=backend)
    assert out.dtype == mx.bfloat16 and out.shape == (m, 200)
    assert rel_err(out, ref) < 1e-2


def check_moe_gemm(backend, quantized, per_slot):
    from flashdiff.kernels import moe_gemm
    mx.random.seed(2)
    t, top_k, e, k_in, n = 300, 2, 4, 256, 192
    x = mx.random.normal((t, top_k, k_in) if per_slot else (t, k_in)).astype(mx.bfloat16)
    ids = mx.argsort(mx.random.uniform(shape=(t, e)), axis=-1)[:, :top_k].astype(mx.int32)
    if quantized is None:
        w, kw = (mx.random.normal((e, n, k_in)) * 0.05).astype(mx.bfloat16), {}
    else:
        mode, bits, group = quantized
        w, s, b = quant((e, n, k_in), mode, bits, group)
        kw = dict(scales=s, biases=b, bits=bits, group_size=group, mode=mode)
    ref = moe_gemm(x.astype(mx.float32), w, ids, backend="reference", **kw)
    out = moe_gemm(x, w, ids, backend=backend, **kw)
    assert out.shape == (t, top_k, n) and out.dtype == mx.bfloat16
    assert rel_err(out, ref) < 1e-2


def check_same_layout(slot, tiles, ids, e):
    """A layout kernel's (slot_row, tile_expert) for expert ids `ids` (T, k) against moe.grouped_layout: the
    same tile experts, padding in the same slots, and each expert's segment holding the same routed rows
    (their order within a segment is free: each row's result does not depend on its place)."""
    from flashdiff.kernels.moe import grouped_layout

    slot, tiles = np.array(slot), np.array(tiles)
    slot_ref, tiles_ref = (np.array(a) for a in grouped_layout(mx.array(ids), e))
    np.testing.assert_array_equal(tiles, tiles_ref)
    np.testing.assert_array_equal(slot >= 0, slot_ref >= 0)
    slot_expert = np.repeat(tiles, slot.size // tiles.size)
    for j in range(e):
        np.testing.assert_array_equal(np.sort(slot[slot_expert == j]), np.sort(slot_ref[slot_expert == j]))
