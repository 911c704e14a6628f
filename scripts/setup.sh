#!/usr/bin/env bash
# Create a fresh virtual environment at $1 (default .venv) and install the project into it, with the
# extras named in $2 (comma-separated, from pyproject.toml: serve, train, export, dev, ...).
# torch==2.13.0 goes in first: on CPU machines that pin is a local CPU build, while an open
# `torch` requirement on its own would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
extras="${2:-}"
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q -e ".${extras:+[$extras]}"
