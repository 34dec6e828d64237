"""Weight quantization: settings, validation, per-layer predicate, quantize-on-load and reload.

A quantized component records its settings in its config.json under "quantization":
    {"bits": 4, "group_size": 64, "mode": "affine"}
and stores each quantized layer as weight (packed uint32) + scales (+ biases for affine), the
same names MLX's nn.QuantizedLinear uses. On load, exactly the layers whose `.scales` exist in
the checkpoint are rebuilt as quantized layers, so nothing is quantized twice.

Quantized layers are `flashdiff.kernels.QuantizedLinear` (a subclass of nn.QuantizedLinear with the
same parameters) so large-M products go through the quantized-GEMM kernel dispatch.
"""

from dataclasses import asdict, dataclass
from functools import cache

import mlx.core as mx
import mlx.nn as nn

from ..kernels import QuantizedLinear, swap_quantized_linears
from .errors import FlashdiffError

MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")
_MODE_DEFAULTS = {"affine": (4, 64), "mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 64
    mode: str = "affine"

    @classmethod
    def make(cls, bits=None, group_size=None, mode="affine") -> "QuantSpec":
        """Fill mode defaults and check the setting against what MLX supports."""
        mode = mode or "affine"
        if mode not in MODES:
            raise FlashdiffError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
        d_bits, d_group = _MODE_DEFAULTS[mode]
        spec = cls(int(bits if bits is not None else d_bits), int(group_size if group_size is not None else d_group), mode)
        _check_supported(spec)
        return spec

    def to_dict(self) -> dict:
        return asdict(self)


@cache
def _check_supported(spec: QuantSpec):
    if spec.mode == "affine" and spec.bits not in (2, 3, 4, 5, 6, 8):
        raise FlashdiffError(f"affine quantization supports 2, 3, 4, 5, 6 or 8 bits, not {spec.bits}")
    try:
        mx.eval(mx.quantize(mx.zeros((8, 512)), group_size=spec.group_size, bits=spec.bits, mode=spec.mode))
    except Exception as e:
        hint = {"affine": "group size 32, 64 or 128", "mxfp4": "4 bits, group size 32",
                "nvfp4": "4 bits, group size 16", "mxfp8": "8 bits, group size 32"}[spec.mode]
        raise FlashdiffError(
            f"MLX does not support {spec.mode} quantization with {spec.bits} bits and group size {spec.group_size} "
            f"({e}); {spec.mode} takes {hint}"
        ) from None


def default_predicate(skip: tuple[str, ...] = ()):
    """Quantize Linear layers whose input size fits the group size, except paths starting with `skip`.

    Families pass their own `skip` prefixes (see each model's QUANTIZATION_SKIP).
    """

    def predicate(path: str, module: nn.Module, spec: QuantSpec) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if any(path == s or path.startswith(s + ".") for s in skip):
            return False
        out_dims, in_dims = module.weight.shape
        return in_dims % spec.group_size == 0 and in_dims >= 64 and out_dims >= 64

    return predicate


def quantize_model(model: nn.Module, spec: QuantSpec, skip: tuple[str, ...] = ()) -> int:
    """Quantize `model` in place, one layer at a time (so the bf16 and quantized copies of the whole
    model are never alive together). Returns the number of layers quantized."""
    predicate = default_predicate(skip)
    count = 0
    for path, module in list(model.named_modules()):
        if not predicate(path, module, spec):
            continue
        q = QuantizedLinear.from_linear(module, spec.group_size, spec.bits, spec.mode)
        mx.eval(q.parameters())
        _set_module(model, path, q)
        count += 1
    return count


def apply_saved_quantization(model: nn.Module, spec: QuantSpec, weights: dict):
    """Turn into quantized layers exactly the Linear layers that the checkpoint stores quantized."""

    def predicate(path, module):
        return isinstance(module, nn.Linear) and f"{path}.scales" in weights

    nn.quantize(model, group_size=spec.group_size, bits=spec.bits, mode=spec.mode, class_predicate=predicate)
    swap_quantized_linears(model)


def _set_module(root: nn.Module, path: str, new: nn.Module):
    parts = path.split(".")
    parent = root
    for p in parts[:-1]:
        parent = parent[int(p)] if isinstance(parent, list) else getattr(parent, p)
    last = parts[-1]
    if isinstance(parent, list):
        parent[int(last)] = new
    else:
        setattr(parent, last, new)


def model_quantization(model: nn.Module) -> QuantSpec | None:
    """The setting of a model's quantized layers (None if it has none)."""
    for _, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            return QuantSpec(int(m.bits), int(m.group_size), getattr(m, "mode", "affine") or "affine")
    return None


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())

