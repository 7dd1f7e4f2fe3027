"""Batch samplers beyond a plain permutation: batches that hold anchors and their graph neighbours.

Like `lpe.data.train_index_batches`, every batch is a pure function of `(seed, epoch, step)`, so
any step of any epoch can be reproduced and a run resumes exactly at `start_step`.
"""

from collections.abc import Iterator
from numbers import Integral

import numpy as np

from lpe import data

# Mixed into the neighbour rng's seed so its stream differs from any other `(seed, epoch, step)`
# stream of the project.
_NEIGHBOUR_STREAM = 0x6E656967  # 'neig'


def neighbour_aware_index_batches(
  num_examples: int,
  graph_indices: np.ndarray,
  *,
  batch_size: int,
  neighbours_per_anchor: int,
  seed: int,
  epoch: int,
  start_step: int = 0,
  layout: str = 'within',
) -> Iterator[np.ndarray]:
  """Yields the example ids (int32) of each batch of `epoch`, from `start_step` on.

  `layout='within'`: `batch_size` rows per batch. With `m = neighbours_per_anchor` and
  `A = batch_size // (1 + m)` anchors per batch:

    anchors(step)  = order[step * A : (step + 1) * A],  order = data.epoch_permutation(seed, epoch)
    neighbours(a)  = m distinct entries of graph_indices[a] (of its k), drawn without replacement
                     by np.random.default_rng([seed, epoch, step, _NEIGHBOUR_STREAM])
    batch          = [a_0, neighbours(a_0)..., a_1, neighbours(a_1)..., ...]   (interleaved)

  So row `g * (1 + m)` is the anchor of group `g` and the next `m` rows its neighbours; a device
  shard of a multiple of `1 + m` rows holds whole groups. An epoch has
  `data.steps_per_epoch(num_examples, batch_size)` steps, as ordinary batches (the same compute),
  so its anchors are the first `steps * A` entries of the permutation: about `N / (1 + m)`
  examples are anchors per epoch, and the others may appear as neighbours. Anchors are distinct
  within an epoch; an id can repeat within a batch (a neighbour of two anchors, or an anchor that
  is also another's neighbour), which `graph_batch_locality_loss` handles. `m = 0` gives exactly
  `data.train_index_batches`.

  `layout='added'`: `batch_size * (1 + m)` rows per batch. The anchors are the ordinary batches,
  `A = batch_size` (`anchors(step)` is `data.train_index_batches`' batch, so every example is an
  anchor once per epoch, as when training without the graph), and each one's `m` neighbours come
  on top, interleaved as above: row `g * (1 + m)` is an anchor, the next `m` rows its neighbours.

  Args:
    num_examples: `N`, the size of the training split.
    graph_indices: `[N, k]` int array, `NeighbourGraph.indices` of the split.
    batch_size: global batch size: of the whole batch ('within', divisible by `1 + m`) or of
      its anchors ('added').
    neighbours_per_anchor: `m`, a Python int with `0 <= m <= k`.
    seed: the run's data seed.
    epoch: the epoch.
    start_step: first step to yield (to resume mid-epoch).
    layout: 'within' or 'added' (above).

  Example:
    >>> import numpy as np
    >>> ring = np.array([[(i - 1) % 8, (i + 1) % 8] for i in range(8)])  # neighbours on a ring
    >>> batches = list(neighbour_aware_index_batches(
    ...     8, ring, batch_size=4, neighbours_per_anchor=1, seed=0, epoch=0))
    >>> len(batches), all(b[1] in ring[b[0]] and b[3] in ring[b[2]] for b in batches)
    (2, True)
  """
  graph_indices = np.asarray(graph_indices)
  if graph_indices.ndim != 2 or graph_indices.shape[0] != num_examples:
    raise ValueError(
      f'graph_indices must have shape [num_examples={num_examples}, k], got '
      f'{graph_indices.shape}; pass NeighbourGraph.indices of the training split.'
    )
  if graph_indices.size and not (graph_indices.min() >= 0 and graph_indices.max() < num_examples):
    raise ValueError(
      f'graph_indices must lie in [0, {num_examples}); pass the graph of this training split.'
    )
  k = graph_indices.shape[1]
  m = neighbours_per_anchor
  if not isinstance(m, Integral) or isinstance(m, bool) or not 0 <= m <= k:
    raise ValueError(
      f'neighbours_per_anchor must be a Python int in [0, k={k}], got {m!r}; lower it or '
      'build the graph with more neighbours.'
    )
  if layout not in ('within', 'added'):
    raise ValueError(f"layout must be 'within' or 'added', got {layout!r}.")
  if layout == 'within' and batch_size % (1 + m):
    raise ValueError(
      f'batch_size {batch_size} must be divisible by 1 + neighbours_per_anchor = {1 + m} '
      '(each anchor comes with its neighbours); change one of them.'
    )
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  anchors_per_batch = batch_size // (1 + m) if layout == 'within' else batch_size
  steps = data.steps_per_epoch(num_examples, batch_size)
  order = data.epoch_permutation(num_examples, seed=seed, epoch=epoch).astype(np.int32)
  for step in range(start_step, steps):
    anchors = order[step * anchors_per_batch : (step + 1) * anchors_per_batch]
    rng = np.random.default_rng([seed, epoch, step, _NEIGHBOUR_STREAM])
    # The first m slots of a random ordering of the k: m distinct neighbours, uniformly.
    slots = np.argsort(rng.random((anchors_per_batch, k)), axis=1)[:, :m]
    neighbours = np.take_along_axis(graph_indices[anchors], slots, axis=1)
    yield np.concatenate([anchors[:, None], neighbours], axis=1).reshape(-1).astype(np.int32)
