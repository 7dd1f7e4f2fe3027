"""How much of the teacher a student keeps: agreement, neighbourhood preservation, linear CKA.

Pure functions, computed at evaluation on the test split.
"""

import jax
import jax.numpy as jnp
import numpy as np

from lpe.losses.locality import knn_graph


def top1_agreement(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """Per-example 1.0 where the student's top-1 class is the teacher's, else 0.0: `[n]` float32."""
  if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
    raise ValueError(
      f'Logits must both be [n, classes], got {student_logits.shape} and {teacher_logits.shape}.'
    )
  same = jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)
  return same.astype(jnp.float32)


def neighbourhood_preservation(
  student_features: jax.Array,
  teacher_features: jax.Array,
  *,
  k: int,
  where: jax.Array | None = None,
) -> jax.Array:
  """Per-example fraction of the k nearest teacher neighbours that are k nearest student ones.

  For row `i`, `|N_T(i) & N_S(i)| / k`, with `N_T`, `N_S` the k-nearest-neighbour sets
  (`knn_graph`) of the teacher and the student features within this batch. 1 means the student
  keeps every teacher neighbourhood; a random embedding scores about `k / (n - 1)`.

  Args:
    student_features: `[n, d_S]`.
    teacher_features: `[n, d_T]`.
    k: neighbours per row, `1 <= k < n`.
    where: optional `[n]` bool; masked rows are never neighbours and score 0 (what they hold is
      ignored).

  Returns:
    `[n]` float32 fractions in [0, 1]; NaN for every valid row if a valid row of either side
    holds a NaN or inf (the neighbourhoods are then undefined).
  """
  t_idx, t_dist = knn_graph(teacher_features, k=k, where=where)
  s_idx, s_dist = knn_graph(student_features, k=k, where=where)
  t_valid, s_valid = t_dist != jnp.inf, s_dist != jnp.inf
  shared = (t_idx[:, :, None] == s_idx[:, None, :]) & t_valid[:, :, None] & s_valid[:, None, :]
  kept = jnp.sum(jnp.any(shared, axis=2), axis=1).astype(jnp.float32) / k
  # The counts above cannot carry a NaN: say it here.
  rows = jnp.ones(kept.shape, bool) if where is None else jnp.asarray(where, bool)
  finite = lambda x: jnp.all(jnp.isfinite(jnp.asarray(x, jnp.float32)), axis=1)
  undefined = jnp.any(rows & ~(finite(teacher_features) & finite(student_features)))
  return jnp.where(rows & undefined, jnp.nan, kept)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
  """Linear centred kernel alignment between two representations of the same n examples.

  `CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)` on column-centred `X [n, d_x]`, `Y [n, d_y]`
  (Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019). It is
  invariant to rotations and isotropic scaling of either side, so widths may differ; 1 means
  the same geometry up to those.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
    raise ValueError(f'CKA needs [n, d] arrays with the same n, got {x.shape} and {y.shape}.')
  x = x - x.mean(0)
  y = y - y.mean(0)
  cross = np.linalg.norm(y.T @ x) ** 2
  norm = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
  return float(cross / norm) if norm > 0 else 0.0
