"""One dispatch rule for every kernel: pick the implementation by backend.

Order: the ``backend=`` argument, then the ``FLASHDIFF_KERNELS`` environment variable, then the
device: CUDA -> "cuda", Metal -> "metal", otherwise "reference" (pure MLX, also the test oracle).
``FLASHDIFF_KERNELS=reference`` forces the reference everywhere (debugging).
"""

import os
import struct

import mlx.core as mx

BACKENDS = ("reference", "cuda", "metal")


def metal_kernels_requested(backend: str | None = None) -> bool:
    """Our custom Metal kernels have never run on Apple hardware, so "auto" does not pick them:
    on Metal the kernels use MLX's own tested ops unless backend="metal" or FLASHDIFF_KERNELS=metal."""
    return (backend or os.environ.get("FLASHDIFF_KERNELS") or "auto").lower() == "metal"


def resolve_backend(backend: str | None = None) -> str:
    choice = backend or os.environ.get("FLASHDIFF_KERNELS") or "auto"
    choice = choice.lower()
    if choice == "auto":
        if mx.default_device() == mx.cpu:
            return "reference"
        if mx.cuda.is_available():
            return "cuda"
        if mx.metal.is_available():
            return "metal"
        return "reference"
    if choice not in BACKENDS:
        raise ValueError(
            f"Unknown kernel backend {choice!r}: use one of {('auto',) + BACKENDS} "
            "(argument backend= or environment variable FLASHDIFF_KERNELS)."
        )
    if choice == "cuda" and not mx.cuda.is_available():
        raise RuntimeError("backend='cuda' requested but MLX has no CUDA back-end here; use 'reference'.")
    if choice == "metal" and not mx.metal.is_available():
        raise RuntimeError("backend='metal' requested but MLX has no Metal back-end here; use 'reference'.")
    return choice


def float_bits(value: float) -> int:
    """The float32 bit pattern of `value` as a signed int: how a kernel takes a float as a template value
    (``__int_as_float(X_BITS)`` in the CUDA source; each distinct value compiles its own kernel)."""
    return struct.unpack("<i", struct.pack("<f", float(value)))[0]
