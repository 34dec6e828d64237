"""Few-row calls of a quantized layer (FLUX's modulation layers: one row per image) on the GPU machine:

    python3 benchmarks/probe_packed_gemv.py --out $OUT/packed-gemv.json

Per shape (M x K -> N, affine, group 64, 4 and 8 bits) and path, streamed (``common.streamed_call``: call after
call, as a model's blocks run), microseconds per call:
- qmm: ``mx.quantized_matmul`` on the checkpoint layout (what ``quantized_linear`` runs below SMALL_M rows);
- packed_gemv: the packed layer's few-row kernel (``_gemm_mixed_pack.packed_gemv``) on ``pack_weight``'s blocks;
- dequantize_packed + GEMM: what packed layers ran for these calls before session 19.
Also each path's largest difference from float32 x @ dequantize(w).T, relative to that output's largest value.
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import _gemm_mixed_pack  # noqa: E402
from common import print_table, quantized_problem, record_row, streamed_call  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1x3072x18432,1x3072x9216,2x3072x18432,1x3072x3072,16x3072x12288")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        for spec in args.shapes.split(","):
            m, k, n, x, _, wq, s, b = quantized_problem(spec, bits)
            packed = _gemm_mixed_pack.pack_weight(wq, s, b, bits, 64)
            mx.eval(packed)
            paths = {
                "qmm": lambda: mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=bits),
                "packed_gemv": lambda: _gemm_mixed_pack.packed_gemv(x, packed, n, bits, 64, mx.bfloat16),
                "dequantize_packed + GEMM": lambda: x @ _gemm_mixed_pack.dequantize_packed(
                    packed, n, k, bits, 64, mx.bfloat16).T,
            }
            ref = x.astype(mx.float32) @ mx.dequantize(wq, s, b, 64, bits).astype(mx.float32).T
            row = dict(shape=spec, bits=bits, group=64)
            for name, fn in paths.items():
                err = mx.abs(fn().astype(mx.float32) - ref).max() / mx.abs(ref).max()
                row[f"{name} max_rel_err"] = err.item()
                row[f"{name} streamed_us"] = streamed_call(fn) * 1e6
            record_row(rows, row, args.out)
    us = lambda name: lambda r: f"{r[name + ' streamed_us']:.1f}"  # noqa: E731
    print_table({"shape": lambda r: r["shape"], "bits": lambda r: r["bits"], "qmm us": us("qmm"),
                 "packed_gemv us": us("packed_gemv"), "dequantize_packed + GEMM us": us("dequantize_packed + GEMM")}, rows)


if __name__ == "__main__":
    main()
