"""``cuda_kernel``: ``mx.fast.cuda_kernel`` with the kernel's text handed to MLX as two ``#include`` lines.

Why. On every call of a custom kernel MLX builds the whole source (its header, our header, the signature, the
template constants, our body) into one string, and hashes that string when it encodes the call, to find the
compiled module (``mlx/backend/cuda/custom_kernel.cpp``, MLX 0.32). Our sm_90 kernels carry 20-36 KB of text
(the attention's header holds the wgmma wrappers with their 64-operand register lists), and on the H200 that
text cost about 11 us of host time per call (session 16, ``benchmarks/probe_encode_cost.py``: a no-op kernel
took 4.3 + 6.0 us to build and evaluate with a short source, 6.5 + 15.2 with the attention's 36 KB). That host
time is paid serially whenever the GPU waits on the host (a short graph evaluated at once).

How. The header and the body are written, when a kernel is made, into files named by their content's SHA-256 in a
cache directory of the user's (``FLASHDIFF_KERNEL_CACHE``, else ``cuda-sources/`` in the engine's cache folder,
``FLASHDIFF_HOME`` or ``~/.cache/flashdiff``), atomically (a temporary file, then a rename); a file already there is
used only if its bytes are ours. NVRTC, which compiles the kernel at its first evaluation in a process, opens the
absolute paths itself (so the files must stay until then; a later process rewrites any that are gone). The body's
file is included inside the kernel function, after MLX's template constants, exactly where the text stood. MLX adds an
input's shape, strides or ndim parameters when the source names ``<input>_shape`` (and so on); those names are
repeated in a comment on the include line so that MLX still sees them.

Inline text (MLX's own way) is used off CUDA (the CPU emulation in tests/ reads the sources), with
``FLASHDIFF_KERNEL_SOURCE=inline``, or when the cache cannot be written or its path cannot sit in an
``#include "..."``.
"""

import hashlib
import os
import re
import tempfile
from pathlib import Path

import mlx.core as mx

def cache_dir() -> Path:
    """FLASHDIFF_KERNEL_CACHE, else cuda-sources/ in the engine's cache folder (FLASHDIFF_HOME, ~/.cache/flashdiff)."""
    explicit = os.environ.get("FLASHDIFF_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("FLASHDIFF_HOME", Path.home() / ".cache" / "flashdiff")) / "cuda-sources"


def include_mode() -> bool:
    """Whether kernels get their text by #include: on a CUDA device unless FLASHDIFF_KERNEL_SOURCE=inline."""
    choice = os.environ.get("FLASHDIFF_KERNEL_SOURCE", "include").lower()
    if choice not in ("include", "inline"):
        raise ValueError(f"FLASHDIFF_KERNEL_SOURCE must be 'include' or 'inline', got {choice!r}.")
    return choice == "include" and mx.cuda.is_available()


def source_file(text: str, name: str, directory: Path) -> str | None:
    """The absolute path of a file in `directory` holding `text` (written if missing or different), or None when
    it cannot be written or its path cannot be #included."""
    data = text.encode()
    file_name = f"{re.sub(r'[^A-Za-z0-9_]', '_', name)}-{hashlib.sha256(data).hexdigest()[:24]}.cuh"
    path = directory.resolve() / file_name
    if any(c in str(path) for c in '"\\\n'):
        return None
    try:
        if not (path.is_file() and path.read_bytes() == data):
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{file_name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
    except OSError:
        return None
    return str(path)


def included(name: str, input_names, source: str, header: str, directory: Path | None = None):
    """(source, header) as #include lines of files holding them, or the texts themselves if a file cannot be made."""
    directory = cache_dir() if directory is None else directory
    body = source_file(source, name + "_body", directory)
    head = source_file(header, name + "_header", directory) if header else ""
    if body is None or head is None:
        return source, header
    seen = [f"{n}{suffix}" for n in input_names for suffix in ("_shape", "_strides", "_ndim")
            if f"{n}{suffix}" in source]
    note = f"  // {' '.join(seen)}" if seen else ""
    return f'#include "{body}"{note}\n', (f'#include "{head}"\n' if head else "")


def cuda_kernel(name: str, input_names, output_names, source: str, header: str = "", **kwargs):
    """``mx.fast.cuda_kernel(name=..., ...)``, its texts by #include where ``include_mode()``."""
    if include_mode():
        source, header = included(name, input_names, source, header)
    return mx.fast.cuda_kernel(name=name, input_names=list(input_names), output_names=list(output_names),
                               source=source, header=header, **kwargs)
