"""Does the cluster GEMM launch, and what runs after it (GPU machine; session 6). One scenario per process:

    python3 benchmarks/probe_cluster_launch.py cluster_first|tma_first|tma_first_stash|k_change|k_change_stash
    LB=1 ...                    the cluster kernel with __launch_bounds__(384, 1) added to its signature
    MLX_USE_CUDA_GRAPHS=0 ...   MLX launches kernels directly instead of through CUDA graphs

Each call: a grouped GEMM (500 tokens, 4 experts, routing [0, 2], N 128) by the named engine against numpy;
then four MoE layers of one shape with new weights through the default engine.
"""
import json, os, subprocess, sys
import numpy as np
import mlx.core as mx
sys.path.insert(0, os.getcwd())
from flashdiff.kernels import _gemm_cuda, _gemm_tma

def one(t, e, k, n, engine, stash, seed=5):
    mx.random.seed(seed)
    x = mx.random.normal((t, k)).astype(mx.bfloat16)
    w = (mx.random.normal((e, n, k)) * 0.05).astype(mx.bfloat16)
    ids = mx.stack([mx.zeros((t,), mx.int32), mx.full((t,), min(2, e - 1), mx.int32)], axis=1)
    slot_row, te = _gemm_cuda.layout(ids, e)
    out = _gemm_cuda.grouped_gemm(x, w, slot_row, te, t * 2, a_div=2, engine=engine)
    mx.eval(out)
    xn, wn = np.array(x.astype(mx.float32)), np.array(w.astype(mx.float32))
    ref = np.stack([xn @ wn[0].T, xn @ wn[min(2, e - 1)].T], 1).reshape(t * 2, n)
    return int((~np.isclose(np.array(out.astype(mx.float32)), ref, rtol=1e-2, atol=1e-2)).sum())

scenario = sys.argv[1]
kept = []
if os.environ.get("LB"):
    from flashdiff.kernels import _gemm_tma_forms as forms
    forms._CLUSTER_HEADER = forms._CLUSTER_HEADER.replace("__cluster_dims__(2, 1, 1)", "__launch_bounds__(384, 1) __cluster_dims__(2, 1, 1)")
    assert "__launch_bounds__" in forms._CLUSTER_HEADER
if "stash" in scenario:
    orig = _gemm_tma.gather_slots
    def keep(*a, **kw):
        r = orig(*a, **kw); kept.append(r); return r
    _gemm_tma.gather_slots = keep
seq = {"cluster_first": [("wgmma cluster", 256), ("wgmma cluster", 256), ("wgmma tma", 256), ("wgmma tma", 256)],
       "tma_first": [("wgmma tma", 256), ("wgmma cluster", 256), ("wgmma cluster", 256), ("wgmma tma", 256)],
       "tma_first_stash": [("wgmma tma", 256), ("wgmma cluster", 256), ("wgmma cluster", 256), ("wgmma tma", 256)],
       "k_change": [("wgmma tma", 512), ("wgmma tma", 64), ("wgmma tma", 64), ("wgmma tma", 256), ("wgmma tma", 512)],
       "k_change_stash": [("wgmma tma", 512), ("wgmma tma", 64), ("wgmma tma", 64), ("wgmma tma", 256), ("wgmma tma", 512)],
       }[scenario]
def safe(*a):
    try:
        return one(*a)
    except Exception as ex:
        return str(ex)[-120:]
res = [(eng, k, safe(500, 4, k, 128, eng, "stash" in scenario)) for eng, k in seq]
# same shape, new weights each call (a model's MoE layers): default engine through moe_gemm
from flashdiff.kernels import moe_gemm
layers = []
for s in range(4):
    mx.random.seed(100 + s)
    x = mx.random.normal((600, 256)).astype(mx.bfloat16)
    w = (mx.random.normal((4, 384, 256)) * 0.05).astype(mx.bfloat16)
    ids = mx.argsort(mx.random.uniform(shape=(600, 4)), axis=-1)[:, :2].astype(mx.int32)
    out = np.array(moe_gemm(x, w, ids).astype(mx.float32))
    xn, wn, idn = np.array(x.astype(mx.float32)), np.array(w.astype(mx.float32)), np.array(ids)
    ref = np.einsum("tk,tjnk->tjn", xn, wn[idn])
    layers.append(int((~np.isclose(out, ref, rtol=1e-2, atol=1e-2)).sum()))
print(json.dumps({"LB": os.environ.get("LB"), "graphs": os.environ.get("MLX_USE_CUDA_GRAPHS"), "scenario": scenario, "calls": res, "moe_layers_bad": layers}), flush=True)
