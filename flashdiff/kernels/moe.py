"""Mixture-of-Experts GEMM: every token's routed slots multiplied by their expert's weight.

``moe_gemm(x, expert_weights, expert_ids)``: y[t, j] = x[t] @ W[expert_ids[t, j]].T

CUDA path, no host synchronisation and static shapes: a layout kernel groups the routed rows (t, j)
by expert into 128-row tiles (each expert's segment padded to whole tiles; at most
(R + E * 127) / 128 tiles for R routed rows) and writes each tile's expert; one grouped tensor-core
GEMM (``_gemm_cuda``: on sm_90 the persistent wgmma GEMM fed by TMA from the routed rows gathered into
slot order, mma.sync elsewhere) then multiplies only the routed rows and writes each result straight into
its (t, j) row. Since session 12 the layout kernel's launch (``_moe_layout.moe_prologue``) also
- gathers x's routed rows into slot order and encodes the GEMM's tensor maps, each layout block copying the
  rows it placed (for the TMA engines; FLASHDIFF_MOE_GATHER=kernel: a gather kernel after the layout);
- dequantizes quantized experts into one x.dtype scratch of all experts (E*N*K, 141 MB for HiDream's
  4 x 6912 x 2560; any mode; after x exists) in blocks after the layout's (FLASHDIFF_GEMM_DEQUANT=separate: the
  dequantize kernel on its own first; =fused, opt-in, sm_90, affine 4/8-bit with scales in x.dtype: the
  persistent GEMM's storer warps dequantize them while it runs, ``_gemm_tma_dequant_persistent``, exact, slower).
Measured on the H200 (benchmarks/README.md, session 12), compiled and streamed against a dense GEMM of the
routed FLOPs, each ratio side by side in one run: 4-bit experts 0.82-0.83x and 8-bit 0.82-0.84x in two runs
(with the gather as its own kernel 0.79-0.81x / 0.78-0.79x; with the dequantize kernel on its own first
0.77-0.78x / 0.76-0.77x, as with all three kernels apart in two earlier runs, 0.77x); bf16 0.87-0.88x (with the
gather kernel 0.87-0.89x: no difference; skewed routing 0.86-0.87x). Nsight Compute: the layout + gather launch
23.5-24.3 us (layout 6.8 us + gather 19 us apart), with the dequantization 62.6-64.3 us (46 + 19 us apart), the
GEMM 403-418 us against 364-375 us for cuBLAS's dense GEMM.
Those ratios time one moe_gemm per evaluation. Inside a block's CUDA graph (MLX adds an edge only where a kernel
reads or writes a buffer an earlier kernel wrote; see qgemm.py) the separate dequantize kernel reads only the
experts and may run beside the kernels before it, while the one-launch prologue waits for the router's ids.
benchmarks/in_graph.py timed HiDream's whole MoE feed-forward both ways in session 14: within 0.2-1.6% of each
other (4-bit routed part 0.73x of plain GEMMs both ways, 8-bit 0.77x / 0.76x; bf16 0.83x), so the default stays.

On Metal (default): ``moe_sorted``, MLX's own tested kernels as mlx-lm uses them for MoE on Apple
silicon: rows sorted by expert, ``mx.gather_mm`` / ``mx.gather_qmm(..., sorted_indices=True)`` over
the segments (quantized experts are never dequantized into a copy). Not measured here (no Apple GPU).
With backend="metal" / FLASHDIFF_KERNELS=metal: our Metal kernels (never run on Apple hardware):
the Metal dequantize kernel for quantized experts, then ``grouped_layout`` (MLX ops, 64-slot tiles)
+ the Metal twin of the grouped GEMM (``_gemm_metal``).
Elsewhere (CUDA with unsupported shapes/dtypes) every expert runs as one dense GEMM over all rows and
each slot keeps its expert's rows (``mx.where``): E/top_k times the routed FLOPs (0.23x on the H200).
Measured and rejected on the H200 (MLX 0.32.4; benchmarks/results/kernels-h200-run5.json, -run6.json,
explore-2026-11-28-h200.json):
- all experts as one GEMM against the weights stacked along N + one ``take_along_axis``: 0.27x
  (MLX's CUDA gather over the (T, E, N) output costs as much as the GEMM);
- rows sorted by expert into padded windows + ``mx.gather_mm`` (``moe_windowed``, 1.06x the routed
  FLOPs): 0.23-0.32x; MLX's CUDA gather_mm kernel runs at 0.5x of the dense GEMM even unrouted;
- sort + ``mx.gather_mm(..., sorted_indices=True)`` (``moe_sorted``): 0.27x, and wrong results in
  tests/test_kernels_cuda.py on CUDA.
The reference (CPU and test oracle) is a readable per-expert loop with ``mx.dequantize``;
``grouped_layout`` / ``grouped_gemm_reference`` are the MLX twins of the two CUDA kernels.
"""

import functools
import os

import mlx.core as mx

from . import _gemm_cuda, _gemm_metal, _moe_layout
from ._dequant import check_quantized, dequantize
from ._dispatch import metal_kernels_requested, resolve_backend


def moe_gemm(x, expert_weights, expert_ids, *, scales=None, biases=None, bits=None, group_size=None,
             mode="affine", backend=None):
    """Grouped GEMM over experts.

    x: (T, K) (the same input for every routed slot) or (T, k, K) (one input per slot).
    expert_weights: (E, N, K) float in nn.Linear layout, or quantized by ``mx.quantize`` as
      (E, N, K*bits/32) uint32 with ``scales``/``biases`` (E, N, K/group_size).
    expert_ids: (T, k) integer expert index per token and slot, values in [0, E) (not checked on the
      device: checking would need a host synchronisation).
    Returns (T, k, N) in x.dtype.
    """
    quantized = scales is not None
    if quantized:
        bits, group_size, n, k_in = check_quantized(expert_weights, scales, biases, bits, group_size, mode)
    else:
        if not mx.issubdtype(expert_weights.dtype, mx.floating):
            raise TypeError(
                f"expert_weights has dtype {expert_weights.dtype}: pass scales= (and biases=) for "
                "quantized experts, or float weights."
            )
        n, k_in = expert_weights.shape[-2:]
    if expert_weights.ndim != 3:
        raise ValueError(f"expert_weights must be (E, N, K) (or its packed form), got {expert_weights.shape}.")
    if expert_ids.ndim != 2 or not mx.issubdtype(expert_ids.dtype, mx.integer):
        raise ValueError(f"expert_ids must be an integer (T, k) array, got {expert_ids.shape} {expert_ids.dtype}.")
    t, top_k = expert_ids.shape
    if not mx.issubdtype(x.dtype, mx.floating):
        raise TypeError(f"x must be a float array, got {x.dtype}.")
    if x.shape[-1] != k_in or x.shape[0] != t or x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[1] != top_k):
        raise ValueError(
            f"x {x.shape} must be (T={t}, K={k_in}) or (T={t}, k={top_k}, K={k_in}) to match "
            f"expert_ids {expert_ids.shape} and experts {expert_weights.shape}."
        )
    impl = resolve_backend(backend)
    if impl == "reference":
        return _moe_reference(x, expert_weights, expert_ids, scales, biases, bits, group_size, mode)
    if impl == "metal" and not metal_kernels_requested(backend):  # MLX's own MoE kernels
        w = expert_weights if quantized else expert_weights.astype(x.dtype)
        return moe_sorted(x, w, expert_ids, scales, biases, bits, group_size, mode)

    w = expert_weights
    if (quantized and impl == "cuda" and w.shape[0] <= _moe_layout.MAX_EXPERTS
            and _gemm_cuda.quantized_gemm_available(x, scales, bits, group_size, mode, k_in, n)):
        gemm = functools.partial(_gemm_cuda.grouped_gemm_quantized, scales=scales, biases=biases, bits=bits,
                                 group_size=group_size)
        return moe_grouped(x, w, expert_ids, gemm)  # the experts dequantized inside the GEMM
    # CUDA, session 12: the layout kernel's launch also dequantizes the experts and / or gathers x's routed rows
    prologue = (impl == "cuda" and w.shape[0] <= _moe_layout.MAX_EXPERTS and x.dtype in (mx.bfloat16, mx.float16)
                and k_in % 8 == 0 and n % 8 == 0 and expert_ids.size > 0)
    dequant_in_layout = (prologue and quantized and _gemm_cuda.dequant_choice() == "merged"
                         and not os.environ.get("FLASHDIFF_DEQUANT_ROWS"))
    gather_in_layout = prologue and _moe_layout.gather_in_layout()
    if dequant_in_layout:
        return _moe_cuda_prologue(x, w, expert_ids, gather_in_layout, (scales, biases, bits, group_size, k_in, mode))
    if gather_in_layout:
        if quantized:  # FLASHDIFF_GEMM_DEQUANT=separate
            w = dequantize(mx.depends(w, x), scales, biases, bits, group_size, mode, dtype=x.dtype, backend=impl)
        return _moe_cuda_prologue(x, w.astype(x.dtype), expert_ids, True, None)
    if quantized:
        w = dequantize(mx.depends(w, x), scales, biases, bits, group_size, mode, dtype=x.dtype, backend=impl)
    w = w.astype(x.dtype)
    if impl == "cuda" and _gemm_cuda.supported(x, w) and w.shape[0] <= _moe_layout.MAX_EXPERTS:
        return moe_grouped(x, w, expert_ids)
    if impl == "metal" and _gemm_metal.supported(x, w):  # asked for explicitly: never run on Apple hardware
        return moe_grouped(x, w, expert_ids, _gemm_metal.grouped_gemm,
                           functools.partial(grouped_layout, tile=_gemm_metal.BM))
    return _moe_dense_experts(x, w, expert_ids)


def _moe_cuda_prologue(x, w, expert_ids, gather, quantized):
    """``moe_grouped`` with ``_moe_layout.moe_prologue`` first: the layout, with (`gather`: the GEMM engine reads
    gathered rows, ``_moe_layout.gather_in_layout``) x's routed rows gathered and the GEMM's tensor maps, and with
    quantized = (scales, biases, bits, group_size, K, mode) w's experts dequantized, all in one launch."""
    t, top_k = expert_ids.shape
    n, k_in = w.shape[-2], x.shape[-1]
    rows = x if x.ndim == 2 else x.reshape(t * top_k, k_in)
    a_div = top_k if x.ndim == 2 else 1
    quant = None
    if quantized is not None:
        scales, biases, bits, group_size, k, mode = quantized
        quant = (mx.depends(w, x), scales, biases, bits, group_size, k, mode, x.dtype)
    slot_row, tile_expert, xs, maps, w = _moe_layout.moe_prologue(
        expert_ids, w.shape[0], x=rows if gather else None, a_div=a_div, w=None if quantized else w, quantized=quant)
    out = _gemm_cuda.grouped_gemm(xs if gather else rows, w, slot_row, tile_expert, t * top_k, a_div, gathered_maps=maps)
    return out.reshape(t, top_k, n)


def grouped_layout(expert_ids, num_experts: int, tile: int = _gemm_cuda.BM):
    """Device-side schedule of a grouped GEMM (no host sync, static shapes).

    The routed rows r = t * k + j are sorted by expert into padded slots: each expert's segment
    starts on a tile boundary and spans whole tiles. Returns
      slot_row (tiles * tile,) int32: the routed row in each slot, -1 for padding;
      tile_expert (tiles,) int32: each tile's expert, -1 for tiles past the last segment.
    tiles = (R + E * (tile - 1)) // tile bounds the tiles in use for any routing.
    """
    t, top_k = expert_ids.shape
    r, e = t * top_k, num_experts
    flat = expert_ids.reshape(-1).astype(mx.int32)
    onehot = (flat[:, None] == mx.arange(e, dtype=mx.int32)[None, :]).astype(mx.int32)  # (R, E)
    padded = (onehot.sum(0) + tile - 1) // tile * tile
    seg_end = mx.cumsum(padded)
    rank = mx.take_along_axis(mx.cumsum(onehot, axis=0), flat[:, None], axis=1)[:, 0] - 1
    pos = (seg_end - padded)[flat] + rank
    tiles = (r + e * (tile - 1)) // tile
    slot_row = mx.full((tiles * tile,), -1, dtype=mx.int32)
    slot_row[pos] = mx.arange(r, dtype=mx.int32)
    starts = mx.arange(tiles, dtype=mx.int32) * tile
    tile_expert = (seg_end[None, :] <= starts[:, None]).astype(mx.int32).sum(1)
    return slot_row, mx.where(tile_expert < e, tile_expert, -1)


def moe_grouped(x, w, expert_ids, gemm=None, layout=None):
    """Routed rows only: a device-side layout + one grouped GEMM that writes each routed row in place.
    gemm / layout: the CUDA kernels (default) or their MLX twins ``grouped_gemm_reference`` /
    ``grouped_layout`` (CPU tests of the schedule)."""
    gemm = gemm or _gemm_cuda.grouped_gemm
    layout = layout or _moe_layout.layout
    t, top_k = expert_ids.shape
    n, k_in = w.shape[-2], x.shape[-1]  # (w may be packed codes)
    if t * top_k == 0:
        return mx.zeros((t, top_k, n), dtype=x.dtype)
    slot_row, tile_expert = layout(expert_ids, w.shape[0])
    rows = x if x.ndim == 2 else x.reshape(t * top_k, k_in)
    out = gemm(rows, w, slot_row, tile_expert, t * top_k, top_k if x.ndim == 2 else 1)
    return out.reshape(t, top_k, n)


def grouped_gemm_reference(x, w, slot_row, tile_expert, out_rows, a_div=1):
    """What the CUDA grouped GEMM computes, in MLX ops."""
    tile = slot_row.shape[0] // tile_expert.shape[0]
    slot_expert = mx.repeat(tile_expert, tile)
    valid = (slot_row >= 0) & (slot_expert >= 0)
    xs = x[mx.maximum(slot_row, 0) // a_div]
    ys = mx.zeros((slot_row.shape[0], w.shape[1]), dtype=x.dtype)
    for e in range(w.shape[0]):
        ys = mx.where((valid & (slot_expert == e))[:, None], xs @ w[e].T, ys)
    out = mx.zeros((out_rows + 1, w.shape[1]), dtype=x.dtype)
    out[mx.where(valid, slot_row, out_rows)] = ys  # invalid slots land on a spare row
    return out[:out_rows]


def _moe_dense_experts(x, w, expert_ids):
    """Every expert as one dense GEMM over all rows; each (token, slot) keeps its expert's row."""
    t, top_k = expert_ids.shape
    xs = x[:, None, :] if x.ndim == 2 else x
    out = None
    for e in range(w.shape[0]):
        y = mx.broadcast_to(xs @ w[e].T, (t, top_k, w.shape[1]))
        out = y if out is None else mx.where((expert_ids == e)[..., None], y, out)
    return out


def moe_sorted(x, w, expert_ids, scales=None, biases=None, bits=None, group_size=None, mode="affine"):
    """Sort (token, slot) rows by expert, one ``mx.gather_mm`` over the segments (``mx.gather_qmm`` on
    quantized experts: no dequantized copy), un-sort; no host sync. MLX's own MoE path (mlx-lm's
    SwitchLinear does the same): the Metal dispatch. On CUDA (MLX 0.32.4) slower than dense and wrong
    in tests/test_kernels_cuda.py (see the module docstring)."""
    t, top_k = expert_ids.shape
    n, k_in = w.shape[-2], x.shape[-1]
    flat = expert_ids.reshape(-1)
    order = mx.argsort(flat)
    rows = x[order // top_k] if x.ndim == 2 else x.reshape(t * top_k, k_in)[order]
    if scales is None:
        y = mx.gather_mm(rows[:, None, :], w.swapaxes(-1, -2), rhs_indices=flat[order], sorted_indices=True)
    else:
        y = mx.gather_qmm(rows[:, None, :], w, scales, biases, rhs_indices=flat[order], transpose=True,
                          group_size=group_size, bits=bits, mode=mode, sorted_indices=True)
    y = y.reshape(t * top_k, n)[mx.argsort(order)]
    return y.reshape(t, top_k, n)


def moe_windowed(x, w, expert_ids, window: int = 128):
    """Grouped GEMM with static shapes and no host sync: the (token, slot) rows are sorted by expert
    into a padded layout where each expert's segment is a whole number of `window`-row windows; one
    ``mx.gather_mm`` multiplies every window by its expert's weight; the rows are gathered back.

    Rows computed: at most T*k + E*(window-1) (HiDream, 8192 routed rows, window 128: 1.06x the
    routed FLOPs) instead of E/k times them. w: (E, N, K) float.
    """
    t, top_k = expert_ids.shape
    e, n, k_in = w.shape
    r = t * top_k
    flat = expert_ids.reshape(-1).astype(mx.int32)
    onehot = (flat[:, None] == mx.arange(e, dtype=mx.int32)[None, :]).astype(mx.int32)  # (R, E)
    padded = (onehot.sum(0) + window - 1) // window * window
    seg_end = mx.cumsum(padded)
    rank = mx.take_along_axis(mx.cumsum(onehot, axis=0), flat[:, None], axis=1)[:, 0] - 1
    pos = (seg_end - padded)[flat] + rank  # each row's place in the padded layout
    n_win = (r + e * (window - 1)) // window + 1  # static bound on the windows in use
    src = mx.full((n_win * window,), r, dtype=mx.int32)  # padded slot -> routed row (r = empty)
    src[pos] = mx.arange(r, dtype=mx.int32)
    rows = x.reshape(-1, k_in) if x.ndim == 3 else x
    rows = mx.concatenate([rows, mx.zeros((1, k_in), dtype=x.dtype)], axis=0)
    take = src if x.ndim == 3 else mx.where(src < r, src // top_k, t)
    starts = mx.arange(n_win, dtype=mx.int32) * window
    win_expert = mx.minimum((seg_end[None, :] <= starts[:, None]).astype(mx.int32).sum(1), e - 1)
    y = mx.gather_mm(rows[take].reshape(n_win, window, k_in), w.swapaxes(-1, -2), rhs_indices=win_expert)
    return y.reshape(n_win * window, n)[pos].reshape(t, top_k, n)


def _moe_reference(x, w, expert_ids, scales, biases, bits, group_size, mode):
    """Readable oracle: dequantize with mx.dequantize, then every expert on every row."""
    if scales is not None:
        w = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode, dtype=x.dtype)
    return _moe_dense_experts(x, w.astype(x.dtype), expert_ids)
