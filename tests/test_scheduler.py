"""FlowMatchEuler sigmas, timesteps and steps against diffusers' FlowMatchEulerDiscreteScheduler."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as ref_shift

from flashdiff.engine.errors import FlashdiffError
from flashdiff.engine.schedulers import FlowMatchEulerScheduler, calculate_shift

FLUX_DEV = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
            "base_image_seq_len": 256, "max_image_seq_len": 4096}
FLUX_SCHNELL = {"shift": 1.0, "use_dynamic_shifting": False}
QWEN = {"shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9, "base_image_seq_len": 256,
        "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential"}
STATIC_SHIFT = {"shift": 3.0, "use_dynamic_shifting": False}
LINEAR = {**FLUX_DEV, "time_shift_type": "linear"}


def reference(config, steps, seq_len):
    ref = FlowMatchEulerDiscreteScheduler(**config)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    c = ref.config
    mu = ref_shift(seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                   c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    ref.set_timesteps(steps, sigmas=sigmas, mu=mu)
    return ref


@pytest.mark.parametrize("config", [FLUX_DEV, FLUX_SCHNELL, QWEN, STATIC_SHIFT, LINEAR], ids=["dev", "schnell", "qwen", "static", "linear"])
@pytest.mark.parametrize("steps,seq_len", [(1, 256), (4, 4096), (28, 4096), (50, 1024), (7, 9000)])
def test_sigmas_and_timesteps_match_diffusers(config, steps, seq_len):
    ref = reference(config, steps, seq_len)
    ours = FlowMatchEulerScheduler.from_dict(config)
    ours.set_timesteps(steps, image_seq_len=seq_len)
    if config.get("shift_terminal") and steps == 1:
        # diffusers divides by zero here (NaN sigmas); we leave a 1-step schedule unstretched.
        assert np.isnan(ref.sigmas.numpy()[0]) and ours.sigmas.tolist() == [1.0, 0.0]
        return
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=1e-4)


def test_calculate_shift_matches_reference_and_flux_dev_value():
    assert calculate_shift(4096) == pytest.approx(ref_shift(4096))
    assert calculate_shift(4096) == pytest.approx(1.15)
    assert calculate_shift(1000, 256, 8192, 0.5, 0.9) == pytest.approx(ref_shift(1000, 256, 8192, 0.5, 0.9))


def test_euler_steps_match_diffusers():
    steps = 5
    ref = reference(FLUX_DEV, steps, 1024)
    ours = FlowMatchEulerScheduler.from_dict(FLUX_DEV)
    ours.set_timesteps(steps, image_seq_len=1024)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 8)).astype(np.float32)
    xt, xm = torch.from_numpy(x), mx.array(x)
    for i, t in enumerate(ref.timesteps):
        v = rng.standard_normal(x.shape).astype(np.float32)
        xt = ref.step(torch.from_numpy(v), t, xt, return_dict=False)[0]
        xm = ours.step(mx.array(v), i, xm)
    np.testing.assert_allclose(np.array(xm), xt.numpy(), rtol=1e-5, atol=1e-6)


def test_stochastic_step_uses_given_noise():
    ours = FlowMatchEulerScheduler.from_dict({**FLUX_SCHNELL, "stochastic_sampling": True})
    ours.set_timesteps(4)
    x, v, n = mx.ones((1, 4)), mx.full((1, 4), 0.5), mx.full((1, 4), 2.0)
    s0, s1 = float(ours.sigmas[0]), float(ours.sigmas[1])
    expected = (1 - s1) * (1 - s0 * 0.5) + s1 * 2.0
    np.testing.assert_allclose(np.array(ours.step(v, 0, x, noise=n)), expected, rtol=1e-6)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "4"])
def test_bad_step_counts_are_rejected(bad):
    with pytest.raises(FlashdiffError, match="positive integer"):
        FlowMatchEulerScheduler.from_dict(FLUX_SCHNELL).set_timesteps(bad)


def test_unsupported_options_are_rejected():
    with pytest.raises(FlashdiffError, match="not supported"):
        FlowMatchEulerScheduler.from_dict({"use_karras_sigmas": True})
