"""Raster group size of the grouped GEMM (FLASHDIFF_GEMM_GROUP_M) against MLX's GEMM, on the GPU:

    python3 benchmarks/probe_gemm_raster.py [--groups 4,8,16,32] [--engines "wgmma tma,wgmma persistent"]

Rows: the HiDream MoE GEMM (T 4096, K 2560, N 6912, E 4, top-2) and two dense shapes, each engine and
group size timed with common.median_call (5 queued calls per synchronisation) next to MLX's GEMM.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import _gemm_cuda, moe_gemm  # noqa: E402
from common import median_call, moe_problem  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--groups", default="4,8,16,32")
ap.add_argument("--engines", default="wgmma tma")
ap.add_argument("--out")
args = ap.parse_args()
p = moe_problem()
dense = [(8192, 2560, 6912), (4608, 3072, 12288)]
mats = {}
for m, k, n in dense:
    mats[(m, k, n)] = (mx.random.normal((m, k)).astype(mx.bfloat16), (mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16))
    mx.eval(*mats[(m, k, n)])
rows = []
for engine in args.engines.split(","):
    os.environ["FLASHDIFF_GEMM_ENGINE"] = engine
    for g in args.groups.split(","):
        os.environ["FLASHDIFF_GEMM_GROUP_M"] = g
        t_ref = median_call(lambda: p["dense_x"] @ p["w0"].T, 7, 5, 2)
        t_moe = median_call(lambda: moe_gemm(p["x"], p["w"], p["ids"]), 7, 5, 2)
        row = dict(engine=engine, group_m=int(g), moe_ms=t_moe * 1e3, moe_dense_ref_ms=t_ref * 1e3, moe_ratio=t_ref / t_moe)
        for (m, k, n), (x, w) in mats.items():
            t_mlx = median_call(lambda: x @ w.T, 7, 5, 2)
            t_ours = median_call(lambda: _gemm_cuda.dense_gemm(x, w), 7, 5, 2)
            row[f"{m}x{k}->{n}"] = dict(ours_ms=t_ours * 1e3, mlx_ms=t_mlx * 1e3, ratio=t_mlx / t_ours)
        rows.append(row)
        print(json.dumps(row), flush=True)
if args.out:
    Path(args.out).write_text(json.dumps(rows, indent=1))
