"""Odd sequence lengths through cuDNN attention (run on the GPU machine): the unpadded call against keys and
values padded to a multiple of 16 / 64 / 128 with an additive key mask of shape (1, 1, 1, L_padded)
(0 for real keys, -inf for padding), queries padded or not, beside the neighbouring multiples of 128.

    python3 benchmarks/probe_attention_pad.py [--out result.json]

MLX turns a boolean mask into an additive one by materialising it at the full (B, H, Lq, Lk) shape; an
additive mask stays a broadcast view, so cuDNN reads it through zero strides.
"""

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import median_call  # noqa: E402

sdpa = mx.fast.scaled_dot_product_attention


def padded(q, k, v, scale, multiple, pad_q):
    L = k.shape[2]
    pad = -L % multiple
    bias = mx.where(mx.arange(L + pad) < L, 0.0, -float("inf")).astype(q.dtype)[None, None, None, :]
    kp, vp = (mx.pad(a, [(0, 0), (0, 0), (0, pad), (0, 0)]) for a in (k, v))
    qp = mx.pad(q, [(0, 0), (0, 0), (0, -q.shape[2] % multiple), (0, 0)]) if pad_q else q
    return sdpa(qp, kp, vp, scale=scale, mask=bias)[:, :, : q.shape[2]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    for L, h in [(4608, 24), (4621, 24), (4736, 24), (32640, 40), (32760, 40), (32768, 40)]:
        q, k, v = (mx.random.normal((1, h, L, 128)).astype(mx.bfloat16) for _ in range(3))
        mx.eval(q, k, v)
        scale, reps = 128 ** -0.5, 5 if L < 20000 else 1
        flops = 4 * L * L * 128 * h
        row = {"L": L, "heads": h, "sdpa_ms": median_call(lambda: sdpa(q, k, v, scale=scale), 10, reps, 3) * 1e3}
        if L % 128:
            ref = sdpa(q, k, v, scale=scale)
            for multiple in (16, 64, 128):
                for pad_q in (False, True):
                    name = f"pad{multiple}{'_q' if pad_q else ''}_ms"
                    try:
                        err = mx.abs(padded(q, k, v, scale, multiple, pad_q).astype(mx.float32)
                                     - ref.astype(mx.float32)).max().item()
                        row[name] = median_call(lambda: padded(q, k, v, scale, multiple, pad_q), 10, reps, 3) * 1e3
                        row[name[:-3] + "_max_abs_diff"] = err
                    except Exception as exc:
                        row[name[:-3] + "_error"] = repr(exc)[:200]
        row.update({key[:-3] + "_tflops": flops / val / 1e9 for key, val in list(row.items()) if key.endswith("_ms")})
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
