"""Where the MoE GEMM's time goes, kernel by kernel, under Nsight Compute (run on the GPU machine):

    ncu --clock-control none --metrics gpu__time_duration.sum,... python3 benchmarks/probe_moe_ncu.py

Runs moe_gemm at HiDream shapes (by default the layout kernel that also gathers the routed rows, then the grouped
GEMM; FLASHDIFF_MOE_GATHER=kernel: layout, gather and GEMM kernels) and the dense reference GEMM of the same FLOPs,
each a few times with a synchronisation after every call, so each kernel shows up separately in the profile.
ENGINES (comma-separated, default: the default engine) picks GEMM engines.
QUANT=4 / QUANT=8: the experts quantized (affine, group 64), run each way FLASHDIFF_GEMM_DEQUANT names in HOW
(comma-separated; default "merged,separate,fused": in the layout kernel's launch (the default), by the dequantize
kernel on its own, inside the GEMM (opt-in)).
GATHER_STORE_AT=k: the gather form ("wgmma persistent gather") storing each finished tile at stage k of the next
one instead of the tree's STAGES + 1 (session 12 measured one and two loader warps with source edits like this).
"""

import os
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import _gemm_tma, _gemm_tma_forms, moe_gemm  # noqa: E402
from common import moe_problem  # noqa: E402

if os.environ.get("GATHER_STORE_AT"):
    anchor = "kt == min(KT - 1, STAGES + 1)"
    assert _gemm_tma_forms._SOURCE_PERSISTENT.count(anchor) == 1, "the persistent source changed"
    _gemm_tma_forms._SOURCE_PERSISTENT = _gemm_tma_forms._SOURCE_PERSISTENT.replace(
        anchor, f"kt == min(KT - 1, {int(os.environ['GATHER_STORE_AT'])})")
    _gemm_tma._kernel.cache_clear()

p = moe_problem()
for _ in range(3):
    mx.eval(p["dense_x"] @ p["w0"].T)
for engine in [e for e in os.environ.get("ENGINES", "").split(",") if e] or [None]:
    if engine:
        os.environ["FLASHDIFF_GEMM_ENGINE"] = engine
    if os.environ.get("QUANT"):
        bits = int(os.environ["QUANT"])
        wq, s, b = mx.quantize(p["w"], 64, bits)
        for how in os.environ.get("HOW", "merged,separate,fused").split(","):
            os.environ["FLASHDIFF_GEMM_DEQUANT"] = how
            for _ in range(3):
                mx.eval(moe_gemm(p["x"], wq, p["ids"], scales=s, biases=b, bits=bits, group_size=64))
        continue
    for _ in range(3):
        mx.eval(moe_gemm(p["x"], p["w"], p["ids"]))
print("done")
