"""A tiny diffusers FluxPipeline written to disk with `save_pretrained`: the reference for pipeline tests.

Tokenizers are built with flashdiff's own builders and loaded by transformers' CLIPTokenizer and
T5TokenizerFast, so both sides read the same files. Sizes are small but keep FLUX's structure:
an 8x VAE with 16 latent channels (so packed tokens have 64 features), CLIP pooled + T5 states.
"""

from pathlib import Path

import numpy as np
import torch


def build_reference_pipeline(folder: Path, guidance_embeds: bool, hidden: int = 32, seed: int = 0):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    from flashdiff.models.tokenizers import build_clip_tokenizer_files, build_t5_tokenizer_files

    folder = Path(folder)
    build_clip_tokenizer_files(str(folder / "_tok"), vocab_size=1000)
    build_t5_tokenizer_files(str(folder / "_tok2"), vocab_size=1000)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "_tok")
    tokenizer_2 = T5TokenizerFast.from_pretrained(folder / "_tok2")

    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=hidden, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=hidden, pooled_projection_dim=hidden, guidance_embeds=guidance_embeds, axes_dims_rope=[4, 4, 8])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 8, 8], layers_per_block=1, latent_channels=16, norm_num_groups=4,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    with torch.no_grad():  # perturb norms and biases so no parameter hides behind its init value
        for module in (clip, t5, transformer, vae):
            for name, p in module.named_parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
    if guidance_embeds:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=scheduler, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                        tokenizer_2=tokenizer_2, transformer=transformer, vae=vae)
    pipe.save_pretrained(folder / "pipeline")
    return pipe, folder / "pipeline"


def pack(noise: np.ndarray) -> torch.Tensor:
    """(N, C, H/8, W/8) -> diffusers' packed (N, L, 4C)."""
    from diffusers import FluxPipeline

    n, c, h, w = noise.shape
    return FluxPipeline._pack_latents(torch.from_numpy(noise), n, c, h, w)
