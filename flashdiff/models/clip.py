"""CLIP text encoder (transformers' CLIPTextModel / CLIPTextModelWithProjection) in MLX.

Parameter names mirror the checkpoint keys: ``text_model.embeddings.token_embedding.weight``,
``text_model.encoder.layers.N.self_attn.q_proj.weight``, ``text_model.final_layer_norm.weight``,
``text_projection.weight`` (WithProjection checkpoints only).

Call: ``model(input_ids (B, L) int, attention_mask=None (B, L) 1 keep / 0 pad,
output_hidden_states=False) -> CLIPTextOutput``. The pooled output is the final-layer-normed hidden
state at the EOS position, picked with transformers' rule (first ``eos_token_id``; the legacy
``eos_token_id == 2`` configs take the argmax of the ids instead).
"""

from dataclasses import dataclass, field, fields

import mlx.core as mx
import mlx.nn as nn

from flashdiff.kernels import attention


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    # True for CLIPTextModelWithProjection checkpoints (text_projection.weight present).
    with_projection: bool = False
    architectures: list = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTextConfig":
        """From a text encoder's config.json (or a full CLIPConfig: its ``text_config`` is used)."""
        if "text_config" in d and isinstance(d["text_config"], dict):
            outer = d
            d = {**d["text_config"], "projection_dim": d.get("projection_dim", d["text_config"].get("projection_dim"))}
            d.setdefault("architectures", outer.get("architectures", []))
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names and v is not None})
        if "with_projection" not in d:
            cfg.with_projection = any("WithProjection" in a for a in (cfg.architectures or []))
        return cfg


_ACTIVATIONS = {
    "quick_gelu": lambda x: x * mx.sigmoid(1.702 * x),
    "gelu": nn.gelu,
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "relu": nn.relu,
    "silu": nn.silu,
}


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"CLIP hidden_act {name!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


@dataclass
class CLIPTextOutput:
    last_hidden_state: mx.array  # (B, L, D), after final_layer_norm
    pooler_output: mx.array  # (B, D), EOS-token state
    text_embeds: mx.array | None = None  # (B, projection_dim) when the model has text_projection
    hidden_states: list | None = None  # embeddings output + each layer's output (no final norm)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = d // self.num_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        B, L, _ = x.shape

        def heads(t):
            return t.reshape(B, L, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        o = attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _activation(cfg.hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = [CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def __call__(self, input_ids: mx.array) -> mx.array:
        L = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:L]


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """CLIPTextModel, or CLIPTextModelWithProjection when ``config.with_projection``."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        if config.with_projection:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def _mask(self, L: int, attention_mask) -> mx.array:
        causal = mx.tril(mx.ones((L, L), dtype=mx.bool_))
        if attention_mask is None:
            return causal
        if attention_mask.ndim != 2 or attention_mask.shape[1] != L:
            raise ValueError(f"attention_mask must be (B, {L}) with 1 = keep, 0 = pad; got {attention_mask.shape}")
        keep = attention_mask.astype(mx.bool_)[:, None, None, :]  # (B, 1, 1, L) over keys
        return mx.logical_and(causal[None, None], keep)

    def _eos_positions(self, input_ids: mx.array) -> mx.array:
        if self.config.eos_token_id == 2:
            # Legacy configs (before transformers PR #24773): EOS is the largest id in the row.
            return mx.argmax(input_ids, axis=-1)
        # First occurrence of eos (pads may equal eos); position 0 when absent, like torch.argmax.
        return mx.argmax((input_ids == self.config.eos_token_id).astype(mx.int32), axis=-1)

    def __call__(self, input_ids: mx.array, attention_mask=None, output_hidden_states: bool = False):
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq_len) integers; got shape {input_ids.shape}")
        B, L = input_ids.shape
        if L > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {L} exceeds max_position_embeddings {self.config.max_position_embeddings}; "
                "tokenize with truncation=True and max_length <= that value"
            )
        tm = self.text_model
        x = tm.embeddings(input_ids)
        mask = self._mask(L, attention_mask)
        states = [x] if output_hidden_states else None
        for layer in tm.encoder.layers:
            x = layer(x, mask)
            if states is not None:
                states.append(x)
        last = tm.final_layer_norm(x)
        pooled = last[mx.arange(B), self._eos_positions(input_ids)]
        embeds = self.text_projection(pooled) if self.config.with_projection else None
        return CLIPTextOutput(last, pooled, embeds, states)

    @staticmethod
    def sanitize(weights: dict) -> dict:
        """Checkpoint keys -> ours. Adds the ``text_model.`` prefix when a file lacks it (bare
        CLIPTextTransformer state dicts) and drops the ``position_ids`` buffer and any vision tower."""
        out = {}
        for k, v in weights.items():
            if k.endswith("position_ids") or k.startswith(("vision_model.", "visual_projection.", "logit_scale")):
                continue
            if not k.startswith(("text_model.", "text_projection.")):
                k = "text_model." + k
            out[k] = v
        return out
