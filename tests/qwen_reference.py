"""A tiny diffusers QwenImagePipeline written to disk with `save_pretrained`: the reference for pipeline tests.

The tokenizer is the real Qwen2 vocabulary, converted from the BPE ranks file that PyPI's
`dashscope` package ships (no download at test time), laid out as `Qwen/Qwen-Image/tokenizer`. That
lets the diffusers test dummy (`tests/pipelines/qwenimage/test_qwenimage.py`, whose tokenizer
otherwise comes from the Hub) reproduce its golden slice offline.

Two model setups:
- "golden": the diffusers test dummy exactly (seeds, sizes, default scheduler): 4 latent channels, a
  4x VAE (dim_mult [1, 2, 4]), text hidden 16.
- "full": the real layout in small: 16 latent channels, an 8x VAE (dim_mult [1, 2, 4, 4]) with the
  Wan 2.1 latent statistics, Qwen-Image's scheduler config (dynamic shift 256/8192, 0.5/0.9,
  shift_terminal 0.02), perturbed norms and biases.
"""

import json
from pathlib import Path

import numpy as np
import torch

SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
GOLDEN_SLICE = [0.5633, 0.6368, 0.6015, 0.5637, 0.5817, 0.5528, 0.5718, 0.6326,
                0.4147, 0.3556, 0.5623, 0.4833, 0.4971, 0.5262, 0.4087, 0.5021]
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")


def qwen_ranks_file() -> Path:
    """Qwen's byte-level BPE ranks (qwen.tiktoken), as the PyPI package `dashscope` ships them.

    Qwen2's tokenizer has the same 151643 ranked tokens plus special tokens. scripts/test.sh installs
    dashscope with --no-deps (only this data file is used; the package is never imported)."""
    import importlib.metadata as md

    import pytest

    try:
        files = md.files("dashscope") or []
    except md.PackageNotFoundError:
        pytest.skip("needs the Qwen BPE ranks from PyPI's dashscope package: pip install --no-deps dashscope==2.0.2")
    found = [f for f in files if f.name == "qwen.tiktoken"]
    if not found:
        pytest.skip("the installed dashscope package has no qwen.tiktoken")
    return Path(found[0].locate())


def build_tokenizer_files(folder: Path) -> Path:
    """vocab.json + merges.txt + tokenizer_config.json, laid out as the Qwen-Image repo ships its tokenizer,
    converted from the ranks file by transformers' TikTokenConverter."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = json.loads(TikTokenConverter(vocab_file=str(qwen_ranks_file())).converted().to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for t, i in SPECIAL_TOKENS.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": added, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace",
        "model_max_length": 131072, "tokenizer_class": "Qwen2Tokenizer", "split_special_tokens": False}))
    return folder


def _golden_components():
    """The diffusers test's get_dummy_components, seeds and order included."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    torch.manual_seed(0)
    scheduler = FlowMatchEulerDiscreteScheduler()
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=152064, vision_end_token_id=151653, vision_start_token_id=151652,
        vision_token_id=151654)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    return transformer, vae, scheduler, text_encoder


def _full_components(seed: int = 0):
    """The real Qwen-Image layout in small (16 latent channels, 8x VAE, the release scheduler config)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=64, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True])  # Wan 2.1 latents_mean / std defaults
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000,
        shift=1.0, shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)
    config = Qwen2_5_VLConfig(
        # hidden 64 so that the text tower has layers large enough to quantize
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": 152064, "rms_norm_eps": 1e-6,
                     "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 64},
        vision_end_token_id=151653, vision_start_token_id=151652, vision_token_id=151654)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # perturb norms and biases so no parameter hides behind its init value
        for module in (transformer, vae, text_encoder):
            for _, p in module.named_parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
    return transformer, vae, scheduler, text_encoder


def build_reference_pipeline(folder: Path, setup: str = "full"):
    """Build the tiny diffusers pipeline ("golden" or "full"), save it under folder/pipeline; return (pipe, path)."""
    from diffusers import QwenImagePipeline
    from transformers import Qwen2Tokenizer

    folder = Path(folder)
    tokenizer = Qwen2Tokenizer.from_pretrained(build_tokenizer_files(folder / "_tok"))
    transformer, vae, scheduler, text_encoder = _golden_components() if setup == "golden" else _full_components()
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / "pipeline")
    return pipe, folder / "pipeline"


def pack(noise: np.ndarray) -> torch.Tensor:
    """(N, C, h, w) -> diffusers' packed (N, L, 4C)."""
    from diffusers import QwenImagePipeline

    n, c, h, w = noise.shape
    return QwenImagePipeline._pack_latents(torch.from_numpy(noise), n, c, h, w)
