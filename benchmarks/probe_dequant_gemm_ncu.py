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
from common import quantized_problem  # noqa: E402

bits = int(os.environ.get("BITS", "4"))
m, k, n, x, w, wq, s, b = quantized_problem(os.environ.get("SHAPE", "4608x3072x3072"), bits)
for _ in range(2):
    mx.eval(dequant_gemm(x, wq, s, b, bits, 64))
    mx.eval(x @ w.T)
