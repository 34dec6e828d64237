"""The mixed GEMM's CTA-pair form against its one-CTA form and cuBLAS's bf16 GEMM, on the GPU machine, in a process
with CUDA graphs off (the only way MLX 0.32 can run a cluster kernel; benchmarks/probe_cluster_graph.py):

    MLX_USE_CUDA_GRAPHS=0 python3 benchmarks/probe_mixed_pair.py --out $OUT/mixed-pair.json
    MLX_USE_CUDA_GRAPHS=0 NO_TIMING=1 ncu --clock-control none -k 'regex:mixed_gemm|nvjet' \\
        --metrics gpu__time_duration.sum --csv python3 benchmarks/probe_mixed_pair.py --rounds 0 > $OUT/ncu-pair.csv

Per shape (M x K -> N, affine, group 64) and width: whether the pair's output equals the one-CTA kernel's bit for bit,
then microseconds per call, streamed (``common.streamed_call``), the three measured in turn (``common.interleaved``),
and the two mixed forms' rates against bf16. With --rounds 0 each form runs 3 times and nothing is timed (for ncu).
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import _gemm_mixed  # noqa: E402
from common import interleaved, print_table, quantized_problem, record_row, streamed_call  # noqa: E402

SHAPES = "1024x3072x3072,1024x3072x12288,1024x12288x3072,1024x3072x21504,1024x15360x3072"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (0: run each form 3 times, time nothing)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if not _gemm_mixed.cuda_graphs_off():
        raise SystemExit("run with MLX_USE_CUDA_GRAPHS=0: " + _gemm_mixed.PAIR_NEEDS_NO_GRAPHS)
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        for spec in args.shapes.split(","):
            m, k, n, x, w, wq, s, b = quantized_problem(spec, bits)
            packed = _gemm_mixed.pack_weight(wq, s, b, bits, 64)
            mx.eval(packed)
            fns = {"bf16": lambda: x @ w.T,
                   "one CTA": lambda: _gemm_mixed.mixed_gemm_packed(x, packed, n, bits, 64),
                   "CTA pair": lambda: _gemm_mixed.mixed_gemm_packed(x, packed, n, bits, 64, pair=True)}
            row = dict(shape=spec, bits=bits, group=64,
                       pair_equals_one_cta=mx.array_equal(fns["CTA pair"](), fns["one CTA"]()).item())
            if args.rounds == 0:
                for _ in range(3):
                    for fn in fns.values():
                        mx.eval(fn())
            else:
                times = interleaved(fns, streamed_call, rounds=args.rounds)
                row.update({f"{name} streamed_us": t * 1e6 for name, t in times.items()})
                row.update({f"{name} / bf16": times["bf16"] / times[name] for name in ("one CTA", "CTA pair")})
            record_row(rows, row, args.out)
    if args.rounds:
        col = lambda key, fmt: lambda r: format(r[key], fmt)  # noqa: E731
        print_table({"shape": lambda r: r["shape"], "bits": lambda r: r["bits"],
                     "equal": lambda r: r["pair_equals_one_cta"], "bf16 us": col("bf16 streamed_us", ".1f"),
                     "one CTA us": col("one CTA streamed_us", ".1f"), "CTA pair us": col("CTA pair streamed_us", ".1f"),
                     "one / bf16": col("one CTA / bf16", ".3f"), "pair / bf16": col("CTA pair / bf16", ".3f")}, rows)


if __name__ == "__main__":
    main()
