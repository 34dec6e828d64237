"""Host cost per graph node on MLX's CUDA back-end (run on the GPU machine):

    python3 benchmarks/probe_encode_cost.py --out $OUT/encode-cost.json

Tiny shapes (GPU time negligible), N independent ops per evaluation: `build_us` is building one op's
graph (Python + MLX), `eval_us` the evaluation per op (MLX's encoding into its CUDA graph, the
graph's update/launch, the wait), for a plain add, MLX's GEMM, our dequantize kernel, a no-op custom
kernel with a short source, mx.depends + GEMM, and quantized_linear; and (session 16) attention: MLX's SDPA, our
sm_90 kernel through its launcher (maps kernel + main kernel), its maps kernel alone, the same no-op kernel with the
attention's 36 KB of header text in front (MLX builds each call's full source and hashes it when it encodes it), and
our kernel built from its sources with the comments and blank lines taken out (``compact``). Session 17: the kernels'
texts go to MLX as #include lines (flashdiff.kernels._jit); rows for the 36 KB no-op that way, for our attention with
its texts inline (as before), for its main kernel alone (maps made beforehand), for its maps kernel of contiguous
arrays and followed by a kernel that reads its output, for our attention with Python's garbage collector off, and for ours
and SDPA under mx.compile (as the pipelines run their blocks).
"""

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import quantized_linear  # noqa: E402
from flashdiff.kernels import _attention_sm90 as att  # noqa: E402
from flashdiff.kernels._dequant import dequantize  # noqa: E402
from flashdiff.kernels._jit import cuda_kernel  # noqa: E402
from common import write_json  # noqa: E402

_NOOP_SOURCE = "  const int i = threadIdx.x; if (i < 256) out[i] = a[i];"
_noop = mx.fast.cuda_kernel(name="flashdiff_probe_copy", input_names=["a"], output_names=["out"], source=_NOOP_SOURCE)
# the same, behind the attention kernel's header and its body as a comment: the attention's source length
_noop_long = mx.fast.cuda_kernel(name="flashdiff_probe_copy_long", input_names=["a"], output_names=["out"],
                                 source=_NOOP_SOURCE + "\n/*" + att._SOURCE.replace("*/", "* /") + "*/\n", header=att._HEADER)


def compact(text: str) -> str:
    """CUDA source without // comments (none of ours sits inside a string literal) and without blank lines."""
    lines = (line.split("//", 1)[0].rstrip() if '"' not in line.split("//", 1)[0] else line for line in text.split("\n"))
    return "\n".join(line for line in lines if line.strip()) + "\n"


def inline_main_kernel(name, source, header):
    """The attention's main kernel with its text handed to MLX inline (as before session 17), not by #include."""
    return mx.fast.cuda_kernel(name=name, input_names=["q", "k", "v", "tmaps", "scale", "kbias"], output_names=["out"],
                               source=source, header=header, shared_memory=att.SMEM_BYTES)


_compact_kernel = inline_main_kernel("flashdiff_probe_att_compact", compact(att._SOURCE), compact(att._HEADER))
_inline_kernel = inline_main_kernel("flashdiff_probe_att_inline", att._SOURCE, att._HEADER)
_inline_maps = mx.fast.cuda_kernel(name="flashdiff_probe_att_maps_inline", input_names=["q", "k", "v"],
                                   output_names=["tmaps"], source=att._MAPS_SOURCE, header=att._MAP_HEADER)
# session 17: a one-thread kernel reading the maps kernel's output (is it the edge between the two that costs?)
_maps_reader = cuda_kernel(name="flashdiff_probe_maps_reader", input_names=["tmaps"], output_names=["out"],
                           source="  if (threadIdx.x == 0) out[0] = tmaps[0];")
# session 17: the same no-op with the same 36 KB, handed to MLX by #include (flashdiff.kernels._jit)
_noop_long_included = cuda_kernel(name="flashdiff_probe_copy_long_included", input_names=["a"], output_names=["out"],
                                  source=_NOOP_SOURCE + "\n/*" + att._SOURCE.replace("*/", "* /") + "*/\n",
                                  header=att._HEADER)


def measure(make, n, rounds=7, gc_off=False):
    if gc_off:
        gc.collect()
        gc.disable()
    try:
        return _measure(make, n, rounds)
    finally:
        gc.enable()


def _measure(make, n, rounds):
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
    qs = [mx.random.normal((1, 1, 128, 128)).astype(mx.bfloat16) for _ in range(args.n)]
    mx.eval(xs, w, wq, s, b, as_, qs)
    scale = 128 ** -0.5
    maps_made = [att.tensor_maps(q, q, q) for q in qs]
    mx.eval(maps_made)

    def ours_with(q, main, maps=None):  # flash_attention_sm90 with these kernel objects in place of its own
        shipped = att._kernel, att._maps_kernel
        att._kernel = lambda persistent=False: main
        if maps is not None:
            att._maps_kernel = lambda: maps
        try:
            return att.flash_attention_sm90(q, q, q, scale)
        finally:
            att._kernel, att._maps_kernel = shipped
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
        "SDPA (cuDNN), 128 tokens": lambda i: mx.fast.scaled_dot_product_attention(qs[i], qs[i], qs[i], scale=scale),
        "our sm_90 attention, 128 tokens": lambda i: att.flash_attention_sm90(qs[i], qs[i], qs[i], scale),
        "its maps kernel alone": lambda i: att.tensor_maps(qs[i], qs[i], qs[i]),
        "no-op custom kernel, 36 KB of source": lambda i: _noop_long(
            inputs=[as_[i]], output_shapes=[(256,)], output_dtypes=[mx.float32], grid=(256, 1, 1), threadgroup=(256, 1, 1))[0],
        "our sm_90 attention, compact source": lambda i: ours_with(qs[i], _compact_kernel, _inline_maps),
        # session 17: the shipped launcher hands MLX #include lines (on CUDA, flashdiff.kernels._jit); inline as before
        "no-op custom kernel, 36 KB of source by #include": lambda i: _noop_long_included(
            inputs=[as_[i]], output_shapes=[(256,)], output_dtypes=[mx.float32], grid=(256, 1, 1), threadgroup=(256, 1, 1))[0],
        "our sm_90 attention, sources inline": lambda i: ours_with(qs[i], _inline_kernel, _inline_maps),
        "our sm_90 attention, main kernel alone (maps made before)": lambda i: att.flash_attention_sm90(
            qs[i], qs[i], qs[i], scale, _maps=maps_made[i]),
        "its maps kernel of contiguous q, k, v": lambda i: att.tensor_maps(*(mx.contiguous(qs[i]) for _ in range(3))),
        "its maps kernel + a one-thread kernel reading them": lambda i: _maps_reader(
            inputs=[att.tensor_maps(qs[i], qs[i], qs[i])], output_shapes=[(1,)], output_dtypes=[mx.uint8],
            grid=(32, 1, 1), threadgroup=(32, 1, 1))[0],
    }
    gc_off = {"our sm_90 attention, 128 tokens, garbage collector off": ops["our sm_90 attention, 128 tokens"]}
    # as the pipelines run a block (mx.compile): a replay builds no Python objects and rebuilds no kernel text
    compiled_ours = mx.compile(lambda q: att.flash_attention_sm90(q, q, q, scale))
    compiled_sdpa = mx.compile(lambda q: mx.fast.scaled_dot_product_attention(q, q, q, scale=scale))
    ops["our sm_90 attention, 128 tokens, compiled"] = lambda i: compiled_ours(qs[i])
    ops["SDPA (cuDNN), 128 tokens, compiled"] = lambda i: compiled_sdpa(qs[i])
    rows = []
    for name, make in list(ops.items()) + list(gc_off.items()):
        build, ev = measure(make, args.n, gc_off=name in gc_off)
        rows.append(dict(op=name, n=args.n, build_us=build, eval_us=ev))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
