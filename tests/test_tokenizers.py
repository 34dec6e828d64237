"""Our tokenizers (built on `tokenizers` only) give the ids and masks of transformers' tokenizers
loaded from the same folders. All folders are built in tmp_path (no network)."""

import json
import os
import shutil

import numpy as np
import pytest

from flashdiff.models.tokenizers import (
    _DEMO_CORPUS,
    build_clip_tokenizer_files,
    build_t5_tokenizer_files,
    load_clip_tokenizer,
    load_qwen2_tokenizer,
    load_t5_tokenizer,
)

LONG = " ".join(_DEMO_CORPUS.split())  # ~500 words: truncated at 77 and at 512
PROMPTS = [
    "a photo of a cat",
    "",
    "  Hello,   WORLD!!  \n\t tabs\tand\nnewlines  ",
    "Café crème brûlée — naïve Cafe\u0301 東京 😀 ｆｕｌｌｗｉｄｔｈ ½ ﬁ",
    "it's a dog's life; they've 1234 apples... (really?) [yes] {no} #tag @user 3.14 -- ok!",
    "A RED fox <|endoftext|> and </s> <extra_id_3> <pad> <|im_end|> inside",
    LONG,
]


def _check(ours, ref_tok, max_length, padding="max_length", prompts=PROMPTS):
    ids, mask = ours.encode(prompts, max_length=max_length, padding=padding, truncation=True)
    ref = ref_tok(prompts, padding=padding, max_length=max_length, truncation=True)
    ref_ids = np.array(ref["input_ids"])
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, np.array(ref["attention_mask"]))
    return ids


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("clip"))
    info = build_clip_tokenizer_files(d, vocab_size=1000)
    return d, info


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("t5"))
    info = build_t5_tokenizer_files(d, vocab_size=1000)
    return d, info


def test_clip_demo_files_format(clip_dir):
    d, info = clip_dir
    assert sorted(os.listdir(d)) == ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    vocab = json.load(open(os.path.join(d, "vocab.json"), encoding="utf-8"))
    assert len(vocab) == info["vocab_size"] == 1000
    assert vocab["!"] == 0 and vocab["!</w>"] == 256  # CLIP's byte-symbol layout
    assert info["eos_token_id"] == vocab["<|endoftext|>"] == 999 == info["pad_token_id"]
    assert open(os.path.join(d, "merges.txt"), encoding="utf-8").readline() == "#version: 0.2\n"


@pytest.mark.parametrize("cls", ["CLIPTokenizer", "CLIPTokenizerFast"])
def test_clip_matches_transformers(clip_dir, cls):
    import transformers

    d, info = clip_dir
    ref = getattr(transformers, cls).from_pretrained(d)
    ours = load_clip_tokenizer(d)
    ids = _check(ours, ref, 77)
    assert ids[1, 0] == info["bos_token_id"] and ids[1, 1] == info["eos_token_id"]  # empty prompt
    assert ids[-1, -1] == info["eos_token_id"]  # truncated row still ends with eos
    _check(ours, ref, 77, padding="longest")
    _check(ours, ref, 12)
    assert ours.decode(ids[0]) == ref.decode(ids[0].tolist(), skip_special_tokens=True)


def test_clip_from_tokenizer_json_and_other_pad(clip_dir, tmp_path):
    """A folder with tokenizer.json only (as transformers saves it), and a pad token that is not eos
    (Stable Diffusion 2 style '!'): the pad id must follow the config."""
    from transformers import CLIPTokenizer

    d, _ = clip_dir
    ref = CLIPTokenizer.from_pretrained(d, pad_token="!")
    ref.save_pretrained(tmp_path)
    for f in ("vocab.json", "merges.txt"):
        if os.path.exists(tmp_path / f):
            os.remove(tmp_path / f)
    assert os.path.exists(tmp_path / "tokenizer.json")
    ours = load_clip_tokenizer(str(tmp_path))
    ref = CLIPTokenizer.from_pretrained(tmp_path)
    assert ours.pad_token_id == 0 == ref.pad_token_id
    _check(ours, ref, 77)


def test_t5_demo_files_format(t5_dir):
    d, info = t5_dir
    tj = json.load(open(os.path.join(d, "tokenizer.json"), encoding="utf-8"))
    vocab = [p[0] for p in tj["model"]["vocab"]]
    assert vocab[:3] == ["<pad>", "</s>", "<unk>"] and tj["model"]["unk_id"] == 2
    assert vocab[-1] == "<extra_id_0>" and vocab[-100] == "<extra_id_99>"
    assert len(vocab) == info["vocab_size"] <= 1000
    assert tj["pre_tokenizer"]["pretokenizers"][1]["type"] == "Metaspace"


def test_t5_matches_transformers(t5_dir):
    from transformers import T5TokenizerFast

    d, _ = t5_dir
    ref = T5TokenizerFast.from_pretrained(d)
    ours = load_t5_tokenizer(d)
    ids = _check(ours, ref, 512)
    assert ids[1, 0] == 1 and ids[1, 1:].max() == 0  # empty prompt: </s> then <pad>
    assert ids[-1, -1] == 1  # the long prompt is truncated and still ends with </s>
    _check(ours, ref, 512, padding="longest")
    _check(ours, ref, 16)


@pytest.mark.parametrize("byte_fallback", [False, True])
def test_t5_real_format_with_precompiled_normalizer(tmp_path, byte_fallback):
    """A real-style tokenizer.json (SentencePiece model converted by transformers, with the
    Precompiled nmt_nfkc normalizer; UMT5-style byte_fallback too)."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import T5TokenizerFast

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_DEMO_CORPUS, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "spiece"), vocab_size=600, hard_vocab_limit=False,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=byte_fallback,
        num_threads=1, minloglevel=2,
    )
    spm_dir = tmp_path / "spm"
    spm_dir.mkdir()
    shutil.move(str(tmp_path / "spiece.model"), spm_dir / "spiece.model")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_t5_tokenizer(str(spm_dir))
    T5TokenizerFast.from_pretrained(spm_dir).save_pretrained(tmp_path / "fast")
    fast = str(tmp_path / "fast")
    tj = json.load(open(os.path.join(fast, "tokenizer.json"), encoding="utf-8"))
    assert "Precompiled" in json.dumps(tj["normalizer"])
    ref = T5TokenizerFast.from_pretrained(fast)
    _check(load_t5_tokenizer(fast), ref, 512)
    _check(load_t5_tokenizer(fast), ref, 20, padding="longest")


def _qwen_folder(tmp_path, with_json: bool):
    """Byte-level BPE trained with the Qwen2 regex; chat tokens as added tokens (vocab.json +
    merges.txt + tokenizer_config.json as Qwen repos ship them, or transformers' tokenizer.json)."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers, trainers
    from tokenizers.models import BPE

    from flashdiff.models.tokenizers import QWEN2_SPLIT

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
    )
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_DEMO_CORPUS.splitlines(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    d = tmp_path / "qwen"
    d.mkdir()
    json.dump(model["vocab"], open(d / "vocab.json", "w", encoding="utf-8"), ensure_ascii=False)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    n = len(model["vocab"])
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    added = {str(n + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": True} for i, t in enumerate(specials)}
    cfg = {"added_tokens_decoder": added, "additional_special_tokens": specials[1:], "bos_token": None,
           "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
           "model_max_length": 32768, "tokenizer_class": "Qwen2Tokenizer", "errors": "replace"}
    json.dump(cfg, open(d / "tokenizer_config.json", "w"))
    if with_json:
        from transformers import Qwen2Tokenizer

        Qwen2Tokenizer.from_pretrained(d).save_pretrained(tmp_path / "qwen_json")
        d = tmp_path / "qwen_json"
        for f in ("vocab.json", "merges.txt"):
            if os.path.exists(d / f):
                os.remove(d / f)
    return str(d)


@pytest.mark.parametrize("with_json", [False, True])
def test_qwen2_matches_transformers(tmp_path, with_json):
    from transformers import Qwen2Tokenizer

    d = _qwen_folder(tmp_path, with_json)
    ref = Qwen2Tokenizer.from_pretrained(d)
    ours = load_qwen2_tokenizer(d)
    template = ("<|im_start|>system\nDescribe the image:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                "<|im_start|>assistant\n")
    prompts = [template.format(p) for p in PROMPTS] + PROMPTS
    _check(ours, ref, 1024, padding="longest", prompts=prompts)
    _check(ours, ref, 40, padding="max_length", prompts=prompts)
    assert ours.token_to_id("<|im_start|>") == ref.convert_tokens_to_ids("<|im_start|>")


def test_demo_builders_deterministic(tmp_path):
    # The CLIP builder's merges come from tokenizers' BpeTrainer, whose tie-breaking varies between
    # processes, so only the T5 (Unigram) builder is byte-for-byte reproducible.
    for build in (build_t5_tokenizer_files,):
        build(str(tmp_path / "a"), vocab_size=800)
        build(str(tmp_path / "b"), vocab_size=800)
        for f in os.listdir(tmp_path / "a"):
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
        shutil.rmtree(tmp_path / "a")
        shutil.rmtree(tmp_path / "b")


def test_clear_errors(tmp_path, clip_dir):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_clip_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_t5_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="vocab_size"):
        build_clip_tokenizer_files(str(tmp_path / "x"), vocab_size=100)
    ours = load_clip_tokenizer(clip_dir[0])
    with pytest.raises(ValueError, match="padding"):
        ours.encode(["a"], max_length=8, padding="weird")
    with pytest.raises(TypeError):
        ours.encode([1, 2], max_length=8)
