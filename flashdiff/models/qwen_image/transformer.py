"""Qwen-Image MMDiT transformer (diffusers ``QwenImageTransformer2DModel``) in MLX.

Numerical reference: diffusers ``models/transformers/transformer_qwenimage.py`` (0.42.1).
Parameter names equal the diffusers state_dict keys.

Call convention (same tensors as the diffusers forward)::

    model(hidden_states,              # (B, L_img, in_channels), latents packed like FLUX (2x2 patches)
          encoder_hidden_states,      # (B, L_txt, joint_attention_dim), Qwen2.5-VL hidden states
          encoder_hidden_states_mask, # (B, L_txt) 1/True = valid token, or None (all valid)
          timestep,                   # (B,) as the pipeline passes it: sigma * 1000 / 1000 = sigma
          img_shapes)                 # [[(frames, h // 2, w // 2), ...]] * B  (latent grid / patch)
    -> (B, L_img, patch_size**2 * out_channels)

Semantics kept from diffusers:
- text tokens come first in the joint sequence ``[text, image]``; only image tokens are returned;
- the text mask is a boolean *key* mask over the joint sequence (image keys always valid); padded
  text queries still run, they just cannot be attended to;
- RoPE uses the first batch entry of ``img_shapes`` for the whole batch (diffusers warns and does
  the same when the entries differ); text positions start at ``max(h // 2, w // 2)`` over images;
- the timestep is cast to the compute dtype before the sinusoid (scale 1000), as diffusers does.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field, fields
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from ..common import (BlockStream, TimestepEmbedding, compiled_block_fn, fuse_linears, rope_angles, joint_attention, split_linear,
                      timestep_sinusoid)

#: Default of QwenImageTransformer(config, fused=...). fused=True: one Linear for q/k/v per stream
#: (`attn.to_qkv`, `attn.to_added_qkv`), one large GEMM instead of three. On: measured on the H200 as
#: fast as unfused for Qwen-Image (0.189 s vs 0.191 s compiled) and faster for FLUX (models/flux/transformer.py).
FUSED_DEFAULT = True


@dataclass
class QwenImageTransformerConfig:
    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False
    axes_dims_rope: tuple = field(default=(16, 56, 56))
    zero_cond_t: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False
    rope_theta: float = 10000.0  # fixed in diffusers (QwenEmbedRope(theta=10000))
    eps: float = 1e-6

    @classmethod
    def from_dict(cls, d: dict) -> "QwenImageTransformerConfig":
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        cfg.axes_dims_rope = tuple(cfg.axes_dims_rope)
        return cfg

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels


# Element-wise helpers compiled once each, so that eager mode runs each as one kernel (the ops and
# dtypes are exactly the unfused ones; inside an outer mx.compile they are simply inlined).
_gelu_tanh = mx.compile(nn.gelu_approx, shapeless=True)


@mx.compile
def _gated_add(x, gate, y):
    return x + gate * y


@lru_cache
def _modulate(eps: float):
    """LayerNorm (no affine) then x * (1 + scale) + shift, as one compiled function per eps."""
    return mx.compile(lambda x, shift, scale: mx.fast.layer_norm(x, None, None, eps) * (1 + scale) + shift)


class FeedForward(nn.Module):
    """diffusers FeedForward(activation_fn="gelu-approximate"): net.0.proj -> GELU(tanh) -> net.2."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, dim * mult)
        # net.1 is dropout in diffusers (no parameters); keep the index so names match.
        self.net = [proj, nn.Identity(), nn.Linear(dim * mult, dim)]

    def __call__(self, x: mx.array) -> mx.array:
        return self.net[2](_gelu_tanh(self.net[0].proj(x)))


class JointAttention(nn.Module):
    """Projections and qk-norms of diffusers' Attention as used by QwenDoubleStreamAttnProcessor2_0.

    fused=True holds q/k/v of each stream in one Linear: `to_qkv` (image) and `to_added_qkv` (text),
    rows [q, k, v] (diffusers' fuse_qkv_projections names).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float, fused: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.fused = heads, head_dim, fused
        self.scale = head_dim**-0.5
        inner = heads * head_dim
        if fused:
            self.to_qkv = nn.Linear(dim, 3 * inner)
            self.to_added_qkv = nn.Linear(dim, 3 * inner)
        else:
            self.to_q = nn.Linear(dim, inner)
            self.to_k = nn.Linear(dim, inner)
            self.to_v = nn.Linear(dim, inner)
            self.add_q_proj = nn.Linear(dim, inner)
            self.add_k_proj = nn.Linear(dim, inner)
            self.add_v_proj = nn.Linear(dim, inner)
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        self.norm_added_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_added_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_out = [nn.Linear(inner, dim)]
        self.to_add_out = nn.Linear(inner, dim)

    def _qkv_proj(self, x, fused: str, unfused: tuple):
        """(B, L, D) -> (B, L, 3*H*Dh) projections [q | k | v] (one GEMM when fused)."""
        if self.fused:
            return self[fused](x)
        return mx.concatenate([self[name](x) for name in unfused], axis=-1)

    def __call__(self, x, c, cos, sin, mask, head_major_rope=False):
        """x: image (B, Li, D), c: text (B, Lt, D); cos/sin: (Lt + Li, head_dim/2) in [text, image] order."""
        Lt = c.shape[1]
        # One rotation over the joint sequence == diffusers' separate text / image rotations.
        out = joint_attention(
            [(self._qkv_proj(c, "to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")),
              self.norm_added_q, self.norm_added_k),
             (self._qkv_proj(x, "to_qkv", ("to_q", "to_k", "to_v")), self.norm_q, self.norm_k)],
            self.heads, self.head_dim, cos, sin, self.scale, mask, head_major_rope=head_major_rope,
        )
        return self.to_out[0](out[:, Lt:]), self.to_add_out(out[:, :Lt])


class QwenImageTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = 1e-6, fused: bool = False):
        super().__init__()
        self.eps = eps
        # img_mod / txt_mod are Sequential(SiLU, Linear) in diffusers: index 0 has no parameters.
        self.img_mod = [nn.Identity(), nn.Linear(dim, 6 * dim)]
        self.txt_mod = [nn.Identity(), nn.Linear(dim, 6 * dim)]
        self.attn = JointAttention(dim, heads, head_dim, eps, fused)
        self.img_mlp = FeedForward(dim)
        self.txt_mlp = FeedForward(dim)

    def __call__(self, x, c, silu_temb, cos, sin, mask, head_major_rope=False):
        """x: (B, Li, D), c: (B, Lt, D), silu_temb: SiLU(temb) (B, D) shared by all blocks."""
        # (shift, scale, gate) for norm1, then for norm2; each (B, 1, D).
        i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = mx.split(self.img_mod[1](silu_temb)[:, None], 6, axis=-1)
        t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = mx.split(self.txt_mod[1](silu_temb)[:, None], 6, axis=-1)
        mod = _modulate(self.eps)

        img_attn, txt_attn = self.attn(mod(x, i_sh1, i_sc1), mod(c, t_sh1, t_sc1), cos, sin, mask, head_major_rope)
        x = _gated_add(x, i_g1, img_attn)
        c = _gated_add(c, t_g1, txt_attn)
        x = _gated_add(x, i_g2, self.img_mlp(mod(x, i_sh2, i_sc2)))
        c = _gated_add(c, t_g2, self.txt_mlp(mod(c, t_sh2, t_sc2)))
        if x.dtype == mx.float16:  # diffusers clips fp16 activations to avoid inf
            x = mx.clip(x, -65504, 65504)
            c = mx.clip(c, -65504, 65504)
        return x, c


class TimestepProjEmbeddings(nn.Module):
    """diffusers QwenTimestepProjEmbeddings: Timesteps(256, flip, shift 0, scale 1000) -> TimestepEmbedding."""

    def __init__(self, dim: int, use_additional_t_cond: bool = False):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        if use_additional_t_cond:
            self.addition_t_embedding = nn.Embedding(2, dim)

    def __call__(self, timestep: mx.array, dtype, addition_t_cond=None) -> mx.array:
        # Reference: timestep.to(hidden dtype) -> fp32 sinusoid (scale 1000) -> .to(hidden dtype).
        proj = timestep_sinusoid(timestep.astype(dtype), 256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)
        temb = self.timestep_embedder(proj.astype(dtype))
        if "addition_t_embedding" in self:
            if addition_t_cond is None:
                raise ValueError("This model has use_additional_t_cond=True: pass additional_t_cond (B,) ints in {0, 1}.")
            temb = temb + self.addition_t_embedding(addition_t_cond).astype(dtype)
        return temb


class AdaLayerNormContinuous(nn.Module):
    """diffusers AdaLayerNormContinuous without affine: LN(x) * (1 + scale) + shift, emb = [scale, shift]."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(dim, 2 * dim)

    def __call__(self, x: mx.array, silu_cond: mx.array) -> mx.array:
        scale, shift = mx.split(self.linear(silu_cond).astype(x.dtype)[:, None], 2, axis=-1)
        return _modulate(self.eps)(x, shift, scale)


def _normalize_img_shapes(img_shapes) -> list[tuple[int, int, int]]:
    """diffusers' QwenEmbedRope input handling -> list of (frames, h, w) for the first batch entry."""
    if img_shapes is None:
        raise ValueError("img_shapes is required: [[(1, H // 16, W // 16)]] * batch for a single image.")
    if isinstance(img_shapes, list):
        if len(img_shapes) > 1 and any(s != img_shapes[0] for s in img_shapes):
            warnings.warn(
                f"img_shapes differ across the batch ({img_shapes}); like diffusers, RoPE uses the first entry "
                f"{img_shapes[0]} for every sample."
            )
        img_shapes = img_shapes[0]
    if not isinstance(img_shapes, list):
        img_shapes = [img_shapes]
    out = []
    for s in img_shapes:
        if len(s) != 3:
            raise ValueError(f"each img_shapes entry must be (frames, h, w) in patch units, got {s}")
        out.append(tuple(int(v) for v in s))
    return out


def qwen_rope_positions(shapes: list[tuple[int, int, int]], txt_len: int) -> mx.array:
    """(txt_len + L_img, 3) float positions in [text, image] order, as QwenEmbedRope(scale_rope=True).

    shapes: the (f, h, w) images of ONE sample (patch units). Image i with (f, h, w): frame positions i + [0, f); rows -(h - h // 2) ... h // 2 - 1, columns
    likewise (centred). Text tokens: max over images of max(h // 2, w // 2) + [0, txt_len) on all axes.
    """
    parts, max_vid = [], 0
    for idx, (f, h, w) in enumerate(shapes):
        fp = mx.broadcast_to(mx.arange(idx, idx + f)[:, None, None], (f, h, w))
        hp = mx.broadcast_to(mx.arange(-(h - h // 2), h // 2)[None, :, None], (f, h, w))
        wp = mx.broadcast_to(mx.arange(-(w - w // 2), w // 2)[None, None, :], (f, h, w))
        parts.append(mx.stack([fp, hp, wp], axis=-1).reshape(f * h * w, 3))
        max_vid = max(max_vid, h // 2, w // 2)
    txt = mx.broadcast_to(mx.arange(max_vid, max_vid + txt_len)[:, None], (txt_len, 3))
    return mx.concatenate([txt] + parts, axis=0).astype(mx.float32)


class QwenImageTransformer(nn.Module):
    """Qwen-Image MMDiT.

    fused (constructor; default FUSED_DEFAULT): fused q/k/v projections per stream, see JointAttention.
    `sanitize` turns diffusers checkpoints into this layout, `to_checkpoint` gives diffusers names back.
    head_major_rope (attribute, default False; read at call/trace time): see common.joint_attention.
    """

    def __init__(self, config: QwenImageTransformerConfig, fused: bool | None = None):
        super().__init__()
        self.fused = FUSED_DEFAULT if fused is None else bool(fused)
        self.head_major_rope = False
        self.stream_blocks = False  # see common.BlockStream; the pipelines set it on GPUs
        self.compile_blocks = False  # one mx.compile trace for all blocks (common.compiled_block_fn)
        self._block_fns = {}
        if config.zero_cond_t or config.use_layer3d_rope:
            raise NotImplementedError(
                "zero_cond_t / use_layer3d_rope (variant options of newer checkpoints) are not implemented; "
                "this module covers the base QwenImageTransformer2DModel (both False)."
            )
        if sum(config.axes_dims_rope) != config.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {config.axes_dims_rope} must sum to attention_head_dim {config.attention_head_dim}"
            )
        self.config = config
        D = config.inner_dim
        self.time_text_embed = TimestepProjEmbeddings(D, config.use_additional_t_cond)
        self.txt_norm = nn.RMSNorm(config.joint_attention_dim, eps=1e-6)
        self.img_in = nn.Linear(config.in_channels, D)
        self.txt_in = nn.Linear(config.joint_attention_dim, D)
        self.transformer_blocks = [
            QwenImageTransformerBlock(D, config.num_attention_heads, config.attention_head_dim, config.eps, self.fused)
            for _ in range(config.num_layers)
        ]
        self.norm_out = AdaLayerNormContinuous(D, eps=1e-6)
        self.proj_out = nn.Linear(D, config.patch_size**2 * config.out_dim)

    @property
    def dtype(self):
        """Compute dtype: that of the (never quantized) txt_norm weight."""
        return self.txt_norm.weight.dtype

    def _block_caller(self, no_mask: bool, hm: bool):
        """Call a block directly, or through one compiled function shared by all blocks."""
        if not self.compile_blocks or not self.transformer_blocks:
            return lambda b, *a: b(*a, hm)
        key = (no_mask, hm)
        if key not in self._block_fns:
            template = self.transformer_blocks[0]
            self._block_fns[key] = compiled_block_fn(template, None, hm) if no_mask else compiled_block_fn(template, hm)
        fn = self._block_fns[key]
        if no_mask:
            return lambda b, x, c, t, cos, sin, mask: fn(b.parameters(), x, c, t, cos, sin)
        return lambda b, *a: fn(b.parameters(), *a)

    def rope(self, img_shapes, txt_len: int) -> tuple[mx.array, mx.array]:
        """(cos, sin), each (txt_len + L_img, head_dim / 2) float32, in [text, image] order.

        img_shapes as diffusers takes it ([[(f, h, w), ...]] per batch, or [(f, h, w)] * B). Constant across
        denoising steps: a pipeline can compute it once and pass ``rope=`` to __call__.
        """
        return self._rope_tables(_normalize_img_shapes(img_shapes), txt_len)

    def _rope_tables(self, shapes, txt_len: int) -> tuple[mx.array, mx.array]:
        angles = rope_angles(qwen_rope_positions(shapes, txt_len), self.config.axes_dims_rope, self.config.rope_theta)
        return mx.cos(angles), mx.sin(angles)

    @staticmethod
    def joint_mask(encoder_hidden_states_mask, img_len: int, txt_seq_lens=None, txt_len: int | None = None):
        """Boolean key mask (B, 1, 1, L_txt + L_img) or None, as diffusers builds it.

        If no mask is given but ``txt_seq_lens`` (list/array of valid lengths) is, the mask is derived as
        ``position < len`` (older diffusers took txt_seq_lens; valid tokens are a prefix in the pipelines).
        """
        m = encoder_hidden_states_mask
        if m is None and txt_seq_lens is not None:
            m = mx.arange(txt_len)[None, :] < mx.array(txt_seq_lens).reshape(-1, 1)
        if m is None:
            return None
        m = m.astype(mx.bool_)
        ones = mx.ones((m.shape[0], img_len), dtype=mx.bool_)
        return mx.concatenate([m, ones], axis=1)[:, None, None, :]

    def __call__(
        self,
        hidden_states: mx.array,
        encoder_hidden_states: mx.array,
        encoder_hidden_states_mask: mx.array | None = None,
        timestep: mx.array | None = None,
        img_shapes=None,
        txt_seq_lens=None,
        guidance=None,
        controlnet_block_samples=None,
        additional_t_cond=None,
        rope: tuple[mx.array, mx.array] | None = None,
    ) -> mx.array:
        cfg = self.config
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"hidden_states must be (B, L_img, {cfg.in_channels}) packed 2x2 latent patches, got {hidden_states.shape}"
            )
        B, L_img, _ = hidden_states.shape
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.joint_attention_dim:
            raise ValueError(
                f"encoder_hidden_states must be (B, L_txt, {cfg.joint_attention_dim}), got {encoder_hidden_states.shape}"
            )
        L_txt = encoder_hidden_states.shape[1]
        if encoder_hidden_states.shape[0] != B:
            raise ValueError(f"batch mismatch: hidden_states B={B}, encoder_hidden_states B={encoder_hidden_states.shape[0]}")
        if encoder_hidden_states_mask is not None and tuple(encoder_hidden_states_mask.shape) != (B, L_txt):
            raise ValueError(
                f"encoder_hidden_states_mask shape {tuple(encoder_hidden_states_mask.shape)} must match "
                f"(batch_size, text_seq_len)=({B}, {L_txt})."
            )
        if timestep is None:
            raise ValueError("timestep is required: (B,) sigma values in [0, 1] (the pipeline passes t / 1000).")
        if guidance is not None:
            raise NotImplementedError("guidance embeddings are not used by QwenImageTransformer2DModel (diffusers errors too).")
        if rope is None:
            shapes = _normalize_img_shapes(img_shapes)
            n_img = sum(f * h * w for f, h, w in shapes)
            if n_img != L_img:
                raise ValueError(
                    f"img_shapes {shapes} describe {n_img} image tokens but hidden_states has {L_img}; "
                    "use (frames, latent_h // patch, latent_w // patch) per image."
                )
            rope = self._rope_tables(shapes, L_txt)
        cos, sin = rope
        if cos.shape[0] != L_txt + L_img:
            raise ValueError(f"rope tables cover {cos.shape[0]} tokens, expected L_txt + L_img = {L_txt + L_img}")

        dtype = self.dtype
        timestep = mx.array(timestep) if not isinstance(timestep, mx.array) else timestep
        timestep = mx.broadcast_to(timestep.reshape(-1), (B,)) if timestep.size == 1 else timestep.reshape(-1)
        mask = self.joint_mask(encoder_hidden_states_mask, L_img, txt_seq_lens, L_txt)

        x = self.img_in(hidden_states.astype(dtype))
        c = self.txt_in(self.txt_norm(encoder_hidden_states.astype(dtype)))
        temb = self.time_text_embed(timestep, dtype, additional_t_cond)
        silu_temb = nn.silu(temb)  # every img_mod / txt_mod / norm_out starts with SiLU(temb)

        n_ctrl = len(controlnet_block_samples) if controlnet_block_samples is not None else 0
        interval = -(-len(self.transformer_blocks) // n_ctrl) if n_ctrl else 0
        stream = BlockStream(self.stream_blocks)
        run = self._block_caller(mask is None, self.head_major_rope)
        for i, block in enumerate(self.transformer_blocks):
            x, c = run(block, x, c, silu_temb, cos, sin, mask)
            stream(x, c)
            if n_ctrl:
                x = x + controlnet_block_samples[i // interval]

        return self.proj_out(self.norm_out(x, silu_temb))

    def sanitize(self, weights: dict) -> dict:
        """Diffusers keys -> this model's parameters: strip a ComfyUI ``model.diffusion_model.`` prefix,
        concatenate q/k/v into the fused layers when the model is fused (split fused weights when it is
        not). Quantized layers (weight/scales/biases) are fused and split along output rows too."""
        prefix = "model.diffusion_model."
        weights = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in weights.items()}
        if not self.fused:
            return self.to_checkpoint(weights)
        for key in [k for k in weights if re.fullmatch(r"transformer_blocks\.\d+\.attn\.to_q\.weight", k)]:
            a = key[: -len("to_q.weight")]
            fuse_linears(weights, a + "to_qkv", [a + "to_q", a + "to_k", a + "to_v"])
            fuse_linears(weights, a + "to_added_qkv", [a + "add_q_proj", a + "add_k_proj", a + "add_v_proj"])
        return weights

    @staticmethod
    def to_checkpoint(weights: dict) -> dict:
        """Parameters (fused or not, quantized or not) -> diffusers key names (fused layers split in 3)."""
        weights = dict(weights)
        for key in [k for k in weights if k.endswith((".attn.to_qkv.weight", ".attn.to_added_qkv.weight"))]:
            fused = key[: -len(".weight")]
            a = fused.rsplit(".", 1)[0] + "."
            names = ("to_q", "to_k", "to_v") if fused.endswith(".to_qkv") else ("add_q_proj", "add_k_proj", "add_v_proj")
            split_linear(weights, fused, [a + n for n in names], [weights[key].shape[0] // 3] * 3)
        return weights
