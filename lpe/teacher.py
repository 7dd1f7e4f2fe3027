"""The frozen teacher: loading it, the one compatibility check, and its cached outputs.

The teacher runs in inference mode from its exported variables (`model.msgpack`); it is never
differentiated, updated or saved with the student.
"""

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from lpe import checkpoint, data, evaluate, files, losses, objectives

# The largest teacher-output cache `config.teacher.cache_outputs` builds.
CACHE_MAX_BYTES = 2 * 2**30


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A loaded teacher: its module, exported variables, what `model.json` says, and its path."""

  module: nn.Module
  variables: Any
  meta: dict[str, Any]
  path: str


def feature_shapes(module: nn.Module, image_shape: tuple[int, ...]) -> dict[str, Any]:
  """The shapes of `module`'s named features for one image (no weights are needed)."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  key = jax.random.key(0)
  if isinstance(module, nn.Module):  # One trace: the forward pass's output beside the variables.
    (_, features), _ = jax.eval_shape(lambda x: module.init_with_output(key, x), x)
    return features
  # Another model with `init` and `apply` (an NNX model through `lpe.models.nnx_adapter`).
  return jax.eval_shape(lambda x: module.apply(module.init(key, x), x), x)[1]


def check_compatible(
  meta: Mapping[str, Any], config: ml_collections.ConfigDict, num_classes: int, *, where: str
) -> None:
  """Raises a ValueError unless the teacher `meta` describes fits `config`.

  Args:
    meta: The teacher's description: its `model.json`, or a planned teacher run's `model` and
      `num_classes`.
    config: The distilling run's config (`teacher.model`, `dataset`).
    num_classes: The classes of `config.dataset`.
    where: The teacher's path, for the message.
  """
  if meta.get('model') != config.teacher.model:
    raise ValueError(
      f'The teacher {where} holds a {meta.get("model")!r} model, but config.teacher.model is '
      f'{config.teacher.model!r}; make them agree.'
    )
  if meta.get('num_classes') != num_classes:
    raise ValueError(
      f'The teacher {where} has {meta.get("num_classes")} classes, but the dataset has '
      f'{num_classes}; use a teacher trained on {config.dataset}.'
    )


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError for a teacher-output cache that cannot hold: with augmentation the
  teacher sees new images every step."""
  caching = config.teacher.cache_outputs and objectives.active(config.distill)
  if caching and config.augment != 'none':
    raise ValueError(
      f'config.teacher.cache_outputs=True needs config.augment=none: with {config.augment!r} '
      'augmentation the teacher sees new images every step, so its outputs cannot be cached; '
      'turn one of them off.'
    )


def load(config: ml_collections.ConfigDict, info: data.DatasetInfo, dtype=jnp.float32) -> Teacher:
  """Loads `config.teacher.checkpoint` (`lpe.checkpoint.load_model`) once it is checked to hold
  `config.teacher.model` for the dataset's classes, with `dtype` computations, for inputs of
  `info.image_shape`; refuses non-finite weights."""
  path = config.teacher.checkpoint
  if not path:
    raise ValueError(
      'Distillation is on (a config.distill weight is > 0) but config.teacher.checkpoint is '
      "empty; set it to a teacher run's workdir or its model.msgpack."
    )
  check_compatible(checkpoint.read_meta(path), config, info.num_classes, where=path)
  module, variables, meta = checkpoint.load_model(
    path, info.image_shape, what='Teacher checkpoint', dtype=dtype
  )
  check_finite(variables, where=path)
  return Teacher(module, jax.tree.map(jnp.asarray, variables), meta, path)


def check_finite(variables: Any, *, where: str) -> None:
  """Raises a ValueError naming the first array of a teacher's `variables` that holds a NaN or
  an infinity: such a teacher gives non-finite targets, so no student could learn from it."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    array = np.asarray(leaf)
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
      name = checkpoint.path_name(path)
      raise ValueError(
        f'The teacher {where} holds non-finite weights ({name}: {bad} of {array.size} values are '
        'NaN or infinite); export it again from a good checkpoint, or train it again.'
      )


def check_features(
  distill: Mapping[str, Any], student: nn.Module, teacher: nn.Module, image_shape
) -> None:
  """Raises a ValueError naming a configured feature that the student or the teacher lacks."""
  objectives.check_features(
    distill, feature_shapes(student, image_shape), feature_shapes(teacher, image_shape)
  )


def whole_split_graph(features: np.ndarray, distill: Mapping[str, Any]) -> losses.NeighbourGraph:
  """The teacher's kNN graph over a whole split from its `distill['feature']` outputs `[N, d]`,
  with `distill['graph_k']` neighbours (0: `k`) and bandwidth `sigma2` (None: the graph's mean)
  times `sigma2_scale`."""
  return losses.teacher_graph(
    features,
    k=distill['graph_k'] or distill['k'],
    sigma2=distill['sigma2'],
    sigma2_scale=distill['sigma2_scale'],
  )


def precomputed(
  config: ml_collections.ConfigDict, loaded: Teacher, split: data.Split, info: data.DatasetInfo
) -> tuple[Any, losses.NeighbourGraph | None]:
  """What the steps read of the teacher, computed once before training: its cached outputs on
  `split` (`config.teacher.cache_outputs`, else None) and the whole split's kNN graph
  (`config.distill.lp_graph` 'neighbours' or 'bank', else None)."""
  # The graph is also needed without LP: the neighbour sampler's control row (lp_weight=0).
  whole_split = config.distill.lp_graph != 'batch'
  caching = config.teacher.cache_outputs and bool(objectives.active(config.distill))
  if not (caching or whole_split):
    return None, None
  cache = outputs_cache(
    loaded.module,
    loaded.variables,
    split,
    info=info,
    distill=config.distill,
    batch_size=config.eval_batch_size,
    cache_dir=config.teacher.cache_dir,
    teacher_id=str(loaded.meta.get('sha256', loaded.path)),
  )
  graph = (
    whole_split_graph(cache[1][config.distill.feature], config.distill) if whole_split else None
  )
  return (cache if caching else None), graph


def outputs_cache(
  teacher: nn.Module,
  variables: Mapping[str, Any],
  split: data.Split,
  *,
  info: data.DatasetInfo,
  distill: Mapping[str, Any],
  batch_size: int,
  cache_dir: str = '',
  teacher_id: str = '',
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """The teacher's `(logits [N, classes], {feature: [N, ...]})` for every example of `split`.

  Only the features the active distillation terms read are kept. Valid only while the training
  images are not augmented (the teacher then sees exactly these images every epoch). With
  `cache_dir`, each array is also kept there as a `.npy` file named by a hash of `teacher_id`
  (the teacher file's SHA-256), the split's bytes, the output's name and `batch_size`, and read
  back by later runs instead of running the teacher again (a study's many runs share them).
  Each file is written atomically (`lpe.files.write_atomic`); one that cannot be read (cut
  short, or of another size) is computed again and rewritten, with a warning.

  Raises:
    ValueError: the cache would exceed `CACHE_MAX_BYTES`; the message names its size.
  """
  names = sorted(objectives.feature_names(distill))
  x = jax.ShapeDtypeStruct((1, *info.image_shape), jnp.float32)
  logits, features = jax.eval_shape(lambda x: teacher.apply(variables, x, train=False), x)
  per_example = [logits] + [features[n] for n in names]
  size = len(split) * sum(np.prod(a.shape[1:]) * np.dtype(a.dtype).itemsize for a in per_example)
  if size > CACHE_MAX_BYTES:
    raise ValueError(
      f'config.teacher.cache_outputs would hold {size / 2**30:.1f} GiB of teacher outputs '
      f'(logits and {", ".join(names) or "no features"} for {len(split)} examples), more than '
      f'{CACHE_MAX_BYTES / 2**30:.0f} GiB; set config.teacher.cache_outputs=False.'
    )
  paths = _cache_paths(cache_dir, teacher_id, split, ['logits', *names], batch_size)
  cached = {n: _load_cached(p, len(split)) for n, p in paths.items()}
  arrays = {n: a for n, a in cached.items() if a is not None}
  missing = [n for n in ['logits', *names] if n not in arrays]
  if missing:
    computed = _forward_split(teacher, variables, split, info, missing, batch_size)
    arrays.update(computed)
    for name, array in computed.items():
      if name in paths:
        _save_atomically(paths[name], array)
  return arrays['logits'], {n: arrays[n] for n in names}


def _forward_split(teacher, variables, split, info, names, batch_size) -> dict[str, np.ndarray]:
  """`{name: [N, ...]}` of the teacher's outputs `names` ('logits' or feature names)."""

  @jax.jit
  def forward(variables, images):
    logits, features = teacher.apply(variables, data.preprocess(images, info), train=False)
    return {n: logits if n == 'logits' else features[n] for n in names}

  return evaluate.forward_split(
    lambda images, labels, mask: forward(variables, images), split, batch_size
  )


def _cache_paths(cache_dir, teacher_id, split, names, batch_size) -> dict[str, str]:
  if not cache_dir:
    return {}
  digest = hashlib.sha256(teacher_id.encode())
  digest.update(np.ascontiguousarray(split.images).tobytes())
  digest.update(np.ascontiguousarray(split.labels).tobytes())
  key = digest.hexdigest()[:20]
  return {n: os.path.join(cache_dir, f'{key}-{n}-b{batch_size}.npy') for n in names}


def _save_atomically(path: str, array: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  files.write_atomic(path, lambda f: np.save(f, array))


def _load_cached(path: str, rows: int) -> np.ndarray | None:
  """A cached output, or None when there is none or it is unreadable (then computed again)."""
  if not os.path.exists(path):
    return None
  try:
    array = np.load(path)
    if len(array) != rows:
      raise ValueError(f'{len(array)} rows for a split of {rows}')
  except (OSError, ValueError, EOFError) as error:
    logging.warning('%s is unreadable (%s); computing it again.', path, files.first_line(error))
    return None
  return array
