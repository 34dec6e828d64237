"""The command line and the errors a user can run into: each names the problem, none leaves a partial file."""

import json
import shutil

import numpy as np
import pytest

from flashdiff import Pipeline
from flashdiff.engine.cli import main
from flashdiff.engine.errors import FlashdiffError
from flashdiff.engine.images import read_metadata


pytestmark = pytest.mark.usefixtures("demo_home_env")  # demo_home / demo / demo_home_env: tests/conftest.py


@pytest.fixture(scope="module")
def demo_pipe(demo):
    return Pipeline.from_pretrained(str(demo), dtype="float32")


def run_cli(*args):
    return main([str(a) for a in args])


def test_generate_writes_png_with_metadata(tmp_path, capsys):
    out = tmp_path / "fox.png"
    assert run_cli("generate", "--model", "demo", "--prompt", "a red fox", "--steps", 2, "--seed", 7,
                   "--height", 64, "--width", 96, "-o", out, "--quiet") == 0
    meta = read_metadata(out)
    assert meta["prompt"] == "a red fox" and meta["seed"] == 7 and meta["steps"] == 2 and meta["model"] == "demo"
    assert (meta["width"], meta["height"]) == (96, 64)
    from PIL import Image

    assert Image.open(out).size == (96, 64)
    assert "wrote" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["fox.png"]


def test_several_seeds_write_one_file_each(tmp_path):
    out = tmp_path / "img.png"
    assert run_cli("generate", "-m", "demo", "-p", "x", "-s", 1, "--seed", 3, 4, "--height", 32, "--width", 32,
                   "-o", out, "--quiet") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-3.png", "img-4.png"]
    # each image is the one its seed gives alone
    assert run_cli("generate", "-m", "demo", "-p", "x", "-s", 1, "--seed", 4, "--height", 32, "--width", 32,
                   "-o", tmp_path / "alone.png", "--quiet") == 0
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "img-4.png")), np.asarray(Image.open(tmp_path / "alone.png")))


@pytest.mark.parametrize("args,message", [
    (["--height", 100], "height must be a positive multiple of 16"),
    (["--width", 72], "width must be a positive multiple of 16"),
    (["--max-sequence-length", 900], "max_sequence_length must be between"),
])
def test_bad_generation_settings_exit_2_without_output(tmp_path, capsys, args, message):
    out = tmp_path / "x.png"
    assert run_cli("generate", "-m", "demo", "-p", "x", "-s", 1, *args, "-o", out, "--quiet") == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_zero_steps_rejected_by_argument_parser(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli("generate", "-m", "demo", "-p", "x", "--steps", 0)
    assert e.value.code == 2 and "must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("steps", [0, -1, 2.5])
def test_bad_steps_in_python_api(demo_pipe, steps):
    with pytest.raises(FlashdiffError, match="steps must be a positive integer"):
        demo_pipe.generate("x", steps=steps, height=32, width=32)


def test_bad_latents_shape(demo_pipe):
    with pytest.raises(FlashdiffError, match=r"latents must have shape \(1, 16, 4, 4\)"):
        demo_pipe.generate("x", steps=1, height=32, width=32, latents=np.zeros((1, 16, 8, 8), np.float32))


def test_unknown_model(capsys, tmp_path):
    assert run_cli("generate", "-m", "no-such-model", "-p", "x", "-o", tmp_path / "a.png") == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and "flux-schnell" in err


def test_folder_without_model_index(tmp_path):
    with pytest.raises(FlashdiffError, match="has no model_index.json"):
        Pipeline.from_pretrained(str(tmp_path))


def test_missing_component_folder(demo, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(demo, copy)
    shutil.rmtree(copy / "vae")
    with pytest.raises(FlashdiffError, match="has no vae/ folder"):
        Pipeline.from_pretrained(str(copy))


def test_corrupt_weights_are_named(demo, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(demo, copy)
    f = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    pipe = Pipeline.from_pretrained(str(copy))
    with pytest.raises(FlashdiffError, match="diffusion_pytorch_model.safetensors is truncated"):
        pipe.generate("x", steps=1, height=32, width=32, progress=False)


def test_weights_not_matching_config(demo, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(demo, copy)
    cfg = json.loads((copy / "transformer" / "config.json").read_text())
    cfg["num_single_layers"] = 3
    (copy / "transformer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FlashdiffError, match="transformer weights do not match its config.*missing"):
        Pipeline.from_pretrained(str(copy)).generate("x", steps=1, height=32, width=32, progress=False)


def test_unsupported_quantization_setting(capsys, tmp_path):
    assert run_cli("generate", "-m", "demo", "-p", "x", "-q", 4, "--group-size", 100, "-o", tmp_path / "a.png") == 2
    assert "does not support affine quantization with 4 bits and group size 100" in capsys.readouterr().err


def test_bad_output_extension(capsys, tmp_path):
    assert run_cli("generate", "-m", "demo", "-p", "x", "-o", tmp_path / "a.gif") == 2
    assert "must end in one of" in capsys.readouterr().err


def test_convert_round_trip_via_cli(tmp_path, capsys):
    out = tmp_path / "q8"
    assert run_cli("convert", "-m", "demo", "-q", 8, "--group-size", 32, "-o", out, "--quiet") == 0
    assert (out / "model_index.json").exists() and not list(tmp_path.glob(".*partial"))
    assert run_cli("generate", "-m", out, "-p", "x", "-s", 1, "--height", 32, "--width", 32, "--seed", 1,
                   "-o", tmp_path / "a.png", "--quiet") == 0
    assert read_metadata(tmp_path / "a.png")["steps"] == 1
    # refuses to overwrite a non-empty folder
    assert run_cli("convert", "-m", "demo", "-o", out, "--quiet") == 2
    assert "already exists and is not empty" in capsys.readouterr().err


def test_models_lists_presets(capsys):
    assert run_cli("models") == 0
    out = capsys.readouterr().out
    assert "flux-schnell" in out and "flux-dev" in out and "demo" in out


def test_top_level_help_lists_models_with_defaults(capsys):
    with pytest.raises(SystemExit):
        run_cli("--help")
    out = capsys.readouterr().out
    assert "qwen-image" in out and "Qwen/Qwen-Image" in out and "steps 50" in out and "true_cfg 4.0" in out
    assert "flux-schnell" in out and "steps 4" in out


def test_from_image_reruns_the_recorded_generation(tmp_path):
    first = tmp_path / "first.png"
    assert run_cli("generate", "-m", "demo", "-p", "a quiet harbour", "-s", 2, "--seed", 11, "--height", 32,
                   "--width", 48, "-q", 8, "--group-size", 32, "-o", first, "--quiet") == 0
    again = tmp_path / "again.png"
    assert run_cli("generate", "--from-image", first, "-o", again, "--quiet") == 0
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    meta = read_metadata(again)
    assert (meta["prompt"], meta["seed"], meta["steps"], meta["width"], meta["height"]) == ("a quiet harbour", 11, 2, 48, 32)
    assert meta["quantize"] == {"bits": 8, "group_size": 32, "mode": "affine"}
    # command-line options override the record
    other = tmp_path / "other.png"
    assert run_cli("generate", "--from-image", first, "--seed", 12, "-o", other, "--quiet") == 0
    assert read_metadata(other)["seed"] == 12 and read_metadata(other)["prompt"] == "a quiet harbour"


def test_generate_without_prompt_or_record_is_an_error(capsys, tmp_path):
    assert run_cli("generate", "-m", "demo", "-o", tmp_path / "a.png") == 2
    assert "needs --model and --prompt" in capsys.readouterr().err
    plain = tmp_path / "plain.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(plain)
    assert run_cli("generate", "--from-image", plain, "-o", tmp_path / "b.png") == 2
    assert "has no flashdiff metadata" in capsys.readouterr().err
