"""One call of the fused dequantize GEMM (_gemm_tma_dequant) and of the bf16 GEMM of the same shape, for
Nsight Compute (run on the GPU machine):

    ncu --clock-control none -k regex:"dequant_gemm|nvjet" --section ComputeWorkloadAnalysis \
        --section WarpStateStats --section InstructionStats python3 benchmarks/probe_dequant_gemm_ncu.py

SHAPE (default 4608x3072x3072) as MxKxN, 4-bit affine group 64 (BITS=8: 8-bit), bf16.
"""

import os
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels._gemm_tma_dequant import dequant_gemm  # noqa: E402

m, k, n = (int(v) for v in os.environ.get("SHAPE", "4608x3072x3072").split("x"))
bits = int(os.environ.get("BITS", "4"))
x = mx.random.normal((m, k)).astype(mx.bfloat16)
w = (mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16)
wq, s, b = mx.quantize(w, 64, bits)
mx.eval(x, w, wq, s, b)
for _ in range(2):
    mx.eval(dequant_gemm(x, wq, s, b, bits, 64))
    mx.eval(x @ w.T)
