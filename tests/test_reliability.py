"""Reliability: kills, preemption, corrupt checkpoints, non-finite losses, validation, determinism.

`pytest -k "resume or preempt or kill or corrupt or nan"` selects the fault tests. Runs share one
uninterrupted run (`reference`) and one run preempted in process (`preempted`); the kill test
runs launch.py and a small driver in subprocesses, since a SIGKILL can only be tested on a
process of its own.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from lpe import checkpoint, data, experiment, metrics_io, models, state, step, train
from lpe import config as config_lib
from lpe import workdir as workdir_lib
from tests import faults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A restore that fails inside orbax's event loop can leave a callback that warns at shutdown.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
STEPS_PER_EPOCH = 8  # conftest's 512 training examples in batches of 64.
# The run every test here starts from: fashion_mnist_student, shrunk (as conftest's small_config).
OVERRIDES = {
  'num_epochs': 2,
  'batch_size': 64,
  'eval_batch_size': 50,
  'log_every_steps': 4,
  'checkpoint_every_steps': 3,
  'learning_rate': 3e-3,
  'keep_checkpoints': 3,
}


def _config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  from configs import fashion_mnist_student

  config = fashion_mnist_student.get_config()
  config.update(dict(OVERRIDES, data_dir=data_dir, **overrides))
  return config


def _params(workdir: str):
  return checkpoint.load_variables(workdir)[0]


def _leaves_equal(a, b) -> bool:
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _steps(workdir: str) -> list[int]:
  folder = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


@pytest.fixture(scope='module')
def reference(fashion_data_dir, tmp_path_factory) -> str:
  """The workdir of the uninterrupted run."""
  workdir = str(tmp_path_factory.mktemp('reference') / 'run')
  train.train_and_evaluate(_config(fashion_data_dir), workdir)
  return workdir


@pytest.fixture(scope='module')
def preempted(fashion_data_dir, tmp_path_factory) -> str:
  """A run preempted by SIGTERM at step 11: checkpoints 8, 9 and 11 (keep_checkpoints=3)."""
  workdir = str(tmp_path_factory.mktemp('preempted') / 'run')
  with pytest.MonkeyPatch.context() as monkeypatch:
    faults.sigterm_before_step(monkeypatch, 11, STEPS_PER_EPOCH)
    with pytest.raises(train.Preempted) as stopped:
      train.train_and_evaluate(_config(fashion_data_dir), workdir)
  assert stopped.value.code == 143
  assert _steps(workdir) == [8, 9, 11]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # The handler is removed again.
  return workdir


# --- Preemption and kills ----------------------------------------------------------------------

# Runs the trainer and SIGKILLs its own process at a chosen point: right after the save of a step
# starts (orbax is still writing its tmp folder), or between an epoch's checkpoint and its record.
_DRIVER = """
import json, os, signal, sys, time
from configs import fashion_mnist_student
from lpe import checkpoint, metrics_io, train

workdir, overrides, kill = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
config = fashion_mnist_student.get_config()
config.update(overrides)
what, at = kill.split(':')
if what == 'save':
  save_state = checkpoint.save_state

  def save_then_die(manager, step, state):
    save_state(manager, step, state)
    if step == int(at):
      print('KILL during save:', sorted(os.listdir(manager.directory)), flush=True)
      os.kill(os.getpid(), signal.SIGKILL)

  checkpoint.save_state = save_then_die
else:
  write = metrics_io.MetricsWriter.write

  def die_before_record(self, record):
    if record['epoch'] == int(at) and not record.get('recovered'):
      while not os.path.isdir(os.path.join(workdir, 'checkpoints', str(record['step']))):
        time.sleep(0.01)  # The epoch's checkpoint is complete: die before its record.
      print('KILL before the record of epoch', at, flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    write(self, record)

  metrics_io.MetricsWriter.write = die_before_record
train.train_and_evaluate(config, workdir)
"""


@pytest.fixture(scope='module')
def compile_cache(tmp_path_factory) -> str:
  """A persistent XLA cache shared by this module's subprocesses: only the first compiles."""
  return str(tmp_path_factory.mktemp('xla_cache'))


def _popen(args: list[str], cache: str | None = None) -> subprocess.Popen:
  env = dict(os.environ, PYTHONUNBUFFERED='1', PYTHONPATH=REPO)
  if cache:  # The same executables as without the cache, so results stay bitwise equal.
    env.update(
      JAX_COMPILATION_CACHE_DIR=cache,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
    )
  return subprocess.Popen(
    [sys.executable, *args],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _finish(proc: subprocess.Popen) -> str:
  out, _ = proc.communicate(timeout=300)
  return out


def _signal_at(proc: subprocess.Popen, prefix: str, signum: int) -> str:
  """Sends `signum` when a line starts with `prefix`; returns all output once the process ends."""
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith(prefix):
      proc.send_signal(signum)
  proc.wait()
  return ''.join(lines)


def test_kill_preempt_and_resume_at_five_points_match_the_uninterrupted_run(
  fashion_data_dir, reference, compile_cache, tmp_path
):
  """SIGTERM mid-epoch, SIGKILL between an epoch's checkpoint and its record, SIGKILL during a
  save, SIGKILL mid-epoch, then a clean finish: the parameters equal the uninterrupted run's
  bitwise and no epoch's test accuracy is lost."""
  workdir = str(tmp_path / 'run')
  overrides = dict(OVERRIDES, data_dir=fashion_data_dir, log_every_steps=2, keep_checkpoints=10)
  flags_ = [f'--config.{k}={v}' for k, v in overrides.items()]
  launch = ['launch.py', '--config=configs/fashion_mnist_student.py', f'--workdir={workdir}']
  driver = ['-c', _DRIVER, workdir, json.dumps(overrides)]

  # 1. SIGTERM (preemption) through launch.py: saves the current step and exits with 143.
  proc = _popen([*launch, *flags_], compile_cache)
  out = _signal_at(proc, '[student] epoch 1/2 step 2/8', signal.SIGTERM)
  assert proc.returncode == 143, out
  saved = int(re.search(r'SIGTERM: saved step (\d+);', out).group(1))
  assert 2 <= saved < STEPS_PER_EPOCH and saved in _steps(workdir), out
  assert 'run the same command to resume' in out

  # 2. SIGKILL after epoch 1's checkpoint is complete but before its metrics record.
  out = _finish(_popen([*driver, 'record:1'], compile_cache))
  assert f'Resuming {workdir} from step {saved}.' in out and 'KILL before the record' in out, out
  assert 8 in _steps(workdir) and metrics_io.read_metrics(workdir) == []

  # 3. The resume writes epoch 1's record from checkpoint 8, then is SIGKILLed as the save of
  #    step 12 starts: orbax's tmp folder exists and must be ignored.
  out = _finish(_popen([*driver, 'save:12'], compile_cache))
  assert 'epoch 1 record recovered' in out, out
  assert "'12.orbax-checkpoint-tmp'" in out.split('KILL during save:')[1].splitlines()[0], out
  assert max(_steps(workdir)) == 9

  # 4. launch.py resumes from step 9 (steps 10-12 are replayed) and is SIGKILLed at step 14 or
  #    a little later: only the steps since the last *completed* save are lost (12's asynchronous
  #    save may still be in flight, so the run resumes from 9, 12 or 15).
  proc = _popen([*launch, *flags_], compile_cache)
  out = _signal_at(proc, '[student] epoch 2/2 step 6/8', signal.SIGKILL)
  assert proc.returncode == -signal.SIGKILL and f'Resuming {workdir} from step 9.' in out, out
  resumed = max(_steps(workdir))
  assert resumed in (9, 12, 15), out

  # 5. launch.py finishes.
  proc = _popen([*launch, *flags_], compile_cache)
  out = _finish(proc)
  assert proc.returncode == 0, out
  assert f'Resuming {workdir} from step {resumed}.' in out
  assert not [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if 'tmp' in n]
  assert not os.path.exists(os.path.join(workdir, checkpoint.CORRUPT_DIR))

  assert _leaves_equal(_params(workdir), _params(reference))
  records, expected = metrics_io.read_metrics(workdir), metrics_io.read_metrics(reference)
  assert [r['epoch'] for r in records] == [1, 2] and records[0]['recovered']
  assert [r['test_accuracy'] for r in records] == [r['test_accuracy'] for r in expected]


def test_preempt_in_process_then_resume_is_bitwise_equal(preempted, reference, tmp_path):
  """A SIGTERM at step 11 saves exactly step 11; the resumed run equals the uninterrupted one."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(preempted, workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  result = train.train_and_evaluate(config, workdir)
  assert _leaves_equal(_params(workdir), _params(reference))
  with open(os.path.join(reference, 'result.json')) as f:
    assert result['test_accuracy'] == json.load(f)['test_accuracy']


def test_sigterm_while_a_step_is_logged_saves_the_step_it_announces(
  fashion_data_dir, monkeypatch, tmp_path, capsys
):
  """A SIGTERM that lands after step 4's save decision (here, while its progress line prints)
  is acted on after step 5: step 5 is saved and announced (CI once saw 'saved step 2' and no
  checkpoint 2, when the flag was read twice in one step)."""
  import builtins

  original_print = builtins.print

  def print_then_sigterm(*args, **kwargs):
    original_print(*args, **kwargs)
    if args and 'epoch 1/2 step 4/8' in str(args[0]):
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(builtins, 'print', print_then_sigterm)
  workdir = str(tmp_path / 'run')
  with pytest.raises(train.Preempted):
    train.train_and_evaluate(_config(fashion_data_dir), workdir)
  monkeypatch.setattr(builtins, 'print', original_print)
  announced = re.search(r'SIGTERM: saved step (\d+);', capsys.readouterr().out)
  assert announced and int(announced.group(1)) == 5
  assert _steps(workdir) == [3, 5]  # checkpoint_every_steps=3, then the preemption's save.


# --- Corrupt checkpoints -----------------------------------------------------------------------


def _files(step_dir: str, part: str) -> list[str]:
  paths = [os.path.join(root, n) for root, _, names in os.walk(step_dir) for n in names]
  return [p for p in paths if part in p.replace(step_dir, '')]


def _flip_bytes(step_dir):  # Silent for orbax: only the state fingerprint notices.
  for path in _files(step_dir, 'ocdbt.process_0/d/'):
    with open(path, 'r+b') as f:
      f.seek(os.path.getsize(path) // 2)
      f.write(b'\xde\xad\xbe\xef')


def _truncate(part):
  def corrupt(step_dir):
    for path in _files(step_dir, part):
      os.truncate(path, os.path.getsize(path) // 2)

  return corrupt


def _delete(part):
  def corrupt(step_dir):
    for path in _files(step_dir, part):
      os.remove(path)

  return corrupt


CORRUPTIONS = {
  'flipped bytes in the array data': _flip_bytes,
  'truncated array data': _truncate('/d/'),
  'truncated array metadata': _truncate('_METADATA'),
  'truncated step metadata': _truncate('_CHECKPOINT_METADATA'),
  'truncated every file': _truncate(''),
  'deleted array files': _delete('default/'),
}


def _abstract_state(config, model: str = 'cnn_student'):
  info = data.dataset_info(config.dataset)
  student = models.build(model, info.num_classes)
  return jax.eval_shape(
    lambda: state.create_train_state(student, config, jax.random.key(0), info.image_shape, 8)
  )


@pytest.mark.parametrize('corruption', list(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(
  preempted, tmp_path, fashion_data_dir, corruption
):
  workdir = str(tmp_path / 'run')
  shutil.copytree(preempted, workdir)
  CORRUPTIONS[corruption](os.path.join(workdir, 'checkpoints', '11'))
  manager = checkpoint.checkpoint_manager(workdir, max_to_keep=3)
  state = checkpoint.restore_latest(manager, _abstract_state(_config(fashion_data_dir)))
  assert int(state.step) == 9
  assert manager.all_steps() == [8, 9] and _steps(workdir) == [8, 9]  # The good ones stay.
  (moved,) = os.listdir(os.path.join(workdir, checkpoint.CORRUPT_DIR))
  assert moved.startswith('11-')  # Set aside for inspection, not deleted.


def test_corrupt_latest_checkpoint_resume_finishes_bitwise_equal(
  preempted, reference, tmp_path, capsys
):
  """The whole trainer falls back from a damaged step 11 to step 9, warns, and still finishes
  with the uninterrupted run's parameters; a half-written tmp folder beside it is ignored."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(preempted, workdir)
  _flip_bytes(os.path.join(workdir, 'checkpoints', '11'))
  shutil.copytree(
    os.path.join(workdir, 'checkpoints', '11'),
    os.path.join(workdir, 'checkpoints', '12.orbax-checkpoint-tmp'),
  )
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  # Flipped bytes either fail decompression (unreadable) or decode to other values (checksum).
  detected = ('reads back other values than were saved', 'is unreadable')
  assert any(d in out for d in detected) and 'from step 9 instead' in out
  assert f'Resuming {workdir} from step 9.' in out
  assert _leaves_equal(_params(workdir), _params(reference))
  assert len(os.listdir(os.path.join(workdir, checkpoint.CORRUPT_DIR))) == 1


def test_all_checkpoints_corrupt_is_a_clear_error_and_nothing_is_moved(
  preempted, tmp_path, fashion_data_dir
):
  workdir = str(tmp_path / 'run')
  shutil.copytree(preempted, workdir)
  for saved in (8, 9, 11):
    _truncate('')(os.path.join(workdir, 'checkpoints', str(saved)))
  manager = checkpoint.checkpoint_manager(workdir, max_to_keep=3)
  with pytest.raises(checkpoint.CorruptCheckpointError, match='None of the 3 checkpoints'):
    checkpoint.restore_latest(manager, _abstract_state(_config(fashion_data_dir)))
  assert _steps(workdir) == [8, 9, 11]
  assert not os.path.exists(os.path.join(workdir, checkpoint.CORRUPT_DIR))


def test_resume_into_another_architecture_is_a_clear_error_not_corruption(
  preempted, tmp_path, fashion_data_dir
):
  workdir = str(tmp_path / 'run')
  shutil.copytree(preempted, workdir)
  manager = checkpoint.checkpoint_manager(workdir, max_to_keep=3)
  abstract = _abstract_state(_config(fashion_data_dir), model='cnn_teacher')
  with pytest.raises(ValueError, match='does not fit the configured architecture: params/'):
    checkpoint.restore_latest(manager, abstract)
  assert _steps(workdir) == [8, 9, 11]  # A mismatch is not damage: nothing is set aside.


def test_evaluate_saved_with_another_architecture_is_a_clear_error(reference, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    saved = json.load(f)
  with open(path, 'w') as f:
    json.dump(dict(saved, model='cnn_teacher'), f)
  with pytest.raises(
    ValueError, match=r'Checkpoint step 16 .* does not fit.*params/conv1/bias.*config\.json'
  ):
    experiment.evaluate_saved(workdir)
  meta_path = os.path.join(workdir, 'model.json')
  with open(meta_path) as f:
    meta = json.load(f)
  with open(meta_path, 'w') as f:
    json.dump(dict(meta, model='cnn_teacher'), f)
  with pytest.raises(ValueError, match='Model file .* does not fit the configured architecture'):
    experiment.evaluate_saved(os.path.join(workdir, 'model.msgpack'))


# --- Non-finite losses -------------------------------------------------------------------------


def _poison(monkeypatch, config, steps: list[int]) -> None:
  """Makes the input of the training batches of `steps` NaN (a test-only hook in preprocess)."""
  split = data.load_split(config.dataset, 'train', config.data_dir)
  bs = config.batch_size

  def key(step):  # The pixel sum of the batch's first image identifies the batch.
    epoch, offset = divmod(step - 1, STEPS_PER_EPOCH)
    order = data.epoch_permutation(len(split), seed=config.seed, epoch=epoch)
    return int(split.images[order[offset * bs]].astype(np.int64).sum())

  all_steps = range(1, config.num_epochs * STEPS_PER_EPOCH + 1)
  assert len({key(s) for s in all_steps}) == len(all_steps)  # Unambiguous.
  keys = jnp.asarray([key(s) for s in steps])
  preprocess = data.preprocess

  def poisoned(images, info):
    x = preprocess(images, info)
    if images.shape[0] != bs:  # Evaluation batches stay clean.
      return x
    return jnp.where(jnp.isin(jnp.sum(images[0].astype(jnp.int32)), keys), jnp.nan, x)

  monkeypatch.setattr(data, 'preprocess', poisoned)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
  fashion_data_dir, tmp_path, monkeypatch
):
  config = _config(fashion_data_dir)
  _poison(monkeypatch, config, [5])
  workdir = str(tmp_path / 'run')
  with pytest.raises(train.NonFiniteLossError) as error:
    train.train_and_evaluate(config, workdir)
  message = str(error.value)
  assert '[student] step 5 gave a non-finite loss' in message
  assert 'loss nan, ce nan' in message and 'last good checkpoint: step 3' in message
  assert 'skip_nonfinite_batches=True' in message
  assert _steps(workdir) == [3]  # Step 6 would have been saved: the bad state never is.
  assert not os.path.exists(os.path.join(workdir, 'model.msgpack'))


def test_nan_from_a_huge_learning_rate_stops_at_step_1(fashion_data_dir, tmp_path):
  """A natural trigger: lr 1e30 overflows the parameters on the first update."""
  config = _config(fashion_data_dir, learning_rate=1e30, num_epochs=1)
  with pytest.raises(train.NonFiniteLossError, match=r'step 1 .*param_norm inf.*none was saved'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert _steps(str(tmp_path / 'run')) == []


def test_nan_batches_are_skipped_and_counted_when_configured(
  fashion_data_dir, tmp_path, monkeypatch, capsys
):
  config = _config(fashion_data_dir, skip_nonfinite_batches=True)
  _poison(monkeypatch, config, [2, 3, 11])
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(config, workdir)
  records = metrics_io.read_metrics(workdir)
  assert [r['skipped_batches'] for r in records] == [2, 1] and result['skipped_batches'] == 3
  assert all(np.isfinite(r['train_loss']) for r in records)  # Skipped steps are left out.
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(_params(workdir)))
  assert result['test_accuracy'] > 0.3  # Ten classes: chance is 0.1.
  assert 'skipped 2 non-finite batches' in capsys.readouterr().out


def test_nan_step_with_skip_keeps_the_old_state_but_counts_the_step():
  info = data.dataset_info('fashion_mnist')
  config = config_lib.default_config()
  student = models.build('cnn_student', 10)
  config.skip_nonfinite_batches = True
  start = state.create_train_state(student, config, jax.random.key(0), info.image_shape, 10)
  images = np.full((8, 28, 28, 1), 7, np.uint8)
  labels = np.arange(8, dtype=np.int32)
  step_fn = jax.jit(step.make_train_step(config, student, None, info))
  with pytest.MonkeyPatch.context() as monkeypatch:
    monkeypatch.setattr(data, 'preprocess', lambda images, info: jnp.full(images.shape, jnp.nan))
    new, metrics = step_fn(start, None, images, labels)
  assert float(metrics['finite']) == 0.0 and int(new.step) == 1
  assert _leaves_equal(new.params, start.params) and _leaves_equal(new.opt_state, start.opt_state)


# --- Validation before any work ----------------------------------------------------------------


def _parse_launch_flags(argv: list[str]):
  """launch.py's config flag, parsed in process (config_flags is what launch.py uses)."""
  values, argv = flags.FlagValues(), ['launch.py', *argv]
  config_flags.DEFINE_config_file('config', None, 'Config.', flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


def test_unknown_and_mistyped_overrides_are_refused_by_the_flags(tmp_path):
  student = '--config=configs/fashion_mnist_student.py'
  assert _parse_launch_flags([student, '--config.learning_rate=0.1']).learning_rate == 0.1
  with pytest.raises(AttributeError, match='learning_rat'):
    _parse_launch_flags([student, '--config.learning_rat=0.1'])
  with pytest.raises(flags.Error, match='num_epochs'):
    _parse_launch_flags([student, '--config.num_epochs=three'])
  # Through launch.py: one line, no traceback, nothing written.
  workdir = str(tmp_path / 'run')
  proc = _popen(['launch.py', student, '--config.learning_rat=0.1', f'--workdir={workdir}'])
  out = _finish(proc)
  assert proc.returncode == 1 and 'Traceback' not in out, out
  assert 'names no field of the config: \'learning_rat\' Did you mean "learning_rate"' in out
  assert not os.path.exists(workdir)


def test_unknown_key_or_wrong_type_in_a_config_file_stops_before_any_write(
  fashion_data_dir, tmp_path
):
  path = tmp_path / 'typo.py'
  path.write_text(
    'from lpe.config import default_config\n\n\ndef get_config():\n'
    '  config = default_config()\n  config.learning_rat = 0.1\n  return config\n'
  )
  config = _parse_launch_flags([f'--config={path}'])
  with pytest.raises(ValueError, match='learning_rat is not a setting.*did you mean config'):
    experiment.run(config, str(tmp_path / 'run'))
  bad = dict(_config(fashion_data_dir).to_dict(), num_epochs=2.5)
  with pytest.raises(ValueError, match=r'config.num_epochs must be an int, got 2.5'):
    train.train_and_evaluate(ml_collections.ConfigDict(bad), str(tmp_path / 'run'))
  bad['num_epochs'], bad['distill']['sigma2'] = 2, 'wide'
  with pytest.raises(ValueError, match='config.distill.sigma2 must be a number'):
    train.train_and_evaluate(ml_collections.ConfigDict(bad), str(tmp_path / 'run'))
  with pytest.raises(ValueError, match='keep at least 2'):
    train.train_and_evaluate(_config(fashion_data_dir, keep_checkpoints=1), str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def _fake_teacher(path: str, *, num_classes: int, meta_classes: int) -> str:
  model = models.build('cnn_student', num_classes)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  meta = {'model': 'cnn_student', 'dataset': 'fashion_mnist', 'num_classes': meta_classes}
  checkpoint.export_variables(path, variables, meta)
  return path


@pytest.mark.parametrize(
  'teacher, message',
  [
    ('missing', 'does not exist'),
    ('wrong_classes', 'has 100 classes, but the dataset has 10'),
    ('wrong_shapes', r'params/head/bias has shape \(100,\) in the file but \(10,\)'),
    ('wrong_model', "holds a 'cnn_student' model, but config.teacher.model is 'cnn_teacher'"),
  ],
)
def test_missing_or_incompatible_teacher_stops_before_any_write(
  fashion_data_dir, tmp_path, teacher, message
):
  path = str(tmp_path / f'{teacher}.msgpack')
  if teacher != 'missing':
    classes = {'wrong_shapes': (100, 10), 'wrong_classes': (100, 100)}.get(teacher, (10, 10))
    _fake_teacher(path, num_classes=classes[0], meta_classes=classes[1])
  config = _config(fashion_data_dir)
  config.distill.lp_weight = 0.1
  config.teacher.checkpoint = path
  config.teacher.model = 'cnn_teacher' if teacher == 'wrong_model' else 'cnn_student'
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_unavailable_dataset_stops_before_any_write(tmp_path):
  config = _config(str(tmp_path / 'empty'), dataset='mnist')
  with pytest.raises(data.DatasetUnavailableError, match="Dataset 'mnist' is not prepared"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_resume_with_a_changed_config_is_refused_unless_allowed(preempted, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(preempted, workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = ml_collections.ConfigDict(json.load(f))
  before = sorted(os.listdir(workdir))
  changed = saved.copy_and_resolve_references()
  changed.learning_rate, changed.num_epochs = 0.1, 5
  with pytest.raises(ValueError, match=r'holds a run made with another config \(learning_rate: '):
    train.train_and_evaluate(changed, workdir)
  with pytest.raises(ValueError, match='num_epochs: 2 -> 5.*--allow_config_change'):
    experiment.run(changed, workdir)
  assert sorted(os.listdir(workdir)) == before and _steps(workdir) == [8, 9, 11]
  # Fields that do not change the parameters may change; others need the flag.
  safe = saved.copy_and_resolve_references()
  safe.log_every_steps, safe.keep_checkpoints, safe.name = 1, 5, 'renamed'
  assert workdir_lib.check_config(safe, workdir) == []
  allowed = workdir_lib.check_config(changed, workdir, allow_config_change=True)
  assert allowed == ['learning_rate: 0.003 -> 0.1', 'num_epochs: 2 -> 5']


def test_comparison_checks_every_run_before_training_any(fashion_data_dir, tmp_path):
  from configs import fashion_mnist_compare

  config = fashion_mnist_compare.get_config()
  config.teacher_checkpoint = ''
  for run in config.runs.values():
    run.data_dir = fashion_data_dir
  workdir = str(tmp_path / 'compare')
  config.runs.lp.distill.k = config.runs.lp.batch_size  # Only the last run is wrong.
  with pytest.raises(ValueError, match='config.runs.lp.distill.k=128 must be at least 1'):
    experiment.run(config, workdir)
  config.runs.lp.distill.k = 5
  with pytest.raises(
    ValueError,
    match="holds a 'cnn_student' model, but config.runs.lp.teacher.model is 'cnn_teacher'",
  ):
    config.runs.teacher.model = 'cnn_student'
    experiment.run(config, workdir)
  config.runs.teacher.model = 'cnn_teacher'
  config.runs.lp.weight_decy = 0.1
  with pytest.raises(ValueError, match='config.runs.lp.weight_decy is not a setting'):
    experiment.run(config, workdir)
  assert not os.path.exists(workdir)


# --- Determinism -------------------------------------------------------------------------------


def test_same_config_and_seed_give_the_same_metrics_and_parameters(
  fashion_data_dir, reference, tmp_path
):
  workdir = str(tmp_path / 'again')
  train.train_and_evaluate(_config(fashion_data_dir), workdir)
  drop_time = lambda records: [{k: v for k, v in r.items() if k != 'epoch_time_s'} for r in records]
  assert drop_time(metrics_io.read_metrics(workdir)) == drop_time(
    metrics_io.read_metrics(reference)
  )
  assert _leaves_equal(_params(workdir), _params(reference))
