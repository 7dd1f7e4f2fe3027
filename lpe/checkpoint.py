"""Checkpoints: orbax for the training state in a workdir, and portable exported parameters.

Two kinds of file, one job each:
- `workdir/checkpoints/<step>/`: the full train state (orbax `CheckpointManager`, keep-last-N),
  written during training and restored automatically when the same run is started again. Orbax
  writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a save cut
  short by a kill is never listed as a step. Each save also records a SHA-256 of the state in the
  step's metadata; a restore checks it, because orbax itself restores some damaged files (flipped
  bytes in the array data) without an error. A damaged step is moved to
  `workdir/corrupt_checkpoints/` (never deleted) and the previous step is restored instead.
- `model.msgpack` + `model.json`: a finished model's variables (params and batch statistics) and
  what they are (model name, classes, dataset, accuracy, SHA-256 of the msgpack). This is what a
  teacher is loaded from; the checksum is verified on every load.
"""

import functools
import hashlib
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization

from lpe import files, models

EXPORT_NAME = 'model.msgpack'
CORRUPT_DIR = 'corrupt_checkpoints'
# The key of the state's SHA-256 in each step's orbax custom metadata.
FINGERPRINT_KEY = 'lpe_state_sha256'


class CorruptCheckpointError(RuntimeError):
  """A saved checkpoint cannot be read back, or reads back other values than were saved."""


def checkpoint_manager(
  workdir: str, *, max_to_keep: int, for_training: bool = True
) -> ocp.CheckpointManager:
  """An orbax manager over `workdir/checkpoints` that keeps the last `max_to_keep` saves.

  For training it creates the folder and removes the `*.orbax-checkpoint-tmp` folders of saves a
  kill cut short; otherwise (evaluation, possibly beside a running trainer) it touches nothing.
  """
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep, create=for_training, cleanup_tmp_directories=for_training
  )
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), 'checkpoints'),
    options=options,
    item_handlers=ocp.StandardCheckpointHandler(),
  )


def state_fingerprint(state: Any) -> str:
  """SHA-256 of every leaf of `state` (path, shape and bytes; integers as int64)."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    array = np.asarray(jax.device_get(leaf))
    if array.dtype.kind in 'iub':
      array = array.astype(np.int64)  # A step saved as int32 may come back as int64.
    digest.update(f'{path_name(path)}{array.shape};'.encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def save_state(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Saves `state` at `step`, with its fingerprint, unless that step is saved already.

  The save is asynchronous; call `manager.wait_until_finished()` before exit.
  """
  if manager.latest_step() == step:
    return
  manager.save(
    step,
    args=ocp.args.StandardSave(state),
    custom_metadata={FINGERPRINT_KEY: state_fingerprint(state)},
    force=True,
  )


def restore_step(manager: ocp.CheckpointManager, step: int, state: Any) -> Any:
  """Restores checkpoint `step` into the structure and shardings of `state` (or its abstract form).

  Raises:
    ValueError: the checkpoint holds arrays of other shapes (another architecture or number of
      classes); the message names the first difference.
    CorruptCheckpointError: the checkpoint cannot be read, or its values do not match the
      fingerprint recorded when it was saved.
  """
  where = f'Checkpoint step {step} in {manager.directory}'
  try:
    metadata = manager.metadata(step)
    saved_tree = metadata.item_metadata
    if saved_tree is None:
      raise ValueError('it lists no saved arrays')
  except Exception as error:  # Orbax and TensorStore raise many types for damaged files.
    raise CorruptCheckpointError(f'{where} is unreadable ({files.first_line(error)}).') from error
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  check_variables_match(saved_tree, abstract, what=where, fix=_CHECKPOINT_FIX)
  try:
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as error:
    raise CorruptCheckpointError(f'{where} is unreadable ({files.first_line(error)}).') from error
  expected = _fingerprint(manager, step)
  if expected is None:
    # Orbax reads a damaged step metadata file as empty: a run whose other steps have
    # fingerprints lost this one to damage; a run without any was saved by an older lpe.
    if any(_fingerprint(manager, s) for s in manager.all_steps() if s != step):
      raise CorruptCheckpointError(f'{where} has lost its fingerprint (damaged metadata).')
    logging.warning('%s has no fingerprint (saved by an older lpe); restored unverified.', where)
  elif state_fingerprint(restored) != expected:
    raise CorruptCheckpointError(
      f'{where} reads back other values than were saved (its SHA-256 does not match).'
    )
  return restored


def saved_array(manager: ocp.CheckpointManager, step: int, key: str) -> Any:
  """The shape and dtype (`jax.ShapeDtypeStruct`) of the top-level array `key` of checkpoint
  `step`, or None when it holds none (or its metadata cannot be read)."""
  try:
    leaf = manager.metadata(step).item_metadata.get(key)
  except Exception:  # Unreadable metadata: `restore_step` names the damage.
    return None
  return None if leaf is None else jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)


def restore_latest(
  manager: ocp.CheckpointManager, state: Any, *, warn: Callable[[str], None] | None = None
) -> Any | None:
  """Restores the newest good checkpoint into the structure and shardings of `state`, or None.

  A checkpoint that cannot be read or fails its fingerprint is skipped with a warning (logged,
  and passed to `warn`), and once an older good one is restored it is moved to
  `<workdir>/corrupt_checkpoints/` (kept for inspection, out of orbax's way) so the run can save
  that step again. Nothing is moved or deleted when no checkpoint is good.

  Raises:
    ValueError: the checkpoints hold another architecture than `state`.
    CorruptCheckpointError: checkpoints exist but none can be restored.
  """
  bad = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = restore_step(manager, step, state)
    except CorruptCheckpointError as error:
      logging.warning('%s Trying the previous checkpoint.', error)
      bad.append((step, error))
      continue
    for bad_step, error in bad:
      moved = _set_aside(manager, bad_step)
      message = f'{error} It was moved to {moved}; resuming from step {step} instead.'
      logging.warning(message)
      if warn is not None:
        warn(message)
    if bad:
      manager.reload()
    return restored
  if bad:
    raise CorruptCheckpointError(
      f'None of the {len(bad)} checkpoints in {manager.directory} can be restored (the latest: '
      f'{str(bad[0][1]).rstrip(".")}); move that folder aside to start the run over.'
    )
  return None


_CHECKPOINT_FIX = (
  'check that the config (config.json for a workdir) names the model and number of classes '
  'that made the checkpoint'
)


def _fingerprint(manager: ocp.CheckpointManager, step: int) -> str | None:
  try:
    return (manager.metadata(step).custom_metadata or {}).get(FINGERPRINT_KEY)
  except Exception:  # Unreadable: as good as absent.
    return None


def _set_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves a bad step folder to `<workdir>/corrupt_checkpoints/<step>-<time>`; returns the path."""
  source = os.path.join(str(manager.directory), str(step))
  target = os.path.join(
    os.path.dirname(str(manager.directory)), CORRUPT_DIR, f'{step}-{int(time.time())}'
  )
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(source, target)
  return target


def path_name(path) -> str:
  """A key path as `a/b/0`, the same for a dataclass field, a dict key and a sequence index."""
  names = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
  return '/'.join(names)


def saved_steps(workdir: str) -> list[int]:
  """The completed checkpoint steps in `workdir` (read from the folder; no orbax needed)."""
  folder = os.path.join(workdir, 'checkpoints')
  names = os.listdir(folder) if os.path.isdir(folder) else []
  return sorted(int(n) for n in names if n.isdigit())


def _sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _meta_path(path: str) -> str:
  return os.path.splitext(path)[0] + '.json'


def export_variables(path: str, variables: dict[str, Any], meta: dict[str, Any]) -> None:
  """Writes `variables` to `path` (msgpack) and `meta` plus the file's SHA-256 beside it (.json).

  Both are written atomically (`lpe.files.write_atomic`): a failed export leaves the previous
  files, or none, and no temporary file.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  payload = serialization.msgpack_serialize(jax.device_get(variables))
  files.write_atomic(path, payload)
  files.write_json(_meta_path(path), dict(meta, sha256=hashlib.sha256(payload).hexdigest()))


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


def read_meta(path: str) -> dict[str, Any]:
  """The `model.json` of an exported model (`path`: its `.msgpack` or a workdir that holds one):
  what the file holds (model, classes, dataset, inputs) without reading the weights."""
  path = resolve_export(path)
  meta_path = _meta_path(path)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f'{meta_path} is missing: it records what {path} holds and its hash.')
  return files.read_json(meta_path, fix=f'export or copy {path} and {meta_path} again')


def load_variables(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Loads exported variables and their metadata, verifying the SHA-256 recorded beside them.

  Args:
    path: a `.msgpack` file written by `export_variables`, or a workdir that holds one.

  Returns:
    `(variables, meta)`.
  """
  path = resolve_export(path)
  meta = read_meta(path)
  meta_path = _meta_path(path)
  digest = _sha256(path)
  if digest != meta.get('sha256'):
    raise ValueError(
      f'{path} is corrupt or was changed: its SHA-256 is {digest}, but {meta_path} records '
      f'{meta.get("sha256")}; re-create or re-download it.'
    )
  try:
    with open(path, 'rb') as f:
      variables = serialization.msgpack_restore(f.read())
    if not isinstance(variables, dict):
      raise ValueError(f'it holds a {type(variables).__name__}, not a tree of variables')
  except Exception as error:  # msgpack raises several types for truncated or foreign bytes.
    raise ValueError(
      f'{path} cannot be read as an exported model ({files.first_line(error)}): it is truncated '
      'or not a model.msgpack written by lpe; export or copy it again.'
    ) from error
  return variables, meta


def load_model(
  path: str, image_shape: tuple[int, ...], *, what: str = 'Model file', **build_kwargs
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
  """An exported model, ready to run: `(module, variables, meta)`.

  The one way lpe loads a saved model (a teacher, a model to evaluate): the variables and
  `model.json` (`load_variables`, which verifies the SHA-256), the module that `model.json` names
  (its `model` and `num_classes`; `build_kwargs` such as `dtype` go to `lpe.models.build`), and
  a check that the variables have that module's shapes for inputs of `image_shape` `[H, W, C]`.

  Args:
    path: A `.msgpack` file written by `export_variables`, or a workdir that holds one.
    image_shape: The inputs the model will be run on.
    what: How errors name the file (`'<what> <path> does not fit ...'`).

  Raises:
    FileNotFoundError, ValueError: one sentence naming the file and the fix (missing, corrupt,
      a `model.json` that names no model or an unknown one, variables of other shapes).
  """
  variables, meta = load_variables(path)
  meta_path = _meta_path(resolve_export(path))
  missing = [key for key in ('model', 'num_classes') if key not in meta]
  if missing:
    raise ValueError(
      f'{meta_path} does not say which model {path} holds (it has no {" or ".join(missing)}); '
      'export the model again.'
    )
  if meta['model'] not in models.names():
    raise ValueError(
      f'{path} holds a {meta["model"]!r} model, which is not registered (the models are '
      f'{", ".join(models.names())}); register it (lpe.models.register) before loading the file.'
    )
  module = models.build(meta['model'], meta['num_classes'], **build_kwargs)
  expected = jax.eval_shape(
    functools.partial(module.init, train=False), jax.random.key(0), jnp.zeros((1, *image_shape))
  )
  shape = 'x'.join(map(str, image_shape))
  check_variables_match(
    variables,
    expected,
    what=f'{what} {path}',
    fix=(
      f'check that {meta_path} names the model and classes that made the file and that it was '
      f'trained on {shape} inputs'
    ),
  )
  return module, variables, meta


def check_variables_match(
  variables: Any,
  expected: Any,
  *,
  what: str,
  fix: str = 'check that the config names the same model and number of classes that made the file',
) -> None:
  """Raises a ValueError naming the first difference between two variable trees' shapes.

  Paths are compared by name (`params/conv1/kernel`), so a saved tree of dicts and lists matches
  the dataclasses and tuples it was saved from.
  """
  got_shapes, want_shapes = _shapes(variables), _shapes(expected)
  params_first = lambda key: (not key.startswith('params/'), key)
  for key in sorted(set(got_shapes) | set(want_shapes), key=params_first):
    if got_shapes.get(key) != want_shapes.get(key):
      raise ValueError(
        f'{what} does not fit the configured architecture: {key} has shape '
        f'{got_shapes.get(key)} in the file but {want_shapes.get(key)} in the model; {fix}.'
      )


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_name(path): tuple(np.shape(leaf)) for path, leaf in leaves}
