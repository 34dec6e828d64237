"""FLUX.1 text-to-image: CLIP pooled + T5 text encoding -> flow-matching denoising -> VAE decode.

Follows diffusers' FluxPipeline step for step (packing, ids, sigmas, dynamic shift, true CFG,
unpacking, VAE scaling). Components are loaded when first needed; the text encoders are released
before the transformer is loaded, so peak memory is one component, not the sum.

Precision (bf16/fp16): the transformer gets sigma = t/1000 computed in float32 and rounds it once to the
compute dtype, as Black Forest Labs' reference sampler does (diffusers rounds t to bf16 first and divides
after, which moves about a third of the timesteps by one bf16 step). The latents stay float32 between steps
(diffusers and BFL keep them in bf16), and the VAE scaling/shift is applied in float32 before the VAE's cast.
In float32 all of this is identical to diffusers.
"""

import warnings
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from ...engine.components import configure_execution, build_model, copy_folder, load_component, save_component
from ...engine.errors import FlashdiffError
from ...engine.pipeline import VAE_TILE, GenerationParams, Pipeline
from ...engine.quantization import QuantSpec
from ...engine.schedulers import FlowMatchEulerScheduler
from ...engine.weights import load_folder, load_safetensors, read_json, read_safetensors_header, write_json_atomic
from ..clip import CLIPTextConfig, CLIPTextModel
from ..t5 import T5Config, T5Encoder
from ..tokenizers import load_clip_tokenizer, load_t5_tokenizer
from ..vae.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from .bfl import bfl_to_diffusers, config_from_bfl, is_bfl_flux
from .transformer import FluxTransformer, FluxTransformerConfig

PIPELINE_CLASSES = ("FluxPipeline",)
_COMPONENT_FILES = ["scheduler/*.json", "tokenizer/*", "tokenizer_2/*", "text_encoder/*.json", "text_encoder/*.safetensors",
                    "text_encoder_2/*.json", "text_encoder_2/*.safetensors*", "vae/*.json", "vae/*.safetensors"]
#: what `--model <repo>` downloads (not the BFL single files at the repo root)
ALLOW_PATTERNS = ["model_index.json", *_COMPONENT_FILES, "transformer/*.json", "transformer/*.safetensors*"]
#: what a single-file checkpoint needs from its base repo
BASE_PATTERNS = ["model_index.json", *_COMPONENT_FILES, "transformer/config.json"]
#: layers kept in full precision when quantizing (see docs/quantization.md)
QUANTIZATION_SKIP = ("x_embedder", "time_text_embed", "norm_out", "proj_out")
CLIP_MAX_LENGTH = 77


def single_file_variant(path: Path) -> str:
    """'flux-dev' or 'flux-schnell' for a BFL transformer checkpoint; a clear error for anything else."""
    keys = [k for k in read_safetensors_header(path) if k != "__metadata__"]
    if not is_bfl_flux(dict.fromkeys(keys)):
        raise FlashdiffError(
            f"{path} is not a FLUX transformer checkpoint in the Black Forest Labs single-file format "
            "(flux1-dev.safetensors / flux1-schnell.safetensors); for a diffusers folder pass the folder instead"
        )
    return "flux-dev" if any(k.endswith("guidance_in.in_layer.weight") for k in keys) else "flux-schnell"


def pack_latents(x: mx.array) -> mx.array:
    """(B, C, H/8, W/8) -> (B, (H/16)(W/16), 4C), features ordered c*4 + py*2 + px."""
    B, C, h, w = x.shape
    x = x.reshape(B, C, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents_nhwc(x: mx.array, height: int, width: int) -> mx.array:
    """(B, L, 4C) -> (B, H/8, W/8, C), channels-last for the VAE."""
    B, _, F = x.shape
    C, h, w = F // 4, height // 16, width // 16
    x = x.reshape(B, h, w, C, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(B, h * 2, w * 2, C)


def image_ids(height: int, width: int) -> mx.array:
    h, w = height // 16, width // 16
    rows = mx.broadcast_to(mx.arange(h)[:, None], (h, w))
    cols = mx.broadcast_to(mx.arange(w)[None, :], (h, w))
    return mx.stack([mx.zeros((h, w), mx.int32), rows, cols], axis=-1).reshape(h * w, 3).astype(mx.float32)


class FluxPipeline(Pipeline):
    family = "flux"
    DEFAULTS = {"steps": 28, "guidance": 3.5, "true_cfg": 1.0, "height": 1024, "width": 1024, "max_sequence_length": 512}
    MAX_SEQUENCE_LENGTH = 512

    def __init__(self, source, dtype=mx.bfloat16, quantize: QuantSpec | None = None, keep_text_encoders=False,
                 low_memory=False, vae_tiling=False):
        super().__init__(source, dtype, quantize, keep_text_encoders, low_memory, vae_tiling)
        root = Path(source.path)
        self.root = root
        for sub in ("scheduler", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae"):
            if not (root / sub).is_dir():
                raise FlashdiffError(f"{root} has no {sub}/ folder; the model download is incomplete or the folder is not a FLUX pipeline")
        if source.transformer_file is None and not (root / "transformer").is_dir():
            raise FlashdiffError(f"{root} has no transformer/ folder; the model download is incomplete")
        self.scheduler = FlowMatchEulerScheduler.from_dict(read_json(root / "scheduler" / "scheduler_config.json"))
        self.clip_tokenizer = load_clip_tokenizer(root / "tokenizer")
        self.t5_tokenizer = load_t5_tokenizer(root / "tokenizer_2")
        self.vae_config = AutoencoderKLConfig.from_dict(read_json(root / "vae" / "config.json"))
        self._text_encoders = None
        self._transformer = None
        self._vae = None
        self._guidance_embeds = None

    # ---- components ----
    def text_encoders(self):
        if self._text_encoders is None:
            clip = load_component(CLIPTextModel, CLIPTextConfig, self.root / "text_encoder", self.dtype, name="text_encoder (CLIP)")
            t5 = load_component(T5Encoder, T5Config, self.root / "text_encoder_2", self.dtype, name="text_encoder_2 (T5)",
                                quantize=self.quantize)
            self._text_encoders = (clip, t5)
        return self._text_encoders

    def transformer_config(self) -> dict:
        """The transformer's diffusers config dict (inferred from the weights for a single file)."""
        base_config = self.root / "transformer" / "config.json"
        if self.source.transformer_file is None:
            return read_json(base_config)
        # The RoPE split is not stored in BFL files; take it from the base repo's config when present.
        axes = read_json(base_config).get("axes_dims_rope") if base_config.exists() else None
        header = {k: _Shape(v["shape"]) for k, v in read_safetensors_header(self.source.transformer_file).items()
                  if k != "__metadata__"}
        return config_from_bfl(header, axes_dims_rope=axes)

    def uses_guidance(self) -> bool:
        """True for guidance-distilled transformers (dev), which take the `guidance` scale as an input."""
        if self._guidance_embeds is None:
            self._guidance_embeds = bool(self.transformer_config().get("guidance_embeds", False))
        return self._guidance_embeds

    def transformer(self) -> FluxTransformer:
        if self._transformer is None:
            config = self.transformer_config()
            if self.source.transformer_file is not None:
                weights = bfl_to_diffusers(load_safetensors(self.source.transformer_file))
            else:
                weights = load_folder(self.root / "transformer")
            self._transformer = build_model(FluxTransformer, FluxTransformerConfig, config, weights, self.dtype,
                                            name="transformer", quantize=self.quantize, skip=QUANTIZATION_SKIP)
            configure_execution(self._transformer)
        return self._transformer

    def vae(self) -> AutoencoderKL:
        if self._vae is None:
            self._vae = configure_execution(
                load_component(AutoencoderKL, AutoencoderKLConfig, self.root / "vae", self.dtype, name="vae"))
        return self._vae

    def release_text_encoders(self):
        self._text_encoders = None
        mx.clear_cache()

    # ---- arguments ----
    def _params(self, prompt, negative_prompt, steps, guidance, true_cfg, height, width, seed, num_images, latents,
                max_sequence_length, aspect=None, **extra) -> GenerationParams:
        # diffusers ignores these silently; we say so, and keep unused settings out of the image metadata
        if guidance is not None and not self.uses_guidance():
            warnings.warn("guidance is ignored: this FLUX model (schnell) has no guidance embedding; "
                          "use true_cfg with a negative prompt for classifier-free guidance", stacklevel=3)
        p = super()._params(prompt, negative_prompt, steps, guidance, true_cfg, height, width, seed, num_images, latents,
                            max_sequence_length, aspect=aspect, **extra)
        if p.negative_prompt is not None and p.true_cfg <= 1:
            warnings.warn("negative_prompt is ignored: true CFG needs true_cfg > 1", stacklevel=3)
            p.negative_prompt = None
        elif p.negative_prompt is None and p.true_cfg > 1:
            warnings.warn("true_cfg is ignored: true CFG needs a negative prompt", stacklevel=3)
        return p

    def metadata(self, p: GenerationParams, i: int, elapsed: float) -> dict:
        meta = super().metadata(p, i, elapsed)
        if not self.uses_guidance():
            meta.pop("guidance", None)  # not an input of this model
        return meta

    # ---- steps ----
    def warn_truncation(self, prompts: list[str], max_sequence_length: int):
        """Warn, as diffusers does, when a prompt is longer than CLIP's 77 tokens or T5's max_sequence_length."""
        for name, tok, limit, fix in (
                ("CLIP", self.clip_tokenizer, CLIP_MAX_LENGTH, "CLIP only gives the pooled embedding; T5 reads the rest"),
                ("T5", self.t5_tokenizer, max_sequence_length,
                 f"raise max_sequence_length (at most {self.MAX_SEQUENCE_LENGTH})")):
            _, mask = tok.encode(prompts, padding="longest", truncation=False)
            longest = int(mask.sum(axis=1).max()) if mask.size else 0
            if longest > limit:
                warnings.warn(f"the prompt has {longest} {name} tokens; only the first {limit} are used ({fix})", stacklevel=5)

    def encode_prompt(self, prompts: list[str], max_sequence_length: int):
        """-> (T5 prompt_embeds (B, L, 4096), CLIP pooled (B, 768)), evaluated."""
        self.warn_truncation(prompts, max_sequence_length)
        clip, t5 = self.text_encoders()
        clip_ids, _ = self.clip_tokenizer.encode(prompts, max_length=CLIP_MAX_LENGTH)
        t5_ids, _ = self.t5_tokenizer.encode(prompts, max_length=max_sequence_length)
        pooled = clip(mx.array(clip_ids)).pooler_output
        embeds = t5(mx.array(t5_ids))
        mx.eval(embeds, pooled)
        return embeds, pooled

    def _generate(self, p: GenerationParams, progress=True, callback=None) -> mx.array:
        do_true_cfg = p.true_cfg > 1 and p.negative_prompt is not None
        unique = sorted(set(p.prompt + (p.negative_prompt if do_true_cfg else [])))
        embeds, pooled = self.encode_prompt(unique, p.max_sequence_length)
        row = {s: i for i, s in enumerate(unique)}

        def take(prompts):  # each prompt is encoded once, however many images or CFG branches use it
            idx = mx.array([row[s] for s in prompts])
            return embeds[idx], pooled[idx]

        cond = take(p.prompt)
        neg = take(p.negative_prompt) if do_true_cfg else None
        if not self.keep_text_encoders:
            self.release_text_encoders()

        latents = pack_latents(self.initial_noise(p))
        img_ids = image_ids(p.height, p.width)
        txt_ids = mx.zeros((cond[0].shape[1], 3))
        self.scheduler.set_timesteps(p.steps, image_seq_len=latents.shape[1])

        model = self.transformer()
        guidance = mx.full((latents.shape[0],), p.guidance, mx.float32) if model.config.guidance_embeds else None
        rope = model.rotary_embedding(txt_ids, img_ids)
        dt = model.dtype
        cond = (cond[0].astype(dt), cond[1].astype(dt))
        neg = (neg[0].astype(dt), neg[1].astype(dt)) if neg else None

        def predict(latents, t):
            t = mx.full((latents.shape[0],), t / 1000.0, mx.float32)
            x = latents.astype(dt)
            v = model(x, cond[0], cond[1], t, img_ids, txt_ids, guidance=guidance, rope=rope)
            if do_true_cfg:
                v_neg = model(x, neg[0], neg[1], t, img_ids, txt_ids, guidance=guidance, rope=rope)
                v = v_neg + p.true_cfg * (v - v_neg)
            return v

        latents = self.denoise(latents, predict, progress, callback)
        return self.decode(latents, p.height, p.width)

    def decode(self, latents: mx.array, height: int, width: int) -> mx.array:
        vae = self.vae()
        z = unpack_latents_nhwc(latents, height, width)
        z = z / self.vae_config.scaling_factor + (self.vae_config.shift_factor or 0.0)
        out = []
        for b in range(z.shape[0]):  # one image at a time bounds VAE activation memory
            img = vae.decode_tiled(z[b : b + 1], *VAE_TILE) if self.vae_tiling else vae.decode(z[b : b + 1])
            mx.eval(img)
            out.append(img)
        return mx.concatenate(out, axis=0)

    # ---- saving (flashdiff convert) ----
    def save_pretrained(self, folder, progress=True):
        folder = Path(folder)
        steps = ["tokenizers", "scheduler", "text_encoder", "text_encoder_2", "transformer", "vae"]
        bar = tqdm(steps, desc="converting", disable=not progress, leave=False)
        for step in bar:
            bar.set_postfix_str(step)
            if step == "tokenizers":
                for sub in ("tokenizer", "tokenizer_2"):
                    copy_folder(self.root / sub, folder / sub)
            elif step == "scheduler":
                copy_folder(self.root / "scheduler", folder / "scheduler")
            elif step in ("text_encoder", "text_encoder_2"):
                clip, t5 = self.text_encoders()
                model = clip if step == "text_encoder" else t5
                save_component(model, read_json(self.root / step / "config.json"), folder / step, self.quantize if model is t5 else None)
                if step == "text_encoder_2":
                    self.release_text_encoders()
            elif step == "transformer":
                model = self.transformer()
                save_component(model, self.transformer_config(), folder / step, self.quantize,
                               to_checkpoint=model.to_checkpoint)
                self._transformer = None
                mx.clear_cache()
            else:
                save_component(self.vae(), read_json(self.root / "vae" / "config.json"), folder / "vae", None,
                               to_checkpoint=self.vae().to_checkpoint)
        index = read_json(self.root / "model_index.json")
        index["_flashdiff"] = {"preset": self.source.preset.get("name"), "dtype": str(self.dtype).split(".")[-1],
                               "quantization": self.quantization.to_dict() if self.quantization else None}
        write_json_atomic(folder / "model_index.json", index)


class _Shape:
    """Stands in for an array where only the shape is read (config inference from a file header)."""

    def __init__(self, shape):
        self.shape = tuple(shape)


PIPELINE = FluxPipeline
