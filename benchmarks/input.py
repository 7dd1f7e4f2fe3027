"""The training input path against the train step: images/s of each, measured side by side.

  .venv/bin/python benchmarks/input.py --quick   # Fashion-MNIST shapes, ~1 minute
  .venv/bin/python benchmarks/input.py           # + CIFAR shapes (input only; no CIFAR step)

For a split of the dataset's shape (random uint8 images; the cost does not depend on content):
- host input: what `config.input='host'` does per step: index the NumPy split with the batch's
  indices and place the batch on the devices;
- device input: what `config.input='device'` does: place the indices, gather the batch from the
  split held on the devices;
- the LP train step alone (Fashion-MNIST pair, cnn_teacher -> cnn_student) on a batch already on
  the devices, and the step fed by each input path (what the training loop runs).
Rows are interleaved and repeated; medians are reported. Nothing is asserted.
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
from lpe import data, models, parallel, state, step, train  # noqa: E402

SPLITS = {'fashion_mnist': 60_000, 'cifar100': 50_000}


def _split(name: str) -> data.Split:
  info = data.dataset_info(name)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (SPLITS[name], *info.image_shape), dtype=np.uint8)
  return data.Split(images, rng.integers(0, info.num_classes, SPLITS[name]).astype(np.int32))


def _lp_step(info: data.DatasetInfo, batch: int):
  config = lpe_config.default_config()
  student = models.build('cnn_student', info.num_classes, conv_impl=train.conv_impl(config))
  teacher = models.build('cnn_teacher', info.num_classes)
  config.distill.lp_weight = 0.1
  train_state = state.create_train_state(student, config, jax.random.key(0), info.image_shape, 100)
  t_vars = teacher.init(jax.random.key(1), jnp.zeros((1, *info.image_shape)), train=False)
  step_fn = jax.jit(step.make_train_step(config, student, teacher, info))
  return lambda images, labels: step_fn(train_state, t_vars, images, labels)


def timers(name: str, batch: int, with_step: bool) -> dict:
  split = _split(name)
  place = parallel.Placement('jit')
  resident = place.resident({'images': split.images, 'labels': split.labels})
  take = place.compile_take()
  indices = list(data.train_index_batches(len(split), batch_size=batch, seed=0, epoch=0))
  counter = iter(range(10**9))

  def next_index():
    return indices[next(counter) % len(indices)]

  def host():
    index = next_index()
    return place.batch((split.images[index], split.labels[index]))

  def device():
    gathered = take(resident, place.batch(next_index()))
    return gathered['images'], gathered['labels']

  result = {'host input': host, 'device input': device}
  if with_step:
    step = _lp_step(data.dataset_info(name), batch)
    ready = jax.block_until_ready(host())
    result['LP step alone'] = lambda: step(*ready)
    result['host input + step'] = lambda: step(*host())
    result['device input + step'] = lambda: step(*device())
  return result


def measure(fns: dict, repeats: int, calls: int) -> dict[str, float]:
  """Median seconds per call of each fn (`calls` back to back, `repeats` times, interleaved)."""
  for fn in fns.values():
    jax.block_until_ready(fn())  # Compile and warm up.
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for key, fn in fns.items():
      start = time.perf_counter()
      out = None
      for _ in range(calls):
        out = fn()
      jax.block_until_ready(out)
      times[key].append((time.perf_counter() - start) / calls)
  return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='Fashion-MNIST shapes only.')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--calls', type=int, default=20, help='Calls per timing.')
  args = parser.parse_args()
  print(
    f'Device: {jax.devices()[0].device_kind} ({jax.default_backend()}); medians of '
    f'{args.repeats} interleaved repeats of {args.calls} calls; images per second.\n'
  )
  print('| data | batch | what | images/s | step alone time / this time |')
  print('|---|---:|---|---:|---:|')
  plan = [('fashion_mnist', b, True) for b in (128, 256)]
  if not args.quick:
    plan += [('cifar100', b, False) for b in (128, 256)]
  for name, batch, with_step in plan:
    t = measure(timers(name, batch, with_step), args.repeats, args.calls)
    alone = t.get('LP step alone')
    for key, seconds in t.items():
      relative = f'{alone / seconds:.2f}' if alone else '-'
      print(f'| {name} | {batch} | {key} | {batch / seconds:,.0f} | {relative} |', flush=True)


if __name__ == '__main__':
  main()
