#!/usr/bin/env bash
# Sets up lpe (scripts/setup.sh), checks formatting and lint, and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff format --check .
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
