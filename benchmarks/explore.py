"""Exploratory H200 measurements that decide kernel designs (not the published benchmark).

    python benchmarks/explore.py --out $OUT/explore.json [--sections grouped,prologue,attn,moe,qgemm,gemm,smallm]

"Pipelined" timings queue `reps` independent calls and synchronise once (the GPU queue stays full,
as inside a model forward); "isolated" timings synchronise after every call.
"""

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdiff.kernels import dequantize, moe_gemm, qk_norm_rope, qk_norm_rope_reference, quantized_linear  # noqa: E402
from flashdiff.kernels.moe import moe_windowed  # noqa: E402
from common import median_call, moe_problem, torch_sync_fn  # noqa: E402

RESULTS = []
OUT = {}  # path and environment, set by main(): every record rewrites the JSON (a killed run keeps its rows)


def record(**row):
    RESULTS.append(row)
    print(json.dumps(row), flush=True)
    if OUT:
        Path(OUT["path"]).write_text(json.dumps(dict(env=OUT["env"], rows=RESULTS), indent=1))


def timed(fn, reps, iters=7, warmup=2):
    """Median seconds per call of fn(), `reps` calls queued per synchronisation."""
    return median_call(fn, iters, reps, warmup)


def torch_timed(fn, reps, iters=7, warmup=2):
    return median_call(fn, iters, reps, warmup, sync=torch_sync_fn("cuda"))


GEMM_SHAPES = [(4608, 3072, 3072), (4608, 3072, 12288), (4608, 12288, 3072), (4608, 3072, 21504),
               (4608, 15360, 3072), (1024, 3072, 3072), (32760, 5120, 13824)]


def gemm_section():
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        torch = None
    for m, k, n in GEMM_SHAPES:
        x = mx.random.normal((m, k)).astype(mx.bfloat16)
        w = (mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16)
        mx.eval(x, w)
        flop = 2 * m * k * n
        reps = 10 if m < 10000 else 3
        row = dict(section="gemm", shape=f"{m}x{k}->{n}", mlx_ms=timed(lambda: x @ w.T, reps) * 1e3,
                   mlx_isolated_ms=timed(lambda: x @ w.T, 1) * 1e3)
        if torch is not None:
            tx = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            tw = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            row["torch_ms"] = torch_timed(lambda: F.linear(tx, tw), reps) * 1e3
            del tx, tw
        row.update({f"{key[:-3]}_tflops": flop / v / 1e9 for key, v in list(row.items()) if key.endswith("_ms")})
        record(**row)
    mx.clear_cache()


def qgemm_section():
    for m, k, n in GEMM_SHAPES:
        x = mx.random.normal((m, k)).astype(mx.bfloat16)
        w = (mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16)
        mx.eval(x, w)
        reps = 10 if m < 10000 else 3
        t_dense = timed(lambda: x @ w.T, reps)
        for bits in (4, 8):
            wq, s, b = mx.quantize(w, 64, bits)
            mx.eval(wq, s, b)
            t_ours = timed(lambda: quantized_linear(x, wq, s, b, bits, 64), reps)
            t_deq = timed(lambda: dequantize(wq, s, b, bits, 64, dtype=mx.bfloat16, backend="cuda"), reps)
            t_iso = timed(lambda: quantized_linear(x, wq, s, b, bits, 64), 1)
            t_dense_iso = timed(lambda: x @ w.T, 1)
            record(section="qgemm", shape=f"{m}x{k}->{n}", bits=bits, dense_ms=t_dense * 1e3, ours_ms=t_ours * 1e3,
                   dequant_ms=t_deq * 1e3, ratio=t_dense / t_ours, isolated_ratio=t_dense_iso / t_iso,
                   dequant_gbps=(wq.nbytes + s.nbytes * 2 + n * k * 2) / t_deq / 1e9)
    mx.clear_cache()


def moe_section():
    p = moe_problem()
    k, x, w, ids, skew, dense_x, flop = (p[key] for key in ("k", "x", "w", "ids", "skew", "dense_x", "flop"))
    t_dense = timed(lambda: dense_x @ w[0].T, 5)
    ref = moe_gemm(x, w, ids)
    ref_skew = moe_gemm(x, w, skew)
    record(section="moe", variant="dense GEMM same FLOPs", ms=t_dense * 1e3, tflops=flop / t_dense / 1e12)
    record(section="moe", variant="moe_gemm (dense experts)", ms=timed(lambda: moe_gemm(x, w, ids), 5) * 1e3,
           ratio=t_dense / timed(lambda: moe_gemm(x, w, ids), 5))
    for window in (64, 128, 256):
        out = moe_windowed(x, w, ids, window)
        out_skew = moe_windowed(x, w, skew, window)
        err = float(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32)).max())
        err_skew = float(mx.abs(out_skew.astype(mx.float32) - ref_skew.astype(mx.float32)).max())
        tm = timed(lambda: moe_windowed(x, w, ids, window), 5)
        tm_skew = timed(lambda: moe_windowed(x, w, skew, window), 5)
        record(section="moe", variant=f"windowed gather_mm w{window}", ms=tm * 1e3, ratio=t_dense / tm,
               skew_ms=tm_skew * 1e3, skew_ratio=t_dense / tm_skew, max_abs_err=err, max_abs_err_skew=err_skew,
               ref_max=float(mx.abs(ref).max()))
    wq, s, b = mx.quantize(w, 64, 4)
    mx.eval(wq, s, b)

    def q_windowed():
        wd = dequantize(mx.depends(wq, x), s, b, 4, 64, dtype=mx.bfloat16, backend="cuda")
        return moe_windowed(x, wd, ids, 128)

    tq = timed(q_windowed, 5)
    record(section="moe", variant="4-bit dequant + windowed w128", ms=tq * 1e3, ratio=t_dense / tq)
    # the gather_mm kernel itself on a dense problem: one expert, all windows
    xw = dense_x.reshape(64, 128, k)
    wt = w.swapaxes(-1, -2)
    zeros = mx.zeros((64,), mx.int32)
    tg = timed(lambda: mx.gather_mm(xw, wt, rhs_indices=zeros), 5)
    record(section="moe", variant="gather_mm 64x(128x2560) @ one expert", ms=tg * 1e3, ratio=t_dense / tg)
    mx.clear_cache()


def grouped_section():
    """The grouped tensor-core GEMM (kernels/_gemm_cuda.py): raw speed on dense problems (one expert,
    identity rows) next to MLX's GEMM, then moe_gemm at HiDream shapes (random and skewed routing)."""
    from flashdiff.kernels import _gemm_cuda, _moe_layout
    from flashdiff.kernels.moe import grouped_layout, moe_grouped
    engines = ["mma"] + (["wgmma", "wgmma wait", "wgmma ws", "wgmma tma"] if _gemm_cuda.is_sm90() else [])
    if os.environ.get("EXPLORE_ENGINES"):  # e.g. "wgmma,wgmma ws"
        engines = os.environ["EXPLORE_ENGINES"].split(",")
    for m, k, n in [(8192, 2560, 6912), (8192, 6912, 2560), (4608, 3072, 3072), (4608, 3072, 12288),
                    (4608, 12288, 3072), (4608, 3072, 21504), (1024, 3072, 3072), (512, 3072, 3072),
                    (512, 4096, 3072), (32760, 5120, 13824)]:
        x = mx.random.normal((m, k)).astype(mx.bfloat16)
        w = (mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16)
        mx.eval(x, w)
        ref = x @ w.T
        reps = 10 if m < 10000 else 3
        t_mlx = timed(lambda: x @ w.T, reps)
        flop = 2 * m * k * n
        for name in engines:
            gemm = functools.partial(_gemm_cuda.dense_gemm, engine=name)
            out = gemm(x, w)
            err = float(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32)).max())
            t_ours = timed(lambda: gemm(x, w), reps)
            record(section="grouped", engine=name, shape=f"{m}x{k}->{n}", mlx_ms=t_mlx * 1e3, ours_ms=t_ours * 1e3,
                   mlx_tflops=flop / t_mlx / 1e12, ours_tflops=flop / t_ours / 1e12, ratio=t_mlx / t_ours,
                   max_abs_err=err, ref_max=float(mx.abs(ref).max()))
    p = moe_problem()
    e, x, w, ids, skew, dense_x, w0, flop = (p[key] for key in ("e", "x", "w", "ids", "skew", "dense_x", "w0", "flop"))
    t_dense = min(timed(lambda: dense_x @ w[0].T, 5), timed(lambda: dense_x @ w0.T, 5))
    record(section="grouped", variant="dense references", slice_ms=timed(lambda: dense_x @ w[0].T, 5) * 1e3,
           contiguous_ms=timed(lambda: dense_x @ w0.T, 5) * 1e3, isolated_ms=timed(lambda: dense_x @ w0.T, 1) * 1e3,
           ours_ms=timed(lambda: _gemm_cuda.dense_gemm(dense_x, w0), 5) * 1e3)
    for name, r in (("random", ids), ("skewed", skew)):
        ref = moe_gemm(x, w, r, backend="reference")
        out = moe_gemm(x, w, r)
        err = float(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32)).max())
        tm = timed(lambda: moe_gemm(x, w, r), 5)
        tl = timed(lambda: _moe_layout.layout(r, e), 5)
        tl_mlx = timed(lambda: grouped_layout(r, e), 5)
        record(section="grouped", variant=f"moe_gemm bf16 {name}", ms=tm * 1e3, ratio=t_dense / tm,
               layout_kernel_ms=tl * 1e3, layout_mlx_ops_ms=tl_mlx * 1e3, dense_ms=t_dense * 1e3, tflops=flop / tm / 1e12, max_abs_err=err,
               ref_max=float(mx.abs(ref).max()))
        for engine in engines:  # the routed product through each engine (moe_gemm uses the default)
            gemm = functools.partial(_gemm_cuda.grouped_gemm, engine=engine)
            out = moe_grouped(x, w, r, gemm)
            err = float(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32)).max())
            te = timed(lambda: moe_grouped(x, w, r, gemm), 5)
            record(section="grouped", variant=f"moe bf16 {name}", engine=engine, ms=te * 1e3, ratio=t_dense / te,
                   max_abs_err=err)
    # where moe_gemm's time goes (default engine): layout kernel, then the grouped GEMM call, which
    # for "wgmma tma" is the slot gather (which also encodes the tensor maps) + the GEMM kernel
    from flashdiff.kernels import _gemm_tma
    slot_row, tile_expert = _moe_layout.layout(ids, e)
    mx.eval(slot_row, tile_expert)
    rows = ids.size
    record(section="grouped", variant="moe bf16 random breakdown", total_ms=timed(lambda: moe_gemm(x, w, ids), 5) * 1e3,
           layout_ms=timed(lambda: _moe_layout.layout(ids, e), 5) * 1e3,
           grouped_gemm_ms=timed(lambda: _gemm_cuda.grouped_gemm(x, w, slot_row, tile_expert, rows, ids.shape[1]), 5) * 1e3,
           gather_and_maps_ms=timed(lambda: _gemm_tma.gather_slots(x, slot_row, ids.shape[1], w), 5) * 1e3,
           tiles_used=int((tile_expert >= 0).sum()), tiles=tile_expert.shape[0])
    for bits in (4, 8):
        wq, s, b = mx.quantize(w, 64, bits)
        mx.eval(wq, s, b)
        tq = timed(lambda: moe_gemm(x, wq, ids, scales=s, biases=b, bits=bits, group_size=64), 5)
        td = timed(lambda: dequantize(wq, s, b, bits, 64, backend="cuda"), 5)
        record(section="grouped", variant=f"moe_gemm affine{bits} g64 random", ms=tq * 1e3, ratio=t_dense / tq,
               dequantize_ms=td * 1e3)
    mx.clear_cache()


def attn_section():
    h, d = 24, 128
    scale = d**-0.5
    for length in (4608, 4621, 4736, 16384, 16397):
        q, k, v = (mx.random.normal((1, h, length, d)).astype(mx.bfloat16) for _ in range(3))
        mx.eval(q, k, v)
        flop = 4 * length * length * d * h
        reps = 5 if length < 10000 else 2
        row = dict(section="attn", L=length)
        row["sdpa_ms"] = timed(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale), reps) * 1e3
        qt, kt, vt = (mx.contiguous(a.transpose(0, 2, 1, 3)) for a in (q, k, v))
        mx.eval(qt, kt, vt)
        row["sdpa_token_major_ms"] = timed(lambda: mx.fast.scaled_dot_product_attention(
            qt.transpose(0, 2, 1, 3), kt.transpose(0, 2, 1, 3), vt.transpose(0, 2, 1, 3), scale=scale), reps) * 1e3
        pad = -length % 128
        if pad:
            lp = length + pad

            def pad_q():
                qp = mx.pad(q, [(0, 0), (0, 0), (0, pad), (0, 0)])
                return mx.fast.scaled_dot_product_attention(qp, k, v, scale=scale)[:, :, :length]

            keymask = (mx.arange(lp) < length)[None, None, None, :]

            def pad_all_bool():
                qp, kp, vp = (mx.pad(a, [(0, 0), (0, 0), (0, pad), (0, 0)]) for a in (q, k, v))
                return mx.fast.scaled_dot_product_attention(qp, kp, vp, scale=scale, mask=keymask)[:, :, :length]

            ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
            row["pad_q_ms"] = timed(pad_q, reps) * 1e3
            row["pad_q_err"] = float(mx.abs(pad_q().astype(mx.float32) - ref.astype(mx.float32)).max())
            row["pad_all_bool_mask_ms"] = timed(pad_all_bool, reps) * 1e3
            row["pad_all_err"] = float(mx.abs(pad_all_bool().astype(mx.float32) - ref.astype(mx.float32)).max())
            row["masked_unpadded_ms"] = timed(lambda: mx.fast.scaled_dot_product_attention(
                q, k, v, scale=scale, mask=mx.ones((1, 1, 1, length), dtype=mx.bool_)), reps) * 1e3
        row.update({f"{key[:-3]}_tflops": flop / v / 1e9 for key, v in list(row.items()) if key.endswith("_ms")})
        record(**row)
    mx.clear_cache()


def prologue_section():
    import mlx.nn as nn

    h, d = 24, 128
    inner = h * d
    cases = {"double (512 + 4096)": [(512, 3 * inner), (4096, 3 * inner)], "single (4608, + MLP cols)": [(4608, 3 * inner + 4 * 3072)],
             "qwen double (128 + 4096)": [(128, 3 * inner), (4096, 3 * inner)]}
    for name, parts in cases.items():
        sources = []
        for length, cols in parts:
            t = mx.random.normal((1, length, cols)).astype(mx.bfloat16)
            sources.append((t, (1 + 0.1 * mx.random.normal((d,))).astype(mx.bfloat16),
                            (1 + 0.1 * mx.random.normal((d,))).astype(mx.bfloat16)))
        total = sum(p[0] for p in parts)
        ang = mx.random.uniform(0, 30, (total, d // 2))
        cos, sin = mx.cos(ang), mx.sin(ang)
        mx.eval(sources, cos, sin)
        fused = qk_norm_rope(sources, h, d, cos, sin, 1e-6)
        ref = qk_norm_rope_reference(sources, h, d, cos, sin, 1e-6)
        err = max(float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max()) for a, b in zip(fused, ref))
        t_f = timed(lambda: qk_norm_rope(sources, h, d, cos, sin, 1e-6), 10)
        t_r = timed(lambda: qk_norm_rope_reference(sources, h, d, cos, sin, 1e-6), 10)
        nbytes = 2 * 3 * total * inner * 2
        record(section="prologue", case=name, fused_ms=t_f * 1e3, mlx_ops_ms=t_r * 1e3, speedup=t_r / t_f,
               fused_gbps=nbytes / t_f / 1e9, max_abs_diff=err)
    del nn


def smallm_section():
    """quantized_linear (dequantize + GEMM) against mx.quantized_matmul at small token counts (text
    streams: Qwen-Image 128 tokens, FLUX 512), to place the dispatch threshold SMALL_M."""
    totals = {}
    for m in (64, 128, 256, 512, 1024):
        for k, n in ((3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072)):
            x = mx.random.normal((m, k)).astype(mx.bfloat16)
            w = (mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16)
            for bits in (4, 8):
                wq, s, b = mx.quantize(w, 64, bits)
                mx.eval(x, wq, s, b)
                t_deq = timed(lambda: quantized_linear(x, wq, s, b, bits, 64), 10)
                t_qmm = timed(lambda: mx.quantized_matmul(x, wq, s, b, True, 64, bits), 10)
                tot = totals.setdefault((m, bits), [0.0, 0.0])
                tot[0] += t_deq
                tot[1] += t_qmm
                record(section="smallm", m=m, shape=f"{k}->{n}", bits=bits, dequant_gemm_ms=t_deq * 1e3,
                       qmm_ms=t_qmm * 1e3, qmm_faster=t_qmm < t_deq)
    for (m, bits), (a, b) in sorted(totals.items()):
        record(section="smallm", m=m, bits=bits, total_dequant_gemm_ms=a * 1e3, total_qmm_ms=b * 1e3)
    mx.clear_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sections", default="prologue,attn,moe,qgemm,gemm")
    args = ap.parse_args()
    env = dict(mlx=mx.__version__, device=str(mx.default_device()), command=" ".join(sys.argv))
    OUT.update(path=args.out, env=env)
    for name in args.sections.split(","):
        t0 = time.time()
        try:
            globals()[f"{name}_section"]()
        except Exception as exc:  # keep the other sections' numbers
            record(section=name, error=repr(exc))
        print(f"# {name}: {time.time() - t0:.1f}s", flush=True)
        Path(args.out).write_text(json.dumps(dict(env=env, rows=RESULTS), indent=1))


if __name__ == "__main__":
    main()
