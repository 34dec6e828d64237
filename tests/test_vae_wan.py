"""Parity of flashdiff's Wan VAE with diffusers AutoencoderKLQwenImage / AutoencoderKLWan (float32, CPU)."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import assert_close, torch_state_to_mx

from flashdiff.models.vae.wan import WanVAE, WanVAEConfig, patchify, unpatchify

# diffusers' Qwen-Image pipeline test dummy VAE
QWEN_DUMMY = dict(
    base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
    latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
)  # fmt: skip
# Wan 2.1 style: three spatial, two temporal downsamples (9 frames <-> 3 latent frames)
WAN21_TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
# Wan 2.2 style: residual blocks, AvgDown3D / DupUp3D shortcuts, pixel patchify 2, wider decoder
WAN22_TINY = dict(
    base_dim=8, decoder_base_dim=12, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
    temperal_downsample=[True, True], is_residual=True, patch_size=2, in_channels=12, out_channels=12,
    latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_spatial=8, scale_factor_temporal=4,
)  # fmt: skip


def _randomize(module):
    """Non-trivial norm gammas / biases so a wrong layout cannot hide behind ones and zeros."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))


def _build(cls_name, cfg_dict, tmp_path=None):
    import diffusers

    ref = getattr(diffusers, cls_name)(**cfg_dict).eval()
    _randomize(ref)
    state = torch_state_to_mx(ref.state_dict())
    if tmp_path is not None:  # config.json round trip in the real layout
        (tmp_path / "config.json").write_text(json.dumps(dict(ref.config)))
        cfg = WanVAEConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    else:
        cfg = WanVAEConfig.from_dict(dict(ref.config))
    ours = WanVAE(cfg)
    ours.load_checkpoint_weights(state)
    return ref, ours, state


def _to_torch(x_cl):
    """Channels-last numpy (B, T, H, W, C) -> torch (B, C, T, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_cl, -1, 1)))


def _cl(t):
    """torch (B, C, T, H, W) -> torch (B, T, H, W, C)."""
    return t.permute(0, 2, 3, 4, 1)


def _check_encode(ref, ours, x):
    with torch.no_grad():
        post = ref.encode(_to_torch(x)).latent_dist
    mean, logvar = ours.encode(mx.array(x))
    assert_close(mean, _cl(post.mean))
    assert_close(logvar, _cl(post.logvar))


def _check_decode(ref, ours, z):
    with torch.no_grad():
        out = ref.decode(_to_torch(z)).sample
    assert_close(ours.decode(mx.array(z)), _cl(out))


def test_roundtrip_checkpoint_layout():
    for cls_name, cfg in [("AutoencoderKLQwenImage", QWEN_DUMMY), ("AutoencoderKLWan", WAN22_TINY)]:
        _, ours, state = _build(cls_name, cfg)
        back = WanVAE.to_checkpoint(WanVAE.sanitize(state))
        assert back.keys() == state.keys()
        for k in state:
            assert back[k].shape == state[k].shape, k
            assert np.array_equal(np.array(back[k]), np.array(state[k])), k


def test_qwenimage_single_frame(tmp_path):
    ref, ours, _ = _build("AutoencoderKLQwenImage", QWEN_DUMMY, tmp_path)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 1, 16, 24, 3)).astype(np.float32)
    _check_encode(ref, ours, x)  # -> (2, 1, 4, 6, 4)
    z = rng.standard_normal((2, 1, 4, 6, 4)).astype(np.float32)
    _check_decode(ref, ours, z)


def test_qwenimage_video():
    ref, ours, _ = _build("AutoencoderKLQwenImage", QWEN_DUMMY)
    rng = np.random.default_rng(1)
    _check_encode(ref, ours, rng.uniform(-1, 1, (1, 5, 16, 16, 3)).astype(np.float32))  # -> 3 latent frames
    _check_decode(ref, ours, rng.standard_normal((1, 3, 4, 4, 4)).astype(np.float32))  # -> 5 frames


def test_wan21_video():
    ref, ours, _ = _build("AutoencoderKLWan", WAN21_TINY)
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (1, 9, 16, 16, 3)).astype(np.float32)
    _check_encode(ref, ours, x)  # 9 frames -> 3 latent frames
    z = rng.standard_normal((1, 3, 2, 2, 4)).astype(np.float32)
    _check_decode(ref, ours, z)  # 3 latent frames -> 9 frames
    # streaming: first latent frame -> 1 frame, every later one -> 4 frames, same pixels
    chunks = list(ours.decode_frames(mx.array(z)))
    assert [c.shape[1] for c in chunks] == [1, 4, 4]
    assert_close(mx.concatenate(chunks, axis=1), ours.decode(mx.array(z)), atol=0, rtol=0)


def test_wan21_diffusers_dummy_config():
    """The exact VAE of diffusers' Wan 2.2 pipeline tests (base_dim 3, z 16)."""
    cfg = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    ref, ours, _ = _build("AutoencoderKLWan", cfg)
    rng = np.random.default_rng(3)
    _check_encode(ref, ours, rng.uniform(-1, 1, (1, 9, 16, 16, 3)).astype(np.float32))
    _check_decode(ref, ours, rng.standard_normal((1, 3, 2, 2, 16)).astype(np.float32))


def test_wan22_residual_patchified_video():
    ref, ours, _ = _build("AutoencoderKLWan", WAN22_TINY)
    rng = np.random.default_rng(4)
    _check_encode(ref, ours, rng.uniform(-1, 1, (1, 9, 32, 32, 3)).astype(np.float32))  # -> (1, 3, 4, 4, 4)
    _check_decode(ref, ours, rng.standard_normal((1, 3, 4, 4, 4)).astype(np.float32))  # -> (1, 9, 32, 32, 3)


def test_patchify_matches_diffusers():
    from diffusers.models.autoencoders.autoencoder_kl_wan import patchify as ref_patchify

    x = np.random.default_rng(5).standard_normal((1, 2, 8, 6, 3)).astype(np.float32)
    assert_close(patchify(mx.array(x), 2), _cl(ref_patchify(_to_torch(x), 2)), atol=0, rtol=0)
    assert_close(unpatchify(patchify(mx.array(x), 2), 2), torch.from_numpy(x), atol=0, rtol=0)


def test_bad_inputs():
    ours = WanVAE(WanVAEConfig.from_dict(QWEN_DUMMY))
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        ours.encode(mx.zeros((1, 4, 16, 16, 3)))
    with pytest.raises(ValueError, match="channels-last video"):
        ours.encode(mx.zeros((1, 3, 1, 16, 16)))
    with pytest.raises(ValueError, match="channels-last latents"):
        ours.decode(mx.zeros((1, 4, 1, 2, 2)))
    state = WanVAE.to_checkpoint(dict(__import__("mlx.utils").utils.tree_flatten(ours.parameters())))
    state.pop("decoder.conv_out.bias")
    with pytest.raises(ValueError, match="missing \\['decoder.conv_out.bias'\\]"):
        WanVAE(WanVAEConfig.from_dict(QWEN_DUMMY)).load_checkpoint_weights(state)
    with pytest.raises(ValueError, match="temperal_downsample"):
        WanVAEConfig.from_dict(dict(QWEN_DUMMY, temperal_downsample=[False]))


def test_streamed_decode_is_identical():
    """The GPU decode mode (block-by-block evaluation) gives the same frames."""
    cfg = WanVAEConfig.from_dict({"base_dim": 8, "z_dim": 4, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
                                  "temperal_downsample": [False, True, True]})
    vae = WanVAE(cfg)
    z = mx.random.normal((1, 2, 4, 4, 4), key=mx.random.key(0))
    plain = vae.decode(z)
    vae.stream = True
    assert np.array_equal(np.array(plain), np.array(vae.decode(z)))
