"""The whole pipeline on an MLX GPU backend (its compiled-block, streamed execution mode) against the CPU.

Skipped on machines without CUDA or Metal; run on the H200 through the device tool (see the closing
notes of issue 4 / benchmarks/README.md for the command)."""

import mlx.core as mx
import numpy as np
import pytest

from flashdiff import Pipeline
from flashdiff.engine.demo import build_demo

GPU = mx.cuda.is_available() or mx.metal.is_available()
pytestmark = pytest.mark.skipif(not GPU, reason="needs MLX with a GPU backend (CUDA or Metal); this machine has neither")
KW = dict(steps=2, height=64, width=96, seed=3, max_sequence_length=16, progress=False)


def run(folder, device, **kw):
    previous = mx.default_device()
    mx.set_default_device(device)
    try:
        pipe = Pipeline.from_pretrained(str(folder), **kw)
        image = pipe.generate("a red fox in snow", **KW)[0]
        return pipe, np.asarray(image, np.int16)
    finally:
        mx.set_default_device(previous)


@pytest.mark.parametrize("quantize", [None, 4], ids=["float32", "4bit"])
def test_gpu_pipeline_matches_cpu(tmp_path, quantize):
    demo = build_demo(tmp_path)
    kw = dict(dtype="float32", quantize=quantize, group_size=32)
    gpu_pipe, gpu = run(demo, mx.gpu, **kw)
    model = gpu_pipe.transformer()
    assert model.compile_blocks and model.stream_blocks and gpu_pipe.vae().stream  # the GPU mode ran
    _, cpu = run(demo, mx.cpu, **kw)
    diff = np.abs(gpu - cpu)
    assert diff.max() <= 3, f"GPU and CPU images differ by up to {diff.max()}/255 (mean {diff.mean():.3f})"


def test_gpu_bfloat16_runs_and_is_close_to_float32(tmp_path):
    demo = build_demo(tmp_path)
    _, bf16 = run(demo, mx.gpu, dtype="bfloat16")
    _, f32 = run(demo, mx.gpu, dtype="float32")
    assert np.abs(bf16 - f32).mean() < 8, "bf16 image far from float32"
