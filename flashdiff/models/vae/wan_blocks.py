"""Building blocks of the Wan video VAE (Wan 2.1 / Wan 2.2 / Qwen-Image), channels-last.

Every activation is (B, T, H, W, C). Conv kernels are stored in MLX layout:
CausalConv3d (O, kt, kh, kw, I), Conv2d (O, kh, kw, I); `WanVAE.sanitize` converts PyTorch ones.

Chunked causal execution: the reference (diffusers autoencoder_kl_wan.py) runs the encoder on
frame 0 and then chunks of 4 frames, the decoder on one latent frame at a time, and every causal
temporal conv carries its last CACHE_T input frames from one chunk to the next. Here that carry
lives in an explicit `CausalCache` passed down through every call (no hidden module state).
"""

import math

import mlx.core as mx
import mlx.nn as nn

from ...kernels import attention

CACHE_T = 2
# Marker left by an upsample3d time_conv on the first chunk (the reference's "Rep"): the first
# chunk skips the temporal upsample, the second chunk then sees zero frames as its past.
_REP = "rep"


class CausalCache:
    """Carry of the last CACHE_T input frames of each causal conv between chunks.

    Slots are handed out in call order, exactly like the reference's feat_cache / feat_idx.
    Create one per encode or decode stream and call `begin_chunk()` before every chunk.
    """

    def __init__(self):
        self.slots: list = []
        self.index = 0

    def begin_chunk(self):
        self.index = 0

    def read(self):
        return self.slots[self.index] if self.index < len(self.slots) else None

    def write(self, value):
        if self.index < len(self.slots):
            self.slots[self.index] = value
        else:
            self.slots.append(value)
        self.index += 1

    def arrays(self) -> list:
        return [s for s in self.slots if isinstance(s, mx.array)]

    def run(self, conv: "CausalConv3d", x: mx.array) -> mx.array:
        """conv(x) with the previous chunk's frames as causal context; stores this chunk's tail."""
        prev = self.read()
        keep = x[:, -CACHE_T:]
        if keep.shape[1] < CACHE_T and prev is not None:
            keep = mx.concatenate([prev[:, -1:], keep], axis=1)
        self.write(keep)
        return conv(x, prev)


def _run(conv, x, cache):
    return conv(x) if cache is None else cache.run(conv, x)


class CausalConv3d(nn.Module):
    """nn.Conv3d whose time axis is padded (2·p_t, 0) causally; `prev` frames replace that padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        kt, kh, kw = kernel_size if isinstance(kernel_size, (tuple, list)) else (kernel_size,) * 3
        self.stride = tuple(stride) if isinstance(stride, (tuple, list)) else (stride,) * 3
        pt, ph, pw = padding if isinstance(padding, (tuple, list)) else (padding,) * 3
        self.time_pad = 2 * pt
        self.space_pad = (ph, pw)
        scale = 1.0 / math.sqrt(in_channels * kt * kh * kw)
        self.weight = mx.random.uniform(-scale, scale, (out_channels, kt, kh, kw, in_channels))
        self.bias = mx.zeros((out_channels,))
        self.pointwise = (kt, kh, kw) == (1, 1, 1) and self.stride == (1, 1, 1)

    def __call__(self, x: mx.array, prev: mx.array | None = None) -> mx.array:
        if self.pointwise:  # 1x1x1 conv = matmul over channels
            return x @ self.weight.reshape(self.weight.shape[0], -1).T + self.bias
        pad_t = self.time_pad
        if prev is not None and pad_t > 0:
            x = mx.concatenate([prev.astype(x.dtype), x], axis=1)
            pad_t -= prev.shape[1]
        if pad_t > 0:
            x = mx.pad(x, [(0, 0), (pad_t, 0), (0, 0), (0, 0), (0, 0)])
        y = mx.conv3d(x, self.weight, stride=self.stride, padding=(0, *self.space_pad))
        return y + self.bias


class RMSNorm(nn.Module):
    """WanRMS_norm: x / max(||x||_C, 1e-12) · sqrt(C) · gamma, over the channel (last) axis."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = mx.ones((dim,))
        self.scale = dim**0.5

    def __call__(self, x: mx.array) -> mx.array:
        xf = x.astype(mx.float32)
        ss = mx.sum(xf * xf, axis=-1, keepdims=True)
        normed = (xf * mx.rsqrt(mx.maximum(ss, 1e-24))).astype(x.dtype)
        return normed * (self.scale * self.gamma).astype(x.dtype)


class ResidualBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus a 1x1x1 conv_shortcut when dims differ."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        if in_dim != out_dim:
            self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1)

    def __call__(self, x: mx.array, cache: CausalCache | None = None) -> mx.array:
        h = self.conv_shortcut(x) if "conv_shortcut" in self else x
        x = _run(self.conv1, nn.silu(self.norm1(x)), cache)
        x = _run(self.conv2, nn.silu(self.norm2(x)), cache)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H·W positions of each frame separately."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def __call__(self, x: mx.array, cache: CausalCache | None = None) -> mx.array:
        B, T, H, W, C = x.shape
        h = self.to_qkv(self.norm(x.reshape(B * T, H, W, C)))
        q, k, v = mx.split(h.reshape(B * T, 1, H * W, 3 * C), 3, axis=-1)
        h = attention(q, k, v, scale=C**-0.5).reshape(B * T, H, W, C)
        return x + self.proj(h).reshape(B, T, H, W, C)


class MidBlock(nn.Module):
    """resnets[0] -> (attentions[i] -> resnets[i + 1]) for each attention."""

    def __init__(self, dim: int, num_layers: int = 1):
        super().__init__()
        self.resnets = [ResidualBlock(dim, dim) for _ in range(num_layers + 1)]
        self.attentions = [AttentionBlock(dim) for _ in range(num_layers)]

    def __call__(self, x: mx.array, cache: CausalCache | None = None) -> mx.array:
        x = self.resnets[0](x, cache)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x), cache)
        return x


def _upsample_nearest2x(x: mx.array) -> mx.array:
    N, H, W, C = x.shape
    x = mx.broadcast_to(x[:, :, None, :, None, :], (N, H, 2, W, 2, C))
    return x.reshape(N, 2 * H, 2 * W, C)


class Resample(nn.Module):
    """WanResample: 'upsample2d' / 'upsample3d' / 'downsample2d' / 'downsample3d'.

    `resample` mirrors the reference's nn.Sequential (index 0 = upsample or ZeroPad, no weights;
    index 1 = the Conv2d) so checkpoint keys read `resample.1.weight`.
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str, upsample_out_dim: int | None = None):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        if mode.startswith("upsample"):
            out = dim // 2 if upsample_out_dim is None else upsample_out_dim
            self.resample = [nn.Identity(), nn.Conv2d(dim, out, 3, padding=1)]
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            self.resample = [nn.Identity(), nn.Conv2d(dim, dim, 3, stride=2)]
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def _time_upsample(self, x: mx.array, cache: CausalCache) -> mx.array:
        prev = cache.read()
        if prev is None:  # first chunk: no temporal upsampling (reference "Rep")
            cache.write(_REP)
            return x
        keep = x[:, -CACHE_T:]
        if keep.shape[1] < CACHE_T:
            past = mx.zeros_like(keep) if isinstance(prev, str) else prev[:, -1:]
            keep = mx.concatenate([past, keep], axis=1)
        x = self.time_conv(x, None if isinstance(prev, str) else prev)
        cache.write(keep)
        B, T, H, W, C2 = x.shape  # channels [0:C] -> frame 2t, [C:2C] -> frame 2t+1
        x = x.reshape(B, T, H, W, 2, C2 // 2).transpose(0, 1, 4, 2, 3, 5)
        return x.reshape(B, 2 * T, H, W, C2 // 2)

    def _time_downsample(self, x: mx.array, cache: CausalCache) -> mx.array:
        prev = cache.read()
        cache.write(x[:, -1:])
        if prev is None:  # first chunk passes through; its last frame seeds the next chunk
            return x
        return self.time_conv(mx.concatenate([prev[:, -1:], x], axis=1))

    def __call__(self, x: mx.array, cache: CausalCache | None = None) -> mx.array:
        if self.mode == "upsample3d" and cache is not None:
            x = self._time_upsample(x, cache)
        B, T, H, W, C = x.shape
        h = x.reshape(B * T, H, W, C)
        if self.mode.startswith("upsample"):
            h = _upsample_nearest2x(h)
        else:
            h = mx.pad(h, [(0, 0), (0, 1), (0, 1), (0, 0)])  # ZeroPad2d((0, 1, 0, 1))
        h = self.resample[1](h)
        x = h.reshape(B, T, *h.shape[1:])
        if self.mode == "downsample3d" and cache is not None:
            x = self._time_downsample(x, cache)
        return x


class AvgDown3D(nn.Module):
    """Wan 2.2 shortcut: space/time-to-channel fold, then mean over channel groups. No weights."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.factor_t, self.factor_s = factor_t, factor_s
        factor = factor_t * factor_s * factor_s
        if in_channels * factor % out_channels:
            raise ValueError(f"in_channels {in_channels} x factor {factor} must be divisible by {out_channels}")
        self.out_channels = out_channels
        self.group = in_channels * factor // out_channels

    def __call__(self, x: mx.array) -> mx.array:
        ft, fs = self.factor_t, self.factor_s
        pad_t = (ft - x.shape[1] % ft) % ft
        if pad_t:
            x = mx.pad(x, [(0, 0), (pad_t, 0), (0, 0), (0, 0), (0, 0)])
        B, T, H, W, C = x.shape
        x = x.reshape(B, T // ft, ft, H // fs, fs, W // fs, fs, C).transpose(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(B, T // ft, H // fs, W // fs, self.out_channels, self.group)
        return x.mean(axis=-1)


class DupUp3D(nn.Module):
    """Wan 2.2 shortcut: repeat channels, unfold them into time/space. No weights."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.factor_t, self.factor_s = factor_t, factor_s
        factor = factor_t * factor_s * factor_s
        if out_channels * factor % in_channels:
            raise ValueError(f"out_channels {out_channels} x factor {factor} must be divisible by {in_channels}")
        self.out_channels = out_channels
        self.repeats = out_channels * factor // in_channels

    def __call__(self, x: mx.array, first_chunk: bool = False) -> mx.array:
        ft, fs = self.factor_t, self.factor_s
        B, T, H, W, _ = x.shape
        x = mx.repeat(x, self.repeats, axis=-1).reshape(B, T, H, W, self.out_channels, ft, fs, fs)
        x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(B, T * ft, H * fs, W * fs, self.out_channels)
        return x[:, ft - 1 :] if first_chunk else x


class ResidualDownBlock(nn.Module):
    """Wan 2.2 encoder stage: resnets (+ downsampler) plus an AvgDown3D shortcut of the input."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)
        self.resnets = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks)]
        if down:
            self.downsampler = Resample(out_dim, "downsample3d" if temporal else "downsample2d")

    def __call__(self, x: mx.array, cache: CausalCache | None = None) -> mx.array:
        shortcut = self.avg_shortcut(x)
        for resnet in self.resnets:
            x = resnet(x, cache)
        if "downsampler" in self:
            x = self.downsampler(x, cache)
        return x + shortcut


class UpBlock(nn.Module):
    """Wan 2.1 decoder stage: num_res_blocks + 1 resnets, then optional upsamplers[0]."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None):
        super().__init__()
        self.resnets = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks + 1)]
        if upsample_mode is not None:
            self.upsamplers = [Resample(out_dim, upsample_mode)]

    def __call__(self, x: mx.array, cache: CausalCache | None = None, first_chunk: bool = False) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x, cache)
        if "upsamplers" in self:
            x = self.upsamplers[0](x, cache)
        return x


class ResidualUpBlock(nn.Module):
    """Wan 2.2 decoder stage: resnets (+ upsampler to out_dim) plus a DupUp3D shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, up: bool):
        super().__init__()
        self.resnets = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks + 1)]
        if up:
            self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2)
            self.upsampler = Resample(out_dim, "upsample3d" if temporal else "upsample2d", upsample_out_dim=out_dim)

    def __call__(self, x: mx.array, cache: CausalCache | None = None, first_chunk: bool = False) -> mx.array:
        x_in = x
        for resnet in self.resnets:
            x = resnet(x, cache)
        if "upsampler" in self:
            x = self.upsampler(x, cache) + self.avg_shortcut(x_in, first_chunk=first_chunk)
        return x
