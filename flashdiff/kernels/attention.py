"""Attention entry point used by every model.

q: (B, H, Lq, D); k, v: (B, Hk, Lk, D) with H % Hk == 0. Returns (B, H, Lq, D) in q.dtype.
layout="blhd": q (B, Lq, H, D), k / v (B, Lk, Hk, D), returns (B, Lq, H, D): the layout the models'
fused q/k/v projections produce, passed without transposes or copies.
mask (optional), broadcastable to (B, H, Lq, Lk): boolean (True = attend) or additive float.
key_multiplier (optional), (B, Lk): multiplies the keys before the scores (HiDream's
``hidden_states_masks``: masked keys become zero vectors, so their score is 0, not -inf).

Dispatch on CUDA (``_use_sm90``): on Hopper, for head dim 128 in bf16/f16, our sm_90 kernel
(``_attention_sm90``, FlashAttention-3's design) where it measured faster than cuDNN on the H200
(benchmarks/README.md, sessions 7, 14, 15 and 16): with a key mask (B, 1, 1, Lk) (MLX's SDPA then leaves cuDNN's fused
path) and without a mask once Lq * Lk >= ``SM90_MIN_SCORES``, at any length, or >= ``SM90_MIN_SCORES_ODD`` where Lq or
Lk is not a multiple of 128 (cuDNN slows down there, ours much less). Everything else, and other GPUs, go to
``mx.fast.scaled_dot_product_attention`` (cuDNN). ``FLASHDIFF_ATTENTION=sdpa`` (or ``backend="sdpa"``)
turns our kernel off. Metal uses MLX's fused SDPA; CPU the reference.
Forced backends: ``"cuda_wgmma"`` (the sm_90 kernel; no mask or a key mask), ``"cuda_flash"`` (the
mma.sync kernel in ``_attention_cuda``, slower than cuDNN), ``"metal_flash"`` (the Metal twin in
``_attention_metal``, never compiled or run: no Apple GPU here, so automatic dispatch never picks it).
"""

import os

import mlx.core as mx

from ._dispatch import resolve_backend


def _check(q, k, v, mask, key_multiplier):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects (B, H, L, D) arrays, got q {q.shape}, k {k.shape}, v {v.shape}.")
    if k.shape != v.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape.")
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or h % k.shape[1]:
        raise ValueError(
            f"q {q.shape} and k {k.shape} disagree: batch and head dim must match and q heads must be a "
            "multiple of k heads."
        )
    if not (mx.issubdtype(q.dtype, mx.floating) and q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if mask is not None:
        if mask.ndim > 4:
            raise ValueError(f"mask must broadcast to (B, H, Lq, Lk), got {mask.shape}.")
        try:
            mx.broadcast_shapes(mask.shape, (b, h, q.shape[2], k.shape[2]))
        except ValueError:
            raise ValueError(f"mask {mask.shape} does not broadcast to (B, H, Lq, Lk) = "
                             f"{(b, h, q.shape[2], k.shape[2])}; a key mask is (B, 1, 1, Lk).") from None
        if mask.dtype != mx.bool_ and not mx.issubdtype(mask.dtype, mx.floating):
            raise TypeError(f"mask must be boolean (True = attend) or an additive float, got {mask.dtype}.")
    if key_multiplier is not None and key_multiplier.shape != (b, k.shape[2]):
        raise ValueError(f"key_multiplier must be (B, Lk) = {(b, k.shape[2])}, got {key_multiplier.shape}.")


def attention_reference(q, k, v, scale, mask=None):
    """softmax(q k^T * scale + mask) v in float32, readable; the oracle for every other path."""
    h, hk = q.shape[1], k.shape[1]
    if hk != h:
        k = mx.repeat(k, h // hk, axis=1)
        v = mx.repeat(v, h // hk, axis=1)
    s = (q.astype(mx.float32) @ k.astype(mx.float32).swapaxes(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == mx.bool_:
            s = mx.where(mask, s, -float("inf"))
        else:
            s = s + mask.astype(mx.float32)
    p = mx.softmax(s, axis=-1)
    return (p @ v.astype(mx.float32)).astype(q.dtype)


def _is_key_mask(mask) -> bool:
    """Whether the mask varies only along keys: (B or 1, 1, 1, Lk)."""
    return mask.ndim == 4 and mask.shape[1] == 1 and mask.shape[2] == 1


def _key_bias(mask, b, lk):
    """A mask that only varies along keys, as a (B, Lk) additive float32 bias; else None."""
    if not _is_key_mask(mask):
        return None
    m = mx.broadcast_to(mask, (b, 1, 1, lk)).reshape(b, lk)
    if m.dtype == mx.bool_:
        return mx.where(m, 0.0, -float("inf")).astype(mx.float32)
    return m.astype(mx.float32)


def _flash_cuda():
    from ._attention_cuda import flash_attention_cuda
    return flash_attention_cuda


def _flash_sm90():
    from ._attention_sm90 import flash_attention_sm90
    return flash_attention_sm90


def _flash_metal():
    from ._attention_metal import flash_attention_metal
    return flash_attention_metal


# backend= name -> the kernel's (q, k, v, scale, key_bias) function, imported on first use
_FLASH_KERNELS = {"cuda_flash": _flash_cuda, "cuda_wgmma": _flash_sm90, "metal_flash": _flash_metal}


# Unmasked attention goes to the sm_90 kernel once Lq * Lk is at least this, aligned or not. H200, session 14
# (benchmarks/README.md, 24 heads, benchmarks/results/attention-dispatch-*-h200-s14.json): ours / cuDNN 1.03 at
# 16384 (1.03 in the (B, L, H, D) layout the models pass), 1.02-1.03 at 16896 (FLUX at 2048²), 1.09 at 16400,
# 1.03 at 20480, 1.02 at 24576, 1.07 at 32760, 1.05 at 32768. Below it the layouts disagree: 1.01-1.02 at 12288
# head-major but 0.96 in (B, L, H, D); 0.98 at 8192, 0.90-0.96 at 4096 .. 4736. (Session 7's kernel, before
# session 13's edits to its loop, won only at odd lengths from ~30000 tokens.)
SM90_MIN_SCORES = 16384 * 16384
# ... and from this bound where Lq or Lk is not a multiple of 128. H200, session 16 (unmasked, 24 heads, ours / cuDNN,
# benchmarks/results/attention-dispatch-*-h200-s16*.json), after session 16's descriptor edit: streamed, as the models
# run their blocks, 1.01-1.09 at 4621 (four runs) and 1.07 in (B, L, H, D), the models' layout; 1.005 / 1.04 at 4700,
# 1.06-1.10 at 5000-5900. Queued (ten calls encoded before the GPU starts) it is 0.99 at 4621 and 0.95-1.00 at 4700,
# 1.01-1.08 from 5500. (Session 15 set 6000 where both timings agreed; the streamed timing is how a model runs.)
SM90_MIN_SCORES_ODD = 4600 * 4600


def _use_sm90(q, k, mask) -> bool:
    """Whether the default CUDA dispatch takes the sm_90 kernel (q, k head-major views)."""
    from ._gemm_cuda import is_sm90
    if os.environ.get("FLASHDIFF_ATTENTION", "").lower() == "sdpa":
        return False
    if q.shape[3] != 128 or q.dtype not in (mx.bfloat16, mx.float16) or not is_sm90():
        return False
    if mask is not None:  # MLX's SDPA leaves cuDNN's fused path: 1.1x its additive-mask, 5x its boolean-mask time
        return _is_key_mask(mask)
    lq, lk = q.shape[2], k.shape[2]
    odd = lq % 128 != 0 or lk % 128 != 0
    return lq * lk >= (SM90_MIN_SCORES_ODD if odd else SM90_MIN_SCORES)


def _path(q, k, mask, backend) -> str:
    """"sdpa" (mx.fast.scaled_dot_product_attention), "reference", or a _FLASH_KERNELS name."""
    if backend == "sdpa" or backend in _FLASH_KERNELS:
        return backend
    resolved = resolve_backend(backend)
    if resolved == "reference":
        return "reference"
    if resolved == "cuda" and _use_sm90(q, k, mask):
        return "cuda_wgmma"
    return "sdpa"


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None, *, key_multiplier=None,
              backend=None, layout: str = "bhld") -> mx.array:
    if layout not in ("bhld", "blhd"):
        raise ValueError(f"layout must be 'bhld' (B, H, L, D) or 'blhd' (B, L, H, D), got {layout!r}.")
    seq_major = layout == "blhd"
    if seq_major:  # checks and every path but the sm_90 kernel see head-major views
        qh, kh, vh = (a.transpose(0, 2, 1, 3) if a.ndim == 4 else a for a in (q, k, v))
    else:
        qh, kh, vh = q, k, v
    _check(qh, kh, vh, mask, key_multiplier)
    if key_multiplier is not None:
        kh = kh * key_multiplier[:, None, :, None].astype(k.dtype)
        k = kh.transpose(0, 2, 1, 3) if seq_major else kh
    path = _path(qh, kh, mask, backend)
    if path in _FLASH_KERNELS:  # the flash kernels: no mask or a key-only mask
        bias = None if mask is None else _key_bias(mask, q.shape[0], kh.shape[2])
        if mask is not None and bias is None:
            raise ValueError(f"backend={backend!r} supports only key masks shaped (B, 1, 1, Lk), got mask "
                             f"{mask.shape}; use the default backend for other masks.")
        if path == "cuda_wgmma":
            return _flash_sm90()(q, k, v, scale, bias, seq_major=seq_major)
        out = _FLASH_KERNELS[path]()(qh, kh, vh, scale, bias)
    elif path == "reference":
        out = attention_reference(qh, kh, vh, scale, mask)
    else:
        out = mx.fast.scaled_dot_product_attention(qh, kh, vh, scale=scale, mask=mask)
    return out.transpose(0, 2, 1, 3) if seq_major else out
