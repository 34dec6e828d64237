"""Building a model component from a config dict and a weights dict (diffusers layout or our own)."""

import gc
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..kernels import PackedQuantizedLinear, pack_quantized_linears
from .errors import FlashdiffError
from .quantization import QuantSpec, apply_saved_quantization, is_quantized, model_quantization, quantize_model
from .weights import load_folder, read_json, save_weights, write_json_atomic

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


def parse_dtype(dtype) -> mx.Dtype:
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise FlashdiffError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def cast_floats(weights: dict, dtype: mx.Dtype) -> dict:
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}


def build_model(model_cls, config_cls, config: dict, weights: dict, dtype: mx.Dtype, *, name: str,
                quantize: QuantSpec | None = None, skip: tuple[str, ...] = (), sanitize: bool = True) -> nn.Module:
    """Instantiate, load weights strictly, then quantize if asked and not already quantized."""
    model = model_cls(config_cls.from_dict(config))
    if sanitize:
        weights = model.sanitize(weights)
    saved = config.get("quantization")
    if saved:
        saved_spec = QuantSpec.make(**saved)
        if quantize is not None and quantize != saved_spec:
            raise FlashdiffError(
                f"the {name} is stored quantized ({saved_spec.bits}-bit {saved_spec.mode}, group size "
                f"{saved_spec.group_size}) and loads as saved; it cannot be re-quantized to {quantize.bits}-bit "
                f"{quantize.mode}, group size {quantize.group_size} (that would stack two rounding errors). Drop "
                "--quantize, or convert the original model with the new setting.")
        apply_saved_quantization(model, saved_spec, weights)
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {', '.join(missing[:4])})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
        raise FlashdiffError(
            f"the {name} weights do not match its config: {'; '.join(detail)}. "
            "The checkpoint is incomplete or belongs to another model; download or convert it again."
        )
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise FlashdiffError(
                f"the {name} weight {k} has shape {tuple(v.shape)} but its config needs {tuple(expected[k].shape)}; "
                "the checkpoint and config.json do not belong together"
            )
    model.load_weights(list(cast_floats(weights, dtype).items()), strict=False)
    del weights
    if quantize is not None and not saved:
        quantize_model(model, quantize, skip)
    else:
        mx.eval(model.parameters())
    model.eval()
    return model


def load_component(model_cls, config_cls, folder: Path, dtype: mx.Dtype, *, name: str,
                   quantize: QuantSpec | None = None, skip: tuple[str, ...] = ()) -> nn.Module:
    folder = Path(folder)
    if not folder.is_dir():
        raise FlashdiffError(f"the model has no {name} folder ({folder}); the download is incomplete or the path is wrong")
    config = read_json(folder / "config.json")
    return build_model(model_cls, config_cls, config, load_folder(folder), dtype, name=name, quantize=quantize, skip=skip)


def configure_execution(model: nn.Module) -> nn.Module:
    """How a transformer (or VAE) runs its blocks. On a GPU: each block type is compiled once (fused
    elementwise kernels, a cached graph) and blocks are evaluated as a stream, two in flight, so
    activations and quantized-weight scratch of the whole forward never pile up (see
    models/common.BlockStream and compiled_block_fn; benchmarks/README.md has the H200 numbers).
    On the CPU blocks run eagerly. FLASHDIFF_COMPILE=0 forces eager execution everywhere. With
    FLASHDIFF_QLINEAR_PACKED=1 on an sm_90 GPU the quantized layers are packed for the mixed-input GEMM
    (``pack_quantized_linears``): it runs calls of 1024-2048 rows whose tiles fill the GPU's waves, and the packed
    blocks are dequantized for the others."""
    gpu = mx.default_device() == mx.gpu and os.environ.get("FLASHDIFF_COMPILE", "1") != "0"
    pack_quantized_linears(model)  # where enabled (sm_90): quantized layers in the mixed GEMM's layout
    if hasattr(model, "compile_blocks"):
        model.compile_blocks = gpu
    if hasattr(model, "stream_blocks"):
        model.stream_blocks = gpu
    if hasattr(model, "stream"):  # VAEs: decode layer by layer
        model.stream = gpu
    return model


def model_weights(model: nn.Module) -> dict:
    """The model's parameters by path, in the checkpoint's layout: a layer packed for the GPU at run time
    (``PackedQuantizedLinear``) gives back its weight, scales and biases as mx.quantize made them."""
    weights = dict(tree_flatten(model.parameters()))
    for path, module in model.named_modules():
        if isinstance(module, PackedQuantizedLinear):
            weights.pop(f"{path}.packed")
            weights.update({f"{path}.{key}": value for key, value in module.unpacked_weights().items()})
    return weights


def save_component(model: nn.Module, config: dict, folder: Path, quantize: QuantSpec | None, to_checkpoint=None):
    """Write a loaded component as `folder/{diffusion_pytorch_model|model}.safetensors` + config.json.

    The config records the quantization (if any) so `build_model` rebuilds exactly the quantized layers;
    `to_checkpoint` maps MLX layouts back to the checkpoint's (VAEs).
    """
    folder = Path(folder)
    weights = model_weights(model)
    if to_checkpoint is not None:
        weights = to_checkpoint(weights)
    config = dict(config)
    config.pop("quantization", None)
    # Record what the weights are, not what was asked: a component loaded already quantized keeps its setting.
    actual = model_quantization(model)
    if actual is not None and quantize is not None and actual != quantize:
        raise FlashdiffError(f"cannot save {folder.name} as {quantize.bits}-bit {quantize.mode}: its weights are "
                             f"quantized as {actual.bits}-bit {actual.mode}, group size {actual.group_size}")
    spec = actual or quantize
    if spec is not None:
        config["quantization"] = spec.to_dict()
    name = "diffusion_pytorch_model" if "transformer" in folder.name or "vae" in folder.name else "model"
    save_weights(folder, weights, name=name)
    write_json_atomic(folder / "config.json", config)


def copy_folder(src: Path, dst: Path):
    """Copy the files (not subfolders) of `src` into `dst` (tokenizers, scheduler configs)."""
    import shutil

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)


def release(*models):
    """Drop references and return freed buffers to the system."""
    for m in models:
        del m
    gc.collect()
    mx.clear_cache()


__all__ = ["DTYPES", "build_model", "cast_floats", "copy_folder", "is_quantized", "load_component", "model_weights", "parse_dtype",
           "release", "save_component"]
