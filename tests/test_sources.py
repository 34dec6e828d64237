"""Resolving --model: presets and repo ids through huggingface_hub (offline, from a cache laid out as
the Hub's), allow-patterns per component, and the errors for gated / missing / offline repos."""

import shutil

import numpy as np
import pytest

from flashdiff import Pipeline
from flashdiff.engine import sources
from flashdiff.engine.errors import FlashdiffError

KW = dict(steps=1, height=32, width=32, seed=1, max_sequence_length=16, progress=False)


def fake_hub_cache(cache, repo_id, folder, revision="0123456789abcdef0123456789abcdef01234567"):
    """Lay `folder` out as huggingface_hub's cache holds a downloaded snapshot of `repo_id`."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return repo / "snapshots" / revision


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


def test_preset_loads_from_the_hub_cache(hub, demo):
    snapshot = fake_hub_cache(hub, "black-forest-labs/FLUX.1-schnell", demo)
    pipe = Pipeline.from_pretrained("flux-schnell", dtype="float32")
    assert pipe.source.path == snapshot and pipe.defaults["steps"] == 4
    direct = Pipeline.from_pretrained(str(demo), dtype="float32")
    assert np.array_equal(np.asarray(pipe.generate("a fox", **KW)[0]), np.asarray(direct.generate("a fox", **KW)[0]))


def test_repo_id_reads_model_index_then_loads(hub, demo):
    fake_hub_cache(hub, "someone/tiny-flux", demo)
    pipe = Pipeline.from_pretrained("someone/tiny-flux", dtype="float32")
    assert pipe.family == "flux"


def test_offline_and_not_cached_says_what_to_do(hub):
    with pytest.raises(FlashdiffError, match="offline and not in the local Hugging Face cache"):
        Pipeline.from_pretrained("flux-dev")


def test_download_asks_only_for_needed_files(monkeypatch, demo):
    calls = []

    def fake_snapshot(repo_id, allow_patterns=None):
        calls.append((repo_id, allow_patterns))
        return str(demo)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    Pipeline.from_pretrained("flux-schnell")
    repo, patterns = calls[0]
    assert repo == "black-forest-labs/FLUX.1-schnell"
    assert "transformer/*.safetensors*" in patterns and "text_encoder_2/*.safetensors*" in patterns
    # never the 23 GB BFL single files or the ae.safetensors at the repo root
    import fnmatch

    for root_file in ("flux1-schnell.safetensors", "ae.safetensors"):
        assert not any(fnmatch.fnmatch(root_file, p) for p in patterns)


@pytest.mark.parametrize("error,message", [("GatedRepoError", "is gated: accept its license"),
                                           ("RepositoryNotFoundError", "no Hugging Face repo")])
def test_hub_errors_are_translated(monkeypatch, error, message):
    import huggingface_hub
    from huggingface_hub import errors

    def fail(*a, **k):
        raise getattr(errors, error)("boom", response=_Response())

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(FlashdiffError, match=message):
        sources.hub_download("black-forest-labs/FLUX.1-dev", ["*"])


class _Response:
    status_code = 401
    headers = {}
    url = "https://huggingface.co"
    request = None

    def json(self):
        return {}
