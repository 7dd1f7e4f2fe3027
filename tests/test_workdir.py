"""A run's files: the workdir lock, atomic writes, metrics.jsonl repair, filesystem faults.

The trainer-level tests of the same faults are in tests/test_reliability.py.
"""

import errno
import json
import os
import signal
import socket

import pytest

from lpe import config as config_lib
from lpe import files, metrics_io
from lpe import workdir as workdir_lib
from tests import faults


def test_lock_refuses_a_second_run_naming_the_holder_and_dies_with_it(tmp_path):
  """Refused in one sentence naming host, PID and start; a SIGKILLed holder leaves no stale lock."""
  workdir = str(tmp_path / 'run')
  holder = faults.hold_lock(workdir)
  try:
    expected = (
      rf'{workdir} is in use by another run \(host {socket.gethostname()}, PID {holder.pid}'
    )
    with pytest.raises(workdir_lib.WorkdirInUseError, match=expected + r', started 2\d\d\d-'):
      workdir_lib.check_not_in_use(workdir)
    with pytest.raises(workdir_lib.WorkdirInUseError, match=expected):
      with workdir_lib.lock(workdir):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  workdir_lib.check_not_in_use(workdir)  # The operating system released it with the process.
  with workdir_lib.lock(workdir):
    with pytest.raises(workdir_lib.WorkdirInUseError):  # Even in the same process.
      workdir_lib.check_not_in_use(workdir)
  workdir_lib.check_not_in_use(workdir)


def _no_space(*args, **kwargs):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_atomic_write_on_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(
  tmp_path, monkeypatch
):
  path = str(tmp_path / 'result.json')
  files.write_json(path, {'accuracy': 0.5})
  monkeypatch.setattr(os, 'fsync', _no_space)
  with pytest.raises(files.StorageError) as error:
    files.write_json(path, {'accuracy': 0.9})
  assert str(error.value) == (
    f'Could not write {path}: the disk is full (No space left on device); result.json was not '
    'changed and no temporary file was left; free some space, then run the same command again.'
  )
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ['result.json']
  assert files.read_json(path, fix='unused') == {'accuracy': 0.5}


def test_corrupt_json_is_an_error_naming_the_file_and_the_fix(tmp_path):
  path = tmp_path / 'result.json'
  path.write_text('{"accur')
  with pytest.raises(ValueError, match=rf'{path} is unreadable \(JSONDecodeError: .*\); do this\.'):
    files.read_json(str(path), fix='do this')
  (tmp_path / 'config.json').write_text('{"seed": 0, "mod')
  with pytest.raises(ValueError, match=rf'{tmp_path}/config.json is unreadable .*move it aside'):
    workdir_lib.check_config(config_lib.default_config(), str(tmp_path))


def _write_lines(workdir, *lines: bytes) -> str:
  path = os.path.join(workdir, metrics_io.METRICS_NAME)
  with open(path, 'wb') as f:
    f.write(b''.join(lines))
  return path


RECORD_1 = json.dumps({'epoch': 1, 'step': 8}).encode()
RECORD_2 = json.dumps({'epoch': 2, 'step': 16}).encode()


@pytest.mark.parametrize(
  'tail, torn',
  [
    (RECORD_2[:9], True),  # A write cut short by a kill or a full disk.
    (b'\0' * 40, True),  # A crash after the size grew but before the bytes landed.
    (RECORD_2 + b'\n', False),
    (RECORD_2, False),  # Whole but without its newline: the next append must not join it.
  ],
)
def test_corrupt_last_line_of_metrics_is_repaired_with_a_warning(tmp_path, tail, torn):
  workdir = str(tmp_path)
  path = _write_lines(workdir, RECORD_1 + b'\n', tail)
  kept = [1] if torn else [1, 2]
  assert [r['epoch'] for r in metrics_io.read_metrics(workdir)] == kept  # Read-only: skipped.
  warning = metrics_io.repair_metrics(workdir)
  assert (warning is not None) == torn
  if torn:
    assert warning.startswith(f'{path} ended in a torn line') and 'it was removed' in warning
  with open(path, 'rb') as f:
    assert f.read() == RECORD_1 + b'\n' + (b'' if torn else RECORD_2 + b'\n')
  assert metrics_io.repair_metrics(workdir) is None  # Whole now.


def test_corrupt_metrics_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
  path = _write_lines(str(tmp_path), RECORD_1[:5] + b'\n', RECORD_2 + b'\n')
  with pytest.raises(ValueError, match=rf'{path} line 1 is unreadable .*remove that line'):
    metrics_io.read_metrics(str(tmp_path))
  with pytest.raises(ValueError, match='line 1 is unreadable'):
    metrics_io.repair_metrics(str(tmp_path))


def test_atomic_metrics_append_on_a_full_disk_leaves_no_torn_line(tmp_path, monkeypatch):
  writer = metrics_io.MetricsWriter(str(tmp_path))
  writer.write({'epoch': 1, 'step': 8, 'test_accuracy': 0.5})
  monkeypatch.setattr(os, 'fsync', _no_space)  # After the bytes were appended.
  with pytest.raises(OSError, match='No space left'):
    writer.write({'epoch': 2, 'step': 16, 'test_accuracy': 0.6})
  monkeypatch.undo()
  writer.close()
  assert metrics_io.repair_metrics(str(tmp_path)) is None
  assert [r['epoch'] for r in metrics_io.read_metrics(str(tmp_path))] == [1]


def test_lock_needs_a_usable_workdir_a_file_or_read_only_one_is_refused(tmp_path, monkeypatch):
  a_file = tmp_path / 'file'
  a_file.write_text('x')
  with pytest.raises(files.StorageError, match=f'The workdir {a_file} is a file, not a folder'):
    workdir_lib.check_usable(str(a_file))
  with pytest.raises(files.StorageError, match=f'cannot be created: {a_file} is a file'):
    workdir_lib.check_usable(str(a_file / 'run'))
  workdir_lib.check_usable(str(tmp_path / 'new' / 'run'))  # Creatable: fine, and not created.
  assert not os.path.exists(tmp_path / 'new')

  statvfs = os.statvfs
  read_only = lambda path: os.statvfs_result((*statvfs(path)[:8], os.ST_RDONLY, 255))
  monkeypatch.setattr(os, 'statvfs', read_only)
  with pytest.raises(files.StorageError, match=f'{tmp_path} .*is on a read-only filesystem'):
    workdir_lib.check_usable(str(tmp_path / 'run'))


def test_storage_fault_is_read_from_orbax_and_tensorstore_errors():
  """Orbax reports a full disk as a ValueError whose text holds the OS error code."""
  path = '/w/checkpoints/9.orbax-checkpoint-tmp/default/ocdbt.process_0/d/664d'
  text = (
    'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "/w/checkpoints/9'
    f'.orbax-checkpoint-tmp/default/ocdbt.process_0/": Failed writing: "{path}": Failed to write '
    "497976 bytes to file 7: No space left on device [os_error_code='28']"
  )
  try:
    try:
      raise ValueError(text)
    except ValueError as error:
      raise RuntimeError('Save Finalize thread failed') from error
  except RuntimeError as error:
    assert files.storage_fault(error) == (errno.ENOSPC, path)
  assert files.storage_fault(OSError(errno.EROFS, 'Read-only', '/x')) == (errno.EROFS, '/x')
  assert files.storage_fault(ValueError('an ordinary error')) is None
