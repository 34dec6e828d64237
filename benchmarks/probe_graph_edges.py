"""Which kernels of a compiled block wait for which (run on the GPU machine, MLX's CUDA back-end):

    python3 benchmarks/probe_graph_edges.py --out $OUT/graph-edges

MLX writes every CUDA graph it launches as a Graphviz file when MLX_SAVE_CUDA_GRAPHS_DOT_FILE names a path
prefix (mlx/backend/cuda/device.cpp, read once, at the first graph). This probe sets it, evaluates one
compiled chain of quantized layers and one HiDream-shaped MoE feed-forward (benchmarks/in_graph.py), each in
an evaluation of its own, and summarises each file: every node's name (as the file gives it), its incoming and
outgoing edge counts, and the roots (nodes no edge points to). The claim it checks (in_graph.py's docstring):
quantized_linear's dequantize kernel and moe_gemm's separate dequantize kernel are roots; the one-launch MoE
prologue is not. The .dot files stay beside the summary (out prefix + _N.dot).
"""

import argparse
import os
import re
import sys
from pathlib import Path

_NODE = re.compile(r'"([^"]+)"\s*\[(.*?)\];', re.S)
_EDGE = re.compile(r'"([^"]+)"\s*->\s*"([^"]+)"')
_LABEL = re.compile(r'label="((?:[^"\\]|\\.)*)"', re.S)
_NAME = re.compile(r"(flashdiff\w*|nvjet\w*|cutlass\w*|sm90\w*|_Z\w+|EMPTY|MEMCPY|MEMSET|GRAPH|KERNEL)")


def summarise_dot(text: str) -> dict:
    """Nodes of one Graphviz file from cudaGraphDebugDotPrint: {id: {name, graph, in, out}} and the roots per
    graph (a node's graph: its id up to "_node_", so a child graph's nodes are told apart from the parent's)."""
    nodes = {}
    for node_id, attrs in _NODE.findall(text):
        if node_id in nodes:
            continue
        label = _LABEL.search(attrs)
        names = _NAME.findall(label.group(1) if label else attrs)
        kernel = [n for n in names if n not in ("KERNEL", "GRAPH", "EMPTY", "MEMCPY", "MEMSET")]
        nodes[node_id] = dict(name=(kernel or names or ["?"])[0], graph=node_id.split("_node_")[0], into=0, out=0)
    edges = _EDGE.findall(text)
    for a, b in edges:
        for end, key in ((a, "out"), (b, "into")):
            nodes.setdefault(end, dict(name="?", graph=end.split("_node_")[0], into=0, out=0))[key] += 1
    roots = {}
    for node_id, n in nodes.items():
        if n["into"] == 0:
            roots.setdefault(n["graph"], []).append(n["name"])
    return dict(nodes=nodes, roots=roots, edges=[[nodes[a]["name"], nodes[b]["name"]] for a, b in edges])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="path prefix of the .dot files and the summary (prefix.json)")
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--width", type=int, default=3072)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--moe", default="4096,2560,6912,3584,4,2", help="T,D,H,shared H,experts,top-k")
    args = ap.parse_args()
    prefix = Path(args.out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    os.environ["MLX_SAVE_CUDA_GRAPHS_DOT_FILE"] = str(prefix)  # before MLX launches its first graph

    import mlx.core as mx

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import in_graph
    from common import quantize, write_json
    from flashdiff.kernels import quantized_linear

    def graphs_of(run):
        """Evaluate run() once on its own; the .dot files MLX wrote meanwhile."""
        mx.synchronize()
        before = set(prefix.parent.glob(prefix.name + "_*.dot"))
        mx.eval(run())
        mx.synchronize()
        return sorted(set(prefix.parent.glob(prefix.name + "_*.dot")) - before, key=lambda p: p.stat().st_mtime)

    x = mx.random.normal((args.rows, args.width)).astype(mx.bfloat16)
    layers = [quantize(in_graph._weight(args.width, args.width, k), "affine", 4, 64)
              for k in mx.random.split(mx.random.key(0), args.layers)]
    t, dim, hidden, shared_hidden, experts, top_k = (int(v) for v in args.moe.split(","))
    h = mx.random.normal((t, dim)).astype(mx.bfloat16)
    ffn = in_graph.MoeFeedForward(dim, hidden, shared_hidden, experts, top_k)
    ffn.quantize_experts(4, 64)
    mx.eval(x, layers, h, ffn.parameters())

    def chain(a):
        for q in layers:
            a = quantized_linear(a, q[0], q[1], q[2], 4, 64, "affine")
        return a

    cases = {"quantized_linear chain": (mx.compile(chain), x, {}),
             "moe feed-forward, default": (mx.compile(lambda a: ffn(a)), h, {}),
             "moe feed-forward, FLASHDIFF_GEMM_DEQUANT=separate": (mx.compile(lambda a: ffn(a)), h,
                                                                  {"FLASHDIFF_GEMM_DEQUANT": "separate"})}
    summary = {}
    for name, (fn, arg, env) in cases.items():
        os.environ.update(env)
        try:
            mx.eval(fn(arg))  # traced and its kernels built: the next evaluation is the block alone
            files = graphs_of(lambda: fn(arg))
        finally:
            for key in env:
                del os.environ[key]
        summary[name] = [dict(file=f.name, **summarise_dot(f.read_text())) for f in files]
        for g in summary[name]:
            print(name, g["file"], {k: v for k, v in g["roots"].items()}, flush=True)
    write_json(Path(str(prefix) + ".json"), summary)


if __name__ == "__main__":
    main()
