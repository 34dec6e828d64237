"""Quantization: settings checks, quantize-on-load vs saved-and-reloaded, convert output layout."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from flashdiff import Pipeline
from flashdiff.engine.errors import FlashdiffError
from flashdiff.engine.quantization import QuantSpec, quantize_model

KW = dict(steps=2, height=64, width=64, seed=5, max_sequence_length=16, progress=False)


def pixels(images):
    return np.asarray(images[0], np.int16)


@pytest.mark.parametrize("bits,group,mode", [(4, 64, "affine"), (8, 32, "affine"), (3, 64, "affine"), (4, 32, "mxfp4"), (8, 32, "mxfp8")])
def test_saved_quantized_model_reloads_to_the_same_output(demo, tmp_path, bits, group, mode):
    pipe = Pipeline.from_pretrained(str(demo), quantize=bits, group_size=group, mode=mode, dtype="float32")
    on_load = pipe.generate("a cat", **KW)
    out = tmp_path / "converted"
    pipe.save_pretrained(out, progress=False)
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["quantization"] == {"bits": bits, "group_size": group, "mode": mode}
    assert json.loads((out / "model_index.json").read_text())["_flashdiff"]["quantization"]["bits"] == bits
    reloaded = Pipeline.from_pretrained(str(out), dtype="float32")  # no quantize argument: loads as saved
    model = reloaded.transformer()
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    assert np.array_equal(pixels(on_load), pixels(reloaded.generate("a cat", **KW)))


def test_quantization_error_shrinks_with_bits(demo):
    ref = Pipeline.from_pretrained(str(demo), dtype="float32")
    model = ref.transformer()
    x = mx.random.normal((1, 16, 64), key=mx.random.key(1))
    ctx, pooled = mx.random.normal((1, 8, 64), key=mx.random.key(2)), mx.random.normal((1, 64), key=mx.random.key(3))
    ids_img, ids_txt = mx.zeros((16, 3)), mx.zeros((8, 3))
    full = model(x, ctx, pooled, mx.array([0.5]), ids_img, ids_txt)
    errors = {}
    for bits in (8, 4, 3):
        q = Pipeline.from_pretrained(str(demo), dtype="float32", quantize=bits).transformer()
        out = q(x, ctx, pooled, mx.array([0.5]), ids_img, ids_txt)
        errors[bits] = float(mx.abs(out - full).max() / mx.abs(full).max())
    assert errors[8] < errors[4] < errors[3], errors
    assert errors[8] < 0.02, errors


def test_skip_list_keeps_embedders_in_full_precision(demo):
    model = Pipeline.from_pretrained(str(demo), dtype="float32", quantize=4, group_size=32).transformer()
    kinds = {path: type(m).__name__ for path, m in model.named_modules()}
    assert kinds["x_embedder"] == "Linear" and kinds["proj_out"] == "Linear" and kinds["norm_out.linear"] == "Linear"
    assert kinds["transformer_blocks.0.attn.to_qkv"] == "QuantizedLinear"
    assert kinds["single_transformer_blocks.0.attn.to_qkv_mlp_proj"] == "QuantizedLinear"


@pytest.mark.parametrize("bits,group,mode,message", [
    (7, None, "affine", "2, 3, 4, 5, 6 or 8 bits"),
    (4, 100, "affine", "does not support"),
    (8, None, "mxfp4", "does not support"),
    (4, None, "int4", "unknown quantization mode"),
])
def test_unsupported_settings_are_rejected(bits, group, mode, message):
    with pytest.raises(FlashdiffError, match=message):
        QuantSpec.make(bits, group, mode)


def test_quantize_model_skips_layers_that_do_not_fit_the_group():
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(100, 64), nn.Linear(128, 32))
    assert quantize_model(model, QuantSpec.make(4, 64)) == 1
    assert isinstance(model.layers[0], nn.QuantizedLinear)
    assert isinstance(model.layers[1], nn.Linear) and isinstance(model.layers[2], nn.Linear)


def test_block_streaming_does_not_change_the_output(demo):
    model = Pipeline.from_pretrained(str(demo), dtype="float32", quantize=4, group_size=32).transformer()
    x = mx.random.normal((1, 16, 64), key=mx.random.key(1))
    ctx, pooled = mx.random.normal((1, 8, 64), key=mx.random.key(2)), mx.random.normal((1, 64), key=mx.random.key(3))
    args = (x, ctx, pooled, mx.array([0.5]), mx.zeros((16, 3)), mx.zeros((8, 3)))
    plain = model(*args)
    model.stream_blocks = True
    streamed = model(*args)
    assert np.array_equal(np.array(plain), np.array(streamed))
