"""lpe's training step replays RepDistiller's own training loop (golden files, tests/golden/).

tests/repdistiller_golden.py (run by hand against RepDistiller at b84f547) recorded RepDistiller's
`train_distill` / `train_vanilla` for `STEPS` SGD steps from seeded weights on fixed batches, in
float32 and float64. Here lpe's `make_train_step`, with the CRD recipe's model settings
(`bn_unbiased_var`, RepDistiller's normalisation constants), replays the same steps in float32 from
the same weights, and must agree with the float64 reference:

- every step's loss, and each weighted term, within `LOSS_RTOL` of the loss;
- after the last step, the student's parameters and BatchNorm statistics (the full 1-D arrays,
  the kernels' random projections) within `UPDATE_RTOL` of their change over the run:
  `||lpe - f64|| <= UPDATE_RTOL * ||f64 - initial||` over each collection.

The tolerances are stated from the measurement below (docs/reproducing.md): RepDistiller's own
float32 run differs from its float64 run by the float32 rounding of the step; lpe's float32 differs
from the float64 run by about as much.
"""

import numpy as np
import pytest
from flax import traverse_util

from lpe import sources
from lpe import step as step_lib
from lpe.config import default_config
from lpe.models import build, from_torch
from lpe.state import TrainState, make_optimizer
from tests import repdistiller_golden as golden

# Measured (4 steps, batch 8; docs/reproducing.md): lpe's float32 against RepDistiller's float64,
# loss 1.3e-5 (PKT), params 1.1e-4, BatchNorm statistics 4.2e-7; RepDistiller's own float32
# against its float64, loss 2.2e-5, params 2.0e-3 (resnet20), statistics 1.0e-5.
LOSS_RTOL = 1e-4
UPDATE_RTOL = {'params': 5e-3, 'batch_stats': 1e-4}
# Terms lpe reports under another name than the golden file's.
_TERMS = {'loss': 'loss', 'ce': 'ce', 'kd': 'kd', 'pkt_feature': 'pkt'}


def _config(run: golden.Run):
  config = default_config()
  config.optimizer = 'sgd'
  config.learning_rate = golden.LEARNING_RATE
  config.momentum = golden.MOMENTUM
  config.weight_decay = golden.WEIGHT_DECAY
  config.lr_schedule = 'constant'
  config.augment = 'none'
  config.distill.ce_weight = run.gamma
  if run.distill == 'kd':
    config.distill.kd_weight = run.alpha
    config.distill.kd_temperature = 4.0
  if run.distill == 'pkt':
    config.distill.pkt_weight = run.beta
  config.teacher.model = run.teacher or ''
  return config


def replay(run: golden.Run, *, bn_unbiased_var: bool = True):
  """lpe's float32 steps over the golden batches: `(metrics per step, final variables summary)`."""
  import jax  # noqa: PLC0415

  config = _config(run)
  info = sources.DatasetInfo(golden.NUM_CLASSES, (32, 32, 3), golden.MEAN, golden.STD)
  student = build(run.student, golden.NUM_CLASSES, bn_unbiased_var=bn_unbiased_var)
  teacher, t_vars = None, None
  if run.teacher:
    teacher = build(run.teacher, golden.NUM_CLASSES)
    t_vars = from_torch(run.teacher, golden.initial_state_dict(run.teacher, run.seed + 100))
  s_vars = from_torch(run.student, golden.initial_state_dict(run.student, run.seed))
  state = TrainState.create(
    apply_fn=student.apply,
    params=s_vars['params'],
    batch_stats=s_vars['batch_stats'],
    tx=make_optimizer(config, 1),
  )
  train_step = jax.jit(step_lib.make_train_step(config, student, teacher, info))
  images, labels = golden.batches(run.seed)
  metrics = []
  for i in range(golden.STEPS):
    state, m = train_step(state, t_vars, images[i], labels[i])
    metrics.append(jax.device_get(m))
  final = {'params': state.params, 'batch_stats': state.batch_stats}
  flat = traverse_util.flatten_dict(jax.device_get(final), sep='/')
  return metrics, {path: golden.projections(path, np.asarray(v)) for path, v in flat.items()}


def update_errors(name: str, summary: dict[str, np.ndarray], precision: str = 'lpe'):
  """`{collection: ||value - golden|| / ||golden - initial||}` over all stored variables of a
  collection (`params`, `batch_stats`), `value` being lpe's `summary` (`precision='lpe'`) or
  RepDistiller's own float32 run (`'f32'`), and golden its float64 run."""
  run = golden.RUNS[name]
  stored = np.load(f'{golden.GOLDEN_DIR}/{name}.npz')
  initial = golden.summary(run.student, golden.initial_state_dict(run.student, run.seed))
  squares = {}
  for path, start in initial.items():
    reference = stored[f'f64/{path}']
    value = summary[path] if precision == 'lpe' else stored[f'{precision}/{path}']
    error, update = squares.setdefault(path.split('/')[0], [0.0, 0.0])
    squares[path.split('/')[0]] = [
      error + np.sum((value - reference) ** 2),
      update + np.sum((reference - start) ** 2),
    ]
  return {collection: float(np.sqrt(e / u)) for collection, (e, u) in squares.items()}


def loss_errors(name: str, metrics: list[dict] | None = None) -> dict[str, float]:
  """The largest difference over the steps of the loss and of each weighted term, relative to the
  loss, between lpe's `metrics` (or, with None, RepDistiller's own float32 run) and the golden
  float64 run."""
  stored = np.load(f'{golden.GOLDEN_DIR}/{name}.npz')
  run = golden.RUNS[name]
  # RepDistiller computes KD even at weight 0 (alpha = 0 with PKT); lpe computes active terms.
  weights = {'loss': 1.0, 'ce': run.gamma, 'kd': run.alpha, 'pkt_feature': run.beta}
  loss = stored['f64/loss']
  errors = {}
  for term, weight in weights.items():
    if f'f64/{term}' not in stored or not weight:
      continue
    if metrics is None:
      values = stored[f'f32/{term}']
    else:
      values = np.array([m[_TERMS.get(term, term)] for m in metrics])
    errors[term] = float(np.max(weight * np.abs(values - stored[f'f64/{term}']) / np.abs(loss)))
  return errors


@pytest.mark.parametrize('name', sorted(golden.RUNS))
def test_lpe_replays_repdistillers_trajectory(name):
  metrics, summary = replay(golden.RUNS[name])
  losses, updates = loss_errors(name, metrics), update_errors(name, summary)
  print(f'{name}: loss {losses}; update {updates}')
  assert max(losses.values()) <= LOSS_RTOL, losses
  for collection, error in updates.items():
    assert error <= UPDATE_RTOL[collection], (collection, error)


@pytest.mark.parametrize('name', sorted(golden.RUNS))
def test_repdistillers_own_float32_run_is_within_the_tolerances(name):
  # The tolerances are at the scale of float32 rounding: RepDistiller's own float32 run meets
  # them, and differs from its float64 run (so the golden files hold both, as they should).
  losses, updates = loss_errors(name), update_errors(name, {}, 'f32')
  assert 0 < max(losses.values()) <= LOSS_RTOL, losses
  for collection, error in updates.items():
    assert 0 < error <= UPDATE_RTOL[collection], (collection, error)


def test_biased_running_variance_misses_the_golden_statistics():
  # Without the CRD recipe's unbiased running variance the BatchNorm statistics leave the
  # tolerance (measured: 1.2e-3 of their change): the test tells the two conventions apart.
  name = 'ce_resnet20'
  _, summary = replay(golden.RUNS[name], bn_unbiased_var=False)
  assert update_errors(name, summary)['batch_stats'] > 5 * UPDATE_RTOL['batch_stats']
