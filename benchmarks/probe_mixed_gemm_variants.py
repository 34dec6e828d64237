"""Where the mixed-input GEMM (_gemm_mixed) spends its time (run on the GPU machine):

    python3 benchmarks/probe_mixed_gemm_variants.py --out $OUT/mixed-gemm-variants.json

Times the kernel as it is and variants of its source with one part taken out or changed (the first two
give wrong results; only their time means something): "no code loads" (the producer stores made-up codes,
scales and biases: no global loads), "no conversion" (consumers keep their first K tile's fragments),
two K tiles of 4-bit codes in flight instead of four, the x tensor map encoded by a kernel of its own
before each call (session 9) instead of by each CTA, a deeper stage ring (session 15: 8 stages at 4 bits,
7 at 8, the most that fit in shared memory, instead of 4; since session 18 6 at 8 bits: the consumers' loop, unrolled over the stages, needs an even count), the producer's loads cached in L2 only (with and without
the deeper ring), and the kernel in PACKED mode on pack_weight's blocks (4 and 8 / 6 stages), and the 4-bit bf16 conversion as it was
before session 16 (unpacked and packed) and as session 15's LOP3 probe had it (packed);
next to MLX's
bf16 GEMM (cuBLAS), quantized_linear's default path (dequantize + cuBLAS, session 18) and the TMA GEMM (engine "wgmma tma") on a bf16 weight. Streamed timing
(common.streamed_call), every variant measured in turn (common.interleaved, 3 rounds, medians).
"""

import argparse
import json
import re
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import _gemm_cuda, _gemm_mixed as mixed, _gemm_tma, quantized_linear  # noqa: E402
from common import interleaved, median_call, quantized_problem, streamed_call, write_json  # noqa: E402

SEPARATE_MAPS = "tensor map from a kernel of its own"
VARIANTS = {
    "as is": [],
    "no code loads": [
        ("dst[i] = *reinterpret_cast<const uint4*>(wq + (size_t)n * WPR + kt * (BK * BITS / 32) + (unit % UPR) * 4);",
         "dst[i] = make_uint4((unsigned)n, (unsigned)kt, (unsigned)unit, 7u);"),
        ("""dsb[i] = (unsigned)*reinterpret_cast<const unsigned short*>(scales + g)
                 | ((unsigned)*reinterpret_cast<const unsigned short*>(biases + g) << 16);""",
         "dsb[i] = (unsigned)g & 0x3fff3fffu;")],
    "no conversion": [("      convert((s + 1) % STAGES, nxt);\n", "")],
    "two tiles of 4-bit codes in flight (session 9's first version)": [
        ("constexpr int PF = BITS == 4 ? 4 : 1;", "constexpr int PF = BITS == 4 ? 2 : 1;")],
    # session 9's launch: the x map encoded by a kernel of its own (_gemm_tma.tensor_maps) before each call
    SEPARATE_MAPS: [
        ("const unsigned long long xmap = fd_maps_addr(tmaps) + 128ull * (blockIdx.y * gridDim.x + blockIdx.x);",
         "const unsigned long long xmap = fd_maps_addr(maps_in);"),
        ("    if (warp == 12)\n" + mixed.publish_maps_code([("x", "M_ROWS", "TT")], dst="xmap", name="xmap_smem"), "")],
}
DEEP_RING = "8 stages (4-bit) / 6 (8-bit)"
VARIANTS[DEEP_RING] = []
# the producer's global loads of codes, scales and biases cached in L2 only (ld.global.cg), not in L1: session 15's
# deeper ring ran slower, and its larger shared-memory carve-out leaves less L1 for these loads
_PAST_L1 = [
    ("dst[i] = *reinterpret_cast<const uint4*>(wq + (size_t)n * WPR + kt * (BK * BITS / 32) + (unit % UPR) * 4);",
     "dst[i] = __ldcg(reinterpret_cast<const uint4*>(wq + (size_t)n * WPR + kt * (BK * BITS / 32) + (unit % UPR) * 4));"),
    ("""dsb[i] = (unsigned)*reinterpret_cast<const unsigned short*>(scales + g)
                 | ((unsigned)*reinterpret_cast<const unsigned short*>(biases + g) << 16);""",
     """dsb[i] = (unsigned)__ldcg(reinterpret_cast<const unsigned short*>(scales + g))
                 | ((unsigned)__ldcg(reinterpret_cast<const unsigned short*>(biases + g)) << 16);""")]
PAST_L1 = "loads past L1"
PAST_L1_DEEP = "loads past L1, 8 stages (4-bit) / 6 (8-bit)"
VARIANTS[PAST_L1] = _PAST_L1
VARIANTS[PAST_L1_DEEP] = _PAST_L1
# the shipped kernel in PACKED mode on pack_weight's blocks (session 15): the producer warpgroup's loads and
# rearrangement done once ahead, each stage's codes and scale | bias pairs copied by one bulk copy
PACKED = "packed weight (pack_weight), one bulk copy per stage"
PACKED_DEEP = "packed weight, 8 stages (4-bit) / 6 (8-bit)"
VARIANTS[PACKED] = []
VARIANTS[PACKED_DEEP] = []
# the bf16 conversion as it was before session 16 (4 bits: shift, mask and exponent OR as nvcc emitted them, then sub,
# mul, add per pair of codes; 8 bits likewise with the bit-7 fix-up by a multiply), and session 15's 4-bit probe of one LOP3 for mask and OR (then sub, mul, add): the shipped
# form since session 16 is one LOP3, one fma (q s rounded once, as the mul) and one add (8 bits: a prmt more, for the
# fma's addend). All give the same values.
_SHIPPED_CONVERSION = "fd_dq4_bf16_pair(zz >> (4 * (j & 3)), s2[gi], ns2[gi], b2[gi])"
_S15_CONVERSION = [("if (IS_BF16) a[kk][rr + 2 * (j & 1)] = fd_dq4_bf16_pair", "if (false) a[kk][rr + 2 * (j & 1)] = fd_dq4_bf16_pair"),
                   ("if (IS_BF16) {  // one fma per pair, as at 4 bits (session 16)", "if (false) {")]
_S15_LOP3 = [(_SHIPPED_CONVERSION, "fd_h2_add<true>(fd_h2_mul<true>(fd_h2_sub<true>(fd_and_or(zz >> (4 * (j & 3)), "
                                   "0x000F000Fu, 0x43004300u), 0x43004300u), s2[gi]), b2[gi])")]
S15_CONVERSION = "session 15's conversion (sub, mul, add)"
PACKED_S15_CONVERSION = "packed weight, session 15's conversion"
PACKED_S15_LOP3 = "packed weight, session 15's LOP3 probe (one LOP3, sub, mul, add)"
VARIANTS[S15_CONVERSION] = _S15_CONVERSION
VARIANTS[PACKED_S15_CONVERSION] = _S15_CONVERSION
VARIANTS[PACKED_S15_LOP3] = _S15_LOP3
# session 18: each consumer warp's lane 0 arrives on a stage's "empty" barrier (12 arrivals) instead of every consumer
# thread (384): wait_group has retired the stage's wgmmas for the whole warpgroup, and a warp's shared loads of the
# stage's codes were used (converted) before its wgmmas were issued, so one arrival per warp releases as much
PACKED_WARP_ARRIVALS = "packed weight, one empty arrival per consumer warp"
VARIANTS[PACKED_WARP_ARRIVALS] = [
    ("fd_mbar_init(fd_smem_addr(&empty_bar[s]), 384);", "fd_mbar_init(fd_smem_addr(&empty_bar[s]), 12);"),
    ("if (kt > 0) fd_mbar_arrive(empty0 + 8 * ((s + STAGES - 1) % STAGES));",
     "if (kt > 0 && lane == 0) fd_mbar_arrive(empty0 + 8 * ((s + STAGES - 1) % STAGES));")]
# session 18: packed, with the x map from a kernel of its own (as SEPARATE_MAPS): what the in-kernel encoding costs
PACKED_SEPARATE_MAPS = "packed weight, tensor map from a kernel of its own"
VARIANTS[PACKED_SEPARATE_MAPS] = VARIANTS[SEPARATE_MAPS]
PACKED_SET = (PACKED, PACKED_DEEP, PACKED_S15_CONVERSION, PACKED_S15_LOP3, PACKED_WARP_ARRIVALS, PACKED_SEPARATE_MAPS)
SEPARATE_SET = (SEPARATE_MAPS, PACKED_SEPARATE_MAPS)
STAGES_OF = {DEEP_RING: {4: 8, 8: 6}, PAST_L1_DEEP: {4: 8, 8: 6}, PACKED_DEEP: {4: 8, 8: 6}}  # by bits (others: mixed.STAGES)


SMEM_LIMIT = 227 * 1024  # the H200's shared memory per block (opt-in)


def variant_source(name, bits):
    """(kernel body, shared-memory bytes) of variant `name` at `bits`, group 64."""
    source = mixed._SOURCE
    stages = STAGES_OF.get(name, {}).get(bits, mixed.STAGES)
    edits = VARIANTS[name] + ([(f"STAGES = {mixed.STAGES}, KT", f"STAGES = {stages}, KT")] if stages != mixed.STAGES else [])
    for old, new in edits:
        if source.count(old) != 1:
            raise AssertionError(f"the kernel's source changed: {old!r} occurs {source.count(old)} times ({name})")
        source = source.replace(old, new)
    smem = stages * mixed.stage_bytes(bits, 64) + 1024
    if smem > SMEM_LIMIT:
        raise AssertionError(f"{name}: {stages} stages need {smem} bytes of shared memory, over {SMEM_LIMIT}")
    return source, smem


def variant_kernel(name, bits):
    source, smem = variant_source(name, bits)
    return mx.fast.cuda_kernel(name="flashdiff_probe_mixed_" + re.sub(r"\W+", "_", name) + f"_{bits}",
                               input_names=["x", "wq", "scales", "biases", "bias"] + (["maps_in"] if name in SEPARATE_SET else []),
                               output_names=["out", "tmaps"],
                               source=source, header=mixed._HEADER, shared_memory=smem)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="4608x3072x12288:4,4608x3072x12288:8,1024x3072x3072:4")
    ap.add_argument("--out", default="")
    ap.add_argument("--variants", default="", help="a regular expression: only the variants it matches (and 'as is')")
    args = ap.parse_args()
    names = [v for v in VARIANTS if v == "as is" or re.search(args.variants, v)]
    rows = []
    for case in args.cases.split(","):
        spec, bits = case.split(":")
        bits = int(bits)
        m, k, n, x, w, wq, s, b = quantized_problem(spec, bits)
        grid, group = mixed.grid(m, n)

        packed = mixed.pack_weight(wq, s, b, bits, 64)
        mx.eval(packed)
        pack_us = median_call(lambda: mixed.pack_weight(wq, s, b, bits, 64), 5, 3, 1) * 1e6

        def call(kernel, name):
            extra = [_gemm_tma.tensor_maps(x, wq.reshape(1, n, -1))] if name in SEPARATE_SET else []
            is_packed = name in PACKED_SET
            inputs = [x, packed, x, x, x] if is_packed else [x, wq, s, b, x]
            return kernel(inputs=inputs + extra, template=mixed.template(x.dtype, m, k, n, bits, 64, False, is_packed),
                          output_shapes=[(m, n), (mixed.maps_bytes(m, n),)], output_dtypes=[x.dtype, mx.uint8],
                          grid=grid, threadgroup=group)[0]

        fns = {"bf16 cuBLAS": lambda: x @ w.T, "TMA GEMM, bf16 weight": lambda: _gemm_cuda.dense_gemm(x, w, engine="wgmma tma"),
               # what quantized_linear runs by default (session 18: beside the packed kernel, to place a crossover by M)
               "quantized_linear default (dequantize + cuBLAS)": lambda: quantized_linear(x, wq, s, b, bits, 64, "affine")}
        for name in names:
            fns[name] = (lambda kernel, name: lambda: call(kernel, name))(variant_kernel(name, bits), name)
        outs = {name: fns[name]() for name in names}
        # the exact variants must equal the kernel as is ("no code loads" / "no conversion" cannot)
        same = {f"{name} equals as is": mx.array_equal(out, outs["as is"]).item() for name, out in outs.items()
                if name not in ("as is", "no code loads", "no conversion")}
        times = interleaved(fns, streamed_call, 3)
        row = dict(shape=spec, bits=bits, **{f"{name} us": t * 1e6 for name, t in times.items()}, **same,
                   pack_weight_us=pack_us)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            write_json(Path(args.out), {"command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
