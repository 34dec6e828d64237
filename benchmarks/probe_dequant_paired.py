"""The dequantize kernel alone, its paired path (default for affine 4/8-bit with scales in the output's
bf16/fp16: two values per paired-half instruction, no float conversions) against its float path
(FLASHDIFF_DEQUANT_FLOAT=1), at the weight shapes of FLUX's layers and HiDream's stacked experts.

Streamed (common.streamed_call, the two paths in turn, medians) and, for GPU-only times, under Nsight
Compute, whose kernel list comes in the order this prints as "order" (NO_TIMING=1 skips the timing):

    NO_TIMING=1 ncu --clock-control none --metrics gpu__time_duration.sum,dram__bytes.sum -k regex:flashdiff_dequant \\
        --csv python3 benchmarks/probe_dequant_paired.py
"""

import argparse
import json
import os
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, streamed_call, write_json  # noqa: E402

from flashdiff.kernels import dequantize  # noqa: E402

SHAPES = [(3072, 3072), (12288, 3072), (3072, 12288), (4, 6912, 2560)]


def path(name, fn):
    def run():
        old = os.environ.pop("FLASHDIFF_DEQUANT_FLOAT", None)
        if name == "float":
            os.environ["FLASHDIFF_DEQUANT_FLOAT"] = "1"
        try:
            return fn()
        finally:
            os.environ.pop("FLASHDIFF_DEQUANT_FLOAT", None)
            if old is not None:
                os.environ["FLASHDIFF_DEQUANT_FLOAT"] = old
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows, order = [], []
    for shape in SHAPES:
        w = (mx.random.normal(shape) * 0.02).astype(mx.bfloat16)
        for bits in (4, 8):
            wq, s, b = mx.quantize(w, 64, bits)
            mx.eval(wq, s, b)
            fns = {p: path(p, lambda: dequantize(wq, s, b, bits, 64, dtype=mx.bfloat16, backend="cuda"))
                   for p in ("paired", "float")}
            outs = {p: fn() for p, fn in fns.items()}
            same = mx.array_equal(outs["paired"], outs["float"]).item()
            for p in fns:  # three launches each, in this order, for the profiler
                for _ in range(3):
                    mx.eval(fns[p]())
                    order.append(f"{'x'.join(map(str, shape))} {bits}-bit {p}")
            row = dict(shape="x".join(map(str, shape)), bits=bits, paired_equals_float=same,
                       bytes=int(wq.nbytes + s.nbytes + b.nbytes + w.nbytes))
            if not os.environ.get("NO_TIMING"):
                t = interleaved(fns, streamed_call, 3)
                row.update(paired_us=t["paired"] * 1e6, float_us=t["float"] * 1e6, speedup=t["float"] / t["paired"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"order": order}))
    if args.out:
        write_json(Path(args.out), dict(command=" ".join(sys.argv), device=str(mx.default_device()), rows=rows, order=order))


if __name__ == "__main__":
    main()
