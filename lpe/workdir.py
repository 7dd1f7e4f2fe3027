"""A run's workdir: its lock, the config guard, the config it was made with, its finished result.

Layout: `lock` (held by the one run working there), `config.json` (the config, checked on every
start), `metrics.jsonl` and `tensorboard/` (lpe.metrics_io), `checkpoints/` (lpe.checkpoint),
and once finished `model.msgpack`, `model.json` and `result.json`. Whole files are written
atomically (`lpe.files`); a workdir that cannot be written, and a full disk during a run, are
one-sentence `lpe.files.StorageError`s.
"""

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from lpe import checkpoint, files, metrics_io
from lpe import config as config_lib

CONFIG_NAME = 'config.json'
RESULT_NAME = 'result.json'
# Held (flock) by the one process that runs in the workdir; records who that is.
LOCK_NAME = 'lock'
# The result fields that `model.json` repeats beside the exported model.
# What an exported model is, and the inputs it takes (`lpe.data.info_of_model`).
EXPORT_META = (
  'model',
  'dataset',
  'num_classes',
  'image_size',
  'mean',
  'std',
  'augment',
  'params',
  'test_accuracy',
)


def check_config(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  resume: config_lib.Resume = 'same',
) -> list[str]:
  """Refuses to continue the run in `workdir` with a config that differs from its config.json.

  Fields in `lpe.config.RESUME_SAFE_FIELDS` may change freely, those in
  `lpe.config.OPTIMIZER_FIELDS` with `resume='optimizer'` (the way forward after a divergence:
  resume from the last good checkpoint with a lower learning rate), and any field with
  `resume='any'`. Reads files only.

  Returns:
    The changed fields (`'field: old -> new'`) that were allowed.
  """
  if resume not in config_lib.RESUME_POLICIES:
    policies = ', '.join(map(repr, config_lib.RESUME_POLICIES))
    raise ValueError(f'resume={resume!r} is unknown; use one of {policies}.')
  path = os.path.join(workdir, CONFIG_NAME)
  if not os.path.exists(path):
    return []
  saved = files.read_json(
    path,
    fix=f'move it aside if {workdir} holds the run you mean to continue, or use another workdir',
  )
  changes = config_lib.changed_fields(saved, json.loads(config.to_json_best_effort()))
  optimizer = [c for c in changes if c.split(':')[0] in config_lib.OPTIMIZER_FIELDS]
  refused = {'same': changes, 'optimizer': [c for c in changes if c not in optimizer], 'any': []}
  if refused[resume]:
    shown = '; '.join(refused[resume][:3])
    if len(refused[resume]) > 3:
      shown += f'; and {len(refused[resume]) - 3} more'
    needed = 'optimizer' if not refused['optimizer'] else 'any'
    option = {'optimizer': 'allow_optimizer_change', 'any': 'allow_config_change'}[needed]
    raise ValueError(
      f'{workdir} holds a run made with another config ({shown}); use another --workdir, or '
      f"pass --{option} (resume='{needed}' in Python) to continue it with this config."
    )
  return changes


def write_config(config: ml_collections.ConfigDict, workdir: str, changes: list[str]) -> None:
  """Writes config.json atomically; a replaced config is kept as config.<time>.json."""
  path = os.path.join(workdir, CONFIG_NAME)
  if changes:
    os.replace(path, os.path.join(workdir, f'config.{time.strftime("%Y%m%d-%H%M%S")}.json'))
  files.write_atomic(path, config.to_json_best_effort(indent=2))


def finished_result(
  workdir: str, config: ml_collections.ConfigDict, *, warn: Callable[[str], None] | None = None
) -> dict[str, Any] | None:
  """The saved result of a run of `config` that finished in `workdir`, or None.

  An unreadable result.json (written in place by an older lpe, or damaged) is rebuilt: the run
  is finished again from its last checkpoint; `warn` is given the warning.

  Raises:
    ValueError: result.json is unreadable and no checkpoint is left to rebuild it from.
  """
  path = os.path.join(workdir, RESULT_NAME)
  if not (os.path.exists(path) and os.path.exists(os.path.join(workdir, checkpoint.EXPORT_NAME))):
    return None
  steps = checkpoint.saved_steps(workdir)
  fix = (
    f'it is rebuilt from checkpoint {steps[-1]}'
    if steps
    else f'no checkpoint is left to rebuild it from, so move {workdir} aside to train the run again'
  )
  try:
    result = files.read_json(path, fix=fix)
    if not isinstance(result, dict):
      raise ValueError(f'{path} is unreadable (it holds no result); {fix}.')
  except ValueError as error:
    if not steps:
      raise
    if warn is not None:
      warn(str(error))
    return None
  return result if result.get('num_epochs') == config.num_epochs else None


def epoch_record_missing(workdir: str, step: int, steps_per_epoch: int) -> bool:
  """Whether `step` ends an epoch that metrics.jsonl has no record of (killed before writing it)."""
  if step == 0 or step % steps_per_epoch:
    return False
  epochs = {r['epoch'] for r in metrics_io.read_metrics(workdir)}
  missing = np.int32(step // steps_per_epoch not in epochs)
  if jax.process_count() > 1:  # Evaluation is collective: every process must agree.
    missing = multihost_utils.broadcast_one_to_all(missing)
  return bool(missing)


def write_result(workdir: str, variables: Any, result: dict[str, Any]) -> None:
  """Exports the finished model (`model.msgpack` + `model.json`), then writes `result.json`;
  each file atomically, so result.json exists only beside a complete export."""
  checkpoint.export_variables(
    os.path.join(workdir, checkpoint.EXPORT_NAME),
    variables,
    {k: result[k] for k in EXPORT_META},
  )
  files.write_json(os.path.join(workdir, RESULT_NAME), result)


class WorkdirInUseError(RuntimeError):
  """Another run holds the workdir's lock."""


def check_usable(workdir: str) -> None:
  """Raises a `StorageError` unless `workdir` is, or can be made, a writable folder.

  Checked before any data is loaded; writes nothing: a workdir that is a file, lies under a
  file, is on a read-only filesystem or is not writable for this user.
  """
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise files.StorageError(
      f'The workdir {workdir} is a file, not a folder; pass a folder (it is created if missing).'
    )
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise files.StorageError(
      f'The workdir {workdir} cannot be created: {existing} is a file; pass a workdir in a folder.'
    )
  problem = None
  if os.statvfs(existing).f_flag & os.ST_RDONLY:
    problem = 'is on a read-only filesystem'
  elif not os.access(existing, os.W_OK | os.X_OK):
    problem = 'is not writable for this user'
  if problem:
    what = workdir if existing == path else f'{existing} (where the workdir {workdir} would go)'
    raise files.StorageError(f'{what} {problem}; pass a workdir on a writable disk.')


def check_not_in_use(workdir: str) -> None:
  """Raises `WorkdirInUseError` at once when another run holds `workdir`'s lock; writes nothing.

  (`lock` takes the lock itself, at the run's first write.)
  """
  holder = ''
  if jax.process_index() == 0:
    holder = _holder(workdir) or ''
  _agree_or_refuse(workdir, holder)


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Creates `workdir` and holds its lock for one run: a second run there is refused.

  The lock is an exclusive `flock` on `workdir/lock`, which the operating system releases when
  the holder exits or dies (SIGKILL included), so it is never stale. The file records the holder
  (host, PID, start time) for the refusal's message. A multi-host run takes it once, on process
  0, and every process learns whether it was refused.

  Raises:
    WorkdirInUseError: another run holds it; the message names that run's host, PID and start.
  """
  fd, holder = None, ''
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(os.path.join(workdir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _describe(fd)
      os.close(fd)
      fd = None
  _agree_or_refuse(workdir, holder)
  try:
    if fd is not None:
      me = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time()}
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(me).encode(), 0)
    yield
  finally:
    if fd is not None:
      os.ftruncate(fd, 0)  # The file stays (removing it would race with the next run).
      os.close(fd)


def _holder(workdir: str) -> str | None:
  """Who holds `workdir`'s lock, or None; probes with a shared lock, released at once."""
  try:
    fd = os.open(os.path.join(workdir, LOCK_NAME), os.O_RDONLY)
  except OSError:  # No lock file (or no workdir): nobody holds it.
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except BlockingIOError:
    return _describe(fd)
  finally:
    os.close(fd)
  return None


def _describe(fd: int) -> str:
  """`'host h, PID p, started <time>'` from a held lock file (its holder may still be writing)."""
  try:
    me = json.loads(os.pread(fd, 4096, 0).decode())
    started = time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(me['started']))
    return f'host {me["host"]}, PID {me["pid"]}, started {started}'
  except (OSError, ValueError, KeyError, TypeError):
    return 'a run that has not yet recorded its host and PID'


def _agree_or_refuse(workdir: str, holder: str) -> None:
  """Raises `WorkdirInUseError` on every process when process 0 found `holder` ('' = nobody)."""
  refused = bool(holder)
  if jax.process_count() > 1:
    refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refused)))
  if refused:
    holder = holder or 'see process 0'
    raise WorkdirInUseError(
      f'{workdir} is in use by another run ({holder}); wait for it to finish or stop it, or use '
      'another --workdir.'
    )


@contextlib.contextmanager
def storage_faults(workdir: str) -> Iterator[None]:
  """Turns a full disk, a read-only filesystem or a denied write during a run (of a checkpoint,
  metrics.jsonl, config.json or the export) into a `StorageError` naming the file and what was
  kept: the completed checkpoints, from which the same command resumes."""
  try:
    yield
  except Exception as error:
    fault = files.storage_fault(error)
    if fault is None:
      raise
    steps = checkpoint.saved_steps(workdir)
    kept = f'the checkpoints up to step {steps[-1]} are kept' if steps else 'no checkpoint is saved'
    raise files.StorageError(
      files.fault_message(fault[0], fault[1] or workdir, kept), code=fault[0], filename=fault[1]
    ) from error


def remove_temporaries(workdir: str) -> None:
  """Removes the temporary files that writes cut short by a kill left in `workdir` (call it
  under the lock, when no other process can be writing them)."""
  for name in os.listdir(workdir):
    path = os.path.join(workdir, name)
    if name.endswith(files.TMP_SUFFIX) and os.path.isfile(path):
      os.remove(path)
