"""Checkpoints: orbax for the training state in a workdir, and portable exported parameters.

Two kinds of file, one job each:
- `workdir/checkpoints/<step>/`: the full train state (orbax `CheckpointManager`, keep-last-N),
  written during training and restored automatically when the same run is started again.
- `model.msgpack` + `model.json`: a finished model's variables (params and batch statistics) and
  what they are (model name, classes, dataset, accuracy, SHA-256 of the msgpack). This is what a
  teacher is loaded from; the checksum is verified on every load.
"""

import hashlib
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import serialization

EXPORT_NAME = 'model.msgpack'


def checkpoint_manager(workdir: str, *, max_to_keep: int) -> ocp.CheckpointManager:
  """An orbax manager over `workdir/checkpoints` that keeps the last `max_to_keep` saves."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), 'checkpoints'), options=options
  )


def save_state(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Saves `state` at `step` unless that step is saved already.

  The save is asynchronous; call `manager.wait_until_finished()` before exit.
  """
  if manager.latest_step() == step:
    return
  manager.save(step, args=ocp.args.StandardSave(state), force=True)


def restore_latest(manager: ocp.CheckpointManager, state: Any) -> Any | None:
  """Restores the latest saved state into the structure and shardings of `state`, or None."""
  step = manager.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def _sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _meta_path(path: str) -> str:
  return os.path.splitext(path)[0] + '.json'


def export_variables(path: str, variables: dict[str, Any], meta: dict[str, Any]) -> None:
  """Writes `variables` to `path` (msgpack) and `meta` plus the file's SHA-256 beside it (.json)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(serialization.msgpack_serialize(jax.device_get(variables)))
  os.replace(tmp, path)
  meta = dict(meta, sha256=_sha256(path))
  with open(_meta_path(path), 'w') as f:
    json.dump(meta, f, indent=2)


def resolve_export(path: str) -> str:
  """Accepts a `.msgpack` file or a run's workdir and returns the exported file's path."""
  if os.path.isdir(path):
    path = os.path.join(path, EXPORT_NAME)
    if not os.path.exists(path):
      raise FileNotFoundError(
        f'{os.path.dirname(path)} holds no finished model ({EXPORT_NAME}); run its training '
        'command again to finish it, or point to a .msgpack file.'
      )
  if not os.path.exists(path):
    raise FileNotFoundError(f'Model file {path} does not exist; check the path.')
  return path


def load_variables(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Loads exported variables and their metadata, verifying the SHA-256 recorded beside them.

  Args:
    path: a `.msgpack` file written by `export_variables`, or a workdir that holds one.

  Returns:
    `(variables, meta)`.
  """
  path = resolve_export(path)
  meta_path = _meta_path(path)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f'{meta_path} is missing: it records what {path} holds and its hash.')
  with open(meta_path) as f:
    meta = json.load(f)
  digest = _sha256(path)
  if digest != meta.get('sha256'):
    raise ValueError(
      f'{path} is corrupt or was changed: its SHA-256 is {digest}, but {meta_path} records '
      f'{meta.get("sha256")}; re-create or re-download it.'
    )
  with open(path, 'rb') as f:
    variables = serialization.msgpack_restore(f.read())
  return variables, meta


def check_variables_match(variables: Any, expected: Any, *, what: str) -> None:
  """Raises a ValueError naming the first difference between two variable trees' shapes."""
  got = jax.tree_util.tree_flatten_with_path(variables)[0]
  want = jax.tree_util.tree_flatten_with_path(expected)[0]
  got_shapes = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in got}
  want_shapes = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in want}
  for key in sorted(set(got_shapes) | set(want_shapes)):
    if got_shapes.get(key) != want_shapes.get(key):
      raise ValueError(
        f'{what} does not fit the configured architecture: {key} has shape '
        f'{got_shapes.get(key)} in the file but {want_shapes.get(key)} in the model; check that '
        'the config names the same model and number of classes that made the file.'
      )
