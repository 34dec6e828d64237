"""safetensors loading: sharded folders, corrupt/truncated files, atomic sharded saves."""

import json

import mlx.core as mx
import numpy as np
import pytest

from flashdiff.engine.errors import FlashdiffError
from flashdiff.engine.weights import load_folder, load_safetensors, save_weights, weight_files


def sample_weights():
    return {f"layer.{i}.weight": mx.arange(i * 10, i * 10 + 12, dtype=mx.float32).reshape(3, 4) for i in range(5)}


def test_single_file_round_trip(tmp_path):
    w = sample_weights()
    save_weights(tmp_path, w, name="model")
    assert [f.name for f in weight_files(tmp_path)] == ["model.safetensors"]
    got = load_folder(tmp_path)
    assert set(got) == set(w)
    for k in w:
        np.testing.assert_array_equal(np.array(got[k]), np.array(w[k]))


def test_sharded_save_writes_index_and_loads_back(tmp_path):
    w = sample_weights()
    save_weights(tmp_path, w, name="diffusion_pytorch_model", max_shard_bytes=100)
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]  # 2 + 2 + 1 tensors of 48 bytes
    got = load_folder(tmp_path)
    for k in w:
        np.testing.assert_array_equal(np.array(got[k]), np.array(w[k]))
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_missing_shard_is_named(tmp_path):
    save_weights(tmp_path, sample_weights(), name="m", max_shard_bytes=100)
    (tmp_path / "m-00002-of-00003.safetensors").unlink()
    with pytest.raises(FlashdiffError, match="missing shard.*m-00002-of-00003"):
        load_folder(tmp_path)


def test_truncated_file_is_reported(tmp_path):
    save_weights(tmp_path, sample_weights(), name="model")
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-20])
    with pytest.raises(FlashdiffError, match="truncated"):
        load_safetensors(f)


@pytest.mark.parametrize("content", [b"", b"abc", b"\xff" * 8 + b"{}", b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}"])
def test_garbage_files_are_reported(tmp_path, content):
    f = tmp_path / "model.safetensors"
    f.write_bytes(content)
    with pytest.raises(FlashdiffError, match="model.safetensors"):
        load_safetensors(f)


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(FlashdiffError, match="no \\*.safetensors"):
        load_folder(tmp_path)
    with pytest.raises(FlashdiffError, match="does not exist"):
        load_folder(tmp_path / "nope")
