"""Flow-matching schedulers (sigma schedules computed on the host in float32, like diffusers)."""

import math
from dataclasses import dataclass, fields

import mlx.core as mx
import numpy as np

from .errors import FlashdiffError


def calculate_shift(image_seq_len: int, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """mu for dynamic shifting: a straight line through (base_seq_len, base_shift), (max_seq_len, max_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


@dataclass
class FlowMatchEulerConfig:
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    time_shift_type: str = "exponential"
    stochastic_sampling: bool = False
    invert_sigmas: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "FlowMatchEulerConfig":
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names and v is not None})
        unsupported = [k for k in ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if getattr(cfg, k)]
        if unsupported:
            raise FlashdiffError(f"scheduler option(s) {unsupported} are not supported by flashdiff's FlowMatchEuler scheduler")
        if cfg.time_shift_type not in ("exponential", "linear"):
            raise FlashdiffError(f"time_shift_type must be 'exponential' or 'linear', got {cfg.time_shift_type!r}")
        return cfg


class FlowMatchEulerScheduler:
    """FlowMatchEulerDiscreteScheduler as the FLUX / Qwen-Image / HiDream pipelines drive it.

    `set_timesteps(steps, image_seq_len)` builds sigmas = linspace(1, 1/N, N), shifted statically
    (`shift`) or dynamically from the image sequence length, optionally stretched to
    `shift_terminal`; timesteps = sigmas * 1000; a final sigma 0 is appended.
    """

    def __init__(self, config: FlowMatchEulerConfig | None = None):
        self.config = config or FlowMatchEulerConfig()
        self.sigmas = np.zeros(0, np.float32)
        self.timesteps = np.zeros(0, np.float32)

    @classmethod
    def from_dict(cls, d: dict) -> "FlowMatchEulerScheduler":
        return cls(FlowMatchEulerConfig.from_dict(d))

    def mu(self, image_seq_len: int) -> float:
        c = self.config
        return calculate_shift(image_seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)

    def set_timesteps(self, num_steps: int, image_seq_len: int | None = None, mu: float | None = None):
        if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise FlashdiffError(f"steps must be a positive integer, got {num_steps!r}")
        c = self.config
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
        if c.use_dynamic_shifting:
            if mu is None:
                if image_seq_len is None:
                    raise FlashdiffError("dynamic shifting needs the image sequence length (or mu)")
                mu = self.mu(image_seq_len)
            if c.time_shift_type == "exponential":
                sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
            else:
                sigmas = mu / (mu + (1 / sigmas - 1))
        else:
            sigmas = c.shift * sigmas / (1 + (c.shift - 1) * sigmas)
        if c.shift_terminal and sigmas[-1] < 1:  # a 1-step schedule (sigma 1) cannot be stretched
            one_minus = 1 - sigmas
            sigmas = 1 - one_minus / (one_minus[-1] / (1 - c.shift_terminal))
        sigmas = sigmas.astype(np.float32)
        self.timesteps = sigmas * np.float32(c.num_train_timesteps)
        self.sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
        return self.timesteps

    def step(self, model_output: mx.array, step_index: int, sample: mx.array, noise: mx.array | None = None) -> mx.array:
        """One Euler step in float32; returns the new sample in float32."""
        sigma = float(self.sigmas[step_index])
        sigma_next = float(self.sigmas[step_index + 1])
        sample = sample.astype(mx.float32)
        v = model_output.astype(mx.float32)
        if self.config.stochastic_sampling:
            if noise is None:
                noise = mx.random.normal(sample.shape)
            x0 = sample - sigma * v
            return (1.0 - sigma_next) * x0 + sigma_next * noise
        return sample + (sigma_next - sigma) * v
