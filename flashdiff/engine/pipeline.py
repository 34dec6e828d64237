"""The user-facing pipeline API: `Pipeline.from_pretrained(...)` then `generate(...)`.

Family pipelines (flashdiff/models/<family>/pipeline.py) subclass `Pipeline` and implement
`_generate` (and `save_pretrained`); this file holds what every family shares: resolving the model, argument
checks, seeds and noise, progress, and turning decoded pixels into PIL images with metadata.
"""

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image
from tqdm import tqdm

from .components import parse_dtype
from .errors import FlashdiffError
from .quantization import QuantSpec
from .sources import ModelSource, family_module, resolve


#: (tile, overlap) in latent pixels for vae_tiling: 512-pixel tiles overlapping by 128 pixels
VAE_TILE = (64, 16)


@dataclass
class GenerationParams:
    prompt: list[str]
    negative_prompt: list[str] | None
    steps: int
    guidance: float
    true_cfg: float
    height: int
    width: int
    seeds: list[int]
    max_sequence_length: int
    latents: np.ndarray | None = None
    extra: dict = field(default_factory=dict)


class Pipeline:
    family = ""
    #: family defaults, overridden by the preset's "defaults"
    DEFAULTS = {"steps": 28, "guidance": 3.5, "true_cfg": 1.0, "height": 1024, "width": 1024, "max_sequence_length": 512}
    #: height and width must be multiples of this (the VAE's downsampling x the transformer's patch size)
    SIZE_MULTIPLE = 16
    MAX_SEQUENCE_LENGTH = 512
    #: pixels per latent cell; families read it from their VAE config when it can differ
    vae_scale_factor = 8
    #: channels of the (unpacked) latents the user may pass as `latents`
    latent_channels = 16
    #: named sizes {"16:9": [width, height], ...}; a preset's "aspect_ratios" replaces them
    ASPECT_RATIOS: dict = {}

    def __init__(self, source: ModelSource, dtype=mx.bfloat16, quantize: QuantSpec | None = None,
                 keep_text_encoders: bool = False, low_memory: bool = False, vae_tiling: bool = False):
        self.source = source
        self.dtype = dtype
        #: the quantization asked for on load (None: none, or a converted folder that loads as saved)
        self.quantize = quantize
        #: the setting a `flashdiff convert --quantize` folder was saved with (a different `quantize` is an error)
        self.saved_quantization = _saved_quantization(source, quantize)
        self.keep_text_encoders = keep_text_encoders
        self.low_memory = low_memory
        #: decode in overlapping tiles (VAE_TILE) to bound VAE memory at large sizes
        self.vae_tiling = vae_tiling
        self.defaults = {**self.DEFAULTS, **source.preset.get("defaults", {})}
        self.aspect_ratios = dict(source.preset.get("aspect_ratios") or self.ASPECT_RATIOS)

    @staticmethod
    def from_pretrained(model: str, *, dtype: str = "bfloat16", quantize: int | None = None, group_size: int | None = None,
                        mode: str = "affine", base: str | None = None, keep_text_encoders: bool = False,
                        low_memory: bool = False, vae_tiling: bool = False) -> "Pipeline":
        """Load a model by preset name ("flux-schnell", "flux-dev", "qwen-image", "demo"), Hugging Face repo id,
        local diffusers-layout folder, `flashdiff convert` output or single-file checkpoint.

        quantize: bits (3, 4, 5, 6, 8; 4 or 8 for the fp modes) to quantize on load; a converted
        folder that is already quantized loads as saved (asking it for a different setting is an error:
        re-quantizing quantized weights is lossy; `pipe.quantization` tells the setting in use).
        keep_text_encoders: keep the text encoders in memory between calls (faster repeated prompts, more
        memory). low_memory: also release the transformer between calls, so peak memory is the largest
        single component. vae_tiling: decode the image in overlapping 512-pixel tiles (bounded VAE memory
        at large sizes; seams are blended, results differ slightly from an untiled decode).
        """
        dtype = parse_dtype(dtype)
        spec = QuantSpec.make(quantize, group_size, mode) if (quantize is not None or mode not in (None, "affine")) else None
        source = resolve(model, base)
        cls = family_module(source.family).PIPELINE
        return cls(source, dtype, spec, keep_text_encoders=keep_text_encoders, low_memory=low_memory,
                   vae_tiling=vae_tiling)

    # ---- argument handling shared by all families ----
    def size_for_aspect(self, aspect: str) -> tuple[int, int]:
        """(height, width) for a named aspect ratio of this model ("16:9"), floored to SIZE_MULTIPLE
        as diffusers does (Qwen-Image's 4:3 entry 1472x1140 renders at 1472x1136)."""
        table = self.aspect_ratios
        if not table:
            raise FlashdiffError(f"this model ({self.family}) has no aspect-ratio table; pass height and width instead")
        if aspect not in table:
            raise FlashdiffError(f"unknown aspect ratio {aspect!r}; this model knows {', '.join(table)}")
        w, h = table[aspect]
        m = self.SIZE_MULTIPLE
        return h // m * m, w // m * m

    @property
    def quantization(self) -> QuantSpec | None:
        """The quantization the pipeline runs with: asked for on load, or as a converted folder was saved."""
        return self.quantize or self.saved_quantization

    def _params(self, prompt, negative_prompt, steps, guidance, true_cfg, height, width, seed, num_images, latents,
                max_sequence_length, aspect=None, **extra) -> GenerationParams:
        d = self.defaults
        if aspect is not None:
            if height is not None or width is not None:
                raise FlashdiffError("pass either an aspect ratio or height/width, not both")
            height, width = self.size_for_aspect(aspect)
        if negative_prompt is None:
            negative_prompt = d.get("negative_prompt")
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt or not all(isinstance(p, str) for p in prompt):
            raise FlashdiffError("prompt must be a string or a list of strings")
        if len(prompt) != 1:
            raise FlashdiffError("pass one prompt per call (use num_images for several images of it)")
        if num_images is None or int(num_images) < 1:
            raise FlashdiffError(f"num_images must be at least 1, got {num_images}")
        num_images = int(num_images)
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt]
        if negative_prompt is not None and (len(negative_prompt) != 1 or not isinstance(negative_prompt[0], str)):
            raise FlashdiffError("negative_prompt must be one string (it applies to every image of the call)")
        steps = d["steps"] if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise FlashdiffError(f"steps must be a positive integer, got {steps!r}")
        if steps > 1000:
            raise FlashdiffError(f"steps must be at most 1000, got {steps}")
        height = d["height"] if height is None else height
        width = d["width"] if width is None else width
        m = self.SIZE_MULTIPLE
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 or v % m:
                raise FlashdiffError(f"{name} must be a positive multiple of {m}, got {v!r} (try {max(m, round(v / m) * m) if isinstance(v, (int, float)) else 1024})")
            if v > 4096:
                raise FlashdiffError(f"{name} {v} is larger than the supported maximum of 4096")
        guidance = float(d["guidance"] if guidance is None else guidance)
        true_cfg = float(d.get("true_cfg", 1.0) if true_cfg is None else true_cfg)
        if guidance < 0 or true_cfg < 0:
            raise FlashdiffError("guidance and true_cfg must be >= 0")
        msl = d["max_sequence_length"] if max_sequence_length is None else max_sequence_length
        if not isinstance(msl, (int, np.integer)) or not 1 <= msl <= self.MAX_SEQUENCE_LENGTH:
            raise FlashdiffError(f"max_sequence_length must be between 1 and {self.MAX_SEQUENCE_LENGTH}, got {msl!r}")
        if seed is None:
            seed = random.randrange(2**31)
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]
        for s in seeds:  # mx.random.key takes an unsigned 64-bit integer
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < 2**64:
                raise FlashdiffError(f"seeds must be integers from 0 to 2**64 - 1, got {s!r}")
        seeds = [int(s) for s in seeds]
        if not isinstance(seed, (list, tuple)):
            seeds = [seeds[0] + i for i in range(num_images)]
            if seeds[-1] >= 2**64:
                raise FlashdiffError(f"seed {seeds[0]} + {num_images - 1} images passes 2**64 - 1; use a smaller seed")
        if len(seeds) != num_images:
            raise FlashdiffError(f"got {len(seeds)} seeds for {num_images} images")
        if latents is not None:
            latents = np.asarray(latents, dtype=np.float32)
            f = self.vae_scale_factor
            want = (num_images, self.latent_channels, height // f, width // f)
            if latents.shape != want:
                raise FlashdiffError(
                    f"latents must have shape {want} (num_images, channels, height/{f}, width/{f}), got {latents.shape}")
        return GenerationParams(prompt * num_images, None if negative_prompt is None else negative_prompt * num_images,
                                int(steps), guidance, true_cfg, int(height), int(width), seeds, int(msl), latents, extra)

    def initial_noise(self, p: GenerationParams) -> mx.array:
        """(N, C, H/f, W/f) float32 (f = vae_scale_factor): the given latents, or one normal draw per image
        from its own seed, so image i of a batch is reproducible alone with seed i."""
        if p.latents is not None:
            return mx.array(p.latents)
        f = self.vae_scale_factor
        shape = (self.latent_channels, p.height // f, p.width // f)
        return mx.stack([mx.random.normal(shape, key=mx.random.key(s)) for s in p.seeds])

    def generate(self, prompt, *, negative_prompt=None, steps=None, guidance=None, true_cfg=None, height=None, width=None,
                 seed=None, num_images=1, latents=None, max_sequence_length=None, aspect=None, progress=True,
                 callback=None, **extra) -> list[Image.Image]:
        """Generate images; returns PIL images carrying their generation parameters in `.info`.

        Unset arguments take the model's defaults. aspect: a named size of the model ("16:9", see
        `aspect_ratios`) instead of height/width. latents: (num_images, latent_channels, height/f, width/f)
        float32 initial noise (f = vae_scale_factor, 8 for the released models) instead of seeded noise.
        """
        p = self._params(prompt, negative_prompt, steps, guidance, true_cfg, height, width, seed, num_images, latents,
                         max_sequence_length, aspect=aspect, **extra)
        start = time.perf_counter()
        pixels = self._generate(p, progress=progress, callback=callback)  # (N, H, W, 3) in [-1, 1]
        images = to_pil(pixels)
        elapsed = time.perf_counter() - start
        for i, img in enumerate(images):
            img.info["flashdiff"] = self.metadata(p, i, elapsed)
        return images

    def metadata(self, p: GenerationParams, i: int, elapsed: float) -> dict:
        from .. import __version__

        meta = {
            "model": self.source.preset.get("name") or str(self.source.path),
            "family": self.family, "prompt": p.prompt[i], "seed": p.seeds[i] if p.latents is None else None,
            "steps": p.steps, "guidance": p.guidance, "height": p.height, "width": p.width,
            "max_sequence_length": p.max_sequence_length, "dtype": str(self.dtype).split(".")[-1],
            "quantize": self.quantization.to_dict() if self.quantization else None,
            "seconds": round(elapsed, 2), "flashdiff": __version__,
        }
        if self.vae_tiling:
            meta["vae_tiling"] = True
        if p.negative_prompt is not None:
            meta["negative_prompt"] = p.negative_prompt[i]
            meta["true_cfg"] = p.true_cfg
        if self.source.transformer_file:
            meta["transformer_file"] = str(self.source.transformer_file)
        return meta

    def _generate(self, p: GenerationParams, progress=True, callback=None) -> mx.array:
        raise NotImplementedError

    def denoise(self, latents: mx.array, predict, progress=True, callback=None) -> mx.array:
        """The sampling loop every family shares: for each scheduler step, `predict(latents, t)` gives the
        velocity (t in the scheduler's 0..1000 scale), the scheduler steps in float32, the result is
        evaluated (one step's graph at a time) and `callback(i, steps, latents)` sees it. With
        low_memory the transformer is released afterwards."""
        timesteps = self.scheduler.timesteps
        for i in tqdm(range(len(timesteps)), desc="denoising", unit="step", disable=not progress, leave=False):
            v = predict(latents, float(timesteps[i]))
            latents = self.scheduler.step(v, i, latents)
            mx.eval(latents)
            if callback is not None:
                callback(i, len(timesteps), latents)
        if self.low_memory:
            self._transformer = None
            mx.clear_cache()
        return latents

    def save_pretrained(self, folder, progress=True):
        """Write every component (quantized if this pipeline quantizes) as a self-contained folder."""
        raise NotImplementedError


def _saved_quantization(source: ModelSource, requested: QuantSpec | None) -> QuantSpec | None:
    """The setting a folder written by `flashdiff convert --quantize` records in model_index.json (None if
    none). Such a folder always loads exactly as saved; asking for a different setting is an error, since
    re-quantizing already-quantized weights would stack a second rounding error on the first (convert the
    original model instead). Checked here, before anything loads."""
    if source.transformer_file is not None:  # a single-file transformer: the folder only supplies the rest
        return None
    index = Path(source.path) / "model_index.json"
    try:
        saved = json.loads(index.read_text()).get("_flashdiff", {}).get("quantization")
    except (OSError, ValueError, AttributeError):
        saved = None
    if not saved:
        return None
    saved = QuantSpec.make(**saved)
    if requested is not None and requested != saved:
        raise FlashdiffError(
            f"{source.path} is already quantized ({_describe(saved)}) and loads as saved, so it cannot run as "
            f"{_describe(requested)}: re-quantizing quantized weights would add a second rounding error. Drop "
            f"--quantize (or pass the same setting), or convert the original model with the new setting.")
    return saved


def _describe(spec: QuantSpec) -> str:
    return f"{spec.bits}-bit {spec.mode}, group size {spec.group_size}"


def to_pil(pixels: mx.array) -> list[Image.Image]:
    """(N, H, W, 3) in [-1, 1] -> uint8 PIL images, rounding like diffusers' image processor."""
    x = np.array(mx.clip(pixels.astype(mx.float32) / 2 + 0.5, 0.0, 1.0))
    return [Image.fromarray((img * 255).round().astype(np.uint8)) for img in x]
