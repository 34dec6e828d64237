"""The offline demo model is a real diffusers-layout FLUX pipeline: diffusers loads it and agrees with us."""

import numpy as np
import torch

from flashdiff import Pipeline
from flashdiff.engine.demo import build_demo


def test_demo_is_built_once_and_loads_in_diffusers(tmp_path):
    from diffusers import FluxPipeline

    folder = build_demo(tmp_path)
    stamp = (folder / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert build_demo(tmp_path) == folder  # cached
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "build leftovers"

    ref = FluxPipeline.from_pretrained(folder, dtype=torch.float32)
    noise = np.random.default_rng(0).standard_normal((1, 16, 8, 8)).astype(np.float32)
    packed = FluxPipeline._pack_latents(torch.from_numpy(noise), 1, 16, 8, 8)
    with torch.no_grad():
        expected = ref("a red fox in snow", height=64, width=64, num_inference_steps=2, latents=packed,
                       max_sequence_length=64, output_type="np").images[0]
    ours = Pipeline.from_pretrained(str(folder), dtype="float32").generate(
        "a red fox in snow", steps=2, height=64, width=64, latents=noise, max_sequence_length=64, progress=False)[0]
    assert np.abs(np.asarray(ours, np.int16) - (expected * 255).round().astype(np.int16)).max() <= 2
