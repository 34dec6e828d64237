"""Per-step transformer latency and peak memory: flashdiff (MLX) vs diffusers (PyTorch), one process.

    python benchmarks/models.py --models flux-dev,flux-schnell,qwen-image --quant bf16,8,4 \
        --diffusers eager,compile --e2e --warmup 2 --iters 5 --out benchmarks/results/models-<date>.json

Every model is built at its published size with random weights (speed does not depend on the
values), directly in bf16 on the device. Each measurement runs in its own try/except: a failure or
OOM is recorded and the run moves on. The JSON is rewritten after every measurement and the table
in benchmarks/README.md regenerated (between its marker comments), so a run that is killed still
leaves its partial results. `--tiny` runs small configs on the CPU (what the test does).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import mlx.core as mx  # noqa: E402

from common import (GIB, elapsed, environment, free_all, gemm_probe, init_random_mlx, init_random_torch, log,  # noqa: E402
                    measure, mlx_peak_gib, mlx_reset_memory, mlx_sync, mlx_weight_bytes, sdpa_layout_probe, time_calls,
                    torch_device, torch_peak_gib, torch_reset_memory, torch_sync_fn, update_readme, write_json)

from flashdiff.engine.components import configure_execution  # noqa: E402
from flashdiff.kernels import _gemm_cuda  # noqa: E402
from flashdiff.kernels.qgemm import pack_quantized_linears  # noqa: E402
from flashdiff.engine.quantization import QuantSpec, quantize_model  # noqa: E402
from flashdiff.models.flux import pipeline as flux_pipeline  # noqa: E402
from flashdiff.models.flux.transformer import FluxTransformer, FluxTransformerConfig  # noqa: E402
from flashdiff.models.qwen_image.transformer import QwenImageTransformer, QwenImageTransformerConfig  # noqa: E402

_FLUX = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
_FLUX_TINY = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
                  num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(8, 12, 12))
_QWEN = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))
_QWEN_TINY = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
                  num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(8, 12, 12))

#: name -> family, transformer config (diffusers config.json keys), tiny config, text tokens (full, tiny)
MODELS = {
    "flux-dev": dict(family="flux", config={**_FLUX, "guidance_embeds": True},
                     tiny={**_FLUX_TINY, "guidance_embeds": True}, text_tokens=(512, 8)),
    "flux-schnell": dict(family="flux", config={**_FLUX, "guidance_embeds": False},
                         tiny={**_FLUX_TINY, "guidance_embeds": False}, text_tokens=(512, 8)),
    "qwen-image": dict(family="qwen", config=_QWEN, tiny=_QWEN_TINY, text_tokens=(128, 8)),
}
RESOLUTION = (1024, 64)  # pixels (full, tiny); 1024² -> 4096 image tokens, 64² -> 16

#: flashdiff bf16 settings measured side by side (run-time switches of the transformers):
#: fused = one q/k/v(/MLP-in) GEMM per stream (constructor option, weight layout);
#: head_major_rope = RoPE after the transpose to (B, H, L, Dh) instead of before (model attribute).
SETTINGS = {
    "unfused": dict(fused=False, head_major_rope=False),
    "fused": dict(fused=True, head_major_rope=False),
    "fused-hm": dict(fused=True, head_major_rope=True),
}


def quantization_skip(family: str) -> tuple[str, ...]:
    """The family pipeline's QUANTIZATION_SKIP; Qwen-Image has no pipeline module yet -> the FLUX rule
    applied to Qwen's names (embedders, timestep MLP, output head stay in bf16)."""
    if family == "flux":
        return flux_pipeline.QUANTIZATION_SKIP
    try:
        from flashdiff.models.qwen_image import pipeline as qwen_pipeline

        return qwen_pipeline.QUANTIZATION_SKIP
    except (ImportError, AttributeError):
        return ("img_in", "txt_in", "time_text_embed", "norm_out", "proj_out")


# ---------------------------------------------------------------------------------------------
# flashdiff (MLX)


def flashdiff_model(family: str, cfg: dict, dtype, quant: str, setting: str | None = None):
    """Random-weight model in `dtype`, quantized per `quant` ("bf16", "8", "4": affine, group 64), with the
    switches of SETTINGS[setting] (None: the transformers' defaults)."""
    t0 = time.perf_counter()
    sw = SETTINGS[setting] if setting else {}
    if family == "flux":
        model = FluxTransformer(FluxTransformerConfig.from_dict(cfg), fused=sw.get("fused"))
    else:
        model = QwenImageTransformer(QwenImageTransformerConfig.from_dict(cfg), fused=sw.get("fused"))
    model.head_major_rope = sw.get("head_major_rope", model.head_major_rope)
    init_random_mlx(model, dtype)
    info = {"build_s": time.perf_counter() - t0, "setting": setting,
            "switches": {"fused": model.fused, "head_major_rope": model.head_major_rope}}
    if quant != "bf16":
        t0 = time.perf_counter()
        spec = QuantSpec.make(int(quant), 64, "affine")
        info["quantized_layers"] = quantize_model(model, spec, quantization_skip(family))
        info["quantization"] = spec.to_dict()
        info["quantize_s"] = time.perf_counter() - t0
    model.eval()
    info["weights_gib"] = mlx_weight_bytes(model) / GIB
    return model, info


def flashdiff_forward(family: str, model, cfg: dict, res: int, n_txt: int, dtype, compiled: bool):
    """A zero-argument callable running one transformer forward on fixed random inputs, as the
    flashdiff pipeline calls it (RoPE tables computed once per generation, passed in)."""
    h = w = res // 16
    key = mx.random.key(1)
    k1, k2, k3 = mx.random.split(key, 3)
    x = mx.random.normal((1, h * w, cfg["in_channels"]), key=k1).astype(dtype)
    c = mx.random.normal((1, n_txt, cfg["joint_attention_dim"]), key=k2).astype(dtype)
    t = mx.array([0.5], mx.float32)
    if family == "flux":
        pooled = mx.random.normal((1, cfg["pooled_projection_dim"]), key=k3).astype(dtype)
        img_ids = flux_pipeline.image_ids(res, res)
        txt_ids = mx.zeros((n_txt, 3))
        g = mx.array([3.5], mx.float32) if cfg.get("guidance_embeds") else None
        cos, sin = model.rotary_embedding(txt_ids, img_ids)
        mx.eval(x, c, pooled, cos, sin, img_ids, txt_ids)

        def fwd(x, c, pooled, t, cos, sin):
            return model(x, c, pooled, t, img_ids, txt_ids, guidance=g, rope=(cos, sin))

        args = (x, c, pooled, t, cos, sin)
    else:
        cos, sin = model.rope([[(1, h, w)]], n_txt)
        mx.eval(x, c, cos, sin)

        def fwd(x, c, t, cos, sin):
            return model(x, c, None, t, None, rope=(cos, sin))

        args = (x, c, t, cos, sin)
    fn = mx.compile(fwd) if compiled else fwd
    return lambda: fn(*args)


_MODULATION = re.compile(r"(.*\.)?(norm1|norm1_context|norm|norm_out)\.linear|.*\.(img_mod|txt_mod)\.1")


def modulation_forward(model, dtype):
    """Only the modulation Linears of every block (+ the output norm) on SiLU(temb): the work that
    depends on the timestep alone, to measure its share of a forward (hoisting/batching candidates)."""
    mods = [m for p, m in model.named_modules() if _MODULATION.fullmatch(p)]
    cond = mx.random.normal((1, mods[0].weight.shape[1]), key=mx.random.key(5)).astype(dtype)
    mx.eval(cond)
    return (lambda: [m(cond) for m in mods]), len(mods)


def run_flashdiff(results, name, spec, args, dtype):
    """bf16 in every --settings entry (eager / compiled side by side), then the quantized precisions
    with the fastest bf16 setting (or --quant-setting)."""
    family, res, n_txt = spec["family"], _res(args), _txt(spec, args)
    cfg = spec["tiny"] if args.tiny else spec["config"]
    if "bf16" in args.quant:
        for i, setting in enumerate(args.settings):
            _run_precision(results, name, family, cfg, res, n_txt, args, dtype, "bf16", setting,
                           modulation=(i == 0))
    setting = args.quant_setting
    if setting == "auto":
        setting = _best_setting(results, args.settings) or STATE.setdefault("best", {}).get(family) or "fused"
    STATE.setdefault("best", {}).setdefault(family, setting)
    log(f"  {name}: quantized variants use the bf16 setting {setting!r}")
    for quant in [q for q in args.quant if q != "bf16"]:
        _run_precision(results, name, family, cfg, res, n_txt, args, dtype, quant, setting)


def _best_setting(results, settings):
    """The bf16 setting with the lowest median (compiled if measured, else eager)."""
    timed = []
    for st in settings:
        for mode, rank in (("-compiled", 0), ("", 1)):
            run = results.get(f"flashdiff-bf16-{st}{mode}", {})
            if run.get("ok"):
                timed.append((rank, run["median_s"], st))
    return min(timed)[2] if timed else None


def _run_precision(results, name, family, cfg, res, n_txt, args, dtype, quant, setting, modulation=False):
    label = f"flashdiff-bf16-{setting}" if quant == "bf16" else f"flashdiff-{quant}bit"
    suffix = {"eager": "", "compile": "-compiled", "blocks": "-blocks", "blocks-packed": "-blocks-packed"}
    keys = [label + suffix[m] for m in args.flashdiff if m != "blocks-packed"]
    if quant != "bf16" and "eager" in args.flashdiff:
        keys.append(label + "-stream")  # eager with BlockStream
    if quant != "bf16" and "blocks-packed" in args.flashdiff:
        keys.append(label + "-blocks-packed")  # last: packing replaces the model's layers
    if modulation and args.probes:
        keys.append("flashdiff-bf16-modulation")
    todo = [k for k in keys if _wanted(args, name, k)]
    for k in [k for k in keys if k not in todo]:
        _skip(results, k, _why_skipped(args))
    if not todo:
        return
    built = {}

    def build():
        if "model" not in built:
            log(f"  building {name} {label} [{setting}] ({'tiny' if args.tiny else 'full size'})")
            built["model"], built["info"] = flashdiff_model(family, cfg, dtype, quant, setting)
        return built["model"], built["info"]

    for key in todo:

        def one(key=key):
            model, info = build()
            mlx_reset_memory()
            if key.endswith("-modulation"):
                fn, n = modulation_forward(model, dtype)
                stats = time_calls(fn, mlx_sync, args.warmup, args.iters)
                return {**stats, **info, "modulation_layers": n, "peak_memory_gib": mlx_peak_gib(), "mx_compile": False}
            compiled = key.endswith("-compiled")
            packed = key.endswith("-blocks-packed")  # the same with the layers packed (FLASHDIFF_QLINEAR_PACKED=1)
            if packed and not (_gemm_cuda.is_sm90() and pack_quantized_linears(model, force=True)):
                raise RuntimeError("no layer packable here (packed layers need an sm_90 GPU)")
            blocks = packed or key.endswith("-blocks")  # compiled per block type + BlockStream: the pipelines' GPU mode
            model.stream_blocks = blocks or key.endswith("-stream")
            model.compile_blocks = blocks
            try:
                fn = flashdiff_forward(family, model, cfg, res, n_txt, dtype, compiled)
                stats = time_calls(fn, mlx_sync, args.warmup, args.iters)
            finally:
                model.stream_blocks = model.compile_blocks = False
            return {**stats, **info, "peak_memory_gib": mlx_peak_gib(), "mx_compile": compiled,
                    "stream_blocks": blocks or key.endswith("-stream"), "compile_blocks": blocks,
                    "packed_layers": packed}

        measure(results, key, one)
        save(args)
    built.clear()
    free_all()


# ---------------------------------------------------------------------------------------------
# diffusers (PyTorch)


def diffusers_model(family: str, cfg: dict, device: str, torch_dtype):
    """diffusers transformer built directly in `torch_dtype` on `device` (never fp32 full size)."""
    import torch
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

    cls = FluxTransformer2DModel if family == "flux" else QwenImageTransformer2DModel
    t0 = time.perf_counter()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            model = cls(**cfg)
    finally:
        torch.set_default_dtype(prev)
    model.eval().requires_grad_(False)
    nbytes = init_random_torch(model)
    return model, {"build_s": time.perf_counter() - t0, "weights_gib": nbytes / GIB}


def diffusers_inputs(family: str, cfg: dict, res: int, n_txt: int, device: str, torch_dtype) -> dict:
    """Keyword arguments exactly as diffusers' FluxPipeline / QwenImagePipeline pass them."""
    import torch

    gen = torch.Generator(device=device).manual_seed(1)
    h = w = res // 16
    kw = dict(device=device, dtype=torch_dtype, generator=gen)
    inputs = {
        "hidden_states": torch.randn(1, h * w, cfg["in_channels"], **kw),
        "encoder_hidden_states": torch.randn(1, n_txt, cfg["joint_attention_dim"], **kw),
        "timestep": torch.full((1,), 0.5, device=device, dtype=torch_dtype),
        "return_dict": False,
    }
    if family == "flux":
        ids = torch.zeros(h, w, 3, device=device)
        ids[..., 1] = torch.arange(h, device=device)[:, None]
        ids[..., 2] = torch.arange(w, device=device)[None, :]
        inputs.update(
            pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], **kw),
            img_ids=ids.reshape(h * w, 3).to(torch_dtype),
            txt_ids=torch.zeros(n_txt, 3, device=device, dtype=torch_dtype),
            guidance=torch.full((1,), 3.5, device=device, dtype=torch.float32) if cfg.get("guidance_embeds") else None,
        )
    else:
        # The pipeline passes mask=None when every text token is valid (a single prompt).
        inputs.update(encoder_hidden_states_mask=None, img_shapes=[[(1, h, w)]])
    return inputs


def run_diffusers(results, name, spec, args, torch_dtype):
    family, res, n_txt = spec["family"], _res(args), _txt(spec, args)
    cfg = spec["tiny"] if args.tiny else spec["config"]
    keys = [f"diffusers-{m}" for m in ("eager", "compile") if m in args.diffusers]  # eager first
    todo = [k for k in keys if _wanted(args, name, k)]
    for k in [k for k in keys if k not in todo]:
        _skip(results, k, _why_skipped(args, k))
    if not todo:
        return
    import torch

    device = torch_device()
    built = {}
    for key in todo:

        def one(key=key):
            if "model" not in built:
                log(f"  building diffusers {name} ({'tiny' if args.tiny else 'full size'}) on {device}")
                built["model"], built["info"] = diffusers_model(family, cfg, device, torch_dtype)
            model, info = built["model"], built["info"]
            torch_reset_memory(device)
            inputs = diffusers_inputs(family, cfg, res, n_txt, device, torch_dtype)
            extra, call = {}, model
            if key == "diffusers-compile":
                import torch._dynamo as dynamo

                dynamo.reset()
                kw = dict(backend=args.compile_backend, mode=args.compile_mode)
                if args.compile_scope == "regional":  # in place, per repeated block: run after eager
                    model.compile_repeated_blocks(**kw)
                else:
                    call = torch.compile(model, **kw)
                extra = {**kw, "compile_scope": args.compile_scope}
            with torch.inference_mode():
                stats = time_calls(lambda c=call, i=inputs: c(**i)[0], torch_sync_fn(device), args.warmup, args.iters)
            del call, inputs
            return {**stats, **info, **extra, "peak_memory_gib": torch_peak_gib(device), "torch_device": device}

        measure(results, key, one)
        save(args)
    built.clear()
    if "torch._dynamo" in sys.modules:
        sys.modules["torch._dynamo"].reset()
    free_all()


# ---------------------------------------------------------------------------------------------
# End to end: FLUX-schnell, 4 steps, 1024², full-size random CLIP-L, T5-XXL and VAE

_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
_CLIP_TINY = {**_CLIP_L, "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "projection_dim": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2}
_T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               feed_forward_proj="gated-gelu")
_T5_TINY = {**_T5_XXL, "vocab_size": 1000, "d_model": 64, "d_kv": 32, "d_ff": 128, "num_layers": 2, "num_heads": 2}
_VAE = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16, norm_num_groups=32,
            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
_VAE_TINY = {**_VAE, "block_out_channels": [16, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8}
E2E_METHOD = ("stages timed by calling the components directly (the FluxPipeline API cannot take injected "
              "random-weight models yet): CLIP pooled + T5 encode, the pipeline's packing / ids / FlowMatchEuler "
              "schedule and 4 transformer steps, unpack + VAE decode. Each component is built, run once untimed "
              "(kernel JIT), run timed, then released before the next one is built (the pipeline's low_memory order). "
              "Tokenization and PIL conversion are not included.")


def run_e2e(args, quant: str, dtype) -> dict:
    from flashdiff.engine.schedulers import FlowMatchEulerConfig, FlowMatchEulerScheduler
    from flashdiff.models.clip import CLIPTextConfig, CLIPTextModel
    from flashdiff.models.t5 import T5Config, T5Encoder
    from flashdiff.models.vae.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig

    tiny, res = args.tiny, _res(args)
    defaults = json.loads((ROOT / "flashdiff" / "configs" / "flux-schnell.json").read_text()).get("defaults", {})
    steps = int(defaults.get("steps", 4))
    n_txt = 8 if tiny else int(defaults.get("max_sequence_length", 256))
    spec = QuantSpec.make(int(quant), 64, "affine") if quant != "bf16" else None
    out = {"method": E2E_METHOD, "steps": steps, "resolution": res, "text_tokens": n_txt,
           "quantization": spec.to_dict() if spec else None, "stages_s": {}, "first_call_s": {}, "peak_gib": {},
           "build_peak_gib": {}, "weights_gib": {}}

    def stage(name, build, run):
        """Build (random weights), run once untimed, run timed; release. Returns the timed output."""
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        parts = build()
        out.setdefault("build_s", {})[name] = time.perf_counter() - t0
        out["weights_gib"][name] = sum(mlx_weight_bytes(m) for m in parts) / GIB
        out["build_peak_gib"][name] = mlx_peak_gib()
        mx.clear_cache()
        mx.reset_peak_memory()
        for label in ("first_call_s", "stages_s"):
            t0 = time.perf_counter()
            result = run(*parts)
            mlx_sync(result)
            out[label][name] = time.perf_counter() - t0
        out["peak_gib"][name] = mlx_peak_gib()
        del parts
        free_all()
        return result

    def text_encoders():
        clip = CLIPTextModel(CLIPTextConfig.from_dict(_CLIP_TINY if tiny else _CLIP_L))
        t5 = T5Encoder(T5Config.from_dict(_T5_TINY if tiny else _T5_XXL))
        init_random_mlx(clip, dtype)
        init_random_mlx(t5, dtype)
        if spec:  # the FLUX pipeline quantizes T5 (not CLIP) with the transformer's setting
            quantize_model(t5, spec)
        return clip, t5

    key = mx.random.key(2)
    k1, k2, k3 = mx.random.split(key, 3)
    clip_ids = mx.random.randint(0, 1000, (1, 77), key=k1)
    t5_ids = mx.random.randint(0, 1000, (1, n_txt), key=k2)
    pooled, embeds = stage("text_encoders", text_encoders, lambda clip, t5: (clip(clip_ids).pooler_output, t5(t5_ids)))

    cfg = MODELS["flux-schnell"]["tiny" if tiny else "config"]
    noise = mx.random.normal((1, 16, res // 8, res // 8), key=k3)
    img_ids, txt_ids = flux_pipeline.image_ids(res, res), mx.zeros((n_txt, 3))
    sched = FlowMatchEulerScheduler(FlowMatchEulerConfig(shift=1.0, use_dynamic_shifting=False))

    def denoise(model):
        configure_execution(model)  # as the pipeline sets it
        out["stream_blocks"], out["compile_blocks"] = model.stream_blocks, model.compile_blocks
        latents = flux_pipeline.pack_latents(noise)
        sched.set_timesteps(steps, image_seq_len=latents.shape[1])
        rope = model.rotary_embedding(txt_ids, img_ids)
        dt = model.dtype
        c, p = embeds.astype(dt), pooled.astype(dt)
        for i, t in enumerate(sched.timesteps):
            tt = mx.full((1,), float(t) / 1000.0, mx.float32)
            v = model(latents.astype(dt), c, p, tt, img_ids, txt_ids, guidance=None, rope=rope)
            latents = sched.step(v, i, latents)
            mx.eval(latents)
        return latents

    setting = STATE.get("best", {}).get("flux") if args.quant_setting == "auto" else args.quant_setting
    out["setting"] = setting
    latents = stage("transformer", lambda: (flashdiff_model("flux", cfg, dtype, quant, setting)[0],), denoise)

    def vae():
        model = AutoencoderKL(AutoencoderKLConfig.from_dict(_VAE_TINY if tiny else _VAE))
        init_random_mlx(model, dtype)
        configure_execution(model)  # streamed decode on GPUs, as the pipeline sets it
        out["vae_stream"] = model.stream
        return (model,)

    def decode(model):
        z = flux_pipeline.unpack_latents_nhwc(latents, res, res)
        z = z / model.config.scaling_factor + model.config.shift_factor
        return model.decode(z)

    image = stage("vae", vae, decode)
    out["image_shape"] = list(image.shape)
    out["total_s"] = sum(out["stages_s"].values())
    out["first_call_total_s"] = sum(out["first_call_s"].values())
    out["peak_memory_gib"] = max(out["peak_gib"].values())
    out["largest_component_gib"] = max(out["weights_gib"].values())
    return out


# ---------------------------------------------------------------------------------------------


STATE = {}


def save(args):
    """Rewrite the JSON and the README table with everything measured so far."""
    data = STATE["data"]
    write_json(args.out, data)
    if args.readme:
        update_readme(args.readme, data, json_path=_display_path(args.out))


def _display_path(path) -> str:
    path = Path(path).resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.as_posix()


def _res(args) -> int:
    if args.resolution:
        return args.resolution
    return RESOLUTION[1] if args.tiny else RESOLUTION[0]


def _txt(spec, args) -> int:
    return spec["text_tokens"][1 if args.tiny else 0]


def _over_budget(args, key: str = "") -> bool:
    reserve = args.compile_reserve_s if key == "diffusers-compile" else 0
    return bool(args.budget_s) and elapsed() > args.budget_s - reserve


def _wanted(args, model: str, key: str) -> bool:
    return not (any(fnmatch.fnmatch(f"{model}/{key}", p) for p in args.skip) or _over_budget(args, key))


def _skip(results: dict, key: str, reason: str):
    """Record a skipped measurement, unless a successful one from an earlier run (--merge) is there."""
    if results.get(key, {}).get("ok"):
        log(f"  {key}: skipped ({reason}); keeping the earlier result")
    else:
        measure(results, key, None, skip=True, reason=reason)


def _why_skipped(args, key: str = "") -> str:
    if _over_budget(args, key):
        return f"--budget-s {args.budget_s:.0f} would be exceeded (started at {elapsed():.0f}s)"
    return "excluded by --skip"


def _csv(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip() and p.strip().lower() != "none"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="flux-dev,flux-schnell,qwen-image", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--tiny", action="store_true", help="tiny configs at 64x64 (CPU test); default: published sizes at 1024x1024")
    p.add_argument("--quant", default="bf16,8,4", help="flashdiff weight precisions: bf16, 8, 4 (affine, group 64)")
    p.add_argument("--flashdiff", default="eager,compile,blocks",
                   help="flashdiff modes: eager, compile (mx.compile of the forward), blocks (per-block compile + "
                        "streaming, the pipelines' GPU mode), blocks-packed (the same with 8/4-bit layers packed for "
                        "the mixed-input GEMM, FLASHDIFF_QLINEAR_PACKED=1; sm_90, measured last)")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help=f"flashdiff bf16 switch settings measured side by side: {', '.join(SETTINGS)}")
    p.add_argument("--quant-setting", default="auto",
                   help="setting for the 8/4-bit variants and the end-to-end run: auto (fastest bf16 one) or a name")
    p.add_argument("--no-probes", dest="probes", action="store_false",
                   help="skip the micro-probes (GEMM layouts, SDPA layouts, modulation share)")
    p.add_argument("--diffusers", default="eager,compile", help="diffusers modes: eager, compile (torch.compile); 'none' skips")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (the CPU test uses 'eager')")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--compile-scope", default="full", choices=["full", "regional"],
                   help="torch.compile the whole model, or only its repeated blocks (diffusers' compile_repeated_blocks)")
    p.add_argument("--compile-reserve-s", type=float, default=150,
                   help="with --budget-s: do not start a torch.compile measurement with less than this left")
    p.add_argument("--e2e", action="store_true", help="also time one FLUX-schnell 4-step image end to end")
    p.add_argument("--e2e-quant", default="bf16,4", help="precisions for the end-to-end run (T5 and transformer)")
    p.add_argument("--resolution", type=int, default=0,
                   help="image side in pixels, a multiple of 16 (default 1024, --tiny 64); e.g. 512 for the "
                        "1024-image-token case")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--skip", default="", help="comma list of MODEL/VARIANT glob patterns to leave out, "
                   "e.g. 'flux-schnell/diffusers-compile,e2e/bf16'")
    p.add_argument("--budget-s", type=float, default=0, help="skip measurements that would start after this many seconds")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/models-<date>[-tiny].json)")
    p.add_argument("--merge", action="store_true", help="keep the measurements already in --out, replacing only those rerun")
    p.add_argument("--readme", default=str(ROOT / "benchmarks" / "README.md"), help="README whose table is regenerated")
    p.add_argument("--no-readme", dest="readme", action="store_const", const=None)
    p.add_argument("--render", metavar="JSON", default=None,
                   help="measure nothing: regenerate the --readme table from this results file (e.g. one from the GPU)")
    args = p.parse_args(argv)
    args.models = _csv(args.models)
    bad = [m for m in args.models if m not in MODELS]
    if bad or not args.models:
        p.error(f"unknown model(s) {bad or args.models}; choose from {', '.join(MODELS)}")
    args.quant = [q.lower().replace("bit", "") for q in _csv(args.quant)]
    args.e2e_quant = [q.lower().replace("bit", "") for q in _csv(args.e2e_quant)]
    for q in args.quant + args.e2e_quant:
        if q not in ("bf16", "8", "4"):
            p.error(f"--quant/--e2e-quant take bf16, 8 or 4, got {q!r}")
    args.flashdiff, args.diffusers = _csv(args.flashdiff), _csv(args.diffusers)
    for name, modes, allowed in (("--flashdiff", args.flashdiff, ("eager", "compile", "blocks", "blocks-packed")),
                                 ("--diffusers", args.diffusers, ("eager", "compile"))):
        if any(m not in allowed for m in modes):
            p.error(f"{name} takes {', '.join(allowed)} (or none), got {modes}")
    args.skip = _csv(args.skip)
    args.settings = _csv(args.settings)
    for st in args.settings + ([] if args.quant_setting == "auto" else [args.quant_setting]):
        if st not in SETTINGS:
            p.error(f"unknown setting {st!r}; choose from {', '.join(SETTINGS)}")
    if args.resolution and (args.resolution < 16 or args.resolution % 16):
        p.error(f"--resolution must be a positive multiple of 16 (pixels per side), got {args.resolution}")
    if args.warmup < 0 or args.iters < 1:
        p.error("--warmup must be >= 0 and --iters >= 1")
    suffix = "-tiny" if args.tiny else ""
    args.out = Path(args.out or ROOT / "benchmarks" / "results" / f"models-{date.today().isoformat()}{suffix}.json")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.render:
        data = json.loads(Path(args.render).read_text())
        update_readme(args.readme or ROOT / "benchmarks" / "README.md", data, json_path=_display_path(args.render))
        log(f"table regenerated from {args.render} in {args.readme}")
        return data
    dtype = getattr(mx, args.dtype)
    env = environment(["benchmarks/models.py", *argv])
    data = {"meta": {**env, "tiny": args.tiny, "warmup": args.warmup, "iters": args.iters,
                     "resolution": _res(args), "dtype": args.dtype, "commands": [env["command"]]},
            "models": {}, "e2e": {}, "probes": {}}
    if args.merge and args.out.exists():
        old = json.loads(args.out.read_text())
        data["meta"]["commands"] = old.get("meta", {}).get("commands", []) + [env["command"]]
        data["models"], data["e2e"] = old.get("models", {}), old.get("e2e", {})
        data["probes"] = old.get("probes", {})
    STATE["data"] = data
    log(f"flashdiff model benchmark on {env['device']} (mlx {env['mlx_version']}, torch {env.get('torch_version')}, "
        f"diffusers {env.get('diffusers_version')}) -> {args.out}")

    torch_dtype = None
    if args.diffusers:
        try:
            import torch

            torch_dtype = getattr(torch, args.dtype)
        except ImportError as e:
            log(f"PyTorch unavailable ({e}); diffusers measurements will record the error")

    if args.probes:  # seconds: GEMM and attention layouts at FLUX 1024² shapes
        m, k, tok = (24, 64, 24) if args.tiny else (4608, 3072, 4608)
        for key, fn in (("gemm", lambda: gemm_probe(m, k, dtype, args.iters)),
                        ("sdpa", lambda: sdpa_layout_probe(2 if args.tiny else 24, tok, 32 if args.tiny else 128, dtype, args.iters))):
            if _wanted(args, "probes", key):
                measure(data["probes"], key, fn)
        save(args)

    for name in args.models:
        spec = MODELS[name]
        entry = data["models"].setdefault(name, {})
        entry.update(family=spec["family"], config=spec["tiny"] if args.tiny else spec["config"],
                     resolution=_res(args), image_tokens=(_res(args) // 16) ** 2, text_tokens=_txt(spec, args),
                     quantization_skip=list(quantization_skip(spec["family"])))
        runs = entry.setdefault("runs", {})
        log(f"{name}: {entry['image_tokens']} image + {entry['text_tokens']} text tokens")
        run_flashdiff(runs, name, spec, args, dtype)
        if args.diffusers:
            run_diffusers(runs, name, spec, args, torch_dtype)
        save(args)

    if args.e2e:
        for quant in args.e2e_quant:
            key = "bf16" if quant == "bf16" else f"{quant}bit"
            if _wanted(args, "e2e", key):
                measure(data["e2e"], key, lambda quant=quant: run_e2e(args, quant, dtype))
            else:
                _skip(data["e2e"], key, _why_skipped(args))
            save(args)

    save(args)
    log(f"done in {elapsed():.0f}s; results in {args.out}" + (f", table in {args.readme}" if args.readme else ""))
    return data


if __name__ == "__main__":
    main()
