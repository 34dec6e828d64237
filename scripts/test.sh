#!/usr/bin/env bash
# Set up a virtual environment (.venv) with the test dependencies and run the whole test suite on the CPU.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# On Linux MLX comes from the `cpu` extra; on macOS plain `mlx` is a base dependency.
extras="test"
[ "$(uname -s)" = "Darwin" ] || extras="cpu,test"
python -m pip install -q -e ".[${extras}]"
# The Qwen2 BPE ranks for the Qwen-Image golden-slice test ship inside PyPI's dashscope package;
# only that data file is read, so its (many) runtime dependencies are not installed.
python -m pip install -q --no-deps "dashscope==2.0.2"
python -m pytest -q -n 2 "$@"
