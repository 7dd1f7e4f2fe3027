"""Reliability: kills, preemption, corrupt checkpoints, non-finite losses, validation, determinism.

`pytest -k "resume or preempt or kill or corrupt or nan or lock or atomic"` selects the fault
tests. Runs share one
uninterrupted run (`reference`) and one run preempted in process (`preempted`); the kill test
runs launch.py and a small driver in subprocesses, since a SIGKILL can only be tested on a
process of its own.
"""

import errno
import hashlib
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

from lpe import checkpoint, data, experiment, files, metrics_io, models, state, step, train
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


def _popen(args: list[str]) -> subprocess.Popen:
  # The environment carries the suite's compilation cache (tests/conftest.py).
  env = dict(os.environ, PYTHONUNBUFFERED='1', PYTHONPATH=REPO)
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
  fashion_data_dir, reference, tmp_path
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
  proc = _popen([*launch, *flags_])
  out = _signal_at(proc, '[student] epoch 1/2 step 2/8', signal.SIGTERM)
  assert proc.returncode == 143, out
  saved = int(re.search(r'SIGTERM: saved step (\d+);', out).group(1))
  assert 2 <= saved < STEPS_PER_EPOCH and saved in _steps(workdir), out
  assert 'run the same command to resume' in out

  # 2. SIGKILL after epoch 1's checkpoint is complete but before its metrics record.
  out = _finish(_popen([*driver, 'record:1']))
  assert f'Resuming {workdir} from step {saved}.' in out and 'KILL before the record' in out, out
  assert 8 in _steps(workdir) and metrics_io.read_metrics(workdir) == []

  # 3. The resume writes epoch 1's record from checkpoint 8, then is SIGKILLed as the save of
  #    step 12 starts: orbax's tmp folder exists and must be ignored.
  out = _finish(_popen([*driver, 'save:12']))
  assert 'epoch 1 record recovered' in out, out
  assert "'12.orbax-checkpoint-tmp'" in out.split('KILL during save:')[1].splitlines()[0], out
  assert max(_steps(workdir)) == 9

  # 4. launch.py resumes from step 9 (steps 10-12 are replayed) and is SIGKILLed at step 14 or
  #    a little later: only the steps since the last *completed* save are lost (12's asynchronous
  #    save may still be in flight, so the run resumes from 9, 12 or 15).
  proc = _popen([*launch, *flags_])
  out = _signal_at(proc, '[student] epoch 2/2 step 6/8', signal.SIGKILL)
  assert proc.returncode == -signal.SIGKILL and f'Resuming {workdir} from step 9.' in out, out
  resumed = max(_steps(workdir))
  assert resumed in (9, 12, 15), out

  # 5. launch.py finishes.
  proc = _popen([*launch, *flags_])
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
  # Epoch 2's training means cover the 5 steps trained after the resume (12 to 16), and say so.
  assert [r['steps_averaged'] for r in metrics_io.read_metrics(workdir)] == [8, 5]


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


def test_a_wrong_model_file_is_one_sentence_naming_it_and_the_fix(tmp_path):
  """`checkpoint.load_model`, the one loader of saved models (teachers and evaluation): a
  model.json that names no model, an unknown one or another architecture stops with one line
  that names the file."""
  module = models.build('cnn_student', 10)
  variables = module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  path = str(tmp_path / 'model.msgpack')
  meta = {'model': 'cnn_student', 'num_classes': 10, 'dataset': 'fashion_mnist'}
  checkpoint.export_variables(path, variables, meta)
  loaded, _, read = checkpoint.load_model(path, (28, 28, 1))
  assert loaded == module and read['model'] == 'cnn_student'
  meta_path = str(tmp_path / 'model.json')
  saved = files.read_json(meta_path, fix='')
  cases = [
    ({k: v for k, v in saved.items() if k != 'model'}, 'does not say which model'),
    (dict(saved, model='resnet9000'), "holds a 'resnet9000' model, which is not registered"),
    (dict(saved, model='cnn_teacher'), 'does not fit .* params/'),
  ]
  for edited, message in cases:
    files.write_json(meta_path, edited)
    with pytest.raises(ValueError, match=message) as error:
      experiment.evaluate_saved(path)
    assert path in str(error.value) and '\n' not in str(error.value)


# --- One run per workdir, and the workdir's files ----------------------------------------------


def _copy(source: str, tmp_path) -> str:
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  return workdir


def _saved_config(workdir: str) -> ml_collections.ConfigDict:
  with open(os.path.join(workdir, 'config.json')) as f:
    return ml_collections.ConfigDict(json.load(f))


def _listing(workdir: str) -> list[tuple[str, int]]:
  """Every file under `workdir` with its size."""
  paths = [os.path.join(root, n) for root, _, names in os.walk(workdir) for n in names]
  return sorted((os.path.relpath(p, workdir), os.path.getsize(p)) for p in paths)


def _no_data(*args, **kwargs):
  raise AssertionError('data was loaded')


def test_lock_refuses_a_second_run_before_loading_data_and_at_its_first_write(
  preempted, tmp_path, monkeypatch
):
  """Two processes on one workdir once both trained (duplicate epoch records, or a crash on the
  other's half-written checkpoint). The second is refused at once, naming the holder; when both
  start together and pass that check, the lock taken at the first write refuses it."""
  workdir = _copy(preempted, tmp_path)
  config = _saved_config(workdir)
  holder = faults.hold_lock(workdir)
  before = _listing(workdir)
  try:
    with monkeypatch.context() as patch:
      patch.setattr(data, 'load_split', _no_data)
      with pytest.raises(workdir_lib.WorkdirInUseError, match=f'PID {holder.pid}, started'):
        train.train_and_evaluate(config, workdir)
    monkeypatch.setattr(workdir_lib, 'check_not_in_use', lambda workdir: None)
    with pytest.raises(workdir_lib.WorkdirInUseError, match=f'PID {holder.pid}, started'):
      train.train_and_evaluate(config, workdir)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert _listing(workdir) == before  # Nothing trained or written.


def test_lock_refuses_a_workdir_that_is_a_file_or_uncreatable_before_loading_data(
  fashion_data_dir, tmp_path, monkeypatch
):
  monkeypatch.setattr(data, 'load_split', _no_data)
  a_file = tmp_path / 'file'
  a_file.write_text('not a workdir')
  config = _config(fashion_data_dir)
  with pytest.raises(files.StorageError, match=f'The workdir {a_file} is a file, not a folder'):
    train.train_and_evaluate(config, str(a_file))
  with pytest.raises(files.StorageError, match=f'cannot be created: {a_file} is a file'):
    train.train_and_evaluate(config, str(a_file / 'run'))
  assert a_file.read_text() == 'not a workdir'


def test_corrupt_result_json_and_a_torn_metrics_line_are_repaired_on_rerun(
  reference, tmp_path, capsys
):
  """What a kill or a full disk left in files once written in place used to block every rerun
  (`Error: Expecting value: line 1 column 1 (char 0)`); now the rerun repairs them."""
  workdir = _copy(reference, tmp_path)
  result_path, metrics_path = (os.path.join(workdir, n) for n in ('result.json', 'metrics.jsonl'))
  os.truncate(result_path, os.path.getsize(result_path) // 2)
  with open(metrics_path, 'rb') as f:
    last = f.read().splitlines(keepends=True)[-1]
  os.truncate(metrics_path, os.path.getsize(metrics_path) - len(last) // 2)  # Epoch 2's, torn.
  result = train.train_and_evaluate(_saved_config(workdir), workdir)
  out = capsys.readouterr().out
  assert f'Warning: {result_path} is unreadable (JSONDecodeError' in out, out
  assert 'it is rebuilt from checkpoint 16' in out
  assert f'Warning: {metrics_path} ended in a torn line' in out
  assert 'epoch 2 record recovered from its checkpoint' in out
  records = metrics_io.read_metrics(workdir)
  assert [r['epoch'] for r in records] == [1, 2] and records[1]['recovered']
  assert records[1]['test_accuracy'] == metrics_io.read_metrics(reference)[1]['test_accuracy']
  assert _leaves_equal(_params(workdir), _params(reference))
  assert train.train_and_evaluate(_saved_config(workdir), workdir) == result  # Whole again.


def test_resume_of_a_finished_run_with_a_changed_config_says_nothing_was_retrained(
  reference, tmp_path, capsys
):
  workdir = _copy(reference, tmp_path)
  before = _listing(workdir)
  config = _saved_config(workdir)
  config.distill.k = 10
  result = experiment.run(config, workdir, resume='any')
  out = capsys.readouterr().out
  assert (
    'holds a finished run of 2 epochs, so nothing was retrained and the changed fields '
    '(distill.k: 5 -> 10) were not applied' in out
  ), out
  with open(os.path.join(workdir, 'result.json')) as f:
    assert result == json.load(f)
  assert _listing(workdir) == before


def _fsync_full_for(name: str):
  """An `os.fsync` that fails as on a full disk for files whose name starts with `name`."""
  fsync = os.fsync

  def fsync_or_full(fd):
    if os.path.basename(os.readlink(f'/proc/self/fd/{fd}')).startswith(name):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    fsync(fd)

  return fsync_or_full


def test_write_atomic_takes_a_writer_and_a_failed_one_keeps_the_old_file(tmp_path):
  """`files.write_atomic(path, fn)`: `fn` writes to the temporary file (np.save, np.savez,
  savefig); if it fails, the old file stays and no temporary file is left."""
  path = str(tmp_path / 'x.npy')
  files.write_atomic(path, lambda f: np.save(f, np.arange(3)))
  np.testing.assert_array_equal(np.load(path), np.arange(3))

  def fails(f):
    f.write(b'half')
    raise RuntimeError('the writer failed')

  with pytest.raises(RuntimeError, match='the writer failed'):
    files.write_atomic(path, fails)
  np.testing.assert_array_equal(np.load(path), np.arange(3))
  assert os.listdir(tmp_path) == ['x.npy']


def test_atomic_export_on_a_full_disk_keeps_the_checkpoints_and_leaves_no_temporary_file(
  reference, tmp_path, monkeypatch
):
  """A full disk at export once ended in 464 lines of tracebacks and a 0-byte
  model.msgpack.tmp; now one sentence, the checkpoints kept, and the rerun exports."""
  workdir = _copy(reference, tmp_path)
  for name in ('model.msgpack', 'model.json', 'result.json'):
    os.remove(os.path.join(workdir, name))
  with monkeypatch.context() as patch:
    patch.setattr(os, 'fsync', _fsync_full_for('model.msgpack'))
    with pytest.raises(files.StorageError) as error:
      train.train_and_evaluate(_saved_config(workdir), workdir)
  assert str(error.value) == (
    f'Could not write {workdir}/model.msgpack: the disk is full (No space left on device); the '
    'checkpoints up to step 16 are kept; free some space, then run the same command again.'
  )
  names = os.listdir(workdir)
  assert not [n for n in names if n.endswith('.tmp')] and 'model.msgpack' not in names
  assert _steps(workdir) == _steps(reference)
  train.train_and_evaluate(_saved_config(workdir), workdir)
  assert _leaves_equal(_params(workdir), _params(reference))


def _user_namespaces() -> bool:
  """Whether this machine lets an unprivileged process mount a tmpfs of its own (to fill)."""
  probe = ['unshare', '--user', '--map-root-user', '--mount', 'true']
  try:
    return subprocess.run(probe, capture_output=True, timeout=60).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


# Runs launch.py on a read-only tmpfs, on a tmpfs filled so that the export cannot fit, and on
# one too small for the first checkpoint.
_FULL_DISK = """
set -e
mount -t tmpfs -o size=16m tmpfs "$FULL"
cp -a "$SOURCE/." "$FULL/run"
rm "$FULL/run/model.msgpack" "$FULL/run/model.json" "$FULL/run/result.json"
used=$(df -k --output=used "$FULL" | tail -1)
mount -o remount,size=$((used + 48))k "$FULL"  # Room for config.json, not for the model.
mount -t tmpfs -o ro tmpfs "$READ_ONLY"
mount -t tmpfs -o size=200k tmpfs "$SMALL"  # Less than one checkpoint.
set +e
echo '=== read-only'; $LAUNCH --workdir="$READ_ONLY/run" 2>&1; echo "rc=$?"
echo '=== full'; $LAUNCH --workdir="$FULL/run" 2>&1; echo "rc=$?"
echo '=== left'; ls -a "$FULL/run"; ls "$FULL/run/checkpoints"
echo '=== save'; $LAUNCH --workdir="$SMALL/run" 2>&1; echo "rc=$?"
"""


@pytest.mark.skipif(not _user_namespaces(), reason='needs unprivileged user namespaces (unshare)')
def test_atomic_export_on_a_really_full_or_read_only_disk_stops_launch_in_one_line(
  fashion_data_dir, reference, tmp_path
):
  """The same faults on real filesystems, in a user namespace of their own: a tmpfs mounted
  read-only, one with room for the run's checkpoints but not its exported model, and one too
  small for the first checkpoint (orbax's background threads fail; their tracebacks, hundreds
  of lines, are cut to one line each)."""
  import shlex

  overrides = dict(OVERRIDES, data_dir=fashion_data_dir)
  launch = [sys.executable, 'launch.py', '--config=configs/fashion_mnist_student.py']
  launch += [f'--config.{k}={v}' for k, v in overrides.items()]
  mounts = {n: tmp_path / n.lower() for n in ('FULL', 'READ_ONLY', 'SMALL')}
  for folder in mounts.values():
    folder.mkdir()
  env = dict(
    os.environ,
    PYTHONPATH=REPO,
    SOURCE=reference,
    LAUNCH=shlex.join(launch),
    **{k: str(v) for k, v in mounts.items()},
  )
  proc = subprocess.run(
    ['unshare', '--user', '--map-root-user', '--mount', 'bash', '-c', _FULL_DISK],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  out = proc.stdout + proc.stderr
  read_only, full, left, save = (part.strip() for part in out.split('=== ')[1:])
  run = mounts['READ_ONLY'] / 'run'
  assert read_only.endswith(
    f'Error: {mounts["READ_ONLY"]} (where the workdir {run} would go) is on a read-only '
    'filesystem; pass a workdir on a writable disk.\nrc=1'
  ), out
  assert 'Traceback' not in full and full.endswith('rc=1'), out
  assert (
    f'Error: Could not write {mounts["FULL"]}/run/model.msgpack: the disk is full (No space '
    'left on device); the checkpoints up to step 16 are kept' in full
  ), out
  assert '.tmp' not in left and 'model.msgpack' not in left, out
  assert left.split()[-3:] == [str(s) for s in _steps(reference)], out
  assert 'Traceback' not in save and save.endswith('rc=1') and len(save.splitlines()) < 12, out
  assert (
    # The path is the failed file's when orbax's error names it, else the workdir: which of
    # orbax's threads fails first (and so which error is raised) varies from run to run.
    f'Error: Could not write {mounts["SMALL"]}/run' in save
    and 'the disk is full (No space left on device); no checkpoint is saved' in save
  ), out


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
  # 2 of epoch 1's 8 batches: allowed by a share of 0.25 (not by the default 0.1).
  config = _config(fashion_data_dir, skip_nonfinite_batches=True, max_skipped_fraction=0.25)
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


def test_nan_stop_advice_resumes_from_the_last_good_checkpoint_with_a_lower_learning_rate(
  fashion_data_dir, tmp_path, monkeypatch
):
  """The advice after a non-finite stop once did not work (a lower learning rate was refused as
  a config change); the command it names now resumes from the last good checkpoint."""
  config = _config(fashion_data_dir)
  workdir = str(tmp_path / 'run')
  with monkeypatch.context() as patch:
    _poison(patch, config, [5])
    with pytest.raises(train.NonFiniteLossError) as error:
      train.train_and_evaluate(config, workdir)
  advice = re.search(
    r'to resume from step 3 with a lower learning rate, run the same command with '
    r"(--allow_optimizer_change --config\.learning_rate=(\S+)) \(resume='optimizer' in Python",
    str(error.value),
  )
  assert advice and float(advice.group(2)) == pytest.approx(3e-4), str(error.value)
  lower = _config(fashion_data_dir, learning_rate=float(advice.group(2)))
  with pytest.raises(
    ValueError,
    match=r'another config \(learning_rate: 0.003 -> 0.0003\).*--allow_optimizer_change '
    r"\(resume='optimizer' in Python\)",
  ):
    train.train_and_evaluate(lower, workdir)  # Without the option: refused, naming it.
  lower.num_epochs = 3
  with pytest.raises(ValueError, match=r'another config \(num_epochs: 2 -> 3\)'):
    train.train_and_evaluate(lower, workdir, resume='optimizer')  # Only the optimizer.

  overrides = dict(OVERRIDES, data_dir=fashion_data_dir)
  del overrides['learning_rate']
  command = ['launch.py', '--config=configs/fashion_mnist_student.py', f'--workdir={workdir}']
  command += [f'--config.{k}={v}' for k, v in overrides.items()] + advice.group(1).split()
  proc = _popen(command)
  out = _finish(proc)
  assert proc.returncode == 0, out
  assert f'Resuming {workdir} from step 3.' in out
  assert 'continuing with a changed config: learning_rate: 0.003 -> 0.0003' in out
  assert [r['epoch'] for r in metrics_io.read_metrics(workdir)] == [1, 2]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(_params(workdir)))


def test_nan_skipping_stops_once_more_than_max_skipped_fraction_of_an_epoch_is_skipped(
  fashion_data_dir, tmp_path, monkeypatch
):
  """Skipping once went on through 35 of 40 batches and exported a 7% model with exit 0."""
  config = _config(fashion_data_dir, skip_nonfinite_batches=True, max_skipped_fraction=0.25)
  _poison(monkeypatch, config, [2, 3, 4])
  workdir = str(tmp_path / 'run')
  with pytest.raises(
    train.NonFiniteLossError,
    match=r'\[student\] 3 of the 8 batches of epoch 1 were non-finite and skipped by step 4, '
    r'more than config.max_skipped_fraction allows, so the run stopped without saving \(last '
    r'good checkpoint: step 3\); to resume from step 3 with a lower learning rate',
  ):
    train.train_and_evaluate(config, workdir)
  assert _steps(workdir) == [3]  # Two skipped by step 3 were allowed; its state was saved.
  assert not os.path.exists(os.path.join(workdir, 'model.msgpack'))


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


def test_nan_teacher_weights_or_an_unreadable_teacher_file_stop_before_any_write(
  fashion_data_dir, tmp_path
):
  """A NaN teacher once trained to exit 0; a truncated one failed with `Unpack failed:
  incomplete input`, naming no file."""
  path = str(tmp_path / 'teacher.msgpack')
  model = models.build('cnn_student', 10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  meta = {'model': 'cnn_student', 'dataset': 'fashion_mnist', 'num_classes': 10}
  config = _config(fashion_data_dir)
  config.distill.lp_weight = 0.1
  config.teacher.checkpoint, config.teacher.model = path, 'cnn_student'
  run = str(tmp_path / 'run')

  nan = jax.tree.map(np.asarray, variables)
  nan['params']['head']['bias'] = np.full_like(nan['params']['head']['bias'], np.nan)
  checkpoint.export_variables(path, nan, meta)
  with pytest.raises(ValueError, match=rf'The teacher {path} holds non-finite weights \(params/'):
    train.train_and_evaluate(config, run)

  checkpoint.export_variables(path, variables, meta)  # Cut short, then hashed as it is.
  os.truncate(path, os.path.getsize(path) // 2)
  meta_path = str(tmp_path / 'teacher.json')
  with open(path, 'rb') as f:
    files.write_json(meta_path, dict(meta, sha256=hashlib.sha256(f.read()).hexdigest()))
  with pytest.raises(ValueError, match=rf'{path} cannot be read as an exported model \(.*export'):
    train.train_and_evaluate(config, run)

  os.truncate(meta_path, 10)
  with pytest.raises(ValueError, match=rf'{meta_path} is unreadable \(JSONDecodeError'):
    train.train_and_evaluate(config, run)
  assert not os.path.exists(run)


@pytest.mark.parametrize(
  'flag, error',
  [
    ('--config.learning_rate=-0.1', 'config.learning_rate must be > 0, got -0.1; fix its value.'),
    ('--config.learning_rate=nan', 'config.learning_rate must be a finite number > 0, got nan'),
    ('--config.steps_per_epoch_limit=-5', 'config.steps_per_epoch_limit must be >= 0, got -5'),
    ('--workdir=launch.py', 'The workdir launch.py is a file, not a folder'),
  ],
)
def test_nan_negative_values_and_a_file_as_workdir_stop_launch_in_one_line(
  fashion_data_dir, tmp_path, flag, error
):
  """These once trained to a useless model with exit 0, or ended in a traceback."""
  workdir = str(tmp_path / 'run')
  args = ['launch.py', '--config=configs/fashion_mnist_student.py', f'--workdir={workdir}', flag]
  proc = _popen([*args, f'--config.data_dir={fashion_data_dir}'])
  out = _finish(proc)
  assert proc.returncode == 1 and 'Traceback' not in out, out
  assert out.strip().splitlines()[-1].startswith(f'Error: {error}'), out
  assert not os.path.exists(workdir)


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
  with pytest.raises(ValueError, match="num_epochs: 2 -> 5.*--allow_config_change \\(resume='any'"):
    experiment.run(changed, workdir)
  assert sorted(os.listdir(workdir)) == before and _steps(workdir) == [8, 9, 11]
  # Fields that do not change the parameters may change; others need the flag.
  safe = saved.copy_and_resolve_references()
  safe.log_every_steps, safe.keep_checkpoints, safe.name = 1, 5, 'renamed'
  assert workdir_lib.check_config(safe, workdir) == []
  allowed = workdir_lib.check_config(changed, workdir, resume='any')
  assert allowed == ['learning_rate: 0.003 -> 0.1', 'num_epochs: 2 -> 5']
  with pytest.raises(ValueError, match=r'num_epochs: 2 -> 5\).*--allow_config_change'):
    workdir_lib.check_config(changed, workdir, resume='optimizer')  # Not only the optimizer.
  with pytest.raises(ValueError, match="resume='yes' is unknown; use one of 'same', 'optimizer'"):
    workdir_lib.check_config(changed, workdir, resume='yes')


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


def _stderr_lines(script: str, check: bool = False) -> list[str]:
  """The stderr lines of `script` run by a fresh Python that imports this repository's modules."""
  proc = subprocess.run(
    [sys.executable, '-c', script],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=REPO),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert not check or proc.returncode == 0, proc.stderr
  return proc.stderr.strip().splitlines()


_CLOSED_LOOP = r"""
import sys, threading
import _testcapi
sys.argv = ['launch.py']
import launch

launch._library_failures_in_one_line()  # As launch.py's main does.


def report(error):  # PyErr_WriteUnraisable with no object, as tensorstore does.
  try:
    raise error
  except Exception as raised:
    _testcapi.write_unraisable_exc(raised, None, None)


def writes():
  for _ in range(3):
    report(RuntimeError('Event loop is closed'))
  report(OSError('another failure'))


thread = threading.Thread(target=writes)
thread.start()
thread.join()
report(RuntimeError('Event loop is closed'))
"""


def test_closed_event_loop_reports_from_background_threads_are_cut_to_one_line():
  """Tensorstore reports writes that finish after orbax's event loop closed (after a failed
  save) as unraisable exceptions from its own threads: a CI run of the full-disk test above
  printed dozens of such tracebacks. Here the same C call, from a thread and the main thread."""
  pytest.importorskip('_testcapi')
  lines = _stderr_lines(_CLOSED_LOOP)
  assert lines.count('orbax: more checkpoint writes failed after the save had stopped.') == 1, lines
  assert lines[-1] == 'OSError: another failure', lines  # Other reports stay whole.
  assert not [line for line in lines if 'Event loop is closed' in line], lines


_UNRETRIEVED = r"""
import asyncio, gc, sys
sys.argv = ['launch.py']
import launch

launch._library_failures_in_one_line()  # As launch.py's main does.


async def write(name):
  raise ValueError(f'RESOURCE_EXHAUSTED: {name}\nmore')


async def main():
  futures = [asyncio.ensure_future(write('task'))]  # The shapes CI's full-disk runs printed.
  futures.append(asyncio.gather(write('gathered 1'), write('gathered 2')))
  futures.append(asyncio.ensure_future(write('task 2')))
  await asyncio.sleep(0.05)
  futures.clear()  # Collected with their exceptions never retrieved: asyncio logs each.
  gc.collect()


asyncio.run(main())
"""


def test_failed_writes_nothing_awaited_are_reported_in_one_line():
  """After a failed save, asyncio logs each orbax write task or gathering future whose exception
  nothing awaited, with its traceback, when it is collected: CI runs of the full-disk test above
  printed one and three of them after the run's own error. Here two tasks and a gather."""
  lines = _stderr_lines(_UNRETRIEVED, check=True)  # A log line may start with a prefix.
  assert len(lines) == 1, lines
  line = r'(Task|_GatheringFuture) exception was never retrieved: RESOURCE_EXHAUSTED: [\w ]+'
  assert re.search(line + '$', lines[0]), lines
