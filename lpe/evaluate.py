"""Evaluation over every example of a split, once each: accuracy, and with a teacher, how much of
the teacher the student keeps (top-1 agreement, neighbourhood preservation, linear CKA).

`forward_batches` is lpe's one pass of a model over a split, in padded batches, every example
once; `forward_split` collects its outputs on the host. Evaluation, the teacher's output cache
(`lpe.teacher`) and a memory bank's first fill (`lpe.state.embeddings`) run through them.
"""

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from lpe import data, diagnostics, parallel


@functools.partial(jax.jit, static_argnames=('model', 'info', 'k', 'feature'))
def eval_step(
  model: nn.Module,
  variables,
  images,
  labels,
  mask,
  teacher_outputs=None,
  *,
  info: data.DatasetInfo,
  k: int = 5,
  feature: str = 'embedding',
) -> dict[str, jax.Array]:
  """Sums over the real rows of one padded batch (and, with the teacher's `(logits, embedding)`
  for the batch, the diagnostics' sums and both embeddings)."""
  x = data.preprocess(images, info)
  logits, features = model.apply(variables, x, train=False)
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  out = {
    'correct': jnp.sum((jnp.argmax(logits, -1) == labels) & mask),
    'ce': jnp.sum(jnp.where(mask, ce, 0.0)),
    'count': jnp.sum(mask),
  }
  if teacher_outputs is not None:
    t_logits, t_emb = teacher_outputs
    s_emb = features[feature].astype(jnp.float32)
    agree = diagnostics.top1_agreement(logits, t_logits)
    kept = diagnostics.neighbourhood_preservation(s_emb, t_emb, k=k, where=mask)
    out.update(
      agreement=jnp.sum(jnp.where(mask, agree, 0.0)),
      neighbourhood=jnp.sum(kept),
      student_embedding=s_emb,
      teacher_embedding=t_emb,
    )
  return out


@functools.partial(jax.jit, static_argnames=('teacher', 'info', 'feature'))
def teacher_step(teacher: nn.Module, variables, images, *, info: data.DatasetInfo, feature: str):
  """The teacher's float32 `(logits, features[feature])` for one batch, in inference mode."""
  logits, features = teacher.apply(variables, data.preprocess(images, info), train=False)
  return logits.astype(jnp.float32), features[feature].astype(jnp.float32)


def host_rows(x: jax.Array, mask: np.ndarray) -> np.ndarray:
  """The rows of a batch's output `x` that `mask` marks, on this host (gathered from every
  process when `x` is sharded over several)."""
  if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))[mask]
  return np.asarray(x)[mask]


Batch = tuple[Any, Any, Any, np.ndarray]  # images, labels, mask (placed), host mask


def placed_batches(
  split: data.Split,
  batch_size: int,
  sharding: jax.sharding.Sharding | None = None,
  *,
  wrap: bool = False,
) -> Iterator[Batch]:
  """Every padded evaluation batch of `split` (`data.eval_batches`; `wrap`: padded with its
  first examples), this process's rows placed along `sharding` (None: left on the host)."""
  for images, labels, mask in data.eval_batches(split, batch_size=batch_size, wrap=wrap):
    host_mask = mask
    if sharding is not None:
      rows = parallel.process_rows(batch_size)
      images, labels, mask = parallel.global_batch(
        (images[rows], labels[rows], mask[rows]), sharding
      )
    yield images, labels, mask, host_mask


def forward_batches(
  fn: Callable[[Any, Any, Any], Any],
  split: data.Split,
  batch_size: int,
  *,
  sharding: jax.sharding.Sharding | None = None,
  wrap: bool = False,
) -> Iterator[tuple[Batch, Any]]:
  """The pass of a model over `split`: each of its evaluation batches (`placed_batches`: every
  example once, the last batch padded and masked) with `fn(images, labels, mask)` on it."""
  for batch in placed_batches(split, batch_size, sharding, wrap=wrap):
    yield batch, fn(*batch[:3])


def forward_split(
  fn: Callable[[Any, Any, Any], Any],
  split: data.Split,
  batch_size: int,
  *,
  sharding: jax.sharding.Sharding | None = None,
  wrap: bool = False,
) -> Any:
  """`fn`'s outputs for every example of `split`, once each and in order, on the host.

  Args:
    fn: `fn(images, labels, mask)` on one padded batch of `batch_size` rows (`forward_batches`),
      e.g. a jitted forward pass; returns a pytree of per-row arrays `[batch_size, ...]`.
    split: The examples.
    batch_size: Rows per batch.
    sharding: Where each batch is placed (this process's rows of it), or None: not placed.
    wrap: Pad the last batch with the split's first examples rather than zeros (for a pass in
      which BatchNorm normalises each batch by its own statistics).

  Returns:
    `fn`'s pytree with each array's real rows concatenated: `[len(split), ...]`.
  """
  chunks = [
    jax.tree.map(lambda x, mask=batch[3]: host_rows(x, mask), outputs)
    for batch, outputs in forward_batches(fn, split, batch_size, sharding=sharding, wrap=wrap)
  ]
  return jax.tree.map(lambda *parts: np.concatenate(parts), *chunks)


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
  evaluator = Evaluator(model, split, info, batch_size, sharding, teacher, k, feature)
  return evaluator(variables)


# The evaluation results an epoch record keeps, as `test_<name>`.
RECORDED = ('accuracy', 'loss', 'agreement', 'neighbourhood_preservation', 'cka')


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """`evaluator(variables)`: `evaluate` of the student with `variables`, with the run's split,
  batch, placement, teacher diagnostics, k and feature.

  The teacher's outputs on every batch are computed once, at the first call, and kept (the
  teacher is frozen, so every later evaluation runs the student only); the images are placed
  again at each call rather than kept, so that a large split (ImageNet's validation images)
  does not hold device memory between evaluations.
  """

  model: nn.Module
  split: data.Split
  info: data.DatasetInfo
  batch_size: int
  sharding: jax.sharding.Sharding | None = None
  teacher: tuple[nn.Module, Any] | None = None
  k: int = 5
  feature: str = 'embedding'

  @functools.cached_property
  def _teacher_outputs(self) -> list[Any]:
    """The teacher's outputs on each placed batch."""
    module, variables = self.teacher
    step = functools.partial(teacher_step, module, info=self.info, feature=self.feature)
    batches = forward_batches(
      lambda images, labels, mask: step(variables, images),
      self.split,
      self.batch_size,
      sharding=self.sharding,
    )
    return [outputs for _, outputs in batches]

  def __call__(self, variables: dict[str, Any]) -> dict[str, float]:
    sums: dict[str, float] = {}
    embeddings: dict[str, list[np.ndarray]] = {'student_embedding': [], 'teacher_embedding': []}
    batches = placed_batches(self.split, self.batch_size, self.sharding)
    if self.teacher is None:
      batches = ((batch, None) for batch in batches)
    else:
      batches = zip(batches, self._teacher_outputs, strict=True)
    for (images, labels, mask, host_mask), teacher_outputs in batches:
      out = eval_step(
        self.model,
        variables,
        images,
        labels,
        mask,
        teacher_outputs,
        info=self.info,
        k=self.k,
        feature=self.feature,
      )
      for key, value in out.items():
        if key in embeddings:
          embeddings[key].append(host_rows(value, host_mask))
        else:
          sums[key] = sums.get(key, 0.0) + float(value)
    return self._result(sums, embeddings)

  def _result(self, sums, embeddings) -> dict[str, float]:
    count = int(sums['count'])
    if count != len(self.split):
      raise AssertionError(f'Evaluated {count} examples of a split of {len(self.split)}.')
    result = {
      'accuracy': sums['correct'] / count,
      'loss': sums['ce'] / count,
      'num_examples': count,
    }
    if self.teacher is not None:
      result['agreement'] = sums['agreement'] / count
      result['neighbourhood_preservation'] = sums['neighbourhood'] / count
      result['cka'] = diagnostics.linear_cka(
        np.concatenate(embeddings['student_embedding']),
        np.concatenate(embeddings['teacher_embedding']),
      )
    return result


def record_fields(evaluation: dict[str, float]) -> dict[str, float]:
  """The `test_<name>` fields of an epoch record from an evaluation."""
  return {f'test_{k}': evaluation[k] for k in RECORDED if k in evaluation}
