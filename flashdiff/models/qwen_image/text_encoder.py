"""Qwen-Image prompt encoding with the Qwen2.5-VL text tower.

Mirrors diffusers' `QwenImagePipeline._get_qwen_prompt_embeds` + `encode_prompt`
(`pipelines/qwenimage/pipeline_qwenimage.py`): wrap each prompt in the chat template, tokenize
(max_length = 1024 + 34, pad to the longest, truncate), run the text tower, keep each prompt's real
tokens, drop the 34 template-prefix tokens, zero-pad to the batch maximum with a 0/1 mask, then cut
to `max_sequence_length`.
"""

import mlx.core as mx
import numpy as np

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
DROP_IDX = 34  # tokens of the template prefix (system message + "<|im_start|>user\n")
TOKENIZER_MAX_LENGTH = 1024
MAX_SEQUENCE_LENGTH_CAP = 1024


def _is_right_padded(mask: np.ndarray) -> bool:
    """True when every row's real tokens form a prefix (ones then zeros)."""
    lengths = mask.sum(axis=1)
    return bool(np.all(mask == (np.arange(mask.shape[1])[None, :] < lengths[:, None])))


def encode_prompts(model, tokenizer, prompts, max_sequence_length: int = 512, num_images_per_prompt: int = 1):
    """Encode prompts for the Qwen-Image transformer.

    model: `Qwen2_5_VLTextModel`. tokenizer: any object with
    `encode(texts, max_length=..., padding=True, truncation=True) -> (ids, mask)` giving (B, L) token ids
    and a 0/1 attention mask (lists, numpy or mx arrays; left or right padding both handled).
    prompts: a string or a list of strings.

    Returns `(prompt_embeds (B*n, L, D) in the model's dtype, prompt_embeds_mask (B*n, L) int32 0/1)` with
    `L = min(longest prompt after dropping the template prefix, max_sequence_length)`; prompts are
    repeated `num_images_per_prompt` times (consecutively, like diffusers). Unlike diffusers, the mask
    is returned even when it is all ones (diffusers returns None then); both mean "no padding".
    """
    if not isinstance(max_sequence_length, int) or max_sequence_length < 1:
        raise ValueError(f"max_sequence_length must be a positive int, got {max_sequence_length!r}")
    if max_sequence_length > MAX_SEQUENCE_LENGTH_CAP:
        raise ValueError(
            f"max_sequence_length cannot be greater than {MAX_SEQUENCE_LENGTH_CAP} (Qwen-Image's limit) "
            f"but is {max_sequence_length}; pass a value <= {MAX_SEQUENCE_LENGTH_CAP}"
        )
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a string or a non-empty list of strings")

    texts = [PROMPT_TEMPLATE.format(p) for p in prompts]
    ids, mask = tokenizer.encode(
        texts, max_length=TOKENIZER_MAX_LENGTH + DROP_IDX, padding=True, truncation=True
    )
    ids = np.asarray(ids, dtype=np.int64)
    mask = np.asarray(mask).astype(np.int64)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(
            f"tokenizer.encode must return (B, L) ids and mask of the same shape, got {ids.shape} and {mask.shape}")

    # Causal attention: tokens past DROP_IDX + max_sequence_length cannot change the kept ones, so with
    # right padding they need not be run. (With left padding positions depend on the padding, so run all.)
    if _is_right_padded(mask):
        keep = min(ids.shape[1], DROP_IDX + max_sequence_length)
        ids, mask = ids[:, :keep], mask[:, :keep]

    hidden = model(mx.array(ids.astype(np.int32)), mx.array(mask.astype(np.int32)))  # (B, L, D)

    pieces = []
    for b in range(len(prompts)):
        idx = np.nonzero(mask[b])[0][DROP_IDX:][:max_sequence_length]
        pieces.append(hidden[b][mx.array(idx.astype(np.int32))] if len(idx) else hidden[b, :0])
    seq_len = max(int(p.shape[0]) for p in pieces)
    D = hidden.shape[-1]
    embeds = mx.stack([mx.concatenate([p, mx.zeros((seq_len - p.shape[0], D), dtype=hidden.dtype)]) for p in pieces])
    emb_mask = mx.array(
        np.stack([(np.arange(seq_len) < p.shape[0]).astype(np.int32) for p in pieces]))

    if num_images_per_prompt > 1:
        embeds = mx.repeat(embeds, num_images_per_prompt, axis=0)
        emb_mask = mx.repeat(emb_mask, num_images_per_prompt, axis=0)
    return embeds, emb_mask
