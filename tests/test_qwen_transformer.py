"""Parity of flashdiff's Qwen-Image transformer with diffusers QwenImageTransformer2DModel."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from helpers import assert_close, torch_state_to_mx

from flashdiff.models.qwen_image.transformer import (
    QwenImageTransformer,
    QwenImageTransformerConfig,
    qwen_rope_positions,
)

# diffusers' own test dummy (tests/pipelines/qwenimage/test_qwenimage.py)
DUMMY = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=3,
    joint_attention_dim=16,
    guidance_embeds=False,
    axes_dims_rope=(8, 4, 4),
)


FUSED = pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])


def build(cfg=DUMMY, dtype=torch.float32, fused=True):
    torch.manual_seed(0)
    ref = QwenImageTransformer2DModel(**cfg).eval()
    # Default init for matrices; perturb norm weights (init 1) and biases so every parameter matters.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    ref = ref.to(dtype)
    config = QwenImageTransformerConfig.from_dict(json.loads(json.dumps({**cfg, "_class_name": "x"})))
    ours = QwenImageTransformer(config, fused=fused)
    ours.load_weights(list(ours.sanitize(torch_state_to_mx(ref.state_dict())).items()), strict=True)
    if dtype != torch.float32:
        ours.set_dtype({torch.bfloat16: mx.bfloat16, torch.float16: mx.float16}[dtype])
    return ref, ours


def inputs(B, grid, L_txt, cfg=DUMMY):
    f, h, w = grid
    x = torch.randn(B, f * h * w, cfg["in_channels"])
    c = torch.randn(B, L_txt, cfg["joint_attention_dim"])
    t = torch.rand(B)
    return x, c, t


def run_both(ref, ours, x, c, mask, t, img_shapes, **kw):
    with torch.no_grad():
        want = ref(
            hidden_states=x, encoder_hidden_states=c, encoder_hidden_states_mask=mask, timestep=t,
            img_shapes=img_shapes, return_dict=False,
        )[0]
    m = None if mask is None else mx.array(mask.numpy())
    got = ours(mx.array(x.float().numpy()), mx.array(c.float().numpy()), m, mx.array(t.float().numpy()), img_shapes, **kw)
    return got, want


@FUSED
@pytest.mark.parametrize("grid", [(1, 4, 4), (1, 3, 5), (1, 4, 6)])
def test_parity_no_mask(grid, fused):
    ref, ours = build(fused=fused)
    x, c, t = inputs(2, grid, 7)
    got, want = run_both(ref, ours, x, c, None, t, [[grid]] * 2)
    assert got.shape == (2, grid[0] * grid[1] * grid[2], 16)
    assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_parity_full_mask_and_old_img_shapes_style():
    ref, ours = build()
    grid = (1, 4, 6)
    x, c, t = inputs(2, grid, 5)
    mask = torch.ones(2, 5, dtype=torch.long)
    got, want = run_both(ref, ours, x, c, mask, t, [grid] * 2)  # list of tuples, as older pipelines pass
    assert_close(got, want, atol=1e-4, rtol=1e-4)
    got_nomask = ours(mx.array(x.numpy()), mx.array(c.numpy()), None, mx.array(t.numpy()), [grid] * 2)
    assert_close(got_nomask, want, atol=1e-4, rtol=1e-4)


@FUSED
@pytest.mark.parametrize("head_major_rope", [False, True], ids=["blhd", "bhld"])
def test_parity_padded_batch(fused, head_major_rope):
    """Two prompts of valid lengths 7 and 3, right-padded to 7 (as the pipeline builds them)."""
    ref, ours = build(fused=fused)
    ours.head_major_rope = head_major_rope
    grid = (1, 4, 6)
    x, c, t = inputs(2, grid, 7)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4], dtype=torch.long)
    c[1, 3:] = torch.randn(4, c.shape[-1]) * 5  # garbage in padding must not matter
    got, want = run_both(ref, ours, x, c, mask, t, [[grid]] * 2)
    assert_close(got, want, atol=1e-4, rtol=1e-4)

    # Padding invariance: sample 1 alone with only its valid tokens gives the same image output.
    single = ours(mx.array(x[1:].numpy()), mx.array(c[1:, :3].numpy()), None, mx.array(t[1:].numpy()), [[grid]])
    assert_close(got[1:], single, atol=1e-4, rtol=1e-4)

    # The mask derived from txt_seq_lens equals the explicit mask.
    derived = ours(mx.array(x.numpy()), mx.array(c.numpy()), None, mx.array(t.numpy()), [[grid]] * 2, txt_seq_lens=[7, 3])
    assert_close(derived, want, atol=1e-4, rtol=1e-4)


@FUSED
def test_parity_multi_image_and_precomputed_rope(fused):
    """Edit-style img_shapes: two images in one sample (frame index 0 and 1), RoPE tables passed in."""
    ref, ours = build(fused=fused)
    shapes = [(1, 4, 4), (1, 2, 6)]
    L_img = 16 + 12
    torch.manual_seed(1)
    x = torch.randn(1, L_img, 16)
    c = torch.randn(1, 6, 16)
    t = torch.tensor([0.37])
    _, want = run_both(ref, ours, x, c, None, t, [shapes])
    rope = ours.rope([shapes], 6)
    got = ours(mx.array(x.numpy()), mx.array(c.numpy()), None, mx.array(t.numpy()), None, rope=rope)
    assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_rope_positions_match_diffusers_tables():
    ref, ours = build()
    grid, L_txt = (1, 3, 5), 4
    vid, txt = ref.pos_embed([[grid]], max_txt_seq_len=L_txt, device=torch.device("cpu"))
    want = torch.cat([txt, vid], dim=0)
    cos, sin = ours.rope([[grid]], L_txt)
    assert_close(cos, want.real, atol=1e-6, rtol=1e-6)
    assert_close(sin, want.imag, atol=1e-6, rtol=1e-6)
    pos = np.array(qwen_rope_positions([grid], L_txt))
    assert pos[:L_txt, 1].tolist() == [2, 3, 4, 5]  # text starts at max(3 // 2, 5 // 2) = 2
    assert sorted(set(pos[L_txt:, 1].tolist())) == [-2, -1, 0]


@FUSED
def test_bf16_smoke(fused):
    """bf16 weights and activations on both sides (the timestep is rounded to bf16 on both, as diffusers does).
    bf16 keeps 8 mantissa bits (~4e-3 relative) and the two implementations round at different points (fused
    norms in fp32, GELU, matmul accumulation) through 2 blocks of residual updates. Each side is ~5% (of max
    |output|) away from its own fp32 result; against each other they agree to ~0.4%, so we require < 2%."""
    ref, ours = build(dtype=torch.bfloat16, fused=fused)
    grid = (1, 4, 4)
    x, c, t = inputs(2, grid, 5)
    mask = torch.tensor([[1] * 5, [1] * 2 + [0] * 3])
    got, want = run_both(ref, ours, x.bfloat16(), c.bfloat16(), mask, t.bfloat16(), [[grid]] * 2)
    assert got.dtype == mx.bfloat16
    a, b = np.array(got.astype(mx.float32)), want.float().numpy()
    assert np.isfinite(a).all()
    err = np.abs(a - b).max() / np.abs(b).max()
    assert err < 2e-2, err
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999


def test_bad_inputs():
    _, ours = build()
    x = mx.zeros((1, 16, 16))
    c = mx.zeros((1, 5, 16))
    t = mx.array([0.5])
    with pytest.raises(ValueError, match="img_shapes"):
        ours(x, c, None, t, [[(1, 4, 6)]])
    with pytest.raises(ValueError, match="encoder_hidden_states_mask"):
        ours(x, c, mx.ones((1, 4)), t, [[(1, 4, 4)]])
    with pytest.raises(ValueError, match="hidden_states must be"):
        ours(mx.zeros((1, 16, 8)), c, None, t, [[(1, 4, 4)]])
    with pytest.raises(ValueError, match="axes_dims_rope"):
        QwenImageTransformer(QwenImageTransformerConfig.from_dict({**DUMMY, "axes_dims_rope": [8, 4, 2]}))


def test_parity_additional_t_cond():
    """use_additional_t_cond=True (a diffusers variant option): an Embedding(2, D) added to temb."""
    ref, ours = build({**DUMMY, "use_additional_t_cond": True})
    grid = (1, 4, 4)
    x, c, t = inputs(2, grid, 5)
    cond = torch.tensor([0, 1])
    with torch.no_grad():
        want = ref(hidden_states=x, encoder_hidden_states=c, timestep=t, img_shapes=[[grid]] * 2,
                   additional_t_cond=cond, return_dict=False)[0]
    got = ours(mx.array(x.numpy()), mx.array(c.numpy()), None, mx.array(t.numpy()), [[grid]] * 2,
               additional_t_cond=mx.array(cond.numpy()))
    assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [None, 8])
def test_fused_layout_roundtrip_and_quantized_reload(tmp_path, bits):
    """sanitize / to_checkpoint are exact inverses; a quantized fused model saved in diffusers names
    reloads (fused or not) to the same output. dim 64 so that the attention layers get quantized."""
    from functools import partial

    from mlx.utils import tree_flatten

    from flashdiff.engine.components import build_model, load_component, save_component
    from flashdiff.engine.quantization import QuantSpec, quantize_model
    from flashdiff.engine.weights import load_folder
    from flashdiff.models.qwen_image.pipeline import QUANTIZATION_SKIP

    cfg = {**DUMMY, "in_channels": 64, "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 64,
           "axes_dims_rope": (8, 12, 12)}
    mx.random.seed(2)
    model = QwenImageTransformer(QwenImageTransformerConfig.from_dict(cfg), fused=True)
    sd = QwenImageTransformer.to_checkpoint(dict(tree_flatten(model.parameters())))
    assert "transformer_blocks.1.attn.add_v_proj.bias" in sd and not any("qkv" in k for k in sd)
    params = model.sanitize(sd)
    assert sorted(params) == sorted(dict(tree_flatten(model.parameters())))
    unfused = QwenImageTransformer(QwenImageTransformerConfig.from_dict(cfg), fused=False)
    unfused.load_weights(list(unfused.sanitize(params).items()), strict=True)  # fused weights split on load
    back = QwenImageTransformer.to_checkpoint(dict(tree_flatten(unfused.parameters())))
    assert sorted(back) == sorted(sd) and all(np.array_equal(np.array(back[k]), np.array(sd[k])) for k in sd)

    k = mx.random.split(mx.random.key(5), 2)
    x, c = mx.random.normal((1, 16, 64), key=k[0]), mx.random.normal((1, 5, 64), key=k[1])
    args = (x, c, None, mx.array([0.3]), [[(1, 4, 4)]])
    if bits is None:
        assert_close(unfused(*args), model(*args), atol=1e-5, rtol=1e-5)
        return
    spec = QuantSpec.make(bits, 32)
    quantize_model(model, spec, QUANTIZATION_SKIP)
    assert type(model.transformer_blocks[0].attn.to_added_qkv).__name__ == "QuantizedLinear"
    ref = model(*args)
    folder = tmp_path / "transformer"
    save_component(model, cfg, folder, spec, to_checkpoint=model.to_checkpoint)
    assert "transformer_blocks.0.attn.to_q.scales" in load_folder(folder)
    reloaded = load_component(partial(QwenImageTransformer, fused=True), QwenImageTransformerConfig, folder, mx.float32,
                              name="transformer")
    assert reloaded.fused and np.array_equal(np.array(reloaded(*args)), np.array(ref))
    plain = build_model(partial(QwenImageTransformer, fused=False), QwenImageTransformerConfig,
                        {**cfg, "quantization": spec.to_dict()}, load_folder(folder), mx.float32, name="transformer")
    assert_close(plain(*args), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "padded"])
def test_compiled_blocks_with_streaming_match_diffusers(with_mask):
    """The GPU execution mode (one compiled trace for all blocks + BlockStream) against diffusers."""
    ref, ours = build(fused=True)
    ours.compile_blocks = ours.stream_blocks = True
    grid = (1, 4, 6)
    x, c, t = inputs(2, grid, 7)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4], dtype=torch.long) if with_mask else None
    for _ in range(2):  # the second call replays the cached trace
        got, want = run_both(ref, ours, x, c, mask, t, [[grid]] * 2)
        assert_close(got, want, atol=1e-4, rtol=1e-4)
