"""Layers timed inside one compiled graph, as a model's blocks run them (run on the GPU machine):

    python3 benchmarks/in_graph.py --out $OUT/in-graph.json --md $OUT/in-graph.md

Why a second measure beside kernels.py. MLX's CUDA back-end records an evaluation into a CUDA graph whose
edges come from buffers (mlx/backend/cuda/device.cpp, ``CommandEncoder::insert_graph_dependencies``): a
kernel waits for the last kernel of the graph that wrote one of its input or output buffers, and for
nothing else. ``mx.depends`` launches no kernel, so it adds no edge, and a buffer is not handed out again
before the graph that used it has run (``add_temporary`` in eval.cpp). So quantized_linear's dequantize
kernel, which reads only the weight, is a root of the graph: the GPU may run it beside the GEMMs of
the layers before it. kernels.py evaluates one layer per graph, where the dequantization and the GEMM are
the whole graph and run one after the other; inside a model's block the dequantization may be hidden.
The same holds for moe_gemm: the dequantize kernel on its own (FLASHDIFF_GEMM_DEQUANT=separate) reads
only the experts, while the default one-launch prologue (session 12) also does the routing layout, so it
waits for the router.

Rows (ours and bf16 in turn, ``common.interleaved``; each function compiled as a function of its own and
streamed, ``common.streamed_call``):
- "quantized_linear chain": a chain of layers, each fed the one before (FLUX widths: the attention
  projections, D -> D, and the MLP pair, D -> 4D -> D), 4/8-bit, against the same chain in bf16; beside it
  the sum of each layer timed alone the same way (kernels.py's measure), so "alone / chain" is what the
  graph hid.
- "moe feed-forward": HiDream's MoE feed-forward whole (gate, softmax, top-2 with no renormalisation,
  experts' SwiGLU through three moe_gemm calls, the shared expert), against the same block with the routed
  experts replaced by plain GEMMs of the same FLOPs (every token through top_k experts' weights), for the
  default and the side settings of kernels.MOE_SIDE_COLUMNS; "routed part" subtracts the block without
  the routed experts (gate + shared expert) from both. Beside it, both sides with w1 and w3 concatenated into
  one weight of twice the width (one grouped GEMM and one routing prologue instead of two, as FLUX fuses q/k/v):
  a layout HiDream's model could load its experts in.
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import moe_gemm, quantized_linear  # noqa: E402
from common import environment, interleaved, quantize, streamed_call, write_json, write_text_atomic  # noqa: E402
from kernels import MOE_SIDE_COLUMNS, moe_side_columns, with_env  # noqa: E402

QUANT = [("affine", 4, 64), ("affine", 8, 64)]
MOE_COLUMNS = ("gather_kernel", "separate_dequant")  # of kernels.MOE_SIDE_COLUMNS (the fused form: slower, left out)


def _weight(n, k, key):
    """(n, k) bf16, std 1/sqrt(k): a chain of layers keeps its activations near unit size."""
    return (mx.random.normal((n, k), key=key) * k ** -0.5).astype(mx.bfloat16)


def chains(width, mlp):
    """name -> [(K, N), ...] in order: the FLUX layers a block applies one after the other."""
    return {"attention projections D->D x8": [(width, width)] * 8,
            "MLP D->4D->D x4": [(width, mlp), (mlp, width)] * 4}


def _streamed(fn, calls):
    return streamed_call(fn, calls=calls, samples=3)


def chain_rows(rows_list, width, mlp, rounds, calls, emit):
    out = []
    for m in rows_list:
        x = mx.random.normal((m, width)).astype(mx.bfloat16)
        mx.eval(x)
        for name, dims in chains(width, mlp).items():
            keys = mx.random.split(mx.random.key(len(out)), len(dims))
            dense = [_weight(n, k, key) for (k, n), key in zip(dims, keys)]
            mx.eval(dense)
            flops = sum(2 * m * k * n for k, n in dims)
            for mode, bits, group in QUANT:
                quant = [quantize(w, mode, bits, group) for w in dense]
                mx.eval(quant)

                def ours_layer(a, q):
                    return quantized_linear(a, q[0], q[1], q[2], bits, group, mode)

                def run_chain(a, layers, layer):
                    for w in layers:
                        a = layer(a, w)
                    return a

                ours_c = mx.compile(lambda a: run_chain(a, quant, ours_layer))
                bf16_c = mx.compile(lambda a: run_chain(a, dense, lambda a, w: a @ w.T))
                fns = {"ours_chain": lambda: ours_c(x), "bf16_chain": lambda: bf16_c(x)}
                alone = {}  # each distinct layer shape timed alone (one layer per graph), compiled the same way
                for i, (k, n) in enumerate(dims):
                    if (k, n) in alone:
                        continue
                    a_in = x if k == width else mx.random.normal((m, k)).astype(mx.bfloat16)
                    q_i, w_i = quant[i], dense[i]
                    one_ours = mx.compile(lambda a, q_i=q_i: ours_layer(a, q_i))
                    one_bf16 = mx.compile(lambda a, w_i=w_i: a @ w_i.T)
                    alone[(k, n)] = len(alone)
                    fns[f"ours_alone_{alone[(k, n)]}"] = lambda f=one_ours, a=a_in: f(a)
                    fns[f"bf16_alone_{alone[(k, n)]}"] = lambda f=one_bf16, a=a_in: f(a)
                st = interleaved(fns, lambda fn: _streamed(fn, calls), rounds)
                deq_cpu = [mx.dequantize(q[0], q[1], q[2], group, bits, mode=mode, dtype=mx.bfloat16, stream=mx.cpu)
                           for q in quant]
                same = mx.array_equal(ours_c(x), run_chain(x, deq_cpu, lambda a, w: a @ w.T)).item()
                sum_alone = {p: sum(st[f"{p}_alone_{alone[d]}"] for d in dims) for p in ("ours", "bf16")}
                row = dict(kernel="quantized_linear chain", shape=f"{m} rows, {name}", mode=f"{mode}{bits} g{group}",
                           layers=len(dims), width=width, mlp=mlp, stream_rounds=rounds, calls=calls,
                           chain_ours_ms=st["ours_chain"] * 1e3, chain_bf16_ms=st["bf16_chain"] * 1e3,
                           chain_ours_tflops=flops / st["ours_chain"] / 1e12,
                           chain_ratio_vs_bf16=st["bf16_chain"] / st["ours_chain"],
                           alone_sum_ours_ms=sum_alone["ours"] * 1e3, alone_sum_bf16_ms=sum_alone["bf16"] * 1e3,
                           alone_ratio_vs_bf16=sum_alone["bf16"] / sum_alone["ours"],
                           hidden_by_graph_ours_ms=(sum_alone["ours"] - st["ours_chain"]) * 1e3,
                           hidden_by_graph_bf16_ms=(sum_alone["bf16"] - st["bf16_chain"]) * 1e3,
                           equals_dequantize_matmul=same)
                out.append(row)
                emit(row)
    return out


class MoeFeedForward(nn.Module):
    """HiDream's MOEFeedForwardSwiGLU with random weights (std 1/sqrt(fan-in)): y = sum_k p_k * expert_k(h)
    + shared(h), experts and shared expert SwiGLU w2(silu(w1 h) * w3 h), gate softmax, top-k, no renormalisation."""

    def __init__(self, dim, hidden, shared_hidden, experts, top_k, seed=0):
        super().__init__()
        keys = iter(mx.random.split(mx.random.key(seed), 8))
        self.top_k = top_k
        self.gate = _weight(experts, dim, next(keys))
        self.w1, self.w3 = (mx.stack([_weight(hidden, dim, k) for k in mx.random.split(next(keys), experts)])
                            for _ in range(2))
        self.w2 = mx.stack([_weight(dim, hidden, k) for k in mx.random.split(next(keys), experts)])
        self.s1, self.s3 = _weight(shared_hidden, dim, next(keys)), _weight(shared_hidden, dim, next(keys))
        self.s2 = _weight(dim, shared_hidden, next(keys))
        self.w13 = mx.concatenate([self.w1, self.w3], axis=1)  # w1 | w3 per expert: one GEMM for both (fused=True)
        self.quant = None  # (bits, group): the experts quantized (quantize_experts)

    def quantize_experts(self, bits, group):
        self.quant = (bits, group)
        self.q1, self.q3, self.q2, self.q13 = (quantize(w, "affine", bits, group)
                                               for w in (self.w1, self.w3, self.w2, self.w13))

    def route(self, h):
        p = mx.softmax((h @ self.gate.T).astype(mx.float32), axis=-1)
        ids = mx.argpartition(-p, self.top_k - 1, axis=-1)[:, : self.top_k].astype(mx.int32)
        return ids, mx.take_along_axis(p, ids, axis=-1).astype(h.dtype)

    def shared(self, h):
        return (nn.silu(h @ self.s1.T) * (h @ self.s3.T)) @ self.s2.T

    def _experts(self, a, which, ids):
        if self.quant is None:
            return moe_gemm(a, getattr(self, f"w{which}"), ids)
        wq, s, b = getattr(self, f"q{which}")
        return moe_gemm(a, wq, ids, scales=s, biases=b, bits=self.quant[0], group_size=self.quant[1])

    def __call__(self, h, fused=False):
        """fused: w1 and w3 as one grouped GEMM of twice the width (w13), one routing prologue for both."""
        ids, p = self.route(h)
        if fused:
            a, b = mx.split(self._experts(h, 13, ids), 2, axis=-1)
        else:
            a, b = self._experts(h, 1, ids), self._experts(h, 3, ids)
        y = self._experts(nn.silu(a) * b, 2, ids)  # (T, k, dim)
        return (y * p[..., None]).sum(axis=1) + self.shared(h)

    def dense_same_flops(self, h, w1, w3, w2, w13, fused=False):
        """The routed experts replaced by plain GEMMs of the same FLOPs: slot j of every token through the
        contiguous weights w1[j], w3[j], w2[j] (or w13[j] for w1 | w3 when fused), lists of top_k (N, K) arrays."""
        _, p = self.route(h)
        y = 0
        for j in range(self.top_k):
            a, b = mx.split(h @ w13[j].T, 2, axis=-1) if fused else (h @ w1[j].T, h @ w3[j].T)
            y = y + p[:, j:j + 1] * ((nn.silu(a) * b) @ w2[j].T)
        return y + self.shared(h)

    def without_routed(self, h):
        _, p = self.route(h)
        return p.sum(axis=-1, keepdims=True) + self.shared(h)


def _rel_diff(a, ref):
    a, ref = a.astype(mx.float32), ref.astype(mx.float32)
    return (mx.abs(a - ref).max() / mx.abs(ref).max()).item()


def moe_rows(t, dim, hidden, shared_hidden, experts, top_k, rounds, calls, emit):
    out = []
    h = mx.random.normal((t, dim)).astype(mx.bfloat16)
    ffn = MoeFeedForward(dim, hidden, shared_hidden, experts, top_k)
    mx.eval(h, ffn.parameters())
    dense_w = [[mx.contiguous(getattr(ffn, f"w{i}")[j]) for j in range(top_k)] for i in (1, 3, 2, 13)]
    mx.eval(dense_w)
    flops = 2 * t * top_k * 3 * dim * hidden
    shape = f"T{t} D{dim} H{hidden} E{experts} top{top_k} + shared {shared_hidden}"
    for label, quant in [("bf16", None)] + [(f"affine{b} g{g}", (b, g)) for _, b, g in QUANT]:
        ffn.quant = None
        if quant:
            ffn.quantize_experts(*quant)
            mx.eval(ffn.q1, ffn.q2, ffn.q3, ffn.q13)
        def on_h(fn):  # fn compiled as a function of its own (mx.compile caches traces by function), called on h
            compiled = mx.compile(fn)
            return lambda: compiled(h)

        fns = {"ours": on_h(lambda a: ffn(a)), "dense": on_h(lambda a: ffn.dense_same_flops(a, *dense_w)),
               "without_routed": on_h(lambda a: ffn.without_routed(a)), "w13": on_h(lambda a: ffn(a, fused=True)),
               "dense_w13": on_h(lambda a: ffn.dense_same_flops(a, *dense_w, fused=True))}
        columns = {c: v for c, v in moe_side_columns(quant is not None, None).items() if c in MOE_COLUMNS}
        for column, (name, value) in columns.items():  # traced while the setting is in force
            fns[column] = with_env(name, value, on_h(lambda a: ffn(a)))
        st = interleaved(fns, lambda fn: _streamed(fn, calls), rounds)
        y = fns["ours"]()
        y_ref = with_env("FLASHDIFF_KERNELS", "reference", lambda: ffn(h).astype(mx.float32))()  # MLX ops, per expert
        base = st["without_routed"]
        row = dict(kernel="moe feed-forward", shape=shape, mode=label, stream_rounds=rounds, calls=calls,
                   ours_ms=st["ours"] * 1e3, dense_ms=st["dense"] * 1e3, without_routed_ms=base * 1e3,
                   routed_ours_tflops=flops / max(st["ours"] - base, 1e-12) / 1e12,
                   block_ratio_vs_dense=st["dense"] / st["ours"],
                   routed_ratio_vs_dense=(st["dense"] - base) / max(st["ours"] - base, 1e-12),
                   max_rel_diff_vs_reference=_rel_diff(y, y_ref),
                   w13_ms=st["w13"] * 1e3, dense_w13_ms=st["dense_w13"] * 1e3,
                   w13_routed_ratio_vs_dense_w13=(st["dense_w13"] - base) / max(st["w13"] - base, 1e-12),
                   w13_max_rel_diff_vs_default=_rel_diff(fns["w13"](), y))
        for column in columns:
            side_y = fns[column]()
            row.update({f"{column}_ms": st[column] * 1e3,
                        f"{column}_block_ratio_vs_dense": st["dense"] / st[column],
                        f"{column}_routed_ratio_vs_dense": (st["dense"] - base) / max(st[column] - base, 1e-12),
                        f"{column}_equals_default": mx.array_equal(side_y, y).item()})
        out.append(row)
        emit(row)
    return out


def markdown(rows):
    lines = ["| measure | shape | mode | ours | baseline | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["kernel"] == "quantized_linear chain":
            lines.append(
                f"| quantized_linear chain ({r['layers']} layers, compiled, streamed) | {r['shape']} | {r['mode']} | "
                f"{r['chain_ours_ms']:.3f} ms ({r['chain_ours_tflops']:.0f} TFLOP/s); each layer alone, summed "
                f"{r['alone_sum_ours_ms']:.3f} ms | bf16 chain {r['chain_bf16_ms']:.3f} ms; alone, summed "
                f"{r['alone_sum_bf16_ms']:.3f} ms | in the chain **{r['chain_ratio_vs_bf16']:.2f}x** bf16; alone "
                f"{r['alone_ratio_vs_bf16']:.2f}x |")
        elif r["kernel"] == "moe feed-forward":
            sides = "".join(f"; {MOE_SIDE_COLUMNS[c]}: {r[f'{c}_ms']:.3f} ms, routed part "
                            f"{r[f'{c}_routed_ratio_vs_dense']:.2f}x" for c in MOE_COLUMNS if f"{c}_ms" in r)
            lines.append(
                f"| MoE feed-forward (compiled, streamed) | {r['shape']} | {r['mode']} | {r['ours_ms']:.3f} ms "
                f"(routed part {r['ours_ms'] - r['without_routed_ms']:.3f} ms, {r['routed_ours_tflops']:.0f} TFLOP/s)"
                f"{sides} | dense same FLOPs {r['dense_ms']:.3f} ms; gate + shared expert alone "
                f"{r['without_routed_ms']:.3f} ms | block {r['block_ratio_vs_dense']:.2f}x, routed part "
                f"**{r['routed_ratio_vs_dense']:.2f}x** dense; w1 \\| w3 as one GEMM, both sides: {r['w13_ms']:.3f} / "
                f"{r['dense_w13_ms']:.3f} ms, routed part **{r['w13_routed_ratio_vs_dense_w13']:.2f}x** |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/in-graph.json")
    ap.add_argument("--md", default=None)
    ap.add_argument("--only", default="chain,moe", help="comma list of: chain, moe")
    ap.add_argument("--rows", default="1024,4608", help="token counts of the chains (FLUX-dev at 512² and 1024²)")
    ap.add_argument("--width", type=int, default=3072, help="chain width D (FLUX: 3072)")
    ap.add_argument("--mlp", type=int, default=12288, help="chain MLP width (FLUX: 12288)")
    ap.add_argument("--moe", default="4096,2560,6912,3584,4,2",
                    help="T,D,H,shared H,experts,top-k of the MoE feed-forward (HiDream: 4096,2560,6912,3584,4,2)")
    ap.add_argument("--stream-rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=10, help="compiled calls per streamed sample")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    if parts - {"chain", "moe"}:
        ap.error(f"--only {args.only!r}: the sections are chain and moe")
    if args.stream_rounds < 1 or args.calls < 2:
        ap.error(f"--stream-rounds must be at least 1 and --calls at least 2, got {args.stream_rounds} and {args.calls}")
    try:
        token_counts = [int(v) for v in args.rows.split(",")]
        t, dim, hidden, shared_hidden, experts, top_k = (int(v) for v in args.moe.split(","))
    except ValueError:
        ap.error(f"--rows {args.rows!r} / --moe {args.moe!r}: comma-separated integers (--moe takes six)")
    if not 1 <= top_k <= experts:
        ap.error(f"--moe: top-k {top_k} must be between 1 and the number of experts {experts}")
    rows = []
    info = environment(sys.argv)

    def emit(row):  # JSON and markdown after every row, each written whole (temporary file + rename)
        print(row, flush=True)
        rows.append(row)
        write_json(Path(args.out), dict(info=info, rows=rows))
        if args.md:
            write_text_atomic(Path(args.md), markdown([r for r in rows if "error" not in r]) + "\n")

    sections = {"chain": lambda: chain_rows(token_counts, args.width, args.mlp, args.stream_rounds, args.calls, emit),
                "moe": lambda: moe_rows(t, dim, hidden, shared_hidden, experts, top_k, args.stream_rounds, args.calls, emit)}
    for name in ("chain", "moe"):
        if name in parts:
            try:
                sections[name]()
            except Exception as exc:  # keep the other section's rows
                print(f"{name} failed: {exc!r}", flush=True)
                emit(dict(kernel=name, error=repr(exc)))
    print(markdown([r for r in rows if "error" not in r]))


if __name__ == "__main__":
    main()
