"""The kernels of one sm_90 attention call (flashdiff/kernels/_attention_sm90.py) next to cuDNN's SDPA
at the same shape, under Nsight Compute (run on the GPU machine):

    NO_TIMING=1 ncu --clock-control none --metrics gpu__time_duration.sum --csv python3 benchmarks/probe_attention_ncu.py

LENGTHS (default "4608,4621,4736,16384") with 24 heads of 128, batch 1, bf16; REPEAT (default 2) calls of each.
Each call is synchronised, so every kernel shows up separately. Without NO_TIMING the calls are also timed queued (median of 10
per synchronisation) to set kernel time against call time.
"""

import os
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels.attention import attention  # noqa: E402
from common import median_call  # noqa: E402

HEADS = int(os.environ.get("HEADS", "24"))
for length in (int(v) for v in os.environ.get("LENGTHS", "4608,4621,4736,16384").split(",")):
    q, k, v = (mx.random.normal((1, HEADS, length, 128)).astype(mx.bfloat16) for _ in range(3))
    mx.eval(q, k, v)
    scale = 128 ** -0.5
    for _ in range(int(os.environ.get("REPEAT", "2"))):
        mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=scale))
        mx.eval(attention(q, k, v, scale, backend="cuda_wgmma"))
    if not os.environ.get("NO_TIMING"):
        t_sdpa = median_call(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale), 10, 10, 3)
        t_ours = median_call(lambda: attention(q, k, v, scale, backend="cuda_wgmma"), 10, 10, 3)
        print(f"L={length}: sdpa {t_sdpa * 1e6:.1f} us, cuda_wgmma {t_ours * 1e6:.1f} us per queued call", flush=True)
