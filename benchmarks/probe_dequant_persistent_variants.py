"""Where the time of the MoE GEMM over quantized experts goes (_gemm_tma_dequant_persistent), under Nsight
Compute on the GPU machine:

    QUANT=4 ncu --clock-control none -k regex:probe_dq --metrics gpu__time_duration.sum --csv \
        python3 benchmarks/probe_dequant_persistent_variants.py

Each variant is the kernel's source with one edit (timing only: some give wrong results), launched through the
real launcher (FLASHDIFF_GEMM_DEQUANT=fused) at HiDream's MoE shape (benchmarks/common.moe_problem), three times
each; VARIANTS=a,b,... runs only those. The edits match the source in the tree (session 11's v4):
  as_is        the kernel as it ships
  no_search    every expert taken as used (no binary search over tile_expert per unit)
  no_work      units claimed and counted, nothing dequantized (the protocol's own cost)
  no_fences    no proxy fence / __threadfence around the count
  batch16      16 16-byte loads of codes per lane in flight instead of 8
  last_column  every tile waits for the last column's units (~ all the dequantization before any wgmma)
  slow_spin    the TMA thread's acquire-load spin sleeping 2 us between polls instead of 64 ns
  relaxed_spin relaxed loads in the spin (256 ns apart), one acquire fence after it
  ku1, ku4     units of 1 / 4 k tiles instead of 2; ku4_last_column: with last_column's wait
  no_stores_last_column / no_loads_last_column: last_column without the scratch's stores / the loads
"""

import os
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import _gemm_tma_dequant_persistent as fused, moe_gemm  # noqa: E402
from common import moe_problem  # noqa: E402

EDITS = {
    "as_is": [],
    "no_search": [("    if (DIRECT) return true;\n", "    return true;\n")],
    "no_work": [("    if (used) {\n", "    if (false) {\n")],
    "no_fences": [("      fd_fence_proxy_global();\n    }\n", "    }\n"), ("      __threadfence();  //", "      //")],
    "batch16": [("DQ_BATCH = 8;", "DQ_BATCH = 16;")],
    "last_column": [("work + 1 + expert * TILES_N + tile_n) < UPC", "work + E_COUNT * TILES_N) < UPC")],
    "slow_spin": [("< UPC) __nanosleep(64);", "< UPC) __nanosleep(2000);")],
    "relaxed_spin": [("while (fd_ld_acquire(work + 1 + expert * TILES_N + tile_n) < UPC) __nanosleep(64);",
                      "while (fd_ld_relaxed(work + 1 + expert * TILES_N + tile_n) < UPC) __nanosleep(256);\n"
                      "      fd_fence_acq_rel();")],
    "ku1": [("constexpr int KU = 2,", "constexpr int KU = 1,")],
    "ku4": [("constexpr int KU = 2,", "constexpr int KU = 4,")],
    "no_stores_last_column": [  # loads, shuffles and arithmetic only (a store that never happens)
        ("            if (r < N && k_out < K)\n              *reinterpret_cast<uint4*>(w_deq + ((size_t)e * N + r) * K + k_out) =\n"
         "                  fd_dq_chunk<IS_BF16, BITS>(words, __byte_perm(sbv, 0u, 0x1010), __byte_perm(sbv, 0u, 0x3232));",
         "            if (fd_dq_chunk<IS_BF16, BITS>(words, __byte_perm(sbv, 0u, 0x1010), __byte_perm(sbv, 0u, 0x3232)).x == 0x7fc17fc1u)\n"
         "              w_deq[r] = w_deq[k_out];"),
        ("work + 1 + expert * TILES_N + tile_n) < UPC", "work + E_COUNT * TILES_N) < UPC")],
    "no_loads_last_column": [  # stores of values computed from the addresses, nothing loaded
        ("          q[j] = *reinterpret_cast<const uint4*>(wq + row * WORDS + (ok ? k : 0) * BITS / 32);\n"
         "          sb[j] = (unsigned)*reinterpret_cast<const unsigned short*>(scales + g)\n"
         "                | ((unsigned)*reinterpret_cast<const unsigned short*>(biases + g) << 16);",
         "          q[j] = make_uint4((unsigned)row, (unsigned)g, (unsigned)j, 7u);\n          sb[j] = (unsigned)g;"),
        ("work + 1 + expert * TILES_N + tile_n) < UPC", "work + E_COUNT * TILES_N) < UPC")],
    "ku4_last_column": [("constexpr int KU = 2,", "constexpr int KU = 4,"),
                        ("work + 1 + expert * TILES_N + tile_n) < UPC", "work + E_COUNT * TILES_N) < UPC")],
}


def variant_source(edits) -> str:
    src = fused.SOURCE
    for old, new in edits:
        if src.count(old) != 1:
            raise AssertionError(f"the kernel's source changed: {old!r} occurs {src.count(old)} times")
        src = src.replace(old, new)
    return src


def main():
    os.environ["FLASHDIFF_GEMM_DEQUANT"] = "fused"  # the opt-in path under study
    p = moe_problem()
    bits = int(os.environ.get("QUANT", "4"))
    wq, s, b = mx.quantize(p["w"], 64, bits)
    only = [v for v in os.environ.get("VARIANTS", "").split(",") if v]
    for name, edits in EDITS.items():
        if only and name not in only:
            continue
        src = variant_source(edits)
        kernel = mx.fast.cuda_kernel(
            name=f"flashdiff_probe_dq_{name}", input_names=["x", "wq", "scales", "biases", "slot_row", "tile_expert", "tmaps", "work"],
            output_names=["out", "w_deq", "wmaps"], source=src, header=fused.HEADER,
            shared_memory=fused._gemm_tma_forms.SMEM_BYTES_PERSISTENT)
        fused._kernel = lambda kernel=kernel: kernel
        for _ in range(3):
            mx.eval(moe_gemm(p["x"], wq, p["ids"], scales=s, biases=b, bits=bits, group_size=64))
    print("done")


if __name__ == "__main__":
    main()
