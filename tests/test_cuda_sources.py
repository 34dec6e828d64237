"""The CUDA kernel sources compile (nvcc, as MLX's NVRTC would for the H200) without a GPU.

These run wherever the CUDA toolkit is installed (this project's machines have nvcc 13.0) and are
skipped elsewhere. They catch what the GPU tests would only catch on a device: syntax, PTX the
target rejects, register spills and shared-memory overflows. Numerics are checked on the GPU
(tests/test_kernels_cuda.py).
"""

import re
import shutil

import mlx.core as mx
import pytest
from helpers import attention_main_loop, cuda_kernel_source, nvcc_compile, nvdisasm_path, sass, sass_loop

from flashdiff.kernels import (_attention_sm90, _attention_sm90_forms, _dequant, _gemm_cuda, _gemm_mixed, _gemm_sm90, _gemm_tma,
                               _gemm_tma_dequant, _gemm_tma_dequant_persistent, _gemm_tma_forms, _moe_layout)

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs the CUDA toolkit (nvcc)")

GEMM_INPUTS = [("x", mx.bfloat16), ("w", mx.bfloat16), ("slot_row", mx.int32), ("tile_expert", mx.int32)]


def gemm_template(dtype, threads, direct, **extra):
    return ([("T", dtype), ("IS_BF16", dtype == mx.bfloat16), ("K", 2560), ("N", 6912), ("A_DIV", 2),
             ("DIRECT", direct), ("M_ROWS", 8192), ("THREADS", threads), ("GROUP_M", 8)] + list(extra.items()))


def report(tmp_path, name, header, source, inputs, outputs, template, arch="sm_90a"):
    text = nvcc_compile(tmp_path, cuda_kernel_source(name, header, source, inputs, outputs, template), arch)
    assert "0 bytes spill stores" in text, text
    return text


def assert_fits_tma_block(text):
    """ptxas's report for a TMA GEMM kernel: its registers fit 384 threads and its wgmmas are not serialised."""
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    allocated = -(-regs // 8) * 8  # registers are allocated per thread in units of 8
    assert allocated * _gemm_tma.THREADS <= 65536, f"{regs} registers x {_gemm_tma.THREADS} threads exceed the register file"
    assert "C7514" not in text


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("direct", [False, True])
def test_mma_gemm_compiles(tmp_path, dtype, direct):
    inputs = [(n, dtype if n in ("x", "w") else t) for n, t in GEMM_INPUTS]
    report(tmp_path, "gemm", _gemm_cuda._HEADER, _gemm_cuda._SOURCE, inputs, [("out", dtype)],
           gemm_template(dtype, _gemm_cuda.THREADS, direct), arch="sm_80")


@pytest.mark.parametrize("variant", ["in flight", "wait", "warp specialised"])
def test_wgmma_gemm_compiles(tmp_path, variant):
    ws = variant == "warp specialised"
    template = gemm_template(mx.bfloat16, _gemm_sm90.THREADS_WS if ws else _gemm_sm90.THREADS, False)
    if not ws:
        template.append(("MMA_IN_FLIGHT", variant == "in flight"))
    text = report(tmp_path, "gemm90", _gemm_sm90._HEADER, _gemm_sm90._SOURCE_WS if ws else _gemm_sm90._SOURCE,
                  GEMM_INPUTS, [("out", mx.bfloat16)], template)
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    threads = _gemm_sm90.THREADS_WS if ws else _gemm_sm90.THREADS
    assert regs * threads <= 65536, f"{regs} registers x {threads} threads exceed the SM's register file"
    if variant != "in flight":  # only the in-flight form serialises its wgmmas (documented, measured)
        assert "C7514" not in text


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("direct", [False, True])
def test_tma_gemm_compiles(tmp_path, dtype, direct):
    """The TMA kernel fits 384 threads' register budget (ptxas's choice here is fragile: see the
    comment in _gemm_tma._SOURCE), and its tensor-map and gather kernels compile."""
    inputs = [(n, dtype if n in ("x", "w") else t) for n, t in GEMM_INPUTS] + [("tmaps", mx.uint8)]
    text = report(tmp_path, "gemm_tma", _gemm_tma._GEMM_HEADER, _gemm_tma._SOURCE, inputs, [("out", dtype)],
                  gemm_template(dtype, _gemm_tma.THREADS, direct))
    assert_fits_tma_block(text)
    maps = [("IS_BF16", dtype == mx.bfloat16), ("K", 2560), ("W_ROWS", 4 * 6912)]
    report(tmp_path, "maps", _gemm_tma._MAP_HEADER, _gemm_tma._MAPS_SOURCE, inputs[:2], [("tmaps", mx.uint8)],
           maps + [("X_ROWS", 4096)])
    report(tmp_path, "gather", _gemm_tma._MAP_HEADER, _gemm_tma._GATHER_SOURCE,
           [("x", dtype), ("slot_row", mx.int32), ("w", dtype)], [("xs", dtype), ("tmaps", mx.uint8)],
           [("T", dtype), ("SLOTS", 8576), ("A_DIV", 2), ("CPT", 4)] + maps)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("direct, gather_a", [(False, False), (True, False), (False, True)])
def test_persistent_tma_gemm_compiles(tmp_path, dtype, direct, gather_a):
    """The persistent TMA kernel (engine "wgmma persistent", and "... gather" with cp.async for the
    input rows) fits 384 threads' register budget without spilling or serialising its wgmmas."""
    inputs = [(n, dtype if n in ("x", "w") else t) for n, t in GEMM_INPUTS] + [("tmaps", mx.uint8)]
    template = gemm_template(dtype, _gemm_tma.THREADS, direct, TILES_M=67, GATHER_A=gather_a)
    text = report(tmp_path, "gemm_tma_persistent", _gemm_tma._GEMM_HEADER, _gemm_tma_forms._SOURCE_PERSISTENT, inputs,
                  [("out", dtype)], template)
    assert_fits_tma_block(text)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_persistent_gemm_over_quantized_weights_compiles(tmp_path, dtype, direct, bits):
    """The persistent TMA GEMM whose storer warps dequantize the weights (_gemm_tma_dequant_persistent) fits
    384 threads' registers without spills or serialised wgmmas at HiDream's MoE shape; its map + counter
    kernels (dense and grouped) compile."""
    inputs = [("x", dtype), ("wq", mx.uint32), ("scales", dtype), ("biases", dtype), ("slot_row", mx.int32),
              ("tile_expert", mx.int32), ("tmaps", mx.uint8), ("work", mx.int32)]
    template = gemm_template(dtype, _gemm_tma.THREADS, direct, TILES_M=67, GATHER_A=False, W_ROWS=4 * 6912, E_COUNT=4,
                             BITS=bits, GROUP=64)
    text = report(tmp_path, "gemm_dequant_persistent", _gemm_tma_dequant_persistent.HEADER,
                  _gemm_tma_dequant_persistent.SOURCE, inputs, [("out", dtype), ("w_deq", dtype), ("wmaps", mx.uint8)],
                  template)
    assert_fits_tma_block(text)
    maps = [("IS_BF16", dtype == mx.bfloat16), ("K", 2560), ("WORK", 4321)]
    report(tmp_path, "maps_work", _gemm_tma._MAP_HEADER, _gemm_tma._MAPS_SOURCE_WORK, [("x", dtype)],
           [("tmaps", mx.uint8), ("work", mx.int32)], maps + [("X_ROWS", 4096)])
    report(tmp_path, "gather_work", _gemm_tma._MAP_HEADER, _gemm_tma._GATHER_SOURCE_WORK,
           [("x", dtype), ("slot_row", mx.int32)], [("xs", dtype), ("tmaps", mx.uint8), ("work", mx.int32)],
           [("T", dtype), ("SLOTS", 8576), ("A_DIV", 2), ("CPT", 4)] + maps)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("bits, has_bias", [(4, False), (4, True), (8, False), (8, True)])
def test_dequant_gemm_compiles(tmp_path, dtype, bits, has_bias):
    """The fused dequantize GEMM (_gemm_tma_dequant) fits 384 threads' registers without spills or
    serialised wgmmas, at FLUX's 3072 x 3072 shape."""
    inputs = [("x", dtype), ("wq", mx.uint32), ("scales", dtype), ("biases", dtype),
              ("bias", dtype if has_bias else mx.int32), ("slot_row", mx.int32), ("tile_expert", mx.int32),
              ("tmaps", mx.uint8)]
    template = _gemm_tma_dequant.template(dtype, 4608, 3072, 3072, bits, 64, has_bias)
    text = report(tmp_path, "dequant_gemm", _gemm_tma_dequant._HEADER, _gemm_tma_dequant._SOURCE, inputs,
                  [("out", dtype)], template)
    assert_fits_tma_block(text)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("bits, group, has_bias, packed", [(4, 64, False, False), (4, 32, True, False), (8, 64, True, False),
                                                           (8, 128, False, False), (4, 64, False, True), (8, 32, True, True)])
def test_mixed_gemm_compiles(tmp_path, dtype, bits, group, has_bias, packed):
    """The mixed-input GEMM (_gemm_mixed), unpacked and PACKED (pack_weight's blocks), fits 512 threads' registers
    (128 each) without spills or serialised wgmmas, and its shared memory fits the H200's 227 KB per block."""
    inputs = [("x", dtype), ("wq", mx.uint32), ("scales", dtype), ("biases", dtype), ("bias", dtype)]
    template = _gemm_mixed.template(dtype, 1024, 3072, 3072, bits, group, has_bias, packed)
    text = report(tmp_path, "mixed_gemm", _gemm_mixed._HEADER, _gemm_mixed._SOURCE, inputs,
                  [("out", dtype), ("tmaps", mx.uint8)], template)
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    assert -(-regs // 8) * 8 * _gemm_mixed.THREADS <= 65536, f"{regs} registers x {_gemm_mixed.THREADS} threads"
    assert "C7514" not in text and "C7515" not in text, text
    assert _gemm_mixed.smem_bytes(bits, group) <= 227 * 1024


@pytest.mark.parametrize("bits, group", [(4, 64), (8, 32)])
def test_mixed_pack_kernel_compiles(tmp_path, bits, group):
    """pack_weight's kernel (the mixed GEMM's producer code writing to global memory) and dequantize_packed's compile
    without spills."""
    text = report(tmp_path, "mixed_pack", _gemm_mixed._HEADER, _gemm_mixed._PACK_SOURCE,
                  [("wq", mx.uint32), ("scales", mx.bfloat16), ("biases", mx.bfloat16)], [("packed", mx.uint32)],
                  [("K", 3072), ("N", 3072), ("BITS", bits), ("GROUP", group)])
    assert "0 bytes spill stores" in text, text
    # and dequantize_packed's kernel, which reads those blocks back (the packed layers' large-M path)
    report(tmp_path, "mixed_unpack", _gemm_mixed._HEADER, _gemm_mixed._UNPACK_SOURCE, [("packed", mx.uint32)],
           [("out", mx.bfloat16)], [("T", mx.bfloat16), ("IS_BF16", True), ("K", 3072), ("N", 3072), ("BITS", bits),
                                    ("GROUP", group)])


@pytest.mark.parametrize("bits, group, m, bf16, x_dtype", [(4, 64, 1, True, mx.bfloat16), (8, 32, 2, False, mx.float16),
                                                           (4, 128, 31, True, mx.float32)])
def test_packed_gemv_kernel_compiles(tmp_path, bits, group, m, bf16, x_dtype):
    """packed_gemv's kernel (few rows from the packed blocks) compiles without spills, at 1 row (a modulation layer)
    and at the most it takes (31), fp16 scales too (the cvt.f32.f16 assembly), x in each dtype (fd_x_pair)."""
    from flashdiff.kernels import _gemm_mixed_pack

    text = report(tmp_path, "mixed_packed_gemv", _gemm_mixed_pack._GEMV_HEADER, _gemm_mixed_pack._GEMV_SOURCE,
                  [("x", x_dtype), ("packed", mx.uint32)], [("partial", mx.float32)],
                  [("IS_BF16", bf16), ("K", 3072), ("N", 18432), ("M", m), ("BITS", bits), ("GROUP", group),
                   ("KSPLIT", 2)])
    assert "0 bytes spill stores" in text, text


def test_layout_kernel_compiles(tmp_path):
    report(tmp_path, "layout", "", _moe_layout._LAYOUT_SOURCE, [("expert_ids", mx.int32)],
           [("slot_row", mx.int32), ("tile_expert", mx.int32)],
           [("E", 300), ("MAX_E", 1024), ("R", 8192), ("TILE", 128), ("TILES", 364), ("RPB", _moe_layout.RPB), ("NT", _moe_layout.RPB),
            ("BLOCKS", 8192 // _moe_layout.RPB)])


@pytest.mark.parametrize("bits, mode, gather", [(None, None, True)] + [
    (b, m, g) for b, m in [(4, "affine"), (8, "affine"), (3, "affine"), (4, "mxfp4")] for g in (False, True)])
def test_moe_prologue_kernel_compiles(tmp_path, bits, mode, gather):
    """The MoE prologue in one launch (the layout kernel, + the gather of x's routed rows and the tensor maps, + the
    flat dequantize kernel's blocks), at HiDream's MoE shape, with the templates moe_prologue builds."""
    dt = mx.bfloat16
    template, _, _ = _moe_layout._layout_launch(mx.zeros((4096, 2), mx.int32), 4,
                                               _moe_layout.GATHER_RPB if gather else _moe_layout.RPB)
    inputs, outputs, source, header = [("expert_ids", mx.int32)], [("slot_row", mx.int32), ("tile_expert", mx.int32)], \
        _moe_layout._LAYOUT_SOURCE, ""
    if gather:
        template = _moe_layout._joined_templates(template, [("K", 2560), ("A_DIV", 2), ("SLOTS", 8576), ("IS_BF16", True),
                                                 ("W_ROWS", 4 * 6912)])
        inputs += [("x", dt), ("w", mx.uint32 if mode else dt)]
        outputs += [("xs", dt), ("tmaps", mx.uint8)]
        source, header = _moe_layout.layout_gather_source("out" if mode else "w"), _gemm_tma._MAP_HEADER
    if mode:
        group = 64 if mode == "affine" else 32
        dq, _, _ = _dequant._launch(dt, dt if mode == "affine" else mx.float32, 4 * 6912, 2560, bits, group, mode, True)
        template = _moe_layout._joined_templates(template, dq)
        inputs = (inputs if gather else inputs + [("w", mx.uint32)]) + [
            ("scales", dt if mode == "affine" else mx.uint8), ("biases", dt)]
        outputs += [("out", dt)]
        source, header = _moe_layout.with_dequant_blocks(source), header + _dequant.CUDA_KERNEL_HEADER
    report(tmp_path, "moe_prologue", header, source, inputs, outputs, template)


@pytest.mark.parametrize("bits, mode", [(4, "affine"), (8, "affine"), (3, "affine"), (5, "affine"), (6, "affine"),
                                        (2, "affine"), (4, "nvfp4"), (8, "mxfp8")])
@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_dequant_kernel_compiles(tmp_path, bits, mode, flat, dtype):
    """Both dequantize kernels with the template and header they launch with (the flat kernel's paired
    path at affine 4/8 bits, its float path elsewhere)."""
    group = {"affine": 64, "nvfp4": 16, "mxfp8": 32}[mode]
    template, _, _ = _dequant._launch(dtype, dtype if mode == "affine" else mx.float32, 3072, 3072, bits, group, mode, flat)
    assert ("PAIRED", mode == "affine" and bits in (4, 8)) in template or not flat
    report(tmp_path, "dequant", _dequant.CUDA_KERNEL_HEADER, _dequant._CUDA_SOURCE_FLAT if flat else _dequant._CUDA_SOURCE,
           [("w", mx.uint32), ("scales", dtype if mode == "affine" else mx.uint8), ("biases", dtype)],
           [("out", dtype)], template)


# the SASS checks read nvcc's cubin with nvdisasm
needs_nvdisasm = pytest.mark.skipif(nvdisasm_path() is None, reason="needs nvdisasm (the test extra nvidia-cuda-nvdisasm)")


@needs_nvdisasm
@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_packed_issues_every_load_first(tmp_path, bits):
    """dequantize_packed's kernel issues all of a thread's global loads (6 units: codes + scale | bias word each)
    before its first shared-memory store, so they are in flight together (session 19: the loop had kept one unit's
    loads in flight at 8 bits, two at 4)."""
    src = cuda_kernel_source("mixed_unpack", _gemm_mixed._HEADER, _gemm_mixed._UNPACK_SOURCE, [("packed", mx.uint32)],
                             [("out", mx.bfloat16)], [("T", mx.bfloat16), ("IS_BF16", True), ("K", 3072), ("N", 12288),
                                                      ("BITS", bits), ("GROUP", 64)])
    ops = [ins.split()[0] for _, ins in sass(tmp_path, src)]
    first_store = next(i for i, op in enumerate(ops) if op.startswith("STS"))
    assert sum(op.startswith("LDG") for op in ops[:first_store]) == 12, ops[:first_store]
    assert not any(op.startswith("LDG") for op in ops[first_store:]), "a global load after the first shared store"


@needs_nvdisasm
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("persistent", [False, True])
def test_wgmma_attention_scores_overwrite_instead_of_zeroing(tmp_path, dtype, persistent):
    """Each key tile's S = Q K^T starts with a wgmma that ignores its accumulator (scale-d false: RZ, !UPT in SASS),
    so the loop zeroes no registers first (session 13: 32 CS2R per tile before); the P V wgmmas accumulate."""
    body = attention_main_loop(tmp_path, 4736, False, persistent, dtype)
    mmas = [t for t in body if t.startswith("HGMMA")]
    overwriting = [t for t in mmas if "RZ, !UPT" in t]
    assert len(mmas) == 16 and len(overwriting) == 1, mmas
    assert overwriting[0] == [t for t in mmas if "tnspB" not in t][0]  # S's first k16 step (P V's read V transposed)
    # zeroing S's 64 accumulators took 32 CS2R per tile; what is left are the persistent form's resets of l, m and
    # O where a query tile ends (5)
    zeroing = [t for t in body if t.startswith("CS2R")]
    assert len(zeroing) <= (8 if persistent else 0), zeroing


@needs_nvdisasm
@pytest.mark.parametrize("has_bias", [False, True])
def test_wgmma_attention_row_maxima_in_independent_chains(tmp_path, has_bias):
    """Each thread's two rows take their maximum over a key tile in MAX_CHAINS = 4 chains each, so the loop starts 8
    FMNMX chains from -inf (session 12's loop: 2 chains of 32 dependent FMNMX)."""
    body = attention_main_loop(tmp_path, 4736, has_bias, False)
    starts = [t for t in body if t.startswith("FMNMX") and "-INF" in t]
    assert len(starts) == 8, starts


@needs_nvdisasm
@pytest.mark.parametrize("persistent", [False, True])
def test_wgmma_attention_rescales_every_tile(tmp_path, persistent):
    """Both forms rescale O on every tile: no VOTE.ANY in the loop. Session 13's per-warp skip (a vote per tile and a
    branch around the 64 FMULs) measured slower on the H200 in session 14; the variant probe's `skip_unmoved` keeps
    it (tests/test_benchmarks.py reads that variant's SASS)."""
    body = attention_main_loop(tmp_path, 4736, False, persistent)
    assert not [t for t in body if t.startswith("VOTE")]
    assert sum(t.startswith("FMUL") for t in body) >= 64


@needs_nvdisasm
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("persistent", [False, True])
def test_wgmma_attention_full_key_tiles_have_no_per_key_tests(tmp_path, has_bias, persistent):
    """In the sm_90 attention's main loop (SASS; the per-tile and the persistent form), a key tile that lies wholly
    inside Lk runs no per-key test. In the persistent form an odd Lk (4621) adds one tail-tile copy of the softmax
    to the loop, but its full tiles run the instructions of an aligned Lk (4736); the per-tile form runs a partial
    last tile after the loop (session 17), so its loop is the aligned one's within a few instructions (513 / 514
    without bias; before, 673 with the copy behind a branch). Session 13 found the old run-time `tail` flag costing
    every tile 60 FSEL to -inf and ~35 ISETP at LK = 4621: 731 instructions per tile against 585 (4736); measured
    on the H200 (sessions 7-8), ours ran 4621 keys 11-16% slower than 4736."""
    def loop(lk):
        body = attention_main_loop(tmp_path / str(lk), lk, has_bias, persistent)
        return body, sum("FSEL" in t and "-INF" in t for t in body)

    aligned, aligned_selects = loop(4736)
    odd, odd_selects = loop(4621)
    # (the persistent form's loop also resets its row maxima to -inf where a query tile starts: 2 selects)
    assert aligned_selects <= 2, f"{aligned_selects} selects to -inf in the aligned loop: every key tested"
    assert odd_selects - aligned_selects <= 8, f"{odd_selects} selects to -inf in the loop: the full tiles test each key"
    extra = len(odd) - len(aligned)
    if persistent:  # the odd loop = the aligned one + one (constant-folded) tail copy of softmax / fetch_bias
        assert 0 < extra < 0.5 * len(aligned), (len(odd), len(aligned))
    else:  # no tail copy in the loop
        assert abs(extra) <= 24, (len(odd), len(aligned))


@needs_nvdisasm
@pytest.mark.parametrize("has_bias", [False, True])
def test_persistent_attention_steps_inside_a_tile_cost_what_the_per_tile_form_does(tmp_path, has_bias):
    """The persistent form runs the steps inside a tile from a loop of their own (session 16), so its main loop is as
    long as the per-tile form's within a few instructions; one loop over every step with the tile bookkeeping in it
    was 589 instructions on its hot path against 514 (and the whole loop 879)."""
    per_tile = attention_main_loop(tmp_path / "tile", 4736, has_bias, False)
    persistent = attention_main_loop(tmp_path / "persistent", 4736, has_bias, True)
    assert abs(len(persistent) - len(per_tile)) <= 16, (len(persistent), len(per_tile))
    assert not [t for t in persistent if t.startswith("STG")]  # the O stores sit outside it


def _mixed_loop(tmp_path, bits, dtype):
    tmp_path.mkdir(parents=True, exist_ok=True)
    inputs = [("x", dtype), ("wq", mx.uint32), ("scales", dtype), ("biases", dtype), ("bias", dtype)]
    src = cuda_kernel_source("mixed_gemm", _gemm_mixed._HEADER, _gemm_mixed._SOURCE, inputs, [("out", dtype), ("tmaps", mx.uint8)],
                             _gemm_mixed.template(dtype, 1024, 3072, 3072, bits, 64, False, True))
    return sass_loop(sass(tmp_path, src), min_mma=16)


@needs_nvdisasm
@pytest.mark.parametrize("bits", [4, 8])
def test_mixed_gemm_converts_each_pair_with_one_fma(tmp_path, bits):
    """The mixed GEMM's consumer loop (unrolled over the 4 stages since session 18: 4 K tiles, 16 wgmmas, 2 rows x 8
    pairs of codes per thread each) converts each bf16 pair with one HFMA2 (q s rounded once) and one HADD2 (+ b)
    (session 15: sub, mul, add per pair); its HMUL2s are the -128 s of each row's group (8); fp16 keeps sub, mul, add.
    The stages' wgmma descriptors live in uniform registers: at most one R2UR per K tile (session 17's loop of two K
    tiles moved every descriptor over, 16 R2UR per two K tiles)."""
    ops = lambda body, op: sum(t.split()[0].split(".")[0] == op for t in body)  # noqa: E731
    body = _mixed_loop(tmp_path / "bf16", bits, mx.bfloat16)
    assert ops(body, "HGMMA") == 16
    assert ops(body, "HFMA2") == 64 and ops(body, "HADD2") == 64 and ops(body, "HMUL2") == 8, body
    assert ops(body, "R2UR") <= 4, body
    # session 15's loops: 331 and 387 instructions per two K tiles; session 16's 252 and 308; session 18's 401 / 513 per four
    assert len(body) <= (410 if bits == 4 else 525), len(body)
    half = _mixed_loop(tmp_path / "f16", bits, mx.float16)
    assert ops(half, "HMUL2") == 64 and ops(half, "HFMA2") == 0


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("pingpong", [True, False])
def test_wgmma_attention_compiles(tmp_path, dtype, has_bias, pingpong):
    """The sm_90 attention: its main kernel and the persistent form fit 384 threads' registers (launch
    bounds in the header, the setmaxnreg split inside) without spills or serialised wgmmas; its maps
    kernel compiles."""
    lk = 4621
    text = report(tmp_path, "attention_sm90", _attention_sm90._HEADER, _attention_sm90._SOURCE,
                  [("q", dtype), ("k", dtype), ("v", dtype), ("tmaps", mx.uint8), ("scale", mx.float32),
                   ("kbias", mx.float32)], [("out", dtype)],
                  _attention_sm90.main_template(dtype, 24, 24, lk, lk, has_bias, pingpong, pingpong, 0.088))
    assert_fits_tma_block(text)
    assert "serialized" not in text, text
    persistent = report(tmp_path, "attention_sm90_persistent", _attention_sm90._HEADER, _attention_sm90_forms._SOURCE_PERSISTENT,
                        [("q", dtype), ("k", dtype), ("v", dtype), ("tmaps", mx.uint8), ("scale", mx.float32),
                         ("kbias", mx.float32)], [("out", dtype)],
                        _attention_sm90.main_template(dtype, 24, 24, lk, lk, has_bias, pingpong, pingpong, 0.088, 24))
    assert_fits_tma_block(persistent)
    assert "serialized" not in persistent, persistent
    report(tmp_path, "attention_sm90_maps", _attention_sm90._MAP_HEADER, _attention_sm90._MAPS_SOURCE,
           [("q", dtype), ("k", dtype), ("v", dtype)], [("tmaps", mx.uint8)],
           [("T", dtype), ("IS_BF16", dtype == mx.bfloat16), ("Q_COLS", 128), ("Q_ROWS", 24 * lk),
            ("KV_COLS", 128), ("KV_ROWS", 24 * lk)])


@pytest.mark.parametrize("variant", ["as is", "no conversion", "no wgmma", "half the conversion", "no bf16 arithmetic"])
def test_mixed_timeline_probe_compiles(tmp_path, variant):
    """benchmarks/probe_mixed_timeline.py's stamped packed kernel (and its timing variants) compiles, fits 512 threads'
    registers without spills or serialised wgmmas (stamps that cost registers would time another kernel)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import probe_mixed_timeline as probe

    inputs = [("x", mx.bfloat16), ("wq", mx.uint32), ("scales", mx.bfloat16), ("biases", mx.bfloat16), ("bias", mx.bfloat16)]
    text = report(tmp_path, "mixed_timeline", _gemm_mixed._HEADER, probe.stamped_source(variant), inputs,
                  [("out", mx.bfloat16), ("tmaps", mx.uint8), ("tl", mx.uint32)],
                  _gemm_mixed.template(mx.bfloat16, 1024, 3072, 3072, 4, 64, False, True))
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    assert -(-regs // 8) * 8 * _gemm_mixed.THREADS <= 65536 and "C7514" not in text and "C7515" not in text, text
