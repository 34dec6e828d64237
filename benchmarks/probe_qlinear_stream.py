"""Where a quantized_linear call's time goes beyond its two kernels (run on the GPU machine):

    python3 benchmarks/probe_qlinear_stream.py --out $OUT/qlinear-stream.json

Per shape (4-bit affine, group 64) and per path (MLX's bf16 GEMM; quantized_linear; the same two
kernels without quantized_linear's checks and mx.depends; the dequantize kernel alone):
- host_us: building one call's graph, no evaluation;
- queued_us: 10 independent calls per evaluation (kernels.py's throughput column): MLX encodes the
  whole evaluation into one CUDA graph before the GPU starts, so host and encode time add to GPU time;
- streamed_us: call after call, each started with mx.async_eval while the previous one is waited for
  (as BlockStream runs a model's blocks), so the host overlaps the GPU;
- chain_us (square shapes): 24 layers applied one after the other in one evaluation;
- streamed_chain_us (square shapes): blocks of 8 such layers streamed as above, as a model's blocks
  run (per layer).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import quantized_linear  # noqa: E402
from flashdiff.kernels._dequant import check_quantized, dequantize  # noqa: E402
from flashdiff.kernels._gemm_tma_dequant import dequant_gemm  # noqa: E402
from common import median_call, quantized_problem, streamed_call, write_json  # noqa: E402


def host_us(fn, n=300):
    mx.eval(fn())
    t0 = time.perf_counter()
    outs = [fn() for _ in range(n)]
    dt = (time.perf_counter() - t0) / n * 1e6
    mx.eval(outs)
    return dt


def chain(layer, x, layers):
    y = x
    for _ in range(layers):
        y = layer(y)
    return y


def chain_us(layer, x, layers=24):
    return median_call(lambda: chain(layer, x, layers), 5, 1, 2) / layers * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4608x3072x3072,1024x3072x3072,4608x3072x12288")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    for spec in args.shapes.split(","):
        m, k, n, x, w, wq, s, b = quantized_problem(spec)
        paths = {
            "bf16 x @ w.T": lambda x=x: x @ w.T,
            "quantized_linear": lambda x=x: quantized_linear(x, wq, s, b, 4, 64, "affine"),
            "dequantize + GEMM, no checks/depends": lambda x=x: x @ dequantize(wq, s, b, 4, 64, "affine", mx.bfloat16, "cuda").T,
            "dequantize kernel alone": lambda x=x: dequantize(wq, s, b, 4, 64, "affine", mx.bfloat16, "cuda"),
            "fused dequantize GEMM (_gemm_tma_dequant)": lambda x=x: dequant_gemm(x, wq, s, b, 4, 64),
        }
        for name, fn in paths.items():
            row = dict(shape=spec, path=name, host_us=host_us(fn),
                       queued_us=median_call(fn, 10, 10, 3) * 1e6, streamed_us=streamed_call(fn) * 1e6)
            if k == n and "alone" not in name:
                row["chain_us"] = chain_us(lambda y, fn=fn: fn(y), x)
                row["streamed_chain_us"] = streamed_call(lambda fn=fn: chain(fn, x, 8), 10) / 8 * 1e6
            rows.append(row)
            print(json.dumps(row), flush=True)
        rows.append(dict(shape=spec, path="check_quantized (host only)",
                         host_us=host_us(lambda: (check_quantized(wq, s, b, 4, 64, "affine"), x)[1])))
        rows.append(dict(shape=spec, path="mx.depends (host only)", host_us=host_us(lambda: mx.depends(wq, x))))
        print(json.dumps(rows[-2:]), flush=True)
        if args.out:
            write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
