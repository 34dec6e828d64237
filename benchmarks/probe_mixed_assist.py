"""The packed mixed GEMM with part of the weight conversion moved to producer warps (session 20), on the GPU machine:

    python3 benchmarks/probe_mixed_assist.py --out $OUT/mixed-assist.json
    ncu --clock-control none -k regex:'mixed_gemm|nvjet|dequant' --metrics gpu__time_duration.sum --csv \
        python3 benchmarks/probe_mixed_assist.py --ncu-calls 5 > $OUT/ncu-mixed-assist.csv

In PACKED mode the producer warpgroup's only work is one thread's bulk copies; the consumers' conversion of the codes is
what keeps the loop above the wgmmas' own 768 cycles per K tile (session 18: 859 at 4 bits, 991 at 8; with half the
conversion taken out, 8 bits ran at 865). ``mixed_gemm_packed(..., assist=a)`` has warps 13-15 convert the last `a` of
each K tile's four k16 steps of every consumer thread's fragments into shared memory, where the consumers load them.

Per case (M x K -> N : bits, affine, group 64): MLX's bf16 GEMM, quantized_linear's default path (dequantize + cuBLAS)
and the packed mixed GEMM at each `--assist`, streamed (``common.streamed_call``) and measured in turn
(``common.interleaved``), microseconds per call; each assisted output checked bit for bit against assist 0's.
``--ncu-calls N``: no timing; each path called N times in the order printed, for Nsight Compute to time the kernels.
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import _gemm_mixed, _gemm_mixed_pack, quantized_linear  # noqa: E402
from common import interleaved, quantized_problem, streamed_call, write_json  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="1024x3072x3072:8,1024x3072x12288:8,1024x12288x3072:8,1024x3072x21504:8,"
                                       "1024x15360x3072:8,1024x3072x3072:4,1024x3072x12288:4")
    ap.add_argument("--assist", default="0,1,2,3")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ncu-calls", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    for case in args.cases.split(","):
        spec, bits = case.split(":")
        bits = int(bits)
        m, k, n, x, w, wq, s, b = quantized_problem(spec, bits)
        packed = _gemm_mixed_pack.pack_weight(wq, s, b, bits, 64)
        mx.eval(packed)
        paths = {"bf16": lambda: x @ w.T,
                 "dequantize + cuBLAS": lambda: quantized_linear(x, wq, s, b, bits, 64)}
        for a in (int(v) for v in args.assist.split(",")):
            paths[f"packed, assist {a}"] = lambda a=a: _gemm_mixed.mixed_gemm_packed(x, packed, n, bits, 64, assist=a)
        base = paths["packed, assist 0"]() if "packed, assist 0" in paths else None
        row = dict(shape=spec, bits=bits, group=64)
        for name, fn in paths.items():
            if name.startswith("packed, assist") and base is not None:
                row[f"{name} equals assist 0"] = mx.array_equal(fn(), base).item()
        if args.ncu_calls:
            for name, fn in paths.items():
                print(f"ncu order: {spec}:{bits} {name} x{args.ncu_calls}", flush=True)
                for _ in range(args.ncu_calls):
                    mx.eval(fn())
            rows.append(row)
            continue
        times = interleaved(paths, streamed_call, rounds=args.rounds)
        row.update({f"{name} streamed_us": t * 1e6 for name, t in times.items()})
        row.update({f"{name} ratio_vs_bf16": times["bf16"] / t for name, t in times.items() if name != "bf16"})
        rows.append(row)
        print(row, flush=True)
        if args.out:
            write_json(Path(args.out), dict(command=" ".join(sys.argv), device=str(mx.default_device()), rows=rows))
    if args.ncu_calls:
        print(rows)
        return
    names = [key[: -len(" streamed_us")] for key in rows[0] if key.endswith(" streamed_us")]
    print("| case | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for r in rows:
        cells = [f"{r[name + ' streamed_us']:.1f}" + (f" ({r[name + ' ratio_vs_bf16']:.2f}x)" if name != "bf16" else "")
                 for name in names]
        print(f"| {r['shape']}:{r['bits']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
