#!/usr/bin/env bash
# The performance benchmarks on one GPU, in under 5 minutes: prints the card's name, the step
# overhead of distillation (both pairs, with the CRD-recipe projection), the input paths against
# the step, and the loss scaling.
#   bash benchmarks/gpu.sh            (after scripts/setup.sh and a CUDA jax: see README)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
.venv/bin/python -c 'import jax; print("JAX devices:", jax.devices())'
.venv/bin/python benchmarks/step_overhead.py --repeats=20
.venv/bin/python benchmarks/input.py --repeats=10 --calls=50
.venv/bin/python benchmarks/loss_scaling.py --quick
