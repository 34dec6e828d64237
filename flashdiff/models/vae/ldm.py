"""Original LDM / BFL `ae.safetensors` VAE naming -> diffusers AutoencoderKL naming.

Follows diffusers' loaders/single_file_utils.py::convert_ldm_vae_checkpoint:

    {encoder,decoder}.norm_out                -> {encoder,decoder}.conv_norm_out
    encoder.down.N.block.M.<p>                -> encoder.down_blocks.N.resnets.M.<p>   (nin_shortcut -> conv_shortcut)
    encoder.down.N.downsample.conv            -> encoder.down_blocks.N.downsamplers.0.conv
    decoder.up.N.block.M.<p>                  -> decoder.up_blocks.(n_up-1-N).resnets.M.<p>   (order reversed)
    decoder.up.N.upsample.conv                -> decoder.up_blocks.(n_up-1-N).upsamplers.0.conv
    *.mid.block_1 / block_2                   -> *.mid_block.resnets.0 / 1
    *.mid.attn_1.{norm,q,k,v,proj_out}        -> *.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}
                                                 (1x1 conv weights squeezed to linear (O, I))

Tensors keep their PyTorch layout (the result is a diffusers-layout checkpoint; the model's
`sanitize` transposes convs). Works on MLX, NumPy or torch arrays alike.
"""

import re

_PREFIXES = ("first_stage_model.", "vae.")
_TOP_LEVEL = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_RESNET_PARTS = {
    "norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"
}
_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _map_key(key: str, n_up: int):
    """diffusers name of one LDM key (without prefix), or None when it is not recognised."""
    stem, _, leaf = key.rpartition(".")
    if leaf not in ("weight", "bias"):
        return None
    p = stem.split(".")
    new = None
    if p in (["quant_conv"], ["post_quant_conv"]) or (len(p) == 2 and p[1] in ("conv_in", "conv_out")):
        new = p
    elif len(p) == 2 and p[1] == "norm_out":
        new = [p[0], "conv_norm_out"]
    elif p[:2] == ["encoder", "down"] and len(p) == 6 and p[3] == "block" and p[5] in _RESNET_PARTS:
        new = ["encoder", "down_blocks", p[2], "resnets", p[4], _RESNET_PARTS[p[5]]]
    elif p[:2] == ["encoder", "down"] and p[3:] == ["downsample", "conv"]:
        new = ["encoder", "down_blocks", p[2], "downsamplers", "0", "conv"]
    elif p[:2] == ["decoder", "up"] and len(p) == 6 and p[3] == "block" and p[5] in _RESNET_PARTS:
        new = ["decoder", "up_blocks", str(n_up - 1 - int(p[2])), "resnets", p[4], _RESNET_PARTS[p[5]]]
    elif p[:2] == ["decoder", "up"] and p[3:] == ["upsample", "conv"]:
        new = ["decoder", "up_blocks", str(n_up - 1 - int(p[2])), "upsamplers", "0", "conv"]
    elif len(p) == 4 and p[1] == "mid" and p[2] in ("block_1", "block_2") and p[3] in _RESNET_PARTS:
        new = [p[0], "mid_block", "resnets", str(int(p[2][-1]) - 1), _RESNET_PARTS[p[3]]]
    elif len(p) == 4 and p[1] == "mid" and p[2] == "attn_1" and p[3] in _ATTN_PARTS:
        new = [p[0], "mid_block", "attentions", "0", _ATTN_PARTS[p[3]]]
    return ".".join(new + [leaf]) if new else None


def _strip_prefix(weights: dict) -> dict:
    for p in _PREFIXES:
        if any(k.startswith(p) for k in weights):
            return {k[len(p) :]: v for k, v in weights.items() if k.startswith(p)}
    return dict(weights)


def ldm_vae_to_diffusers(weights: dict) -> dict:
    """Map an LDM/BFL-named VAE state dict (optionally prefixed `first_stage_model.` / `vae.`)
    to diffusers AutoencoderKL names. Keys outside the VAE (e.g. `loss.*`) are dropped; an
    unrecognised key inside encoder/decoder raises ValueError."""
    weights = _strip_prefix(weights)
    up_ids = {int(m[1]) for k in weights if (m := re.match(r"decoder\.up\.(\d+)\.", k))}
    n_up = max(up_ids) + 1 if up_ids else 0
    out, unknown = {}, []
    for key, v in weights.items():
        if not key.startswith(_TOP_LEVEL):
            continue
        new = _map_key(key, n_up)
        if new is None:
            unknown.append(key)
            continue
        if ".attentions.0.to_" in new and new.endswith("weight") and v.ndim > 2:
            v = v.reshape(v.shape[0], v.shape[1])
        out[new] = v
    if unknown:
        raise ValueError(f"ldm_vae_to_diffusers: {len(unknown)} unrecognised LDM VAE keys, e.g. {unknown[:4]}")
    if not out:
        raise ValueError("ldm_vae_to_diffusers: no LDM VAE keys (encoder.* / decoder.*) found in the weights")
    return out
