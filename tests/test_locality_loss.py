"""Tests of lpe.losses.locality against a plain NumPy double loop written from the contract."""

import doctest
import functools

import chex
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

import lpe.losses.locality
from lpe.losses import knn_graph, locality_preserving_loss, pairwise_sq_distances

N = 10
F32_MAX = np.finfo(np.float32).max
jitted_loss = jax.jit(locality_preserving_loss, static_argnames=('k',))


def reference_graph(teacher, k, where=None):
  """Teacher distances (float64) and neighbour lists, straight from the contract."""
  t = np.asarray(teacher, np.float64)
  n = len(t)
  valid = np.ones(n, bool) if where is None else np.asarray(where, bool)
  dist = np.zeros((n, n))
  for i in range(n):
    for j in range(n):
      dist[i, j] = np.sum((t[i] - t[j]) ** 2)
  neighbours = []
  for i in range(n):
    candidates = [j for j in range(n) if j != i and valid[j]] if valid[i] else []
    # A stable sort keeps equal distances in index order: ties go to the lower index.
    order = np.argsort(dist[i, candidates], kind='stable')[:k]
    neighbours.append([candidates[o] for o in order])
  return dist, neighbours


def reference_weights(teacher, k, sigma2=None, where=None):
  """Yields (i, j, a_ij) for every edge of the graph."""
  dist, neighbours = reference_graph(teacher, k, where)
  pair_dists = [dist[i, j] for i, nbrs in enumerate(neighbours) for j in nbrs]
  if sigma2 is None:
    sigma2 = np.mean(pair_dists) if pair_dists else 0.0
  for i, nbrs in enumerate(neighbours):
    for j in nbrs:
      # sigma2 == 0 only when every neighbour distance is 0: the limit weight is exp(0) = 1.
      yield i, j, 1.0 if sigma2 == 0 else np.exp(-dist[i, j] / sigma2)


def reference_loss(student, teacher, k, sigma2=None, where=None):
  s = np.asarray(student, np.float64)
  loss = np.zeros(len(s))
  for i, j, a in reference_weights(teacher, k, sigma2, where):
    loss[i] += a * np.sum((s[i] - s[j]) ** 2) / k
  return loss


def reference_mean_loss_grad(student, teacher, k, sigma2=None, where=None):
  """Analytic gradient of mean_i l_i w.r.t. the student features."""
  s = np.asarray(student, np.float64)
  n = len(s)
  grad = np.zeros_like(s)
  for i, j, a in reference_weights(teacher, k, sigma2, where):
    g = 2.0 / k * a * (s[i] - s[j]) / n
    grad[i] += g
    grad[j] -= g
  return grad


def make_inputs(seed=0, n=N, d_s=4, d_t=6):
  rng = np.random.default_rng(seed)
  student = rng.normal(size=(n, d_s)).astype(np.float32)
  teacher = rng.normal(size=(n, d_t)).astype(np.float32)
  mask = rng.random(n) > 0.3
  mask[:2] = [True, False]  # At least one row of each kind.
  return student, teacher, mask


def mean_loss(student, teacher, **kwargs):
  return jnp.mean(locality_preserving_loss(student, teacher, **kwargs))


# --- pairwise_sq_distances ------------------------------------------------------------------


def test_pairwise_sq_distances_matches_numpy():
  x, y, _ = make_inputs()
  expected = np.sum((x[:, None, :4].astype(np.float64) - y[None, :, :4]) ** 2, axis=-1)
  np.testing.assert_allclose(pairwise_sq_distances(x, y[:, :4]), expected, rtol=1e-5, atol=1e-5)
  dist = pairwise_sq_distances(x)
  assert dist.dtype == jnp.float32 and dist.shape == (N, N)
  np.testing.assert_array_equal(np.diag(dist), 0.0)


def test_pairwise_sq_distances_nonnegative_for_nearly_identical_rows():
  rng = np.random.default_rng(1)
  # Large norms and tiny differences: the norm expansion cancels and can round below zero.
  x = (1000.0 + 1e-4 * rng.normal(size=(N, 8))).astype(np.float32)
  dist = np.asarray(pairwise_sq_distances(x, x + 1e-5))
  assert np.all(dist >= 0.0)
  np.testing.assert_array_equal(np.diag(pairwise_sq_distances(x)), 0.0)


# --- knn_graph -------------------------------------------------------------------------------


def test_knn_graph_excludes_self_and_matches_reference():
  _, teacher, _ = make_inputs()
  indices, sq_dist = knn_graph(teacher, k=3)
  dist, neighbours = reference_graph(teacher, 3)
  assert indices.dtype == jnp.int32 and sq_dist.dtype == jnp.float32
  assert not np.any(np.asarray(indices) == np.arange(N)[:, None])
  np.testing.assert_array_equal(indices, neighbours)
  np.testing.assert_allclose(sq_dist, np.take_along_axis(dist, indices, 1), rtol=1e-5)


def test_knn_graph_ties_go_to_lower_index():
  teacher = jnp.array([[0.0], [1.0], [-1.0], [0.0], [2.0]])
  indices, _ = jax.jit(knn_graph, static_argnames='k')(teacher, k=2)
  # Row 0: 3 (distance 0), then 1 and 2 tie at distance 1 -> 1. Row 1: 0 and 3 tie -> 0, 3.
  assert indices.tolist() == [[3, 1], [0, 3], [0, 3], [0, 1], [1, 0]]


def test_knn_graph_mask():
  _, teacher, _ = make_inputs()
  where = np.zeros(N, bool)
  where[[1, 4, 5, 8]] = True
  indices, sq_dist = knn_graph(teacher, k=4, where=where)
  valid = np.isfinite(np.asarray(sq_dist))
  # Masked rows have no neighbours; valid rows have the 3 other valid rows and one empty slot.
  assert not valid[~where].any()
  np.testing.assert_array_equal(valid[where].sum(axis=1), 3)
  assert where[np.asarray(indices)[valid]].all()
  _, neighbours = reference_graph(teacher, 4, where)
  for i in np.flatnonzero(where):
    assert np.asarray(indices)[i][valid[i]].tolist() == neighbours[i]


# --- locality_preserving_loss: values --------------------------------------------------------


@pytest.mark.parametrize('k', [1, 3, 5, N - 1])
@pytest.mark.parametrize('case', ['default_sigma2', 'given_sigma2', 'mask'])
def test_loss_matches_reference(k, case):
  student, teacher, mask = make_inputs(seed=k)
  sigma2 = 3.0 if case == 'given_sigma2' else None
  where = mask if case == 'mask' else None
  loss = jitted_loss(student, teacher, k=k, sigma2=sigma2, where=where)
  assert loss.shape == (N,) and loss.dtype == jnp.float32
  expected = reference_loss(student, teacher, k, sigma2, where)
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
  if where is not None:
    np.testing.assert_array_equal(np.asarray(loss)[~mask], 0.0)


@pytest.mark.parametrize('use_mask', [False, True])
def test_loss_with_tied_teacher_distances(use_mask):
  student, _, mask = make_inputs(seed=3)
  teacher = np.random.default_rng(3).integers(0, 3, size=(N, 2)).astype(np.float32)
  where = mask if use_mask else None
  loss = jitted_loss(student, teacher, k=3, where=where)
  np.testing.assert_allclose(loss, reference_loss(student, teacher, 3, None, where), rtol=1e-5)


def test_identical_teacher_features_give_unit_weights_and_no_nan():
  student, _, _ = make_inputs()
  teacher = np.zeros((N, 3), np.float32)  # Every D is 0, so the default sigma2 is 0.
  loss = jitted_loss(student, teacher, k=3)
  np.testing.assert_allclose(loss, reference_loss(student, teacher, 3), rtol=1e-5)
  assert np.all(np.isfinite(jax.grad(mean_loss)(student, teacher, k=3)))


@pytest.mark.parametrize('n_valid', [0, 1])
def test_no_valid_pairs_give_zero_loss_and_no_nan(n_valid):
  student, teacher, _ = make_inputs()
  where = np.arange(N) < n_valid
  loss = jitted_loss(student, teacher, k=3, where=where)
  np.testing.assert_array_equal(loss, 0.0)
  grad = jax.grad(mean_loss)(student, teacher, k=3, where=where)
  np.testing.assert_array_equal(grad, 0.0)


def test_permutation_equivariance():
  student, teacher, mask = make_inputs(seed=5)  # Gaussian features: no distance ties.
  perm = np.random.default_rng(5).permutation(N)
  loss = jitted_loss(student, teacher, k=3, where=mask)
  permuted = jitted_loss(student[perm], teacher[perm], k=3, where=mask[perm])
  np.testing.assert_allclose(permuted, np.asarray(loss)[perm], rtol=1e-5, atol=1e-7)


def test_bfloat16_inputs_give_float32_output():
  student, teacher, _ = make_inputs()
  s16, t16 = jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16)
  loss = jitted_loss(s16, t16, k=3)
  assert loss.dtype == jnp.float32
  # Upcast before any arithmetic: identical to float32 on the rounded values...
  upcast = jitted_loss(s16.astype(jnp.float32), t16.astype(jnp.float32), k=3)
  np.testing.assert_allclose(loss, upcast, rtol=1e-6)
  # ...and close to float32 on the original values.
  np.testing.assert_allclose(loss, jitted_loss(student, teacher, k=3), rtol=5e-2, atol=1e-3)


# Teacher features far from 1: distances overflow float32 above about 1e19 and underflow below
# about 1e-19. (scale, sigma2): the given sigma2 is 0.5 * scale^2, which float32 holds.
EXTREME_SCALES = [(2.0**64, None), (2.0**64, 'given'), (1e19, None), (1e19, 'given'), (1e-25, None)]


@pytest.mark.parametrize('scale, sigma2', EXTREME_SCALES)
def test_loss_and_graph_at_extreme_teacher_magnitudes_match_reference(scale, sigma2):
  student, teacher, mask = make_inputs(seed=12)
  teacher = (teacher.astype(np.float64) * scale).astype(np.float32)
  sigma2 = None if sigma2 is None else 0.5 * scale**2
  for where in (None, mask):
    loss = jitted_loss(student, teacher, k=3, sigma2=sigma2, where=where)
    expected = reference_loss(student, teacher, 3, sigma2, where)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
  indices, sq_dist = knn_graph(teacher, k=3)
  dist, neighbours = reference_graph(teacher, 3)
  np.testing.assert_array_equal(indices, neighbours)
  # Distances beyond float32's range read as its largest value (or 0 below it); the rest are
  # right.
  expected_dist = np.minimum(np.take_along_axis(dist, np.asarray(indices), 1), F32_MAX)
  np.testing.assert_allclose(sq_dist, expected_dist, rtol=1e-5, atol=np.finfo(np.float32).tiny)


@pytest.mark.parametrize('exponent', [-60, 40, 100])
def test_power_of_two_teacher_scale_changes_no_bit(exponent):
  """The graph and D / sigma2 are computed in units of a power of two: scaling by one is exact."""
  student, teacher, mask = make_inputs(seed=13)
  factor = np.float32(2.0**exponent)
  value_and_grad = jax.jit(jax.value_and_grad(mean_loss), static_argnames='k')
  for sigma2 in (None, 0.5) if exponent < 64 else (None,):  # sigma2 * factor^2 must fit.
    scaled_sigma2 = None if sigma2 is None else sigma2 * float(factor) ** 2
    value, grad = value_and_grad(student, teacher, k=3, sigma2=sigma2, where=mask)
    scaled = value_and_grad(student, teacher * factor, k=3, sigma2=scaled_sigma2, where=mask)
    np.testing.assert_array_equal(scaled[0], value)
    np.testing.assert_array_equal(scaled[1], grad)
  indices, sq_dist = knn_graph(teacher, k=3)
  scaled_indices, scaled_sq_dist = knn_graph(teacher * factor, k=3)
  np.testing.assert_array_equal(scaled_indices, indices)
  expected = np.minimum(np.asarray(sq_dist, np.float64) * float(factor) ** 2, F32_MAX)
  np.testing.assert_array_equal(scaled_sq_dist, expected.astype(np.float32))


def test_pairwise_sq_distances_at_extreme_magnitudes():
  rng = np.random.default_rng(14)
  # ||x||^2 (about 8e38) overflows, the distances (at most 2.6e38) do not.
  x, y = (1e19 * (1.0 + rng.uniform(-0.4, 0.4, size=(2, N, 4)))).astype(np.float32)
  expected = np.sum((x[:, None].astype(np.float64) - y[None]) ** 2, axis=-1)
  # The expansion cancels: its float32 error grows with ||x||^2 / D.
  np.testing.assert_allclose(pairwise_sq_distances(x, y), expected, rtol=1e-4)
  x = np.float32(1e-18) * make_inputs()[0]
  expected = np.sum((x[:, None].astype(np.float64) - x[None]) ** 2, axis=-1)
  np.testing.assert_allclose(pairwise_sq_distances(x), expected, rtol=1e-5)
  huge = pairwise_sq_distances(np.float32(1e20) * make_inputs()[0])  # 1e40: beyond float32.
  assert np.isposinf(huge[~np.eye(N, dtype=bool)]).all()
  np.testing.assert_array_equal(np.diag(huge), 0.0)


# --- locality_preserving_loss: gradients -----------------------------------------------------


@pytest.mark.parametrize('sigma2', [None, 2.0])
def test_student_gradient_matches_analytic_reference(sigma2):
  student, teacher, mask = make_inputs(seed=7)
  grad = jax.jit(jax.grad(mean_loss), static_argnames='k')(
    student, teacher, k=3, sigma2=sigma2, where=mask
  )
  expected = reference_mean_loss_grad(student, teacher, 3, sigma2, mask)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_check_grads():
  student, teacher, mask = make_inputs(seed=8)
  loss_fn = lambda s: locality_preserving_loss(s, teacher, k=3, where=mask)
  # The loss is quadratic in the student (the graph is fixed by the teacher), so the
  # second-order checks difference at most cubic functions: a step of 1e-2 keeps float32
  # rounding (which dominates at the default 1e-4) and truncation error both small.
  jax.test_util.check_grads(loss_fn, (student,), order=2, modes=('fwd', 'rev'), eps=1e-2)


def test_finite_gradients_when_student_features_coincide():
  _, teacher, _ = make_inputs()
  student = np.ones((N, 4), np.float32)
  loss_fn = lambda s: locality_preserving_loss(s, teacher, k=3)
  np.testing.assert_array_equal(loss_fn(student), 0.0)
  grad = jax.grad(lambda s: jnp.mean(loss_fn(s)))(student)
  np.testing.assert_array_equal(grad, 0.0)
  hessian_vector = jax.jvp(jax.grad(lambda s: jnp.mean(loss_fn(s))), (student,), (student,))[1]
  assert np.all(np.isfinite(hessian_vector))


def test_teacher_gets_no_gradient():
  student, teacher, mask = make_inputs()
  for sigma2 in (None, 2.0):
    grad = jax.grad(mean_loss, argnums=1)(student, teacher, k=3, sigma2=sigma2, where=mask)
    np.testing.assert_array_equal(grad, 0.0)


# --- blockwise kNN: the same graph, loss and gradients at O(n * block) memory ---------------

jitted_graph = jax.jit(knn_graph, static_argnames=('k', 'block_size'))
jitted_blockwise_loss = jax.jit(locality_preserving_loss, static_argnames=('k', 'block_size'))
jitted_loss_grad = jax.jit(jax.value_and_grad(mean_loss), static_argnames=('k', 'block_size'))
# N = 10 rows: blocks of 3 and 4 leave a padded last block; 1 and N - 1 are the extremes.
BLOCK_SIZES = [1, 3, 4, N - 1]


def blockwise_inputs(case):
  """Gaussian features, or integer teacher features whose distances tie exactly."""
  student, teacher, mask = make_inputs(seed=11)
  if 'ties' in case:
    teacher = np.random.default_rng(11).integers(0, 3, size=(N, 2)).astype(np.float32)
  return student, teacher, (mask if 'mask' in case else None)


@pytest.mark.parametrize('block_size', BLOCK_SIZES)
@pytest.mark.parametrize('case', ['gaussian', 'ties', 'mask', 'ties_mask'])
def test_blockwise_knn_graph_matches_direct(block_size, case):
  _, teacher, where = blockwise_inputs(case)
  indices, sq_dist = jitted_graph(teacher, k=4, where=where, block_size=block_size)
  direct_indices, direct_sq_dist = jitted_graph(teacher, k=4, where=where, block_size=0)
  np.testing.assert_array_equal(indices, direct_indices)
  np.testing.assert_allclose(sq_dist, direct_sq_dist, rtol=1e-6)  # inf slots must match too.
  valid = np.isfinite(np.asarray(sq_dist))
  _, neighbours = reference_graph(teacher, 4, where)
  for i in range(N):
    assert np.asarray(indices)[i][valid[i]].tolist() == neighbours[i]


@pytest.mark.parametrize('block_size', BLOCK_SIZES)
@pytest.mark.parametrize('case', ['default_sigma2', 'given_sigma2', 'mask', 'ties_mask'])
def test_blockwise_loss_and_gradient_match_direct(block_size, case):
  student, teacher, where = blockwise_inputs(case)
  sigma2 = 3.0 if case == 'given_sigma2' else None
  kwargs = dict(k=3, sigma2=sigma2, where=where)
  loss = jitted_blockwise_loss(student, teacher, block_size=block_size, **kwargs)
  direct = jitted_blockwise_loss(student, teacher, block_size=0, **kwargs)
  np.testing.assert_allclose(loss, direct, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(loss, reference_loss(student, teacher, 3, sigma2, where), rtol=1e-5)
  _, grad = jitted_loss_grad(student, teacher, block_size=block_size, **kwargs)
  _, direct_grad = jitted_loss_grad(student, teacher, block_size=0, **kwargs)
  np.testing.assert_allclose(grad, direct_grad, rtol=1e-6, atol=1e-7)
  expected_grad = reference_mean_loss_grad(student, teacher, 3, sigma2, where)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)


def distance_matrix_shapes(n, block_size):
  """The float32 [rows, n] shapes in the loss's jaxpr, traced on abstract inputs (no compute)."""
  fn = lambda s, t: locality_preserving_loss(s, t, k=5, block_size=block_size)
  spec = lambda d: jax.ShapeDtypeStruct((n, d), jnp.float32)
  text = str(jax.make_jaxpr(fn)(spec(4), spec(3)))
  return {rows for rows in (n, lpe.losses.locality.KNN_BLOCK_SIZE) if f'f32[{rows},{n}]' in text}


def test_automatic_block_size_switches_to_blockwise_above_the_threshold():
  threshold = lpe.losses.locality.KNN_DIRECT_MAX_ROWS
  block = lpe.losses.locality.KNN_BLOCK_SIZE
  assert distance_matrix_shapes(threshold, None) == {threshold}  # Direct: one [n, n] matrix.
  assert distance_matrix_shapes(threshold + 1, None) == {block}  # Blockwise: [block, n] only.
  assert distance_matrix_shapes(threshold + 1, 0) == {threshold + 1}  # 0 forces direct.
  assert distance_matrix_shapes(threshold, block) == {block}  # A block size forces blockwise.


@pytest.mark.parametrize('block_size', [-1, 2.0, True])
def test_bad_block_size_raises(block_size):
  student, teacher, _ = make_inputs()
  with pytest.raises(ValueError, match='block_size must be None'):
    locality_preserving_loss(student, teacher, k=3, block_size=block_size)


# --- errors, docs, tracing -------------------------------------------------------------------

BAD_INPUTS = [
  ('student_rank', dict(student=np.zeros(N)), 'student_features must be a 2-D'),
  ('teacher_rank', dict(teacher=np.zeros((N, 2, 3))), 'teacher_features must be a 2-D'),
  ('batch_sizes', dict(teacher=np.zeros((N + 1, 6))), 'same examples.*batch sizes 10 and 11'),
  ('k_float', dict(k=2.0), 'k must be a Python int'),
  ('k_zero', dict(k=0), r'k must be >= 1'),
  ('k_batch', dict(k=N), r'smaller than the \(global\) batch size 10'),
  ('sigma2_zero', dict(sigma2=0.0), 'sigma2 must be > 0'),
  ('sigma2_negative', dict(sigma2=-1), 'sigma2 must be > 0'),
  ('where_shape', dict(where=np.ones((N, 1), bool)), r'where must be a boolean array of shape'),
]


@pytest.mark.parametrize('under_jit', [False, True], ids=['eager', 'jit'])
@pytest.mark.parametrize('bad, match', [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises(bad, match, under_jit):
  student, teacher, _ = make_inputs()
  bad = dict(bad)
  student, teacher = bad.pop('student', student), bad.pop('teacher', teacher)
  hyper = {'k': 3, **{name: bad[name] for name in ('k', 'sigma2') if name in bad}}
  where = bad.get('where')
  # Hyper-parameters are closed over, as a train step would; arrays are traced under jit.
  fn = lambda s, t, w: locality_preserving_loss(s, t, where=w, **hyper)
  with pytest.raises(ValueError, match=match):
    (jax.jit(fn) if under_jit else fn)(student, teacher, where)


def test_knn_graph_rejects_large_k():
  with pytest.raises(ValueError, match='smaller than the'):
    knn_graph(np.zeros((4, 2)), k=4)


def test_docstring_examples_run():
  result = doctest.testmod(lpe.losses.locality)
  assert result.failed == 0 and result.attempted > 0


def test_jit_does_not_retrace_for_same_shapes():
  student, teacher, mask = make_inputs()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def loss_fn(s, t, w):
    return locality_preserving_loss(s, t, k=3, where=w)

  loss_fn(student, teacher, mask)
  loss_fn(student + 1.0, 2.0 * teacher, ~mask)
  with pytest.raises(AssertionError):
    loss_fn(student[:8], teacher[:8], mask[:8])  # A new shape must retrace.


def test_sigma2_scale_multiplies_the_default_and_the_given_bandwidth():
  rng = np.random.default_rng(3)
  s, t = rng.normal(size=(12, 3)), rng.normal(size=(12, 5))
  indices, sq_dist = knn_graph(t, k=3)
  mean = float(np.mean(sq_dist))
  scaled = locality_preserving_loss(s, t, k=3, sigma2_scale=2.5)
  np.testing.assert_allclose(
    scaled, locality_preserving_loss(s, t, k=3, sigma2=2.5 * mean), rtol=1e-5
  )
  np.testing.assert_allclose(
    locality_preserving_loss(s, t, k=3, sigma2=0.5, sigma2_scale=4.0),
    locality_preserving_loss(s, t, k=3, sigma2=2.0),
    rtol=1e-6,
  )
  assert not np.allclose(scaled, locality_preserving_loss(s, t, k=3))
  with pytest.raises(ValueError, match='sigma2_scale must be a Python number > 0'):
    locality_preserving_loss(s, t, k=3, sigma2_scale=0.0)


# --- student_scale: the scale-invariant forms ----------------------------------------------


def reference_scaled_loss(student, teacher, k, student_scale, sigma2=None, where=None):
  """`l_i` of the form `student_scale`, straight from its definition (float64 loops)."""
  s = np.asarray(student, np.float64)
  n = len(s)
  valid = np.ones(n, bool) if where is None else np.asarray(where, bool)
  if student_scale == 'l2':
    norms = np.sqrt(np.sum(s * s, axis=1, keepdims=True))
    s = np.where(norms > 0, s / np.where(norms > 0, norms, 1.0), 0.0)
  loss = reference_loss(s, teacher, k, sigma2, where)
  if student_scale == 'mean':
    rows = [i for i in range(n) if valid[i]]
    pairs = [np.sum((s[i] - s[j]) ** 2) for i in rows for j in rows if i != j]
    loss = loss / np.mean(pairs)
  return loss


@pytest.mark.parametrize('student_scale', ['l2', 'mean'])
@pytest.mark.parametrize('case', ['default_sigma2', 'given_sigma2', 'mask'])
def test_scaled_loss_matches_reference(student_scale, case):
  student, teacher, mask = make_inputs(seed=11)
  sigma2 = 3.0 if case == 'given_sigma2' else None
  where = mask if case == 'mask' else None
  loss = jax.jit(locality_preserving_loss, static_argnames=('k', 'student_scale'))(
    student, teacher, k=3, sigma2=sigma2, where=where, student_scale=student_scale
  )
  expected = reference_scaled_loss(student, teacher, 3, student_scale, sigma2, where)
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-7)
  assert not np.allclose(loss, reference_loss(student, teacher, 3, sigma2, where))
  if where is not None:
    np.testing.assert_array_equal(np.asarray(loss)[~mask], 0.0)


@pytest.mark.parametrize('student_scale', ['l2', 'mean'])
@pytest.mark.parametrize('factor', [1e-6, 0.37, 3.0, 1e6, 1e25])
def test_scaled_forms_are_invariant_to_the_student_scale(student_scale, factor):
  student, teacher, mask = make_inputs(seed=12)
  loss = lambda s: locality_preserving_loss(
    s, teacher, k=3, where=mask, student_scale=student_scale
  )
  np.testing.assert_allclose(loss(student * np.float32(factor)), loss(student), rtol=2e-5)
  # The paper's form is not: shrinking the student lowers it.
  plain = lambda s: locality_preserving_loss(s, teacher, k=3, where=mask).mean()
  assert plain(student * np.float32(0.37)) < plain(student)


@pytest.mark.parametrize('student_scale', ['l2', 'mean'])
def test_scaled_forms_check_grads_and_stay_finite_at_coincident_points(student_scale):
  student, teacher, mask = make_inputs(seed=13)
  loss_fn = lambda s: locality_preserving_loss(
    s, teacher, k=3, where=mask, student_scale=student_scale
  )
  jax.test_util.check_grads(loss_fn, (student,), order=1, modes=('fwd', 'rev'), eps=1e-3)
  for coincident in (np.zeros_like(student), np.ones_like(student)):
    value = loss_fn(coincident)
    grad = jax.grad(lambda s: jnp.mean(loss_fn(s)))(coincident)
    np.testing.assert_array_equal(value, 0.0)
    assert np.all(np.isfinite(grad))


def _mean_scaled_loss(student, *, teacher, student_scale):
  return jnp.mean(locality_preserving_loss(student, teacher, k=3, student_scale=student_scale))


def test_mean_scale_gradient_pushes_the_batch_apart():
  """'mean' cannot be lowered by shrinking: its gradient has no component along the student
  (d loss(c s) / dc = 0 at c = 1), unlike the paper's form, whose gradient points outward."""
  student, teacher, _ = make_inputs(seed=14)
  for student_scale, expect_zero in (('mean', True), ('l2', True), ('none', False)):
    mean = functools.partial(_mean_scaled_loss, teacher=teacher, student_scale=student_scale)
    grad = jax.grad(mean)(student)
    radial = float(np.sum(grad * student))
    if expect_zero:
      assert abs(radial) < 1e-5 * float(np.sum(np.abs(grad * student))), student_scale
    else:
      assert radial > 0


def test_bad_student_scale_raises():
  student, teacher, _ = make_inputs()
  with pytest.raises(ValueError, match="student_scale must be one of 'none', 'l2', 'mean'"):
    locality_preserving_loss(student, teacher, k=3, student_scale='L2')
