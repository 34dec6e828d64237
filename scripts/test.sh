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
python -m pytest -q -n 2 "$@"
