#!/usr/bin/env bash
# Set up a virtual environment (.venv) and generate an image with the offline demo model
# (a tiny random-weight FLUX-architecture model built locally: no download, the picture is noise).
# Usage: bash scripts/demo.sh [extra `flashdiff generate` args...]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
extras=""
[ "$(uname -s)" = "Darwin" ] || extras="[cpu]"
python -m pip install -q -e ".${extras}"
flashdiff generate --model demo --prompt "a red fox in snow" --seed 7 -o demo.png "$@"
