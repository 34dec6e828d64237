"""Qwen2.5-VL language tower (text only), as used by Qwen-Image to encode prompts.

Reference: transformers' `models/qwen2_5_vl/modeling_qwen2_5_vl.py` (`Qwen2_5_VLTextModel`).
Text-only inputs give all three M-RoPE position streams the same positions (`arange(L)`, also with
padding: transformers 5 does not shift positions for left padding when no image is present), so the
multimodal RoPE reduces to plain 1D RoPE in the rotate-half layout. No vision tower, no lm_head.

Parameter names mirror `Qwen2_5_VLTextModel`'s state dict (`embed_tokens`, `layers.N.self_attn.q_proj`,
..., `norm`); `sanitize` maps the checkpoint naming of `Qwen2_5_VLForConditionalGeneration`
(transformers 4.x `model.layers...` and 5.x `model.language_model.layers...`) onto them.
"""

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..kernels import attention

_TEXT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "hidden_act",
    "use_sliding_window",
)


@dataclass
class Qwen2_5_VLTextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: list = field(default_factory=lambda: [16, 24, 24])
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen2_5_VLTextConfig":
        """From a Qwen2_5_VLConfig `config.json` dict (text fields at top level and/or under
        `text_config`; `text_config` wins) or from a bare text config dict. Unknown keys are ignored."""
        merged = {k: d[k] for k in _TEXT_KEYS if k in d}
        merged.update({k: v for k, v in (d.get("text_config") or {}).items() if k in _TEXT_KEYS})

        rope = dict(merged.get("rope_scaling") or {})
        rope.update(merged.get("rope_parameters") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise NotImplementedError(f"Qwen2.5-VL text tower: rope_type {rope_type!r} is not supported (only default/mrope)")
        if merged.get("use_sliding_window"):
            raise NotImplementedError("Qwen2.5-VL text tower: use_sliding_window=true is not supported")
        if merged.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"Qwen2.5-VL text tower: hidden_act {merged['hidden_act']!r} is not supported")

        kw = {k: merged[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "rms_norm_eps") if k in merged}
        kw["num_key_value_heads"] = merged.get("num_key_value_heads") or kw.get(
            "num_attention_heads", cls.num_attention_heads)
        theta = rope.get("rope_theta", merged.get("rope_theta"))
        if theta is not None:
            kw["rope_theta"] = float(theta)
        if "mrope_section" in rope:
            kw["mrope_section"] = list(rope["mrope_section"])
        cfg = cls(**kw)
        if cfg.hidden_size % cfg.num_attention_heads or cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError(
                f"Qwen2.5-VL text config: hidden_size {cfg.hidden_size} must be divisible by num_attention_heads "
                f"{cfg.num_attention_heads}, which must be divisible by num_key_value_heads {cfg.num_key_value_heads}"
            )
        return cfg


class Qwen2_5_VLAttention(nn.Module):
    def __init__(self, cfg: Qwen2_5_VLTextConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)
        # rotate-half RoPE at positions 0..L-1 (all three M-RoPE streams equal for text-only input)
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=0)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=0)
        if self.n_kv != self.n_heads:  # GQA: the attention entry point takes equal head counts
            k = mx.repeat(k, self.n_heads // self.n_kv, axis=1)
            v = mx.repeat(v, self.n_heads // self.n_kv, axis=1)
        out = attention(q, k, v, self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: Qwen2_5_VLTextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2_5_VLDecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2_5_VLTextConfig):
        super().__init__()
        self.self_attn = Qwen2_5_VLAttention(cfg)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def causal_padding_mask(attention_mask: mx.array | None, B: int, L: int) -> mx.array:
    """Boolean (B, 1, L, L) mask, True = attend: causal AND key is a real token.

    Matches transformers' causal + padding mask on every row whose query is a real token. Rows of
    padding queries (left padding) would be fully masked there; here they attend causally to all
    keys instead, which keeps them finite (their outputs are garbage either way and never reach a
    real token, whose rows exclude padding keys).
    """
    causal = mx.tril(mx.ones((L, L), dtype=mx.bool_))
    if attention_mask is None:
        return mx.broadcast_to(causal[None, None], (B, 1, L, L))
    valid = attention_mask.astype(mx.bool_)
    allowed = valid[:, None, :] | ~valid[:, :, None]  # (B, Lq, Lk)
    return (causal[None] & allowed)[:, None]


class Qwen2_5_VLTextModel(nn.Module):
    """Language tower of Qwen2.5-VL. `__call__(input_ids (B, L) int, attention_mask (B, L) 0/1 or None)
    -> (B, L, hidden_size)`: the last hidden state after the final RMSNorm (= `hidden_states[-1]`)."""

    def __init__(self, cfg: Qwen2_5_VLTextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [Qwen2_5_VLDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, input_ids, attention_mask=None) -> mx.array:
        input_ids = mx.array(np.asarray(input_ids)) if not isinstance(input_ids, mx.array) else input_ids
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq_len) token ids, got shape {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        if attention_mask is not None:
            if not isinstance(attention_mask, mx.array):
                attention_mask = mx.array(np.asarray(attention_mask))
            if tuple(attention_mask.shape) != (B, L):
                raise ValueError(
                    f"attention_mask must have the shape of input_ids {(B, L)}, got {tuple(attention_mask.shape)}")
        mask = causal_padding_mask(attention_mask, B, L)
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, mask)
        return self.norm(h)

    @staticmethod
    def sanitize(weights: dict) -> dict:
        """Checkpoint keys of Qwen2_5_VLForConditionalGeneration (transformers 4.x `model.layers.N...`,
        5.x `model.language_model.layers.N...`) or of a bare text model -> this module's names.
        Drops the vision tower (`visual.*`, `model.visual.*`), `lm_head` and RoPE buffers."""
        out = {}
        for k, v in weights.items():
            if k.startswith(("visual.", "model.visual.", "lm_head.")) or k.endswith("rotary_emb.inv_freq"):
                continue
            for prefix in ("model.language_model.", "language_model.model.", "language_model.", "model."):
                if k.startswith(prefix):
                    k = k[len(prefix):]
                    break
            out[k] = v
        if "embed_tokens.weight" not in out:
            raise ValueError(
                "Qwen2.5-VL text weights: no embed_tokens weight found (expected 'model.embed_tokens.weight', "
                "'model.language_model.embed_tokens.weight' or 'embed_tokens.weight'); is this the text_encoder?"
            )
        return out
