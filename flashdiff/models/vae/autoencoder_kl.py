"""AutoencoderKL (the FLUX / SD VAE) in MLX, channels-last.

Numerically equal to diffusers' `AutoencoderKL` (models/autoencoders/autoencoder_kl.py with the
Encoder / Decoder of vae.py, ResnetBlock2D, Downsample2D, Upsample2D and the single-head
group-normed mid-block attention). Parameter names mirror the diffusers checkpoint keys.

Layout: every activation is NHWC. `encode(x: (B, H, W, in_channels)) -> (mean, logvar)` each
(B, H/f, W/f, latent_channels); `decode(z: (B, h, w, latent_channels)) -> (B, h*f, w*f,
out_channels)` with f = 2 ** (len(block_out_channels) - 1). `z` is what diffusers' `vae.decode`
receives: the pipeline has already undone `scaling_factor` / `shift_factor`.
"""

from dataclasses import dataclass, fields
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ...kernels import attention
from ..common import BlockStream
from .tiling import decode_in_tiles

# Largest number of attention scores (queries x keys) materialised at once in the mid-block
# attention. The head dim equals the channel count (512 for FLUX), which the fused kernels do not
# cover, so the score matrix is real memory: 2**28 scores = 512 MiB in bf16. Longer sequences
# are processed in query chunks (exact: softmax is per query row).
ATTN_SCORE_BUDGET = 1 << 28

_ACTIVATIONS = {"silu": nn.silu, "swish": nn.silu, "gelu": nn.gelu, "relu": nn.relu, "mish": nn.mish}
_LEGACY_ATTN_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclass
class AutoencoderKLConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    latents_mean: Optional[tuple] = None
    latents_std: Optional[tuple] = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderKLConfig":
        """Build from diffusers' vae/config.json (unknown keys such as `_class_name` are ignored)."""
        names = {f.name for f in fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def validate(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"AutoencoderKL config: down_block_types ({len(self.down_block_types)}), up_block_types "
                f"({len(self.up_block_types)}) and block_out_channels ({n}) must have the same length"
            )
        bad = [t for t in self.down_block_types if t != "DownEncoderBlock2D"]
        bad += [t for t in self.up_block_types if t != "UpDecoderBlock2D"]
        if bad:
            raise ValueError(
                f"AutoencoderKL: unsupported block types {sorted(set(bad))}; only DownEncoderBlock2D / "
                "UpDecoderBlock2D (the FLUX / SD VAE) are implemented"
            )
        if self.act_fn not in _ACTIVATIONS:
            raise ValueError(f"AutoencoderKL: unsupported act_fn {self.act_fn!r}; use one of {sorted(_ACTIVATIONS)}")
        bad_ch = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad_ch:
            raise ValueError(
                f"AutoencoderKL: block_out_channels {bad_ch} not divisible by norm_num_groups {self.norm_num_groups}"
            )

    @property
    def scale_factor(self) -> int:
        """Spatial down-sampling factor between pixels and latents."""
        return 2 ** (len(self.block_out_channels) - 1)


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, pytorch_compatible=True)


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, act):
        super().__init__()
        self.act = act
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv after an asymmetric zero pad (right and bottom only), as diffusers with padding=0."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x up-sampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.conv(x)


class VAEAttention(nn.Module):
    """Single-head self-attention over all pixels with a group norm in front and a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        n = h * w
        y = self.group_norm(x).reshape(b, 1, n, c)
        q, k, v = self.to_q(y), self.to_k(y), self.to_v(y)
        del y
        scale = c**-0.5
        chunk = max(1, ATTN_SCORE_BUDGET // n)
        if chunk >= n:
            o = attention(q, k, v, scale)
        else:
            o = mx.concatenate([attention(q[:, :, i : i + chunk], k, v, scale) for i in range(0, n, chunk)], axis=2)
        return x + self.to_out[0](o).reshape(b, h, w, c)


class UNetMidBlock2D(nn.Module):
    def __init__(self, channels: int, groups: int, act, add_attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, groups, act) for _ in range(2)]
        self.attentions = [VAEAttention(channels, groups)] if add_attention else []

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels, out_channels, num_layers, groups, act, add_downsample):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act) for i in range(num_layers)
        ]
        self.downsamplers = [Downsample2D(out_channels)] if add_downsample else []

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.resnets + self.downsamplers:
            x = layer(x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels, out_channels, num_layers, groups, act, add_upsample):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act) for i in range(num_layers)
        ]
        self.upsamplers = [Upsample2D(out_channels)] if add_upsample else []

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.resnets + self.upsamplers:
            x = layer(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        act, g, ch = _ACTIVATIONS[cfg.act_fn], cfg.norm_num_groups, cfg.block_out_channels
        self.act = act
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = [
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, act, i < len(ch) - 1)
            for i in range(len(ch))
        ]
        self.mid_block = UNetMidBlock2D(ch[-1], g, act, cfg.mid_block_add_attention)
        self.conv_norm_out = _group_norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        act, g = _ACTIVATIONS[cfg.act_fn], cfg.norm_num_groups
        rev = list(reversed(cfg.block_out_channels))
        self.act = act
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(rev[0], g, act, cfg.mid_block_add_attention)
        self.up_blocks = [
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, act, i < len(rev) - 1)
            for i in range(len(rev))
        ]
        self.conv_norm_out = _group_norm(rev[-1], g)
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, 3, padding=1)

    def __call__(self, z: mx.array, stream: bool = False) -> mx.array:
        """stream: evaluate layer by layer, two in flight (models/common.BlockStream), so a GPU never
        holds the whole decode's intermediates at once (the full-resolution layers dominate)."""
        step = BlockStream(stream)
        x = self.mid_block(self.conv_in(z))
        step(x)
        for block in self.up_blocks:
            for layer in block.resnets + block.upsamplers:
                x = layer(x)
                step(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


def _check_nhwc(x: mx.array, channels: int, what: str):
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(
            f"AutoencoderKL.{what}: expected an NHWC array (B, H, W, {channels}), got shape {tuple(x.shape)}; "
            "convert NCHW with x.transpose(0, 2, 3, 1)"
        )


class AutoencoderKL(nn.Module):
    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.stream = False  # layer-by-layer evaluation in decode (the pipelines turn it on on GPUs)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        lc = config.latent_channels
        if config.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * lc, 2 * lc, 1)
        if config.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(lc, lc, 1)

    @property
    def dtype(self) -> mx.Dtype:
        return self.decoder.conv_in.weight.dtype

    # ---- encode / decode -------------------------------------------------------------------
    def encode(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Images (B, H, W, in_channels) in [-1, 1] -> posterior (mean, logvar), NHWC.

        logvar is clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution does; the
        pipelines use the mode, i.e. `mean`. H and W should be multiples of `config.scale_factor`.
        """
        _check_nhwc(x, self.config.in_channels, "encode")
        h = self.encoder(x.astype(self.dtype))
        if "quant_conv" in self:
            h = self.quant_conv(h)
        mean, logvar = mx.split(h, 2, axis=-1)
        return mean, mx.clip(logvar, -30.0, 20.0)

    def decode(self, z: mx.array) -> mx.array:
        """Latents (B, h, w, latent_channels), already unscaled -> images (B, h*f, w*f, out_channels)."""
        _check_nhwc(z, self.config.latent_channels, "decode")
        z = z.astype(self.dtype)
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z, stream=self.stream)

    def decode_tiled(self, z: mx.array, tile: int = 64, overlap: int = 16) -> mx.array:
        """Decode in overlapping latent tiles (sizes in latent pixels), blended linearly (vae/tiling.py).

        Peak memory is that of decoding one `tile` x `tile` latent, plus the output image. Results
        differ slightly from `decode` (the mid-block attention and the zero padding see only the tile).
        """
        _check_nhwc(z, self.config.latent_channels, "decode_tiled")
        return decode_in_tiles(lambda t: self.decode(t), z, self.config.scale_factor, self.config.out_channels,
                               tile, overlap, dtype=self.dtype)

    # ---- weights ---------------------------------------------------------------------------
    def sanitize(self, weights: dict) -> dict:
        """diffusers-layout weights -> this module's parameters.

        Renames the legacy attention names (query/key/value/proj_attn), squeezes attention
        weights stored as 1x1 convs to linears, and transposes conv kernels from PyTorch
        (O, I, kh, kw) to MLX (O, kh, kw, I) unless the dict is already in MLX layout.
        """
        if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.attn_1")) for k in weights):
            raise ValueError(
                "AutoencoderKL.sanitize: these are LDM/BFL `ae.safetensors` key names; convert them first with "
                "flashdiff.models.vae.ldm.ldm_vae_to_diffusers(weights)"
            )
        out = {}
        for k, v in weights.items():
            if ".attentions." in k:
                parts = k.split(".")
                parts[-2] = _LEGACY_ATTN_NAMES.get(parts[-2], parts[-2])
                k = ".".join(parts)
                if k.endswith("weight") and v.ndim > 2:
                    v = v.reshape(v.shape[0], v.shape[1])
            out[k] = v
        if _conv_layout(out) == "torch":
            out = {k: v.transpose(0, 2, 3, 1) if v.ndim == 4 else v for k, v in out.items()}
        expected = {k for k, _ in tree_flatten(self.parameters())}
        missing, unexpected = sorted(expected - out.keys()), sorted(out.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                "AutoencoderKL.sanitize: checkpoint does not match the config "
                f"(missing {len(missing)}: {missing[:4]}, unexpected {len(unexpected)}: {unexpected[:4]}); "
                "check block_out_channels / layers_per_block / use_quant_conv / use_post_quant_conv / "
                "mid_block_add_attention in the config"
            )
        return out

    @staticmethod
    def to_checkpoint(weights: dict) -> dict:
        """Inverse of `sanitize` for diffusers-layout input: conv kernels back to (O, I, kh, kw)."""
        return {k: v.transpose(0, 3, 1, 2) if v.ndim == 4 else v for k, v in weights.items()}


def _conv_layout(weights: dict) -> str:
    """'torch' or 'mlx' for the square conv kernels in `weights` (decided by the unambiguous ones).

    A kernel (O, a, b, c) can be PyTorch (b == c) or MLX (a == b); when both hold (e.g. 3 input
    channels, 3x3) the other kernels decide. With no unambiguous kernel at all, PyTorch is assumed.
    """
    votes = set()
    for k, v in weights.items():
        if v.ndim != 4:
            continue
        torch_like, mlx_like = v.shape[2] == v.shape[3], v.shape[1] == v.shape[2]
        if torch_like != mlx_like:
            votes.add("torch" if torch_like else "mlx")
        elif not torch_like:
            raise ValueError(f"AutoencoderKL.sanitize: {k} has shape {tuple(v.shape)}, not a square conv kernel")
    if len(votes) > 1:
        raise ValueError("AutoencoderKL.sanitize: conv kernels mix PyTorch (O,I,kh,kw) and MLX (O,kh,kw,I) layouts")
    return votes.pop() if votes else "torch"
