"""Can a thread-block-cluster kernel run through ``mx.fast.cuda_kernel`` safely? A minimal reproducer, on the GPU machine:

    python3 benchmarks/probe_cluster_graph.py --out $OUT/cluster-graph.json                         # CUDA graphs on
    MLX_USE_CUDA_GRAPHS=0 python3 benchmarks/probe_cluster_graph.py --out $OUT/cluster-graph-off.json

Why. Sharing the 8-bit weight conversion between two CTAs (a cluster of 2, through distributed shared memory) is the one
design left for the mixed GEMM at 1024 rows (benchmarks/README.md, sessions 20-21). ``mx.fast.cuda_kernel`` (MLX 0.32.4)
takes no cluster shape, so the only way to get one is a compile-time ``__cluster_dims__`` on the kernel, which MLX's
CUDA-graph cache does not see: it keys kernel nodes by the cluster *launch attribute* only. Session 6 saw a full GEMM
go wrong that way, but that kernel also gave wrong outputs with graphs off, so it proved nothing on its own.

What. Two kernels too small to be wrong, with outputs that depend on their input (so a stale buffer shows):
- ``cluster``: ``__cluster_dims__(2, 1, 1)``; block i writes (its %cluster_nctarank, its %cluster_ctarank, the value its
  peer CTA put in *its own* shared memory, read through ``mapa`` + ``ld.shared::cluster``, and a marker 0xC1);
- ``plain``: the same layout, per-CTA: (1, 0, the value it would have read, marker 0xA1).
Each step builds one or two calls on fresh inputs, evaluates them, and compares every element with what the kernel must
write. The steps alternate the two kernels (and one MLX op) in graphs of the same shape, which is what MLX's graph cache
updates in place. Prints one line per step and writes the steps as JSON (``--out``).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import environment, write_text_atomic  # noqa: E402

BLOCKS = 8

_HEADER = r"""
#define __global__ __attribute__((global)) __cluster_dims__(2, 1, 1)
"""

_CLUSTER_SOURCE = r"""
  __shared__ unsigned slot;
  unsigned rank, nrank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(nrank));
  const unsigned b = blockIdx.x;
  if (threadIdx.x == 0) slot = (unsigned)x[b] * 3u + 7u;
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
  if (threadIdx.x == 0) {
    unsigned peer_value = 0xFFFFFFFFu;
    if (nrank == 2) {
      unsigned local = (unsigned)__cvta_generic_to_shared(&slot), remote;
      asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank ^ 1u));
      asm volatile("ld.shared::cluster.u32 %0, [%1];" : "=r"(peer_value) : "r"(remote) : "memory");
    }
    out[4 * b + 0] = nrank;
    out[4 * b + 1] = rank;
    out[4 * b + 2] = peer_value;
    out[4 * b + 3] = 0xC1u;
  }
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
"""

_PLAIN_SOURCE = r"""
  const unsigned b = blockIdx.x;
  if (threadIdx.x == 0) {
    out[4 * b + 0] = 1u;
    out[4 * b + 1] = 0u;
    out[4 * b + 2] = (unsigned)x[b ^ 1u] * 3u + 7u;
    out[4 * b + 3] = 0xA1u;
  }
"""


def kernels():
    cluster = mx.fast.cuda_kernel(name="flashdiff_probe_cluster", input_names=["x"], output_names=["out"],
                                  source=_CLUSTER_SOURCE, header=_HEADER)
    plain = mx.fast.cuda_kernel(name="flashdiff_probe_plain", input_names=["x"], output_names=["out"],
                                source=_PLAIN_SOURCE)
    return cluster, plain


def expected(kind: str, x: np.ndarray) -> np.ndarray:
    """What `kind` must write for input x (int32, one value per block)."""
    if kind == "mlx add":
        return x.astype(np.int64) + 1
    e = np.zeros((BLOCKS, 4), np.int64)
    peer = np.arange(BLOCKS) ^ 1
    e[:, 2] = x[peer].astype(np.int64) * 3 + 7
    if kind == "cluster":
        e[:, 0], e[:, 1], e[:, 3] = 2, np.arange(BLOCKS) % 2, 0xC1
    else:
        e[:, 0], e[:, 1], e[:, 3] = 1, 0, 0xA1
    return e.reshape(-1)


def call(kind: str, x_np: np.ndarray, made):
    x = mx.array(x_np)
    if kind == "mlx add":
        return x + 1
    kernel = made[0] if kind == "cluster" else made[1]
    (out,) = kernel(inputs=[x], output_shapes=[(4 * BLOCKS,)], output_dtypes=[mx.uint32], grid=(32 * BLOCKS, 1, 1),
                    threadgroup=(32, 1, 1))
    return out


STEPS = [["cluster"], ["cluster"], ["plain"], ["plain"], ["cluster"], ["plain"], ["cluster"], ["mlx add"],
         ["cluster"], ["cluster", "plain"], ["plain", "cluster"], ["plain", "plain"], ["cluster", "cluster"]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    made = kernels()
    rng = np.random.default_rng(0)
    steps = []
    for i, kinds in enumerate(STEPS):
        xs = [rng.integers(1, 1 << 20, BLOCKS, dtype=np.int32) for _ in kinds]
        outs = [call(k, x, made) for k, x in zip(kinds, xs)]
        mx.eval(*outs)
        for k, x, o in zip(kinds, xs, outs):
            got = np.array(o).astype(np.int64).reshape(-1)
            want = expected(k, x)
            wrong = int((got != want).sum())
            head = got[:4].tolist()
            steps.append(dict(step=i, graph=" + ".join(kinds), kernel=k, wrong=wrong, of=int(want.size),
                              first_block=head, first_block_expected=want[:4].tolist()))
            print(f"step {i:2d} [{' + '.join(kinds):17s}] {k:8s}: {'ok' if wrong == 0 else f'{wrong} WRONG'}"
                  f"  block 0 = {head} (expected {want[:4].tolist()})", flush=True)
    graphs = os.environ.get("MLX_USE_CUDA_GRAPHS", "1")
    summary = dict(cuda_graphs=graphs, steps=len(steps), wrong_steps=sum(s["wrong"] > 0 for s in steps))
    print(json.dumps(summary))
    if args.out:
        write_text_atomic(Path(args.out), json.dumps(dict(summary=summary, steps=steps,
                                                          environment=environment(sys.argv)), indent=1))


if __name__ == "__main__":
    main()
