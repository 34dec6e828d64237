"""The packed layers' dequantize kernel against quantized_linear's, on the GPU machine:

    python3 benchmarks/probe_dequantize_packed.py --out $OUT/dequantize-packed.json

Per weight (N x K, affine, group 64, 4 and 8 bits), streamed (``common.streamed_call``: call after call, as a model's
blocks run), microseconds per call, measured in turn (``common.interleaved``):
- dequantize_packed: ``_gemm_mixed_pack.dequantize_packed`` on ``pack_weight``'s blocks (what a packed layer runs
  before cuBLAS for calls the mixed GEMM does not take);
- dequantize: ``_dequant.dequantize`` on mx.quantize's arrays (what ``quantized_linear`` runs before cuBLAS).
Both outputs are compared with mx.dequantize's on the CPU (MLX's CUDA dequantize rounds once, not as the CPU does): `equal` is True only where all three are bit-identical. At 1024² every
call of a packed FLUX layer with 512 or more rows takes dequantize_packed + cuBLAS, so this is what a packed forward
pays over the default path there.
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import _dequant, _gemm_mixed_pack  # noqa: E402
from common import interleaved, print_table, quantized_problem, record_row, streamed_call  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="12288x3072,3072x12288,21504x3072,3072x15360,3072x3072",
                    help="N x K per weight")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        for spec in args.weights.split(","):
            n, k = (int(v) for v in spec.split("x"))
            _, _, _, _, _, wq, s, b = quantized_problem(f"1x{k}x{n}", bits)
            packed = _gemm_mixed_pack.pack_weight(wq, s, b, bits, 64)
            mx.eval(packed)
            paths = {
                "dequantize_packed": lambda: _gemm_mixed_pack.dequantize_packed(packed, n, k, bits, 64, mx.bfloat16),
                "dequantize": lambda: _dequant.dequantize(wq, s, b, bits, 64, dtype=mx.bfloat16, backend="cuda"),
            }
            ref = mx.dequantize(wq, s, b, 64, bits, stream=mx.cpu).astype(mx.bfloat16, stream=mx.cpu)
            equal = all(mx.array_equal(fn(), ref).item() for fn in paths.values())
            times = interleaved(paths, streamed_call, rounds=args.rounds)
            row = dict(weight=spec, bits=bits, group=64, equal=equal,
                       **{f"{name} streamed_us": t * 1e6 for name, t in times.items()},
                       weight_gb_per_s=n * k * (2 + bits / 8) / times["dequantize_packed"] / 1e9)
            record_row(rows, row, args.out)
    print_table({"weight N x K": lambda r: r["weight"], "bits": lambda r: r["bits"], "equal": lambda r: r["equal"],
                 "dequantize_packed us": lambda r: f"{r['dequantize_packed streamed_us']:.1f}",
                 "dequantize us": lambda r: f"{r['dequantize streamed_us']:.1f}"}, rows)


if __name__ == "__main__":
    main()
