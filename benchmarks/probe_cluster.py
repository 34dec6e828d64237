"""Where the opt-in cluster GEMM ("wgmma cluster") differs from the per-CTA TMA kernel (run on the GPU
machine): for each case, the grouped GEMM of both engines on one schedule, repeated, reporting which
row tiles (and which tile rank in the pair), which column halves and how many elements differ.

    python3 benchmarks/probe_cluster.py [--repeat 5] [--out result.json]
"""

import argparse
import functools
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import _gemm_cuda  # noqa: E402

CASES = [  # t, experts, K, N, routing
    (500, 4, 256, 128, "one expert"), (1000, 4, 72, 40, "random"), (300, 4, 256, 192, "random"),
    (500, 4, 256, 256, "one expert"), (500, 4, 512, 128, "one expert"), (500, 4, 64, 128, "one expert"),
    (256, 1, 256, 256, "one expert"), (4096, 4, 2560, 6912, "random"),
]


def routing(t, e, kind):
    if kind == "one expert":
        return mx.stack([mx.zeros((t,), mx.int32), mx.full((t,), min(2, e - 1), mx.int32)], axis=1)
    return mx.argsort(mx.random.uniform(shape=(t, e)), axis=-1)[:, :2].astype(mx.int32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    for t, e, k, n, kind in CASES:
        mx.random.seed(5)
        x = mx.random.normal((t, k)).astype(mx.bfloat16)
        w = (mx.random.normal((e, n, k)) * 0.05).astype(mx.bfloat16)
        ids = routing(t, e, kind)
        slot_row, tile_expert = _gemm_cuda.layout(ids, e)
        mx.eval(slot_row, tile_expert)
        te = np.array(tile_expert)
        sr = np.array(slot_row).reshape(len(te), -1)
        xn, wn = np.array(x.astype(mx.float32)), np.array(w.astype(mx.float32))
        ref = np.zeros((t * 2, n), np.float32)  # float32 numpy: each routed row through its expert
        for tile, ex in enumerate(te):
            r = sr[tile][sr[tile] >= 0]
            if ex >= 0 and len(r):
                ref[r] = xn[r // 2] @ wn[ex].T
        tma = np.array(_gemm_cuda.grouped_gemm(x, w, slot_row, tile_expert, t * 2, a_div=2,
                                               engine="wgmma tma").astype(mx.float32))
        tma_bad = int((~np.isclose(tma, ref, rtol=1e-2, atol=1e-2)).sum())
        lo = np.arange(n) % 256 < 128  # the weight-tile half that rank 0 loads in the shared case
        for rep in range(args.repeat):
            out = _gemm_cuda.grouped_gemm(x, w, slot_row, tile_expert, t * 2, a_div=2, engine="wgmma cluster")
            out = np.array(out.astype(mx.float32))
            bad = ~np.isclose(out, ref, rtol=1e-2, atol=1e-2)
            bad_tiles = {}
            for tile in range(len(te)):
                r = sr[tile][sr[tile] >= 0]
                if len(r) and bad[r].any():
                    b = bad[r]
                    bad_tiles[tile] = {"expert": int(te[tile]), "rank": tile % 2, "bad": int(b.sum()),
                                       "of": int(b.size), "bad_cols_lo": int(b[:, lo].sum()),
                                       "bad_cols_hi": int(b[:, ~lo].sum()), "bad_rows": int(b.any(1).sum())}
            inputs_kept = bool((np.array(x.astype(mx.float32)) == xn).all() and (np.array(w.astype(mx.float32)) == wn).all())
            row = {"case": [t, e, k, n, kind], "rep": rep, "tile_expert": te.tolist(), "bad_total": int(bad.sum()),
                   "tma_bad_total": tma_bad, "inputs_kept": inputs_kept, "bad_tiles": bad_tiles}
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.out:
                Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
