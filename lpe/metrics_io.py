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
  """The per-epoch records of a run, one per epoch (the latest record wins after a resume)."""
  path = os.path.join(workdir, METRICS_NAME)
  if not os.path.exists(path):
    return []
  by_epoch = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        by_epoch[record['epoch']] = record
  return [by_epoch[e] for e in sorted(by_epoch)]


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
    if not self._active:
      return
    with open(self._path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    for key, value in record.items():
      if key not in ('epoch', 'step') and isinstance(value, int | float):
        self._tb.add_scalar(key, value, record['step'])
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
