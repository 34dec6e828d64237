"""Release review of the FLUX / Qwen-Image pipelines and the CLI: the edge cases the parity tests do not reach.

Numerical questions are answered against diffusers (tiny float32 pipelines from flux_reference /
qwen_reference); user-facing ones through the CLI with the offline demo model.
"""

import json
import shutil
import tempfile
import warnings

import mlx.core as mx
import numpy as np
import pytest
import torch
from flux_reference import build_reference_pipeline, pack
from PIL import Image

from flashdiff import Pipeline
from flashdiff.engine.cli import main
from flashdiff.engine.errors import FlashdiffError
from flashdiff.engine.images import read_metadata, save_image

SMALL = ("--steps", 1, "--height", 32, "--width", 32, "--quiet")


pytestmark = pytest.mark.usefixtures("demo_home_env")  # demo_home / demo / demo_home_env: tests/conftest.py


def run_cli(*args):
    return main([str(a) for a in args])


def pixels(path):
    return np.asarray(Image.open(path))


# ------------------------------------------------------------------ quantized folders converted / loaded again

@pytest.fixture(scope="module")
def q4(tmp_path_factory, demo):
    out = tmp_path_factory.mktemp("q4") / "q4"
    assert main(["convert", "-m", str(demo), "-q", "4", "--group-size", "32", "-o", str(out), "--quiet"]) == 0
    return out


def test_requantizing_a_quantized_folder_is_a_clear_error(q4, tmp_path, capsys):
    # before: convert wrote 4-bit weights under an 8-bit config (a folder that no longer loads), and generate
    # silently ran 4-bit while the metadata claimed 8-bit
    assert run_cli("convert", "-m", q4, "-q", 8, "--group-size", 32, "-o", tmp_path / "q8", "--quiet") == 2
    err = capsys.readouterr().err
    assert "already quantized (4-bit affine, group size 32)" in err and "convert the original model" in err
    assert not list(tmp_path.iterdir())
    assert run_cli("generate", "-m", q4, "-q", 8, "-p", "x", *SMALL, "-o", tmp_path / "a.png") == 2
    assert "already quantized" in capsys.readouterr().err and not list(tmp_path.iterdir())
    # the same setting again is no re-quantization: it loads as saved
    assert run_cli("generate", "-m", q4, "-q", 4, "--group-size", 32, "-p", "x", *SMALL, "--seed", 1,
                   "-o", tmp_path / "same.png") == 0


def test_quantized_component_without_index_record_is_checked_at_load(q4, tmp_path):
    copy = tmp_path / "q4"
    shutil.copytree(q4, copy)
    index = json.loads((copy / "model_index.json").read_text())
    del index["_flashdiff"]
    (copy / "model_index.json").write_text(json.dumps(index))
    pipe = Pipeline.from_pretrained(str(copy), quantize=8, group_size=32)
    with pytest.raises(FlashdiffError, match="stored quantized .4-bit affine, group size 32.*cannot be re-quantized"):
        pipe.generate("x", steps=1, height=32, width=32, progress=False)


def test_converting_a_quantized_folder_again_keeps_it_loadable(q4, tmp_path):
    # before: the copy's configs lost "quantization" while its weights stayed quantized -> it did not load
    assert run_cli("convert", "-m", q4, "-o", tmp_path / "copy", "--quiet") == 0
    for sub in ("transformer", "text_encoder_2"):
        assert json.loads((tmp_path / "copy" / sub / "config.json").read_text())["quantization"] == {
            "bits": 4, "group_size": 32, "mode": "affine"}
    for src, name in ((q4, "a.png"), (tmp_path / "copy", "b.png")):
        assert run_cli("generate", "-m", src, "-p", "a fox", *SMALL, "--seed", 3, "-o", tmp_path / name) == 0
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    # the metadata of an image from a quantized folder says it was quantized (before: null)
    assert read_metadata(tmp_path / "a.png")["quantize"] == {"bits": 4, "group_size": 32, "mode": "affine"}


# ------------------------------------------------------------------ seeds and output files

def test_one_seed_with_num_images_names_files_by_seed(tmp_path):
    # before: img-0.png, img-1.png although the seeds were 5 and 6
    assert run_cli("generate", "-m", "demo", "-p", "x", *SMALL, "--seed", 5, "-n", 2, "-o", tmp_path / "img.png") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-5.png", "img-6.png"]
    assert read_metadata(tmp_path / "img-6.png")["seed"] == 6
    assert run_cli("generate", "-m", "demo", "-p", "x", *SMALL, "--seed", 6, "-o", tmp_path / "alone.png") == 0
    assert np.array_equal(pixels(tmp_path / "img-6.png"), pixels(tmp_path / "alone.png"))


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, "7"])
def test_bad_seeds_are_named(demo, seed):
    # before: -1 and 2**64 raised a TypeError from mx.random.key deep inside generation
    pipe = Pipeline.from_pretrained(str(demo), dtype="float32")
    with pytest.raises(FlashdiffError, match="seeds must be integers from 0 to 2\\*\\*64 - 1"):
        pipe.generate("x", steps=1, height=32, width=32, seed=seed, progress=False)


def test_negative_seed_on_the_command_line(tmp_path, capsys):
    assert run_cli("generate", "-m", "demo", "-p", "x", *SMALL, "--seed", -3, "-o", tmp_path / "a.png") == 2
    assert "seeds must be integers" in capsys.readouterr().err


def test_unwritable_output_folder_fails_before_loading_the_model(tmp_path, monkeypatch, capsys):
    # (the tests run as root, which ignores directory permissions, so the refusal is simulated at mkstemp)
    ro = tmp_path / "ro"
    ro.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*a, dir=None, **kw):
        if dir is not None and str(dir) == str(ro):
            raise PermissionError(13, "Permission denied")
        return real(*a, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(Pipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model for an unwritable output"))
    assert run_cli("generate", "-m", "demo", "-p", "x", *SMALL, "-o", ro / "a.png") == 2
    assert "cannot write to the output folder" in capsys.readouterr().err
    # and save_image itself says so in one line (before: a PermissionError traceback after the generation)
    with pytest.raises(FlashdiffError, match="cannot write .*a.png: Permission denied"):
        save_image(Image.new("RGB", (8, 8)), ro / "a.png", {"prompt": "x"})
    assert not list(ro.iterdir())


def test_output_path_that_is_a_folder(tmp_path, capsys):
    (tmp_path / "x.png").mkdir()
    assert run_cli("generate", "-m", "demo", "-p", "x", *SMALL, "-o", tmp_path / "x.png") == 2
    assert "is a folder" in capsys.readouterr().err


def test_missing_output_folder(tmp_path, capsys):
    assert run_cli("generate", "-m", "demo", "-p", "x", *SMALL, "-o", tmp_path / "no" / "x.png") == 2
    assert "does not exist" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_ctrl_c_during_generation_leaves_no_file(tmp_path, monkeypatch, capsys):
    from flashdiff.models.flux.pipeline import FluxPipeline

    def interrupted(self, p, progress=True, callback=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(FluxPipeline, "_generate", interrupted)
    assert run_cli("generate", "-m", "demo", "-p", "x", *SMALL, "-o", tmp_path / "a.png") == 130
    assert "interrupted" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_non_ascii_prompt_round_trips_through_png_metadata(tmp_path):
    prompt = "ein Fuchs im Schnee, 雪の中の狐, лиса 🦊"
    assert run_cli("generate", "-m", "demo", "-p", prompt, *SMALL, "--seed", 2, "-o", tmp_path / "a.png") == 0
    assert read_metadata(tmp_path / "a.png")["prompt"] == prompt
    text = Image.open(tmp_path / "a.png").text
    assert text["prompt"] == prompt
    # per-field chunks are JSON for non-strings (before: Python reprs such as "{'bits': 4, ...}")
    assert json.loads(text["seed"]) == 2 and json.loads(text["steps"]) == 1
    save_image(Image.new("RGB", (8, 8)), tmp_path / "q.png", {"quantize": {"bits": 4, "mode": "affine"}, "x": True})
    text = Image.open(tmp_path / "q.png").text
    assert json.loads(text["quantize"]) == {"bits": 4, "mode": "affine"} and json.loads(text["x"]) is True


def test_convert_into_empty_folder_and_onto_a_file(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_cli("convert", "-m", "demo", "-o", tmp_path / "empty", "--quiet") == 0
    assert (tmp_path / "empty" / "model_index.json").exists()
    (tmp_path / "file").write_text("x")
    assert run_cli("convert", "-m", "demo", "-o", tmp_path / "file", "--quiet") == 2
    assert "is a file" in capsys.readouterr().err


def test_unwritable_flashdiff_home_for_the_demo(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("FLASHDIFF_HOME", str(blocker / "home"))  # a folder cannot be made under a file
    assert run_cli("generate", "-m", "demo", "-p", "x", *SMALL, "-o", tmp_path / "a.png") == 2
    err = capsys.readouterr().err
    assert "cannot build the demo model" in err and "FLASHDIFF_HOME" in err and "Traceback" not in err


def test_negative_prompt_must_be_one_string(demo):
    pipe = Pipeline.from_pretrained(str(demo), dtype="float32")
    with pytest.raises(FlashdiffError, match="negative_prompt must be one string"):
        pipe.generate("x", negative_prompt=["a", "b"], true_cfg=2.0, steps=1, height=32, width=32, progress=False)


# ------------------------------------------------------------------ FLUX against diffusers

H = W = 64


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    return build_reference_pipeline(tmp_path_factory.mktemp("flux_review"), guidance_embeds=False)


def _noise(n=1, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 16, H // 8, W // 8)).astype(np.float32)


def _reference(pipe, prompt, latents, **kw):
    with torch.no_grad():
        return pipe(prompt=prompt, height=H, width=W, num_inference_steps=2, latents=pack(latents), output_type="np",
                    **kw).images


def _ours(path, prompt, latents, **kw):
    pipe = Pipeline.from_pretrained(str(path), dtype="float32")
    images = pipe.generate(prompt, steps=2, height=H, width=W, latents=latents, progress=False, **kw)
    return pipe, images, np.stack([np.asarray(im, np.float32) / 255 for im in images])


def test_empty_prompt_matches_diffusers(schnell):
    ref_pipe, path = schnell
    lat = _noise(seed=3)
    ref = _reference(ref_pipe, "", lat, max_sequence_length=16)
    _, _, ours = _ours(path, "", lat, max_sequence_length=16)
    assert ref.std() > 1e-3
    np.testing.assert_allclose(ours, ref, atol=2.5 / 255)  # 8-bit rounding of ours, 2/255 as the parity tests


def test_truncated_long_prompt_matches_diffusers_and_warns(schnell):
    ref_pipe, path = schnell
    lat = _noise(seed=4)
    prompt = "a red fox in deep snow under a pale winter sky, detailed fur, soft light, " * 12  # > 77 CLIP tokens
    ref = _reference(ref_pipe, prompt, lat, max_sequence_length=8)
    with pytest.warns(UserWarning) as record:  # before: truncated silently (diffusers logs a warning)
        _, _, ours = _ours(path, prompt, lat, max_sequence_length=8)
    messages = " ".join(str(w.message) for w in record)
    assert "CLIP tokens; only the first 77" in messages and "T5 tokens; only the first 8" in messages
    np.testing.assert_allclose(ours, ref, atol=2.5 / 255)


def test_unused_negative_prompt_is_not_encoded_nor_recorded(schnell):
    _, path = schnell
    pipe = Pipeline.from_pretrained(str(path), dtype="float32")
    seen = []
    real = pipe.encode_prompt
    pipe.encode_prompt = lambda prompts, msl: (seen.append(list(prompts)), real(prompts, msl))[1]
    with pytest.warns(UserWarning, match="negative_prompt is ignored: true CFG needs true_cfg > 1"):
        images = pipe.generate("a fox", negative_prompt="blurry", true_cfg=1.0, steps=1, height=32, width=32,
                               seed=0, max_sequence_length=16, progress=False)
    assert seen == [["a fox"]]  # before: ["a fox", "blurry"], encoded for nothing
    assert "negative_prompt" not in images[0].info["flashdiff"]
    with pytest.warns(UserWarning, match="true_cfg is ignored: true CFG needs a negative prompt"):
        pipe.generate("a fox", true_cfg=4.0, steps=1, height=32, width=32, seed=0, max_sequence_length=16,
                      progress=False)


def test_guidance_on_schnell_is_ignored_with_a_warning(schnell):
    ref_pipe, path = schnell
    lat = _noise(seed=5)
    ref = _reference(ref_pipe, "a fox", lat, guidance_scale=7.0, max_sequence_length=16)  # diffusers ignores it
    with pytest.warns(UserWarning, match="guidance is ignored: this FLUX model .schnell. has no guidance embedding"):
        _, images, ours = _ours(path, "a fox", lat, guidance=7.0, max_sequence_length=16)
    np.testing.assert_allclose(ours, ref, atol=2.5 / 255)
    assert "guidance" not in images[0].info["flashdiff"]  # before: recorded 7.0, which had no effect
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no warning when the user does not pass guidance
        Pipeline.from_pretrained(str(path), dtype="float32").generate(
            "a fox", steps=1, height=32, width=32, seed=0, max_sequence_length=16, progress=False)


# ------------------------------------------------------------------ Qwen-Image timestep rounding in bf16

class _Recorder:
    """Stands in for the transformer: records the timestep it is given and predicts zero velocity."""

    def __init__(self, model):
        self.model, self.dtype, self.seen = model, model.dtype, []

    def rope(self, *a, **k):
        return self.model.rope(*a, **k)

    def __call__(self, x, c, mask, t, rope=None):
        self.seen.append(np.array(t.astype(mx.float32)))
        assert t.dtype == self.dtype
        return mx.zeros_like(x)


def test_qwen_bf16_timestep_is_rounded_as_diffusers(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
    from qwen_reference import build_reference_pipeline as build_qwen

    _, path = build_qwen(tmp_path, "full")
    pipe = Pipeline.from_pretrained(str(path), dtype="bfloat16")
    rec = _Recorder(pipe.transformer())
    pipe._transformer = rec
    steps, size = 20, 64
    pipe.generate("a fox", steps=steps, height=size, width=size, seed=0, true_cfg=1.0, max_sequence_length=8,
                  progress=False)

    # diffusers' QwenImagePipeline: timestep = t.expand(B).to(latents.dtype); transformer(timestep=timestep / 1000)
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler")
    c = sched.config
    seq_len = (size // 16) ** 2
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps),
                        mu=calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift))
    want = (sched.timesteps.to(torch.bfloat16) / 1000).float().numpy()
    got = np.array([s[0] for s in rec.seen])
    assert len(got) == steps
    np.testing.assert_array_equal(got, want)  # before: bf16(t / 1000), one bf16 step off on several steps
