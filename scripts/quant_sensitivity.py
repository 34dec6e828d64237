"""How much each FLUX layer group contributes to quantization error (input to QUANTIZATION_SKIP).

Builds a random-weight FLUX transformer (real head size 128, fewer/narrower blocks so it runs on a
CPU), quantizes one layer group at a time and reports the relative output error and the share of
weight bytes in that group. Random weights are only a proxy for trained ones: this ranks layers by
structural sensitivity (what their errors flow into), not by learned outlier structure.

    python scripts/quant_sensitivity.py [--bits 4] [--group-size 64] [--heads 4] [--double 2] [--single 4]
"""

import argparse
import re

import mlx.core as mx
import mlx.nn as nn

from flashdiff.engine.quantization import QuantSpec, quantize_model
from flashdiff.models.flux.transformer import FluxTransformer, FluxTransformerConfig

GROUPS = {
    "x_embedder": r"^x_embedder$",
    "context_embedder": r"^context_embedder$",
    "time_text_embed": r"^time_text_embed\.",
    "modulation (norm1/norm.linear)": r"\.(norm1|norm1_context|norm)\.linear$",
    "attention q/k/v": r"\.attn\.(to_[qkv]|add_[qkv]_proj)$",
    "attention out": r"\.attn\.(to_out\.0|to_add_out)$",
    "feed-forward": r"\.(ff|ff_context)\.net\.",
    "single proj_mlp/proj_out": r"^single_transformer_blocks\.\d+\.(proj_mlp|proj_out)$",
    "norm_out": r"^norm_out\.",
    "proj_out": r"^proj_out$",
}


def build(args):
    cfg = FluxTransformerConfig.from_dict({
        "in_channels": 64, "num_layers": args.double, "num_single_layers": args.single, "attention_head_dim": 128,
        "num_attention_heads": args.heads, "joint_attention_dim": 512, "pooled_projection_dim": 256,
        "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]})
    mx.random.seed(0)
    model = FluxTransformer(cfg)
    # Trained FLUX weights have std ~0.02-0.05; nn.Linear's default init is close enough for ranking.
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    args = ap.parse_args()
    spec = QuantSpec.make(args.bits, args.group_size)
    model = build(args)
    k = mx.random.key(1)
    x = mx.random.normal((1, 256, 64), key=k)
    ctx = mx.random.normal((1, 64, 512), key=mx.random.key(2))
    pooled = mx.random.normal((1, 256), key=mx.random.key(3))
    img_ids = mx.stack([mx.zeros(256), mx.arange(256) // 16, mx.arange(256) % 16], axis=-1)
    txt_ids = mx.zeros((64, 3))
    call = lambda m: m(x, ctx, pooled, mx.array([0.7]), img_ids, txt_ids, guidance=mx.array([3.5]))
    ref = call(model)
    weights = model.parameters()
    total = sum(m.weight.size for _, m in model.named_modules() if isinstance(m, nn.Linear))
    print(f"{args.bits}-bit affine, group {args.group_size}; relative max error of the output, quantizing one group at a time")
    print(f"{'group':32s} {'weights %':>9s} {'rel. error':>10s}")
    for name, pattern in GROUPS.items():
        paths = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and re.search(pattern, p)]
        share = sum(m.weight.size for p, m in model.named_modules() if p in paths) / total
        model.update(weights)
        q = build(args)
        q.update(weights)
        skip = tuple(p for p, m in q.named_modules() if isinstance(m, nn.Linear) and p not in paths)
        quantize_model(q, spec, skip)
        err = float(mx.abs(call(q) - ref).max() / mx.abs(ref).max())
        print(f"{name:32s} {100 * share:9.2f} {err:10.4f}")
    from flashdiff.models.flux.pipeline import QUANTIZATION_SKIP

    q = build(args)
    q.update(weights)
    quantize_model(q, spec, QUANTIZATION_SKIP)
    kept = sum(m.weight.size for p, m in q.named_modules() if type(m) is nn.Linear) / total
    print(f"{'all but QUANTIZATION_SKIP':32s} {100 * (1 - kept):9.2f} {float(mx.abs(call(q) - ref).max() / mx.abs(ref).max()):10.4f}")
    q = build(args)
    q.update(weights)
    quantize_model(q, spec)
    print(f"{'everything':32s} {100.0:9.2f} {float(mx.abs(call(q) - ref).max() / mx.abs(ref).max()):10.4f}")


if __name__ == "__main__":
    main()
