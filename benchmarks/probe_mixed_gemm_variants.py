"""Where the mixed-input GEMM (_gemm_mixed) spends its time (run on the GPU machine):

    python3 benchmarks/probe_mixed_gemm_variants.py --out $OUT/mixed-gemm-variants.json

Times the kernel as it is and variants of its source with one part taken out or changed (the first two
give wrong results; only their time means something): "no code loads" (the producer stores made-up codes,
scales and biases: no global loads), "no conversion" (consumers keep their first K tile's fragments),
two K tiles of 4-bit codes in flight instead of four, the x tensor map encoded by a kernel of its own
before each call (session 9) instead of by each CTA; next to MLX's
bf16 GEMM (cuBLAS) and the TMA GEMM (engine "wgmma tma") on a bf16 weight. Streamed timing
(common.streamed_call), every variant measured in turn (common.interleaved, 3 rounds, medians).
"""

import argparse
import json
import re
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import _gemm_cuda, _gemm_mixed as mixed, _gemm_tma  # noqa: E402
from common import interleaved, quantized_problem, streamed_call, write_json  # noqa: E402

SEPARATE_MAPS = "tensor map from a kernel of its own"
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
    # session 9's launch: the x map encoded by a kernel of its own (_gemm_tma.tensor_maps) before each call
    SEPARATE_MAPS: [
        ("const unsigned long long xmap = fd_maps_addr(tmaps) + 128ull * (blockIdx.y * gridDim.x + blockIdx.x);",
         "const unsigned long long xmap = fd_maps_addr(maps_in);"),
        ("    if (warp == 12)\n" + mixed.publish_maps_code([("x", "M_ROWS", "TT")], dst="xmap", name="xmap_smem"), "")],
}


def variant_kernel(name, edits, bits):
    source = mixed._SOURCE
    for old, new in edits:
        assert old in source, (name, old)
        source = source.replace(old, new)
    return mx.fast.cuda_kernel(name="flashdiff_probe_mixed_" + re.sub(r"\W+", "_", name),
                               input_names=["x", "wq", "scales", "biases", "bias"] + (["maps_in"] if name == SEPARATE_MAPS else []),
                               output_names=["out", "tmaps"],
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
        grid, group = mixed.grid(m, n)

        def call(kernel, separate=False):
            extra = [_gemm_tma.tensor_maps(x, wq.reshape(1, n, -1))] if separate else []
            return kernel(inputs=[x, wq, s, b, x] + extra, template=mixed.template(x.dtype, m, k, n, bits, 64, False),
                          output_shapes=[(m, n), (mixed.maps_bytes(m, n),)], output_dtypes=[x.dtype, mx.uint8],
                          grid=grid, threadgroup=group)[0]

        fns = {"bf16 cuBLAS": lambda: x @ w.T, "TMA GEMM, bf16 weight": lambda: _gemm_cuda.dense_gemm(x, w, engine="wgmma tma")}
        for name, edits in VARIANTS.items():
            fns[name] = (lambda kernel, sep: lambda: call(kernel, sep))(variant_kernel(name, edits, bits), name == SEPARATE_MAPS)
        times = interleaved(fns, streamed_call, 3)
        row = dict(shape=spec, bits=bits, **{f"{name} us": t * 1e6 for name, t in times.items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            write_json(Path(args.out), {"command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
