"""The CUDA dequantize kernel, flat (default) against the earlier row-per-grid-y form, on the GPU:

    python3 benchmarks/probe_dequant.py [--out FILE]

Per weight shape and format: kernel time (common.median_call, 10 queued calls per synchronisation),
bytes written per second, and whether the two forms give the same bits.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import dequantize  # noqa: E402
from common import median_call  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--out")
args = ap.parse_args()
rows = []
for n, k in [(3072, 3072), (12288, 3072), (3072, 12288), (4 * 6912, 2560), (13824, 5120)]:
    w = (mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16)
    for mode, bits, group in [("affine", 4, 64), ("affine", 8, 64), ("affine", 3, 64), ("mxfp4", 4, 32),
                              ("nvfp4", 4, 16), ("mxfp8", 8, 32)]:
        q = mx.quantize(w, group, bits, mode=mode)
        wq, s, b = q[0], q[1], (q[2] if len(q) > 2 else None)
        mx.eval(wq, s, b)
        fn = lambda: dequantize(wq, s, b, bits, group, mode, backend="cuda")  # noqa: E731
        t_flat = median_call(fn, 9, 10, 2)
        flat = fn()
        os.environ["FLASHDIFF_DEQUANT_ROWS"] = "1"
        t_rows = median_call(fn, 9, 10, 2)
        same = bool(mx.array_equal(fn(), flat).item())
        del os.environ["FLASHDIFF_DEQUANT_ROWS"]
        out_bytes = n * k * 2
        row = dict(shape=f"{n}x{k}", mode=f"{mode}{bits} g{group}", flat_ms=t_flat * 1e3, rows_ms=t_rows * 1e3,
                   speedup=t_rows / t_flat, flat_write_tbs=out_bytes / t_flat / 1e12,
                   rows_write_tbs=out_bytes / t_rows / 1e12, same_bits=same)
        rows.append(row)
        print(json.dumps(row), flush=True)
if args.out:
    Path(args.out).write_text(json.dumps(rows, indent=1))
