"""The kernels of one quantized_linear call next to the bf16 GEMM of the same shape, under Nsight Compute
(run on the GPU machine):

    ncu --clock-control none --metrics gpu__time_duration.sum --csv python3 benchmarks/probe_qlinear_ncu.py

SHAPES (default "4608x3072x3072,1024x3072x3072") as MxKxN; 4-bit affine, group 64. MIXED_PACKED=1 adds three
calls of the mixed GEMM in PACKED mode on pack_weight's blocks (flashdiff/kernels/_gemm_mixed.py). Each call is
synchronised, so every kernel shows up separately; after the profiled calls the same calls are timed
queued (10 per synchronisation) and the medians printed, to set kernel time against call time.
"""

import os
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import _gemm_mixed, quantized_linear  # noqa: E402
from common import median_call  # noqa: E402

for spec in os.environ.get("SHAPES", "4608x3072x3072,1024x3072x3072").split(","):
    m, k, n = (int(v) for v in spec.split("x"))
    x = mx.random.normal((m, k)).astype(mx.bfloat16)
    w = (mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16)
    wq, s, b = mx.quantize(w, 64, 4)
    mx.eval(x, w, wq, s, b)
    for _ in range(3):
        mx.eval(x @ w.T)
        mx.eval(quantized_linear(x, wq, s, b, 4, 64, "affine"))
    if os.environ.get("MIXED_PACKED"):
        packed = _gemm_mixed.pack_weight(wq, s, b, 4, 64)
        for _ in range(3):
            mx.eval(_gemm_mixed.mixed_gemm_packed(x, packed, n, 4, 64))
    if not os.environ.get("NO_TIMING"):
        t_bf16 = median_call(lambda: x @ w.T, 10, 10, 3)
        t_q = median_call(lambda: quantized_linear(x, wq, s, b, 4, 64, "affine"), 10, 10, 3)
        print(f"{spec}: bf16 {t_bf16 * 1e6:.1f} us, quantized_linear {t_q * 1e6:.1f} us per queued call", flush=True)
