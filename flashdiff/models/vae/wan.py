"""Wan video VAE (diffusers AutoencoderKLWan / AutoencoderKLQwenImage), MLX, channels-last.

One class covers Wan 2.1 (also Qwen-Image's VAE: same architecture and key names) and the
Wan 2.2 residual, pixel-patchified variant (is_residual, patch_size 2).

Call conventions (channels-last at the boundary, no NCTHW anywhere):
    mean, logvar = vae.encode(x)   x: (B, F, H, W, 3) in [-1, 1], F = 1 + 4k
                                   -> (B, T, h, w, z_dim) each, logvar clamped to [-30, 20]
    video = vae.decode(z)          z: (B, T, h, w, z_dim) as diffusers' vae.decode receives it
                                   (denormalised: z·std + mean, see `denormalize`)
                                   -> (B, F, H, W, 3) clamped to [-1, 1]
    for frames in vae.decode_frames(z): ...   streams the same output one latent frame at a time
Images are the T = 1 / F = 1 case.
"""

from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn

from ..common import BlockStream
from .wan_blocks import (
    AttentionBlock,
    CausalCache,
    CausalConv3d,
    MidBlock,
    Resample,
    ResidualBlock,
    ResidualDownBlock,
    ResidualUpBlock,
    RMSNorm,
    UpBlock,
)

# Wan 2.1 latent statistics (diffusers defaults; the checkpoints' config.json repeats them).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass
class WanVAEConfig:
    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple = ()
    temperal_downsample: tuple = (False, True, True)  # (sic), as in the checkpoints
    dropout: float = 0.0
    latents_mean: tuple = WAN21_LATENTS_MEAN
    latents_std: tuple = WAN21_LATENTS_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int = 4
    scale_factor_spatial: int = 8

    @classmethod
    def from_dict(cls, d: dict) -> "WanVAEConfig":
        """From an AutoencoderKLWan or AutoencoderKLQwenImage config.json dict; unknown keys ignored."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and v is not None}
        if "input_channels" in d:  # AutoencoderKLQwenImage: one key for encoder in / decoder out
            kw.setdefault("in_channels", d["input_channels"])
            kw.setdefault("out_channels", d["input_channels"])
        for k in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            if k in kw:
                kw[k] = tuple(kw[k])
        cfg = cls(**kw)
        if len(cfg.temperal_downsample) != len(cfg.dim_mult) - 1:
            raise ValueError(
                f"temperal_downsample needs len(dim_mult) - 1 = {len(cfg.dim_mult) - 1} entries, "
                f"got {list(cfg.temperal_downsample)}"
            )
        return cfg


class Encoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig, in_channels: int):
        super().__init__()
        dim, mult, n_res = cfg.base_dim, cfg.dim_mult, cfg.num_res_blocks
        dims = [dim * m for m in (1, *mult)]
        self.conv_in = CausalConv3d(in_channels, dims[0], 3, padding=1)
        self.down_blocks = []
        scale = 1.0
        last = len(mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            temporal = bool(cfg.temperal_downsample[i]) if i != last else False
            if cfg.is_residual:
                self.down_blocks.append(ResidualDownBlock(in_dim, out_dim, n_res, temporal, down=i != last))
                continue
            for _ in range(n_res):
                self.down_blocks.append(ResidualBlock(in_dim, out_dim))
                if scale in cfg.attn_scales:
                    self.down_blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != last:
                self.down_blocks.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
                scale /= 2.0
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.z_dim * 2, 3, padding=1)

    def __call__(self, x: mx.array, cache: CausalCache | None = None) -> mx.array:
        x = self.conv_in(x) if cache is None else cache.run(self.conv_in, x)
        for layer in self.down_blocks:
            x = layer(x, cache)
        x = nn.silu(self.norm_out(self.mid_block(x, cache)))
        return self.conv_out(x) if cache is None else cache.run(self.conv_out, x)


class Decoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig, out_channels: int):
        super().__init__()
        dim = cfg.decoder_base_dim or cfg.base_dim
        mult = cfg.dim_mult
        dims = [dim * m for m in (mult[-1], *mult[::-1])]
        temporal_up = tuple(cfg.temperal_downsample)[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = []
        last = len(mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            up = i != last
            temporal = bool(temporal_up[i]) if up else False
            if cfg.is_residual:
                self.up_blocks.append(ResidualUpBlock(in_dim, out_dim, cfg.num_res_blocks, temporal, up))
            else:
                # Wan 2.1: every upsampler halves the channels, so later stages take in_dim // 2
                mode = ("upsample3d" if temporal else "upsample2d") if up else None
                self.up_blocks.append(UpBlock(in_dim // 2 if i > 0 else in_dim, out_dim, cfg.num_res_blocks, mode))
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], out_channels, 3, padding=1)

    def __call__(self, x: mx.array, cache: CausalCache | None = None, first_chunk: bool = False,
                 stream: bool = False) -> mx.array:
        """stream: evaluate block by block, two in flight (models/common.BlockStream), so a GPU never
        holds all of one chunk's intermediates at once."""
        step = BlockStream(stream)
        x = self.conv_in(x) if cache is None else cache.run(self.conv_in, x)
        x = self.mid_block(x, cache)
        step(x)
        for block in self.up_blocks:
            x = block(x, cache, first_chunk=first_chunk)
            step(x)
        x = nn.silu(self.norm_out(x))
        return self.conv_out(x) if cache is None else cache.run(self.conv_out, x)


def patchify(x: mx.array, p: int) -> mx.array:
    """(B, F, H, W, C) -> (B, F, H/p, W/p, C·p·p), channel index c·p² + pw·p + ph (as diffusers)."""
    B, F, H, W, C = x.shape
    if H % p or W % p:
        raise ValueError(f"height {H} and width {W} must be divisible by patch_size {p}")
    x = x.reshape(B, F, H // p, p, W // p, p, C).transpose(0, 1, 2, 4, 6, 5, 3)
    return x.reshape(B, F, H // p, W // p, C * p * p)


def unpatchify(x: mx.array, p: int) -> mx.array:
    """Inverse of `patchify`."""
    B, F, h, w, Cp = x.shape
    x = x.reshape(B, F, h, w, Cp // (p * p), p, p).transpose(0, 1, 2, 6, 3, 5, 4)
    return x.reshape(B, F, h * p, w * p, Cp // (p * p))


class WanVAE(nn.Module):
    """AutoencoderKLWan / AutoencoderKLQwenImage. Parameter names are the diffusers state_dict keys."""

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        self.config = config
        self.stream = False  # block-by-block evaluation in decode (the pipelines turn it on on GPUs)
        # in/out_channels count the patchified channels (Wan 2.2: 12 = 3 pixels x 2 x 2)
        self.encoder = Encoder3d(config, config.in_channels)
        self.quant_conv = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config, config.out_channels)
        p2 = (config.patch_size or 1) ** 2
        if config.in_channels % p2 or config.out_channels % p2:
            raise ValueError(f"in/out_channels must be multiples of patch_size² = {p2}")
        self.pixel_in_channels = config.in_channels // p2
        self.pixel_out_channels = config.out_channels // p2

    # ---------------------------------------------------------------- encode
    def encode(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """x (B, F, H, W, 3) (in_channels / patch_size²), F = 1 + 4k -> (mean, logvar), each (B, T, h, w, z_dim).

        Frame 0 alone, then chunks of 4 frames, with the causal cache carried between chunks.
        logvar is clamped to [-30, 20] as DiagonalGaussianDistribution does.
        """
        cfg = self.config
        if x.ndim != 5 or x.shape[-1] != self.pixel_in_channels:
            raise ValueError(
                f"encode expects channels-last video (B, F, H, W, {self.pixel_in_channels}), got {tuple(x.shape)}; "
                "for an image use F = 1 (x[:, None])"
            )
        F = x.shape[1]
        if (F - 1) % 4:
            raise ValueError(f"encode needs 1 + 4k frames, got {F}; trim the clip to {1 + max(F - 1, 0) // 4 * 4}")
        x = x.astype(self.encoder.conv_in.weight.dtype)
        if cfg.patch_size:
            x = patchify(x, cfg.patch_size)
        cache = CausalCache()
        outs = []
        for start, stop in [(0, 1)] + [(1 + 4 * i, 5 + 4 * i) for i in range((F - 1) // 4)]:
            cache.begin_chunk()
            outs.append(self.encoder(x[:, start:stop], cache))
            mx.eval(outs[-1], *cache.arrays())
        h = self.quant_conv(mx.concatenate(outs, axis=1))
        mean, logvar = mx.split(h, 2, axis=-1)
        return mean, mx.clip(logvar, -30.0, 20.0)

    # ---------------------------------------------------------------- decode
    def decode_frames(self, z: mx.array):
        """Iterator of decoded pixels, one latent frame at a time: (B, 1, H, W, C), then (B, 4, H, W, C)...

        Memory stays bounded by one chunk plus the causal cache (2 frames per temporal conv).
        """
        if z.ndim != 5 or z.shape[-1] != self.config.z_dim:
            raise ValueError(
                f"decode expects channels-last latents (B, T, h, w, {self.config.z_dim}), got {tuple(z.shape)}; "
                "diffusers' (B, C, T, h, w) latents need z.transpose(0, 2, 3, 4, 1)"
            )
        return self._decode_iter(z)

    def _decode_iter(self, z: mx.array):
        cfg = self.config
        z = self.post_quant_conv(z.astype(self.decoder.conv_in.weight.dtype))
        cache = CausalCache()
        for i in range(z.shape[1]):
            cache.begin_chunk()
            out = self.decoder(z[:, i : i + 1], cache, first_chunk=i == 0, stream=self.stream)
            if cfg.patch_size:
                out = unpatchify(out, cfg.patch_size)
            out = mx.clip(out, -1.0, 1.0)
            mx.eval(out, *cache.arrays())
            yield out

    def decode(self, z: mx.array) -> mx.array:
        """z (B, T, h, w, z_dim) -> video (B, 1 + 4(T-1), H, W, 3) in [-1, 1]."""
        return mx.concatenate(list(self.decode_frames(z)), axis=1)

    # ---------------------------------------------------------------- latent statistics
    def _stats(self, z: mx.array):
        mean = mx.array(self.config.latents_mean, dtype=mx.float32).astype(z.dtype)
        std = mx.array(self.config.latents_std, dtype=mx.float32).astype(z.dtype)
        if mean.shape[0] != z.shape[-1]:
            raise ValueError(f"config has {mean.shape[0]} latents_mean values for {z.shape[-1]} latent channels")
        return mean, std

    def normalize(self, z: mx.array) -> mx.array:
        """(z - latents_mean) / latents_std over the last (channel) axis: VAE space -> DiT space."""
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, z: mx.array) -> mx.array:
        """z · latents_std + latents_mean: DiT space -> what `decode` takes."""
        mean, std = self._stats(z)
        return z * std + mean

    # ---------------------------------------------------------------- checkpoint layout
    @staticmethod
    def sanitize(weights: dict) -> dict:
        """diffusers state_dict -> MLX layout: conv kernels channels-last, norm gammas flat."""
        out = {}
        for k, v in weights.items():
            if k.endswith(".weight") and v.ndim == 5:  # CausalConv3d (O, I, kt, kh, kw)
                v = v.transpose(0, 2, 3, 4, 1)
            elif k.endswith(".weight") and v.ndim == 4:  # Conv2d (O, I, kh, kw)
                v = v.transpose(0, 2, 3, 1)
            elif k.endswith(".gamma"):  # (C, 1, 1[, 1])
                v = v.reshape(-1)
            out[k] = v
        return out

    @staticmethod
    def to_checkpoint(weights: dict) -> dict:
        """Exact inverse of `sanitize` (MLX layout -> diffusers state_dict layout)."""
        out = {}
        for k, v in weights.items():
            if k.endswith(".weight") and v.ndim == 5:
                v = v.transpose(0, 4, 1, 2, 3)
            elif k.endswith(".weight") and v.ndim == 4:
                v = v.transpose(0, 3, 1, 2)
            elif k.endswith(".gamma"):
                # the attention block's norm is 2D-broadcast (C, 1, 1); the others (C, 1, 1, 1)
                v = v.reshape(-1, 1, 1) if k.endswith(".norm.gamma") else v.reshape(-1, 1, 1, 1)
            out[k] = v
        return out

    def load_checkpoint_weights(self, weights: dict, strict: bool = True) -> "WanVAE":
        """Load a diffusers-layout state dict, with a readable error on missing / unexpected keys."""
        w = self.sanitize(weights)
        if strict:
            from mlx.utils import tree_flatten

            expected = {k for k, _ in tree_flatten(self.parameters())}
            missing, unexpected = sorted(expected - w.keys()), sorted(w.keys() - expected)
            if missing or unexpected:
                raise ValueError(
                    f"Wan VAE checkpoint does not match the config: missing {missing[:8]} "
                    f"({len(missing)} total), unexpected {unexpected[:8]} ({len(unexpected)} total). "
                    "Check that config.json (base_dim, dim_mult, num_res_blocks, is_residual) belongs "
                    "to these weights."
                )
        self.load_weights(list(w.items()), strict=strict)
        return self
