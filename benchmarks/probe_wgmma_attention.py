"""Diagnose the sm_90 attention (flashdiff/kernels/_attention_sm90.py) on the GPU with inputs that
separate its two MMAs: q = 0 makes P uniform (so O = mean of V: the PV MMA and the V^T prep alone);
V = identity (Lk = 128 = D) makes O = P (the QK^T MMA and the softmax alone). Saves every output as
.npz under --out for offline comparison, and prints max errors per case.

    python3 benchmarks/probe_wgmma_attention.py --out $OUT/probe-wgmma
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mlx.core as mx  # noqa: E402

from flashdiff.kernels.attention import attention  # noqa: E402


def ref(q, k, v, scale):
    s = (q.astype(np.float32) @ k.astype(np.float32).transpose(0, 1, 3, 2)) * scale
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return p @ v.astype(np.float32)


def case(name, q, k, v, scale, out_dir, results):
    t = time.time()
    try:
        got = attention(mx.array(q).astype(mx.bfloat16), mx.array(k).astype(mx.bfloat16),
                        mx.array(v).astype(mx.bfloat16), scale, backend="cuda_wgmma")
        got = np.array(got.astype(mx.float32))
    except Exception as e:  # noqa: BLE001 - report any failure and go on
        print(f"{name}: ERROR {type(e).__name__}: {e}", flush=True)
        return
    r = ref(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), scale)
    err = np.abs(got - r)
    rows = err.max(-1).reshape(-1)
    cols = err.max(-2).reshape(-1, err.shape[-1]).max(0)
    print(f"{name}: {time.time() - t:.2f}s max|err| {err.max():.4g}  |ref| {np.abs(r).max():.4g}  "
          f"nan {np.isnan(got).sum()}  bad rows {(rows > 0.05).sum()}/{rows.size}  bad cols "
          f"{(cols > 0.05).sum()}/{cols.size}  first bad rows {np.nonzero(rows > 0.05)[0][:8].tolist()}", flush=True)
    results[name] = dict(got=got, ref=r)
    np.savez_compressed(os.path.join(out_dir, f"{name}.npz"), got=got, ref=r, q=q, k=k, v=v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    out_dir = ap.parse_args().out
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    bf = lambda a: np.array(mx.array(a).astype(mx.bfloat16).astype(mx.float32))  # noqa: E731
    results = {}
    d = 128
    # PV alone: q = 0 -> uniform P.
    v = bf(rng.standard_normal((1, 1, 128, d)))
    case("pv_uniform_128", np.zeros((1, 1, 128, d)), bf(rng.standard_normal((1, 1, 128, d))), v, 0.1,
         out_dir, results)
    # PV alone, V[key, j] = key index one-hot-ish pattern: v = ramp in keys, constant in d
    v = bf(np.tile((np.arange(128) / 128.0)[None, None, :, None], (1, 1, 1, d)) + np.arange(d) / 1024.0)
    case("pv_ramp_128", np.zeros((1, 1, 128, d)), bf(rng.standard_normal((1, 1, 128, d))), v, 0.1,
         out_dir, results)
    # QK + softmax alone: V = I (Lk = 128 = d) -> O = P.
    q = bf(rng.standard_normal((1, 1, 128, d)))
    k = bf(rng.standard_normal((1, 1, 128, d)))
    case("s_identity_v_128", q, k, np.eye(128)[None, None], 0.05, out_dir, results)
    # One hot score: q row i = e_i * 8, k = I -> s[i, j] = 8 delta_ij * scale.
    case("s_onehot_128", np.eye(128)[None, None] * 8, np.eye(128)[None, None], np.eye(128)[None, None], 1.0,
         out_dir, results)
    # General, two key tiles, odd length.
    q, k, v = (bf(rng.standard_normal((1, 2, n, d))) for n in (200, 300, 300))
    case("general_200x300", q, k, v, 1 / np.sqrt(d), out_dir, results)
    q, k, v = (bf(rng.standard_normal((1, 2, 4621, d))) for _ in range(3))
    case("general_4621", q, k, v, 1 / np.sqrt(d), out_dir, results)


if __name__ == "__main__":
    main()
