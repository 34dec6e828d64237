"""Attention prologue of the MMDiT models: q/k RMSNorm + interleaved RoPE + joint [text, image] sequence.

``qk_norm_rope(sources, heads, head_dim, cos, sin, eps)`` takes the fused q/k/v projection outputs of
one or two streams and returns the q, k, v that attention needs:

    sources: [(t, q_weight, k_weight), ...] (one or two), t (B, L_i, C_i) whose first 3*H*Dh columns
             are [q | k | v] (any columns after them, e.g. a single block's MLP, are ignored);
             q_weight / k_weight (Dh,) are that stream's q/k RMSNorm weights.
    cos, sin: (L, Dh/2) float32 angles for the joint sequence L = sum(L_i), in sources' order.
    returns q, k, v (B, L, H, Dh) in t.dtype; q and k normed per head (as ``mx.fast.rms_norm``:
    w * T(x * rsqrt(mean(x^2) + eps))) then rotated in float32 (pairs (2i, 2i+1)); v copied.

Unfused, this is a slice, reshape, two RMSNorms, three concatenations and two RoPE passes per
stream: about ten reads and writes of each (B, L, H*Dh) tensor. The CUDA kernel does it in one pass
(one warp per (b, l, h) row of Dh values; the RMS reduction is a warp shuffle; eps a compile-time constant,
EPS_BITS, since session 15: 3-6% less time than reading a host-made (1,) array in every warp, one H200 run of
benchmarks/probe_prologue_eps.py). The Metal kernel is
its twin (one simdgroup per row) and has never run on a GPU (no Apple GPU here; its body runs in a
CPU emulation in tests/test_metal_emulated_kernels.py): on Metal the reference runs unless
backend="metal" / FLASHDIFF_KERNELS=metal. Head dims that are not a multiple of 64, and CPU,
use the reference (plain MLX ops, also the test oracle).
"""

import functools

import mlx.core as mx

from ._dispatch import float_bits, metal_kernels_requested, resolve_backend
from ._jit import cuda_kernel


def apply_rope_interleaved(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved pairs (2k, 2k+1) of the last axis.

    x: (..., L, D); cos, sin: (L, D/2) broadcastable. Computed in float32, returned in x.dtype.
    """
    shape = x.shape
    xf = x.astype(mx.float32).reshape(*shape[:-1], shape[-1] // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(shape).astype(x.dtype)


@mx.compile
def _rope_fp32(x, cos, sin):
    return apply_rope_interleaved(x, cos, sin)


def _check(sources, heads, head_dim, cos, sin):
    if not 1 <= len(sources) <= 2:
        raise ValueError(f"qk_norm_rope takes one or two (t, q_weight, k_weight) sources, got {len(sources)}.")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}.")
    inner = heads * head_dim
    b0, dtype = sources[0][0].shape[0], sources[0][0].dtype
    for t, wq, wk in sources:
        if t.ndim != 3 or t.shape[0] != b0 or t.shape[2] < 3 * inner:
            raise ValueError(f"source {t.shape} must be (B={b0}, L, >= 3*H*Dh = {3 * inner}).")
        if t.dtype != dtype or not mx.issubdtype(dtype, mx.floating):
            raise TypeError(f"sources must share one float dtype, got {t.dtype} and {dtype}.")
        if wq.shape != (head_dim,) or wk.shape != (head_dim,):
            raise ValueError(f"q/k norm weights must be ({head_dim},), got {wq.shape} / {wk.shape}.")
    length = sum(t.shape[1] for t, _, _ in sources)
    if cos.shape != (length, head_dim // 2) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be (L={length}, Dh/2={head_dim // 2}), got {cos.shape} / {sin.shape}.")


def qk_norm_rope_reference(sources, heads, head_dim, cos, sin, eps):
    """Plain MLX ops: rms_norm per stream, concatenate, float32 RoPE."""
    qs, ks, vs = [], [], []
    for t, wq, wk in sources:
        b, length, _ = t.shape
        u = t[..., : 3 * heads * head_dim].reshape(b, length, 3, heads, head_dim)
        qs.append(mx.fast.rms_norm(u[:, :, 0], wq, eps))
        ks.append(mx.fast.rms_norm(u[:, :, 1], wk, eps))
        vs.append(u[:, :, 2])
    cat = (lambda xs: xs[0]) if len(sources) == 1 else (lambda xs: mx.concatenate(xs, axis=1))
    cos, sin = cos[:, None], sin[:, None]
    return _rope_fp32(cat(qs), cos, sin), _rope_fp32(cat(ks), cos, sin), cat(vs)


def qk_norm_rope(sources, heads: int, head_dim: int, cos, sin, eps: float, *, backend=None):
    _check(sources, heads, head_dim, cos, sin)
    impl = resolve_backend(backend)
    if impl == "reference" or head_dim % 64 or (impl == "metal" and not metal_kernels_requested(backend)):
        return qk_norm_rope_reference(sources, heads, head_dim, cos, sin, eps)
    return _qk_norm_rope_gpu(sources, heads, head_dim, cos, sin, eps, impl)


# ---------------------------------------------------------------- CUDA
# Inputs a/b: the two sources (b = a when there is one, LB = 0); SA/SB their row lengths (columns).
_CUDA_SOURCE = r"""
  constexpr int E = DH / 32;  // values per lane, even
  const unsigned int lane = threadIdx.x & 31u;
  const unsigned long long row = ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const unsigned long long L = (unsigned long long)LA + LB;
  if (row >= (unsigned long long)NB * L * H) return;  // the whole warp shares `row`
  const unsigned int h = (unsigned int)(row % H);
  const unsigned long long bl = row / H;
  const unsigned long long l = bl % L;
  const unsigned long long b = bl / L;
  const bool in_a = l < (unsigned long long)LA;
  const T* src = in_a ? a + (b * LA + l) * SA : bsrc + (b * LB + (l - LA)) * SB;
  const unsigned int d0 = lane * E;
  const float eps_v = __int_as_float(EPS_BITS);  // compile-time: no per-warp read of a host-written array
  T* outs[3] = {q, k, v};
#pragma unroll
  for (int part = 0; part < 3; ++part) {
    const T* p = src + (unsigned long long)part * H * DH + (unsigned long long)h * DH + d0;
    T* o = outs[part] + row * DH + d0;
    if (part == 2) {
#pragma unroll
      for (int i = 0; i < E; ++i) o[i] = p[i];
      continue;
    }
    float x[E];
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < E; ++i) { x[i] = (float)p[i]; ss += x[i] * x[i]; }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    const float r = rsqrtf(ss / (float)DH + eps_v);
    const T* w = part == 0 ? (in_a ? wqa : wqb) : (in_a ? wka : wkb);
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] = (float)(T)((float)w[d0 + i] * (float)(T)(x[i] * r));
#pragma unroll
    for (int j = 0; j < E / 2; ++j) {
      const unsigned long long ai = l * (DH / 2) + d0 / 2 + j;
      const float c = cosv[ai], s = sinv[ai];
      const float x0 = x[2 * j], x1 = x[2 * j + 1];
      o[2 * j] = (T)(x0 * c - x1 * s);
      o[2 * j + 1] = (T)(x0 * s + x1 * c);
    }
  }
"""

# ---------------------------------------------------------------- Metal (untested: no Apple GPU here)
_METAL_SOURCE = r"""
  constexpr int E = DH / 32;
  const uint lane = thread_index_in_simdgroup;
  const ulong row = ulong(thread_position_in_grid.x) / 32;
  const ulong L = ulong(LA) + ulong(LB);
  if (row >= ulong(NB) * L * ulong(H)) return;
  const uint h = uint(row % ulong(H));
  const ulong bl = row / ulong(H);
  const ulong l = bl % L;
  const ulong b = bl / L;
  const bool in_a = l < ulong(LA);
  const device T* src = in_a ? a + (b * ulong(LA) + l) * ulong(SA) : bsrc + (b * ulong(LB) + (l - ulong(LA))) * ulong(SB);
  const uint d0 = lane * E;
  const float eps_v = eps[0];
  for (int part = 0; part < 3; ++part) {
    const device T* p = src + ulong(part) * H * DH + ulong(h) * DH + d0;
    device T* o = (part == 0 ? q : (part == 1 ? k : v)) + row * DH + d0;
    if (part == 2) {
      for (int i = 0; i < E; ++i) o[i] = p[i];
      continue;
    }
    float x[E];
    float ss = 0.0f;
    for (int i = 0; i < E; ++i) { x[i] = float(p[i]); ss += x[i] * x[i]; }
    ss = simd_sum(ss);
    const float r = metal::precise::rsqrt(ss / float(DH) + eps_v);
    const device T* w = part == 0 ? (in_a ? wqa : wqb) : (in_a ? wka : wkb);
    for (int i = 0; i < E; ++i) x[i] = float(T(float(w[d0 + i]) * float(T(x[i] * r))));
    for (int j = 0; j < E / 2; ++j) {
      const ulong ai = l * (DH / 2) + d0 / 2 + j;
      const float c = cosv[ai], s = sinv[ai];
      const float x0 = x[2 * j], x1 = x[2 * j + 1];
      o[2 * j] = T(x0 * c - x1 * s);
      o[2 * j + 1] = T(x0 * s + x1 * c);
    }
  }
"""

_INPUTS = ["a", "bsrc", "wqa", "wka", "wqb", "wkb", "cosv", "sinv"]


@functools.cache
def _kernel(backend: str):
    if backend == "cuda":  # eps is the template value EPS_BITS
        return cuda_kernel(name="flashdiff_qk_norm_rope", input_names=_INPUTS,
                           output_names=["q", "k", "v"], source=_CUDA_SOURCE)
    return mx.fast.metal_kernel(name="flashdiff_qk_norm_rope", input_names=_INPUTS + ["eps"],
                                output_names=["q", "k", "v"], source=_METAL_SOURCE)


def launch_config(sources, heads, head_dim):
    """Template arguments (without the CUDA kernel's EPS_BITS), output shape and grid of the GPU kernel
    (also checked by CPU tests)."""
    (ta, _, _), (tb, _, _) = sources[0], sources[-1]
    single = len(sources) == 1
    nb, la, lb = ta.shape[0], ta.shape[1], 0 if single else tb.shape[1]
    template = [("T", ta.dtype), ("NB", nb), ("LA", la), ("LB", lb), ("SA", ta.shape[2]),
                ("SB", tb.shape[2]), ("H", heads), ("DH", head_dim)]
    rows = nb * (la + lb) * heads
    return template, (nb, la + lb, heads, head_dim), (rows * 32, 1, 1), (256, 1, 1)


def _qk_norm_rope_gpu(sources, heads, head_dim, cos, sin, eps, backend):
    template, shape, grid, group = launch_config(sources, heads, head_dim)
    (ta, wqa, wka), (tb, wqb, wkb) = sources[0], sources[-1]
    dtype = ta.dtype
    inputs = [ta, tb, wqa.astype(dtype), wka.astype(dtype), wqb.astype(dtype), wkb.astype(dtype),
              cos.astype(mx.float32), sin.astype(mx.float32)]
    if backend == "cuda":  # a constant: MLX keeps a host-made (1,) array in managed memory, which every warp would read
        template = template + [("EPS_BITS", float_bits(eps))]
    else:
        inputs.append(mx.array([eps], dtype=mx.float32))
    return tuple(_kernel(backend)(inputs=inputs, template=template, grid=grid, threadgroup=group,
                                  output_shapes=[shape] * 3, output_dtypes=[dtype] * 3))
