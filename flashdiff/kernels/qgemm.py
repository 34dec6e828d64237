"""Quantized linear layers for large token counts (diffusion: M from 256 to 80,000).

``quantized_linear(x, w, scales, biases, bits, group_size, mode)`` equals
``x @ mx.dequantize(w, scales, biases, group_size, bits, mode).T (+ bias)`` for the arrays that
``mx.quantize`` produces (affine 2/3/4/5/6/8 bits, mxfp4, nvfp4, mxfp8).

Design: MLX's ``quantized_matmul`` is built for LLM decoding (small M) and ran at 0.15-0.38x of bf16
speed at diffusion sizes on the H200. For M >= ``SMALL_M`` we dequantize the weight into an x.dtype
scratch with one memory-bound kernel (``_dequant``) and run the dense GEMM (cuBLAS / MLX steel):
0.81-1.00x of bf16 at M >= 4608 (benchmarks/README.md, Kernels). The dequantization is made to *depend on x*
(``mx.depends``), so MLX's lazy scheduler cannot run every layer's dequantization ahead of the
GEMMs. Measured limit: on CUDA the host still queues many layers ahead of the GPU and their scratch
buffers stay allocated until the GPU reaches them (FLUX-dev-shaped 4-bit forward: peak 18.9 GiB for
6.2 GiB of weights). Evaluating once per transformer block (``mx.eval`` of the block output) bounds
it (7.3 GiB) at ~13% more time. A fused dequantize-in-GEMM kernel would remove the scratch.
For small M we use ``quantized_matmul``, and on Metal too unless the custom (untested) Metal
dequantize kernel is asked for with backend="metal" / FLASHDIFF_KERNELS=metal.

Measured in session 8 (benchmarks/README.md): evaluated as a model's blocks are (``streamed``, the
host building the next call while the GPU runs this one), 0.90-1.03x of bf16 at M >= 4608 and
0.54x at M = 1024 (K = N = 3072), where the host time of the two extra graph nodes, not the GPU,
sets the pace. The fused kernel (``_gemm_tma_dequant``, sm_90, FLASHDIFF_QLINEAR=fused: the weight
dequantized inside the GEMM, no scratch) is exact but ran at about half of bf16 speed, so it is
opt-in (FUSED_DEFAULT).

Session 9, each call compiled (as the pipelines compile their blocks) and streamed, ours and bf16 measured
in turn: 0.91-1.01x of bf16 at every FLUX / Wan shape with M >= 4608, 0.76-0.84x at M = 1024, where the
dequantize pass itself (~8 us of GPU time against ~38 us for the GEMM) is what is left. The mixed-input
GEMM (``_gemm_mixed``, FLASHDIFF_QLINEAR=mixed: the weight converted into wgmma's register operand) ties
this path at M = 1024 (0.82x against 0.81x in one run) and loses at M = 4608 (0.5-0.63x), so it is
opt-in too. Session 10 measured the 1024-row FLUX shapes (FLUX at 512 x 512): this path 0.77-0.86x of
bf16, the mixed GEMM 0.46-0.66x. At M = 1024 the dequantize pass is ~20% of the GEMM's time and runs
before it on the one stream; only a fused kernel as fast as cuBLAS would hide it. Session 11: the persistent
TMA GEMM whose storer warps dequantize the weight while it runs (FLASHDIFF_QLINEAR=persistent,
``_gemm_tma_dequant_persistent``, exact) is not that kernel either: 0.48-0.71x of bf16 at 1024 rows.

Inside a model's block (read in MLX's source in session 13, seen and timed in session 14): MLX's CUDA
back-end records an evaluation into one CUDA graph whose edges come from buffers only (a kernel waits for the
last kernel of the graph that wrote one of its inputs or outputs). ``mx.depends`` launches nothing, so it adds no edge, and the
dequantize kernel reads only the weight: it is a root of the graph, which the GPU may run beside the GEMMs of
the layers before it. The measures above time one layer per graph, where it cannot. benchmarks/probe_graph_edges.py
showed the dequantize nodes as roots on the H200, but benchmarks/in_graph.py (chains of 8 layers compiled as one
function) measured little gain from it: 1024-row chains at 0.76-0.81x of bf16, 0.74-0.79x with CUDA graphs off;
4608-row chains at 0.91-0.96x.

Session 18: packed layers (``PackedQuantizedLinear``, ``pack_quantized_linears``; opt-in with
FLASHDIFF_QLINEAR_PACKED=1 on sm_90) hold the weight in the mixed GEMM's layout only and choose by M: the mixed GEMM
where ``packed_gemm_wins``, else ``_gemm_mixed_pack.dequantize_packed`` + the dense GEMM. At the 1024-row FLUX
4-bit shapes 0.90-1.00x of bf16 (this module's default path 0.80-0.81x in the same run), 8-bit 0.82-0.88x
(benchmarks/README.md). Session 19: 0.93x / 1.01x at the other two (1024 x 3072 -> 21504, 1024 x 15360 -> 3072), and
``_gemm_mixed_pack.packed_gemv`` for calls of fewer than SMALL_M rows (the modulation layers), which had dequantized
the whole weight for one row; a whole FLUX-dev forward in the pipelines' GPU mode is still 0.6-3.5% slower packed
than with this module's default path, so packing stays opt-in. Session 20, with dequantize_packed issuing all its loads
first (2-4% behind the default dequantize kernel, kernels alone): 1.5% faster packed at 512^2, 2.4% slower at 1024^2.
"""

import math
import os

import mlx.core as mx
import mlx.nn as nn

from . import _gemm_cuda, _gemm_mixed, _gemm_mixed_pack, _gemm_tma, _gemm_tma_dequant, _gemm_tma_dequant_persistent
from ._dequant import check_quantized, dequantize_checked
from ._dispatch import metal_kernels_requested, resolve_backend

SMALL_M = 32  # below this many rows, MLX's quantized_matmul (decode kernel) wins
assert SMALL_M <= _gemm_mixed_pack.GEMV_ROWS  # packed layers take packed_gemv there
FUSED_DEFAULT = False  # the fused sm_90 kernels by default (else only with FLASHDIFF_QLINEAR=fused / mixed)
QLINEAR_PATHS = ("auto", "fused", "mixed", "persistent", "dequant")


def _fused_path(impl, x, scales, bits, group_size, mode, k, n):
    """Which sm_90 kernel computes this call whole, or None for dequantize + GEMM. FLASHDIFF_QLINEAR:
    "fused" = _gemm_tma_dequant (the weight tile dequantized into shared memory), "mixed" = _gemm_mixed
    (the weight converted into wgmma's register operand), "persistent" = the persistent TMA GEMM whose storer
    warps dequantize the weight while it runs (``_gemm_tma_dequant_persistent``), each only where it takes the
    arguments;
    "dequant" = never; "auto" (unset) = FUSED_DEFAULT (False: dequantize + GEMM). A value outside
    QLINEAR_PATHS raises on every backend."""
    choice = (os.environ.get("FLASHDIFF_QLINEAR") or "auto").lower()
    if choice not in QLINEAR_PATHS:
        raise ValueError(f"FLASHDIFF_QLINEAR={choice!r}: use one of {QLINEAR_PATHS}.")
    if impl != "cuda" or choice == "dequant" or (choice == "auto" and not FUSED_DEFAULT):
        return None
    if choice == "persistent":  # _gemm_tma_dequant_persistent: the weight dequantized by the GEMM's storer warps
        available = _gemm_cuda.quantized_gemm_available(x, scales, bits, group_size, mode, k, n, force=True)
        return _gemm_tma_dequant_persistent if available else None
    kernel = _gemm_mixed if choice == "mixed" else _gemm_tma_dequant
    return kernel if kernel.supported(x, scales, bits, group_size, mode, k, n) else None


def quantized_linear(x, w, scales, biases, bits=None, group_size=None, mode="affine", bias=None, *,
                     backend=None):
    """y = x @ dequantize(w).T (+ bias).

    x: (..., K) float16/bfloat16/float32. w, scales, biases: outputs of ``mx.quantize`` of an (N, K)
    weight (biases None for mxfp4/nvfp4/mxfp8). bias: optional (N,). Returns (..., N) in x.dtype.
    backend: None/"auto" (by device), "reference", "cuda" or "metal"; env FLASHDIFF_KERNELS=reference.
    """
    bits, group_size, n, k = check_quantized(w, scales, biases, bits, group_size, mode)
    if w.ndim != 2:
        raise ValueError(f"quantized_linear needs a 2-D quantized weight, got {w.shape}; use moe_gemm for experts.")
    if not mx.issubdtype(x.dtype, mx.floating):
        raise TypeError(f"x must be a float array, got {x.dtype}.")
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"x last axis {x.shape[-1] if x.ndim else None} != weight input size K={k} (x {x.shape}).")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {bias.shape}.")
    impl = resolve_backend(backend)
    m = x.size // k
    builtin = m < SMALL_M or (impl == "metal" and not metal_kernels_requested(backend))
    if impl != "reference" and builtin:
        y = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode)
        return y if bias is None else y + bias.astype(y.dtype)
    fused = _fused_path(impl, x, scales, bits, group_size, mode, k, n)
    if fused is _gemm_mixed:
        return _gemm_mixed.mixed_gemm(x.reshape(m, k), w, scales, biases, bits, group_size, bias).reshape(*x.shape[:-1], n)
    if fused is _gemm_tma_dequant_persistent:
        y = _gemm_cuda.dense_gemm_quantized(x.reshape(m, k), w, scales, biases, bits, group_size)
        return (y if bias is None else y + bias.astype(y.dtype)).reshape(*x.shape[:-1], n)
    if fused is _gemm_tma_dequant:
        y = _gemm_tma_dequant.dequant_gemm(x.reshape(m, k), w, scales, biases, bits, group_size, bias)
        return y.reshape(*x.shape[:-1], n)
    # Order: the weight is dequantized only once x exists (bounds live scratch to one layer).
    w_dep = mx.depends(w, x)
    if impl == "reference":
        w_full = mx.dequantize(w_dep, scales, biases, group_size=group_size, bits=bits, mode=mode, dtype=x.dtype)
    else:
        w_full = dequantize_checked(w_dep, scales, biases, bits, group_size, k, mode, x.dtype, impl)
    return _dense_linear(x, w_full, bias)


def _dense_linear(x, w_full, bias):
    """x @ w_full.T (+ bias, in the GEMM's epilogue) over x's last axis: the dense GEMM after a dequantization."""
    k, n = x.shape[-1], w_full.shape[0]
    x2 = x.reshape(x.size // k, k)
    y = x2 @ w_full.T if bias is None else mx.addmm(bias.astype(x.dtype), x2, w_full.T)
    return y.reshape(*x.shape[:-1], n)


class QuantizedLinear(nn.QuantizedLinear):
    """Drop-in for ``nn.QuantizedLinear`` (same parameters: weight, scales, biases, bias; same
    group_size/bits/mode attributes, so checkpoints are interchangeable) that calls
    ``quantized_linear``. Build with ``from_linear(linear, group_size, bits, mode)`` (inherited) or
    ``from_quantized(nn_quantized_linear)``."""

    def __call__(self, x):
        return quantized_linear(x, self["weight"], self["scales"], self.get("biases"), self.bits,
                                self.group_size, self.mode, bias=self.get("bias"))

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedLinear) -> "QuantizedLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.group_size, new.bits, new.mode = layer.group_size, layer.bits, layer.mode
        new.weight, new.scales = layer["weight"], layer["scales"]
        new.biases = layer.get("biases")
        if "bias" in layer:
            new.bias = layer["bias"]
        new.freeze()
        return new


# ---- packed layers (sm_90): the weight held in the mixed GEMM's layout, chosen by M at each call

PACKED_MIN_M = 1024  # below, the GEMM is short and dequantize + GEMM wins (session 18: 512 rows, 64 against 52 us)
PACKED_MAX_M = 2048  # above, dequantize + cuBLAS wins (session 18, H200: 4608 x 3072 -> 3072 140 against 150 us)
PACKED_MIN_WAVE_FILL = 0.85  # below, the mixed GEMM's one-tile CTAs leave too many multiprocessors idle in its last wave


def packed_gemm_wins(m: int, n: int) -> bool:
    """Whether the packed mixed GEMM (one 192 x 128 tile per CTA, K whole) should run an (M rows, N outputs) call,
    rather than dequantize + GEMM. From session 18's H200 measures (benchmarks/README.md, streamed, 4-bit, K 3072):
    the mixed GEMM took 41.6 against 51.9 us at 1024 x 3072 (128 CTAs, one wave), 128 against 148 at 1024 x 12288
    (3.9 waves), 66 against 71 at 2048 x 3072 (1.94 waves), but 63 against 59 at 1536 x 3072 (1.45 waves: its last
    wave half empty), 64 against 52 at 512 rows (64 CTAs) and 150 against 140 at 4608 rows. So: M from PACKED_MIN_M
    to PACKED_MAX_M (a full K loop per CTA costs the same at fewer rows, while the GEMM it replaces gets shorter), and
    the last wave at least PACKED_MIN_WAVE_FILL full."""
    if not PACKED_MIN_M <= m <= PACKED_MAX_M:
        return False
    waves = -(-n // _gemm_mixed.WT) * -(-m // _gemm_mixed.TT) / _gemm_tma.num_sms()
    return waves / math.ceil(waves) >= PACKED_MIN_WAVE_FILL


def packed_linear(x, packed, n: int, bits: int, group_size: int, weight_dtype, bias=None):
    """y = x @ W.T (+ bias) for a weight packed by ``_gemm_mixed_pack.pack_weight`` (N outputs, K = x's last axis; its
    scales were `weight_dtype`). sm_90 only. Below SMALL_M rows (a modulation layer's one row per image; where
    ``quantized_linear`` calls MLX's quantized_matmul) ``packed_gemv`` from the blocks; the packed mixed GEMM where
    ``packed_gemm_wins`` (x in weight_dtype); else the weight dequantized from the blocks (bit-identical to
    mx.dequantize; after x exists, as ``quantized_linear`` orders it) and the dense GEMM."""
    k = x.shape[-1]
    m = x.size // k
    if m == 0:
        return mx.zeros((*x.shape[:-1], n), x.dtype)
    if m < SMALL_M:
        y = _gemm_mixed_pack.packed_gemv(x.reshape(m, k), packed, n, bits, group_size, weight_dtype, bias)
        return y.reshape(*x.shape[:-1], n)
    if x.dtype == weight_dtype and packed_gemm_wins(m, n):
        y = _gemm_mixed.mixed_gemm_packed(x.reshape(m, k), packed, n, bits, group_size, bias)
        return y.reshape(*x.shape[:-1], n)
    w_full = _gemm_mixed_pack.dequantize_packed(mx.depends(packed, x), n, k, bits, group_size, weight_dtype)
    if w_full.dtype != x.dtype:
        w_full = w_full.astype(x.dtype)
    return _dense_linear(x, w_full, bias)


class PackedQuantizedLinear(nn.QuantizedLinear):
    """A ``QuantizedLinear`` whose weight, scales and biases live as one array, ``packed``: pack_weight's blocks (the
    same codes and scale | bias pairs, rearranged as the mixed GEMM's stages hold them; rows padded to whole tiles of
    192). Made at run time on an sm_90 GPU by ``pack_quantized_linears``; ``unpacked_weights`` gives back the
    checkpoint's arrays (save_component writes those). Still an nn.QuantizedLinear (bits, group_size, mode)."""

    def __init__(self, layer: nn.QuantizedLinear):
        nn.Module.__init__(self)
        self.group_size, self.bits, self.mode = layer.group_size, layer.bits, layer.mode
        scales = layer["scales"]
        self.out_features, self.in_features = scales.shape[0], scales.shape[1] * layer.group_size
        self.weight_dtype = scales.dtype
        self.packed = _gemm_mixed_pack.pack_weight(layer["weight"], scales, layer["biases"], layer.bits, layer.group_size)
        if "bias" in layer:
            self.bias = layer["bias"]
        self.freeze()

    def __call__(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x last axis {x.shape[-1]} != weight input size K={self.in_features} (x {x.shape}).")
        return packed_linear(x, self["packed"], self.out_features, self.bits, self.group_size, self.weight_dtype,
                             self.get("bias"))

    def _extra_repr(self):
        return (f"input_dims={self.in_features}, output_dims={self.out_features}, bias={'bias' in self}, "
                f"group_size={self.group_size}, bits={self.bits}, packed")

    def unpacked_weights(self) -> dict:
        """{"weight", "scales", "biases"(, "bias")}: the arrays mx.quantize made, bit for bit (from the packed blocks)."""
        wq, scales, biases = _gemm_mixed_pack.unpack_weight(self["packed"], self.out_features, self.in_features, self.bits,
                                                       self.group_size, self.weight_dtype)
        out = {"weight": wq, "scales": scales, "biases": biases}
        if "bias" in self:
            out["bias"] = self["bias"]
        return out


def packable(layer) -> bool:
    """Whether ``PackedQuantizedLinear`` takes this layer (affine 4 / 8 bits, groups 32 / 64 / 128, K a multiple of 64,
    N of 8, bf16 / fp16 scales)."""
    if type(layer) is not QuantizedLinear or (layer.mode or "affine") != "affine" or layer.bits not in (4, 8):
        return False
    scales = layer["scales"]
    n, k = scales.shape[0], scales.shape[1] * layer.group_size
    return (layer.group_size in (32, 64, 128) and k % _gemm_mixed.BK == 0 and n % 8 == 0
            and scales.dtype in (mx.bfloat16, mx.float16) and layer.get("biases") is not None)


PACKED_DEFAULT = False  # opt-in: session 19's whole FLUX-dev forwards (pipelines' GPU mode) ran slower packed


def packing_enabled() -> bool:
    """Packed layers run on an sm_90 GPU (CUDA back-end) with FLASHDIFF_QLINEAR_PACKED=1 (PACKED_DEFAULT when unset),
    unless FLASHDIFF_KERNELS forces the reference or FLASHDIFF_QLINEAR picks a path (the experiments keep the
    checkpoint layout). Session 18 (H200, layers alone): 0.90-1.00x of bf16 at the 1024-row FLUX 4-bit shapes where
    dequantize + GEMM runs at 0.80-0.81x. Session 19, whole FLUX-dev forwards in the pipelines' GPU mode (compiled
    blocks, streamed; benchmarks/models.py --flashdiff blocks,blocks-packed), 4-bit, packed against unpacked: 52.7
    against 52.3 ms at 512^2 and 153.7 against 148.5 ms at 1024^2 in the last run (after packed_gemv), so not the
    default. At 1024^2 no call has 1024-2048 rows (4096 / 512 / 4608): every packed layer runs dequantize_packed."""
    value = os.environ.get("FLASHDIFF_QLINEAR_PACKED", "1" if PACKED_DEFAULT else "0")
    if value not in ("0", "1"):
        raise ValueError(f"FLASHDIFF_QLINEAR_PACKED={value!r}: use 1 (packed layers on sm_90) or 0 (the checkpoint's "
                         "layout).")
    if value == "0" or os.environ.get("FLASHDIFF_QLINEAR"):
        return False
    return resolve_backend(None) == "cuda" and _gemm_cuda.is_sm90()


def pack_quantized_linears(model: nn.Module, force: bool = False) -> int:
    """Replace (in place) every packable ``QuantizedLinear`` of `model` by a ``PackedQuantizedLinear``, one layer at a
    time (each packed copy evaluated before the next, so memory grows by one layer at most), where
    ``packing_enabled`` (or force); returns how many were packed."""
    if not (force or packing_enabled()):
        return 0
    count = 0

    def pack(layer):
        nonlocal count
        if not packable(layer):
            return None
        new = PackedQuantizedLinear(layer)
        mx.eval(new.parameters())
        count += 1
        return new

    _replace_modules(model, pack)
    return count


def _replace_modules(model: nn.Module, replace):
    """Walk `model`'s modules, lists and dicts (in place), putting replace(value) wherever it is not None."""
    def convert(value):
        new = replace(value)
        if new is not None:
            return new
        if isinstance(value, nn.Module):
            for key, child in list(value.items()):
                value[key] = convert(child)
        elif isinstance(value, list):
            value[:] = [convert(v) for v in value]
        elif isinstance(value, dict):
            for key, child in list(value.items()):
                value[key] = convert(child)
        return value

    convert(model)


def swap_quantized_linears(model: nn.Module) -> nn.Module:
    """Replace every ``nn.QuantizedLinear`` in ``model`` (in place) by ``QuantizedLinear``; returns model."""
    _replace_modules(model, lambda v: QuantizedLinear.from_quantized(v) if type(v) is nn.QuantizedLinear else None)
    return model


def quantize_model(model: nn.Module, group_size=None, bits=None, mode="affine", class_predicate=None) -> nn.Module:
    """``nn.quantize`` followed by ``swap_quantized_linears`` (in place); returns model."""
    nn.quantize(model, group_size=group_size, bits=bits, mode=mode, class_predicate=class_predicate)
    return swap_quantized_linears(model)
