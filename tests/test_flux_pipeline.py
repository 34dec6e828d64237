"""Whole FLUX pipeline against diffusers' FluxPipeline on a tiny model saved with save_pretrained."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from flux_reference import build_reference_pipeline, pack

from flashdiff import Pipeline

H = W = 64
PROMPT = "a red fox in snow, detailed fur"


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def reference(request, tmp_path_factory):
    pipe, path = build_reference_pipeline(tmp_path_factory.mktemp("flux"), guidance_embeds=request.param)
    return pipe, path, request.param


def noise(n=1, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 16, H // 8, W // 8)).astype(np.float32)


def run_reference(pipe, latents, steps=3, **kw):
    with torch.no_grad():
        out = pipe(prompt=PROMPT, height=H, width=W, num_inference_steps=steps, latents=pack(latents),
                   max_sequence_length=32, output_type="np", **kw)
    return out.images  # (N, H, W, 3) float in [0, 1]


def run_ours(path, latents, steps=3, capture=None, **kw):
    pipe = Pipeline.from_pretrained(str(path), dtype="float32")
    p = pipe._params(PROMPT, kw.pop("negative_prompt", None), steps, kw.pop("guidance", None), kw.pop("true_cfg", None),
                     H, W, 0, latents.shape[0], latents, 32)
    pixels = pipe._generate(p, progress=False, callback=capture)
    return pipe, np.array(mx.clip(pixels / 2 + 0.5, 0, 1))


def test_image_matches_diffusers(reference):
    pipe, path, dev = reference
    lat = noise()
    ref = run_reference(pipe, lat, guidance_scale=3.5)
    _, ours = run_ours(path, lat, guidance=3.5)
    assert ref.std() > 1e-3, "reference image is flat: the test would not see errors"
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    # and as 8-bit images, the product's output
    images = Pipeline.from_pretrained(str(path), dtype="float32").generate(
        PROMPT, steps=3, guidance=3.5, height=H, width=W, latents=lat, max_sequence_length=32, progress=False)
    ref_u8 = (ref * 255).round().astype(np.int16)
    assert np.abs(np.asarray(images[0], np.int16) - ref_u8[0]).max() <= 2


def test_final_latents_match_diffusers(reference):
    pipe, path, dev = reference
    lat = noise(seed=1)
    with torch.no_grad():
        ref = pipe(prompt=PROMPT, height=H, width=W, num_inference_steps=4, latents=pack(lat), guidance_scale=2.0,
                   max_sequence_length=32, output_type="latent").images
    seen = []
    run_ours(path, lat, steps=4, guidance=2.0, capture=lambda i, n, x: seen.append(np.array(x)))
    assert len(seen) == 4
    np.testing.assert_allclose(seen[-1], ref.numpy(), atol=2e-4, rtol=1e-4)


def test_true_cfg_and_batch_match_diffusers(reference):
    pipe, path, dev = reference
    lat = noise(n=2, seed=2)
    ref = run_reference(pipe, lat, negative_prompt="blurry, low quality", true_cfg_scale=3.0, guidance_scale=3.5,
                        num_images_per_prompt=2)
    _, ours = run_ours(path, lat, negative_prompt="blurry, low quality", true_cfg=3.0, guidance=3.5)
    np.testing.assert_allclose(ours, ref, atol=1e-3)


def test_seeded_noise_is_reproducible_per_image(reference):
    _, path, _ = reference
    pipe = Pipeline.from_pretrained(str(path), dtype="float32")
    both = pipe.generate(PROMPT, steps=1, height=H, width=W, seed=10, num_images=2, max_sequence_length=32, progress=False)
    second = pipe.generate(PROMPT, steps=1, height=H, width=W, seed=11, max_sequence_length=32, progress=False)
    assert [im.info["flashdiff"]["seed"] for im in both] == [10, 11]
    assert np.array_equal(np.asarray(both[1]), np.asarray(second[0]))
    assert not np.array_equal(np.asarray(both[0]), np.asarray(both[1]))
