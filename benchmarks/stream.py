"""The streaming input against the LP train step: images per second of each, on this machine.

  .venv/bin/python benchmarks/stream.py           # 28x28 and 224x224 JPEGs (~10 minutes on 2 cores)
  .venv/bin/python benchmarks/stream.py --quick   # 28x28 only (~2 minutes)

For a folder of JPEGs written here (`folder:` dataset; random content, whose decode costs as much
as a photo's of the same size):
- stream: what `config.input='stream'` does per step (`lpe.stream.StepBatches` through
  `lpe.stream.iterate`): read, decode and, for 224x224, random-resized-crop and flip each image,
  with 0 (this process), 1 and 2 worker processes; timed after the first batch (worker start-up);
- the LP train step alone (CE + LP) on a batch already on the devices: cnn_teacher -> cnn_student
  at 28x28, imagenet_resnet34 -> imagenet_resnet18 at 224x224.
The last column is how many steps' worth of images the input makes in one step's time (above 1,
the input keeps up). Nothing is asserted.
"""

import argparse
import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from lpe import config as lpe_config  # noqa: E402
from lpe import data, models, sources, state, step, stream, train  # noqa: E402

CASES = {
  '28x28': dict(size=28, channels=1, augment='none', batch=128, count=2048, pair='cnn'),
  '224x224': dict(size=224, channels=3, augment='imagenet', batch=32, count=512, pair='imagenet'),
}
PAIRS = {
  'cnn': ('cnn_teacher', 'cnn_student'),
  'imagenet': ('imagenet_resnet34', 'imagenet_resnet18'),
}


def write_jpegs(root: str, *, size: int, channels: int, count: int, classes: int = 10) -> str:
  """`root/train/<class>/<i>.jpg`: `count` random JPEGs of `size x size`; returns the dataset."""
  rng = np.random.default_rng(0)
  for i in range(count):
    folder = os.path.join(root, 'train', f'class_{i % classes}')
    os.makedirs(folder, exist_ok=True)
    pixels = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
    PIL.Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(
      os.path.join(folder, f'{i}.jpg'), quality=90
    )
  return f'folder:{root}'


def stream_rate(dataset: str, case: dict, workers: int, batches: int) -> float:
  """Images per second of the streamed batches, after the first one."""
  source = sources.open_split(dataset, 'train')
  shape = (case['size'], case['size'], case['channels'])
  batch_fn = stream.StepBatches(
    source,
    seed=0,
    steps_per_epoch=len(source) // case['batch'],
    index_batch=case['batch'],
    rows=slice(0, case['batch']),
    first_row=0,
    shard=range(len(source)),
    augment=case['augment'],
    shape=shape,
  )
  iterator = stream.iterate(batch_fn, range(batches + 1), workers)
  next(iterator)  # Workers started and the first batch made.
  start = time.perf_counter()
  for _ in range(batches):
    images, _ = next(iterator)
  seconds = time.perf_counter() - start
  assert images.shape == (case['batch'], *shape)
  del images  # Its shared memory is freed before the workers stop.
  iterator.close()
  return case['batch'] * batches / seconds


def lp_step_rate(case: dict, steps: int) -> float:
  """Images per second of the LP train step alone (CE + 0.1 LP), after compiling."""
  teacher_name, student_name = PAIRS[case['pair']]
  shape = (case['size'], case['size'], case['channels'])
  info = data.DatasetInfo(10, shape, (0.5,) * shape[-1], (0.25,) * shape[-1])
  config = lpe_config.default_config()
  config.distill.lp_weight = 0.1
  student = models.build(student_name, 10, conv_impl=train.conv_impl(config))
  teacher = models.build(teacher_name, 10)
  train_state = state.create_train_state(student, config, jax.random.key(0), shape, 100)
  t_vars = teacher.init(jax.random.key(1), jnp.zeros((1, *shape)), train=False)
  step_fn = jax.jit(step.make_train_step(config, student, teacher, info))
  images = jnp.asarray(
    np.random.default_rng(0).integers(0, 256, (case['batch'], *shape)), jnp.uint8
  )
  labels = jnp.arange(case['batch']) % 10
  jax.block_until_ready(step_fn(train_state, t_vars, images, labels))  # Compile.
  start = time.perf_counter()
  for _ in range(steps):
    out = step_fn(train_state, t_vars, images, labels)
  jax.block_until_ready(out)
  return case['batch'] * steps / (time.perf_counter() - start)


def _rate(value: float) -> str:
  return f'{value:,.0f}' if value >= 10 else f'{value:.2f}'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='28x28 only.')
  parser.add_argument('--batches', type=int, default=8, help='Streamed batches timed per row.')
  parser.add_argument('--steps', type=int, default=3, help='LP steps timed per row.')
  args = parser.parse_args()
  print(f'{os.cpu_count()} CPU cores; {jax.devices()[0].device_kind}; images per second.\n')
  print('| images | what | images/s | input / LP step |')
  print('|---|---|---:|---:|')
  for name, case in CASES.items():
    if args.quick and name != '28x28':
      continue
    lp = lp_step_rate(case, args.steps)
    with tempfile.TemporaryDirectory() as root:
      dataset = write_jpegs(root, size=case['size'], channels=case['channels'], count=case['count'])
      for workers in (0, 1, 2):
        rate = stream_rate(dataset, case, workers, args.batches)
        what = f'stream, {workers} worker{"s" if workers != 1 else ""} ({case["augment"]})'
        print(f'| {name} JPEG | {what} | {_rate(rate)} | {rate / lp:.1f} |', flush=True)
    student = PAIRS[case['pair']][1]
    print(f'| {name} | LP step, batch {case["batch"]} ({student}) | {_rate(lp)} | 1 |', flush=True)


if __name__ == '__main__':
  main()
