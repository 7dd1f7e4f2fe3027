"""Locality preservation beyond the batch: a teacher kNN graph over the whole training split.

The batch loss (`lpe.losses.locality`) sees only the teacher neighbours that happen to share a
batch. Here the graph is computed once over all `N` training examples (`teacher_graph`) and the
student is pulled towards an example's graph neighbours in one of two ways:

  (a) neighbour-aware batches (`lpe.sampling.neighbour_aware_index_batches` puts anchors and some
      of their graph neighbours in one batch) with `graph_batch_locality_loss`, which penalises
      the edges whose both ends are in the batch; gradients reach both ends.
  (b) a memory bank `M` (`[N, d_s]`, the student embedding last computed for each example,
      refreshed by `update_memory_bank`) with `memory_bank_locality_loss`, which penalises every
      edge of the graph against the bank's copy of the neighbour (no gradient into the bank).

Graph: `G(i)` = the `k` indices `j != i` with the smallest `D[i, j] = ||t_i - t_j||^2` over the
whole split, nearest first, ties to the lower index (as `knn_graph`), with heat-kernel weights
`a[i, j] = exp(-D[i, j] / sigma2_G)`.
"""

import functools
from numbers import Integral, Real
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lpe.losses.locality import (
  _check_rank2,
  _check_student_scale,
  _check_where,
  _power_of_two_scale,
  l2_normalised,
  mean_pair_sq_distance,
  pairwise_sq_distances,
)

# Rows per block of `teacher_graph`: a `[block, block]` distance tile (4 MiB) per step. On 2 CPU
# cores with 10,000 x 256 features, 1024 was no slower than 2048.
GRAPH_BLOCK_SIZE = 1024
# Columns per chunk in `_smallest`: the chunk minima shrink the input of the exact top-k 32-fold.
_CHUNK = 32


class NeighbourGraph(NamedTuple):
  """The teacher's directed kNN graph over a whole split (host NumPy arrays; a pytree).

  Attributes:
    indices: `[N, k]` int32, row `i` holds `G(i)`, nearest first (ties to the lower index).
    weights: `[N, k]` float32, `a[i, j] = exp(-D[i, j] / sigma2)` in the order of `indices`.
    sigma2: the heat-kernel bandwidth `sigma2_G` used for `weights`.
  """

  indices: np.ndarray
  weights: np.ndarray
  sigma2: float


def _smallest(dist: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The `min(k, c)` smallest entries of each row of `dist` `[b, c]` and their columns.

  Sorted ascending, equal values in column order (as `jax.lax.top_k` on `-dist`).
  """
  b, c = dist.shape
  k = min(k, c)
  if c % _CHUNK or c // _CHUNK < k:
    neg, cols = jax.lax.top_k(-dist, k)
    return -neg, cols
  # Exact: an entry among the k smallest (by value, then column) lies in one of the k chunks
  # with the smallest (minimum, chunk index), since each chunk ranked before its chunk holds an
  # entry ranked before it. Sorting the chosen chunks keeps their entries in column order, so
  # top_k still breaks ties towards the lower column.
  chunks = dist.reshape(b, c // _CHUNK, _CHUNK)
  _, best = jax.lax.top_k(-jnp.min(chunks, axis=2), k)
  best = jnp.sort(best, axis=1)
  candidates = jnp.take_along_axis(chunks, best[:, :, None], axis=1).reshape(b, k * _CHUNK)
  neg, pos = jax.lax.top_k(-candidates, k)
  cols = jnp.take_along_axis(best, pos // _CHUNK, axis=1) * _CHUNK + pos % _CHUNK
  return -neg, cols


def _merge(
  values: jax.Array, indices: jax.Array, new_values: jax.Array, new_indices: jax.Array, k: int
) -> tuple[jax.Array, jax.Array]:
  """The k smallest of two sorted candidate lists; ties go to the first (its indices are lower)."""
  neg, pos = jax.lax.top_k(-jnp.concatenate([values, new_values], axis=1), k)
  return -neg, jnp.take_along_axis(jnp.concatenate([indices, new_indices], axis=1), pos, axis=1)


@functools.partial(jax.jit, static_argnames=('k', 'block'))
def _symmetric_blockwise_knn(
  features: jax.Array, *, k: int, block: int
) -> tuple[jax.Array, jax.Array]:
  """`knn_graph` without `where`, computing each `[block, block]` tile of `D` once.

  `D` is symmetric, so the tile of row block `I` and column block `J >= I` also serves row block
  `J` (transposed): half the matmul work of `knn_graph`. The pairs run with `I` outer and `J`
  inner, so every row block receives its column blocks in increasing order, and `_merge`, which
  prefers the kept list on ties, keeps ties going to the lower index.
  """
  n, d = features.shape
  num_blocks = -(-n // block)
  padded = jnp.pad(features, ((0, num_blocks * block - n), (0, 0)))
  row_block, col_block = (jnp.asarray(b, jnp.int32) for b in np.triu_indices(num_blocks))
  offsets = jnp.arange(block, dtype=jnp.int32)

  def update(state, rows_start, dist, cols_start):
    values, indices = state
    new_values, new_cols = _smallest(dist, k)
    kept_values = jax.lax.dynamic_slice_in_dim(values, rows_start, block)
    kept_indices = jax.lax.dynamic_slice_in_dim(indices, rows_start, block)
    merged = _merge(kept_values, kept_indices, new_values, new_cols + cols_start, k)
    return tuple(
      jax.lax.dynamic_update_slice_in_dim(x, m, rows_start, 0)
      for x, m in zip(state, merged, strict=True)
    )

  def body(pair, state):
    i, j = row_block[pair] * block, col_block[pair] * block
    dist = pairwise_sq_distances(
      jax.lax.dynamic_slice_in_dim(padded, i, block),
      jax.lax.dynamic_slice_in_dim(padded, j, block),
    )
    rows, cols = i + offsets, j + offsets
    # Padding rows and columns, and each row itself, are never neighbours.
    excluded = (rows[:, None] == cols[None, :]) | (rows[:, None] >= n) | (cols[None, :] >= n)
    dist = jnp.where(excluded, jnp.inf, dist)
    state = update(state, i, dist, j)
    # A diagonal tile has no transposed half to add. A `cond`, not an all-inf tile: with one
    # tile XLA unrolls the loop and would spend seconds constant-folding the sort of that tile.
    return jax.lax.cond(i == j, lambda s: s, lambda s: update(s, j, dist.T, i), state)

  state = (
    jnp.full((num_blocks * block, k), jnp.inf, jnp.float32),
    jnp.zeros((num_blocks * block, k), jnp.int32),
  )
  sq_distances, indices = jax.lax.fori_loop(0, row_block.shape[0], body, state)
  return indices[:n], sq_distances[:n]


def teacher_graph(
  features: np.ndarray | jax.Array,
  *,
  k: int,
  sigma2: float | None = None,
  sigma2_scale: float = 1.0,
  block_size: int = GRAPH_BLOCK_SIZE,
) -> NeighbourGraph:
  """The teacher's directed kNN graph over a whole split, with heat-kernel weights.

  With `D[i, j] = ||t_i - t_j||^2` (float32, as `pairwise_sq_distances`):

    G(i)       = the k indices j != i with the smallest D[i, j], nearest first; ties go to the
                 lower index (as `knn_graph`)
    sigma2_G   = sigma2_scale * (sigma2, or by default the mean of D[i, j] over all i and
                 j in G(i); 1 if that mean is 0, as `locality_preserving_loss`)
    a[i, j]    = exp(-D[i, j] / sigma2_G)

  Computed once, outside any training step, in `[block_size, block_size]` tiles of `D` (peak
  memory `O(N k + block_size^2)`); each tile is used for both of its row blocks, as `D` is
  symmetric. 60,000 x 256 features with k=5 took 27 s of CPU time on 2 CPU cores (55 s wall
  while other jobs shared them; `knn_graph` took about 1.6 times as long).

  Args:
    features: `[N, d]` float array of teacher embeddings of the whole split (NumPy or JAX).
    k: neighbours per example, a Python int with `1 <= k < N`.
    sigma2: heat-kernel bandwidth (> 0), or None for the mean kNN distance above.
    sigma2_scale: a number > 0 that multiplies that bandwidth (as in `locality_preserving_loss`);
      the returned `sigma2` is the product.
    block_size: rows per tile, a positive Python int (capped at `N`). The graph does not depend
      on it beyond float32 rounding of the matmul.

  Returns:
    `NeighbourGraph(indices [N, k] int32, weights [N, k] float32, sigma2 float)`, host NumPy.

  Example:
    >>> import numpy as np
    >>> graph = teacher_graph(np.array([[0.0], [1.0], [3.0], [6.0]]), k=1, block_size=3)
    >>> graph.indices.tolist(), graph.sigma2  # mean of D: (1 + 1 + 4 + 9) / 4
    ([[1], [0], [1], [2]], 3.75)
    >>> [round(float(a), 4) for a in graph.weights[:, 0]]  # exp(-1 / 3.75), ..., exp(-9 / 3.75)
    [0.7659, 0.7659, 0.3442, 0.0907]
  """
  features = np.asarray(features, np.float32)
  _check_rank2('features', features)
  n = features.shape[0]
  if not isinstance(k, Integral) or isinstance(k, bool) or not 1 <= k < n:
    raise ValueError(
      f'k must be a Python int with 1 <= k < N = {n} (each example needs k neighbours other '
      f'than itself), got {k!r}; lower k.'
    )
  if not isinstance(block_size, Integral) or isinstance(block_size, bool) or block_size < 1:
    raise ValueError(f'block_size must be a positive Python int, got {block_size!r}.')
  if not (isinstance(sigma2_scale, Real) and 0 < sigma2_scale < np.inf):
    raise ValueError(f'sigma2_scale must be a number > 0, got {sigma2_scale!r}.')
  if sigma2 is not None and not (isinstance(sigma2, Real) and sigma2 > 0):
    raise ValueError(f'sigma2 must be > 0, got {sigma2!r}; pass None for the mean kNN distance.')
  if not np.all(np.isfinite(features)):
    raise ValueError('features contain NaN or inf; check the teacher embeddings.')

  indices, sq_distances = _symmetric_blockwise_knn(
    jnp.asarray(features), k=int(k), block=min(int(block_size), n)
  )
  sq_distances = np.asarray(sq_distances, np.float64)
  if sigma2 is None:
    mean = float(np.mean(sq_distances))
    sigma2 = mean if mean > 0 else 1.0
  sigma2 = float(sigma2) * sigma2_scale
  weights = np.exp(-sq_distances / float(sigma2)).astype(np.float32)
  return NeighbourGraph(np.asarray(indices, np.int32), weights, float(sigma2))


def _first_rows(query: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """For each entry of `query`, the first row of `ids` holding it, and whether one does."""
  order = jnp.argsort(ids, stable=True)  # Stable: equal ids keep their row order.
  sorted_ids = ids[order]
  pos = jnp.clip(jnp.searchsorted(sorted_ids, query, side='left'), 0, ids.shape[0] - 1)
  return order[pos], sorted_ids[pos] == query


def _check_same_rows(name: str, x: jax.Array, shape: tuple[int, ...]) -> None:
  if jnp.shape(x) != shape:
    raise ValueError(
      f'{name} must have shape {shape}, one row per example of the batch, got {jnp.shape(x)}; '
      'gather it with graph.indices[example_ids] / graph.weights[example_ids].'
    )


def graph_batch_locality_loss(
  student_features: jax.Array,
  example_ids: jax.Array,
  graph_indices: jax.Array,
  graph_weights: jax.Array,
  *,
  axis_name: str | None = None,
  where: jax.Array | None = None,
  student_scale: str = 'none',
) -> jax.Array:
  """Per-row locality loss over the edges of the split's graph that lie inside the batch.

  Row `r` of the batch holds example `e_r` with student features `s_r`; `G(e_r)` is its graph
  row (`graph_indices[r]`, weights `a[r, .]`). Each neighbour `g in G(e_r)` that is in the batch
  counts once, at `q(g)` = the first row holding `g` (duplicated ids in a batch are fine):

    P(r) = {g in G(e_r) : g in B, g != e_r}                     (B: the ids of the batch)
    l_r  = (1 / |P(r)|) * sum_{g in P(r)} a[r, g] * ||s_r - s_q(g)||^2,   l_r = 0 if P(r) = {}

  Gradients reach both `s_r` and `s_q(g)`; the weights carry none. A graph row listing the same
  neighbour twice counts it once (first slot's weight); a negative index marks an empty slot.
  With `lpe.sampling.neighbour_aware_index_batches` every anchor has its sampled neighbours in
  the batch; the batch loss is the mean of `l_r` (over the anchors).

  `student_scale` as in `locality_preserving_loss`: 'l2' takes the loss on `s_r / ||s_r||`;
  'mean' divides it by `mu`, the mean of `||s_r - s_q||^2` over all ordered pairs of distinct
  valid rows of the (global) batch, with the gradient flowing through `mu`.

  Args:
    student_features: `[n, d_s]` float array (computed in float32).
    example_ids: `[n]` int array, the split index of each row.
    graph_indices: `[n, k]` int array, `graph.indices[example_ids]`.
    graph_weights: `[n, k]` float array, `graph.weights[example_ids]`.
    axis_name: inside `jax.pmap` / `jax.shard_map` over the batch, the mapped axis name: the
      student features, ids and mask are all-gathered, so `B` is the global batch, and the loss
      of the local rows is returned (equal to the single-device values for any device count).
    where: optional `[n]` bool array; masked rows are not in `B` and get loss exactly 0.
    student_scale: 'none' (the definition above), 'l2' or 'mean' (scale-invariant forms).

  Returns:
    `[n]` float32 per-row loss (local rows under `axis_name`).

  Example:
    >>> import jax.numpy as jnp
    >>> s = jnp.array([[0.0], [1.0], [3.0]])
    >>> ids = jnp.array([10, 11, 12])  # 12's neighbours (11, 10) are both in the batch.
    >>> nbrs = jnp.array([[11, 99], [12, 10], [11, 10]])  # 99 is not in the batch.
    >>> weights = jnp.array([[1.0, 1.0], [0.5, 1.0], [1.0, 0.5]])
    >>> graph_batch_locality_loss(s, ids, nbrs, weights).tolist()  # 1/1, (2 + 1)/2, (4 + 4.5)/2
    [1.0, 1.5, 4.25]
  """
  _check_rank2('student_features', student_features)
  n, k = jnp.shape(student_features)[0], jnp.shape(graph_indices)[-1]
  _check_same_rows('example_ids', example_ids, (n,))
  _check_same_rows('graph_indices', graph_indices, (n, k))
  _check_same_rows('graph_weights', graph_weights, (n, k))
  where = _check_where(where, n)
  student_scale = _check_student_scale(student_scale)

  student = jnp.asarray(student_features, jnp.float32)
  if student_scale == 'l2':
    student = l2_normalised(student)
  ids = jnp.asarray(example_ids, jnp.int32)
  neighbours = jnp.asarray(graph_indices, jnp.int32)
  weights = jax.lax.stop_gradient(jnp.asarray(graph_weights, jnp.float32))
  local_where = jnp.ones(n, bool) if where is None else where
  batch_student, batch_ids, batch_where = student, ids, local_where
  if axis_name is not None:
    # The transpose of all_gather sums every device's cotangents onto the owning rows.
    gather = lambda x: jax.lax.all_gather(x, axis_name, tiled=True)
    batch_student, batch_ids, batch_where = gather(student), gather(ids), gather(local_where)
  if student_scale == 'mean':
    # The loss ignores the student's scale, so one power of two (exact) keeps mu in range.
    scale = _power_of_two_scale(jnp.where(batch_where[:, None], batch_student, 0.0))
    student, batch_student = student / scale, batch_student / scale

  # Masked rows leave the batch: -1 matches no neighbour (negative slots are empty).
  rows, found = _first_rows(neighbours, jnp.where(batch_where, batch_ids, -1))
  repeated = jnp.any(jnp.tril(neighbours[:, :, None] == neighbours[:, None, :], -1), axis=-1)
  present = found & (neighbours >= 0) & (neighbours != ids[:, None]) & ~repeated
  present &= local_where[:, None]

  diff = student[:, None, :] - batch_student[rows]  # [n, k, d_s]
  terms = jnp.where(present, weights * jnp.sum(diff * diff, axis=-1), 0.0)
  count = jnp.sum(present, axis=-1)
  loss = jnp.sum(terms, axis=-1) / jnp.maximum(count, 1)
  if student_scale == 'mean':
    loss = loss / mean_pair_sq_distance(batch_student, batch_where)
  return loss.astype(jnp.float32)


def memory_bank_locality_loss(
  student_features: jax.Array,
  bank_neighbours: jax.Array,
  graph_weights: jax.Array,
  *,
  student_scale: str = 'none',
  bank_moments: tuple[jax.Array, jax.Array] | None = None,
  axis_name: str | None = None,
) -> jax.Array:
  """Per-example locality loss against the memory bank's copies of all graph neighbours.

  With `M` the bank (`[N, d_s]`, the student embedding last computed for each example):

    l_i = (1 / k) * sum_{j in G(i)} a[i, j] * ||s_i - stop_gradient(M_j)||^2

  The gradient reaches `s_i` only; the bank and the weights carry none. The batch loss is the
  mean of `l_i`. A zero weight drops a slot (still divided by `k`).

  `student_scale` removes the student's scale, as in `locality_preserving_loss`:

    'l2':   the loss on s_i / ||s_i|| and M_j / ||M_j|| (the bank keeps the raw embeddings)
    'mean': l_i / mu,  mu = mean of ||s_i - M_j||^2 over the (global) batch's rows i and every
            row j of the bank (not only the graph neighbours: their mean distance would shrink
            with them); from the bank's moments, exactly:
            mu = mean_i ||s_i - m||^2 + v,  m = mean_j M_j,  v = mean_j ||M_j - m||^2.
            The gradient flows through mu via s_i, not into the bank.

  Args:
    student_features: `[n, d_s]` float array (computed in float32).
    bank_neighbours: `[n, k, d_s]` float array, `bank[graph.indices[example_ids]]`.
    graph_weights: `[n, k]` float array, `graph.weights[example_ids]`.
    student_scale: 'none' (the definition above), 'l2' or 'mean'.
    bank_moments: for 'mean', `(m [d_s], v [])` of the whole bank (`memory_bank_moments`).
    axis_name: for 'mean' inside `jax.pmap` / `jax.shard_map` over the batch, the mapped axis
      name: `mu` averages over the global batch.

  Returns:
    `[n]` float32 per-example loss.

  Example:
    >>> import jax.numpy as jnp
    >>> s = jnp.array([[0.0], [2.0]])
    >>> bank_neighbours = jnp.array([[[1.0], [3.0]], [[2.0], [0.0]]])
    >>> weights = jnp.array([[1.0, 0.5], [1.0, 0.25]])
    >>> memory_bank_locality_loss(s, bank_neighbours, weights).tolist()  # (1 + 4.5)/2, (0 + 1)/2
    [2.75, 0.5]
  """
  _check_rank2('student_features', student_features)
  n, d = jnp.shape(student_features)
  k = jnp.shape(graph_weights)[-1]
  _check_same_rows('graph_weights', graph_weights, (n, k))
  _check_same_rows('bank_neighbours', bank_neighbours, (n, k, d))
  student_scale = _check_student_scale(student_scale)
  if student_scale == 'mean' and bank_moments is None:
    raise ValueError(
      "student_scale='mean' needs bank_moments=(mean, variance) of the whole bank; pass "
      'memory_bank_moments(bank).'
    )
  student = jnp.asarray(student_features, jnp.float32)
  bank = jax.lax.stop_gradient(jnp.asarray(bank_neighbours, jnp.float32))
  weights = jax.lax.stop_gradient(jnp.asarray(graph_weights, jnp.float32))
  if student_scale == 'l2':
    student, bank = l2_normalised(student), l2_normalised(bank)
  diff = student[:, None, :] - bank
  loss = jnp.sum(weights * jnp.sum(diff * diff, axis=-1), axis=-1) / k
  if student_scale == 'mean':
    mean, variance = jax.lax.stop_gradient(bank_moments)
    spread = jnp.mean(jnp.sum(jnp.square(student - mean), axis=-1))
    if axis_name is not None:
      spread = jax.lax.pmean(spread, axis_name)
    mu = spread + variance
    loss = loss / jnp.where(mu > 0, mu, 1.0)
  return loss.astype(jnp.float32)


def memory_bank_moments(bank: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(m, v)`: the bank's row mean `[d]` and mean squared distance of its rows to it `[]`
  (float32, no gradient), what `memory_bank_locality_loss(student_scale='mean')` reads."""
  _check_rank2('bank', bank)
  bank = jax.lax.stop_gradient(jnp.asarray(bank, jnp.float32))
  mean = jnp.mean(bank, axis=0)
  return mean, jnp.mean(jnp.sum(jnp.square(bank - mean), axis=-1))


def update_memory_bank(
  bank: jax.Array,
  example_ids: jax.Array,
  features: jax.Array,
  *,
  momentum: float | jax.Array = 0.0,
  axis_name: str | None = None,
) -> jax.Array:
  """The bank with the batch's rows refreshed: `M_e <- momentum * M_e + (1 - momentum) * s_e`.

  No gradient flows into the bank. An id appearing in several rows of one batch is written once,
  from its first row (deterministic; the neighbour-aware sampler can repeat ids, so it is meant
  for the graph batch loss, not for the bank). Ids must lie in `[0, N)`.

  Args:
    bank: `[N, d_s]` array, the bank (its dtype is kept).
    example_ids: `[n]` int array, the split index of each row.
    features: `[n, d_s]` float array, the student embeddings of this step.
    momentum: in `[0, 1]`; 0 (default) overwrites the rows.
    axis_name: inside `jax.pmap` / `jax.shard_map` over the batch with a replicated bank, the
      mapped axis name: ids and features are all-gathered, so every device applies every
      device's rows identically (first row of the global batch wins); under `shard_map` the
      result is typed as replicated (`out_specs=P()`).

  Returns:
    `[N, d_s]` updated bank.

  Example:
    >>> import jax.numpy as jnp
    >>> bank = jnp.zeros((3, 1))
    >>> update_memory_bank(bank, jnp.array([2, 0, 2]), jnp.array([[4.0], [1.0], [9.0]]),
    ...                    momentum=0.5).tolist()
    [[0.5], [0.0], [2.0]]
  """
  _check_rank2('bank', bank)
  _check_rank2('features', features)
  n = jnp.shape(features)[0]
  _check_same_rows('example_ids', example_ids, (n,))
  if jnp.shape(features)[1] != jnp.shape(bank)[1]:
    raise ValueError(
      f'features must have the bank width {jnp.shape(bank)[1]}, got {jnp.shape(features)[1]}.'
    )
  if isinstance(momentum, Real) and not 0 <= momentum <= 1:
    raise ValueError(f'momentum must lie in [0, 1], got {momentum}.')
  bank = jnp.asarray(bank)
  ids = jnp.asarray(example_ids, jnp.int32)
  features = jax.lax.stop_gradient(jnp.asarray(features, jnp.float32))
  if axis_name is not None:
    # An invariant gather types the new bank as replicated, so shard_map accepts out_specs=P().
    gather = lambda x: jax.lax.all_gather(x, axis_name, tiled=True, to='invarying')
    ids, features = gather(ids), gather(features)
  first_rows, _ = _first_rows(ids, ids)
  is_first = first_rows == jnp.arange(ids.shape[0])
  new = momentum * bank[ids].astype(jnp.float32) + (1.0 - momentum) * features
  # Later duplicates go to an out-of-range row, which mode='drop' discards.
  target = jnp.where(is_first, ids, bank.shape[0])
  return bank.at[target].set(new.astype(bank.dtype), mode='drop')
