"""Qwen2.5-VL text tower and Qwen-Image prompt encoding vs transformers / diffusers (tiny, float32)."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import assert_close, torch_state_to_mx

from flashdiff.models.qwen2_5_vl import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel
from flashdiff.models.qwen_image.text_encoder import encode_prompts

VOCAB = 400
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
WORDS = ("a cat holding a sign that says hello world, red green blue shape size texture quantity text spatial "
         "relationships of the objects and background, neon city at night, 42 balloons, Zürich café").split()


def tiny_hf_config(text_overrides=None):
    from transformers import Qwen2_5_VLConfig

    text = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_scaling": {"mrope_section": [2, 1, 1], "rope_type": "default", "type": "default"},
        "rope_theta": 1000000.0,
        "bos_token_id": 0,
        "eos_token_id": 2,
    }
    text.update(text_overrides or {})
    vision = {"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, vision_start_token_id=VOCAB - 4,
                            vision_end_token_id=VOCAB - 3, image_token_id=VOCAB - 2, video_token_id=VOCAB - 1)


def build_pair(text_overrides=None):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    hf_cfg = tiny_hf_config(text_overrides)
    ref = Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():  # non-trivial norm weights and biases
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    cfg = Qwen2_5_VLTextConfig.from_dict(hf_cfg.to_dict())
    ours = Qwen2_5_VLTextModel(cfg)
    ours.load_weights(list(ours.sanitize(torch_state_to_mx(ref.state_dict())).items()))
    return ref, ours


# ----------------------------------------------------------------------------------------- config


def test_config_from_dict_layouts():
    v4 = {  # transformers 4.x Qwen-Image text_encoder/config.json: text fields at top level
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 152064,
        "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
        "use_sliding_window": False, "sliding_window": 32768, "vision_config": {"depth": 32, "hidden_size": 1280},
    }
    v5 = {  # transformers 5: under text_config, rope in rope_parameters
        "model_type": "qwen2_5_vl", "vision_config": {"depth": 32},
        "text_config": {k: v4[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                                           "vocab_size")}
        | {"rope_parameters": {"rope_theta": 1000000.0, "mrope_section": [16, 24, 24], "rope_type": "default"}},
    }
    a, b = Qwen2_5_VLTextConfig.from_dict(v4), Qwen2_5_VLTextConfig.from_dict(v5)
    assert a == b
    assert (a.hidden_size, a.num_key_value_heads, a.head_dim, a.rope_theta, a.mrope_section) == (
        3584, 4, 128, 1e6, [16, 24, 24])
    with pytest.raises(NotImplementedError, match="rope_type"):
        Qwen2_5_VLTextConfig.from_dict({**v4, "rope_scaling": {"type": "yarn", "factor": 4.0}})


def test_config_from_transformers_to_dict():
    d = tiny_hf_config().to_dict()
    cfg = Qwen2_5_VLTextConfig.from_dict(json.loads(json.dumps(d)))
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (32, 4, 2, VOCAB)
    assert cfg.rope_theta == 1e6 and cfg.mrope_section == [2, 1, 1]


# ----------------------------------------------------------------------------------------- weights


def test_sanitize_v4_and_v5_naming():
    ref, ours = build_pair()
    v5 = ref.state_dict()  # transformers 5: model.language_model.*, model.visual.*, lm_head
    assert any(k.startswith("model.language_model.layers.") for k in v5)
    assert any(k.startswith("model.visual.") for k in v5)
    v4 = {}  # transformers 4.x naming of the Qwen-Image checkpoint
    for k, v in v5.items():
        k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        v4[k] = v
    s5 = ours.sanitize(torch_state_to_mx(v5))
    s4 = ours.sanitize(torch_state_to_mx(v4))
    assert sorted(s4) == sorted(s5)
    assert not any(k.startswith(("visual", "lm_head", "model.")) for k in s4)
    m4 = Qwen2_5_VLTextModel(ours.config)
    m4.load_weights(list(s4.items()))  # strict: every parameter present, nothing extra
    ids = mx.array(np.random.randint(0, VOCAB, (2, 7)).astype(np.int32))
    assert_close(m4(ids), ours(ids), atol=0, rtol=0)
    with pytest.raises(ValueError, match="embed_tokens"):
        ours.sanitize({k: v for k, v in s4.items() if "embed_tokens" not in k})


# ----------------------------------------------------------------------------------------- model


def _ref_hidden(ref, ids, mask):
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids).long(),
                  attention_mask=None if mask is None else torch.from_numpy(mask).long(),
                  output_hidden_states=True)
    return out.hidden_states[-1]


@pytest.mark.parametrize("kv_heads", [2, 1, 4])
def test_text_model_no_padding(kv_heads):
    ref, ours = build_pair({"num_key_value_heads": kv_heads})
    ids = np.random.randint(0, VOCAB, (2, 19))
    assert_close(ours(mx.array(ids.astype(np.int32))), _ref_hidden(ref, ids, None))
    assert_close(ours(mx.array(ids.astype(np.int32)), mx.ones(ids.shape, dtype=mx.int32)),
                 _ref_hidden(ref, ids, np.ones_like(ids)))


def test_text_model_padding_masks():
    ref, ours = build_pair()
    B, L = 4, 23
    ids = np.random.randint(0, VOCAB, (B, L))
    mask = np.ones((B, L), dtype=np.int64)
    mask[1, 15:] = 0  # right padding
    mask[2, 5:] = 0  # right padding, short
    mask[3, :6] = 0  # left padding
    ids[mask == 0] = 0  # pad id
    got = np.array(ours(mx.array(ids.astype(np.int32)), mx.array(mask.astype(np.int32))))
    want = _ref_hidden(ref, ids, mask).numpy()
    assert np.isfinite(got).all()
    valid = mask.astype(bool)  # padded positions are garbage in both and discarded by every caller
    assert_close(mx.array(got[valid]), torch.from_numpy(want[valid]))


def test_text_model_bad_inputs():
    _, ours = build_pair()
    with pytest.raises(ValueError, match="input_ids"):
        ours(mx.zeros((5,), dtype=mx.int32))
    with pytest.raises(ValueError, match="attention_mask"):
        ours(mx.zeros((2, 5), dtype=mx.int32), mx.ones((2, 4), dtype=mx.int32))


# ----------------------------------------------------------------------------------------- prompts


class LocalQwen2Tokenizer:
    """Stand-in with the flashdiff tokenizer interface, built directly on `tokenizers.Tokenizer`."""

    def __init__(self, path, pad_token="<|endoftext|>", left=False):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        self.pad_id = self.tok.token_to_id(pad_token)
        self.left = left

    def encode(self, texts, max_length, padding=True, truncation=True):
        tok = self.tok
        tok.no_padding()
        if truncation:
            tok.enable_truncation(max_length)
        else:
            tok.no_truncation()
        encs = tok.encode_batch(list(texts))
        L = max(len(e.ids) for e in encs) if padding else None
        ids = np.full((len(encs), L), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encs), L), dtype=np.int64)
        for i, e in enumerate(encs):
            sl = slice(L - len(e.ids), L) if self.left else slice(0, len(e.ids))
            ids[i, sl], mask[i, sl] = e.ids, 1
        return ids, mask


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE Qwen2-style tokenizer.json (+ tokenizer_config.json) with the chat specials."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    d = tmp_path_factory.mktemp("qwen_tok")
    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [" ".join(WORDS), "Describe the image by detailing the color, shape, size, texture, quantity, text, "
              "spatial relationships of the objects and background:", "system user assistant"] * 20
    tok.train_from_iterator(corpus, trainer)
    assert tok.get_vocab_size() <= VOCAB - 4
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "pad_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "unk_token": None, "bos_token": None, "model_max_length": 131072, "padding_side": "right"}))
    return d


def _our_tokenizers(tokenizer_dir):
    toks = [LocalQwen2Tokenizer(tokenizer_dir / "tokenizer.json")]
    try:  # the engine's tokenizer wrapper, once it exists
        from flashdiff.models.tokenizers import load_qwen2_tokenizer
    except ImportError:
        return toks
    return toks + [load_qwen2_tokenizer(str(tokenizer_dir))]


@pytest.fixture(scope="module")
def qwen_pipes(tokenizer_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from transformers import Qwen2Tokenizer

    ref, ours = build_pair()
    hf_tok = Qwen2Tokenizer.from_pretrained(str(tokenizer_dir))
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=ref,
                             tokenizer=hf_tok, transformer=None)
    return pipe, ours, _our_tokenizers(tokenizer_dir)


def _long_prompt(n_words):
    rng = np.random.default_rng(1)
    return " ".join(rng.choice(WORDS, n_words))


def _check_encode(qwen_pipes, prompts, max_sequence_length, num_images_per_prompt=1):
    pipe, ours, toks = qwen_pipes
    with torch.no_grad():
        want, want_mask = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=num_images_per_prompt,
                                             max_sequence_length=max_sequence_length)
    if want_mask is None:  # diffusers drops an all-ones mask
        want_mask = torch.ones(want.shape[:2], dtype=torch.long)
    if num_images_per_prompt > 1:
        # diffusers tiles the mask (b0, b1, b0, b1) but repeats the embeddings per prompt (b0, b0, b1, b1):
        # a diffusers bug for batches > 1. We keep mask and embeddings aligned: mask of the n=1 call, repeated.
        with torch.no_grad():
            _, m1 = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=max_sequence_length)
        m1 = torch.ones(want.shape[0] // num_images_per_prompt, want.shape[1], dtype=torch.long) if m1 is None else m1
        want_mask = m1.repeat_interleave(num_images_per_prompt, dim=0)
    for tok in toks:
        got, got_mask = encode_prompts(ours, tok, prompts, max_sequence_length=max_sequence_length,
                                       num_images_per_prompt=num_images_per_prompt)
        assert got_mask.dtype == mx.int32
        np.testing.assert_array_equal(np.array(got_mask), want_mask.numpy())
        assert_close(got, want)
    return want


def test_tokenizer_stand_in_matches_transformers(qwen_pipes):
    pipe, _, toks = qwen_pipes
    texts = [pipe.prompt_template_encode.format(p) for p in ["a cat", _long_prompt(40), "Zürich café, 42"]]
    want = pipe.tokenizer(texts, max_length=1058, padding=True, truncation=True, return_tensors="np")
    for tok in toks:
        ids, mask = tok.encode(texts, max_length=1058, padding=True, truncation=True)
        np.testing.assert_array_equal(np.asarray(ids), want.input_ids)
        np.testing.assert_array_equal(np.asarray(mask), want.attention_mask)


def test_encode_prompts_batch_of_lengths(qwen_pipes):
    prompts = ["a cat", "a cat holding a sign that says hello world", _long_prompt(30), ""]
    want = _check_encode(qwen_pipes, prompts, 512)
    assert want.shape[1] < 512  # padded only to the batch maximum


def test_encode_prompts_single_prompt_and_repeat(qwen_pipes):
    _check_encode(qwen_pipes, "neon city at night", 512)
    _check_encode(qwen_pipes, ["neon city at night", "42 balloons"], 512, num_images_per_prompt=2)


def test_encode_prompts_truncation(qwen_pipes):
    prompts = ["a cat", _long_prompt(25), "red green blue shape"]
    want = _check_encode(qwen_pipes, prompts, 8)
    assert want.shape[1] == 8


def test_encode_prompts_long(qwen_pipes):
    # > 1058 tokens: the tokenizer truncates to 1024 + 34, and the output keeps up to 1024 tokens
    pipe, _, _ = qwen_pipes
    long = _long_prompt(900)
    assert len(pipe.tokenizer(long).input_ids) > 1100
    want = _check_encode(qwen_pipes, [long, "a cat"], 1024)
    assert want.shape[1] == 1024
    want = _check_encode(qwen_pipes, [_long_prompt(300), "a cat", long], 700)
    assert want.shape[1] == 700


def test_encode_prompts_rejects_bad_lengths(qwen_pipes):
    _, ours, toks = qwen_pipes
    with pytest.raises(ValueError, match="1024"):
        encode_prompts(ours, toks[0], "a cat", max_sequence_length=1025)
    with pytest.raises(ValueError, match="positive"):
        encode_prompts(ours, toks[0], "a cat", max_sequence_length=0)


def test_encode_prompts_left_padding(qwen_pipes, tokenizer_dir):
    # Qwen's tokenizer pads on the right; a left-padding tokenizer must give what diffusers gives with one.
    pipe, ours, _ = qwen_pipes
    prompts = ["a cat", _long_prompt(30), "42 balloons"]
    old_side = pipe.tokenizer.padding_side
    pipe.tokenizer.padding_side = "left"
    try:
        with torch.no_grad():
            want, want_mask = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=20)
    finally:
        pipe.tokenizer.padding_side = old_side
    got, got_mask = encode_prompts(ours, LocalQwen2Tokenizer(tokenizer_dir / "tokenizer.json", left=True), prompts,
                                   max_sequence_length=20)
    np.testing.assert_array_equal(np.array(got_mask), want_mask.numpy())
    assert_close(got, want)
