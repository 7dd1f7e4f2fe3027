"""LP over the whole split's teacher graph in the trainer: neighbour-aware batches and the bank.

The losses themselves are tested against NumPy in tests/test_graph_locality.py; here the trainer
builds the graph from the teacher, feeds the batches, keeps the bank in the checkpoint, resumes
bitwise after a preemption, and refuses the settings that cannot work.
"""

import jax
import numpy as np
import pytest

from lpe import (
  checkpoint,
  data,
  experiment,
  losses,
  metrics_io,
  models,
  objectives,
  preflight,
  state,
  teacher,
  train,
)
from lpe import config as config_lib
from lpe import sampling as lpe_sampling
from lpe import step as step_lib
from tests import faults

STEPS_PER_EPOCH = 8  # conftest's 512 training examples in batches of 64.


# The repaired forms (issue 21): neighbours added on top of the ordinary batch, a scale-invariant
# loss, and a bank whose weight warms up.
REPAIRED = {
  'neighbours': dict(neighbour_batches='added', student_scale='l2'),
  'bank': dict(student_scale='mean', lp_warmup_epochs=0.5, bank_momentum=0.5, bank_fill='train'),
}


def _config(small_config, teacher_dir, lp_graph: str, repaired: bool = False):
  config = small_config.copy_and_resolve_references()
  config.teacher.model, config.teacher.checkpoint = 'cnn_student', teacher_dir
  config.distill.lp_weight, config.distill.k, config.distill.lp_graph = 1.0, 4, lp_graph
  if repaired:
    config.distill.update(REPAIRED[lp_graph])
  return config


def _params(workdir: str):
  return jax.tree.leaves(checkpoint.load_variables(workdir)[0])


@pytest.mark.parametrize(
  'lp_graph, repaired',
  [('neighbours', False), ('bank', False), ('neighbours', True), ('bank', True)],
)
def test_graph_lp_trains_and_resumes_bitwise_after_a_preemption(
  small_config, teacher_dir, tmp_path, monkeypatch, lp_graph, repaired
):
  config = _config(small_config, teacher_dir, lp_graph, repaired)
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
    (dict(lp_graph='bank', lp_weight=0.0, neighbour_batches='added'), 'lp_weight is 0'),
    (dict(neighbour_batches='on_top'), "neighbour_batches='on_top' is unknown"),
    (dict(student_scale='l1'), "student_scale='l1' is unknown"),
    (dict(lp_graph='global'), "lp_graph='global' is unknown"),
    (dict(graph_neighbours=2), '1 \\+ 2 must divide config.batch_size=64'),
    (dict(graph_neighbours=9), 'must be between 1 and the graph k'),
    (dict(lp_graph='bank', bank_momentum=1.0), 'bank_momentum must be in'),
  ],
)
def test_graph_settings_that_cannot_work_are_refused(small_config, changes, message):
  small_config.distill.update(dict(dict(lp_weight=1.0, lp_graph='neighbours'), **changes))
  with pytest.raises(ValueError, match=message):
    preflight.validate(small_config, 1)


def test_graph_lp_with_per_process_data_is_refused(small_config, monkeypatch):
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  small_config.distributed.per_process_data = True
  small_config.distill.lp_weight, small_config.distill.lp_graph = 1.0, 'bank'
  with pytest.raises(ValueError, match='needs the whole training split on every process'):
    preflight.validate(small_config, 2)


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


def test_added_neighbours_keep_the_ordinary_batches_as_anchors_and_the_control_trains(
  small_config, teacher_dir, tmp_path
):
  """With neighbours added on top, an epoch's anchors are exactly the ordinary batches (CE sees
  every image once, as the student alone does); LP off, the sampler runs alone (the control)."""
  split = data.load_split('fashion_mnist', 'train', small_config.data_dir)
  graph = np.random.default_rng(0).integers(0, len(split), size=(len(split), 4))
  kwargs = dict(batch_size=64, neighbours_per_anchor=2, seed=3, epoch=1, layout='added')
  batches = list(lpe_sampling.neighbour_aware_index_batches(len(split), graph, **kwargs))
  ordinary = list(data.train_index_batches(len(split), batch_size=64, seed=3, epoch=1))
  assert len(batches) == len(ordinary) == STEPS_PER_EPOCH
  for batch, plain in zip(batches, ordinary, strict=True):
    assert batch.shape == (64 * 3,)
    np.testing.assert_array_equal(batch[::3], plain)
    groups = batch.reshape(64, 3)
    assert all(set(g[1:]) <= set(graph[g[0]]) for g in groups)
  config = _config(small_config, teacher_dir, 'neighbours', repaired=True)
  config.distill.lp_weight, config.num_epochs = 0.0, 1
  preflight.validate(config, 1)
  result = train.train_and_evaluate(config, str(tmp_path / 'control'))
  assert result['objective'] == 'CE + neighbour batches'
  record = metrics_io.read_metrics(str(tmp_path / 'control'))[-1]
  assert 'train_lp' not in record and record['step'] == STEPS_PER_EPOCH


def test_ce_and_per_example_terms_average_over_the_anchors_only():
  distill = dict(
    config_lib.default_config().distill,
    lp_graph='neighbours',
    neighbour_batches='added',
    graph_neighbours=2,
    kd_weight=1.0,
  )
  anchors = step_lib.anchor_rows(distill, 9)
  np.testing.assert_array_equal(anchors, [1, 0, 0, 1, 0, 0, 1, 0, 0])
  values = np.arange(9.0)
  assert float(objectives.row_mean(values, anchors)) == (0 + 3 + 6) / 3
  assert step_lib.anchor_rows(dict(distill, neighbour_batches='within'), 9) is None
  logits = np.random.default_rng(0).normal(size=(9, 10)).astype(np.float32)
  kd = objectives.distillation_terms(distill, logits, {}, logits[::-1], {}, {}, anchors=anchors)
  expected = losses.kd_loss(logits, logits[::-1], temperature=4.0)[::3].mean()
  np.testing.assert_allclose(kd['kd'], expected, rtol=1e-6)


def test_lp_warmup_ramps_the_weight_linearly():
  distill = dict(config_lib.default_config().distill, lp_weight=2.0, lp_warmup_steps=4)
  terms = {'lp': np.float32(1.0)}
  totals = [float(objectives.total_loss(distill, 0.0, terms, step=s)) for s in range(6)]
  np.testing.assert_allclose(totals, [0.0, 0.5, 1.0, 1.5, 2.0, 2.0])
  assert float(objectives.total_loss(dict(distill, lp_warmup_steps=0), 0.0, terms, step=0)) == 2


def test_the_step_factory_turns_warmup_epochs_into_steps(small_config):
  small_config.distill.lp_weight, small_config.distill.lp_warmup_epochs = 1.0, 1.5
  student, info = models.build('cnn_student', 10), data.dataset_info('fashion_mnist')
  step_fn = step_lib.make_train_step(small_config, student, None, info, steps_per_epoch=8)
  assert step_fn.keywords['distill']['lp_warmup_steps'] == 12
  with pytest.raises(ValueError, match='lp_warmup_epochs needs the steps per epoch'):
    step_lib.make_train_step(small_config, student, None, info)


def test_a_train_mode_bank_fill_uses_batch_statistics():
  """For a BatchNorm student the fill can use each batch's statistics, as the training step
  does; the initial running statistics (mean 0, variance 1) would give other embeddings."""
  split = data.Split(
    np.random.default_rng(0).integers(0, 255, (10, 28, 28, 1)).astype(np.uint8),
    np.zeros(10, np.int32),
  )
  info = data.dataset_info('fashion_mnist')
  model = models.build('cnn_teacher_bn', 10)
  variables = model.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))
  kwargs = dict(info=info, feature='embedding', batch_size=4)
  filled = state.embeddings(model, variables, split, batch_statistics=True, **kwargs)
  inference = state.embeddings(model, variables, split, **kwargs)
  assert filled.shape == inference.shape == (10, 256) and not np.allclose(filled, inference)
  # Batches of 4: the last one is rows 8, 9 completed by rows 0, 1.
  x = data.preprocess(split.images[[8, 9, 0, 1]], info)
  (_, features), _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(filled[8:], features['embedding'][:2], rtol=1e-4, atol=1e-5)
  small = models.build('cnn_student', 10)  # No BatchNorm: the same values either way.
  small_vars = small.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))
  np.testing.assert_array_equal(
    state.embeddings(small, small_vars, split, batch_statistics=True, **kwargs),
    state.embeddings(small, small_vars, split, **kwargs),
  )
