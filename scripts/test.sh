#!/usr/bin/env bash
# Build a fresh virtual environment (.venv-test) from the project's own files and run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh .venv-test dev  # `dev`: everything the suite imports
.venv-test/bin/python -m pytest -q "$@"
