"""Whole Qwen-Image pipeline against diffusers' QwenImagePipeline on tiny models saved with save_pretrained."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from qwen_reference import GOLDEN_SLICE, TEMPLATE, build_reference_pipeline, pack

from flashdiff import Pipeline
from flashdiff.engine.cli import main
from flashdiff.engine.errors import FlashdiffError
from flashdiff.engine.sources import presets

PROMPT = "a cat holding a sign that says hello world"
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """16 latent channels, 8x VAE, the release scheduler config."""
    return build_reference_pipeline(tmp_path_factory.mktemp("qwen_full"), "full")


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """The diffusers test dummy."""
    return build_reference_pipeline(tmp_path_factory.mktemp("qwen_golden"), "golden")


def noise(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def run_ours(path, prompt, latents, height, width, steps, capture=None, **kw):
    """Our pipeline, float32, on injected latents -> (pipeline, images (N, H, W, 3) in [0, 1])."""
    pipe = Pipeline.from_pretrained(str(path), dtype="float32")
    p = pipe._params(prompt, kw.pop("negative_prompt", None), steps, None, kw.pop("true_cfg", None), height, width, 0,
                     latents.shape[0], latents, kw.pop("max_sequence_length", 64))
    pixels = pipe._generate(p, progress=False, callback=capture)
    return pipe, np.array(mx.clip(pixels / 2 + 0.5, 0, 1))


def run_reference(pipe, prompt, latents, height, width, steps, output_type="np", **kw):
    with torch.no_grad():
        out = pipe(prompt=prompt, height=height, width=width, num_inference_steps=steps, latents=pack(latents),
                   output_type=output_type, **kw)
    return out.images


# ------------------------------------------------------------------------------------------ golden slice


def test_tokenizer_matches_transformers_on_the_real_vocabulary(golden):
    from transformers import Qwen2Tokenizer

    from flashdiff.models.tokenizers import load_qwen2_tokenizer

    pipe, path = golden
    prompts = [TEMPLATE.format("dance monkey"), TEMPLATE.format('A sign that reads "Qwen Coffee $2.50", 16:9')]
    ours, _ = load_qwen2_tokenizer(str(path / "tokenizer")).encode(prompts, max_length=1058, padding=True)
    ref = Qwen2Tokenizer.from_pretrained(path / "tokenizer")(prompts, padding=True, return_tensors="np").input_ids
    assert ours.tolist() == ref.tolist()
    assert ours[0, 0] == 151644 and pipe.tokenizer.vocab_size == 151643


def test_golden_slice_of_the_diffusers_test(golden):
    """diffusers' test_inference: 2 steps, 32x32, true_cfg 1, max_sequence_length 16, torch generator seed 0."""
    pipe, path = golden
    generator = torch.Generator("cpu").manual_seed(0)
    lat = torch.randn((1, 1, 4, 8, 8), generator=generator).numpy().reshape(1, 4, 8, 8)  # randn_tensor's draw
    ours = Pipeline.from_pretrained(str(path), dtype="float32")
    assert (ours.latent_channels, ours.vae_scale_factor, ours.SIZE_MULTIPLE) == (4, 4, 8)
    with pytest.warns(UserWarning, match="negative_prompt is ignored"):  # as diffusers warns
        images = ours.generate("dance monkey", negative_prompt="bad quality", true_cfg=1.0, steps=2, height=32,
                               width=32, latents=lat, max_sequence_length=16, progress=False)
    p = ours._params("dance monkey", None, 2, None, 1.0, 32, 32, 0, 1, lat, 16)
    got = np.array(mx.clip(ours._generate(p, progress=False) / 2 + 0.5, 0, 1))[0].transpose(2, 0, 1).reshape(-1)
    got = np.concatenate([got[:8], got[-8:]])
    np.testing.assert_allclose(got, GOLDEN_SLICE, atol=5e-3)
    # diffusers' own pipeline with the same (offline) tokenizer gives the slice too: the ids are the real ones
    with torch.no_grad():
        ref = pipe(prompt="dance monkey", negative_prompt="bad quality", generator=torch.Generator("cpu").manual_seed(0),
                   num_inference_steps=2, guidance_scale=3.0, true_cfg_scale=1.0, height=32, width=32,
                   max_sequence_length=16, output_type="pt").images[0].flatten()
    np.testing.assert_allclose(torch.cat([ref[:8], ref[-8:]]).numpy(), GOLDEN_SLICE, atol=5e-3)
    np.testing.assert_allclose(got, torch.cat([ref[:8], ref[-8:]]).numpy(), atol=1e-4)
    assert images[0].size == (32, 32) and images[0].info["flashdiff"]["true_cfg"] == 1.0


# ------------------------------------------------------------------------------------------ parity, full layout


@pytest.mark.parametrize("height,width", [(32, 48), (64, 32)])
def test_image_and_latents_match_diffusers(full, height, width):
    pipe, path = full
    lat = noise((1, 16, height // 8, width // 8), seed=height + width)
    ref = run_reference(pipe, PROMPT, lat, height, width, 3, true_cfg_scale=1.0, max_sequence_length=64)
    ref_latents = run_reference(pipe, PROMPT, lat, height, width, 3, output_type="latent", true_cfg_scale=1.0,
                                max_sequence_length=64)
    seen = []
    _, ours = run_ours(path, PROMPT, lat, height, width, 3, capture=lambda i, n, x: seen.append(np.array(x)),
                       true_cfg=1.0)
    assert ref.std() > 1e-2, "reference image is flat: the test would not see errors"
    np.testing.assert_allclose(seen[-1], ref_latents.numpy(), atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    images = Pipeline.from_pretrained(str(path), dtype="float32").generate(
        PROMPT, true_cfg=1.0, steps=3, height=height, width=width, latents=lat, max_sequence_length=64, progress=False)
    assert images[0].size == (width, height)
    assert np.abs(np.asarray(images[0], np.int16) - (ref[0] * 255).round().astype(np.int16)).max() <= 2


def test_true_cfg_and_batch_match_diffusers(full):
    """true CFG with the norm rescale; prompt and negative of different lengths (each cut to its own length,
    as diffusers encodes them separately); 2 images."""
    pipe, path = full
    lat = noise((2, 16, 4, 6), seed=3)
    ref = run_reference(pipe, PROMPT, lat, 32, 48, 3, negative_prompt=NEGATIVE, true_cfg_scale=4.0,
                        num_images_per_prompt=2, max_sequence_length=64)
    ref_latents = run_reference(pipe, PROMPT, lat, 32, 48, 3, output_type="latent", negative_prompt=NEGATIVE,
                                true_cfg_scale=4.0, num_images_per_prompt=2, max_sequence_length=64)
    seen = []
    _, ours = run_ours(path, PROMPT, lat, 32, 48, 3, capture=lambda i, n, x: seen.append(np.array(x)),
                       negative_prompt=NEGATIVE, true_cfg=4.0)
    np.testing.assert_allclose(seen[-1], ref_latents.numpy(), atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    # truncation to max_sequence_length, and the default negative prompt " "
    ref = run_reference(pipe, PROMPT, lat[:1], 32, 48, 2, negative_prompt=" ", true_cfg_scale=2.5, max_sequence_length=4)
    _, ours = run_ours(path, PROMPT, lat[:1], 32, 48, 2, true_cfg=2.5, max_sequence_length=4)
    np.testing.assert_allclose(ours, ref, atol=1e-3)


def test_defaults_and_metadata(full):
    _, path = full
    pipe = Pipeline.from_pretrained(str(path), dtype="float32")
    p = pipe._params(PROMPT, None, None, None, None, None, None, 0, 1, None, None)
    assert (p.steps, p.true_cfg, p.negative_prompt, p.height, p.width, p.max_sequence_length) == (
        50, 4.0, [" "], 1024, 1024, 512)
    assert pipe._params(PROMPT, None, 1, None, 1.0, 32, 32, 0, 1, None, None).negative_prompt is None  # CFG off
    img = pipe.generate(PROMPT, steps=1, height=32, width=32, seed=3, max_sequence_length=16, progress=False)[0]
    meta = img.info["flashdiff"]
    assert meta["family"] == "qwen_image" and meta["negative_prompt"] == " " and meta["true_cfg"] == 4.0
    assert "guidance" not in meta and meta["seed"] == 3


# ------------------------------------------------------------------------------------------ quantization, convert


def test_quantized_save_reloads_to_the_same_output(full, tmp_path):
    _, path = full
    kw = dict(steps=2, height=32, width=32, seed=5, max_sequence_length=16, progress=False)
    pipe = Pipeline.from_pretrained(str(path), dtype="float32", quantize=8, group_size=32)
    kinds = {k: type(m).__name__ for k, m in pipe.transformer().named_modules()}
    assert kinds["transformer_blocks.0.attn.to_qkv"] == "QuantizedLinear"
    assert all(kinds[k] == "Linear" for k in ("img_in", "txt_in", "proj_out", "norm_out.linear",
                                              "time_text_embed.timestep_embedder.linear_1"))
    on_load = pipe.generate(PROMPT, **kw)
    pipe.save_pretrained(tmp_path / "q8", progress=False)
    for sub in ("transformer", "text_encoder"):
        cfg = json.loads((tmp_path / "q8" / sub / "config.json").read_text())
        assert cfg["quantization"] == {"bits": 8, "group_size": 32, "mode": "affine"}, sub
    assert json.loads((tmp_path / "q8" / "model_index.json").read_text())["_class_name"] == "QwenImagePipeline"
    reloaded = Pipeline.from_pretrained(str(tmp_path / "q8"), dtype="float32")  # loads as saved
    assert reloaded.quantize is None
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in reloaded.transformer().named_modules())
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in reloaded.text_encoder().named_modules())
    assert np.array_equal(np.asarray(on_load[0]), np.asarray(reloaded.generate(PROMPT, **kw)[0]))


def test_unquantized_convert_reproduces_the_original(full, tmp_path):
    _, path = full
    kw = dict(steps=1, height=32, width=48, seed=1, max_sequence_length=16, progress=False)
    pipe = Pipeline.from_pretrained(str(path), dtype="float32")
    pipe.save_pretrained(tmp_path / "copy", progress=False)
    assert pipe._text_encoder is None and pipe._transformer is None  # released after saving
    again = Pipeline.from_pretrained(str(tmp_path / "copy"), dtype="float32").generate(PROMPT, **kw)
    assert np.array_equal(np.asarray(pipe.generate(PROMPT, **kw)[0]), np.asarray(again[0]))


def test_text_encoder_is_released_before_the_transformer_loads(full):
    _, path = full
    pipe = Pipeline.from_pretrained(str(path), dtype="float32")
    loaded = []
    original = pipe.transformer

    def transformer():
        loaded.append(pipe._text_encoder is None)
        return original()

    pipe.transformer = transformer
    pipe.generate(PROMPT, steps=1, height=32, width=32, seed=0, max_sequence_length=16, progress=False)
    assert loaded and all(loaded)


# ------------------------------------------------------------------------------------------ presets, sizes, errors


def test_preset_and_aspect_ratios(full):
    preset = presets()["qwen-image"]
    assert preset["repo_id"] == "Qwen/Qwen-Image" and preset["family"] == "qwen_image"
    assert preset["defaults"]["steps"] == 50 and preset["defaults"]["true_cfg"] == 4.0
    assert preset["aspect_ratios"]["16:9"] == [1664, 928]
    pipe = Pipeline.from_pretrained(str(full[1]), dtype="float32")
    assert pipe.size_for_aspect("16:9") == (928, 1664)  # (height, width)
    assert pipe.size_for_aspect("4:3") == (1136, 1472)  # 1140 floored to a multiple of 16, as diffusers renders it
    p = pipe._params(PROMPT, None, 1, None, None, None, None, 0, 1, None, None, aspect="9:16")
    assert (p.height, p.width) == (1664, 928)


@pytest.mark.parametrize("kw,message", [
    (dict(height=40), "height must be a positive multiple of 16"),
    (dict(width=24), "width must be a positive multiple of 16"),
    (dict(aspect="5:4"), "unknown aspect ratio '5:4'"),
    (dict(aspect="16:9", height=32), "either an aspect ratio or height/width"),
    (dict(max_sequence_length=1025), "max_sequence_length must be between 1 and 1024"),
    (dict(latents=np.zeros((1, 16, 8, 8), np.float32)), r"latents must have shape \(1, 16, 4, 4\)"),
])
def test_bad_inputs(full, kw, message):
    pipe = Pipeline.from_pretrained(str(full[1]), dtype="float32")
    args = dict(steps=1, **kw)
    if "aspect" not in kw:
        args = {"height": 32, "width": 32, **args}
    with pytest.raises(FlashdiffError, match=message):
        pipe.generate(PROMPT, progress=False, **args)


def test_cli_aspect_errors_before_loading(tmp_path, capsys):
    # an unknown ratio of the preset fails before any download
    assert main(["generate", "-m", "qwen-image", "-p", "x", "--aspect", "7:5", "-o", str(tmp_path / "a.png")]) == 2
    assert "unknown aspect ratio '7:5' for qwen-image" in capsys.readouterr().err
    assert main(["generate", "-m", "qwen-image", "-p", "x", "--aspect", "1:1", "--height", "64",
                 "-o", str(tmp_path / "a.png")]) == 2
    assert "either --aspect or --height/--width" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cli_generates_from_a_folder(full, tmp_path, capsys):
    _, path = full
    out = tmp_path / "x.png"
    assert main(["generate", "-m", str(path), "-p", PROMPT, "-s", "1", "--height", "32", "--width", "48", "--seed", "2",
                 "--max-sequence-length", "16", "--dtype", "float32", "-o", str(out), "--quiet"]) == 0
    from flashdiff.engine.images import read_metadata

    meta = read_metadata(out)
    assert (meta["width"], meta["height"], meta["family"]) == (48, 32, "qwen_image")


def test_incomplete_folder_is_named(full, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(full[1], copy)
    shutil.rmtree(copy / "text_encoder")
    with pytest.raises(FlashdiffError, match="has no text_encoder/ folder"):
        Pipeline.from_pretrained(str(copy))
