"""Hot-path kernels. Each public function dispatches to a Metal, CUDA or pure-MLX implementation.

Dispatch: ``backend=`` argument, else env ``FLASHDIFF_KERNELS`` (``reference`` forces the pure-MLX
path), else by device (CUDA -> cuda, Metal -> metal, CPU -> reference). GPU kernels are built
lazily on first use, never at import.
"""

from ._dequant import dequantize
from ._dispatch import resolve_backend
from .attention import attention, attention_reference
from .moe import moe_gemm
from .qk_rope import qk_norm_rope, qk_norm_rope_reference
from .qgemm import (PackedQuantizedLinear, QuantizedLinear, pack_quantized_linears, packed_linear, quantize_model,
                    quantized_linear, swap_quantized_linears)

__all__ = [
    "attention",
    "attention_reference",
    "dequantize",
    "moe_gemm",
    "pack_quantized_linears",
    "packed_linear",
    "PackedQuantizedLinear",
    "qk_norm_rope",
    "qk_norm_rope_reference",
    "quantize_model",
    "quantized_linear",
    "QuantizedLinear",
    "resolve_backend",
    "swap_quantized_linears",
]
