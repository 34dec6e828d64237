import os

import mlx.core as mx
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def torch_state_to_mx(state_dict) -> dict:
    """A torch state dict as float32 MLX arrays, keys unchanged (what a checkpoint would hold)."""
    return {k: mx.array(v.detach().float().cpu().numpy()) for k, v in state_dict.items()}


def to_numpy(x) -> np.ndarray:
    if isinstance(x, mx.array):
        return np.array(x.astype(mx.float32))
    return x.detach().float().cpu().numpy()


def assert_close(ours, ref, atol=1e-4, rtol=1e-4):
    a, b = to_numpy(ours), to_numpy(ref)
    assert a.shape == b.shape, f"shape {a.shape} != reference {b.shape}"
    np.testing.assert_allclose(a, b, atol=atol, rtol=rtol)


@pytest.fixture(autouse=True, scope="session")
def _kernel_sources(tmp_path_factory):
    """Kernel texts that flashdiff.kernels._jit writes go to a session folder, not the user's cache."""
    os.environ.setdefault("FLASHDIFF_KERNEL_CACHE", str(tmp_path_factory.mktemp("kernel-sources")))
    yield


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    mx.random.seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory):
    """A FLASHDIFF_HOME with the offline demo model built once per test session (per xdist worker)."""
    from flashdiff.engine.demo import build_demo

    home = tmp_path_factory.mktemp("flashdiff-home")
    build_demo(home)
    return home


@pytest.fixture(scope="session")
def demo(demo_home):
    """The demo model folder (tests that change files work on a copy)."""
    from flashdiff.engine.demo import build_demo

    return build_demo(demo_home)


@pytest.fixture
def demo_home_env(demo_home, monkeypatch):
    """FLASHDIFF_HOME pointing at `demo_home`, so `--model demo` finds the built model."""
    monkeypatch.setenv("FLASHDIFF_HOME", str(demo_home))
