"""When each CTA of the mixed-input GEMM (_gemm_mixed, PACKED mode) reaches the points of its work (GPU machine):

    python3 benchmarks/probe_mixed_timeline.py --out $OUT/mixed-timeline.json

Nsight Compute puts the packed kernel at 0.85x of cuBLAS at 1024 x 3072 -> 3072 with its tensor pipe idle 30% of
the time (cuBLAS: 15%), but not where in the kernel that idle time lies. This probe runs the kernel's source with
stamps added (nothing else changed): thread 0 (a consumer) and thread 384 (the producer's TMA thread) write
%globaltimer (ns, one clock for the whole GPU) and clock64 (this SM's cycles) at
  0 entry, 1 producer's tensor map acquired, 2 first stage full, 3 first K tile converted (first wgmma issued next),
  4 half of the K tiles issued, 5 last wgmma retired, 6 epilogue tile in shared memory, 7 this thread's stores done,
and %smid. With --variants, also the kernel without the next K tile's conversion or without its wgmmas (timing only).
From these: the spread of the CTAs' start times (launch ramp), the median time from entry to each point,
the steady cycles per K tile (points 3 -> 4), and the kernel's span (first entry to last end). The output is
checked equal to the unstamped kernel's, so the stamps change no result.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import _gemm_mixed as mixed  # noqa: E402
from common import quantized_problem, write_json  # noqa: E402

POINTS = ["entry", "map acquired (producer)", "first stage full", "first K tile converted", "half the K tiles issued",
          "last wgmma retired", "epilogue tile in shared memory", "stores done"]
SLOTS = 20  # per CTA: 8 globaltimer words, 8 clock64 words, smid, 3 unused

_STAMP = r"""
  const int fd_cta = blockIdx.y * gridDim.x + blockIdx.x;
  auto fd_stamp = [&](int e) {
    unsigned long long g;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g));
    tl[fd_cta * 20 + e] = (unsigned)g;
    tl[fd_cta * 20 + 8 + e] = (unsigned)clock64();
  };
  if (threadIdx.x == 0) {
    unsigned smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    tl[fd_cta * 20 + 16] = smid;
    fd_stamp(0);
  }
"""

EDITS = [
    ("const int tile_w = blockIdx.x, tile_t = blockIdx.y;\n", "const int tile_w = blockIdx.x, tile_t = blockIdx.y;\n" + _STAMP),
    ("    if (p == 0) fd_acquire_map(xmap);\n", "    if (p == 0) { fd_acquire_map(xmap); fd_stamp(1); }\n"),
    ("  fd_mbar_wait(full0, 0);\n  convert(0, fa);\n",
     "  fd_mbar_wait(full0, 0);\n  if (tid == 0) fd_stamp(2);\n  convert(0, fa);\n  if (tid == 0) fd_stamp(3);\n"),
    ("    const int phase = (kt / STAGES) & 1;\n",
     "    const int phase = (kt / STAGES) & 1;\n    if (tid == 0 && kt == KT / (2 * STAGES) * STAGES) fd_stamp(4);\n"),
    ("  asm volatile(\"wgmma.wait_group.sync.aligned 0;\\n\" ::: \"memory\");\n  fd_fence64(d);\n  fd_bar_consumers();",
     "  asm volatile(\"wgmma.wait_group.sync.aligned 0;\\n\" ::: \"memory\");\n  fd_fence64(d);\n  if (tid == 0) fd_stamp(5);\n  fd_bar_consumers();"),
    ("    Cs[tok * LDC + r0 + 8 * rr] = (T)(d[i] + bias_r[rr]);\n  }\n  fd_bar_consumers();\n",
     "    Cs[tok * LDC + r0 + 8 * rr] = (T)(d[i] + bias_r[rr]);\n  }\n  fd_bar_consumers();\n  if (tid == 0) fd_stamp(6);\n"),
]


# Variants (timing only: their outputs are wrong) that take one part of the consumers' K-tile step out, so that the
# steady cycles per K tile show what sets them: the conversion of the next tile's fragments, or the wgmmas.
VARIANTS = {
    "as is": [],
    "no conversion": [("      convert((s + 1) % STAGES, nxt);\n", "")],
    "no wgmma": [("    fd_mma_rs_k64<IS_BF16>(d, cur, smem_base + s * STAGE_BYTES);\n",
                  "    fd_fence_frag(cur);\n")],
    # the conversion of one of each thread's two rows (half the pairs): how its cost scales
    "half the conversion": [("    for (int rr = 0; rr < 2; ++rr) {\n      const int row = r0 + 8 * rr;",
                             "    for (int rr = 0; rr < 1; ++rr) {\n      const int row = r0 + 8 * rr;")],
    # each pair's codes masked into a bf16 pair (the LOP3) without the fma and add (4-bit bf16): whether the bf16
    # arithmetic or the rest of the conversion sets the cost
    "no bf16 arithmetic": [("fd_dq4_bf16_pair(zz >> (4 * (j & 3)), s2[gi], ns2[gi], b2[gi])",
                            "(((zz >> (4 * (j & 3))) & 0x000F000Fu) | 0x43004300u)")],
}


def stamped_source(variant="as is"):
    source = mixed._SOURCE
    for old, new in VARIANTS[variant] + EDITS:
        if source.count(old) != 1:
            raise AssertionError(f"the kernel's source changed: {old!r} occurs {source.count(old)} times")
        source = source.replace(old, new)
    # the last point: after this thread's stores (the source ends with the store loop)
    return source + "  if (tid == 0) fd_stamp(7);\n"


def summarize(tl, ctas, k_tiles):
    """Timeline of `ctas` CTAs from the (ctas * SLOTS,) uint32 stamps."""
    t = tl.reshape(ctas, SLOTS).astype(np.int64)
    g, c = t[:, :8], t[:, 8:16]
    g = (g - g[0, 0] + 2**31) % 2**32 - 2**31  # signed ns from CTA 0's entry (the stamps are 32-bit: may wrap)
    g = g - g[:, 0].min()
    rel = (g - g[:, :1])  # ns from each CTA's own entry
    cyc = (c - c[:, :1]) % 2**32
    row = {
        "ctas": ctas, "sms used": int(len(set(t[:, 16].tolist()))),
        "start spread us": float(g[:, 0].max()) / 1e3,
        "span us (first entry to last stores)": float(g[:, 7].max()) / 1e3,
        "median us from entry": {POINTS[e]: statistics.median(rel[:, e].tolist()) / 1e3 for e in range(1, 8)},
        "max us from entry": {POINTS[e]: float(rel[:, e].max()) / 1e3 for e in range(1, 8)},
        "median cycles from entry": {POINTS[e]: statistics.median(cyc[:, e].tolist()) for e in range(1, 8)},
        "latest entry us": float(g[:, 0].max()) / 1e3, "earliest end us": float(g[:, 7].min()) / 1e3,
    }
    ns = (g[:, 7] - g[:, 0]).astype(np.float64)
    cy = cyc[:, 7].astype(np.float64)
    half = k_tiles // (2 * mixed.STAGES) * mixed.STAGES  # the K tiles before point 4 (a whole pass over the stages)
    row["median cycles per K tile (first to half)"] = statistics.median(((cyc[:, 4] - cyc[:, 3]) / max(half, 1)).tolist())
    row["clock GHz (cycles / ns, median)"] = float(np.median(cy / np.maximum(ns, 1)))
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="1024x3072x3072:4,1024x3072x12288:4,1024x3072x3072:8")
    ap.add_argument("--repeats", type=int, default=5, help="stamped runs per case (the summary of each is kept)")
    ap.add_argument("--variants", default="as is", help=f"comma-separated, of {list(VARIANTS)}")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    pending = []
    for case in args.cases.split(","):
        spec, bits = case.split(":")
        bits = int(bits)
        m, k, n, x, w, wq, s, b = quantized_problem(spec, bits)
        packed = mixed.pack_weight(wq, s, b, bits, 64)
        reference = mixed.mixed_gemm_packed(x, packed, n, bits, 64)
        mx.eval(packed, reference)
        g, tg = mixed.grid(m, n)
        ctas = g[0] // tg[0] * g[1]
        for variant in args.variants.split(","):
            kernel = mx.fast.cuda_kernel(name="flashdiff_probe_mixed_timeline_" + variant.replace(" ", "_"),
                                         input_names=["x", "wq", "scales", "biases", "bias"],
                                         output_names=["out", "tmaps", "tl"], source=stamped_source(variant),
                                         header=mixed._HEADER, shared_memory=mixed.smem_bytes(bits, 64))
            launches = []
            for _ in range(args.repeats + 1):  # the first run compiles and warms up
                out, _, tl = kernel(inputs=[x, packed, x, x, x],
                                    template=mixed.template(x.dtype, m, k, n, bits, 64, False, True),
                                    output_shapes=[(m, n), (mixed.maps_bytes(m, n),), (ctas * SLOTS,)],
                                    output_dtypes=[x.dtype, mx.uint8, mx.uint32], grid=g, threadgroup=tg)
                mx.eval(out, tl)
                launches.append((out, tl))
            pending.append((spec, bits, variant, ctas, k, launches, reference))
    # read on the host only now, with every launch's buffers still alive: a buffer the host has read is moved to
    # managed memory, and a later launch that got it back from the allocator would take page faults on its stores
    # (session 18's first run: hundreds of us between a CTA's entry and its first stamps)
    rows = []
    for spec, bits, variant, ctas, k, launches, reference in pending:
        runs = [summarize(np.array(tl), ctas, k // mixed.BK) for _, tl in launches[1:]]
        row = dict(shape=spec, bits=bits, variant=variant, runs=runs,
                   **({"equals_unstamped": bool(mx.array_equal(launches[-1][0], reference).item())}
                      if variant == "as is" else {}))
        rows.append(row)
        print(json.dumps({key: row[key] for key in ("shape", "bits", "variant")} | {
            "cycles per K tile": [r["median cycles per K tile (first to half)"] for r in runs],
            "span us": [r["span us (first entry to last stores)"] for r in runs],
            "first K tile converted us": [r["median us from entry"]["first K tile converted"] for r in runs]}), flush=True)
    if args.out:
        write_json(Path(args.out), {"command": " ".join(sys.argv), "points": POINTS, "rows": rows})


if __name__ == "__main__":
    main()
