"""The model benchmark script (benchmarks/models.py) runs end to end on tiny configs on the CPU, writes
every expected measurement, and regenerates the README table; its full-size configs match diffusers.
The kernel benchmark script (benchmarks/kernels.py) saves its rows as it measures them."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import models  # noqa: E402
from helpers import attention_main_loop, nvdisasm_path  # noqa: E402

BF16 = [f"flashdiff-bf16-{s}{m}" for s in ("unfused", "fused", "fused-hm") for m in ("", "-compiled", "-blocks")]
FLASHDIFF = BF16 + ["flashdiff-bf16-modulation"] + [f"flashdiff-{q}{m}" for q in ("8bit", "4bit") for m in ("", "-compiled", "-blocks", "-stream")]
DIFFUSERS = ["diffusers-eager", "diffusers-compile"]
ITERS = 2


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    readme = tmp / "README.md"
    original = (ROOT / "benchmarks" / "README.md").read_text()
    readme.write_text(original)
    out = tmp / "models.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "models.py"), "--tiny", "--models", "flux-dev,flux-schnell,qwen-image",
           "--quant", "bf16,8,4", "--diffusers", "eager,compile", "--compile-backend", "eager", "--e2e",
           "--warmup", "1", "--iters", str(ITERS), "--out", str(out), "--readme", str(readme)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (ROOT / "benchmarks" / "README.md").read_text() == original, "the test must not touch the real README"
    return json.loads(out.read_text()), original, readme.read_text(), proc.stdout


def _positive(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_json_has_every_measurement(tiny_run):
    data, _, _, stdout = tiny_run
    meta = data["meta"]
    for k in ("device", "date", "command", "mlx_version", "torch_version", "diffusers_version"):
        assert meta.get(k), f"meta.{k} missing"
    assert "--tiny" in meta["command"] and meta["tiny"] is True
    assert set(data["models"]) == {"flux-dev", "flux-schnell", "qwen-image"}
    for name, entry in data["models"].items():
        runs = entry["runs"]
        assert set(runs) == set(FLASHDIFF + DIFFUSERS), name
        for key, run in runs.items():
            assert run["ok"], f"{name}/{key} failed: {run.get('error')}"
            assert len(run["times_s"]) == ITERS and all(_positive(t) for t in run["times_s"]), (name, key)
            assert _positive(run["median_s"]) and _positive(run["weights_gib"]), (name, key)
            if key.startswith("flashdiff"):
                assert _positive(run["peak_memory_gib"]), (name, key)
                assert run["mx_compile"] == key.endswith("-compiled")
                assert run["switches"] == models.SETTINGS[run["setting"]], (name, key)
            if key in BF16:
                assert key.removesuffix("-compiled").removesuffix("-blocks") == f"flashdiff-bf16-{run['setting']}"
                assert run["compile_blocks"] == key.endswith("-blocks")
            if "bit" in key:
                assert run["quantized_layers"] > 0 and run["quantization"]["group_size"] == 64, (name, key)
                # quantized variants use the fastest bf16 setting
                assert run["setting"] == models._best_setting(runs, list(models.SETTINGS)), (name, key)
        # img + txt modulation per double block, one per single block, the output norm
        cfg = entry["config"]
        n_mod = 2 * cfg["num_layers"] + cfg.get("num_single_layers", 0) + 1
        assert runs["flashdiff-bf16-modulation"]["modulation_layers"] == n_mod
        # same architecture on both sides (fused or not): identical bf16 weight bytes
        for key in BF16:
            assert runs[key]["weights_gib"] == pytest.approx(runs["diffusers-eager"]["weights_gib"], rel=1e-9), key
        assert runs["flashdiff-4bit"]["weights_gib"] < runs["flashdiff-8bit"]["weights_gib"] < runs["flashdiff-bf16-fused"]["weights_gib"]
    for key, shapes in (("gemm", 4), ("sdpa", None)):
        probe = data["probes"][key]
        assert probe["ok"], probe.get("error")
        if shapes:
            assert len(probe["shapes"]) == shapes
            assert all(_positive(v) for r in probe["shapes"].values() for v in r.values())
        else:
            for name in ("sdpa_only", "fused_prologue", "fused_prologue_head_major", "mlx_prologue"):
                assert _positive(probe[f"{name}_s"]) and _positive(probe[f"{name}_tflops"]), name
    for key in ("bf16", "4bit"):
        run = data["e2e"][key]
        assert run["ok"], run.get("error")
        assert set(run["stages_s"]) == {"text_encoders", "transformer", "vae"}
        assert all(_positive(v) for v in run["stages_s"].values())
        assert _positive(run["total_s"]) and _positive(run["peak_memory_gib"])
        assert run["image_shape"] == [1, 64, 64, 3] and run["steps"] == 4
    assert "done in" in stdout


def test_readme_table_regenerated(tiny_run):
    data, original, readme, _ = tiny_run
    start, end = common.TABLE_START, common.TABLE_END
    # text outside the markers is kept byte for byte
    assert readme[: readme.index(start)] == original[: original.index(start)]
    assert readme[readme.index(end):] == original[original.index(end):]
    table = readme[readme.index(start): readme.index(end)]
    assert "Not measured yet" not in table
    for name, entry in data["models"].items():
        best = entry["runs"]["flashdiff-4bit"]["setting"]
        best = {"unfused": "unfused", "fused": "fused qkv", "fused-hm": "fused qkv, head-major RoPE"}[best]
        for label in ("flashdiff bf16 (unfused)", "flashdiff bf16 (fused qkv) + mx.compile",
                      "flashdiff bf16 (fused qkv, head-major RoPE)", "flashdiff bf16: modulation Linears only",
                      f"flashdiff 4-bit ({best}) + mx.compile", "diffusers torch.compile"):
            assert f"| {name} | {label} |" in table, label
        # bf16 settings are compared with the unfused baseline of the same mode
        assert f"| {name} | flashdiff bf16 (unfused) + mx.compile |" in table
    assert "Issue 4 targets" in table and "End to end" in table and data["meta"]["mlx_version"] in table
    assert "Probe: GEMM forms" in table and "Probe: RoPE + attention layout" in table
    assert "failed" not in table and "skipped" not in table


def test_failure_and_skip_are_recorded_not_raised():
    results = {}
    common.measure(results, "boom", lambda: 1 / 0)
    assert results["boom"]["ok"] is False and "ZeroDivisionError" in results["boom"]["error"]
    common.measure(results, "later", None, skip=True, reason="excluded by --skip")
    assert results["later"] == {"ok": False, "skipped": True, "error": "excluded by --skip"}
    table = common.render_table({"meta": {}, "models": {"flux-dev": {"runs": {"flashdiff-bf16": results["boom"]}}}})
    assert "| flux-dev | flashdiff bf16 | failed: ZeroDivisionError" in table


def test_markers_appended_when_missing():
    text = common.replace_between_markers("# title\n", common.TABLE_START, common.TABLE_END, "body")
    assert text == f"# title\n\n{common.TABLE_START}\nbody\n{common.TABLE_END}\n"
    again = common.replace_between_markers(text, common.TABLE_START, common.TABLE_END, "new")
    assert again == f"# title\n\n{common.TABLE_START}\nnew\n{common.TABLE_END}\n"


def test_bad_arguments_name_the_fix():
    with pytest.raises(SystemExit):
        models.parse_args(["--models", "flux-pro"])
    with pytest.raises(SystemExit):
        models.parse_args(["--quant", "3"])
    with pytest.raises(SystemExit):
        models.parse_args(["--settings", "fused,turbo"])
    with pytest.raises(SystemExit):
        models.parse_args(["--quant-setting", "turbo"])
    with pytest.raises(SystemExit):
        models.parse_args(["--resolution", "500"])  # not a multiple of 16


def test_resolution_sets_the_token_count(tmp_path):
    out = tmp_path / "models.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "models.py"), "--tiny", "--models", "flux-schnell", "--quant", "bf16",
           "--flashdiff", "eager", "--diffusers", "none", "--no-probes", "--resolution", "32", "--warmup", "0",
           "--iters", "1", "--out", str(out), "--no-readme"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    entry = json.loads(out.read_text())["models"]["flux-schnell"]
    assert (entry["resolution"], entry["image_tokens"]) == (32, 4)
    assert all(run["ok"] for run in entry["runs"].values()), entry["runs"]


def test_best_setting_prefers_compiled_and_old_results_still_render():
    ok = lambda t: {"ok": True, "median_s": t}  # noqa: E731
    runs = {"flashdiff-bf16-unfused": ok(0.9), "flashdiff-bf16-unfused-compiled": ok(1.0),
            "flashdiff-bf16-fused": ok(0.5), "flashdiff-bf16-fused-compiled": ok(0.8), "flashdiff-bf16-fused-hm": ok(0.1)}
    assert models._best_setting(runs, list(models.SETTINGS)) == "fused"  # compiled runs rank first
    assert models._best_setting({}, list(models.SETTINGS)) is None
    # a results file from before the settings existed (plain flashdiff-bf16 keys) still renders its ratios
    old = {"flashdiff-bf16": ok(0.2), "flashdiff-8bit": ok(0.4), "diffusers-compile": ok(0.1)}
    table = common.render_table({"meta": {}, "models": {"flux-dev": {"runs": old}}})
    assert "| flux-dev | flashdiff 8-bit | 0.4000 | 4.00× | 2.00× |" in table


def test_random_init_is_bf16_everywhere_and_bounded():
    cfg = models.MODELS["flux-dev"]["tiny"]
    model, info = models.flashdiff_model("flux", cfg, mx.bfloat16, "bf16")
    params = dict(tree_flatten(model.parameters()))
    assert all(v.dtype == mx.bfloat16 for v in params.values())
    assert all(float(mx.abs(v).max()) == 0 for k, v in params.items() if k.endswith("bias"))
    w = params["transformer_blocks.0.ff.net.2.weight"].astype(mx.float32)
    assert 0.015 < float(mx.sqrt(mx.mean(w * w))) < 0.025  # N(0, 0.02^2)


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell", "qwen-image"])
def test_full_size_configs_match_diffusers(name):
    """The published-size configs build the same parameter count in MLX (lazily: nothing is allocated)
    as diffusers' module on the meta device, and the expected 12B / 20B totals."""
    import torch
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

    spec = models.MODELS[name]
    if spec["family"] == "flux":
        mlx_model = models.FluxTransformer(models.FluxTransformerConfig.from_dict(spec["config"]))
        cls = FluxTransformer2DModel
    else:
        mlx_model = models.QwenImageTransformer(models.QwenImageTransformerConfig.from_dict(spec["config"]))
        cls = QwenImageTransformer2DModel
    n_mlx = sum(v.size for _, v in tree_flatten(mlx_model.parameters()))
    with torch.device("meta"):
        ref = cls(**spec["config"])
    n_ref = sum(p.numel() for p in ref.parameters())
    assert n_mlx == n_ref
    expected = {"flux-dev": 11.9e9, "flux-schnell": 11.9e9, "qwen-image": 20.4e9}[name]
    assert abs(n_mlx - expected) / expected < 0.01, n_mlx


def test_kernel_benchmark_saves_each_row_as_it_goes(tmp_path, monkeypatch):
    """benchmarks/kernels.py rewrites its JSON after every row, so a device call stopped by its time
    limit keeps what it measured; a failing section is recorded and the next one still runs."""
    import kernels

    out, md = tmp_path / "k.json", tmp_path / "k.md"
    seen = []

    def section_a():
        kernels.emit(dict(kernel="a", shape="s1", mode="m", ours_ms=1.0))
        seen.append(json.loads(out.read_text())["rows"])  # already on disk before the next row
        seen.append(md.read_text())
        kernels.emit(dict(kernel="a", shape="s2", mode="m", ours_ms=2.0))
        raise RuntimeError("stopped mid-section")

    def section_b():
        kernels.emit(dict(kernel="b", shape="s3", mode="m", ours_ms=3.0))

    monkeypatch.setattr(kernels, "qlinear_rows", lambda quick: section_a())
    monkeypatch.setattr(kernels, "moe_rows", section_b)
    monkeypatch.setattr(kernels, "_emitted", [])
    monkeypatch.setattr(kernels, "_on_row", None)
    monkeypatch.setattr(kernels, "markdown", lambda rows: f"{len(rows)} rows")
    monkeypatch.setattr(sys, "argv", ["kernels.py", "--only", "qlinear,moe", "--out", str(out), "--md", str(md)])
    kernels.main()
    assert [r["shape"] for r in seen[0]] == ["s1"] and seen[1] == "1 rows\n"
    assert md.read_text() == "3 rows\n" and not list(tmp_path.glob("*.tmp"))
    rows = json.loads(out.read_text())["rows"]
    assert [r.get("shape") for r in rows] == ["s1", "s2", None, "s3"]
    assert rows[2]["kernel"] == "qlinear" and "stopped mid-section" in rows[2]["error"]


def test_kernel_benchmark_attention_rows_time_what_attention_dispatches(tmp_path, monkeypatch):
    """The attention rows of benchmarks/kernels.py time attention() as it dispatches (queued and streamed) beside
    SDPA and name the path it took; the markdown row says it. On the CPU (a tiny case) the path is the reference."""
    import kernels

    out, md = tmp_path / "k.json", tmp_path / "k.md"
    monkeypatch.setattr(kernels, "ATTENTION_CASES", [(130, 2)])
    monkeypatch.setattr(kernels, "STREAM_ROUNDS", 1)
    monkeypatch.setattr(kernels, "_emitted", [])
    monkeypatch.setattr(kernels, "_on_row", None)
    monkeypatch.setattr(sys, "argv", ["kernels.py", "--only", "attention", "--out", str(out), "--md", str(md)])
    kernels.main()
    (row,) = json.loads(out.read_text())["rows"]
    assert "error" not in row, row
    assert row["dispatched_path"] == "reference" and "flash_ms" not in row  # no CUDA: no WMMA kernel
    for key in ("sdpa_ms", "dispatched_ms", "streamed_sdpa_ms", "streamed_dispatched_ms"):
        assert row[key] > 0, key
    assert math.isclose(row["streamed_dispatched_ratio_vs_sdpa"], row["streamed_sdpa_ms"] / row["streamed_dispatched_ms"])
    assert "attention() runs reference" in md.read_text()
    # the odd length against its aligned neighbours (128 and 256), timed in turn: rates L^2 / t relative to theirs
    assert (row["aligned_below"], row["aligned_above"]) == (128, 256) and row["paths_odd_below_above"] == ["reference"] * 3
    t = {int(n): v for n, v in row["interleaved_streamed_seconds"].items()}
    assert sorted(t) == [128, 130, 256] and math.isclose(row["streamed_rate_vs_below"], (130 ** 2 / t[130]) / (128 ** 2 / t[128]))
    assert 0 < row["queued_rate_vs_above"] and "queued_rate_vs_above_tflops" not in row
    assert f"streamed **{row['streamed_rate_vs_below']:.3f} / {row['streamed_rate_vs_above']:.3f}**" in md.read_text()


def test_interleaved_measures_in_turn_and_takes_medians():
    order = []
    fake = {"a": [5.0, 1.0, 3.0], "b": [2.0, 9.0, 4.0]}

    def measure(fn):
        name = fn()
        order.append(name)
        return fake[name][sum(o == name for o in order) - 1]

    got = common.interleaved({"a": lambda: "a", "b": lambda: "b"}, measure, rounds=3)
    assert order == ["a", "b"] * 3 and got == {"a": 3.0, "b": 4.0}


def test_kernel_benchmark_qlinear_shape_filter(monkeypatch, tmp_path):
    """--qlinear-shapes runs only the named quantized-linear shapes (to split a long run over device
    calls) and rejects a shape the benchmark does not have."""
    import kernels

    monkeypatch.setattr(kernels, "QLINEAR_SIZES", [(8, 64, 32), (16, 64, 64)])
    monkeypatch.setattr(kernels, "_emitted", [])
    monkeypatch.setattr(kernels, "_on_row", None)
    monkeypatch.setattr(kernels, "bench", lambda fn, **kw: (fn(), 1e-3)[1])
    out = tmp_path / "k.json"
    monkeypatch.setattr(sys, "argv", ["kernels.py", "--only", "qlinear", "--out", str(out), "--qlinear-shapes", "16x64x64"])
    kernels.main()
    rows = json.loads(out.read_text())["rows"]
    assert {r["shape"] for r in rows} == {"16x64->64"} and len(rows) == 2  # affine 4 and 8 bit
    for r in rows:  # the interleaved streamed columns, plain and compiled, are there and positive
        assert r["stream_rounds"] == 3 and r["equals_dequantize_matmul"] is True
        for key in ("streamed_ours_ms", "streamed_bf16_ms", "streamed_compiled_ours_ms", "streamed_compiled_bf16_ms"):
            assert _positive(r[key]), (key, r[key])
    monkeypatch.setattr(sys, "argv", ["kernels.py", "--only", "qlinear", "--qlinear-shapes", "1x2x3"])
    with pytest.raises(SystemExit):
        kernels.main()


def test_dequant_gemm_probe_edits_match_the_kernel():
    """benchmarks/probe_dequant_persistent_variants.py edits the shipped kernel's source: every edit still applies once
    (a variant that silently stopped matching would time the unedited kernel)."""
    import probe_dequant_persistent_variants as probe

    for name, edits in probe.EDITS.items():
        src = probe.variant_source(edits)
        assert (src == probe.fused.SOURCE) == (name == "as_is"), name


def test_mixed_gemm_probe_edits_match_the_kernel():
    """benchmarks/probe_mixed_gemm_variants.py edits the mixed GEMM's source: every edit still applies once, only
    "as is" and the packed variant (a template flag, no edit) are the shipped source, and the deeper rings' stage
    count is the one compiled and fits shared memory."""
    import probe_mixed_gemm_variants as probe

    for bits in (4, 8):
        for name in probe.VARIANTS:
            src, smem = probe.variant_source(name, bits)
            assert (src == probe.mixed._SOURCE) == (name in ("as is", probe.PACKED)), (name, bits)
            stages = probe.STAGES_OF.get(name, {}).get(bits, probe.mixed.STAGES)
            assert f"STAGES = {stages}, KT" in src and smem == stages * probe.mixed.stage_bytes(bits, 64) + 1024
        assert probe.STAGES_OF[probe.DEEP_RING][bits] == probe.STAGES_OF[probe.PAST_L1_DEEP][bits] > probe.mixed.STAGES
    with pytest.raises(AssertionError, match="shared memory"):
        probe.STAGES_OF[probe.DEEP_RING][8] = 8
        try:
            probe.variant_source(probe.DEEP_RING, 8)
        finally:
            probe.STAGES_OF[probe.DEEP_RING][8] = 6


def test_mixed_timeline_probe_stamps_and_summary():
    """benchmarks/probe_mixed_timeline.py: every stamp lands once in the packed kernel's source (the rest unchanged),
    and its summary reads the stamps as they are laid out (synthetic stamps with known gaps, one 32-bit wrap)."""
    import numpy as np
    import probe_mixed_timeline as probe

    src = probe.stamped_source()
    assert all(f"fd_stamp({e})" in src for e in range(8)) and src.count("fd_stamp(") == 8  # each point once
    stripped = src
    for old, new in probe.EDITS:
        stripped = stripped.replace(new, old)
    assert stripped == probe.mixed._SOURCE + "  if (tid == 0) fd_stamp(7);\n"
    assert set(probe.VARIANTS) == {"as is", "no conversion", "no wgmma", "half the conversion", "no bf16 arithmetic"}
    for variant in set(probe.VARIANTS) - {"as is"}:  # each takes its one part out and keeps every stamp
        other = probe.stamped_source(variant)
        assert other != src and other.count("fd_stamp(") == 8
    assert "convert(kt + 1, nxt)" not in probe.stamped_source("no conversion")
    assert "fd_mma_rs_k64<IS_BF16>(d, cur" not in probe.stamped_source("no wgmma")
    ctas, k_tiles = 3, 48
    tl = np.zeros((ctas, probe.SLOTS), np.uint64)
    starts = np.array([2**32 - 1000, 2**32 - 500, 200], np.uint64)  # entries 0.5 us apart, the last past a wrap
    gaps_ns = np.array([0, 900, 1500, 2500, 12500, 24000, 25000, 26000], np.uint64)
    for c in range(ctas):
        tl[c, :8] = (starts[c] + gaps_ns + c * 100 * (gaps_ns > 0)) % 2**32
        tl[c, 8:16] = (7 + 2 * gaps_ns) % 2**32  # 2 cycles per ns
        tl[c, 16] = c % 2
    row = probe.summarize(tl.astype(np.uint32).reshape(-1), ctas, k_tiles)
    assert row["sms used"] == 2 and row["start spread us"] == pytest.approx(1.2)
    assert row["median us from entry"]["first K tile converted"] == pytest.approx(2.6)  # 2500 + 100 ns (CTA 1)
    assert row["span us (first entry to last stores)"] == pytest.approx((1200 + 26000 + 200) / 1e3)
    assert row["median cycles per K tile (first to half)"] == pytest.approx(2 * 10000 / 24)
    assert row["clock GHz (cycles / ns, median)"] == pytest.approx(2 * 26000 / 26100, rel=1e-3)


def test_moe_side_columns_name_the_library_settings(monkeypatch):
    """Each side column of the MoE rows (benchmarks/kernels.py) sets a variable the library reads to a value it takes,
    and selects what its label says (a side column that the dispatch ignored would time the default twice)."""
    import kernels

    from flashdiff.kernels import _gemm_cuda, _moe_layout

    monkeypatch.setattr(_gemm_cuda, "is_sm90", lambda: True)
    columns = kernels.moe_side_columns(True, kernels.side_engine())
    assert set(columns) == set(kernels.MOE_SIDE_COLUMNS)
    assert set(kernels.moe_side_columns(False, None)) == {"gather_kernel"}
    assert columns["side_engine"] == ("FLASHDIFF_GEMM_ENGINE", "wgmma persistent gather")
    effects = {"gather_kernel": lambda: not _moe_layout.gather_in_layout(),
               "separate_dequant": lambda: _gemm_cuda.dequant_choice() == "separate",
               "fused_dequant": lambda: _gemm_cuda.dequant_choice() == "fused",
               "side_engine": lambda: not _moe_layout.gather_in_layout()}  # the gather form copies the rows itself
    for column, (name, value) in columns.items():
        assert not effects[column](), column  # the default differs
        with monkeypatch.context() as m:
            m.setenv(name, value)
            assert effects[column](), column


def test_in_graph_benchmark_runs_and_checks_its_outputs(monkeypatch, tmp_path):
    """benchmarks/in_graph.py (layers timed inside one compiled graph) runs end to end on tiny sizes: a row per
    chain x row count x mode and per MoE mode, every time positive, each chain equal to its layers computed with
    MLX's CPU dequantize, every side setting of the MoE block equal to the default, the JSON and table written whole."""
    import in_graph

    out, md = tmp_path / "g.json", tmp_path / "g.md"
    monkeypatch.setattr(sys, "argv", ["in_graph.py", "--out", str(out), "--md", str(md), "--rows", "16,24",
                                      "--width", "64", "--mlp", "128", "--moe", "24,64,128,64,4,2",
                                      "--stream-rounds", "1", "--calls", "2"])
    in_graph.main()
    rows = json.loads(out.read_text())["rows"]
    assert not [r for r in rows if "error" in r], rows
    chains = [r for r in rows if r["kernel"] == "quantized_linear chain"]
    assert len(chains) == 2 * 2 * 2 and {r["layers"] for r in chains} == {8}
    for r in chains:
        assert r["equals_dequantize_matmul"] is True, r
        for key in ("chain_ours_ms", "chain_bf16_ms", "alone_sum_ours_ms", "alone_sum_bf16_ms"):
            assert _positive(r[key]), (key, r)
    moe = [r for r in rows if r["kernel"] == "moe feed-forward"]
    assert [r["mode"] for r in moe] == ["bf16", "affine4 g64", "affine8 g64"]
    for r in moe:
        assert r["max_rel_diff_vs_reference"] < 1e-6, r
        sides = ["gather_kernel"] + (["separate_dequant"] if r["mode"] != "bf16" else [])
        for c in sides:
            assert r[f"{c}_equals_default"] is True and _positive(r[f"{c}_ms"]), (c, r)
        assert all(_positive(r[k]) for k in ("ours_ms", "dense_ms", "without_routed_ms", "w13_ms", "dense_w13_ms")), r
        # w1 | w3 as one GEMM of twice the width: bf16 outputs through another matmul width (float32 parity of both
        # layouts with diffusers is the next test)
        assert r["w13_max_rel_diff_vs_default"] < 1e-2, r
    table = md.read_text()
    assert table.count("| quantized_linear chain") == 8 and table.count("| MoE feed-forward") == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_in_graph_moe_feed_forward_matches_diffusers():
    """The benchmark's HiDream MoE feed-forward (gate softmax, top-2 without renormalisation, SwiGLU experts through
    moe_gemm, shared expert; w1 and w3 apart or as one GEMM) equals diffusers' MOEFeedForwardSwiGLU with the same
    weights (float32, CPU)."""
    torch = pytest.importorskip("torch")
    hidream = pytest.importorskip("diffusers.models.transformers.transformer_hidream_image")
    import in_graph

    torch.manual_seed(0)
    dim, t = 32, 40
    ref = hidream.MOEFeedForwardSwiGLU(dim, 4 * dim, num_routed_experts=4, num_activated_experts=2).eval()
    for p in ref.parameters():
        p.data.normal_(0, 0.2)
    hidden, shared_hidden = ref.experts[0].w1.out_features, ref.shared_experts.w1.out_features
    ffn = in_graph.MoeFeedForward(dim, hidden, shared_hidden, 4, 2)
    arr = lambda w: mx.array(w.detach().numpy())  # noqa: E731
    ffn.gate = arr(ref.gate.weight)
    for name in ("w1", "w2", "w3"):
        setattr(ffn, name, mx.stack([arr(getattr(e, name).weight) for e in ref.experts]))
        setattr(ffn, "s" + name[1], arr(getattr(ref.shared_experts, name).weight))
    ffn.w13 = mx.concatenate([ffn.w1, ffn.w3], axis=1)
    x = torch.randn(1, t, dim)
    with torch.no_grad():
        want = mx.array(ref(x)[0].numpy())
    for fused in (False, True):  # w1 and w3 apart, and as one GEMM of twice the width
        got = ffn(mx.array(x[0].numpy()), fused=fused)
        assert got.shape == (t, dim)
        assert mx.allclose(got, want, rtol=1e-5, atol=1e-5).item(), (fused, float(mx.abs(got - want).max()))


def test_graph_edge_probe_reads_a_dot_file():
    """benchmarks/probe_graph_edges.py's reader of MLX's CUDA-graph dumps: node names, edge counts and roots per
    graph, a child graph's nodes kept apart from its parent's."""
    import probe_graph_edges

    dot = """digraph dot {
subgraph cluster_1 {
label="graph_1" graph[style="dashed"];
"graph_1_node_0"[style="solid" shape="rectangle" label="0
KERNEL
flashdiff_dequant_4_64
<<<1152,1,1>>>"];
"graph_1_node_1"[style="solid" shape="rectangle" label="1
GRAPH"];
"graph_1_node_2"[style="solid" shape="rectangle" label="2
KERNEL
flashdiff_dequant_4_64"];
"graph_1_node_3"[style="solid" shape="rectangle" label="3
GRAPH"];
subgraph cluster_2 {
"graph_2_node_0"[style="solid" shape="rectangle" label="0
KERNEL
nvjet_tst_128x256_64x4"];
}
"graph_1_node_0" -> "graph_1_node_1";
"graph_1_node_1" -> "graph_1_node_3";
"graph_1_node_2" -> "graph_1_node_3";
}
}
"""
    got = probe_graph_edges.summarise_dot(dot)
    assert got["roots"] == {"graph_1": ["flashdiff_dequant_4_64", "flashdiff_dequant_4_64"], "graph_2": ["nvjet_tst_128x256_64x4"]}
    assert got["nodes"]["graph_1_node_3"] == dict(name="GRAPH", graph="graph_1", into=2, out=0)
    assert got["edges"][0] == ["flashdiff_dequant_4_64", "GRAPH"] and len(got["edges"]) == 3


def test_attention_variant_probe_takes_back_each_edit():
    """benchmarks/probe_attention_variants.py rebuilds the sm_90 attention with each of session 13's edits taken back:
    every edit still applies once (a variant that silently stopped matching would time the shipped kernel), as_is
    is the shipped source, and each variant differs from it. With nvcc and nvdisasm, the variants reproduce the old
    costs in SASS: the run-time tail flag's 60 selects at LK = 4621, the zeroing's 32 CS2R, skip_unmoved's vote."""
    import probe_attention_variants as probe

    from flashdiff.kernels import _attention_sm90 as att, _attention_sm90_forms as forms

    for persistent in (False, True):
        shipped = (att._HEADER, forms._SOURCE_PERSISTENT if persistent else att._SOURCE)
        for name in probe.variants(persistent):
            got = probe.variant_sources(name, persistent)
            assert (got == shipped) == (name == "as_is"), (name, persistent)
    assert probe.variants(True) == [n for n in probe.VARIANTS if n not in probe.PER_TILE_ONLY]
    with pytest.raises(ValueError, match="per-tile form only"):
        probe.variant_sources("last_tile_in_loop", True)


@pytest.mark.skipif(shutil.which("nvcc") is None or nvdisasm_path() is None,
                    reason="needs the CUDA toolkit (nvcc) and nvdisasm (the test extra nvidia-cuda-nvdisasm)")
@pytest.mark.parametrize("persistent", [False, True])
def test_wgmma_attention_descriptors_move_by_one_add(tmp_path, persistent):
    """Each wgmma's shared-memory descriptors are one made per MMA call and moved along by an add (fd_desc_add,
    session 16), not made from each step's address (fd_desc: mask, shift, OR; the variant probe's `desc_per_step`
    puts that back): 30 or more ULOP3 fewer in the loop (per-tile form: 38 -> 8), 40 or more instructions fewer."""
    import probe_attention_variants as probe

    body = attention_main_loop(tmp_path / "as_is", 4736, False, persistent)
    old = attention_main_loop(tmp_path / "old", 4736, False, persistent, sources=probe.variant_sources("desc_per_step", persistent))
    ulop3 = lambda loop: sum(t.startswith("ULOP3") for t in loop)  # noqa: E731
    assert ulop3(old) - ulop3(body) >= 30 and len(old) - len(body) >= 40, (ulop3(old), ulop3(body), len(old), len(body))


@pytest.mark.skipif(shutil.which("nvcc") is None or nvdisasm_path() is None,
                    reason="needs the CUDA toolkit (nvcc) and nvdisasm (the test extra nvidia-cuda-nvdisasm)")
def test_attention_variant_probe_reproduces_session_12_in_sass(tmp_path):
    import probe_attention_variants as probe

    def loop(name, lk):
        return attention_main_loop(tmp_path / f"{name}{lk}", lk, sources=probe.variant_sources(name))

    count = lambda body, what: sum(what(t) for t in body)  # noqa: E731
    old = loop("session12", 4621)
    assert count(old, lambda t: t.startswith("FSEL") and "-INF" in t) >= 60
    assert count(old, lambda t: t.startswith("CS2R")) == 32 and count(old, lambda t: t.startswith("VOTE")) == 0
    assert len(old) == 731  # session 12's loop, as session 13 read it
    assert count(loop("zeroing", 4736), lambda t: t.startswith("CS2R")) == 32
    # skip_unmoved (session 13's vote, taken out in session 14): one VOTE.ANY per tile, and the first conditional
    # forward branch after it jumps over O's 64 rescaling FMULs
    body = attention_main_loop(tmp_path / "skip", 4736, sources=probe.variant_sources("skip_unmoved"), addresses=True)
    votes = [i for i, (_, t) in enumerate(body) if t.startswith("VOTE.ANY")]
    assert len(votes) == 1, votes
    addr, text = next((a, t) for a, t in body[votes[0]:] if re.match(r"@!?P\d\s+BRA", t))
    target = int(text.split("0x")[-1], 16)
    assert target > addr and sum(t.startswith("FMUL") for a, t in body if addr < a < target) == 64


_NCU_HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
               '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


def _ncu_report(path, launches):
    """An ncu --csv report in its real layout (program output and ==PROF== lines mixed in), one row per (kernel
    name with arguments, grid, metric, unit, value) in `launches`."""
    lines = ["==PROF== Connected to process 1 (/usr/bin/python3)", "{'row': 1}", _NCU_HEADER]
    for i, (name, grid, metric, unit, value) in enumerate(launches):
        lines.append(f'"{i}","1","python3","h","{name}","1","14","(128, 1, 1)","{grid}","0","9.0",'
                     f'"Command line profiler metrics","{metric}","{unit}","{value}"')
    path.write_text("\n".join(lines + ["==PROF== Disconnected from process 1"]) + "\n")
    return path


def test_ncu_summary_sums_by_kernel_and_compares_reports(tmp_path, capsys):
    import ncu_summary

    t = "gpu__time_duration.sum"
    a = _ncu_report(tmp_path / "a.csv", [
        ("custom_kernel_k_4(const unsigned int *, float *)", "(64, 8, 1)", t, "ns", "1,000"),
        ("custom_kernel_k_4(const unsigned int *, float *)", "(64, 8, 1)", "dram__throughput.avg.pct", "%", "50"),
        ("custom_kernel_k_4(const unsigned int *, float *)", "(16, 8, 1)", t, "ns", "3,000"),
        ("nvjet_gemm", "(2, 64, 1)", t, "usecond", "6"),  # ncu may scale a row's unit
        ("custom_kernel_k_4(const unsigned int *, float *)", "(64, 8, 1)", t, "ns", "2,000")])
    b = _ncu_report(tmp_path / "b.csv", [("nvjet_gemm", "(2, 64, 1)", t, "ns", "5,500"),
                                         ("custom_kernel_other", "(4, 1, 1)", t, "ns", "300")])
    one = ncu_summary.summarize([a])["files"][0]
    assert one["unit"] == "us" and one["total"] == pytest.approx(12.0)  # the % metric left out
    assert one["groups"]["custom_kernel_k_4"] == dict(launches=3, median=2.0, min=1.0, max=3.0, total=6.0)
    by_grid = ncu_summary.summarize([a], by=("name", "grid"))["files"][0]["groups"]
    assert by_grid["custom_kernel_k_4 @ (64, 8, 1)"]["total"] == pytest.approx(3.0)
    assert ncu_summary.summarize([a], skip=1)["files"][0]["groups"]["custom_kernel_k_4"]["launches"] == 2
    ncu_summary.main([str(a), str(b)])
    table = capsys.readouterr().out
    assert "| nvjet_gemm | 1, 6.0 | 1, 5.5 | -0.5 |" in table
    assert "| custom_kernel_other | - | 1, 0.3 | +0.3 |" in table
    assert "| all | 12.0 | 5.8 | -6.2 |" in table
    ncu_summary.main([str(a), "--json", str(tmp_path / "s.json")])
    assert json.loads((tmp_path / "s.json").read_text())["files"][0]["total"] == pytest.approx(12.0)
    for bad, what in (([str(tmp_path / "none.csv")], "no such file"), ([str(tmp_path / "s.json")], "no CSV lines"),
                      ([str(a), "--metric", "sm__nothing"], "no rows of metric"), ([str(a), "--skip", "-1"], "--skip")):
        with pytest.raises(SystemExit, match=re.escape(what)):
            ncu_summary.main(bad)
