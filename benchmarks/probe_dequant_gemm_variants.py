"""Where the fused dequantize GEMM's producer spends its time (run on the GPU machine):

    python3 benchmarks/probe_dequant_gemm_variants.py --out $OUT/dequant-gemm-variants.json

Times _gemm_tma_dequant as it is and variants of its source with one part of the producer's work
taken out (their results are wrong; only their time means something): "no math" stores the codes
unconverted, "no loads" converts made-up codes (no global loads of codes, scales or biases), "no fence"
drops the async-proxy fence before each arrival; next to MLX's bf16 GEMM and the TMA GEMM
(_gemm_tma, engine "wgmma tma") on a bf16 weight. 4-bit affine, group 64, bf16.
Measured in session 8 on an earlier producer (scales and biases loaded as separate registers, one K
tile ahead): benchmarks/results/dequant-gemm-variants-h200-s8.json.
"""

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import _gemm_cuda, _gemm_tma, _gemm_tma_dequant as dq  # noqa: E402
from common import median_call, quantized_problem, write_json  # noqa: E402

VARIANTS = {
    "as is": [],
    "no math": [("fd_dq_chunk<IS_BF16, BITS>(words + i * (BITS / 4), s2, b2)",
                 "make_uint4(words[0] ^ s2, words[1] ^ b2, words[2], words[3])")],
    "no loads": [("dst[j] = fd_ldg16(wq + row * WPR + kt * 2 * BITS + c * 4);",
                  "dst[j] = make_uint4((unsigned)row, (unsigned)kt, (unsigned)c, 7u);"),
                 ("""dsb[j] = (unsigned)*reinterpret_cast<const unsigned short*>(scales + g)
                 | ((unsigned)*reinterpret_cast<const unsigned short*>(biases + g) << 16);""",
                  "dsb[j] = (unsigned)g & 0x3fff3fffu;")],
    "no fence": [("fd_fence_async_smem();\n        fd_mbar_arrive(full);", "fd_mbar_arrive(full);")],
}


def variant_kernel(name, edits):
    source = dq._SOURCE
    for old, new in edits:
        assert old in source, (name, old)
        source = source.replace(old, new)
    return mx.fast.cuda_kernel(name="flashdiff_probe_dq_" + name.replace(" ", "_"),
                               input_names=["x", "wq", "scales", "biases", "bias", "slot_row", "tile_expert", "tmaps"],
                               output_names=["out"], source=source, header=dq._HEADER, shared_memory=dq.SMEM_BYTES)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4608x3072x3072,1024x3072x3072")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    kernels = {name: variant_kernel(name, edits) for name, edits in VARIANTS.items()}
    rows = []
    for spec in args.shapes.split(","):
        m, k, n, x, w, wq, s, b = quantized_problem(spec)
        maps = _gemm_tma.tensor_maps(x, wq.reshape(1, n, -1))
        dummy = mx.zeros((1,), mx.int32)
        mx.eval(maps, dummy)

        def call(kernel):
            return kernel(inputs=[x, wq, s, b, dummy, dummy, dummy, maps],
                          template=dq.template(x.dtype, m, k, n, 4, 64, False), output_shapes=[(m, n)],
                          output_dtypes=[x.dtype], grid=(-(-n // 256) * dq.THREADS, -(-m // 128), 1),
                          threadgroup=(dq.THREADS, 1, 1))[0]

        row = dict(shape=spec, bf16_us=median_call(lambda: x @ w.T, 10, 10, 3) * 1e6,
                   tma_gemm_us=median_call(lambda: _gemm_cuda.dense_gemm(x, w, engine="wgmma tma"), 10, 10, 3) * 1e6)
        for name, kernel in kernels.items():
            row[f"{name} us"] = median_call(lambda kernel=kernel: call(kernel), 10, 10, 3) * 1e6
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
