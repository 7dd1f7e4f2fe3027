#!/usr/bin/env bash
# Sets up lpe (scripts/setup.sh) and torch for the conversion tests, checks formatting and lint,
# and runs the whole test suite, one worker per core.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# PyTorch, for the tests that convert PyTorch teachers (an optional test extra; the CPU build).
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  echo "Installing torch==2.13.0 (CPU) into .venv for the PyTorch-conversion tests..."
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/ruff format --check .
.venv/bin/ruff check .
# One worker per core (pytest-xdist); `-m quick` picks the inner-loop subset.
.venv/bin/python -m pytest -q -n auto --dist loadgroup --durations=25 "$@"
