"""Attention entry point used by every model.

q: (B, H, Lq, D); k, v: (B, Hk, Lk, D) with H % Hk == 0. Returns (B, H, Lq, D) in q.dtype.
mask (optional), broadcastable to (B, H, Lq, Lk): boolean (True = attend) or additive float.
key_multiplier (optional), (B, Lk): multiplies the keys before the scores (HiDream's
``hidden_states_masks``: masked keys become zero vectors, so their score is 0, not -inf).

Dispatch (see ``_dispatch``): CUDA and Metal use ``mx.fast.scaled_dot_product_attention`` (cuDNN on
CUDA, MLX's fused steel kernel on Metal): on the H200 the custom CUDA kernel in
``_attention_cuda`` is slower than cuDNN (benchmarks/README.md, Kernels), so it is not the default; pass
``backend="cuda_flash"`` to force it (mask=None or a key-only mask). ``backend="cuda_wgmma"`` forces
the sm_90 kernel in ``_attention_sm90`` (head dim 128, bf16/f16, mask=None or a key-only mask), which
has **not run on a GPU yet**. CPU uses the reference.
``backend="metal_flash"`` forces the Metal twin in ``_attention_metal`` (same contract); it has never
been compiled or run (no Apple GPU here), so automatic dispatch on Metal never picks it.
"""

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


def _key_bias(mask, b, lk):
    """A mask that only varies along keys, as a (B, Lk) additive float32 bias; else None."""
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
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


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None, *, key_multiplier=None,
              backend=None) -> mx.array:
    _check(q, k, v, mask, key_multiplier)
    if key_multiplier is not None:
        k = k * key_multiplier[:, None, :, None].astype(k.dtype)
    if backend in _FLASH_KERNELS:  # the opt-in flash kernels: no mask or a key-only mask
        bias = None if mask is None else _key_bias(mask, q.shape[0], k.shape[2])
        if mask is not None and bias is None:
            raise ValueError(f"backend={backend!r} supports only key masks shaped (B, 1, 1, Lk), got mask "
                             f"{mask.shape}; use the default backend for other masks.")
        return _FLASH_KERNELS[backend]()(q, k, v, scale, bias)
    if resolve_backend(backend) == "reference":
        return attention_reference(q, k, v, scale, mask)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
