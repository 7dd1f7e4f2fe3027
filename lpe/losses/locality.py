"""The locality-preserving (Laplacian-eigenmap) feature-embedding loss.

Reference: H. Chen et al., "Learning Student Networks via Feature Embedding", arXiv 1812.06597.
The paper leaves details open; this module fixes them as the project's loss contract: a directed
kNN graph on the teacher features with heat-kernel weights, and a student penalty on the squared
distances along its edges.
"""

from numbers import Integral, Real

import jax
import jax.numpy as jnp
import numpy as np

_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.finfo(np.float32).tiny)  # The smallest normal float32.


def _check_rank2(name: str, x: jax.Array) -> None:
  if jnp.ndim(x) != 2:
    raise ValueError(
      f'{name} must be a 2-D [batch, features] array, got shape {jnp.shape(x)}; '
      'flatten or pool the features first.'
    )


def _check_k(k: int, n: int) -> int:
  if not isinstance(k, Integral) or isinstance(k, bool):
    raise ValueError(
      f'k must be a Python int, got {k!r}; under jax.jit pass it via static_argnames.'
    )
  if k < 1:
    raise ValueError(f'k must be >= 1, got {k}; use at least one neighbour.')
  if k >= n:
    raise ValueError(
      f'k={k} must be smaller than the (global) batch size {n}, since each example needs k '
      'neighbours other than itself; lower k or enlarge the batch.'
    )
  return int(k)


def _check_where(where: jax.Array | None, n: int) -> jax.Array | None:
  if where is None:
    return None
  where = jnp.asarray(where)
  if where.shape != (n,):
    raise ValueError(
      f'where must be a boolean array of shape ({n},), one flag per example, '
      f'got shape {where.shape}.'
    )
  return where.astype(bool)


STUDENT_SCALES = ('none', 'l2', 'mean')


def _check_student_scale(student_scale: str) -> str:
  if student_scale not in STUDENT_SCALES:
    raise ValueError(
      f'student_scale must be one of {", ".join(map(repr, STUDENT_SCALES))}, got {student_scale!r}.'
    )
  return student_scale


def l2_normalised(x: jax.Array) -> jax.Array:
  """Each row of `x` divided by its L2 norm (float32); an all-zero row stays 0, with gradient 0.

  Each row is first divided by a power of two near its largest entry (exact), so rows of any
  finite magnitude, tiny or huge, normalise without underflow or overflow.
  """
  x = jnp.asarray(x, jnp.float32)
  x = x / _power_of_two_scale(x, axis=-1)
  sq_norm = jnp.sum(x * x, axis=-1, keepdims=True)
  nonzero = sq_norm > 0
  # The double where keeps the gradient of a zero row finite (0) instead of 0 * inf.
  return x * jnp.where(nonzero, jax.lax.rsqrt(jnp.where(nonzero, sq_norm, 1.0)), 0.0)


def mean_pair_sq_distance(x: jax.Array, valid: jax.Array) -> jax.Array:
  """`mu`: the mean of `||x_i - x_j||^2` over all ordered pairs `i != j` of valid rows of `x`.

  From the centred rows, exactly: `sum_{i != j} ||x_i - x_j||^2 = 2 n sum_i ||x_i - m||^2` with
  `m` the valid rows' mean, so `mu = 2 sum_i ||x_i - m||^2 / (n - 1)`; `O(n d)`, with gradients.
  Fewer than two valid rows, or every valid row equal, give `mu = 1` (nothing to normalise).
  """
  x = jnp.where(valid[:, None], jnp.asarray(x, jnp.float32), 0.0)
  count = jnp.sum(valid)
  centre = jnp.sum(x, axis=0) / jnp.maximum(count, 1)
  centred = jnp.where(valid[:, None], x - centre, 0.0)
  mu = 2.0 * jnp.sum(centred * centred) / jnp.maximum(count - 1, 1)
  return jnp.where((count >= 2) & (mu > 0), mu, 1.0)


def _power_of_two_scale(x: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
  """A power of two `p` with `max |x| < 2 p` over the finite entries of `x` (along `axis`, kept).

  Dividing by `p` is exact in float32 (unless a result falls below the smallest normal), so a
  computation on `x / p` whose result is scaled back by powers of `p` is bit-identical to the same
  computation on `x` wherever that does not overflow or underflow, and it does not overflow where
  the one on `x` would. `p = 1` where every finite entry is 0 or below the smallest normal (whose
  exponent is not reliable). The scale carries no gradient.
  """
  x = jax.lax.stop_gradient(x)
  largest = jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0), axis=axis, keepdims=True)
  _, exponent = jnp.frexp(largest)  # largest = m 2^exponent with 0.5 <= m < 1.
  scale = jnp.ldexp(jnp.ones_like(largest), exponent - 1)
  return jnp.where(largest >= _F32_TINY, scale, 1.0)


def _expanded_sq_distances(x: jax.Array, y: jax.Array) -> jax.Array:
  """`||x_i||^2 + ||y_j||^2 - 2 <x_i, y_j>` clamped at 0: float32 `[n, d]`, `[m, d]` -> `[n, m]`."""
  # The default matmul precision on GPU/TPU (bf16 passes) is too coarse for distances.
  dots = jnp.matmul(x, y.T, precision=jax.lax.Precision.HIGHEST)
  sq = jnp.sum(x * x, axis=1)[:, None] + jnp.sum(y * y, axis=1)[None, :] - 2.0 * dots
  return jnp.maximum(sq, 0.0)


def pairwise_sq_distances(x: jax.Array, y: jax.Array | None = None) -> jax.Array:
  """Squared Euclidean distances between the rows of `x` and the rows of `y`.

  `D[i, j] = ||x_i - y_j||^2 = ||x_i||^2 + ||y_j||^2 - 2 <x_i, y_j>`, computed in float32 with a
  full-precision matmul, clamped at 0 (rounding can make the expansion slightly negative) and,
  when `y` is None, exactly 0 on the diagonal.

  The expansion is taken on the inputs divided by a common power of two near their largest
  magnitude and scaled back, which is exact: the values are those of the plain expansion, but
  the squared norms of large features (above about 1e19) do not overflow on the way. An entry is
  `+inf` (or 0) only where the true distance is beyond float32's range. Non-finite features give
  non-finite distances (NaN, or inf) in their rows and columns.

  Args:
    x: `[n, d]` array of any float dtype (bfloat16 is upcast).
    y: `[m, d]` array, or None to use `x` (then `m = n`).

  Returns:
    `[n, m]` float32 array of squared distances.

  Example:
    >>> import jax.numpy as jnp
    >>> pairwise_sq_distances(jnp.array([[0.0, 0.0], [3.0, 4.0]])).tolist()
    [[0.0, 25.0], [25.0, 0.0]]
    >>> pairwise_sq_distances(jnp.array([[0.0], [3e19]])).tolist()  # 9e38: beyond float32.
    [[0.0, inf], [inf, 0.0]]
  """
  _check_rank2('x', x)
  x = jnp.asarray(x, jnp.float32)
  y_ = x if y is None else jnp.asarray(y, jnp.float32)
  _check_rank2('y', y_)
  if y_.shape[1] != x.shape[1]:
    raise ValueError(
      f'x and y must have the same feature width, got {x.shape[1]} and {y_.shape[1]}.'
    )
  scale = jnp.maximum(_power_of_two_scale(x), _power_of_two_scale(y_))  # [1, 1]
  # Two products, not one by scale**2: that would overflow first.
  sq = _expanded_sq_distances(x / scale, y_ / scale) * scale * scale
  if y is None:
    sq = jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, sq)
  return sq


# Automatic path choice (`block_size=None`): the direct path (one block holding every row) up to
# this global batch size, blocks of `KNN_BLOCK_SIZE` rows above it. Up to 4096 rows the [n, n]
# matrix is at most 64 MiB; from 8192 it is 256 MiB and grows 4x per doubling, while on 2 CPU
# cores blocks of 1024 rows ran as fast as the direct path (within timing noise) from n = 2048
# on, for teacher widths 64 to 2048 (docs/performance_loss_scaling.md).
KNN_DIRECT_MAX_ROWS = 4096
KNN_BLOCK_SIZE = 1024


def _resolve_block_size(block_size: int | None, n: int) -> int:
  """Rows per block: `n` (one block, the direct path) or a smaller positive int."""
  if block_size is None:
    return n if n <= KNN_DIRECT_MAX_ROWS else KNN_BLOCK_SIZE
  if not isinstance(block_size, Integral) or isinstance(block_size, bool) or block_size < 0:
    raise ValueError(
      f'block_size must be None (automatic), 0 (direct) or a positive Python int, got '
      f'{block_size!r}; under jax.jit pass it via static_argnames.'
    )
  return n if block_size == 0 else min(int(block_size), n)


def _masked_rows_zeroed(x: jax.Array, valid: jax.Array) -> jax.Array:
  """Rows that take no part are ignored: whatever they hold (padding, NaN) cannot leak out."""
  return jnp.where(valid[:, None], x, 0.0)


def _scaled_knn(
  teacher: jax.Array, valid: jax.Array, k: int, block: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The kNN graph of the float32 `teacher` rows (masked rows zeroed) in scaled units.

  Returns `(indices, scaled_sq_distances, filled, scale)`: `D[i, j] = scaled * scale * scale`
  (`scale` a power of two, `[1, 1]`; the scaled distances are finite for finite features), and
  `filled` marks the slots that hold a valid neighbour of a valid row. An unfilled slot's index is
  never the row itself.
  """
  n, d = teacher.shape
  scale = _power_of_two_scale(teacher)
  scaled = teacher / scale
  columns = jnp.arange(n)

  def block_graph(anchors, anchor_ids, anchor_valid):
    dist = _expanded_sq_distances(anchors, scaled)  # [block, n]
    # Candidates are picked by position (not self, valid row and column) and get keys of at least
    # -F32_MAX, whatever the distances hold (NaN and inf rank last: top_k would rank NaN first);
    # the rest get -inf, so they can only fill slots that no candidate fills.
    candidate = (columns != anchor_ids[:, None]) & valid[None, :] & anchor_valid[:, None]
    key = jnp.where(candidate, jnp.where(dist <= _F32_MAX, -dist, -_F32_MAX), -jnp.inf)
    neg_dist, indices = jax.lax.top_k(key, k)
    filled = neg_dist > -jnp.inf
    # Unfilled slots get rows i + 1, ..., i + k (mod n): never i itself, as k < n.
    others = (anchor_ids[:, None] + 1 + jnp.arange(k)) % n
    return jnp.where(filled, indices, others).astype(jnp.int32), -neg_dist, filled

  num_blocks = -(-n // block)
  if num_blocks == 1:
    indices, dist, filled = block_graph(scaled, columns, valid)
    return indices, dist, filled, scale
  # Padding rows are anchors without neighbours (never columns); their results are cut off.
  pad = num_blocks * block - n
  anchors = jnp.pad(scaled, ((0, pad), (0, 0))).reshape(num_blocks, block, d)
  anchor_ids = jnp.arange(num_blocks * block).reshape(num_blocks, block)
  anchor_valid = jnp.pad(valid, (0, pad)).reshape(num_blocks, block)
  out = jax.lax.map(lambda xs: block_graph(*xs), (anchors, anchor_ids, anchor_valid))
  indices, dist, filled = (x.reshape(-1, k)[:n] for x in out)
  return indices, dist, filled, scale


def knn_graph(
  teacher_features: jax.Array,
  *,
  k: int,
  where: jax.Array | None = None,
  block_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The directed k-nearest-neighbour graph of the rows of `teacher_features`.

  `N(i)` holds the `k` indices `j != i` with the smallest `D[i, j]` (`D` from
  `pairwise_sq_distances`), nearest first; ties go to the lower index (as `jax.lax.top_k` on
  `-D`). The result carries no gradient. A row is never its own neighbour, in any slot and
  whatever the values: its own column is masked by position, every candidate's key is finite
  (NaN and inf distances rank last), and unfilled slots never hold the row's own index.

  Distances are ranked in units of a power of two near the largest feature magnitude, which is
  exact, so features of any finite magnitude give the right graph. A returned distance beyond
  float32's range (features above about 1e19) reads as the largest float32, so that `+inf` marks
  only unfilled slots.

  Invalid slots: with `where`, masked rows are never neighbours and a masked row has no
  neighbours; what masked rows hold is ignored (it may be non-finite). A slot that cannot be
  filled (a masked row, or a row with fewer than `k` valid other rows) has distance `+inf`; its
  index is in range but meaningless. Test slots with `sq_distances != inf`.

  Non-finite features: if a valid row holds a NaN or inf, its distance to every row is undefined
  and so is every row's graph: every filled slot's distance is NaN (indices stay in range and
  never the row itself).

  Memory: the rows are processed in blocks of `block_size` anchors (`jax.lax.map`), each against
  all `n` rows, so the largest buffer is `[block_size, n]` instead of `[n, n]`. Each row's
  neighbours depend on that row's distances only, so every block size gives the same graph (up to
  float32 rounding of the matmul, which can differ between matrix shapes).

  Args:
    teacher_features: `[n, d]` float array.
    k: number of neighbours per row, `1 <= k < n`.
    where: optional `[n]` bool array, True for rows that take part.
    block_size: rows per block: None picks the direct path (one `[n, n]` block) for
      `n <= KNN_DIRECT_MAX_ROWS` and blocks of `KNN_BLOCK_SIZE` above; 0 forces the direct path;
      a positive int sets the block (the last block is padded). A Python int: under `jax.jit`
      pass it via `static_argnames`.

  Returns:
    `(indices, sq_distances)`: `[n, k]` int32 neighbour indices and `[n, k]` float32 `D[i, j]`.

  Example:
    >>> import jax.numpy as jnp
    >>> t = jnp.array([[0.0], [1.0], [3.0], [6.0]])
    >>> indices, sq_distances = knn_graph(t, k=1, block_size=3)
    >>> indices.tolist(), sq_distances.tolist()
    ([[1], [0], [1], [2]], [[1.0], [1.0], [4.0], [9.0]])
    >>> knn_graph(1e30 * t, k=1)[0].tolist()  # D overflows float32; the graph does not.
    [[1], [0], [1], [2]]
  """
  _check_rank2('teacher_features', teacher_features)
  n, _ = jnp.shape(teacher_features)
  k = _check_k(k, n)
  where = _check_where(where, n)
  block = _resolve_block_size(block_size, n)
  valid = jnp.ones(n, bool) if where is None else where
  teacher = jax.lax.stop_gradient(jnp.asarray(teacher_features, jnp.float32))
  teacher = _masked_rows_zeroed(teacher, valid)
  indices, scaled_dist, filled, scale = _scaled_knn(teacher, valid, k, block)
  sq_dist = jnp.minimum(scaled_dist * scale * scale, _F32_MAX)
  sq_dist = jnp.where(jnp.all(jnp.isfinite(teacher)), sq_dist, jnp.nan)
  return indices, jnp.where(filled, sq_dist, jnp.inf)


def _check_sigma2(sigma2: float | jax.Array | None) -> tuple[jax.Array | None, jax.Array]:
  """`sigma2` as float32 (or None) and whether it is bad; a bad concrete value raises."""
  if sigma2 is None:
    return None, jnp.asarray(False)
  if np.ndim(sigma2) != 0:
    raise ValueError(f'sigma2 must be a scalar, got shape {np.shape(sigma2)}.')
  try:
    value = float(sigma2)
  except TypeError:  # A tracer under jit (ConcretizationTypeError is a TypeError).
    pass
  else:
    if not 0.0 < value <= _F32_MAX:
      raise ValueError(
        f'sigma2 must be > 0 and finite in float32, got {value}; pass None for the '
        'mean-distance default.'
      )
  sigma2 = jnp.asarray(sigma2, jnp.float32)
  return sigma2, ~((sigma2 > 0) & jnp.isfinite(sigma2))


def locality_preserving_loss(
  student_features: jax.Array,
  teacher_features: jax.Array,
  *,
  k: int = 5,
  sigma2: float | jax.Array | None = None,
  sigma2_scale: float = 1.0,
  where: jax.Array | None = None,
  axis_name: str | None = None,
  block_size: int | None = None,
  student_scale: str = 'none',
) -> jax.Array:
  """Per-example locality-preserving loss: teacher neighbours should stay close in the student.

  With `D` the teacher squared distances and `N(i)` the teacher kNN graph (`knn_graph`):

    a[i, j] = exp(-D[i, j] / sigma2)                          for j in N(i), else 0
    l_i     = (1 / k) * sum_{j in N(i)} a[i, j] * ||s_i - s_j||^2

  `sigma2` defaults to the mean of `D[i, j]` over all valid `i` and `j in N(i)`. If that mean is
  0 (all those distances are 0, or there is no valid pair) `sigma2 = 1` is used, which gives each
  zero-distance pair the limit weight `exp(0) = 1` instead of `exp(-0/0) = NaN`.

  The teacher side (features, graph, weights, `sigma2`) carries no gradient; the gradient reaches
  `s_i` and its neighbours `s_j`. `||s_i - s_j||^2` is taken from the gathered neighbour rows
  directly, so gradients are exact when student features coincide. The batch loss is the mean of
  `l_i`; the paper's `1/2 sum_ij a_ij ||s_i - s_j||^2` is `(n k / 2)` times it.

  `student_scale` removes the student's scale from the loss (`'none'`, the paper's form above, can
  be lowered by shrinking every student embedding):

    'l2':   the loss above on s_i / ||s_i|| (each student row L2-normalised; a zero row stays 0)
    'mean': l_i / mu,  mu = mean of ||s_i - s_j||^2 over all ordered pairs i != j of valid rows
            of the (global) batch (1 if there are fewer than two, or all coincide); the gradient
            flows through mu (RKD's distance normalisation applied to LP)

  Both give the same loss when every `s_i` is multiplied by the same `c > 0`.

  Teacher features of any finite magnitude work: the graph and `D / sigma2` are computed in units
  of a power of two near the largest teacher feature (exact, so ordinary inputs give the same
  bits), and the default `sigma2` is scale-free. Student distances beyond float32's range
  (features above about 1e19) give an infinite loss.

  Bad input is never hidden: a NaN or inf teacher feature in a valid row makes every valid row's
  loss NaN (that row's distances, hence every row's graph and the default `sigma2`, are
  undefined); a NaN or inf student feature makes its own row's loss non-finite, and that of every
  row it is a neighbour of (with `student_scale='mean'`, of every valid row, through `mu`); a
  traced `sigma2` that is NaN, inf or `<= 0` makes every valid row's
  loss NaN. Masked rows are the exception: what they hold is ignored.

  Args:
    student_features: `[n, d_s]` float array (any float dtype; computed in float32).
    teacher_features: `[n, d_t]` float array.
    k: neighbours per example, a Python int with `1 <= k < global batch size`. Under `jax.jit`
      pass it in `static_argnames`.
    sigma2: heat-kernel bandwidth (> 0 and finite in float32), or None for the default above.
    sigma2_scale: a Python float > 0 that multiplies the bandwidth (the given `sigma2` or the
      default): > 1 widens the kernel (weights nearer 1), < 1 narrows it.
      A concrete bad value raises a ValueError; a traced one gives NaN losses.
    where: optional `[n]` bool array; masked rows are neither anchors nor neighbours and get
      loss exactly 0, whatever their features hold. Anchors with fewer than `k` valid
      neighbours sum over those they have (still divided by `k`).
    axis_name: inside `jax.pmap` / `jax.shard_map` over the batch, the mapped axis name: the
      features and mask are all-gathered, the graph and default `sigma2` use the global batch,
      and the loss of the local rows is returned (equal to the single-device values).
    block_size: how `knn_graph` splits the teacher distances: None (automatic, by the global
      batch size), 0 (direct, one `[n, n]` matrix) or rows per block (peak memory
      `O(n * block_size)`). The loss and its gradients do not depend on it. A Python int.
    student_scale: 'none' (the paper's form), 'l2' or 'mean' (scale-invariant forms, above).

  Returns:
    `[n]` float32 per-example loss (local rows under `axis_name`).

  Example:
    >>> import jax.numpy as jnp
    >>> s = jnp.array([[0.0], [1.0], [3.0], [6.0]])
    >>> loss = locality_preserving_loss(s, 2.0 * s, k=1, sigma2=4.0)
    >>> [round(float(x), 4) for x in loss]  # exp(-1) * 1, exp(-1) * 1, exp(-4) * 4, exp(-9) * 9
    [0.3679, 0.3679, 0.0733, 0.0011]
    >>> bool(jnp.isnan(locality_preserving_loss(s, s.at[2, 0].set(jnp.nan), k=1)).all())
    True
    >>> a = locality_preserving_loss(s, s, k=1, student_scale='mean')
    >>> b = locality_preserving_loss(10.0 * s, s, k=1, student_scale='mean')
    >>> bool(jnp.allclose(a, b))
    True
  """
  _check_rank2('student_features', student_features)
  _check_rank2('teacher_features', teacher_features)
  n_local = jnp.shape(student_features)[0]
  if jnp.shape(teacher_features)[0] != n_local:
    raise ValueError(
      f'student_features and teacher_features must hold the same examples, got batch sizes '
      f'{n_local} and {jnp.shape(teacher_features)[0]}.'
    )
  sigma2, bad_sigma2 = _check_sigma2(sigma2)
  if not (isinstance(sigma2_scale, Real) and 0 < sigma2_scale < np.inf):
    raise ValueError(f'sigma2_scale must be a Python number > 0, got {sigma2_scale!r}.')
  if sigma2 is not None and sigma2_scale != 1:
    sigma2 = sigma2 * sigma2_scale
  where = _check_where(where, n_local)
  student_scale = _check_student_scale(student_scale)

  student = jnp.asarray(student_features, jnp.float32)
  teacher = jax.lax.stop_gradient(jnp.asarray(teacher_features, jnp.float32))
  if axis_name is not None:
    # Gathering the student keeps it differentiable: the transpose of all_gather sums the
    # cotangents of every device's rows back onto the owning device.
    gather = lambda x: jax.lax.all_gather(x, axis_name, tiled=True)
    student, teacher = gather(student), gather(teacher)
    where = None if where is None else gather(where)

  n = student.shape[0]
  k = _check_k(k, n)
  block = _resolve_block_size(block_size, n)
  valid = jnp.ones(n, bool) if where is None else where
  student = _masked_rows_zeroed(student, valid)
  if student_scale == 'l2':  # After masking: what masked rows held cannot reach a gradient.
    student = l2_normalised(student)
  elif student_scale == 'mean':
    # The loss ignores the student's scale, so a power of two (exact) keeps mu in range.
    student = student / _power_of_two_scale(student)
  teacher = _masked_rows_zeroed(teacher, valid)
  indices, scaled_dist, filled, scale = _scaled_knn(teacher, valid, k, block)
  if sigma2 is None:
    # D / mean(D) in scaled units: the same bits as in the original ones, and no overflow.
    scaled_dist = jnp.where(filled, scaled_dist, 0.0)
    mean = jnp.sum(scaled_dist) / jnp.maximum(jnp.sum(filled), 1)
    bandwidth = jnp.where(mean > 0, mean, 1.0)
    ratio = scaled_dist / (bandwidth * sigma2_scale if sigma2_scale != 1 else bandwidth)
  else:
    sq_dist = scaled_dist * scale * scale
    # Where D itself overflows, divide by sigma2 half-way through the scaling instead.
    ratio = jnp.where(jnp.isfinite(sq_dist), sq_dist / sigma2, scaled_dist * scale / sigma2 * scale)
  weights = jax.lax.stop_gradient(jnp.where(filled, jnp.exp(-ratio), 0.0))

  diff = student[:, None, :] - student[indices]  # [n, k, d_s]
  terms = jnp.where(filled, weights * jnp.sum(diff * diff, axis=-1), 0.0)
  loss = jnp.sum(terms, axis=-1) / k
  if student_scale == 'mean':
    loss = loss / mean_pair_sq_distance(student, valid)
  # Stated, not left to the arithmetic: a row with no filled slot has no term to carry a NaN.
  bad_batch = bad_sigma2 | ~jnp.all(jnp.isfinite(teacher))
  bad_row = bad_batch | ~jnp.all(jnp.isfinite(student), axis=1)
  loss = jnp.where(valid & bad_row, jnp.nan, loss)
  if axis_name is not None:
    start = jax.lax.axis_index(axis_name) * n_local
    loss = jax.lax.dynamic_slice_in_dim(loss, start, n_local)
  return loss.astype(jnp.float32)
