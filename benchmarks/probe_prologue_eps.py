"""The attention prologue kernel (flashdiff/kernels/qk_rope.py) with eps as a compile-time constant (EPS_BITS,
session 15) against the same kernel reading eps from a (1,) input, as it did before: MLX keeps that host-made
array in managed memory and every warp read it. Run on the GPU machine:

    python3 benchmarks/probe_prologue_eps.py --out $OUT/prologue-eps.json

FLUX shapes (kernels.py's prologue rows); streamed timing (common.streamed_call), the two measured in turn
(common.interleaved, 5 rounds, medians); the outputs must be equal.
"""

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import qk_rope  # noqa: E402
from common import interleaved, prologue_problems, streamed_call, write_json  # noqa: E402

CONSTANT = "  const float eps_v = __int_as_float(EPS_BITS);"
FROM_MEMORY = "  const float eps_v = eps[0];"


def from_memory_source() -> str:
    """The CUDA kernel's body reading eps from its input, as before session 15."""
    src = qk_rope._CUDA_SOURCE
    line = next(ln for ln in src.splitlines() if ln.startswith(CONSTANT))
    if src.count(line) != 1:
        raise AssertionError("the kernel's source changed: its eps line is not there once")
    return src.replace(line, FROM_MEMORY)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    old = mx.fast.cuda_kernel(name="flashdiff_probe_qk_rope_eps_input", input_names=qk_rope._INPUTS + ["eps"],
                              output_names=["q", "k", "v"], source=from_memory_source())
    h, d, eps = 24, 128, 1e-6
    rows = []
    for name, sources, cos, sin in prologue_problems(h, d):
        template, shape, grid, group = qk_rope.launch_config(sources, h, d)
        (ta, wqa, wka), (tb, wqb, wkb) = sources[0], sources[-1]

        def eps_input():
            return tuple(old(inputs=[ta, tb, wqa, wka, wqb, wkb, cos, sin, mx.array([eps], dtype=mx.float32)],
                             template=template, grid=grid, threadgroup=group, output_shapes=[shape] * 3,
                             output_dtypes=[ta.dtype] * 3))

        fns = {"eps constant": lambda: qk_rope.qk_norm_rope(sources, h, d, cos, sin, eps), "eps input": eps_input}
        equal = all(mx.array_equal(a, b).item() for a, b in zip(fns["eps constant"](), eps_input()))
        times = interleaved(fns, streamed_call, 5)
        rows.append(dict(shape=name, equal=equal, **{f"{n} us": t * 1e6 for n, t in times.items()},
                         constant_vs_input=times["eps input"] / times["eps constant"]))
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            write_json(Path(args.out), {"command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
