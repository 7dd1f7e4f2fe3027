"""The last partial batch of an epoch, trained on and masked (`config.last_batch='masked'`).

The step on a padded batch equals the step on its valid rows alone (a NumPy reference of its loss,
and lpe's plain step on those rows for the update and the BatchNorm statistics); a run whose
split is not a multiple of the batch trains every example once per epoch and resumes bitwise;
'drop' keeps its batches; what cannot be masked is refused before any work. The multi-device
check is tests/test_multidevice.py's `step_resnet_bn_masked`.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lpe import checkpoint, data, metrics_io, models, preflight, state, step, train
from lpe import feed as feed_lib
from tests import faults
from tests.conftest import TRAIN_SIZE

BATCH = 60  # conftest's 512 training examples: 8 full batches and one of 32.
STEPS = math.ceil(TRAIN_SIZE / BATCH)


def _leaves_equal(a, b) -> bool:
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _masked_config(small_config) -> ml_collections.ConfigDict:
  """conftest's `small_config` with a BatchNorm student (PyTorch's running variance, as the CRD
  recipe), batches of 60 and the last partial batch masked."""
  config = small_config
  config.model = 'cnn_teacher_bn'
  config.bn_unbiased_var = True
  config.batch_size = BATCH
  config.last_batch = 'masked'
  return config


def _log_softmax(z: np.ndarray) -> np.ndarray:
  z = z - z.max(axis=1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_masked_step_is_the_step_of_the_valid_rows_alone(small_config):
  """CRD's KD objective (0.1 CE + 0.9 KD at T = 4) on a BatchNorm student: the padded batch's
  loss is the NumPy loss of the valid rows' logits (BatchNorm over those rows only), and its
  update and BatchNorm statistics are those of the plain step on those rows."""
  config = _masked_config(small_config)
  config.distill.ce_weight, config.distill.kd_weight = 0.1, 0.9
  # SGD, as the recipe: Adam's first step scales each gradient entry to about lr, so a rounding
  # difference in a near-zero entry would flip its whole update.
  config.optimizer, config.learning_rate, config.weight_decay = 'sgd', 0.05, 5e-4
  config.teacher.model = 'cnn_student'
  info = data.dataset_info('fashion_mnist')
  teacher = models.build('cnn_student', 10)
  teacher_vars = teacher.init(jax.random.key(1), jnp.zeros((1, 28, 28, 1)))
  student = models.build('cnn_teacher_bn', 10, bn_unbiased_var=True)
  first = state.create_train_state(student, config, jax.random.key(0), info.image_shape, 10)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (16, 28, 28, 1)).astype(np.uint8)
  labels = rng.integers(0, 10, 16).astype(np.int32)
  valid = np.arange(16) < 5
  step_fn = jax.jit(step.make_train_step(config, student, teacher, info))

  new, metrics = step_fn(first, teacher_vars, images, labels, None, None, valid)

  x = data.preprocess(images[valid], info)
  (logits, _), _ = student.apply(state.variables_of(first), x, train=True, mutable=['batch_stats'])
  t_logits, _ = teacher.apply(teacher_vars, x, train=False)
  s_log = _log_softmax(np.float64(logits))
  ce = -s_log[np.arange(5), labels[valid]].mean()
  s_t, t_t = _log_softmax(np.float64(logits) / 4), _log_softmax(np.float64(t_logits) / 4)
  kd = (np.exp(t_t) * (t_t - s_t)).sum(axis=1).mean() * 16
  np.testing.assert_allclose(metrics['ce'], ce, rtol=1e-5)
  np.testing.assert_allclose(metrics['kd'], kd, rtol=1e-4)
  np.testing.assert_allclose(metrics['loss'], 0.1 * ce + 0.9 * kd, rtol=1e-5)
  assert float(metrics['accuracy']) == np.mean(np.argmax(logits, 1) == labels[valid])

  plain, _ = step_fn(first, teacher_vars, images[valid], labels[valid])
  new, plain, start = (jax.tree.leaves(state.variables_of(s)) for s in (new, plain, first))
  change = max(np.abs(a - b).max() for a, b in zip(new, start, strict=True))
  for got, want in zip(new, plain, strict=True):  # Parameters and BatchNorm statistics.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * change)
  # The padding rows' content changes nothing.
  images[~valid] = 255 - images[~valid]
  again, _ = step_fn(first, teacher_vars, images, labels, None, None, valid)
  for got, want in zip(jax.tree.leaves(state.variables_of(again)), new, strict=True):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * change)


def test_drop_keeps_its_batches_and_gives_no_mask(small_config, tmp_path):
  small_config.batch_size = BATCH
  run = train.prepare(small_config, str(tmp_path / 'run'))
  inputs = list(run.feed.epoch(0))
  assert run.feed.steps_per_epoch == len(inputs) == TRAIN_SIZE // BATCH
  assert all(len(i) == 5 and i[-1] is None for i in inputs)


def _small_config(data_dir: str) -> ml_collections.ConfigDict:
  """conftest's `small_config`, for module-scoped fixtures."""
  from configs import fashion_mnist_student  # noqa: PLC0415

  config = fashion_mnist_student.get_config()
  config.update(
    data_dir=data_dir,
    num_epochs=2,
    batch_size=64,
    eval_batch_size=50,
    log_every_steps=4,
    checkpoint_every_steps=3,
    learning_rate=3e-3,
  )
  return config


@pytest.fixture(scope='module')
def masked_reference(fashion_data_dir, tmp_path_factory):
  """An uninterrupted masked run of 2 epochs of 9 steps: its workdir, and the `(indices,
  valid)` of every step its feed gave, in order."""
  workdir = str(tmp_path_factory.mktemp('masked') / 'run')
  seen, ends, original = [], [], feed_lib.Feed._inputs

  def recording(self, index, at):
    inputs = original(self, index, at)
    seen.append((np.array(index), np.asarray(inputs[-1])))
    return inputs

  def hook(end, _):
    if end.epoch_end:
      ends.append(end.step)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(feed_lib.Feed, '_inputs', recording)
    train.train_and_evaluate(_masked_config(_small_config(fashion_data_dir)), workdir, hooks=[hook])
  assert ends == [STEPS, 2 * STEPS]
  return workdir, seen


def test_masked_run_trains_every_example_once_per_epoch(masked_reference):
  workdir, seen = masked_reference
  assert len(seen) == 2 * STEPS
  assert [int(valid.sum()) for _, valid in seen[:STEPS]] == [BATCH] * 8 + [TRAIN_SIZE - 8 * BATCH]
  for epoch in (0, 1):
    batches = seen[epoch * STEPS : (epoch + 1) * STEPS]
    assert all(index.shape == valid.shape == (BATCH,) for index, valid in batches)
    trained = np.concatenate([index[valid] for index, valid in batches])
    assert sorted(trained.tolist()) == list(range(TRAIN_SIZE))  # Each example exactly once.
  records = metrics_io.read_metrics(workdir)
  assert [r['step'] for r in records] == [STEPS, 2 * STEPS]
  assert all(math.isfinite(r['train_loss']) for r in records)


def test_masked_run_resumes_bitwise(masked_reference, small_config, tmp_path, monkeypatch):
  """Preempted before step 9 (the masked last batch of epoch 1), the resumed run equals the
  uninterrupted one bit for bit."""
  reference, _ = masked_reference
  workdir = str(tmp_path / 'run')
  config = _masked_config(small_config)
  with monkeypatch.context() as patch:
    faults.sigterm_before_step(patch, STEPS - 1, STEPS)
    with pytest.raises(train.Preempted):
      train.train_and_evaluate(config, workdir)
  assert max(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints'))) == STEPS - 1
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = ml_collections.ConfigDict(json.load(f))
  assert saved.last_batch == 'masked'
  train.train_and_evaluate(saved, workdir)
  params = [checkpoint.load_variables(w)[0] for w in (workdir, reference)]
  assert _leaves_equal(*params)
  got, want = (metrics_io.read_metrics(w) for w in (workdir, reference))
  assert [r['test_accuracy'] for r in got] == [r['test_accuracy'] for r in want]


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('distill.lp_graph', 'neighbours', "lp_graph='neighbours'"),
    ('input', 'stream', "config.input='stream'"),
    ('sync_batch_stats', False, 'sync_batch_stats=False'),
  ],
)
def test_what_cannot_be_masked_is_refused_before_any_work(small_config, field, value, message):
  config = _masked_config(small_config)
  config.distill.lp_weight = 0.1
  if field == 'sync_batch_stats':
    config.parallelism = 'pmap'
  if field == 'input':
    config.distill.lp_weight = 0.0
  *groups, leaf = field.split('.')
  target = config
  for group in groups:
    target = target[group]
  target[leaf] = value
  with pytest.raises(ValueError, match=message):
    preflight.validate(config, 1)


def test_a_student_whose_batch_statistics_cannot_be_masked_stops_before_any_work(
  small_config, tmp_path
):
  """An NNX student's BatchNorm is out of flax.linen's reach: the run stops, naming it."""
  config = _masked_config(small_config)
  config.model, config.bn_unbiased_var = 'nnx_cnn_teacher_bn', False
  with pytest.raises(ValueError, match="last_batch='masked'.*NNXModel keeps batch statistics"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')
