"""Shared pieces of the flashdiff benchmarks: random initialisation, timing, memory, results I/O.

Everything here works on MLX's CUDA, Metal and CPU backends; PyTorch is imported lazily (it is a
benchmark-only dependency, never needed by flashdiff itself).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

GIB = 1024**3
_T0 = time.perf_counter()


def log(msg: str):
    """Progress line with seconds since start, flushed so partial output of a killed run is useful."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def elapsed() -> float:
    return time.perf_counter() - _T0


# ---------------------------------------------------------------------------------------------
# Random weights


def _fill_value(name: str, shape: tuple, dtype, std: float, key) -> mx.array:
    """Biases 0, 1-D scales (norm gains) 1, everything else N(0, std^2), all in `dtype`."""
    if name == "bias":
        return mx.zeros(shape, dtype)
    if len(shape) == 1:
        return mx.ones(shape, dtype)
    return mx.random.normal(shape, dtype=dtype, scale=std, key=key)


def init_random_mlx(model: nn.Module, dtype=mx.bfloat16, std: float = 0.02, seed: int = 0,
                    chunk_bytes: int = 1 << 30) -> int:
    """Overwrite every floating-point parameter of `model` with random values in `dtype`.

    A freshly built MLX module only holds *lazy* initialisers, so nothing full-size in float32 is
    ever materialised: new arrays are created per module and evaluated every `chunk_bytes`, which
    bounds peak memory to the final weights plus one chunk. Returns the weight bytes.
    """
    key = mx.random.key(seed)
    pending, pending_bytes, total = [], 0, 0
    for _, module in model.named_modules():
        for name, value in list(module.items()):
            if not isinstance(value, mx.array) or not mx.issubdtype(value.dtype, mx.floating):
                continue
            key, sub = mx.random.split(key)
            new = _fill_value(name, tuple(value.shape), dtype, std, sub)
            module[name] = new
            nbytes = new.size * new.itemsize
            pending.append(new)
            pending_bytes += nbytes
            total += nbytes
            if pending_bytes >= chunk_bytes:
                mx.eval(pending)
                pending, pending_bytes = [], 0
    mx.eval(pending)
    return total


def mlx_weight_bytes(model: nn.Module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def init_random_torch(model, std: float = 0.02, seed: int = 0) -> int:
    """Same rule as init_random_mlx for a torch module, in place, in its current dtype/device."""
    import torch

    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    total = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
            total += p.numel() * p.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# Timing and memory


def time_calls(run, sync, warmup: int, iters: int) -> dict:
    """Call `run()` warmup + iters times, each followed by `sync(result)`; wall time per call."""
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        out = run()
        sync(out)
        dt = time.perf_counter() - t0
        del out
        if i == 0:
            first = dt
        if i >= warmup:
            times.append(dt)
    return {
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
        "min_s": min(times),
        "max_s": max(times),
        "first_call_s": first,
        "times_s": times,
        "warmup": warmup,
        "iters": iters,
    }


def mlx_sync(out):
    mx.eval(out)
    mx.synchronize()  # eval waits for the outputs; this also drains anything else queued on the stream


def mlx_reset_memory():
    mx.clear_cache()
    mx.reset_peak_memory()


def mlx_peak_gib() -> float:
    return mx.get_peak_memory() / GIB


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_sync_fn(device: str):
    import torch

    if device == "cuda":
        return lambda out: torch.cuda.synchronize()
    return lambda out: None


def torch_reset_memory(device: str):
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def torch_peak_gib(device: str):
    """Peak allocated GPU memory; None on CPU (torch keeps no allocator statistics there)."""
    import torch

    return torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None


def free_all():
    """Return cached memory of both frameworks to the device between measurements."""
    import gc

    gc.collect()
    mx.clear_cache()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Micro-probes: a few seconds that say where the next speed-up is (GEMM layout and size, attention layout)


def median_call(fn, iters: int, reps: int = 5, warmup: int = 2, sync=mlx_sync) -> float:
    """Median seconds of one fn() call, timing `reps` back-to-back calls per sample (reps > 1: the
    GPU queue stays full, as inside a model; reps = 1: isolated latency, host launch cost included)."""
    stats = time_calls(lambda: [fn() for _ in range(reps)], sync, warmup, iters)
    return stats["median_s"] / reps


def streamed_call(fn, calls: int = 40, samples: int = 5, warmup: int = 1) -> float:
    """Median seconds per fn() call when calls are evaluated the way a model forward evaluates its
    blocks (flashdiff.models.common.BlockStream): each result is started with mx.async_eval and the one
    before it waited for, so the host builds and encodes call i + 1 while the GPU runs call i. This is
    the GPU-bound throughput of a layer inside a model; `median_call` with reps > 1 instead queues all
    reps into one evaluation, whose host encoding the GPU waits for."""
    def run():
        previous = None
        for _ in range(calls):
            out = fn()
            mx.async_eval(out)
            if previous is not None:
                mx.eval(previous)
            previous = out
        return previous

    stats = time_calls(run, mlx_sync, warmup, samples)
    return stats["median_s"] / calls


def interleaved(fns: dict, measure, rounds: int = 3) -> dict:
    """{name: median over `rounds` of measure(fn)}, the functions measured in turn within each round
    (a, b, a, b, ...), so a drift of the machine's speed during the run (clocks, other tenants) moves
    every one of them alike instead of biasing the ratio of whichever was measured later."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(measure(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def quantize(w, mode: str, bits: int, group: int):
    """(wq, scales, biases) of ``mx.quantize`` in any mode (biases None where the mode has none: mxfp4, nvfp4,
    mxfp8)."""
    q = mx.quantize(w, group, bits, mode=mode)
    return q[0], q[1], (q[2] if len(q) > 2 else None)


def quantized_problem(spec: str, bits: int = 4, group: int = 64):
    """'MxKxN' -> (m, k, n, x, w, wq, scales, biases): bf16 x (M, K) and weight w (N, K) * 0.02, w quantized
    (affine, `bits`, `group`), all evaluated."""
    m, k, n = (int(v) for v in spec.split("x"))
    x = mx.random.normal((m, k)).astype(mx.bfloat16)
    w = (mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16)
    wq, s, b = mx.quantize(w, group, bits)
    mx.eval(x, w, wq, s, b)
    return m, k, n, x, w, wq, s, b


def prologue_problems(h: int = 24, d: int = 128):
    """The attention prologue's FLUX cases, evaluated: [(name, sources, cos, sin)] for qk_norm_rope (a double
    block's text + image streams; a single block's 4608 rows with its MLP columns after q | k | v), bf16."""
    inner, cases = h * d, []
    for name, parts in (("double block 512+4096", [(512, 3 * inner), (4096, 3 * inner)]),
                        ("single block 4608 (+MLP columns)", [(4608, 3 * inner + 4 * 3072)])):
        sources = [(mx.random.normal((1, length, cols)).astype(mx.bfloat16),
                    (1 + 0.1 * mx.random.normal((d,))).astype(mx.bfloat16),
                    (1 + 0.1 * mx.random.normal((d,))).astype(mx.bfloat16)) for length, cols in parts]
        ang = mx.random.uniform(0, 30, (sum(p[0] for p in parts), d // 2))
        cos, sin = mx.cos(ang), mx.sin(ang)
        mx.eval(sources, cos, sin)
        cases.append((name, sources, cos, sin))
    return cases


def moe_problem(t: int = 4096, k: int = 2560, n: int = 6912, e: int = 4, top_k: int = 2):
    """HiDream-shaped MoE inputs in bf16, evaluated: x (T, K); experts w (E, N, K); ids, a random
    top-k routing; skew, every token to expert 0 + one other; dense_x (T*top_k, K) for the dense GEMM
    of the same FLOPs; w0, a contiguous copy of expert 0 (MLX's GEMM on the slice w[0] measured
    20-30% slower on CUDA); flop, the routed FLOPs."""
    x = mx.random.normal((t, k)).astype(mx.bfloat16)
    w = (mx.random.normal((e, n, k)) * 0.02).astype(mx.bfloat16)
    ids = mx.argsort(mx.random.uniform(shape=(t, e)), axis=-1)[:, :top_k].astype(mx.int32)
    skew = mx.concatenate([mx.zeros((t, 1), mx.int32), mx.random.randint(1, e, (t, 1)).astype(mx.int32)], axis=1)
    dense_x = mx.random.normal((t * top_k, k)).astype(mx.bfloat16)
    w0 = mx.contiguous(w[0])
    mx.eval(x, w, ids, skew, dense_x, w0)
    return dict(t=t, k=k, n=n, e=e, top_k=top_k, x=x, w=w, ids=ids, skew=skew, dense_x=dense_x, w0=w0,
                flop=2 * t * top_k * k * n)


def gemm_probe(m: int, k: int, dtype, iters: int) -> dict:
    """(m, k) @ (k, n) for the FLUX projection widths n = k, 3k, 4k, 7k (q / fused qkv / MLP / fused
    qkv+MLP), in three forms: nn.Linear (weight (n, k), bias epilogue), the same without bias, and a
    pre-transposed (k, n) weight. Reports seconds and TFLOP/s per form."""
    out = {"m": m, "k": k, "dtype": str(dtype), "shapes": {}}
    keys = mx.random.split(mx.random.key(7), 3)
    x = mx.random.normal((m, k), key=keys[0]).astype(dtype)
    for n in (k, 3 * k, 4 * k, 7 * k):
        w = (mx.random.normal((n, k), key=keys[1]) * 0.02).astype(dtype)
        wt = mx.contiguous(w.T)
        b = mx.zeros((n,), dtype)
        mx.eval(x, w, wt, b)
        flop = 2 * m * k * n
        row = {}
        for form, fn in (("linear", lambda: mx.addmm(b, x, w.T)), ("no_bias", lambda: x @ w.T), ("pretransposed", lambda: x @ wt)):
            t = median_call(fn, iters)
            row[f"{form}_s"], row[f"{form}_tflops"] = t, flop / t / 1e12
        out["shapes"][f"{m}x{k}->{n}"] = row
    mx.clear_cache()
    return out


def sdpa_layout_probe(heads: int, length: int, head_dim: int, dtype, iters: int) -> dict:
    """Attention from a fused (1, L, 3*H*Dh) q/k/v projection to the (1, L, H*Dh) output through
    flashdiff.models.common.joint_attention (q/k RMSNorm + RoPE prologue, attention), with the fused
    prologue kernel (default) and with the plain-MLX prologue; plus SDPA alone on ready q/k/v."""
    from flashdiff.kernels import qk_norm_rope_reference
    from flashdiff.models import common

    keys = mx.random.split(mx.random.key(8), 4)
    t = mx.random.normal((1, length, 3 * heads * head_dim), key=keys[0]).astype(dtype)
    norm_q, norm_k = nn.RMSNorm(head_dim, eps=1e-6), nn.RMSNorm(head_dim, eps=1e-6)
    norm_q.weight, norm_k.weight = norm_q.weight.astype(dtype), norm_k.weight.astype(dtype)
    q, k, v = (mx.random.normal((1, heads, length, head_dim), key=kk).astype(dtype) for kk in keys[1:])
    ang = mx.arange(length, dtype=mx.float32)[:, None] * mx.ones((1, head_dim // 2))
    cos, sin = mx.cos(ang), mx.sin(ang)
    mx.eval(t, q, k, v, cos, sin, norm_q.parameters(), norm_k.parameters())
    flop = 4 * length * length * head_dim * heads
    out = {"heads": heads, "length": length, "head_dim": head_dim}
    fused = common.qk_norm_rope

    def run(hm, prologue):
        common.qk_norm_rope = prologue
        try:
            return common.joint_attention([(t, norm_q, norm_k)], heads, head_dim, cos, sin, head_dim**-0.5,
                                          head_major_rope=hm)
        finally:
            common.qk_norm_rope = fused

    variants = (("sdpa_only", lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=head_dim**-0.5)),
                ("fused_prologue", lambda: run(False, fused)),
                ("fused_prologue_head_major", lambda: run(True, fused)),
                ("mlx_prologue", lambda: run(False, qk_norm_rope_reference)))
    for name, fn in variants:
        tm = median_call(fn, iters)
        out[f"{name}_s"], out[f"{name}_tflops"] = tm, flop / tm / 1e12
    return out


# ---------------------------------------------------------------------------------------------
# Environment and results


def environment(argv: list[str]) -> dict:
    env = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(_quote(a) for a in argv),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mlx_version": mx.__version__,
        "mlx_device": str(mx.default_device()),
        # settings that change which kernels run and how MLX launches them (FLASHDIFF_*, MLX_USE_CUDA_GRAPHS, ...)
        "settings": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("FLASHDIFF_", "MLX_"))},
    }
    try:
        env["mlx_device_info"] = {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))}
    except Exception as e:  # device_info is missing on some backends/versions
        env["mlx_device_info"] = {"error": str(e)}
    try:
        import torch

        env["torch_version"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["torch_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception as e:
        env["torch_version"] = f"unavailable ({e})"
    try:
        import diffusers

        env["diffusers_version"] = diffusers.__version__
    except Exception as e:
        env["diffusers_version"] = f"unavailable ({e})"
    name = env.get("torch_device") if env.get("torch_device") not in (None, "cpu") else None
    env["device"] = name or env["mlx_device_info"].get("device_name") or platform.processor() or "unknown"
    return env


def _quote(a: str) -> str:
    return a if a and all(c.isalnum() or c in "-_=.,/:+@" for c in a) else json.dumps(a)


def measure(results: dict, key: str, fn, skip: bool = False, reason: str = ""):
    """Run one measurement; store its dict (plus ok / error) under results[key]. Never raises."""
    if skip:
        results[key] = {"ok": False, "skipped": True, "error": reason}
        log(f"  {key}: skipped ({reason})")
        return results[key]
    log(f"  {key}: running")
    t0 = time.perf_counter()
    try:
        out = fn()
        out = {"ok": True, **out}
        msg = ", ".join(f"{k} {v:.4g}" for k, v in out.items() if k in ("median_s", "total_s", "peak_memory_gib")
                        and isinstance(v, float))
    except BaseException as e:  # OOM, compile failures, KeyboardInterrupt of one measurement...
        if isinstance(e, KeyboardInterrupt):
            raise
        out = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
               "traceback": traceback.format_exc(limit=6)[-3000:]}
        msg = f"FAILED {out['error'][:300]}"
    out["wall_s"] = time.perf_counter() - t0
    results[key] = out
    log(f"  {key}: {msg} ({out['wall_s']:.1f}s)")
    free_all()
    return out


def write_text_atomic(path: Path, text: str):
    """Write through a temporary file and a rename: a reader (or a stopped run) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: dict):
    write_text_atomic(path, json.dumps(_clean(data), indent=1, allow_nan=False) + "\n")


def print_table(columns: dict, rows: list):
    """A markdown table on stdout: one column per (header, function of a row giving its cell) in `columns`."""
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for r in rows:
        print("| " + " | ".join(str(cell(r)) for cell in columns.values()) + " |")


def record_row(rows: list, row: dict, out: str):
    """A probe's result row: appended to `rows`, printed, and (with `out`) every row so far written to that JSON with
    the command and device, so a run stopped by its time limit keeps what it measured."""
    rows.append(row)
    print(row, flush=True)
    if out:
        write_json(Path(out), dict(command=" ".join(sys.argv), device=str(mx.default_device()), rows=rows))


def _clean(o):
    """JSON-safe copy: non-finite floats -> None, tuples -> lists, anything else odd -> str."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if o is None or isinstance(o, (bool, int, str)):
        return o
    return str(o)


def replace_between_markers(text: str, start: str, end: str, body: str) -> str:
    """Replace what lies between the marker lines (markers kept); append the block if absent."""
    block = f"{start}\n{body.rstrip()}\n{end}"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < 0 or j < i:
        return text.rstrip() + "\n\n" + block + "\n"
    return text[:i] + block + text[j + len(end):]


# ---------------------------------------------------------------------------------------------
# README table

TABLE_START = "<!-- models-table:start -->"
TABLE_END = "<!-- models-table:end -->"
_LABELS = {"flashdiff-bf16": "flashdiff bf16", "flashdiff-bf16-compiled": "flashdiff bf16 + mx.compile",
           "flashdiff-8bit": "flashdiff 8-bit", "flashdiff-8bit-compiled": "flashdiff 8-bit + mx.compile",
           "flashdiff-4bit": "flashdiff 4-bit", "flashdiff-4bit-compiled": "flashdiff 4-bit + mx.compile",
           "diffusers-eager": "diffusers eager", "diffusers-compile": "diffusers torch.compile",
           "flashdiff-bf16-modulation": "flashdiff bf16: modulation Linears only"}
_SETTING_LABELS = {"unfused": "unfused", "fused": "fused qkv", "fused-hm": "fused qkv, head-major RoPE"}
_FLASHDIFF_KEY = re.compile(r"flashdiff-(bf16|\d+bit)(?:-(unfused|fused|fused-hm))?(-compiled|-stream|-blocks)?")
_MODE_LABELS = {"-compiled": " + mx.compile", "-stream": " + block streaming",
                "-blocks": " + per-block compile & streaming"}


def _label(key: str, run: dict) -> str:
    """'flashdiff bf16 (fused qkv) + mx.compile'; quantized runs name the bf16 setting they used."""
    m = _FLASHDIFF_KEY.fullmatch(key)
    if not m or (m.group(2) is None and not run.get("setting")):
        return _LABELS.get(key, key)
    prec = "bf16" if m.group(1) == "bf16" else f"{m.group(1)[:-3]}-bit"
    setting = m.group(2) or run.get("setting")
    return f"flashdiff {prec} ({_SETTING_LABELS.get(setting, setting)})" + _MODE_LABELS.get(m.group(3) or "", "")


def _order(runs: dict) -> list:
    """Table order: bf16 settings, modulation probe, quantized, diffusers; unknown keys last."""
    settings = list(_SETTING_LABELS)

    def rank(k):
        m = _FLASHDIFF_KEY.fullmatch(k)
        if m:
            st = settings.index(m.group(2)) if m.group(2) in settings else -1
            return (0 if m.group(1) == "bf16" else 2, f"{m.group(1)}{st:02d}", k)
        return (1, "", k) if k == "flashdiff-bf16-modulation" else (3 if k.startswith("diffusers") else 4, "", k)
    return sorted(runs, key=rank)


def _t(run):
    return run["median_s"] if run and run.get("ok") and run.get("median_s") else None


def _x(a, b):
    return f"{a / b:.2f}×" if a and b else "—"


def _f(v, fmt="{:.3f}"):
    return fmt.format(v) if isinstance(v, (int, float)) else "—"


def _bf16_ref(runs, key, run=None):
    """The flashdiff bf16 run that `key` is compared with, in the same mode (eager / compiled): for a bf16
    setting the unfused baseline, for a quantized run (or the modulation probe) bf16 with its setting."""
    mode = next((sfx for sfx in ("-compiled", "-blocks") if key.endswith(sfx)), "")
    m = _FLASHDIFF_KEY.fullmatch(key)
    setting = (run or {}).get("setting")
    if m and m.group(1) == "bf16" and m.group(2):
        ref = "unfused"
    else:
        ref = setting
    if ref and f"flashdiff-bf16-{ref}{mode}" in runs:
        return runs[f"flashdiff-bf16-{ref}{mode}"]
    return runs.get(f"flashdiff-bf16{mode}")  # results from before the settings existed


def render_table(data: dict, json_path=None) -> str:
    meta = data.get("meta", {})
    res = meta.get("resolution", 1024)
    lines = [
        f"Measured {meta.get('date', '?')} on **{meta.get('device', '?')}** — MLX {meta.get('mlx_version', '?')}, "
        f"PyTorch {meta.get('torch_version', '?')}, diffusers {meta.get('diffusers_version', '?')}; "
        f"{meta.get('dtype', 'bfloat16')}, {res}×{res}, median of {meta.get('iters', '?')} forwards after "
        f"{meta.get('warmup', '?')} warm-up{' (TINY test configs, not real numbers)' if meta.get('tiny') else ''}.",
        "",
        "Command" + ("s" if len(meta.get("commands", [])) > 1 else "") + ": "
        + "; ".join(f"`{c}`" for c in meta.get("commands", [meta.get("command", "?")])),
    ]
    if json_path:
        lines += ["", f"Raw results: `{Path(json_path).as_posix()}`"]
    lines += ["", "#### Per-step transformer latency and peak memory", "",
              "| model | implementation | s / step | × diffusers compile | × flashdiff bf16 ref (same mode) | peak GiB | weights GiB |",
              "|---|---|---:|---:|---:|---:|---:|"]
    targets = []
    for name, entry in data.get("models", {}).items():
        runs = entry.get("runs", {})
        compile_t = _t(runs.get("diffusers-compile"))
        for key in _order(runs):
            run = runs[key]
            label = _label(key, run)
            if not run.get("ok"):
                why = "skipped" if run.get("skipped") else "failed"
                err = str(run.get("error", "")).replace("|", "/").replace("\n", " ")[:120]
                lines.append(f"| {name} | {label} | {why}: {err} | | | | |")
                continue
            t = _t(run)
            ref = _bf16_ref(runs, key, run) if key.startswith("flashdiff") else None
            vs_bf16 = _x(t, _t(ref)) if ref is not run else "1.00×"
            lines.append(f"| {name} | {label} | {_f(t, '{:.4f}')} | {_x(t, compile_t)} | {vs_bf16} | "
                         f"{_f(run.get('peak_memory_gib'), '{:.2f}')} | {_f(run.get('weights_gib'), '{:.2f}')} |")
        targets += _targets(name, runs)
    e2e = data.get("e2e", {})
    if e2e:
        sizes = "TINY random components" if meta.get("tiny") else "random CLIP-L, T5-XXL and VAE at full size"
        lines += ["", f"#### End to end: FLUX.1-schnell, 4 steps, one {res}×{res} image ({sizes})", "",
                  "| precision | text encoders s | 4 transformer steps s | VAE decode s | total s | total s (first call) "
                  "| peak GiB | largest component GiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for key, run in e2e.items():
            if not run.get("ok"):
                err = str(run.get("error", "")).replace("|", "/").replace("\n", " ")[:120]
                lines.append(f"| {key} | {'skipped' if run.get('skipped') else 'failed'}: {err} | | | | | | |")
                continue
            st = run.get("stages_s", {})
            lines.append(f"| {key} | {_f(st.get('text_encoders'))} | {_f(st.get('transformer'))} | {_f(st.get('vae'))} | "
                         f"{_f(run.get('total_s'))} | {_f(run.get('first_call_total_s'))} | "
                         f"{_f(run.get('peak_memory_gib'), '{:.2f}')} | {_f(run.get('largest_component_gib'), '{:.2f}')} |")
            peak, big = run.get("peak_memory_gib"), run.get("largest_component_gib")
            if peak and big:
                targets.append(("flux-schnell e2e", f"{key} peak ≤ 1.15× largest component", f"{peak / big:.2f}×",
                                "yes" if peak / big <= 1.15 else "no"))
            if key == "4bit":
                peak = run.get("peak_memory_gib")
                targets.append(("flux-schnell e2e", "4-bit end-to-end peak ≤ 9 GiB", f"{_f(peak, '{:.2f}')} GiB",
                                "yes" if peak is not None and peak <= 9 else "no"))
        method = next((r.get("method") for r in e2e.values() if r.get("method")), None)
        if method:
            lines += ["", f"End-to-end method: {method}"]
    lines += render_probes(data.get("probes", {}))
    if targets:
        lines += ["", "#### Issue 4 targets", "", "| model | target | measured | met |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in targets]
    return "\n".join(lines)


def _targets(name, runs):
    out = []
    comp = _t(runs.get("diffusers-compile"))
    best = [(_t(r), k) for k, r in runs.items() if (m := _FLASHDIFF_KEY.fullmatch(k)) and m.group(1) == "bf16" and _t(r)]
    if comp and best:
        v, k = min(best)
        out.append((name, "flashdiff bf16 ≤ 1.0× diffusers torch.compile (stretch 0.9×)",
                    f"{v / comp:.2f}× ({_label(k, runs[k])})", "yes" if v / comp <= 1.0 else "no"))
    for bits, target in (("8bit", 1.05), ("4bit", 1.1)):
        parts, oks = [], []
        for mode in ("", "-compiled", "-stream", "-blocks"):
            key = f"flashdiff-{bits}{mode}"
            a, b = _t(runs.get(key)), _t(_bf16_ref(runs, key, runs.get(key)))
            if a and b:
                parts.append(f"{mode.strip('-') or 'eager'} {a / b:.2f}×")
                oks.append((mode or "eager", a / b <= target))
        if oks:
            met = [m.strip("-") for m, ok in oks if ok]
            verdict = "yes" if len(met) == len(oks) else ("no" if not met else f"{' & '.join(met)} only")
            out.append((name, f"flashdiff {bits[0]}-bit ≤ {target}× flashdiff bf16 (same setting)", ", ".join(parts), verdict))
    for prec in ("bf16", "8bit", "4bit"):
        ratios = {k: r["peak_memory_gib"] / r["weights_gib"] for k, r in runs.items()
                  if (m := _FLASHDIFF_KEY.fullmatch(k)) and m.group(1) == prec
                  and r.get("ok") and r.get("peak_memory_gib") and r.get("weights_gib")}
        if not ratios:
            continue
        worst = f"{max(ratios.values()):.2f}× worst variant"
        blocks = [v for k, v in ratios.items() if k.endswith("-blocks")]
        if blocks:  # the pipelines' GPU mode decides the verdict
            out.append((name, f"flashdiff {prec} peak ≤ 1.15× weights (pipeline mode: per-block compile & streaming)",
                        f"{min(blocks):.2f}× ({worst})", "yes" if min(blocks) <= 1.15 else "no"))
        else:
            out.append((name, f"flashdiff {prec} peak ≤ 1.15× weights", worst,
                        "yes" if max(ratios.values()) <= 1.15 else "no"))
    return out


def render_probes(probes: dict) -> list:
    """Markdown lines for the GEMM / attention layout probes (empty if none ran)."""
    lines = []
    gemm, sdpa = probes.get("gemm", {}), probes.get("sdpa", {})
    if gemm.get("ok"):
        lines += ["", f"#### Probe: GEMM forms ({gemm['m']} tokens × {gemm['k']} in, TFLOP/s)", "",
                  "| out features | nn.Linear (bias epilogue) | no bias | pre-transposed weight |", "|---:|---:|---:|---:|"]
        for shape, r in gemm["shapes"].items():
            lines.append(f"| {shape.split('->')[1]} | {r['linear_tflops']:.4g} | {r['no_bias_tflops']:.4g} | "
                         f"{r['pretransposed_tflops']:.4g} |")
        rows = list(gemm["shapes"].values())
        if len(rows) >= 2:
            lines += ["", f"3 separate q/k/v Linears {3 * rows[0]['linear_s'] * 1e3:.3f} ms vs one fused "
                          f"{rows[1]['linear_s'] * 1e3:.3f} ms."]
    if sdpa.get("ok"):
        lines += ["", f"#### Probe: RoPE + attention layout ({sdpa['heads']} heads × {sdpa['length']} tokens × "
                      f"{sdpa['head_dim']}, output as (B, L, H·D))", "",
                  _sdpa_probe_line(sdpa)]
    return lines


def _sdpa_probe_line(sdpa: dict) -> str:
    if "fused_prologue_s" not in sdpa:  # results written before the fused prologue kernel
        return (f"RoPE then transposed views: {sdpa['rope_then_views_s'] * 1e3:.3f} ms; "
                f"transpose then RoPE (contiguous): {sdpa['transpose_then_rope_s'] * 1e3:.3f} ms.")
    return (f"SDPA alone {sdpa['sdpa_only_s'] * 1e3:.3f} ms; q/k norm + RoPE + attention with the fused "
            f"prologue kernel {sdpa['fused_prologue_s'] * 1e3:.3f} ms (head-major "
            f"{sdpa['fused_prologue_head_major_s'] * 1e3:.3f} ms), with plain MLX ops "
            f"{sdpa['mlx_prologue_s'] * 1e3:.3f} ms.")


def update_readme(readme, data: dict, json_path=None):
    """Regenerate the table between TABLE_START / TABLE_END in `readme` (created if missing)."""
    readme = Path(readme)
    text = readme.read_text() if readme.exists() else "# flashdiff benchmarks\n"
    readme.write_text(replace_between_markers(text, TABLE_START, TABLE_END, render_table(data, json_path)))
