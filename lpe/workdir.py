"""A run's workdir: the config guard, the config it was made with, and its finished result.

Layout: `config.json` (the config, checked on every start), `metrics.jsonl` and `tensorboard/`
(lpe.metrics_io), `checkpoints/` (lpe.checkpoint), and once finished `model.msgpack`,
`model.json` and `result.json`.
"""

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from lpe import checkpoint, metrics_io
from lpe import config as config_lib

CONFIG_NAME = 'config.json'
RESULT_NAME = 'result.json'
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
  config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> list[str]:
  """Refuses to continue the run in `workdir` with a config that differs from its config.json.

  Fields in `lpe.config.RESUME_SAFE_FIELDS` may change freely. Reads files only.

  Returns:
    The changed fields (`'field: old -> new'`), allowed by `allow_config_change`.
  """
  path = os.path.join(workdir, CONFIG_NAME)
  if not os.path.exists(path):
    return []
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as error:
    raise ValueError(
      f'{path} is unreadable ({error}); move it aside if {workdir} holds the run you mean to '
      'continue, or use another --workdir.'
    ) from error
  changes = config_lib.changed_fields(saved, json.loads(config.to_json_best_effort()))
  if changes and not allow_config_change:
    shown = '; '.join(changes[:3]) + (f'; and {len(changes) - 3} more' if len(changes) > 3 else '')
    raise ValueError(
      f'{workdir} holds a run made with another config ({shown}); use another --workdir, or '
      'pass --allow_config_change (allow_config_change=True) to continue it with this config.'
    )
  return changes


def write_config(config: ml_collections.ConfigDict, workdir: str, changes: list[str]) -> None:
  """Writes config.json atomically; a replaced config is kept as config.<time>.json."""
  path = os.path.join(workdir, CONFIG_NAME)
  if changes:
    os.replace(path, os.path.join(workdir, f'config.{time.strftime("%Y%m%d-%H%M%S")}.json'))
  with open(path + '.tmp', 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(path + '.tmp', path)


def finished_result(workdir: str, config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """The saved result of a run of `config` that finished in `workdir`, or None."""
  path = os.path.join(workdir, RESULT_NAME)
  if not (os.path.exists(path) and os.path.exists(os.path.join(workdir, checkpoint.EXPORT_NAME))):
    return None
  with open(path) as f:
    result = json.load(f)
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
  """Exports the finished model (`model.msgpack` + `model.json`) and writes `result.json`."""
  checkpoint.export_variables(
    os.path.join(workdir, checkpoint.EXPORT_NAME),
    variables,
    {k: result[k] for k in EXPORT_META},
  )
  with open(os.path.join(workdir, RESULT_NAME), 'w') as f:
    json.dump(result, f, indent=2)
