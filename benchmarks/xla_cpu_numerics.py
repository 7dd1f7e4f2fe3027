"""Do the XLA:CPU settings of lpe.xla_cpu change what is trained? A few steps, compared bit by bit.

  .venv/bin/python benchmarks/xla_cpu_numerics.py   # ~3 minutes on 2 cores

Each setting runs in its own process (XLA reads its flags once): `--steps` training steps
(`lpe.step.make_train_step`, SGD with momentum, the student's convs as the trainer builds them)
of a few students from the same initial state and batches, and saves the parameters. Printed for
every model: whether a second process under the same setting gives bitwise the same parameters
(what an exact resume on one machine needs), and the largest difference between settings.
"""

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = ('cnn_student', 'fitnet1', 'resnet8')
SETTINGS = {  # label: environment
  'ynn': {'LPE_XLA_CPU': 'ynn'},
  'ynn (again)': {'LPE_XLA_CPU': 'ynn'},
  'ynn_dots': {'LPE_XLA_CPU': 'ynn_dots'},
  'ynn, max ISA AVX2': {'LPE_XLA_CPU': 'ynn', 'XLA_FLAGS': '--xla_cpu_max_isa=AVX2'},
}


def worker(out: str, steps: int) -> None:
  sys.path.insert(0, str(ROOT))
  from lpe import xla_cpu

  xla_cpu.configure()
  import jax
  import jax.numpy as jnp
  import numpy as np

  from lpe import config as lpe_config
  from lpe import data, models, state, step, train

  arrays = {}
  for name in MODELS:
    info = data.dataset_info('cifar100' if name.startswith('resnet') else 'fashion_mnist')
    config = lpe_config.default_config()
    config.optimizer, config.learning_rate, config.weight_decay = 'sgd', 0.05, 5e-4
    student = models.build(name, info.num_classes, conv_impl=train.conv_impl(config))
    run_state = state.create_train_state(student, config, jax.random.key(0), info.image_shape, 100)
    fn = jax.jit(step.make_train_step(config, student, None, info))
    rng = np.random.default_rng(0)
    for _ in range(steps):
      images = jnp.asarray(rng.integers(0, 255, (64, *info.image_shape)).astype(np.uint8))
      labels = jnp.asarray(rng.integers(0, info.num_classes, 64).astype(np.int32))
      run_state, _ = fn(run_state, None, images, labels)
    leaves = jax.tree.leaves((run_state.params, run_state.batch_stats))
    arrays[name] = np.concatenate([np.ravel(a) for a in leaves])
  np.savez(out, **arrays)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args.worker, args.steps)
    return
  import numpy as np

  folder = tempfile.mkdtemp(prefix='xla_cpu_numerics_')
  results = {}
  for i, (label, env) in enumerate(SETTINGS.items()):
    environ = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'LPE_XLA_CPU')}
    path = f'{folder}/{i}.npz'
    cmd = [sys.executable, __file__, '--worker', path, '--steps', str(args.steps)]
    subprocess.run(cmd, env=dict(environ, **env), check=True)
    with np.load(path) as f:
      results[label] = {k: f[k] for k in f.files}
  reference = results['ynn']
  print(f'Parameters and BatchNorm statistics after {args.steps} SGD steps, against `ynn`:\n')
  print('| setting | ' + ' | '.join(MODELS) + ' |')
  print('|---|' + '---|' * len(MODELS))
  for label, arrays in results.items():
    if label == 'ynn':
      continue
    cells = []
    for name in MODELS:
      diff = float(np.max(np.abs(arrays[name] - reference[name])))
      cells.append(
        'bitwise equal'
        if np.array_equal(arrays[name], reference[name])
        else f'max abs diff {diff:.1e}'
      )
    print(f'| {label} | ' + ' | '.join(cells) + ' |')
  shutil.rmtree(folder)


if __name__ == '__main__':
  main()
