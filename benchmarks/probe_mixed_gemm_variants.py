"""Where the mixed-input GEMM (_gemm_mixed) spends its time (run on the GPU machine):

    python3 benchmarks/probe_mixed_gemm_variants.py --out $OUT/mixed-gemm-variants.json

Times the kernel as it is and variants of its source with one part taken out or changed (the first two
give wrong results; only their time means something): "no code loads" (the producer stores made-up codes,
scales and biases: no global loads), "no conversion" (consumers keep their first K tile's fragments),
"deeper prefetch" (4 K tiles of codes in flight at 4 bits, 2 at 8, instead of 2 and 1); next to MLX's
bf16 GEMM (cuBLAS) and the TMA GEMM (engine "wgmma tma") on a bf16 weight. Streamed timing
(common.streamed_call), every variant measured in turn (common.interleaved, 3 rounds, medians).
"""

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import _gemm_cuda, _gemm_mixed as mixed, _gemm_tma  # noqa: E402
from common import interleaved, quantized_problem, streamed_call, write_json  # noqa: E402

VARIANTS = {
    "as is": [],
    "no code loads": [
        ("dst[i] = *reinterpret_cast<const uint4*>(wq + (size_t)n * WPR + kt * (BK * BITS / 32) + (unit % UPR) * 4);",
         "dst[i] = make_uint4((unsigned)n, (unsigned)kt, (unsigned)unit, 7u);"),
        ("""dsb[i] = (unsigned)*reinterpret_cast<const unsigned short*>(scales + g)
                 | ((unsigned)*reinterpret_cast<const unsigned short*>(biases + g) << 16);""",
         "dsb[i] = (unsigned)g & 0x3fff3fffu;")],
    "no conversion": [("      convert(kt + 1, nxt);\n", "")],
    "two tiles of 4-bit codes in flight (session 9's first version)": [
        ("constexpr int PF = BITS == 4 ? 4 : 1;", "constexpr int PF = BITS == 4 ? 2 : 1;")],
}


def variant_kernel(name, edits, bits):
    source = mixed._SOURCE
    for old, new in edits:
        assert old in source, (name, old)
        source = source.replace(old, new)
    return mx.fast.cuda_kernel(name="flashdiff_probe_mixed_" + name.replace(" ", "_"),
                               input_names=["x", "wq", "scales", "biases", "bias", "tmaps"], output_names=["out"],
                               source=source, header=mixed._HEADER, shared_memory=mixed.smem_bytes(bits, 64))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="4608x3072x12288:4,4608x3072x12288:8,1024x3072x3072:4")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    for case in args.cases.split(","):
        spec, bits = case.split(":")
        bits = int(bits)
        m, k, n, x, w, wq, s, b = quantized_problem(spec, bits)
        maps = _gemm_tma.tensor_maps(x, wq.reshape(1, n, -1))
        mx.eval(maps)
        grid, group = mixed.grid(m, n)

        def call(kernel):
            return kernel(inputs=[x, wq, s, b, x, maps], template=mixed.template(x.dtype, m, k, n, bits, 64, False),
                          output_shapes=[(m, n)], output_dtypes=[x.dtype], grid=grid, threadgroup=group)[0]

        fns = {"bf16 cuBLAS": lambda: x @ w.T, "TMA GEMM, bf16 weight": lambda: _gemm_cuda.dense_gemm(x, w, engine="wgmma tma")}
        for name, edits in VARIANTS.items():
            fns[name] = (lambda kernel: lambda: call(kernel))(variant_kernel(name, edits, bits))
        times = interleaved(fns, streamed_call, 3)
        row = dict(shape=spec, bits=bits, **{f"{name} us": t * 1e6 for name, t in times.items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            write_json(Path(args.out), {"command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
