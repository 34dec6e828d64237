"""Parity of the MLX CLIP / T5 / UMT5 text encoders with transformers on tiny random configs (fp32)."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from helpers import assert_close, torch_state_to_mx

from flashdiff.models.clip import CLIPTextConfig, CLIPTextModel
from flashdiff.models.t5 import T5Config, T5Encoder, relative_position_bucket

CLIP_CFG = dict(
    vocab_size=1000, hidden_size=32, intermediate_size=37, projection_dim=24, num_hidden_layers=3,
    num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
    bos_token_id=998, eos_token_id=999, pad_token_id=1,
)


def _clip_ids(B=3, L=16, eos=999, pad=999, vocab=998):
    """Tokenizer-like rows: bos, tokens, eos, then pad (pad == eos like FLUX's CLIP)."""
    ids = np.full((B, L), pad, np.int64)
    mask = np.zeros((B, L), np.int64)
    for b, n in enumerate([5, L - 2, 1][:B]):
        ids[b, 0] = 998 if vocab == 998 else 0
        ids[b, 1 : 1 + n] = np.random.randint(2, vocab - 1, n)
        ids[b, 1 + n] = eos
        mask[b, : n + 2] = 1
    return ids, mask


def _load_clip(tmodel, cfg_dict):
    import json

    cfg = CLIPTextConfig.from_dict(json.loads(tmodel.config.to_json_string()) | cfg_dict)
    model = CLIPTextModel(cfg)
    model.load_weights(list(model.sanitize(torch_state_to_mx(tmodel.state_dict())).items()), strict=True)
    return model


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_clip_text_model(act):
    from transformers import CLIPTextConfig as TConfig
    from transformers import CLIPTextModel as TModel

    tcfg = TConfig(**(CLIP_CFG | {"hidden_act": act}))
    tm = TModel(tcfg).eval()
    model = _load_clip(tm, {})
    assert not model.config.with_projection
    ids, mask = _clip_ids()
    with torch.no_grad():
        ref = tm(torch.tensor(ids), output_hidden_states=True)
    out = model(mx.array(ids), output_hidden_states=True)
    assert_close(out.last_hidden_state, ref.last_hidden_state)
    assert_close(out.pooler_output, ref.pooler_output)
    assert out.text_embeds is None
    assert len(out.hidden_states) == len(ref.hidden_states)
    assert_close(out.hidden_states[-2], ref.hidden_states[-2])  # penultimate layer (SDXL-style)

    # With a padding mask (combined with the causal mask).
    with torch.no_grad():
        ref = tm(torch.tensor(ids), attention_mask=torch.tensor(mask))
    out = model(mx.array(ids), attention_mask=mx.array(mask))
    assert_close(out.last_hidden_state, ref.last_hidden_state)
    assert_close(out.pooler_output, ref.pooler_output)


def test_clip_with_projection_and_checkpoint_keys():
    from transformers import CLIPTextConfig as TConfig
    from transformers import CLIPTextModelWithProjection as TModel

    tm = TModel(TConfig(**CLIP_CFG)).eval()
    cfg_dict = {"architectures": ["CLIPTextModelWithProjection"]}
    model = _load_clip(tm, cfg_dict)
    assert model.config.with_projection
    ours = {k for k, _ in tree_flatten(model.parameters())}
    assert ours == set(tm.state_dict())  # names mirror the checkpoint keys exactly
    ids, _ = _clip_ids()
    with torch.no_grad():
        ref = tm(torch.tensor(ids))
    out = model(mx.array(ids))
    assert_close(out.last_hidden_state, ref.last_hidden_state)
    assert_close(out.text_embeds, ref.text_embeds)


def test_clip_legacy_eos_rule():
    """eos_token_id == 2 configs pool at argmax(input_ids), whatever the ids are."""
    from transformers import CLIPTextConfig as TConfig
    from transformers import CLIPTextModel as TModel

    cfg = CLIP_CFG | {"eos_token_id": 2}
    tm = TModel(TConfig(**cfg)).eval()
    model = _load_clip(tm, {})
    ids = np.random.randint(0, 1000, (2, 10))
    with torch.no_grad():
        ref = tm(torch.tensor(ids))
    assert_close(model(mx.array(ids)).pooler_output, ref.pooler_output)


def test_clip_bad_inputs():
    model = CLIPTextModel(CLIPTextConfig.from_dict(CLIP_CFG))
    with pytest.raises(ValueError, match="batch, seq_len"):
        model(mx.zeros((5,), mx.int32))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(mx.zeros((1, 78), mx.int32))


T5_CFG = dict(
    vocab_size=300, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
    relative_attention_num_buckets=8, relative_attention_max_distance=20,
    feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6,
)


def _t5_pair(kind, extra=None):
    import json

    if kind == "umt5":
        from transformers import UMT5Config as TConfig
        from transformers import UMT5EncoderModel as TModel
    else:
        from transformers import T5Config as TConfig
        from transformers import T5EncoderModel as TModel
    tm = TModel(TConfig(**(T5_CFG | (extra or {})))).eval()
    with torch.no_grad():  # make the (zero-initialised) position biases non-trivial
        for name, p in tm.named_parameters():
            if "relative_attention_bias" in name or "layer_norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "layer_norm" in name else 0.0))
    cfg = T5Config.from_dict(json.loads(tm.config.to_json_string()))
    model = T5Encoder(cfg)
    weights = torch_state_to_mx(tm.state_dict())
    if kind == "umt5":  # real checkpoints often hold only one of the two tied copies
        weights.pop("encoder.embed_tokens.weight")
    else:
        weights.pop("shared.weight")
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    return tm, model


@pytest.mark.parametrize("kind", ["t5", "umt5"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_t5_encoder(kind, with_mask):
    tm, model = _t5_pair(kind)
    assert model.config.bias_in_every_layer == (kind == "umt5")
    B, L = 3, 40  # L > max_distance exercises the logarithmic buckets
    ids = np.random.randint(0, 300, (B, L))
    mask = np.ones((B, L), np.int64)
    mask[0, 7:] = 0
    mask[1, 25:] = 0
    kw_t = {"attention_mask": torch.tensor(mask)} if with_mask else {}
    kw_m = {"attention_mask": mx.array(mask)} if with_mask else {}
    with torch.no_grad():
        ref = tm(torch.tensor(ids), **kw_t).last_hidden_state
    out = model(mx.array(ids), **kw_m)
    assert_close(out, ref)


def test_t5_relu_ffn():
    tm, model = _t5_pair("t5", {"feed_forward_proj": "relu"})
    ids = np.random.randint(0, 300, (2, 12))
    with torch.no_grad():
        ref = tm(torch.tensor(ids)).last_hidden_state
    assert_close(model(mx.array(ids)), ref)


def test_relative_position_bucket_matches_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-300, 300)
    ref = T5Attention._relative_position_bucket(torch.tensor(rel), True, 32, 128).numpy()
    ours = np.array(relative_position_bucket(mx.array(rel, dtype=mx.int32), 32, 128))
    np.testing.assert_array_equal(ours, ref)


def test_t5_bf16_error_like_transformers():
    """bf16 weights (the engine default): our error against the fp32 reference is of the same size
    as transformers' own bf16 error (bf16 keeps ~3 significant digits, so no tight elementwise bound)."""
    tm, model = _t5_pair("umt5")
    ids = np.random.randint(0, 300, (2, 24))
    with torch.no_grad():
        ref = tm(torch.tensor(ids)).last_hidden_state.numpy()
        ref_bf16 = tm.to(torch.bfloat16)(torch.tensor(ids)).last_hidden_state.float().numpy()
    model.set_dtype(mx.bfloat16)
    out = model(mx.array(ids))
    assert out.dtype == mx.bfloat16
    ours = np.array(out.astype(mx.float32))
    assert np.isfinite(ours).all()
    err_ours, err_ref = np.abs(ours - ref).mean(), np.abs(ref_bf16 - ref).mean()
    assert err_ours <= 1.5 * err_ref + 1e-3, (err_ours, err_ref)


def test_t5_sanitize_and_bad_inputs():
    cfg = T5Config.from_dict(T5_CFG)
    model = T5Encoder(cfg)
    w = {"encoder.embed_tokens.weight": mx.zeros((300, 32)), "decoder.block.0.x": mx.zeros((1,))}
    out = model.sanitize(w)
    assert list(out) == ["shared.weight"]
    with pytest.raises(KeyError, match="shared.weight"):
        model.sanitize({})
    with pytest.raises(ValueError, match="attention_mask"):
        model(mx.zeros((2, 5), mx.int32), attention_mask=mx.ones((2, 4)))
