"""Evaluation over every example of a split, once each: accuracy, and with a teacher, how much of
the teacher the student keeps (top-1 agreement, neighbourhood preservation, linear CKA)."""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from lpe import data, diagnostics, parallel


@functools.partial(jax.jit, static_argnames=('model', 'teacher', 'info', 'k', 'feature'))
def eval_step(
  model: nn.Module,
  variables,
  images,
  labels,
  mask,
  teacher_variables=None,
  *,
  info: data.DatasetInfo,
  teacher: nn.Module | None = None,
  k: int = 5,
  feature: str = 'embedding',
) -> dict[str, jax.Array]:
  """Sums over the real rows of one padded batch (and, with a teacher, both embeddings)."""
  x = data.preprocess(images, info)
  logits, features = model.apply(variables, x, train=False)
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  out = {
    'correct': jnp.sum((jnp.argmax(logits, -1) == labels) & mask),
    'ce': jnp.sum(jnp.where(mask, ce, 0.0)),
    'count': jnp.sum(mask),
  }
  if teacher is not None:
    t_logits, t_features = teacher.apply(teacher_variables, x, train=False)
    s_emb = features[feature].astype(jnp.float32)
    t_emb = t_features[feature].astype(jnp.float32)
    agree = diagnostics.top1_agreement(logits, t_logits.astype(jnp.float32))
    kept = diagnostics.neighbourhood_preservation(s_emb, t_emb, k=k, where=mask)
    out.update(
      agreement=jnp.sum(jnp.where(mask, agree, 0.0)),
      neighbourhood=jnp.sum(kept),
      student_embedding=s_emb,
      teacher_embedding=t_emb,
    )
  return out


def _to_host(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def evaluate(
  model: nn.Module,
  variables: dict[str, Any],
  split: data.Split,
  *,
  info: data.DatasetInfo,
  batch_size: int,
  sharding: jax.sharding.Sharding | None = None,
  teacher: tuple[nn.Module, Any] | None = None,
  k: int = 5,
  feature: str = 'embedding',
) -> dict[str, float]:
  """Accuracy and mean cross-entropy of `model` on every example of `split`.

  The last partial batch is padded and masked, so each example counts exactly once. With
  `teacher=(module, variables)` it also returns the diagnostics: `agreement` (top-1 agreement
  with the teacher), `neighbourhood_preservation` (the mean fraction of each example's `k`
  nearest teacher neighbours that are among its `k` nearest student neighbours, within each
  evaluation batch of `batch_size`, so it depends on `batch_size`) and `cka` (linear CKA between
  the `feature` embeddings over the whole split).
  """
  sums: dict[str, float] = {}
  embeddings: dict[str, list[np.ndarray]] = {'student_embedding': [], 'teacher_embedding': []}
  t_module, t_vars = teacher if teacher is not None else (None, None)
  for images, labels, mask in data.eval_batches(split, batch_size=batch_size):
    host_mask = mask
    if sharding is not None:
      rows = parallel.process_rows(batch_size)
      images, labels, mask = parallel.global_batch(
        (images[rows], labels[rows], mask[rows]), sharding
      )
    out = eval_step(
      model,
      variables,
      images,
      labels,
      mask,
      t_vars,
      info=info,
      teacher=t_module,
      k=k,
      feature=feature,
    )
    for key, value in out.items():
      if key in embeddings:
        embeddings[key].append(_to_host(value)[host_mask])
      else:
        sums[key] = sums.get(key, 0.0) + float(value)
  count = int(sums['count'])
  if count != len(split):
    raise AssertionError(f'Evaluated {count} examples of a split of {len(split)}.')
  result = {'accuracy': sums['correct'] / count, 'loss': sums['ce'] / count, 'num_examples': count}
  if teacher is not None:
    result['agreement'] = sums['agreement'] / count
    result['neighbourhood_preservation'] = sums['neighbourhood'] / count
    result['cka'] = diagnostics.linear_cka(
      np.concatenate(embeddings['student_embedding']),
      np.concatenate(embeddings['teacher_embedding']),
    )
  return result


# The evaluation results an epoch record keeps, as `test_<name>`.
RECORDED = ('accuracy', 'loss', 'agreement', 'neighbourhood_preservation', 'cka')


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """A run's evaluation: `evaluator(variables)` is `evaluate` of the student with `variables` on
  the test split, with the run's batch, placement, teacher diagnostics, k and feature."""

  model: nn.Module
  split: data.Split
  info: data.DatasetInfo
  batch_size: int
  sharding: jax.sharding.Sharding | None = None
  teacher: tuple[nn.Module, Any] | None = None
  k: int = 5
  feature: str = 'embedding'

  def __call__(self, variables: dict[str, Any]) -> dict[str, float]:
    return evaluate(
      self.model,
      variables,
      self.split,
      info=self.info,
      batch_size=self.batch_size,
      sharding=self.sharding,
      teacher=self.teacher,
      k=self.k,
      feature=self.feature,
    )


def record_fields(evaluation: dict[str, float]) -> dict[str, float]:
  """The `test_<name>` fields of an epoch record from an evaluation."""
  return {f'test_{k}': evaluation[k] for k in RECORDED if k in evaluation}
