"""Per-epoch metrics: JSON lines and TensorBoard events in the workdir, written by process 0."""

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

METRICS_NAME = 'metrics.jsonl'


def mean_metrics(window: Sequence[dict[str, Any]]) -> dict[str, float]:
  """The mean of each scalar metric over a window of steps."""
  if not window:
    return {}
  return {k: float(np.mean([m[k] for m in window])) for k in window[0]}


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The per-epoch records of a run, one per epoch (the latest record wins after a resume).

  A torn last line (a write cut short by a kill or a full disk) is left out; `repair_metrics`
  removes it.

  Raises:
    ValueError: a line before the last cannot be read; the message names the file and line.
  """
  by_epoch = {r['epoch']: r for r in read_records(os.path.join(workdir, METRICS_NAME), 'epoch')}
  return [by_epoch[e] for e in sorted(by_epoch)]


def repair_metrics(workdir: str) -> str | None:
  """Cuts a torn last line from `metrics.jsonl` and ends the file with a newline.

  Call it before a resumed run appends (process 0, under the workdir's lock). The lost epoch
  record, if any, is written again: recovered from its checkpoint or by replaying the epoch.

  Returns:
    A warning naming what was removed, or None when the file was whole.
  """
  return repair_records(
    os.path.join(workdir, METRICS_NAME), 'epoch', 'the epoch record it held is written again'
  )


def read_records(path: str, key: str) -> list[dict[str, Any]]:
  """The records of a JSON-lines file, each an object holding `key`, in file order; [] for no
  file. A torn last line is left out (`repair_records` removes it).

  Raises:
    ValueError: a line before the last cannot be read; the message names the file and line.
  """
  if not os.path.exists(path):
    return []
  with open(path, 'rb') as f:
    records, _ = _parse(f.read(), path, key)
  return records


def repair_records(path: str, key: str, consequence: str) -> str | None:
  """Cuts a torn last line from the JSON-lines file `path` and ends it with a newline.

  Returns:
    A warning naming what was removed and `consequence`, or None when the file was whole.
  """
  if not os.path.exists(path):
    return None
  with open(path, 'rb') as f:
    content = f.read()
  _, good_bytes = _parse(content, path, key)
  if not content or (good_bytes == len(content) and content.endswith(b'\n')):
    return None
  torn, whole = content[good_bytes:], content[:good_bytes]
  with open(path, 'r+b') as f:
    f.truncate(good_bytes)
    if whole and not whole.endswith(b'\n'):
      f.seek(good_bytes)
      f.write(b'\n')
    f.flush()
    os.fsync(f.fileno())
  if not torn.strip():
    return None  # Only a missing newline: nothing was lost.
  shown = torn.strip()[:60].decode(errors='replace')
  return (
    f'{path} ended in a torn line ({len(torn)} bytes: {shown!r}), left by a kill or a full disk '
    f'mid-write; it was removed, and {consequence}.'
  )


def append_record(path: str, record: dict[str, Any]) -> None:
  """Appends `record` to `path` as one JSON line, flushed to the disk; a failed append leaves no
  torn line."""
  line = memoryview((json.dumps(record) + '\n').encode())
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
  size = os.fstat(fd).st_size
  try:
    while line:
      line = line[os.write(fd, line) :]
    os.fsync(fd)
  except OSError:
    os.ftruncate(fd, size)  # Cut the partial line (a full disk can still shrink a file).
    raise
  finally:
    os.close(fd)


def _parse(content: bytes, path: str, key: str) -> tuple[list[dict[str, Any]], int]:
  """The records of `content`, and how many of its bytes are whole lines up to a torn last one."""
  records, offset = [], 0
  lines = content.split(b'\n')
  for i, line in enumerate(lines):
    if line.strip():
      try:
        record = json.loads(line)
        if not isinstance(record, dict) or key not in record:
          raise ValueError(f'not a record with {key!r}')
      except ValueError as error:
        if any(rest.strip() for rest in lines[i + 1 :]):
          raise ValueError(
            f'{path} line {i + 1} is unreadable ({error}); remove that line (what it recorded '
            'is then done again) or move the file aside, and run the same command again.'
          ) from error
        return records, offset  # A torn last line.
      records.append(record)
    offset += len(line) + 1
  return records, len(content)


class MetricsWriter:
  """Appends epoch records to `metrics.jsonl` and TensorBoard; a no-op on processes other than 0."""

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    self._path = os.path.join(workdir, METRICS_NAME)
    self._tb = None
    if self._active:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, record: dict[str, Any]) -> None:
    """Appends `record` as one line, flushed to the disk; a failed append leaves no torn line."""
    if not self._active:
      return
    append_record(self._path, record)
    for key, value in record.items():
      if key not in ('epoch', 'step') and isinstance(value, int | float):
        self._tb.add_scalar(key, value, record['step'])
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
