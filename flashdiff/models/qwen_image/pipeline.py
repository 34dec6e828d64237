"""Qwen-Image text-to-image: Qwen2.5-VL prompt encoding -> flow-matching denoising -> Wan VAE decode.

Follows diffusers' QwenImagePipeline.__call__ (`pipelines/qwenimage/pipeline_qwenimage.py`) step for
step: chat-template prompt encoding with the 34 template tokens dropped and a text mask, latents packed
in 2x2 patches like FLUX, `img_shapes = [(1, H/16, W/16)]`, sigmas linspace(1, 1/N, N) with the
scheduler's (dynamic) shift and shift_terminal, the timestep passed as t/1000, true CFG with the
per-token norm rescale, and the VAE decode of `z * latents_std + latents_mean`, frame 0.

Precision (bf16/fp16) against diffusers: the timestep is rounded to the compute dtype before `/ 1000` as
diffusers does. Deliberately more precise than diffusers: the latents stay float32 between steps (diffusers
rounds them to bf16 after every scheduler step), the true-CFG combination and norm rescale run in float32,
and the VAE input is denormalized in float32 before the VAE's own cast.

Components load when first needed; the text encoder is released before the transformer is loaded,
so peak memory is one component, not the sum.
"""

import warnings
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from ...engine.components import configure_execution, copy_folder, load_component, save_component
from ...engine.errors import FlashdiffError
from ...engine.pipeline import VAE_TILE, GenerationParams, Pipeline
from ...engine.quantization import QuantSpec
from ...engine.schedulers import FlowMatchEulerScheduler
from ...engine.weights import read_json, write_json_atomic
from ..flux.pipeline import pack_latents, unpack_latents_nhwc
from ..qwen2_5_vl import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel
from ..tokenizers import load_qwen2_tokenizer
from ..vae.tiling import decode_in_tiles
from ..vae.wan import WanVAE, WanVAEConfig
from .text_encoder import MAX_SEQUENCE_LENGTH_CAP, encode_prompts
from .transformer import QwenImageTransformer, QwenImageTransformerConfig

PIPELINE_CLASSES = ("QwenImagePipeline",)
#: what `--model <repo>` downloads
ALLOW_PATTERNS = ["model_index.json", "scheduler/*.json", "tokenizer/*", "text_encoder/*.json",
                  "text_encoder/*.safetensors*", "transformer/*.json", "transformer/*.safetensors*",
                  "vae/*.json", "vae/*.safetensors"]
#: layers kept in full precision when quantizing (input/output projections and the timestep MLP)
QUANTIZATION_SKIP = ("img_in", "txt_in", "time_text_embed", "norm_out", "proj_out")
#: the sizes the Qwen-Image model card lists, as [width, height]
ASPECT_RATIOS = {"1:1": [1328, 1328], "16:9": [1664, 928], "9:16": [928, 1664], "4:3": [1472, 1140],
                 "3:4": [1140, 1472], "3:2": [1584, 1056], "2:3": [1056, 1584]}
_COMPONENTS = ("scheduler", "tokenizer", "text_encoder", "transformer", "vae")


class QwenImagePipeline(Pipeline):
    family = "qwen_image"
    #: the model card's recipe: 50 steps, true CFG 4 against the negative prompt " "
    DEFAULTS = {"steps": 50, "guidance": 1.0, "true_cfg": 4.0, "negative_prompt": " ", "height": 1024, "width": 1024,
                "max_sequence_length": 512}
    MAX_SEQUENCE_LENGTH = MAX_SEQUENCE_LENGTH_CAP  # 1024
    ASPECT_RATIOS = ASPECT_RATIOS

    def __init__(self, source, dtype=mx.bfloat16, quantize: QuantSpec | None = None, keep_text_encoders=False,
                 low_memory=False, vae_tiling=False):
        super().__init__(source, dtype, quantize, keep_text_encoders, low_memory, vae_tiling)
        root = Path(source.path)
        self.root = root
        for sub in _COMPONENTS:
            if not (root / sub).is_dir():
                raise FlashdiffError(
                    f"{root} has no {sub}/ folder; the model download is incomplete or the folder is not a Qwen-Image pipeline")
        self.scheduler = FlowMatchEulerScheduler.from_dict(read_json(root / "scheduler" / "scheduler_config.json"))
        try:
            self.tokenizer = load_qwen2_tokenizer(str(root / "tokenizer"))
        except (OSError, KeyError, ValueError) as e:
            raise FlashdiffError(f"cannot read the Qwen2 tokenizer in {root / 'tokenizer'}: {e}") from None
        self.vae_config = WanVAEConfig.from_dict(read_json(root / "vae" / "config.json"))
        self.transformer_config = read_json(root / "transformer" / "config.json")
        tcfg = QwenImageTransformerConfig.from_dict(self.transformer_config)
        # diffusers: vae_scale_factor = 2 ** len(temperal_downsample); latents are packed in 2x2 patches
        self.vae_scale_factor = 2 ** len(self.vae_config.temperal_downsample)
        self.SIZE_MULTIPLE = self.vae_scale_factor * tcfg.patch_size
        self.latent_channels = tcfg.in_channels // tcfg.patch_size**2
        if self.latent_channels != self.vae_config.z_dim:
            raise FlashdiffError(
                f"transformer in_channels {tcfg.in_channels} (= {self.latent_channels} latent channels x "
                f"{tcfg.patch_size}x{tcfg.patch_size}) does not fit the VAE's z_dim {self.vae_config.z_dim}; "
                "the transformer/ and vae/ folders come from different models")
        self._text_encoder = None
        self._transformer = None
        self._vae = None

    # ---- components ----
    def text_encoder(self) -> Qwen2_5_VLTextModel:
        if self._text_encoder is None:
            self._text_encoder = load_component(Qwen2_5_VLTextModel, Qwen2_5_VLTextConfig, self.root / "text_encoder",
                                                self.dtype, name="text_encoder (Qwen2.5-VL)", quantize=self.quantize)
        return self._text_encoder

    def transformer(self) -> QwenImageTransformer:
        if self._transformer is None:
            self._transformer = load_component(QwenImageTransformer, QwenImageTransformerConfig, self.root / "transformer",
                                               self.dtype, name="transformer", quantize=self.quantize,
                                               skip=QUANTIZATION_SKIP)
            configure_execution(self._transformer)
        return self._transformer

    def vae(self) -> WanVAE:
        if self._vae is None:
            self._vae = configure_execution(load_component(WanVAE, WanVAEConfig, self.root / "vae", self.dtype, name="vae"))
        return self._vae

    def release_text_encoders(self):
        self._text_encoder = None
        mx.clear_cache()

    # ---- arguments ----
    def _params(self, prompt, negative_prompt, steps, guidance, true_cfg, height, width, seed, num_images, latents,
                max_sequence_length, aspect=None, **extra) -> GenerationParams:
        if guidance is not None:
            warnings.warn("guidance is ignored: Qwen-Image is not guidance-distilled (use true_cfg)", stacklevel=3)
        explicit_negative = negative_prompt is not None
        p = super()._params(prompt, negative_prompt, steps, None, true_cfg, height, width, seed, num_images, latents,
                            max_sequence_length, aspect=aspect, **extra)
        if p.true_cfg <= 1 and p.negative_prompt is not None:
            if explicit_negative:  # as diffusers: a negative prompt needs true_cfg > 1
                warnings.warn("negative_prompt is ignored: true CFG needs true_cfg > 1", stacklevel=3)
            p.negative_prompt = None
        return p

    def metadata(self, p: GenerationParams, i: int, elapsed: float) -> dict:
        meta = super().metadata(p, i, elapsed)
        meta.pop("guidance", None)  # not used by this family
        if p.negative_prompt is None:
            meta["true_cfg"] = 1.0
        return meta

    # ---- steps ----
    def encode_prompt(self, prompts: list[str], max_sequence_length: int):
        """-> (embeds (B, L, D), mask (B, L) int32 0/1), evaluated; L = the longest prompt, at most max_sequence_length."""
        embeds, mask = encode_prompts(self.text_encoder(), self.tokenizer, prompts, max_sequence_length=max_sequence_length)
        mx.eval(embeds, mask)
        return embeds, mask

    def _generate(self, p: GenerationParams, progress=True, callback=None) -> mx.array:
        do_true_cfg = p.true_cfg > 1 and p.negative_prompt is not None
        unique = sorted(set(p.prompt + (p.negative_prompt if do_true_cfg else [])))
        embeds, mask = self.encode_prompt(unique, p.max_sequence_length)
        row = {s: i for i, s in enumerate(unique)}

        def take(prompts):
            # Cut to this group's longest prompt, as diffusers encodes prompt and negative prompt separately;
            # an all-ones mask becomes None (no masking), as in diffusers' encode_prompt.
            idx = mx.array([row[s] for s in prompts])
            m = mask[idx]
            length = max(int(m.sum(axis=1).max()), 1)
            e, m = embeds[idx][:, :length], m[:, :length]
            return e, (None if bool(m.all()) else m)

        cond = take(p.prompt)
        neg = take(p.negative_prompt) if do_true_cfg else None
        if not self.keep_text_encoders:
            self.release_text_encoders()

        latents = pack_latents(self.initial_noise(p))  # (N, L_img, 4C) float32
        f = self.vae_scale_factor
        img_shapes = [[(1, p.height // f // 2, p.width // f // 2)]]
        self.scheduler.set_timesteps(p.steps, image_seq_len=latents.shape[1])

        model = self.transformer()
        dt = model.dtype
        cond_rope = model.rope(img_shapes, cond[0].shape[1])
        cond = (cond[0].astype(dt), cond[1])
        if neg is not None:
            neg_rope = model.rope(img_shapes, neg[0].shape[1])
            neg = (neg[0].astype(dt), neg[1])

        def predict(latents, t):
            # As diffusers (Qwen-Image's reference code): t is cast to the compute dtype *before* the division, so in
            # bf16 the model sees bf16(bf16(t) / 1000), one bf16 step off bf16(t / 1000) on ~1/3 of the steps.
            t = mx.full((latents.shape[0],), t, mx.float32).astype(dt) / 1000
            x = latents.astype(dt)
            v = model(x, cond[0], cond[1], t, rope=cond_rope)
            if do_true_cfg:
                v_neg = model(x, neg[0], neg[1], t, rope=neg_rope)
                v, v_neg = v.astype(mx.float32), v_neg.astype(mx.float32)
                comb = v_neg + p.true_cfg * (v - v_neg)
                # per-token rescale: the guided prediction keeps the conditional one's norm over channels
                v = comb * (mx.linalg.norm(v, axis=-1, keepdims=True) / mx.linalg.norm(comb, axis=-1, keepdims=True))
            return v

        latents = self.denoise(latents, predict, progress, callback)
        return self.decode(latents, p.height, p.width)

    def decode(self, latents: mx.array, height: int, width: int) -> mx.array:
        """Packed latents (N, L, 4C) -> pixels (N, H, W, 3) in [-1, 1]."""
        vae = self.vae()
        grid = 2 * self.vae_scale_factor  # pixels per packed token; unpack_latents_nhwc counts 16
        z = unpack_latents_nhwc(latents, height // grid * 16, width // grid * 16)  # (N, h, w, C)
        out = []
        for b in range(z.shape[0]):  # one image at a time bounds VAE activation memory
            zb = vae.denormalize(z[b : b + 1].astype(mx.float32))  # (1, h, w, C)
            decode_frame0 = lambda t: vae.decode(t[:, None])[:, 0]  # noqa: E731  (T=1 video -> its frame)
            if self.vae_tiling:
                img = decode_in_tiles(decode_frame0, zb, vae.config.scale_factor_spatial, 3, *VAE_TILE)
            else:
                img = decode_frame0(zb)
            mx.eval(img)
            out.append(img)
        return mx.concatenate(out, axis=0)

    # ---- saving (flashdiff convert) ----
    def save_pretrained(self, folder, progress=True):
        """Write a self-contained folder (tokenizer, scheduler, text encoder, transformer, VAE) that loads
        without the original download; the transformer and text encoder are stored quantized if this
        pipeline quantizes."""
        folder = Path(folder)
        bar = tqdm(_COMPONENTS, desc="converting", disable=not progress, leave=False)
        for step in bar:
            bar.set_postfix_str(step)
            if step in ("scheduler", "tokenizer"):
                copy_folder(self.root / step, folder / step)
            elif step == "text_encoder":
                save_component(self.text_encoder(), read_json(self.root / step / "config.json"), folder / step, self.quantize)
                self.release_text_encoders()
            elif step == "transformer":
                save_component(self.transformer(), self.transformer_config, folder / step, self.quantize,
                               to_checkpoint=QwenImageTransformer.to_checkpoint)
                self._transformer = None
                mx.clear_cache()
            else:
                vae = self.vae()
                save_component(vae, read_json(self.root / "vae" / "config.json"), folder / "vae", None,
                               to_checkpoint=vae.to_checkpoint)
        index = read_json(self.root / "model_index.json")
        index["_flashdiff"] = {"preset": self.source.preset.get("name"), "dtype": str(self.dtype).split(".")[-1],
                               "quantization": self.quantization.to_dict() if self.quantization else None}
        write_json_atomic(folder / "model_index.json", index)


PIPELINE = QwenImagePipeline
