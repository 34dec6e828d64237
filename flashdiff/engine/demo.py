"""The offline demo model: a tiny random-weight FLUX-architecture pipeline in the real diffusers layout.

`build_demo()` writes it once into the cache folder (FLASHDIFF_HOME, default ~/.cache/flashdiff)
and returns its path. Everything is made here, tokenizers included, so it needs no download; the
folder has the same files, key names and configs as black-forest-labs/FLUX.1-schnell, only tiny,
so diffusers' FluxPipeline.from_pretrained loads it too.
"""

import shutil
import tempfile
from pathlib import Path

import mlx.core as mx

from .errors import FlashdiffError
from .weights import save_weights, write_json_atomic

DEMO_VERSION = 1
LATENT_CHANNELS = 16


def demo_configs(clip_vocab: int, clip_eos: int, clip_bos: int, t5_vocab: int) -> dict:
    """The component configs, spelled as the real repo's config.json files."""
    return {
        "model_index": {
            "_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        },
        "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                      "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
                      "base_image_seq_len": 256, "max_image_seq_len": 4096},
        "text_encoder": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": clip_vocab,
                         "hidden_size": 64, "intermediate_size": 128, "projection_dim": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                         "layer_norm_eps": 1e-5, "bos_token_id": clip_bos, "eos_token_id": clip_eos, "pad_token_id": 1,
                         "torch_dtype": "float32"},
        "text_encoder_2": {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": t5_vocab,
                           "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4,
                           "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
                           "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
                           "layer_norm_epsilon": 1e-6, "dropout_rate": 0.0, "pad_token_id": 0, "eos_token_id": 1,
                           "decoder_start_token_id": 0, "tie_word_embeddings": False, "torch_dtype": "float32"},
        "transformer": {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 4 * LATENT_CHANNELS,
                        "out_channels": None, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 32,
                        "num_attention_heads": 2, "joint_attention_dim": 64, "pooled_projection_dim": 64,
                        "guidance_embeds": False, "axes_dims_rope": [8, 12, 12]},
        "vae": {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
                "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                "block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "act_fn": "silu",
                "latent_channels": LATENT_CHANNELS, "norm_num_groups": 8, "sample_size": 256,
                "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
                "use_post_quant_conv": False, "mid_block_add_attention": True, "force_upcast": True},
    }


def write_demo(folder: Path, seed: int = 0):
    """Write the demo pipeline into `folder` (which must not exist)."""
    from ..models.clip import CLIPTextConfig, CLIPTextModel
    from ..models.flux.transformer import FluxTransformer, FluxTransformerConfig
    from ..models.t5 import T5Config, T5Encoder
    from ..models.tokenizers import build_clip_tokenizer_files, build_t5_tokenizer_files, load_clip_tokenizer, load_t5_tokenizer
    from ..models.vae.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
    from .components import model_weights

    folder = Path(folder)
    build_clip_tokenizer_files(folder / "tokenizer")
    build_t5_tokenizer_files(folder / "tokenizer_2")
    clip_tok = load_clip_tokenizer(folder / "tokenizer").tokenizer
    t5_tok = load_t5_tokenizer(folder / "tokenizer_2").tokenizer
    cfg = demo_configs(clip_tok.get_vocab_size(), clip_tok.token_to_id("<|endoftext|>"),
                       clip_tok.token_to_id("<|startoftext|>"), t5_tok.get_vocab_size())
    write_json_atomic(folder / "model_index.json", cfg["model_index"])
    write_json_atomic(folder / "scheduler" / "scheduler_config.json", cfg["scheduler"])

    mx.random.seed(seed)
    models = {
        "text_encoder": (CLIPTextModel(CLIPTextConfig.from_dict(cfg["text_encoder"])), "model"),
        "text_encoder_2": (T5Encoder(T5Config.from_dict(cfg["text_encoder_2"])), "model"),
        "transformer": (FluxTransformer(FluxTransformerConfig.from_dict(cfg["transformer"])), "diffusion_pytorch_model"),
        "vae": (AutoencoderKL(AutoencoderKLConfig.from_dict(cfg["vae"])), "diffusion_pytorch_model"),
    }
    for name, (model, filename) in models.items():
        weights = model_weights(model)
        if hasattr(model, "to_checkpoint"):
            weights = model.to_checkpoint(weights)
        save_weights(folder / name, {k: v.astype(mx.float32) for k, v in weights.items()}, name=filename)
        write_json_atomic(folder / name / "config.json", cfg[name])


def build_demo(home: Path | None = None) -> Path:
    """Return the demo model folder, building it first if needed (atomically: a half-built folder is never used)."""
    from .sources import flashdiff_home

    folder = Path(home or flashdiff_home()).expanduser() / f"demo-flux-v{DEMO_VERSION}"
    if (folder / "model_index.json").exists():
        return folder
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".demo-build-"))
        write_demo(tmp / "model")
        try:
            (tmp / "model").rename(folder)
        except OSError:  # another process finished first
            if not (folder / "model_index.json").exists():
                raise
    except OSError as e:  # unwritable or full FLASHDIFF_HOME: one line, not a traceback
        raise FlashdiffError(
            f"cannot build the demo model in {folder.parent} ({e.strerror or e}); set FLASHDIFF_HOME to a writable "
            "folder with a few MB free (e.g. FLASHDIFF_HOME=/tmp/flashdiff)") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
