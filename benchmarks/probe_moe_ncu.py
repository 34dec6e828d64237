"""Where the MoE GEMM's time goes, kernel by kernel, under Nsight Compute (run on the GPU machine):

    ncu --clock-control none --metrics gpu__time_duration.sum,... python3 benchmarks/probe_moe_ncu.py

Runs moe_gemm at HiDream shapes (layout kernel, gather, grouped GEMM) and the dense reference GEMM of
the same FLOPs, each a few times with a synchronisation after every call, so each kernel shows up
separately in the profile. ENGINES (comma-separated, default: the default engine) picks GEMM engines.
QUANT=4 / QUANT=8: the experts quantized (affine, group 64), run both ways: dequantized inside the GEMM (the
default) and first, by the dequantize kernel (FLASHDIFF_GEMM_DEQUANT=separate).
"""

import os
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import moe_gemm  # noqa: E402
from common import moe_problem  # noqa: E402

p = moe_problem()
for _ in range(3):
    mx.eval(p["dense_x"] @ p["w0"].T)
for engine in [e for e in os.environ.get("ENGINES", "").split(",") if e] or [None]:
    if engine:
        os.environ["FLASHDIFF_GEMM_ENGINE"] = engine
    if os.environ.get("QUANT"):
        bits = int(os.environ["QUANT"])
        wq, s, b = mx.quantize(p["w"], 64, bits)
        for how in ("fused", "separate"):
            os.environ["FLASHDIFF_GEMM_DEQUANT"] = how
            for _ in range(3):
                mx.eval(moe_gemm(p["x"], wq, p["ids"], scales=s, biases=b, bits=bits, group_size=64))
        continue
    for _ in range(3):
        mx.eval(moe_gemm(p["x"], p["w"], p["ids"]))
print("done")
