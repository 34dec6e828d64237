"""Black Forest Labs single-file FLUX.1 checkpoints (flux1-dev.safetensors, flux1-schnell.safetensors)
-> diffusers `FluxTransformer2DModel` key names, and the config inferred from the weights.

Mapping as diffusers' loaders/single_file_utils.py::convert_flux_transformer_checkpoint_to_diffusers,
except that sizes (hidden size, MLP width) are read from the tensors instead of assumed.
"""

import re

import mlx.core as mx

PREFIX = "model.diffusion_model."
_REQUIRED = ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight")


def _strip(weights: dict) -> dict:
    """Drop the optional ComfyUI/LDM prefix; if present, keys without it (VAE, text encoders) are dropped."""
    if any(k.startswith(PREFIX) for k in weights):
        return {k[len(PREFIX) :]: v for k, v in weights.items() if k.startswith(PREFIX)}
    return dict(weights)


def is_bfl_flux(weights: dict) -> bool:
    """True if the keys look like a BFL FLUX transformer (with or without the prefix)."""
    marks = ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight")
    return any(k in weights or PREFIX + k in weights for k in marks)


def _describe_non_flux(keys) -> str:
    keys = list(keys)
    ks = set(keys)
    sample = ", ".join(sorted(keys)[:6])
    if any(k.startswith(("encoder.conv_in", "decoder.conv_in", "first_stage_model.")) for k in ks):
        what = "a VAE (autoencoder) checkpoint such as ae.safetensors; load it with the VAE loader"
    elif any(k.startswith("transformer_blocks.") for k in ks) and "x_embedder.weight" in ks:
        what = "already a diffusers-format transformer; load it directly without bfl_to_diffusers"
    elif any(k.startswith(("text_model.", "encoder.block.", "shared.")) for k in ks):
        what = "a text encoder (CLIP/T5) checkpoint"
    else:
        what = "not a FLUX.1 transformer"
    return (
        "expected a BFL FLUX.1 transformer (keys img_in.*, double_blocks.N.*, single_blocks.N.*), "
        f"but this looks like {what}. First keys: {sample}"
    )


def _block_count(keys, name: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(rf"{name}\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def _check(w: dict):
    missing = [k for k in _REQUIRED if k not in w]
    if missing or _block_count(w, "double_blocks") + _block_count(w, "single_blocks") == 0:
        raise ValueError(_describe_non_flux(w.keys()))


def bfl_to_diffusers(weights: dict, strict: bool = True) -> dict:
    """Map BFL FLUX.1 transformer weights to diffusers names; values are split/re-ordered, not copied.

    strict: raise if keys are left unmapped (e.g. LoRA or fp8 scale tensors); strict=False drops them.
    """
    w = _strip(weights)
    _check(w)
    out = {}
    used = set()

    def take(src, dst):
        out[dst] = w[src]
        used.add(src)

    def take_linear(src, dst):
        for s in ("weight", "bias"):
            take(f"{src}.{s}", f"{dst}.{s}")

    def split_linear(src, dsts, sizes):
        for s in ("weight", "bias"):
            t, start = w[f"{src}.{s}"], 0
            for dst, n in zip(dsts, sizes):
                out[f"{dst}.{s}"] = t[start : start + n]
                start += n
            if start != t.shape[0]:
                raise ValueError(f"{src}.{s} has {t.shape[0]} rows, expected {start} ({sizes})")
            used.add(f"{src}.{s}")

    missing = []
    try:
        inner = w["img_in.weight"].shape[0]
        take_linear("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
        take_linear("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
        take_linear("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
        take_linear("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
        if "guidance_in.in_layer.weight" in w:
            take_linear("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
            take_linear("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
        take_linear("txt_in", "context_embedder")
        take_linear("img_in", "x_embedder")

        for i in range(_block_count(w, "double_blocks")):
            s, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
            take_linear(s + "img_mod.lin", d + "norm1.linear")
            take_linear(s + "txt_mod.lin", d + "norm1_context.linear")
            split_linear(s + "img_attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], [inner] * 3)
            split_linear(
                s + "txt_attn.qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"], [inner] * 3
            )
            take(s + "img_attn.norm.query_norm.scale", d + "attn.norm_q.weight")
            take(s + "img_attn.norm.key_norm.scale", d + "attn.norm_k.weight")
            take(s + "txt_attn.norm.query_norm.scale", d + "attn.norm_added_q.weight")
            take(s + "txt_attn.norm.key_norm.scale", d + "attn.norm_added_k.weight")
            take_linear(s + "img_attn.proj", d + "attn.to_out.0")
            take_linear(s + "txt_attn.proj", d + "attn.to_add_out")
            take_linear(s + "img_mlp.0", d + "ff.net.0.proj")
            take_linear(s + "img_mlp.2", d + "ff.net.2")
            take_linear(s + "txt_mlp.0", d + "ff_context.net.0.proj")
            take_linear(s + "txt_mlp.2", d + "ff_context.net.2")

        for i in range(_block_count(w, "single_blocks")):
            s, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
            take_linear(s + "modulation.lin", d + "norm.linear")
            mlp = w[s + "linear1.weight"].shape[0] - 3 * inner
            split_linear(
                s + "linear1",
                [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"],
                [inner, inner, inner, mlp],
            )
            take(s + "norm.query_norm.scale", d + "attn.norm_q.weight")
            take(s + "norm.key_norm.scale", d + "attn.norm_k.weight")
            take_linear(s + "linear2", d + "proj_out")

        take_linear("final_layer.linear", "proj_out")
        # BFL stores the final modulation as (shift, scale); diffusers' AdaLayerNormContinuous wants (scale, shift).
        for s in ("weight", "bias"):
            t = w[f"final_layer.adaLN_modulation.1.{s}"]
            half = t.shape[0] // 2
            out[f"norm_out.linear.{s}"] = mx.concatenate([t[half:], t[:half]], axis=0)
            used.add(f"final_layer.adaLN_modulation.1.{s}")
    except KeyError as e:
        missing.append(e.args[0])
    if missing:
        raise ValueError(
            f"BFL FLUX checkpoint is incomplete: missing key {missing[0]!r}. The file may be truncated, "
            "a shard of a larger checkpoint, or a different FLUX variant."
        )

    left = sorted(set(w) - used)
    if left and strict:
        raise ValueError(
            f"{len(left)} BFL keys were not mapped (first: {left[:5]}); this converter handles plain "
            "FLUX.1 transformer weights only. Pass strict=False to drop them."
        )
    return out


def config_from_bfl(weights: dict, axes_dims_rope=None) -> dict:
    """diffusers `transformer/config.json` dict inferred from BFL FLUX.1 weights (shapes only).

    The RoPE split cannot be read from the weights: it defaults to (16, 56, 56) for head_dim 128
    (every released FLUX.1); for any other head size pass `axes_dims_rope` explicitly.
    """
    w = _strip(weights)
    _check(w)
    inner, in_channels = w["img_in.weight"].shape
    qn = "double_blocks.0.img_attn.norm.query_norm.scale"
    head_dim = (w[qn] if qn in w else w["single_blocks.0.norm.query_norm.scale"]).shape[0]
    if inner % head_dim:
        raise ValueError(f"hidden size {inner} is not a multiple of the q-norm size {head_dim}")
    n_single = _block_count(w, "single_blocks")
    if n_single:
        mlp = w["single_blocks.0.linear1.weight"].shape[0] - 3 * inner
        if mlp != 4 * inner:
            raise ValueError(f"single-block MLP width {mlp} != 4 x hidden {inner}; unsupported FLUX variant")
    out_channels = w["final_layer.linear.weight"].shape[0]
    if axes_dims_rope is None:
        if head_dim != 128:
            raise ValueError(
                f"head_dim is {head_dim}, not 128: the RoPE axes split is not stored in the weights; "
                "pass axes_dims_rope=(a, b, c) summing to head_dim."
            )
        axes_dims_rope = (16, 56, 56)
    if sum(axes_dims_rope) != head_dim:
        raise ValueError(f"axes_dims_rope {tuple(axes_dims_rope)} must sum to head_dim {head_dim}")
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": int(in_channels),
        "out_channels": None if out_channels == in_channels else int(out_channels),
        "num_layers": _block_count(w, "double_blocks"),
        "num_single_layers": n_single,
        "attention_head_dim": int(head_dim),
        "num_attention_heads": int(inner // head_dim),
        "joint_attention_dim": int(w["txt_in.weight"].shape[1]),
        "pooled_projection_dim": int(w["vector_in.in_layer.weight"].shape[1]),
        "guidance_embeds": "guidance_in.in_layer.weight" in w,
        "axes_dims_rope": list(axes_dims_rope),
    }
