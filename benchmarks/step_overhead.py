"""What distillation adds to a student step: (c) / ((a) + (b)), measured side by side.

  .venv/bin/python benchmarks/step_overhead.py --quick     # Fashion-MNIST pair, ~2 minutes
  .venv/bin/python benchmarks/step_overhead.py             # + resnet32x4 -> resnet8x4 (slow on CPU)
  .venv/bin/python benchmarks/step_overhead.py --pairs=cifar100 --batches=64 --repeats=3

(a) the student-only train step (CE), (b) the teacher forward pass alone, (c) the full LP
distillation step (teacher forward + student step + LP loss), (c') the LP step with the teacher
in bfloat16, and (c'') the LP step reading the teacher's outputs from a cache
(`config.teacher.cache_outputs`: no teacher forward pass in the step). The variants are
interleaved and repeated, and the median of each is reported, so a busy machine slows all of them
alike. Nothing is asserted.
"""

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from lpe import config as lpe_config  # noqa: E402
from lpe import data, models, state, step, train  # noqa: E402

# CRD's CIFAR-100 recipe: 240 epochs of ceil(50,000 / 64) = 782 steps.
CRD_STEPS = 240 * 782
PAIRS = {
  'fashion_mnist': ('cnn_teacher', 'cnn_student', data.dataset_info('fashion_mnist')),
  'cifar100': ('resnet32x4', 'resnet8x4', data.dataset_info('cifar100')),
}


def _timer(fn, *args):
  def run():
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start

  return run


def variants(pair: str, batch: int) -> dict:
  """The jitted functions and inputs to time for one teacher/student pair and batch size."""
  teacher_name, student_name, info = PAIRS[pair]
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 255, (batch, *info.image_shape)).astype(np.uint8))
  labels = jnp.asarray(rng.integers(0, info.num_classes, batch).astype(np.int32))
  config = lpe_config.default_config()
  config.optimizer, config.learning_rate = 'sgd', 0.05
  # The student's convs as the trainer builds them (config.conv_impl='auto').
  student = models.build(student_name, info.num_classes, conv_impl=train.conv_impl(config))
  train_state = state.create_train_state(student, config, jax.random.key(0), info.image_shape, 100)
  teachers = {
    dtype: models.build(teacher_name, info.num_classes, dtype=dtype)
    for dtype in (jnp.float32, jnp.bfloat16)
  }
  t_vars = teachers[jnp.float32].init(
    jax.random.key(1), jnp.zeros((1, *info.image_shape)), train=False
  )

  def compiled_step(teacher, lp_weight):
    run_config = config.copy_and_resolve_references()
    run_config.distill.lp_weight = lp_weight
    return jax.jit(step.make_train_step(run_config, student, teacher, info))

  forward = jax.jit(
    lambda v, x: teachers[jnp.float32].apply(v, data.preprocess(x, info), train=False)
  )
  # The teacher's outputs as `config.teacher.cache_outputs` gives them to the step.
  cached = jax.block_until_ready(forward(t_vars, images))
  # The steps do not donate their state, so the same inputs serve every repeat.
  return {
    'a_student': _timer(compiled_step(None, 0.0), train_state, None, images, labels),
    'b_teacher_forward': _timer(forward, t_vars, images),
    'c_lp_step': _timer(
      compiled_step(teachers[jnp.float32], 0.1), train_state, t_vars, images, labels
    ),
    'c_lp_step_bf16_teacher': _timer(
      compiled_step(teachers[jnp.bfloat16], 0.1), train_state, t_vars, images, labels
    ),
    'c_lp_step_cached_teacher': _timer(
      compiled_step(teachers[jnp.float32], 0.1), train_state, None, images, labels, cached
    ),
  }


def measure(pair: str, batch: int, repeats: int) -> dict[str, float]:
  timers = variants(pair, batch)
  for run in timers.values():  # Compile and warm up.
    run()
    run()
  times = {name: [] for name in timers}
  for _ in range(repeats):
    for name, run in timers.items():
      times[name].append(run())
  return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='Fashion-MNIST pair only.')
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--batches', default='64,128,256', help='Comma-separated batch sizes.')
  parser.add_argument(
    '--pairs', default='', help=f'Comma-separated subset of {", ".join(PAIRS)} (overrides --quick).'
  )
  args = parser.parse_args()
  print(
    f'Device: {jax.devices()[0].device_kind} ({jax.default_backend()}), medians of '
    f'{args.repeats} interleaved repeats, milliseconds per step.\n'
  )
  print(
    '| pair | batch | (a) student step | (b) teacher fwd | (c) LP step | (c) / ((a)+(b)) '
    '| (c) bf16 teacher | bf16 / (c) | (c) cached teacher | cached / (c) |'
  )
  print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
  if args.pairs:
    pairs = args.pairs.split(',')
  else:
    pairs = ['fashion_mnist'] if args.quick else list(PAIRS)
  batches = [int(b) for b in args.batches.split(',')]
  plan = [(pair, b) for pair in pairs for b in batches]
  for pair, batch in plan:
    t = measure(pair, batch, args.repeats)
    keys = ('a_student', 'b_teacher_forward', 'c_lp_step', 'c_lp_step_bf16_teacher')
    a, b, c, c16, cc = (1e3 * t[k] for k in (*keys, 'c_lp_step_cached_teacher'))
    name = '{} -> {}'.format(*PAIRS[pair][:2])
    print(
      f'| {name} | {batch} | {a:.1f} | {b:.1f} | {c:.1f} | {c / (a + b):.3f} | {c16:.1f} '
      f'| {c16 / c:.2f} | {cc:.1f} | {cc / c:.2f} |',
      flush=True,
    )
    if pair == 'cifar100' and batch == 64:
      hours = c / 1e3 * CRD_STEPS / 3600
      print(
        f'\nProjected CRD recipe for resnet32x4 -> resnet8x4 (240 epochs x 782 steps of batch 64 '
        f'= {CRD_STEPS:,} LP steps; input and evaluation not counted): {hours:.1f} hours.\n'
      )


if __name__ == '__main__':
  main()
