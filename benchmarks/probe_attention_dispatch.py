"""Where the sm_90 attention beats cuDNN: the measurements behind attention's dispatch rule
(flashdiff/kernels/attention.py, SM90_MIN_SCORES and the key-mask case). Run on the GPU machine:

    python3 benchmarks/probe_attention_dispatch.py --out $OUT/attention-dispatch.json
    python3 benchmarks/probe_attention_dispatch.py --lengths 8200:24,16400:24 --no-masked --quick --out ...

--lengths L:heads,... replaces the unmasked cases; --quick times only SDPA and ours (head-major), and
one round for lengths above 40000; --persistent adds the persistent form (_attention_sm90_forms); --streamed times
each variant as a model's blocks run (common.streamed_call: the host builds call i + 1 while the GPU runs call i, so
host time is hidden where the GPU is the longer) instead of queued calls in one evaluation (common.median_call,
whose graph starts only once the host has encoded every call). --device-scalar adds "ours_device_scalar": our
kernel with its (1,) scale / dummy-bias input replaced by an array in device memory (session 15: MLX keeps
host-made arrays in managed memory; does such an input cost anything per call?), and "ours_main_only": the main
kernel alone, on tensor maps made once before the timing (the arrays do not change), to see what the maps kernel
ahead of it costs per call.

Each case times its variants in ROUNDS interleaved rounds (median of each variant's per-round medians),
so a clock or power swing hits all of them alike. Variants: cuDNN's SDPA and our kernel (ping-pong on
and off) on head-major (B, H, L, 128) arrays; the same two the way joint_attention calls them
(layout "blhd": SDPA on transposed views, ours on (B, L, H, 128) directly); with a key mask, MLX's SDPA
given a boolean and an additive mask, and ours.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import attention  # noqa: E402
from flashdiff.kernels import _attention_sm90 as att  # noqa: E402
from flashdiff.kernels._attention_sm90 import flash_attention_sm90  # noqa: E402
from common import median_call, streamed_call, write_json  # noqa: E402

ROUNDS = 3
UNMASKED = [(4608, 24), (4621, 24), (8192, 24), (12288, 24), (16384, 24), (20480, 24), (24576, 24), (32760, 40)]
MASKED = [(4189, 4150, 24), (4621, 4600, 24)]  # (length, valid keys, heads): Qwen-Image-like joint sequences


def with_device_scalar(fn, scale):
    """fn() with flash_attention_sm90's scale input made on the GPU (4 floats: above MLX's 8-byte scalar pool) once."""
    arr = mx.full((4,), scale, mx.float32)
    mx.eval(arr)

    def call():
        saved, att.scale_input = att.scale_input, lambda _scale: arr
        try:
            return fn()
        finally:
            att.scale_input = saved
    return call


def timed(variants, flops, big, rounds=ROUNDS, streamed=False):
    iters, reps = (3, 2) if big else (10, 5)
    samples = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name].append(streamed_call(fn, 6 if big else 20, 3) if streamed else median_call(fn, iters, reps, 1))
    row = {}
    for name, vals in samples.items():
        ms = statistics.median(vals) * 1e3
        row[f"{name}_ms"] = ms
        row[f"{name}_tflops"] = flops / ms / 1e9
        row[f"{name}_spread"] = (max(vals) - min(vals)) / min(vals)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", default="", help="unmasked cases as L:heads,... (default: the built-in list)")
    ap.add_argument("--no-masked", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--persistent", action="store_true", help="also our kernel's persistent form")
    ap.add_argument("--streamed", action="store_true", help="time calls streamed, as a model's blocks run")
    ap.add_argument("--device-scalar", action="store_true", help="also ours with its scale input in device memory")
    args = ap.parse_args()
    unmasked = [tuple(int(x) for x in c.split(":")) for c in args.lengths.split(",") if c] or UNMASKED
    rows = []
    scale = 128 ** -0.5
    t = (0, 2, 1, 3)
    for L, h in unmasked:
        q, k, v = (mx.random.normal((1, h, L, 128)).astype(mx.bfloat16) for _ in range(3))
        qs, ks, vs = (mx.contiguous(a.transpose(t)) for a in (q, k, v))
        mx.eval(q, k, v, qs, ks, vs)
        row = dict(case="unmasked", L=L, heads=h, streamed=args.streamed)
        variants = {
            "sdpa": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale),
            "ours": lambda: flash_attention_sm90(q, k, v, scale),
        }
        if not args.quick:
            variants.update({
                "ours_no_pingpong": lambda: flash_attention_sm90(q, k, v, scale, pingpong=False),
                "sdpa_blhd": lambda: attention(qs, ks, vs, scale, backend="sdpa", layout="blhd"),
                "ours_blhd": lambda: attention(qs, ks, vs, scale, backend="cuda_wgmma", layout="blhd"),
            })
        if args.device_scalar:
            maps = att.tensor_maps(q, k, v)
            mx.eval(maps)
            variants["ours_device_scalar"] = with_device_scalar(lambda: flash_attention_sm90(q, k, v, scale), scale)
            variants["ours_main_only"] = lambda maps=maps: flash_attention_sm90(q, k, v, scale, _maps=maps)
        if args.persistent:
            variants["ours_persistent"] = lambda: flash_attention_sm90(q, k, v, scale, persistent=True)
        rounds = 1 if args.quick and L > 40000 else ROUNDS
        row.update(timed(variants, 4 * L * L * 128 * h, L > 20000, rounds, args.streamed))
        row["ours_vs_sdpa"] = row["sdpa_ms"] / row["ours_ms"]
        if args.device_scalar:
            outs = [variants[n]() for n in ("ours", "ours_device_scalar", "ours_main_only")]
            row["variants_equal_ours"] = all(mx.array_equal(o, outs[0]).item() for o in outs[1:])
        if not args.quick:
            row["ours_blhd_vs_sdpa_blhd"] = row["sdpa_blhd_ms"] / row["ours_blhd_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_json(Path(args.out), rows)
    for L, valid, h in [] if args.no_masked else MASKED:
        q, k, v = (mx.random.normal((1, h, L, 128)).astype(mx.bfloat16) for _ in range(3))
        keep = (mx.arange(L) < valid)[None, None, None, :]
        additive = mx.where(keep, 0.0, -float("inf")).astype(mx.bfloat16)
        mx.eval(q, k, v, keep, additive)
        row = dict(case="key mask", L=L, valid=valid, heads=h, streamed=args.streamed)
        row.update(timed({
            "sdpa_bool_mask": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=keep),
            "sdpa_additive_mask": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=additive),
            "ours": lambda: attention(q, k, v, scale, keep, backend="cuda_wgmma"),
            "sdpa_unmasked": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale),
        }, 4 * L * L * 128 * h, False, streamed=args.streamed))
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_json(Path(args.out), rows)


if __name__ == "__main__":
    main()
