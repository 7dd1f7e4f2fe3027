"""LP over the whole split's teacher graph in the trainer: neighbour-aware batches and the bank.

The losses themselves are tested against NumPy in tests/test_graph_locality.py; here the trainer
builds the graph from the teacher, feeds the batches, keeps the bank in the checkpoint, resumes
bitwise after a preemption, and refuses the settings that cannot work.
"""

import jax
import numpy as np
import pytest

from lpe import checkpoint, data, experiment, metrics_io, models, state, teacher, train
from lpe import config as config_lib
from tests import faults

STEPS_PER_EPOCH = 8  # conftest's 512 training examples in batches of 64.


def _config(small_config, teacher_dir, lp_graph: str):
  config = small_config.copy_and_resolve_references()
  config.teacher.model, config.teacher.checkpoint = 'cnn_student', teacher_dir
  config.distill.lp_weight, config.distill.k, config.distill.lp_graph = 1.0, 4, lp_graph
  return config


def _params(workdir: str):
  return jax.tree.leaves(checkpoint.load_variables(workdir)[0])


@pytest.mark.parametrize('lp_graph', ['neighbours', 'bank'])
def test_graph_lp_trains_and_resumes_bitwise_after_a_preemption(
  small_config, teacher_dir, tmp_path, monkeypatch, lp_graph
):
  config = _config(small_config, teacher_dir, lp_graph)
  reference = str(tmp_path / 'reference')
  train.train_and_evaluate(config, reference)
  records = metrics_io.read_metrics(reference)
  assert all(r['train_lp'] > 0 and np.isfinite(r['train_loss']) for r in records)
  workdir = str(tmp_path / 'preempted')
  with monkeypatch.context() as patch:
    faults.sigterm_before_step(patch, 6, STEPS_PER_EPOCH)  # Not at a checkpoint (every 3).
    with pytest.raises(train.Preempted):
      train.train_and_evaluate(config, workdir)
  train.train_and_evaluate(config, workdir)
  for a, b in zip(_params(reference), _params(workdir), strict=True):
    np.testing.assert_array_equal(a, b)


def _restore(config, workdir):
  info = data.dataset_info(config.dataset)
  student = models.build(config.model, info.num_classes)
  fresh = state.create_train_state(student, config, jax.random.key(0), info.image_shape, 8)
  split = data.load_split(config.dataset, config.train_split, config.data_dir)
  fresh = fresh.replace(bank=np.zeros((len(split), 32), np.float32))
  manager = checkpoint.checkpoint_manager(workdir, max_to_keep=3, for_training=False)
  return checkpoint.restore_latest(manager, fresh), student, split


def test_the_bank_is_checkpointed_and_holds_the_students_embeddings(
  small_config, teacher_dir, tmp_path
):
  config = _config(small_config, teacher_dir, 'bank')
  config.num_epochs = 1
  workdir = str(tmp_path / 'bank')
  train.train_and_evaluate(config, workdir)
  restored, student, split = _restore(config, workdir)
  assert restored.bank.shape == (len(split), 32) and np.isfinite(restored.bank).all()
  initial = state.embeddings(
    student,
    state.variables_of(
      state.create_train_state(student, config, jax.random.key(0), (28, 28, 1), 8)
    ),
    split,
    info=data.dataset_info('fashion_mnist'),
    feature='embedding',
    batch_size=64,
  )
  # One epoch refreshed every row with a training step's embedding. The first step's rows were
  # written by the initial parameters, so they equal the initial pass's (to rounding); every
  # later step's parameters had moved.
  bank = np.asarray(restored.bank)
  first, *later = data.train_index_batches(len(split), batch_size=64, seed=0, epoch=0)
  np.testing.assert_allclose(bank[first], initial[first], rtol=1e-5, atol=1e-6)
  later = np.concatenate(later)
  changed = np.any(np.abs(bank[later] - initial[later]) > 1e-4, axis=1)
  assert np.all(changed | np.all(bank[later] == 0, axis=1))  # Or zeroed by the ReLU.
  assert set(checkpoint.load_variables(workdir)[0]) == {'params'}  # The bank is not exported.


def test_the_graph_is_the_teachers_knn_graph_over_the_training_split(fashion_data_dir, teacher_dir):
  split = data.load_split('fashion_mnist', 'train', fashion_data_dir)
  info = data.dataset_info('fashion_mnist')
  module = models.build('cnn_student', 10)
  variables, _ = checkpoint.load_variables(teacher_dir)
  distill = dict(config_lib.default_config().distill, lp_weight=1.0, graph_k=3)
  _, features = teacher.outputs_cache(
    module, variables, split, info=info, distill=distill, batch_size=100
  )
  graph = teacher.whole_split_graph(features['embedding'], distill)
  emb = features['embedding'].astype(np.float64)
  dist = ((emb[:, None] - emb[None]) ** 2).sum(-1)
  np.fill_diagonal(dist, np.inf)
  nearest = np.sort(dist, axis=1)[:, :3]
  got = np.take_along_axis(dist, graph.indices.astype(np.int64), axis=1)
  np.testing.assert_allclose(got, nearest, rtol=1e-4, atol=1e-4)
  assert graph.indices.shape == (len(split), 3)


@pytest.mark.parametrize(
  'changes, message',
  [
    (dict(lp_weight=0.0), 'lp_weight is 0'),
    (dict(lp_graph='global'), "lp_graph='global' is unknown"),
    (dict(graph_neighbours=2), '1 \\+ 2 must divide config.batch_size=64'),
    (dict(graph_neighbours=9), 'must be between 1 and the graph k'),
    (dict(lp_graph='bank', bank_momentum=1.0), 'bank_momentum must be in'),
  ],
)
def test_graph_settings_that_cannot_work_are_refused(small_config, changes, message):
  small_config.distill.update(dict(dict(lp_weight=1.0, lp_graph='neighbours'), **changes))
  with pytest.raises(ValueError, match=message):
    config_lib.validate(small_config, 1)


def test_graph_lp_with_per_process_data_is_refused(small_config, monkeypatch):
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  small_config.distributed.per_process_data = True
  small_config.distill.lp_weight, small_config.distill.lp_graph = 1.0, 'bank'
  with pytest.raises(ValueError, match='needs the whole training split on every process'):
    config_lib.validate(small_config, 2)


def test_the_bank_restore_needs_its_shape(small_config, teacher_dir, tmp_path):
  """A bank run's checkpoint restores only into a state with a bank of the same shape."""
  config = _config(small_config, teacher_dir, 'bank')
  config.num_epochs = 1
  workdir = str(tmp_path / 'bank')
  train.train_and_evaluate(config, workdir)
  info = data.dataset_info('fashion_mnist')
  student = models.build('cnn_student', 10)
  fresh = state.create_train_state(student, config, jax.random.key(0), info.image_shape, 8)
  manager = checkpoint.checkpoint_manager(workdir, max_to_keep=3, for_training=False)
  with pytest.raises(ValueError, match='bank'):
    checkpoint.restore_latest(manager, fresh.replace(bank=np.zeros((3, 32), np.float32)))
  # Evaluating the workdir's checkpoint reads the bank's shape from the checkpoint itself.
  evaluation = experiment.evaluate_saved(workdir)
  assert evaluation['accuracy'] == metrics_io.read_metrics(workdir)[-1]['test_accuracy']
