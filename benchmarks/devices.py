"""Steps/s of the LP distillation train step on 1 and on 8 fake CPU devices, side by side.

  .venv/bin/python benchmarks/devices.py [--steps=20] [--batch=128]

Each device count runs in its own process (XLA fixes the device count at import). Fake CPU
devices share the same cores, so this measures the overhead of the data-parallel paths (sharding,
collectives, the LP loss's all-gather), not a speed-up: on real GPUs or TPUs each device has its
own compute. Nothing is asserted; it prints a table.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(mode: str, steps: int, batch: int) -> dict:
  """Runs in the child process: times `steps` LP steps of the Fashion-MNIST pair."""

  import jax
  import jax.numpy as jnp
  import numpy as np

  from lpe import config as lpe_config
  from lpe import data, models, parallel, state, step

  info = data.dataset_info('fashion_mnist')
  config = lpe_config.default_config()
  config.parallelism = mode
  config.distill.lp_weight = 0.1
  teacher = models.build('cnn_teacher', 10)
  teacher_vars = teacher.init(jax.random.key(1), jnp.zeros((1, 28, 28, 1)))
  student = models.build('cnn_student', 10)
  place = parallel.Placement(mode)
  train_state = state.create_train_state(student, config, jax.random.key(0), info.image_shape, 100)
  train_state = place.state(jax.device_put(train_state, place.replicated))
  teacher_vars = place.state(jax.device_put(teacher_vars, place.replicated))
  step_fn = place.compile(step.make_train_step(config, student, teacher, info))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (batch, 28, 28, 1)).astype(np.uint8)
  labels = rng.integers(0, 10, batch).astype(np.int32)
  for _ in range(3):  # Compile and warm up.
    train_state, metrics = step_fn(train_state, teacher_vars, *place.batch((images, labels)))
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    train_state, metrics = step_fn(train_state, teacher_vars, *place.batch((images, labels)))
  jax.block_until_ready(metrics)
  return {'steps_per_s': steps / (time.perf_counter() - start), 'devices': jax.device_count()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--child', default='')
  args = parser.parse_args()
  if args.child:
    print('RESULT ' + json.dumps(measure(args.child, args.steps, args.batch)))
    return
  rows = []
  for devices in (1, 8):
    for mode in ('jit', 'pmap'):
      env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
      env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
      out = subprocess.run(
        [
          sys.executable,
          __file__,
          f'--child={mode}',
          f'--steps={args.steps}',
          f'--batch={args.batch}',
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
      ).stdout
      result = json.loads(out.split('RESULT ')[-1])
      rows.append((devices, mode, result['steps_per_s']))
  base = {mode: sps for devices, mode, sps in rows if devices == 1}
  print(f'LP train step, Fashion-MNIST pair, global batch {args.batch}, {args.steps} timed steps')
  print('| devices | mode | steps/s | relative to 1 device |')
  print('|---:|---|---:|---:|')
  for devices, mode, sps in rows:
    print(f'| {devices} | {mode} | {sps:.2f} | {sps / base[mode]:.2f} |')


if __name__ == '__main__':
  main()
