"""Evaluation: test accuracy of a model's variables over every example of a split, once each."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lpe import data, parallel


@functools.partial(jax.jit, static_argnames=('model', 'info'))
def eval_step(model: nn.Module, variables, images, labels, mask, *, info: data.DatasetInfo):
  """Sums of correct predictions, cross-entropy and real examples in one padded batch."""
  logits, _ = model.apply(variables, data.preprocess(images, info), train=False)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  correct = (jnp.argmax(logits, -1) == labels) & mask
  return jnp.sum(correct), jnp.sum(jnp.where(mask, ce, 0.0)), jnp.sum(mask)


def evaluate(
  model: nn.Module,
  variables: dict[str, Any],
  split: data.Split,
  *,
  info: data.DatasetInfo,
  batch_size: int,
  sharding: jax.sharding.Sharding | None = None,
) -> dict[str, float]:
  """Accuracy and mean cross-entropy of `model` on every example of `split`.

  The last partial batch is padded and masked, so each example counts exactly once.
  """
  correct = total_ce = count = 0
  for images, labels, mask in data.eval_batches(split, batch_size=batch_size):
    if sharding is not None:
      rows = parallel.process_rows(batch_size)
      images, labels, mask = parallel.global_batch(
        (images[rows], labels[rows], mask[rows]), sharding
      )
    c, ce, n = eval_step(model, variables, images, labels, mask, info=info)
    correct, total_ce, count = correct + int(c), total_ce + float(ce), count + int(n)
  if count != len(split):
    raise AssertionError(f'Evaluated {count} examples of a split of {len(split)}.')
  return {'accuracy': correct / count, 'loss': total_ce / count, 'num_examples': count}
