"""Tests of the trainer: the distillation step, a whole run, resume, teacher loading, evaluation."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpe import augment, checkpoint, data, experiment, models, preflight, state, step, train
from tests.conftest import TEST_SIZE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaves_equal(a, b) -> bool:
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _teacher_and_batch(n=16):
  info = data.dataset_info('fashion_mnist')
  teacher = models.build('cnn_student', 10)  # A small teacher keeps the test fast.
  teacher_vars = teacher.init(jax.random.key(1), jnp.zeros((1, 28, 28, 1)))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (n, 28, 28, 1)).astype(np.uint8)
  labels = rng.integers(0, 10, n).astype(np.int32)
  return info, teacher, teacher_vars, images, labels


def _step(config, teacher, teacher_vars, info, images, labels):
  student = models.build(config.model, 10)
  train_state = state.create_train_state(student, config, jax.random.key(0), info.image_shape, 10)
  step_fn = jax.jit(step.make_train_step(config, student, teacher, info))
  return train_state, step_fn(train_state, teacher_vars, images, labels)


def test_train_step_distills_only_the_student(small_config):
  config = small_config
  config.distill.lp_weight = 0.5
  config.distill.kd_weight = 0.25
  info, teacher, teacher_vars, images, labels = _teacher_and_batch()
  before = jax.tree.map(np.array, teacher_vars)
  state, (new_state, metrics) = _step(config, teacher, teacher_vars, info, images, labels)
  assert set(metrics) >= {'loss', 'ce', 'lp', 'kd', 'accuracy', 'grad_norm', 'param_norm'}
  expected = metrics['ce'] + 0.5 * metrics['lp'] + 0.25 * metrics['kd']
  np.testing.assert_allclose(metrics['loss'], expected, rtol=1e-6)
  assert metrics['lp'] > 0 and metrics['kd'] > 0 and np.isfinite(metrics['grad_norm'])
  assert int(new_state.step) == 1
  assert not _leaves_equal(state.params, new_state.params)
  assert _leaves_equal(before, teacher_vars)  # The teacher is an input, never updated.


def test_lp_term_changes_the_gradient(small_config):
  info, teacher, teacher_vars, images, labels = _teacher_and_batch()
  small_config.distill.lp_weight = 0.0
  _, (plain, _) = _step(small_config, teacher, teacher_vars, info, images, labels)
  small_config.distill.lp_weight = 1.0
  _, (with_lp, m) = _step(small_config, teacher, teacher_vars, info, images, labels)
  assert 'lp' in m
  assert not _leaves_equal(plain.params, with_lp.params)


def test_cifar_augmentation_keeps_shape_and_content():
  images = jnp.arange(2 * 32 * 32 * 3, dtype=jnp.int32).reshape(2, 32, 32, 3).astype(jnp.uint8)
  out = augment.augment_cifar(jax.random.key(0), images)
  assert out.shape == images.shape and out.dtype == images.dtype
  assert not np.array_equal(out, augment.augment_cifar(jax.random.key(1), images))


def test_full_run_writes_outputs_and_learns(small_config, tmp_path):
  workdir = str(tmp_path / 'student')
  seen = []

  def every_epoch_end(end, state):  # A hook of the caller's own, with its own trigger.
    if end.epoch_end:
      seen.append((end.step, end.epoch, int(state.step)))

  result = train.train_and_evaluate(small_config, workdir, hooks=[every_epoch_end])
  assert seen == [(8, 0, 8), (16, 1, 16)]  # 512 examples in batches of 64, 2 epochs.
  for name in ('config.json', 'metrics.jsonl', 'model.msgpack', 'model.json', 'result.json'):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert [r['epoch'] for r in records] == [1, 2]
  assert {'train_ce', 'train_loss', 'test_accuracy', 'epoch_time_s'} <= set(records[0])
  assert result['params'] == 26698
  assert result['test_accuracy'] > 0.5  # Ten classes: chance is 0.1.
  # Running the finished run again returns its result without training.
  assert train.train_and_evaluate(small_config, workdir) == result


def test_distillation_run_loads_the_exported_teacher(small_config, tmp_path):
  teacher_dir = str(tmp_path / 'teacher')
  small_config.num_epochs = 1
  train.train_and_evaluate(small_config, teacher_dir)
  lp = small_config.copy_and_resolve_references()
  lp.teacher.model = 'cnn_student'
  lp.teacher.checkpoint = teacher_dir
  lp.distill.lp_weight = 0.1
  result = train.train_and_evaluate(lp, str(tmp_path / 'lp'))
  with open(tmp_path / 'lp' / 'metrics.jsonl') as f:
    assert json.loads(f.readline())['train_lp'] > 0
  assert result['teacher']['model'] == 'cnn_student'
  # The saved student state holds no teacher variables.
  saved, _ = checkpoint.load_variables(str(tmp_path / 'lp'))
  assert set(saved) == {'params'}


def test_teacher_mismatch_and_corruption_are_clear_errors(small_config, tmp_path):
  teacher_dir = str(tmp_path / 'teacher')
  small_config.num_epochs = 1
  train.train_and_evaluate(small_config, teacher_dir)
  lp = small_config.copy_and_resolve_references()
  lp.distill.lp_weight = 0.1
  lp.teacher.checkpoint = teacher_dir
  lp.teacher.model = 'cnn_teacher'
  with pytest.raises(ValueError, match="holds a 'cnn_student' model"):
    train.train_and_evaluate(lp, str(tmp_path / 'lp'))
  lp.teacher.checkpoint = ''
  with pytest.raises(ValueError, match='teacher.checkpoint'):
    train.train_and_evaluate(lp, str(tmp_path / 'lp'))
  lp.teacher.checkpoint = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    checkpoint.load_variables(lp.teacher.checkpoint)
  path = os.path.join(teacher_dir, 'model.msgpack')
  with open(path, 'r+b') as f:
    f.seek(100)
    f.write(b'\x00\x01\x02')
  with pytest.raises(ValueError, match='corrupt'):
    checkpoint.load_variables(path)


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('batch_size', 60, 'does not divide'),
    ('num_epochs', 0, 'positive integer'),
    ('model', 'resnet9000', 'Unknown model'),
    ('dataset', 'imagenet', 'is not a TFDS dataset'),
    ('optimizer', 'lion', 'optimizer'),
  ],
)
def test_bad_config_values_stop_before_work(small_config, tmp_path, field, value, message):
  small_config[field] = value
  devices = 8 if field == 'batch_size' else 1
  with pytest.raises(ValueError, match=message):
    preflight.validate(small_config, devices)
    state.make_optimizer(small_config, 10)
  assert not os.path.exists(tmp_path / 'run')


def test_negative_ce_weight_is_refused(small_config):
  small_config.distill.ce_weight = -0.1
  with pytest.raises(ValueError, match='config.distill.ce_weight must be >= 0, got -0.1'):
    preflight.validate(small_config, 1)
  small_config.distill.ce_weight = 0.0
  with pytest.raises(ValueError, match='ce_weight=0 with no distillation weight leaves no loss'):
    preflight.validate(small_config, 1)


def test_k_not_below_batch_is_a_clear_error(small_config):
  small_config.distill.lp_weight = 0.1
  small_config.distill.k = small_config.batch_size
  with pytest.raises(ValueError, match='smaller than the per-device batch'):
    preflight.validate(small_config, 1)


def test_evaluate_saved_counts_each_test_example_once(small_config, tmp_path):
  workdir = str(tmp_path / 'run')
  small_config.num_epochs = 1
  result = train.train_and_evaluate(small_config, workdir)
  from_workdir = experiment.evaluate_and_save(workdir)
  from_file = experiment.evaluate_and_save(
    os.path.join(workdir, 'model.msgpack'), data_dir=small_config.data_dir
  )
  assert from_workdir['num_examples'] == from_file['num_examples'] == TEST_SIZE
  assert from_workdir['accuracy'] == from_file['accuracy'] == result['test_accuracy']
  assert from_workdir['split'] == from_file['split'] == 'test'
  assert os.path.exists(os.path.join(workdir, 'evaluation.json'))
  with pytest.raises(ValueError, match='no checkpoint at step 999'):
    experiment.evaluate_saved(workdir, step=999)


def test_evaluate_saved_takes_the_split_and_batch_from_the_run_or_the_caller(
  small_config, tmp_path
):
  """A workdir is evaluated on its config's test_split with its eval_batch_size; a caller may
  name another split (a slice included) and batch, for a workdir or a model file alike."""
  workdir = str(tmp_path / 'run')
  small_config.num_epochs = 1
  small_config.steps_per_epoch_limit = 2
  small_config.test_split = 'test[:70]'
  train.train_and_evaluate(small_config, workdir)
  evaluation = experiment.evaluate_saved(workdir)
  assert (evaluation['split'], evaluation['num_examples']) == ('test[:70]', 70)
  model_file = os.path.join(workdir, 'model.msgpack')
  for path in (workdir, model_file):
    for batch_size in (None, 7):
      got = experiment.evaluate_saved(
        path, data_dir=small_config.data_dir, split='train[:96]', batch_size=batch_size
      )
      assert (got['split'], got['num_examples']) == ('train[:96]', 96)
      assert got['accuracy'] == experiment.evaluate_saved(workdir, split='train[:96]')['accuracy']


def _launch(args, env_extra=None, **kwargs):
  env = dict(os.environ, PYTHONUNBUFFERED='1', **(env_extra or {}))
  cmd = [sys.executable, os.path.join(REPO, 'launch.py'), *args]
  return subprocess.Popen(
    cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
  )


def test_killed_comparison_resumes_and_matches_uninterrupted_run(fashion_data_dir, tmp_path):
  """The main job, killed with SIGKILL while a student trains, resumes where it stopped.

  Also the smoke test of the whole entry point: launch.py, the comparison config and the table.
  """
  overrides = [
    '--config=configs/fashion_mnist_compare.py',
    '--config.teacher_checkpoint=',
    '--config.runs.teacher.model=cnn_student',
    '--config.runs.lp.teacher.model=cnn_student',
  ]
  for run in ('teacher', 'student', 'lp'):
    overrides += [
      f'--config.runs.{run}.data_dir={fashion_data_dir}',
      f'--config.runs.{run}.num_epochs=2',
      f'--config.runs.{run}.batch_size=32',
      f'--config.runs.{run}.eval_batch_size=50',
      f'--config.runs.{run}.checkpoint_every_steps=2',
      f'--config.runs.{run}.log_every_steps=2',
    ]
  killed = str(tmp_path / 'killed')
  proc = _launch([*overrides, f'--workdir={killed}'])
  lines, deadline = [], time.time() + 240
  for line in proc.stdout:  # Kill once the LP student is past a checkpoint.
    lines.append(line)
    if line.startswith('[lp] epoch 1/2 step 6/'):
      proc.send_signal(signal.SIGKILL)
      break
    # A guard against a hung child, not a timing assertion.
    seconds_left = deadline - time.time()
    assert seconds_left > 0, ''.join(lines)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, ''.join(lines)
  assert not os.path.exists(os.path.join(killed, 'lp', 'result.json'))

  resumed = _launch([*overrides, f'--workdir={killed}'])
  out, _ = resumed.communicate(timeout=240)
  assert resumed.returncode == 0, out
  assert 'Resuming' in out and '[teacher] epoch' not in out and '[student] epoch' not in out
  assert '| lp | cnn_student | 26,698 |' in out, out

  straight = _launch([*overrides, f'--workdir={tmp_path / "straight"}'])
  out, _ = straight.communicate(timeout=300)
  assert straight.returncode == 0, out
  a, _ = checkpoint.load_variables(os.path.join(killed, 'lp'))
  b, _ = checkpoint.load_variables(str(tmp_path / 'straight' / 'lp'))
  assert _leaves_equal(a, b)  # Bitwise equal on CPU: resume restores state and data position.


def test_launch_evaluate_mode(small_config, tmp_path):
  workdir = str(tmp_path / 'run')
  small_config.num_epochs = 1
  result = train.train_and_evaluate(small_config, workdir)
  proc = _launch(['--mode=evaluate', f'--workdir={workdir}'])
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert f'"accuracy": {result["test_accuracy"]}' in out
  proc = _launch(['--mode=evaluate', f'--checkpoint={tmp_path / "missing"}'])
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0 and 'does not exist' in out
