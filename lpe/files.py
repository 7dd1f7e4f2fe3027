"""A run's files on disk: atomic writes, readable-or-named reads, and filesystem faults in one line.

Every file lpe writes whole (`config.json`, `result.json`, `model.msgpack` and `model.json`,
`evaluation.json`, a comparison's `summary.md`, the caches of decoded splits, normalisation
constants and teacher outputs, a study's pages and plots) goes through `write_atomic`: the bytes
go to a temporary file beside the target, are flushed to the disk (fsync), and the temporary file
is renamed over the target. A kill, a crash or a full disk therefore leaves the old file or the
new one, never a torn one; a failed write removes its temporary file. `metrics.jsonl`, the one
file that is appended to, has its own repair (`lpe.metrics_io`).

A full disk, an exceeded quota, a read-only filesystem or a denied permission is a
`StorageError`: one sentence that names the file, what was kept and what to do.
"""

import errno
import json
import os
import re
import uuid
from collections.abc import Callable
from typing import Any, BinaryIO

# Faults of the filesystem rather than of lpe: what each means, and what to do about it.
_FAULTS = {
  errno.ENOSPC: ('the disk is full', 'free some space'),
  errno.EDQUOT: ('the disk quota is exceeded', 'free some space or raise the quota'),
  errno.EROFS: ('its filesystem is read-only', 'use a writable workdir'),
  errno.EACCES: ('permission was denied', 'make it writable for this user or use another workdir'),
  errno.EPERM: ('permission was denied', 'make it writable for this user or use another workdir'),
}
TMP_SUFFIX = '.tmp'


class StorageError(RuntimeError):
  """A run's file cannot be written (disk full, read-only, permission), or its workdir is unusable.

  `errno` and `filename` say what failed, when it was a write.
  """

  def __init__(self, message: str, *, code: int | None = None, filename: str | None = None):
    super().__init__(message)
    self.errno, self.filename = code, filename


def fault_message(code: int, path: str, kept: str) -> str:
  """`'Could not write <path>: <reason>; <kept>; <fix>, then run the same command again.'`"""
  reason, fix = _FAULTS.get(code, (os.strerror(code), 'fix the filesystem'))
  return (
    f'Could not write {path}: {reason} ({os.strerror(code)}); {kept}; {fix}, then run the same '
    'command again.'
  )


def write_atomic(path: str, content: bytes | str | Callable[[BinaryIO], None]) -> None:
  """Replaces `path` with `content` atomically: the old file or the new one, never a torn one.

  `content` is the bytes or text, or a function that writes them to the binary file it is given
  (for a large file better not held in memory twice, e.g. `lambda f: np.savez(f, x=x)`).

  Example: `write_atomic('runs/lp/result.json', json.dumps(result))`.

  Raises:
    StorageError: the disk is full, read-only or not writable; `path` is unchanged and no
      temporary file is left.
  """
  data = content.encode() if isinstance(content, str) else content
  # A name of its own: two writers of one path (hosts sharing a folder) cannot collide.
  tmp = f'{path}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}'
  try:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, 'wb') as f:
      if callable(data):
        data(f)
      else:
        f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as error:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(error, OSError) and error.errno in _FAULTS:
      kept = f'{os.path.basename(path)} was not changed and no temporary file was left'
      message = fault_message(error.errno, path, kept)
      raise StorageError(message, code=error.errno, filename=path) from error
    raise
  _fsync_folder(os.path.dirname(os.path.abspath(path)))


def write_json(path: str, value: Any) -> None:
  """`write_atomic` of `value` as indented JSON."""
  write_atomic(path, json.dumps(value, indent=2) + '\n')


def read_json(path: str, *, fix: str) -> Any:
  """The JSON value in `path`.

  Raises:
    ValueError: the file cannot be read or parsed; the message names it, the error and `fix`.
  """
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as error:
    raise ValueError(f'{path} is unreadable ({first_line(error)}); {fix}.') from error


def storage_fault(error: BaseException) -> tuple[int, str] | None:
  """`(errno, path)` when `error` (or what caused it) is a filesystem fault, else None.

  Orbax and TensorStore report a failed write as a ValueError whose text holds the OS error code
  (`[os_error_code='28']`) and the path, so that text is read too.
  """
  for link in _chain(error):
    if isinstance(link, StorageError) and link.errno in _FAULTS:
      return link.errno, link.filename or ''
    if isinstance(link, OSError) and link.errno in _FAULTS:
      return link.errno, link.filename or ''
    code = re.search(r"os_error_code='?(\d+)", str(link))
    if code and int(code.group(1)) in _FAULTS:
      paths = re.findall(r'"(/[^"]+)"', str(link))
      return int(code.group(1)), paths[-1] if paths else ''
  return None


def _chain(error: BaseException) -> list[BaseException]:
  links, seen = [], set()
  while error is not None and id(error) not in seen and len(links) < 20:
    links.append(error)
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return links


def _fsync_folder(folder: str) -> None:
  """Makes a rename durable (the folder's entry); some filesystems cannot, which is harmless."""
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def first_line(error: BaseException) -> str:
  """The error's type and the first line of its message, for one-sentence errors."""
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0][:200]}' if text else type(error).__name__
