#!/usr/bin/env bash
# Every benchmark in quick mode on CPU, one after another (under 10 minutes on 2 cores when the
# machine is otherwise idle; docs/performance.md lists what each prints). Nothing is asserted.
#   bash benchmarks/quick.sh                       (after scripts/setup.sh)
#   TORCH_PYTHON=/path/to/python-with-torch bash benchmarks/quick.sh   (adds PyTorch's ResNet-20 and conv_parts.py)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
.venv/bin/python benchmarks/step_overhead.py --quick --repeats=5
.venv/bin/python benchmarks/input.py --quick --repeats=3 --calls=10
.venv/bin/python benchmarks/loss_scaling.py --quick
.venv/bin/python benchmarks/devices.py --steps=10
.venv/bin/python benchmarks/import_time.py --rounds=2
.venv/bin/python benchmarks/cpu_conv.py --quick ${TORCH_PYTHON:+--torch-python "$TORCH_PYTHON"}
if [ -n "${TORCH_PYTHON:-}" ]; then
  .venv/bin/python benchmarks/conv_parts.py --torch-python "$TORCH_PYTHON"
fi
echo "benchmarks/quick.sh: $((SECONDS - start)) s in all"
