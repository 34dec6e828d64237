"""Host cost per graph node on MLX's CUDA back-end (run on the GPU machine):

    python3 benchmarks/probe_encode_cost.py --out $OUT/encode-cost.json

Tiny shapes (GPU time negligible), N independent ops per evaluation: `build_us` is building one op's
graph (Python + MLX), `eval_us` the evaluation per op (MLX's encoding into its CUDA graph, the
graph's update/launch, the wait), for a plain add, MLX's GEMM, our dequantize kernel, a no-op custom
kernel with a short source, mx.depends + GEMM, and quantized_linear.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import quantized_linear  # noqa: E402
from flashdiff.kernels._dequant import dequantize  # noqa: E402
from common import write_json  # noqa: E402

_noop = mx.fast.cuda_kernel(name="flashdiff_probe_copy", input_names=["a"], output_names=["out"],
                            source="  const int i = threadIdx.x; if (i < 256) out[i] = a[i];")


def measure(make, n, rounds=7):
    builds, evals = [], []
    for _ in range(rounds + 1):
        mx.synchronize()
        t0 = time.perf_counter()
        outs = [make(i) for i in range(n)]
        t1 = time.perf_counter()
        mx.eval(outs)
        t2 = time.perf_counter()
        builds.append((t1 - t0) / n * 1e6)
        evals.append((t2 - t1) / n * 1e6)
    return statistics.median(builds[1:]), statistics.median(evals[1:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--n", type=int, default=50)
    args = ap.parse_args()
    xs = [mx.random.normal((32, 256)).astype(mx.bfloat16) for _ in range(args.n)]
    w = (mx.random.normal((256, 256)) * 0.02).astype(mx.bfloat16)
    wq, s, b = mx.quantize(w, 64, 4)
    as_ = [mx.full((256,), float(i)) for i in range(args.n)]
    mx.eval(xs, w, wq, s, b, as_)
    ops = {
        "add": lambda i: xs[i] + 1,
        "GEMM": lambda i: xs[i] @ w.T,
        "no-op custom kernel": lambda i: _noop(inputs=[as_[i]], output_shapes=[(256,)], output_dtypes=[mx.float32],
                                               grid=(256, 1, 1), threadgroup=(256, 1, 1))[0],
        "dequantize kernel": lambda i: dequantize(mx.depends(wq, xs[i]), s, b, 4, 64, "affine", mx.bfloat16, "cuda"),
        "depends + GEMM": lambda i: xs[i] @ mx.depends(w, xs[i]).T,
        "quantized_linear (M=32: mx.quantized_matmul)": lambda i: quantized_linear(xs[i], wq, s, b, 4, 64, "affine"),
        "dequantize + GEMM": lambda i: xs[i] @ dequantize(mx.depends(wq, xs[i]), s, b, 4, 64, "affine", mx.bfloat16,
                                                          "cuda").T,
    }
    rows = []
    for name, make in ops.items():
        build, ev = measure(make, args.n)
        rows.append(dict(op=name, n=args.n, build_us=build, eval_us=ev))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
