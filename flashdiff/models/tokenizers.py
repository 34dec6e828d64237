"""Text tokenizers (CLIP, T5/UMT5, Qwen2) built on the `tokenizers` library only.

Each loader rebuilds the pipeline exactly as transformers' tokenizer class does for the same
folder (normalizer, pre-tokenizer, post-processor and special tokens), so ids and masks match
``CLIPTokenizer`` / ``T5TokenizerFast`` / ``Qwen2Tokenizer`` called with
``padding="max_length" | "longest", max_length=N, truncation=True``.

    tok = load_clip_tokenizer("FLUX.1-schnell/tokenizer")
    ids, mask = tok.encode(["a cat"], max_length=77)        # np.int32 (B, 77) each

The demo builders write tokenizer folders in the real file formats from a small built-in English
corpus (deterministic), for offline tiny models.
"""

import json
import os
from dataclasses import dataclass

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@dataclass
class TextTokenizer:
    """A configured `tokenizers.Tokenizer` plus the padding facts transformers keeps beside it."""

    tokenizer: Tokenizer
    pad_token_id: int
    model_max_length: int | None = None
    padding_side: str = "right"
    truncation_side: str = "right"

    def encode(
        self,
        texts,
        max_length: int | None = None,
        padding: str | bool = "max_length",
        truncation: bool = True,
        add_special_tokens: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, both np.int32 (B, L).

        padding: "max_length" pads to ``max_length``; "longest" / True pads to the longest row.
        truncation: cut the text (not the special tokens) so each row fits ``max_length``.
        ``max_length=None`` uses the folder's ``model_max_length``.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a string or a list of strings")
        if padding not in ("max_length", "longest", True, False, "do_not_pad"):
            raise ValueError(f"padding must be 'max_length', 'longest' or False; got {padding!r}")
        max_length = max_length or self.model_max_length
        if (padding == "max_length" or truncation) and max_length is None:
            raise ValueError("max_length is required (the tokenizer folder gives no model_max_length)")
        tok = self.tokenizer
        if truncation:
            n_special = tok.post_processor.num_special_tokens_to_add(False) if tok.post_processor else 0
            if add_special_tokens and max_length < n_special:
                raise ValueError(f"max_length={max_length} is shorter than the {n_special} special tokens")
            tok.enable_truncation(max_length, strategy="longest_first", direction=self.truncation_side)
        else:
            tok.no_truncation()
        tok.no_padding()
        rows = [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        if padding == "max_length":
            width = max(max_length, max((len(r) for r in rows), default=0))
        elif padding in ("longest", True):
            width = max((len(r) for r in rows), default=0)
        else:
            if len({len(r) for r in rows}) > 1:
                raise ValueError("rows have different lengths; pass padding='longest' or 'max_length'")
            width = len(rows[0]) if rows else 0
        ids = np.full((len(rows), width), self.pad_token_id, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if self.padding_side == "left" else slice(0, len(r))
            ids[i, sl] = r
            mask[i, sl] = 1
        return ids, mask

    __call__ = encode

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        text = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        suffix = getattr(self.tokenizer.model, "end_of_word_suffix", None)
        return text.replace(suffix, " ").strip() if suffix else text  # CLIP's </w>, as transformers


# ----------------------------------------------------------------------------- folder reading


def _read_json(path):
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return {}


def _token_str(t):
    return t.get("content") if isinstance(t, dict) else t


def _folder_config(folder: str) -> dict:
    """tokenizer_config.json overlaid with special_tokens_map.json (which wins, as in transformers)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer folder {folder!r} does not exist")
    cfg = _read_json(os.path.join(folder, "tokenizer_config.json"))
    for k, v in _read_json(os.path.join(folder, "special_tokens_map.json")).items():
        cfg[k] = v
    return cfg


def _added_tokens(cfg: dict, extra: list[str]) -> list[AddedToken]:
    """Special tokens as transformers adds them: the config's added_tokens_decoder with its flags,
    then named/additional special tokens not yet listed (special, not normalized)."""
    out, seen = [], set()
    for _, t in sorted((cfg.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
        if isinstance(t, dict):
            flags = {k: t[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in t}
            out.append(AddedToken(t["content"], **flags))
            seen.add(t["content"])
    for name in extra:
        if name and name not in seen:
            out.append(AddedToken(name, special=True, normalized=False))
            seen.add(name)
    return out


def _register_added(tok: Tokenizer, tokens: list[AddedToken]):
    special = [t for t in tokens if t.special]
    normal = [t for t in tokens if not t.special]
    if special:
        tok.add_special_tokens(special)
    if normal:
        tok.add_tokens(normal)


def _vocab_merges(folder: str, what: str):
    """BPE vocab (dict) and merges (list of pairs) from tokenizer.json, else vocab.json + merges.txt."""
    tj = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(tj):
        model = _read_json(tj).get("model", {})
        if model.get("type") not in (None, "BPE"):
            raise ValueError(f"{tj}: expected a BPE model for a {what} tokenizer, found {model.get('type')}")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        return model["vocab"], merges, _read_json(tj).get("added_tokens", [])
    vf, mf = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    if not (os.path.isfile(vf) and os.path.isfile(mf)):
        raise FileNotFoundError(
            f"{folder!r} holds no {what} tokenizer: expected tokenizer.json, or vocab.json + merges.txt"
        )
    vocab = _read_json(vf)
    with open(mf, encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(ln.split(" ")) for ln in lines if ln and not ln.startswith("#version")]
    return vocab, merges, []


def _max_len(cfg: dict, default):
    m = cfg.get("model_max_length", default)
    return int(m) if m is not None and m < 1e12 else default


# ----------------------------------------------------------------------------- loaders


def load_clip_tokenizer(folder: str) -> TextTokenizer:
    """CLIP BPE tokenizer (transformers' CLIPTokenizer) from a folder with tokenizer.json or
    vocab.json + merges.txt, plus tokenizer_config.json / special_tokens_map.json."""
    cfg = _folder_config(folder)
    vocab, merges, json_added = _vocab_merges(folder, "CLIP")
    bos = _token_str(cfg.get("bos_token", "<|startoftext|>"))
    eos = _token_str(cfg.get("eos_token", "<|endoftext|>"))
    unk = _token_str(cfg.get("unk_token", "<|endoftext|>"))
    pad = _token_str(cfg.get("pad_token", "<|endoftext|>"))
    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
            fuse_unk=False, unk_token=unk)
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    _register_added(tok, _added_tokens(cfg | _json_added_as_cfg(json_added, cfg), [unk, bos, eos, pad]))
    for name in (bos, eos, pad):
        if tok.token_to_id(name) is None:
            raise KeyError(f"CLIP special token {name!r} is not in the vocabulary of {folder!r}")
    tok.post_processor = processors.RobertaProcessing(
        (eos, tok.token_to_id(eos)), (bos, tok.token_to_id(bos)), trim_offsets=False, add_prefix_space=False
    )
    return TextTokenizer(tok, tok.token_to_id(pad), _max_len(cfg, 77), cfg.get("padding_side", "right"),
                         cfg.get("truncation_side", "right"))


def _json_added_as_cfg(json_added: list, cfg: dict) -> dict:
    """tokenizer.json's added_tokens in the tokenizer_config ``added_tokens_decoder`` shape."""
    if not json_added or cfg.get("added_tokens_decoder"):
        return {}
    return {"added_tokens_decoder": {str(t["id"]): t for t in json_added}}


def _t5_json(folder: str) -> dict:
    tj = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(tj):
        if os.path.isfile(os.path.join(folder, "spiece.model")):
            raise FileNotFoundError(
                f"{folder!r} has only spiece.model; flashdiff reads T5 tokenizers from tokenizer.json. "
                "Download the repo's tokenizer.json too (FLUX/Wan/HiDream repos ship it), or convert once "
                "with `transformers.T5TokenizerFast.from_pretrained(folder).save_pretrained(folder)`."
            )
        raise FileNotFoundError(f"{folder!r} holds no tokenizer.json for a T5 tokenizer")
    d = _read_json(tj)
    if d.get("model", {}).get("type") != "Unigram":
        raise ValueError(f"{tj}: expected a Unigram (SentencePiece) model, found {d.get('model', {}).get('type')}")
    return d


def _precompiled(normalizer):
    if not normalizer:
        return None
    if normalizer.get("type") == "Precompiled":
        return normalizer
    for n in normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else []:
        if n.get("type") == "Precompiled":
            return n
    return None


def load_t5_tokenizer(folder: str) -> TextTokenizer:
    """T5 / UMT5 SentencePiece-Unigram tokenizer (transformers' T5Tokenizer(Fast)) from tokenizer.json.

    As transformers does, only the tokenizer.json's vocabulary, its precompiled SentencePiece
    normalizer and its added tokens are used; the pre-tokenizer (whitespace split + metaspace, prefix
    always), ``</s>`` appended, and no byte fallback are fixed by the T5 recipe.
    """
    cfg = _folder_config(folder)
    d = _t5_json(folder)
    d["normalizer"] = _precompiled(d.get("normalizer"))
    d["model"]["byte_fallback"] = False
    d["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "WhitespaceSplit"},
            {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
        ],
    }
    d["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    d["post_processor"], d["truncation"], d["padding"] = None, None, None
    tok = Tokenizer.from_str(json.dumps(d))
    eos = _token_str(cfg.get("eos_token", "</s>"))
    unk = _token_str(cfg.get("unk_token", "<unk>"))
    pad = _token_str(cfg.get("pad_token", "<pad>"))
    extra = [_token_str(t) for t in cfg.get("additional_special_tokens") or []]
    if not extra and cfg.get("extra_ids", 100):
        extra = [f"<extra_id_{i}>" for i in range(cfg.get("extra_ids", 100))]
    _register_added(tok, _added_tokens(cfg, [eos, unk, pad] + extra))
    if tok.token_to_id(eos) is None or tok.token_to_id(pad) is None:
        raise KeyError(f"T5 tokenizer in {folder!r} lacks {eos!r} or {pad!r}")
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", eos], pair=["$A", eos, "$B", eos], special_tokens=[(eos, tok.token_to_id(eos))]
    )
    return TextTokenizer(tok, tok.token_to_id(pad), _max_len(cfg, 512), cfg.get("padding_side", "right"),
                         cfg.get("truncation_side", "right"))


def load_qwen2_tokenizer(folder: str) -> TextTokenizer:
    """Qwen2 byte-level BPE (transformers' Qwen2Tokenizer) from tokenizer.json or vocab.json +
    merges.txt; chat-template tokens (<|im_start|>, ...) come from the added tokens. No BOS/EOS is
    appended (Qwen2 adds none)."""
    cfg = _folder_config(folder)
    vocab, merges, json_added = _vocab_merges(folder, "Qwen2")
    eos = _token_str(cfg.get("eos_token", "<|endoftext|>"))
    pad = _token_str(cfg.get("pad_token", "<|endoftext|>")) or eos
    unk = _token_str(cfg.get("unk_token"))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False, byte_fallback=False, unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=bool(cfg.get("add_prefix_space", False)), use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    extra = [_token_str(t) for t in cfg.get("additional_special_tokens") or []]
    _register_added(tok, _added_tokens(cfg | _json_added_as_cfg(json_added, cfg), [eos, pad, unk] + extra))
    if tok.token_to_id(pad) is None:
        raise KeyError(f"Qwen2 pad token {pad!r} is not in the vocabulary of {folder!r}")
    return TextTokenizer(tok, tok.token_to_id(pad), _max_len(cfg, None), cfg.get("padding_side", "right"),
                         cfg.get("truncation_side", "right"))


# ----------------------------------------------------------------------------- demo builders

_DEMO_CORPUS = """\
A photograph of a red fox sitting in fresh snow at sunrise, soft golden light, shallow depth of field.
An oil painting of a quiet harbour town with small fishing boats, white houses and a blue sky.
A watercolor illustration of a girl reading a book under a large oak tree in early autumn.
Close-up portrait of an old man with a grey beard, dramatic lighting, high detail, 85mm lens.
A futuristic city skyline at night with neon signs, flying cars and rain on the streets.
A cozy kitchen with wooden shelves, copper pots, green plants and morning sunlight through the window.
A cat wearing a tiny astronaut helmet floating inside a space station, digital art.
Mountains reflected in a calm lake, pine forest, clouds, long exposure, landscape photography.
A bowl of ramen with egg, noodles, spring onions and steam rising, food photography.
A vintage car parked on a cobblestone street in Paris, black and white film photo.
The dog runs across the beach while waves crash on the rocks; children are laughing nearby.
Three small birds sing on a branch covered with pink cherry blossoms in spring.
An ancient library full of dusty books, candles, spiral staircases and warm shadows.
A robot painting a self-portrait in a bright studio, colorful brushes, cinematic composition.
Sunset over the desert with tall cactus silhouettes and a purple and orange sky.
A glass of orange juice on a white table next to fresh fruit: apples, lemons, grapes and pears.
Isometric view of a tiny island with a lighthouse, trees and a wooden bridge, 3D render.
A knight in shining armor standing before a huge dragon, epic fantasy concept art.
Macro photo of a dewdrop on a green leaf, sharp focus, bokeh background, natural colors.
Busy market street in Tokyo with lanterns, people walking, umbrellas and bicycles.
A snowy village at night with glowing windows, smoke from chimneys and a starry sky.
An elegant woman in a red dress dancing in the rain, motion blur, street lights.
Underwater scene with coral reef, tropical fish, sea turtles and rays of sunlight.
A steaming cup of coffee beside a laptop and a notebook on a rainy afternoon.
Minimalist poster of a mountain with the text "HELLO WORLD" in bold letters.
Children's book illustration of a bear and a rabbit having a picnic in a meadow.
Aerial photo of green rice terraces, winding roads and small farms in the valley.
A medieval castle on a hill surrounded by fog, moody atmosphere, highly detailed.
Still life with flowers in a blue vase, tulips, roses and daisies, impressionist style.
Astronaut riding a horse on the moon, earth in the background, photorealistic, 8k.
What is the weather like today? It's sunny, warm and bright; we'll walk to the park.
They've built a new bridge over the river, and it's painted yellow, green and silver.
I'm drawing 12 circles, 7 squares and 3 triangles with a pencil and a ruler.
The quick brown fox jumps over the lazy dog, again and again, quickly and quietly.
She sells seashells by the seashore; the shells she sells are surely seashells.
Numbers such as 2024, 1080, 512 and 77 appear in image sizes, dates and prompts.
Electric guitars, drums, violins, pianos and trumpets on a concert stage with spotlights.
A silver spaceship landing in a field of sunflowers while farmers watch in surprise.
Abstract art made of circles, lines and triangles in primary colors, bauhaus design.
A happy golden retriever puppy playing with a ball in the garden, summer afternoon.
"""


def _demo_lines():
    return [ln for ln in _DEMO_CORPUS.splitlines() if ln.strip()]


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _special(content, normalized):
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}


def build_clip_tokenizer_files(folder: str, vocab_size: int = 1000, model_max_length: int = 77) -> dict:
    """Write a CLIP tokenizer folder (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) in the openai/clip-vit-large-patch14 format, trained on the built-in
    corpus. Vocab layout as CLIP's: 256 byte symbols, the same with ``</w>``, the merge results in
    merge order, then <|startoftext|>, <|endoftext|> (so eos = vocab_size - 1; pad = eos as FLUX).
    Returns the ids a matching CLIPTextConfig needs."""
    n_merges = vocab_size - 2 * 256 - 2
    if n_merges < 1:
        raise ValueError(f"vocab_size must exceed {2 * 256 + 2} (256 bytes, 256 bytes</w>, 2 specials)")
    os.makedirs(folder, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_order)
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(alphabet)})
    kept = []  # two merges can make the same string: learn a few spare ones to fill the vocab
    for a, b in _learn_merges(_clip_word_counts(_demo_lines()), n_merges + 64):
        if len(vocab) == vocab_size - 2:
            break
        kept.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    if len(vocab) < vocab_size - 2:
        raise ValueError(f"the demo corpus yields too few merges; use vocab_size <= {len(vocab) + 2}")
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab[bos], vocab[eos] = len(vocab), len(vocab) + 1
    _write_json(os.path.join(folder, "vocab.json"), vocab)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kept))
    added = {str(vocab[t]): {**_special(t, True), "special": True} for t in (bos, eos)}
    _write_json(os.path.join(folder, "tokenizer_config.json"), {
        "add_prefix_space": False, "added_tokens_decoder": added, "bos_token": bos,
        "clean_up_tokenization_spaces": True, "do_lower_case": True, "eos_token": eos, "errors": "replace",
        "model_max_length": model_max_length, "pad_token": eos, "tokenizer_class": "CLIPTokenizer",
        "unk_token": eos,
    })
    _write_json(os.path.join(folder, "special_tokens_map.json"), {
        "bos_token": _special(bos, True), "eos_token": _special(eos, True), "pad_token": eos,
        "unk_token": _special(eos, True),
    })
    return {"vocab_size": len(vocab), "bos_token_id": vocab[bos], "eos_token_id": vocab[eos],
            "pad_token_id": vocab[eos]}


def _clip_word_counts(lines) -> dict:
    """Words as CLIP's own normalizer + pre-tokenizer split them (byte-level symbols)."""
    norm = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    pre = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    counts = {}
    for line in lines:
        for w, _ in pre.pre_tokenize_str(norm.normalize_str(line)):
            counts[w] = counts.get(w, 0) + 1
    return counts


def _learn_merges(word_counts: dict, n_merges: int) -> list:
    """BPE merges for the demo vocab, learned by `tokenizers`' BpeTrainer over the CLIP-split words.
    (The trainer breaks frequency ties by hash order, so two builds may differ in rare merges; the
    demo folder is built once and cached.)"""
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # words arrive already split and byte-mapped
    trainer = trainers.BpeTrainer(
        vocab_size=2 * 256 + n_merges, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>",
        show_progress=False, min_frequency=1,
    )
    corpus = [w for w, c in sorted(word_counts.items()) for _ in range(c)]
    tok.train_from_iterator(corpus, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges][:n_merges]

def _byte_order(ch: str) -> int:
    """Position of a ByteLevel symbol in GPT-2's bytes_to_unicode table (CLIP's vocab order)."""
    o = ord(ch)
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    if o in printable:
        return printable.index(o)
    return len(printable) + (o - 256)


def _canonical_pieces(pieces: list) -> list:
    """Make the Unigram trainer's output reproducible: it appends rare single characters with scores
    1e-4 apart in hash order, and its parallel sums vary in the last bits. Those characters get one
    equal score, all scores are rounded, and pieces are sorted by score then text (SentencePiece
    lists pieces by descending score)."""
    lo = min(sc for _, sc in pieces)
    n_chars = sum(len(p) == 1 for p, _ in pieces)
    tail = lo + 1e-4 * (n_chars + 10)
    out = [[p, round(lo - 0.01, 4) if len(p) == 1 and sc <= tail else round(sc, 4)] for p, sc in pieces]
    return sorted(out, key=lambda p: (-p[1], p[0]))


def build_t5_tokenizer_files(folder: str, vocab_size: int = 1000, extra_ids: int = 100,
                             model_max_length: int = 512) -> dict:
    """Write a T5TokenizerFast folder (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json): SentencePiece-style Unigram with metaspace, <pad> 0, </s> 1, <unk> 2,
    trained pieces, then <extra_id_{extra_ids-1}> ... <extra_id_0> as in T5. ``vocab_size`` counts
    everything; the corpus may give fewer pieces (the returned vocab_size is the real one).
    No precompiled SentencePiece normalizer is written (it needs spm's binary charsmap)."""
    from tokenizers.models import Unigram

    os.makedirs(folder, exist_ok=True)
    specials = ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(),
         pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - extra_ids, special_tokens=specials, unk_token="<unk>", show_progress=False,
        max_piece_length=12,
    )
    tok.train_from_iterator(_demo_lines(), trainer=trainer)
    d = json.loads(tok.to_str())
    pieces = _canonical_pieces([(p, sc) for p, sc in d["model"]["vocab"] if p not in specials])
    vocab = [[s, 0.0] for s in specials] + pieces
    vocab += [[f"<extra_id_{i}>", 0.0] for i in reversed(range(extra_ids))]
    extras = [f"<extra_id_{i}>" for i in range(extra_ids)]
    ids = {p[0]: i for i, p in enumerate(vocab)}
    meta = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    added = [{"id": ids[t], **_special(t, False), "special": True} for t in specials + extras]
    tj = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": sorted(added, key=lambda t: t["id"]),
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, meta]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}},
        },
        "decoder": meta,
        "model": {"type": "Unigram", "unk_id": 2, "vocab": vocab, "byte_fallback": False},
    }
    _write_json(os.path.join(folder, "tokenizer.json"), tj)
    _write_json(os.path.join(folder, "tokenizer_config.json"), {
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in tj["added_tokens"]},
        "additional_special_tokens": extras, "clean_up_tokenization_spaces": True, "eos_token": "</s>",
        "extra_ids": extra_ids, "legacy": True, "model_max_length": model_max_length, "pad_token": "<pad>",
        "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>",
    })
    _write_json(os.path.join(folder, "special_tokens_map.json"), {
        "additional_special_tokens": extras, "eos_token": _special("</s>", False),
        "pad_token": _special("<pad>", False), "unk_token": _special("<unk>", False),
    })
    return {"vocab_size": len(vocab), "pad_token_id": 0, "eos_token_id": 1, "unk_token_id": 2}
