"""A model's cold `init`, as at the start of every run: the zoo's flat draws against shaped ones.

  .venv/bin/python benchmarks/init_time.py                 # ~6 min on 2 cores
  .venv/bin/python benchmarks/init_time.py --models=resnet56,MobileNetV2 --rounds=3

Each measurement is a fresh process with no persistent compilation cache (as a user's run starts):
it builds one zoo model and times `model.init` on one example, with the zoo's initializers as they
are (`lpe.models.initializers`: every draw flat at a power-of-two size, cut to shape) and with the
draws of each shape compiled for that shape, as jax's own initializers do (the same values: the
last column says whether the variables' digests agree). Rounds alternate the two, so that the
load of a shared machine falls on both. Reported: the median seconds per init and the ratio; the
header gives the processor's vector ISA and the load average. Nothing is asserted.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = ('cnn_student', 'fitnet1', 'resnet20', 'resnet56', 'wrn_16_2', 'ShuffleV2', 'MobileNetV2')

_WORKER = r"""
import hashlib, json, sys, time
import lpe.xla_cpu  # The run's XLA:CPU setting, before jax starts.
import jax, jax.numpy as jnp, numpy as np
from lpe import data, models
from lpe.models import initializers
name, shaped = sys.argv[1], sys.argv[2] == 'shaped'
if shaped:  # Each draw compiled for its own shape, as jax's initializers draw.
  initializers._flat_draw = lambda sample, key, shape, dtype: sample(key, tuple(shape), dtype)
dataset = 'fashion_mnist' if name in ('cnn_student', 'fitnet1') else 'cifar100'
info = data.dataset_info(dataset)
model = models.build(name, info.num_classes)
x = jnp.zeros((1, *info.image_shape))
key = jax.random.key(0)
jax.block_until_ready(jax.random.split(key))  # The backend started.
start = time.perf_counter()
variables = jax.block_until_ready(model.init(key, x, train=False))
seconds = time.perf_counter() - start
digest = hashlib.sha256(b''.join(np.asarray(v).tobytes() for v in jax.tree.leaves(variables)))
print(json.dumps({'seconds': seconds, 'digest': digest.hexdigest()[:12]}))
"""


def _measure(name: str, mode: str) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_COMPILATION_CACHE')}
  env['PYTHONPATH'] = str(ROOT)
  out = subprocess.run(
    [sys.executable, '-c', _WORKER, name, mode],
    env=env,
    capture_output=True,
    text=True,
    check=True,
    cwd=ROOT,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default=','.join(MODELS))
  parser.add_argument('--rounds', type=int, default=2)
  args = parser.parse_args()
  sys.path.insert(0, str(ROOT))
  from lpe import xla_cpu

  print(f'# ISA {xla_cpu.cpu_isa()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}')
  print('| model | flat draws s | shaped draws s | shaped / flat | same values |')
  print('|---|---:|---:|---:|---|')
  for name in args.models.split(','):
    times = {'flat': [], 'shaped': []}
    digests = set()
    for _ in range(args.rounds):
      for mode in times:
        result = _measure(name, mode)
        times[mode].append(result['seconds'])
        digests.add(result['digest'])
    flat, shaped = (statistics.median(times[m]) for m in ('flat', 'shaped'))
    same = 'yes' if len(digests) == 1 else 'NO'
    print(f'| {name} | {flat:.2f} | {shaped:.2f} | {shaped / flat:.2f} | {same} |', flush=True)
  print(f'# load at the end {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  main()
