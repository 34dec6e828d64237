"""flashdiff.kernels._jit: kernel texts handed to MLX by #include (CPU; the H200 run is in benchmarks/README.md)."""

import re
from pathlib import Path

import mlx.core as mx
import pytest

from cuda_emulation import expand_includes
from flashdiff.kernels import _attention_sm90, _jit

KERNELS = Path(__file__).resolve().parents[1] / "flashdiff" / "kernels"
INCLUDE = re.compile(r'#include "([^"]+)"')
expand = expand_includes  # what the preprocessor reads: each #include line replaced by the file's text


def test_included_texts_are_the_kernel_texts(tmp_path):
    source, header = _attention_sm90._SOURCE, _attention_sm90._HEADER
    inc_source, inc_header = _jit.included("flashdiff_attention_sm90", ["q", "k", "v"], source, header, tmp_path)
    assert len(inc_source) < 300 and len(inc_header) < 300  # what MLX copies and hashes per call
    assert inc_source.startswith('#include "') and inc_header.startswith('#include "')
    assert expand(inc_source) == source + "\n" and expand(inc_header) == header + "\n"
    paths = [Path(m) for m in INCLUDE.findall(inc_source + inc_header)]
    assert all(p.is_absolute() and p.parent == tmp_path.resolve() for p in paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no temporary left


def test_included_keeps_the_names_mlx_looks_for(tmp_path):
    source = "  out[0] = x[x_shape[0] - 1] + w[0]; // w_strides unused here\n"
    inc_source, _ = _jit.included("k", ["x", "w"], source, "", tmp_path)
    # MLX passes x_shape / w_strides parameters when the source text it sees names them
    assert "x_shape" in inc_source and "w_strides" in inc_source and "x_ndim" not in inc_source
    assert expand(inc_source).startswith(source)


def test_included_files_are_named_by_content_and_repaired(tmp_path):
    a, _ = _jit.included("k", [], "  int a = 1;\n", "", tmp_path)
    b, _ = _jit.included("k", [], "  int a = 2;\n", "", tmp_path)
    assert a != b  # a changed text is a new file: no stale kernel text is ever included
    path = Path(INCLUDE.search(a).group(1))
    path.write_text("  int a = 666;\n")  # damaged or edited by hand
    again, _ = _jit.included("k", [], "  int a = 1;\n", "", tmp_path)
    assert again == a and path.read_text() == "  int a = 1;\n"


def test_included_falls_back_to_inline_text_when_the_cache_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    source, header = _jit.included("k", [], "  int a = 1;\n", "// header\n", blocker / "cuda")
    assert (source, header) == ("  int a = 1;\n", "// header\n")
    quoted = tmp_path / 'say "cheese"'
    assert _jit.included("k", [], "  int a = 1;\n", "", quoted) == ("  int a = 1;\n", "")
    assert not quoted.exists()


def test_cache_dir_and_mode_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHDIFF_KERNEL_CACHE", str(tmp_path / "kc"))
    assert _jit.cache_dir() == tmp_path / "kc"
    monkeypatch.delenv("FLASHDIFF_KERNEL_CACHE")
    monkeypatch.setenv("FLASHDIFF_HOME", str(tmp_path / "home"))
    assert _jit.cache_dir() == tmp_path / "home" / "cuda-sources"
    monkeypatch.setenv("FLASHDIFF_KERNEL_SOURCE", "inline")
    assert not _jit.include_mode()
    monkeypatch.setenv("FLASHDIFF_KERNEL_SOURCE", "files")
    with pytest.raises(ValueError, match="FLASHDIFF_KERNEL_SOURCE must be 'include' or 'inline'"):
        _jit.include_mode()
    monkeypatch.setenv("FLASHDIFF_KERNEL_SOURCE", "include")
    assert _jit.include_mode() == mx.cuda.is_available()  # inline off CUDA: the emulation reads the texts


def test_cuda_kernel_hands_mlx_the_include_lines(monkeypatch, tmp_path):
    seen = {}

    def fake_cuda_kernel(**kwargs):
        seen.update(kwargs)
        return "kernel"
    monkeypatch.setattr(mx.fast, "cuda_kernel", fake_cuda_kernel)
    monkeypatch.setattr(_jit, "include_mode", lambda: True)
    monkeypatch.setenv("FLASHDIFF_KERNEL_CACHE", str(tmp_path))
    assert _jit.cuda_kernel(name="k", input_names=["x"], output_names=["y"], source="  y[0] = x[0];\n",
                            header="// h\n", shared_memory=4096) == "kernel"
    assert seen["name"] == "k" and seen["input_names"] == ["x"] and seen["output_names"] == ["y"]
    assert seen["shared_memory"] == 4096
    assert expand(seen["source"]) == "  y[0] = x[0];\n\n" and expand(seen["header"]) == "// h\n\n"
    monkeypatch.setattr(_jit, "include_mode", lambda: False)
    _jit.cuda_kernel(name="k", input_names=["x"], output_names=["y"], source="  y[0] = x[0];\n")
    assert seen["source"] == "  y[0] = x[0];\n"


def test_every_cuda_kernel_of_the_package_is_made_through_jit():
    direct = [f"{p.name}:{i + 1}" for p in sorted(KERNELS.glob("*.py")) if p.name != "_jit.py"
              for i, line in enumerate(p.read_text().split("\n")) if "mx.fast.cuda_kernel(" in line]
    assert direct == []
