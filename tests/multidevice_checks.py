"""Multi-device checks, run by tests/test_multidevice.py in a process with 8 fake CPU devices.

XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before jax is imported, so these
checks run in their own process and print one JSON object for the test to assert on.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lpe import config as lpe_config
from lpe import data, evaluate, models, parallel, state, step


def _setup(model_name: str, image_shape, n: int, teacher_name: str | None = None):
  info = data.DatasetInfo(10, image_shape, (0.5,) * image_shape[-1], (0.25,) * image_shape[-1])
  teacher_name = teacher_name or ('cnn_student' if image_shape[0] == 28 else 'resnet8')
  teacher = models.build(teacher_name, 10)
  teacher_vars = teacher.init(jax.random.key(1), jnp.zeros((1, *image_shape)))
  config = lpe_config.default_config()
  config.model = model_name
  config.optimizer, config.learning_rate, config.weight_decay = 'sgd', 0.1, 5e-4
  config.distill.lp_weight, config.distill.k, config.distill.kd_weight = 1.0, 3, 0.5
  # Every term except FitNet (its regressor's batch normalisation is per device under pmap).
  d = config.distill
  d.at_weight, d.sp_weight, d.rkd_weight, d.pkt_weight = 10.0, 100.0, 1.0, 1000.0
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (n, *image_shape)).astype(np.uint8)
  labels = rng.integers(0, 10, n).astype(np.int32)
  return info, teacher, teacher_vars, config, images, labels


def _max_diff(a, b) -> float:
  return max(
    float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def step_equivalence(
  model_name: str,
  image_shape,
  augment: str,
  teacher_name: str | None = None,
  valid_rows: int | None = None,
) -> dict:
  """One train step with LP, KD, AT, SP, RKD and PKT: 1 device vs pmap vs sharded jit on 8.

  With `valid_rows`, the batch is a padded one (`config.last_batch='masked'`) whose first
  `valid_rows` rows are valid, so the devices hold different numbers of them (some none); the
  student is built with lpe's AffineBatchNorm (`bn_unbiased_var`, as the CRD recipe), and
  `sub_batch` compares the 1-device step with the plain step on those rows alone."""
  n = 32
  info, teacher, teacher_vars, config, images, labels = _setup(
    model_name, image_shape, n, teacher_name
  )
  config.augment = augment
  masked, kwargs = (), {}
  if valid_rows is not None:
    masked, kwargs = (None, None, np.arange(n) < valid_rows), {'bn_unbiased_var': True}
  results, one = {}, jax.devices()[0]
  for mode in ('single', 'pmap', 'jit', 'sub_batch'):
    if mode == 'sub_batch' and valid_rows is None:
      continue
    axis = parallel.AXIS if mode == 'pmap' else None
    student = models.build(model_name, 10, bn_axis_name=axis, **kwargs)
    start = state.create_train_state(student, config, jax.random.key(0), image_shape, 10)
    step_fn = step.make_train_step(config, student, teacher, info)
    if mode == 'single':
      new_state, metrics = jax.jit(step_fn)(
        *jax.device_put((start, teacher_vars, images, labels, *masked), one)
      )
    elif mode == 'sub_batch':
      rows = (images[:valid_rows], labels[:valid_rows])
      new_state, metrics = jax.jit(step_fn)(*jax.device_put((start, teacher_vars, *rows), one))
    else:
      place = parallel.Placement(mode)
      compiled = place.compile(step_fn)
      canonical = jax.device_put(start, place.replicated)
      tv = place.state(jax.device_put(teacher_vars, place.replicated))
      inputs = place.batch((images, labels))
      if masked:
        inputs = (*inputs, None, None, place.batch(masked[-1]))
      new_state, metrics = compiled(place.state(canonical), tv, *inputs)
      new_state, metrics = place.canonical(new_state), place.metrics(metrics)
    results[mode] = (jax.device_get(state.variables_of(new_state)), jax.device_get(metrics))
  base_vars, base_metrics = results['single']
  out = {}
  for mode in ('pmap', 'jit', 'sub_batch'):
    if mode not in results:
      continue
    variables, metrics = results[mode]
    out[mode] = {
      'max_param_diff': _max_diff(base_vars, variables),
      'max_metric_diff': _max_diff(
        {k: base_metrics[k] for k in sorted(base_metrics)},
        {k: metrics[k] for k in sorted(base_metrics)},
      ),
      'loss': float(metrics['loss']),
      # Each metric's difference relative to its own size (at least 1).
      'max_metric_rel_diff': max(
        abs(float(metrics[k]) - float(base_metrics[k])) / max(abs(float(base_metrics[k])), 1.0)
        for k in base_metrics
      ),
    }
  out['single_loss'] = float(base_metrics['loss'])
  out['param_change'] = _max_diff(
    base_vars,
    state.variables_of(
      state.create_train_state(
        models.build(model_name, 10), config, jax.random.key(0), image_shape, 10
      )
    ),
  )
  return out


def eval_counts() -> dict:
  """Evaluation over 1, 3 and 8 devices counts every example exactly once."""
  info = data.DatasetInfo(10, (28, 28, 1), (0.5,), (0.25,))
  model = models.build('cnn_student', 10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  rng = np.random.default_rng(0)
  split = data.Split(
    rng.integers(0, 255, (101, 28, 28, 1)).astype(np.uint8),
    rng.integers(0, 10, 101).astype(np.int32),
  )
  out = {}
  for count in (1, 3, 8):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:count]), (parallel.AXIS,))
    result = evaluate.evaluate(
      model, variables, split, info=info, batch_size=24, sharding=parallel.batch_sharded(mesh)
    )
    out[str(count)] = {'num_examples': result['num_examples'], 'accuracy': result['accuracy']}
  return out


if __name__ == '__main__':
  assert jax.device_count() == 8, jax.devices()
  check = sys.argv[1]
  if check == 'step_cnn':
    result = step_equivalence('cnn_student', (28, 28, 1), 'none')
  elif check == 'step_resnet_bn':
    result = step_equivalence('resnet8', (32, 32, 3), 'cifar')
  elif check == 'step_resnet_bn_masked':  # 11 valid rows of 32: 4, 4, 3, then 0 per device.
    result = step_equivalence('resnet8', (32, 32, 3), 'none', valid_rows=11)
  elif check == 'step_nnx_bn':  # An NNX student with BatchNorm and an NNX teacher.
    result = step_equivalence('nnx_cnn_teacher_bn', (28, 28, 1), 'none', 'nnx_cnn_student')
  elif check == 'eval':
    result = eval_counts()
  else:
    raise SystemExit(f'unknown check {check}')
  print('RESULT ' + json.dumps(result))
