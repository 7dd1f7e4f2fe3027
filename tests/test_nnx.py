"""NNX models in the trainer: the twins compute what the linen models compute, and an NNX model
trains, resumes, exports, evaluates and teaches through the same code (`lpe.models.nnx_adapter`)."""

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

from lpe import checkpoint, models, train
from lpe.models import nnx_adapter
from tests.conftest import TEST_SIZE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(n=8, seed=0):
  return jax.random.uniform(jax.random.key(seed), (n, 28, 28, 1))


def _assert_trees_equal(a, b, atol=0.0):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


@pytest.mark.parametrize('conv_impl', ['xla', 'cpu'])
@pytest.mark.parametrize('train_mode', [False, True])
def test_nnx_cnn_student_gives_cnn_students_logits_and_features(conv_impl, train_mode):
  x = _images()
  linen = models.build('cnn_student', 10, conv_impl=conv_impl)
  twin = models.build('nnx_cnn_student', 10, conv_impl=conv_impl)
  assert isinstance(twin, nnx_adapter.NNXModel)
  variables = linen.init(jax.random.key(0), x)
  # The same parameter tree (names and shapes), so the linen weights copy across unchanged.
  shapes = jax.tree.map(jnp.shape, twin.init(jax.random.key(1), x))
  assert shapes == jax.tree.map(jnp.shape, variables)
  expected = linen.apply(variables, x, train=train_mode)
  got = twin.apply(variables, x, train=train_mode)
  assert set(got[1]) == {'stage1', 'stage2', 'embedding'}
  _assert_trees_equal(got, expected)  # Same operations in the same order: bitwise.


@pytest.mark.parametrize('conv_impl, atol', [('xla', 0.0), ('cpu', 1e-5)])
def test_nnx_batchnorm_twin_updates_running_statistics_like_linen(conv_impl, atol):
  """Train mode: same outputs and new running mean/var; eval mode then reads them alike.

  With conv_impl='cpu' the linen model's BatchNorm sums in another order (`AffineBatchNorm`), so
  the two agree to float32 rounding only."""
  x = _images(16)
  linen = models.build('cnn_teacher_bn', 10, conv_impl=conv_impl)
  twin = models.build('nnx_cnn_teacher_bn', 10, conv_impl=conv_impl)
  variables = linen.init(jax.random.key(0), x)
  want, want_vars = linen.apply(variables, x, train=True, mutable=['batch_stats'])
  got, got_vars = twin.apply(variables, x, train=True, mutable=['batch_stats'])
  _assert_trees_equal(got, want, atol=atol)
  _assert_trees_equal(got_vars, want_vars, atol=atol)
  moved = jax.tree.map(
    lambda a, b: float(jnp.max(jnp.abs(a - b))), got_vars['batch_stats'], variables['batch_stats']
  )
  assert min(jax.tree.leaves(moved)) > 0  # Every statistic was updated.
  updated = {'params': variables['params'], 'batch_stats': got_vars['batch_stats']}
  _assert_trees_equal(twin.apply(updated, x), linen.apply(updated, x), atol=10 * atol)


def test_nnx_model_with_other_state_is_refused():
  from flax import nnx

  class WithCounter(nnx.Module):
    def __init__(self, num_classes, *, rngs):
      self.calls = nnx.Variable(jnp.zeros((), jnp.int32))

  with pytest.raises(ValueError, match='state other than nnx.Param and nnx.BatchStat'):
    nnx_adapter.NNXModel(WithCounter, 10).apply({'params': {}}, _images())


def test_one_epoch_of_the_nnx_twin_matches_the_linen_student(small_config, tmp_path, monkeypatch):
  """From the same initial weights, one epoch of each model gives the same accuracy and weights
  up to float32 rounding (the trainer is the same code for both)."""
  small_config.num_epochs = 1
  linen = train.train_and_evaluate(small_config, str(tmp_path / 'linen'))
  linen_init = models.build('cnn_student', 10).init
  monkeypatch.setattr(
    nnx_adapter.NNXModel, 'init', lambda self, rng, x, train=False: linen_init(rng, x)
  )
  small_config.model = 'nnx_cnn_student'
  twin = train.train_and_evaluate(small_config, str(tmp_path / 'nnx'))
  assert twin['params'] == linen['params'] == 26698
  # Float32 rounding may flip at most one borderline test image.
  assert abs(twin['test_accuracy'] - linen['test_accuracy']) <= 1 / TEST_SIZE + 1e-9
  a, meta = checkpoint.load_variables(str(tmp_path / 'nnx'))
  b, _ = checkpoint.load_variables(str(tmp_path / 'linen'))
  assert meta['model'] == 'nnx_cnn_student'
  _assert_trees_equal(a, b, atol=1e-4)


def test_nnx_teacher_serves_an_lp_student_with_feature_baselines(small_config, tmp_path):
  """An exported NNX run is a teacher: cached outputs for LP, its maps for AT/SP/FitNet."""
  small_config.model = 'nnx_cnn_student'
  small_config.num_epochs = 1
  nnx_teacher = str(tmp_path / 'teacher')
  train.train_and_evaluate(small_config, nnx_teacher)
  small_config.teacher.model = 'nnx_cnn_student'
  small_config.teacher.checkpoint = os.path.join(nnx_teacher, 'model.msgpack')  # The file alone.
  small_config.teacher.cache_outputs = True
  d = small_config.distill
  d.lp_weight, d.k, d.at_weight, d.sp_weight, d.fitnet_weight = 0.1, 5, 10.0, 100.0, 1.0
  d.fitnet_feature = 'stage1'
  result = train.train_and_evaluate(small_config, str(tmp_path / 'lp'))
  assert result['teacher']['model'] == 'nnx_cnn_student'
  assert result['extra_params'] > 0  # FitNet's regressor, built from both models' feature shapes.
  assert 0 < result['test_accuracy'] <= 1
  # LP over the whole split's teacher graph with a memory bank of the NNX student's embeddings.
  d.at_weight = d.sp_weight = d.fitnet_weight = 0.0
  d.lp_graph, d.student_scale = 'bank', 'mean'
  bank = train.train_and_evaluate(small_config, str(tmp_path / 'bank'))
  assert bank['objective'] == 'CE + 0.1 LP-bank (mean)' and 0 < bank['test_accuracy'] <= 1


def _launch(args):
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  return subprocess.Popen(
    [sys.executable, os.path.join(REPO, 'launch.py'), *args],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def test_launch_nnx_student_resumes_after_a_kill_exports_and_evaluates(fashion_data_dir, tmp_path):
  args = [
    '--config=configs/fashion_mnist_student.py',
    '--config.model=nnx_cnn_student',
    f'--config.data_dir={fashion_data_dir}',
    '--config.num_epochs=2',
    '--config.batch_size=64',
    '--config.eval_batch_size=50',
    '--config.checkpoint_every_steps=3',
    '--config.log_every_steps=2',
  ]
  killed = str(tmp_path / 'killed')
  proc = _launch([*args, f'--workdir={killed}'])
  lines, deadline = [], time.time() + 240
  for line in proc.stdout:  # Kill in the second epoch, past the first epoch's checkpoints.
    lines.append(line)
    if 'epoch 2/2 step 4/' in line:
      proc.send_signal(signal.SIGKILL)
      break
    assert deadline > time.time(), ''.join(lines)  # A guard against a hung child.
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, ''.join(lines)
  resumed = _launch([*args, f'--workdir={killed}'])
  out, _ = resumed.communicate(timeout=240)
  assert resumed.returncode == 0 and 'Resuming' in out, out
  straight = _launch([*args, f'--workdir={tmp_path / "straight"}'])
  out, _ = straight.communicate(timeout=240)
  assert straight.returncode == 0, out
  a, meta = checkpoint.load_variables(killed)
  b, _ = checkpoint.load_variables(str(tmp_path / 'straight'))
  assert meta['model'] == 'nnx_cnn_student'
  _assert_trees_equal(a, b)  # Bitwise: the resumed run is the uninterrupted one.
  evaluated = _launch(['--mode=evaluate', f'--workdir={killed}'])  # Its config names the data.
  out, _ = evaluated.communicate(timeout=120)
  assert evaluated.returncode == 0, out
  with open(os.path.join(killed, 'result.json')) as f:
    assert f'"accuracy": {json.load(f)["test_accuracy"]}' in out, out
  exported = _launch(['--mode=evaluate', f'--checkpoint={os.path.join(killed, "model.msgpack")}'])
  out, _ = exported.communicate(timeout=120)  # The exported file alone (the default dataset).
  assert exported.returncode == 0 and '"model": "nnx_cnn_student"' in out, out
