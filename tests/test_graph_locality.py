"""Tests of lpe.losses.graph and lpe.sampling against plain NumPy loops written from the maths."""

import doctest

import chex
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

import lpe.losses.graph
import lpe.sampling
from lpe import data, losses
from lpe.losses import (
  graph_batch_locality_loss,
  knn_graph,
  memory_bank_locality_loss,
  teacher_graph,
  update_memory_bank,
)
from lpe.sampling import neighbour_aware_index_batches

# --- teacher_graph ---------------------------------------------------------------------------


def reference_knn(features, k):
  """float64 brute force: the k nearest j != i, ties to the lower index (a stable sort)."""
  t = np.asarray(features, np.float64)
  n = len(t)
  dist = np.array([[np.sum((t[i] - t[j]) ** 2) for j in range(n)] for i in range(n)])
  indices = np.zeros((n, k), np.int64)
  for i in range(n):
    others = [j for j in range(n) if j != i]
    order = np.argsort(dist[i, others], kind='stable')[:k]
    indices[i] = [others[o] for o in order]
  return indices, np.take_along_axis(dist, indices, axis=1)


# (n, d, k, block_size): blocks that leave a padded last block, through both candidate paths of
# `_smallest` (plain top_k for narrow tiles, chunk minima for tiles of >= 32 k columns), one block
# larger than n, and blocks smaller than k.
GRAPH_CASES = [(37, 6, 4, 8), (300, 5, 3, 128), (50, 3, 5, 1000), (23, 4, 6, 2)]


@pytest.mark.parametrize('n, d, k, block_size', GRAPH_CASES)
def test_teacher_graph_matches_brute_force(n, d, k, block_size):
  features = np.random.default_rng(n).normal(size=(n, d)).astype(np.float32)
  graph = teacher_graph(features, k=k, block_size=block_size)
  indices, dist = reference_knn(features, k)
  assert graph.indices.dtype == np.int32 and graph.indices.shape == (n, k)
  assert graph.weights.dtype == np.float32 and graph.weights.shape == (n, k)
  np.testing.assert_array_equal(graph.indices, indices)
  assert graph.sigma2 == pytest.approx(np.mean(dist), rel=1e-5)
  np.testing.assert_allclose(graph.weights, np.exp(-dist / np.mean(dist)), rtol=1e-5)


@pytest.mark.parametrize('k, block_size', [(2, 64), (2, 16), (6, 64), (6, 5)])
def test_teacher_graph_exact_ties_go_to_lower_index(k, block_size):
  # Integer points on a 3 x 3 grid: many exact ties and exact duplicates (distance 0). Their
  # float32 distances are exact, so the tie rule alone decides the order.
  features = np.random.default_rng(k).integers(0, 3, size=(70, 2)).astype(np.float32)
  graph = teacher_graph(features, k=k, block_size=block_size)
  indices, dist = reference_knn(features, k)
  np.testing.assert_array_equal(graph.indices, indices)
  np.testing.assert_array_equal(graph.weights, np.exp(-dist / graph.sigma2).astype(np.float32))


def test_teacher_graph_matches_knn_graph():
  features = np.random.default_rng(1).normal(size=(200, 8)).astype(np.float32)
  indices, sq_dist = knn_graph(features, k=5)
  graph = teacher_graph(features, k=5, block_size=64)
  np.testing.assert_array_equal(graph.indices, indices)
  assert graph.sigma2 == pytest.approx(float(jnp.mean(sq_dist)), rel=1e-5)


def test_teacher_graph_given_sigma2_and_identical_features():
  features = np.random.default_rng(2).normal(size=(20, 3))
  graph = teacher_graph(features, k=3, sigma2=2.5)
  _, dist = reference_knn(features, 3)
  assert graph.sigma2 == 2.5
  np.testing.assert_allclose(graph.weights, np.exp(-dist / 2.5), rtol=1e-5)
  # Every distance 0: the default sigma2 falls back to 1, weights exp(0) = 1, lower indices first.
  graph = teacher_graph(np.zeros((6, 2)), k=2)
  assert graph.sigma2 == 1.0
  np.testing.assert_array_equal(graph.weights, 1.0)
  assert graph.indices.tolist() == [[1, 2], [0, 2], [0, 1], [0, 1], [0, 1], [0, 1]]


GRAPH_ERRORS = [
  (dict(k=10), 'k must be a Python int with 1 <= k < N = 10'),
  (dict(k=0), 'k must be a Python int with 1 <= k'),
  (dict(k=2.0), 'k must be a Python int'),
  (dict(sigma2=0.0), 'sigma2 must be > 0'),
  (dict(block_size=0), 'block_size must be a positive Python int'),
  (dict(features=np.zeros(10)), 'features must be a 2-D'),
  (dict(features=np.full((10, 2), np.nan)), 'features contain NaN or inf'),
]


@pytest.mark.parametrize('bad, match', GRAPH_ERRORS)
def test_teacher_graph_bad_input_raises(bad, match):
  kwargs = {'features': np.zeros((10, 2)), 'k': 3, **bad}
  with pytest.raises(ValueError, match=match):
    teacher_graph(**kwargs)


# --- graph_batch_locality_loss ---------------------------------------------------------------


def reference_batch_terms(ids, nbrs, weights, where=None):
  """Yields (r, q, a_rg, |P(r)|): row r's present neighbour g held first by row q."""
  n = len(ids)
  valid = np.ones(n, bool) if where is None else np.asarray(where)
  for r in range(n):
    if not valid[r]:
      continue
    terms, seen = [], set()
    for g, a in zip(nbrs[r], weights[r], strict=True):
      holders = [q for q in range(n) if ids[q] == g and valid[q]]
      if g < 0 or g == ids[r] or g in seen or not holders:
        continue
      seen.add(g)
      terms.append((holders[0], a))
    for q, a in terms:
      yield r, q, a, len(terms)


def reference_batch_loss(student, ids, nbrs, weights, where=None):
  s = np.asarray(student, np.float64)
  loss = np.zeros(len(s))
  for r, q, a, count in reference_batch_terms(ids, nbrs, weights, where):
    loss[r] += a * np.sum((s[r] - s[q]) ** 2) / count
  return loss


def reference_batch_mean_grad(student, ids, nbrs, weights, where=None):
  """Analytic gradient of mean_r l_r w.r.t. the student rows."""
  s = np.asarray(student, np.float64)
  grad = np.zeros_like(s)
  for r, q, a, count in reference_batch_terms(ids, nbrs, weights, where):
    g = 2.0 * a * (s[r] - s[q]) / count / len(s)
    grad[r] += g
    grad[q] -= g
  return grad


def make_batch(seed=0, n=14, num_examples=16, k=3, d=4):
  """A batch with repeated ids, rows without neighbours in the batch, and odd graph rows."""
  rng = np.random.default_rng(seed)
  graph = np.stack(
    [
      rng.choice(np.delete(np.arange(num_examples), i), k, replace=False)
      for i in range(num_examples)
    ]
  )
  graph_weights = rng.uniform(0.1, 1.0, size=(num_examples, k)).astype(np.float32)
  ids = rng.integers(0, 10, size=n)  # 14 rows from 10 ids: some repeat; 10..15 never appear.
  ids[:3] = [3, 7, 3]
  graph[3] = [10, 11, 12]  # Rows of example 3 have no neighbour in the batch.
  graph[7] = [ids[5], ids[5], -1]  # A repeated slot (counted once) and an empty slot.
  student = rng.normal(size=(n, d)).astype(np.float32)
  where = rng.random(n) > 0.3
  where[[1, 3]] = [True, False]
  return student, ids.astype(np.int32), graph[ids], graph_weights[ids], where


jitted_batch_loss = jax.jit(graph_batch_locality_loss)


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('use_mask', [False, True])
def test_graph_batch_loss_matches_reference(seed, use_mask):
  student, ids, nbrs, weights, mask = make_batch(seed)
  where = mask if use_mask else None
  loss = jitted_batch_loss(student, ids, nbrs, weights, where=where)
  assert loss.shape == (len(ids),) and loss.dtype == jnp.float32
  expected = reference_batch_loss(student, ids, nbrs, weights, where)
  assert np.sum(expected > 0) > 3  # The case is not trivial...
  np.testing.assert_array_equal(np.asarray(loss)[[0, 2]], 0.0)  # ...and example 3 has no edges.
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
  if use_mask:
    np.testing.assert_array_equal(np.asarray(loss)[~mask], 0.0)


def test_graph_batch_loss_uses_first_row_of_a_repeated_id():
  s = jnp.array([[0.0], [1.0], [5.0]])
  ids = jnp.array([0, 1, 1])  # Example 1 twice: row 1 counts, row 2 does not.
  nbrs = jnp.array([[1, 2], [0, 2], [0, 2]])
  weights = jnp.ones((3, 2))
  # Row 0 sees example 1 at its first row (1), not at row 2; rows 1 and 2 see example 0.
  assert jitted_batch_loss(s, ids, nbrs, weights).tolist() == [1.0, 1.0, 25.0]
  where = jnp.array([True, False, True])  # Masking row 1 makes row 2 the first holder.
  assert jitted_batch_loss(s, ids, nbrs, weights, where=where).tolist() == [25.0, 0, 25.0]


@pytest.mark.parametrize('use_mask', [False, True])
def test_graph_batch_gradient_matches_analytic_reference(use_mask):
  student, ids, nbrs, weights, mask = make_batch(seed=4)
  where = mask if use_mask else None
  mean = jax.jit(lambda s: jnp.mean(jitted_batch_loss(s, ids, nbrs, weights, where=where)))
  grad = jax.jit(jax.grad(mean))(student)
  expected = reference_batch_mean_grad(student, ids, nbrs, weights, where)
  assert np.any(expected != 0)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
  # Finite differences too; the loss is quadratic in the student, so eps=1e-2 adds no
  # truncation error and keeps float32 rounding small.
  jax.test_util.check_grads(mean, (student,), order=1, modes=('rev',), eps=1e-2)


def test_graph_batch_weights_get_no_gradient_and_coincident_points_are_finite():
  student, ids, nbrs, weights, _ = make_batch(seed=5)
  fn = lambda s, w: jnp.mean(jitted_batch_loss(s, ids, nbrs, w))
  np.testing.assert_array_equal(jax.grad(fn, argnums=1)(student, weights), 0.0)
  grad = jax.grad(fn)(np.ones_like(student), weights)
  np.testing.assert_array_equal(grad, 0.0)


def test_graph_batch_loss_bad_shapes_raise():
  student, ids, nbrs, weights, _ = make_batch()
  with pytest.raises(ValueError, match=r'graph_weights must have shape \(14, 3\)'):
    graph_batch_locality_loss(student, ids, nbrs, weights[:, :2])
  with pytest.raises(ValueError, match=r'example_ids must have shape \(14,\)'):
    graph_batch_locality_loss(student, ids[:4], nbrs, weights)
  with pytest.raises(ValueError, match='where must be a boolean array'):
    graph_batch_locality_loss(student, ids, nbrs, weights, where=np.ones(3, bool))


# --- memory bank -----------------------------------------------------------------------------


def make_bank_inputs(seed=0, num_examples=12, n=5, k=3, d=4):
  rng = np.random.default_rng(seed)
  bank = rng.normal(size=(num_examples, d)).astype(np.float32)
  graph = rng.integers(0, num_examples, size=(num_examples, k))
  graph_weights = rng.uniform(0.1, 1.0, size=(num_examples, k)).astype(np.float32)
  ids = rng.choice(num_examples, n, replace=False)
  student = rng.normal(size=(n, d)).astype(np.float32)
  return student, bank, ids.astype(np.int32), graph[ids], graph_weights[ids]


def test_memory_bank_loss_and_gradient_match_reference():
  student, bank, _, nbrs, weights = make_bank_inputs()
  s, m = np.asarray(student, np.float64), np.asarray(bank, np.float64)
  n, k = nbrs.shape
  expected, expected_grad = np.zeros(n), np.zeros_like(s)
  for i in range(n):
    for j, a in zip(nbrs[i], weights[i], strict=True):
      expected[i] += a * np.sum((s[i] - m[j]) ** 2) / k
      expected_grad[i] += 2.0 * a * (s[i] - m[j]) / k / n
  loss_fn = jax.jit(memory_bank_locality_loss)
  loss = loss_fn(student, bank[nbrs], weights)
  assert loss.shape == (n,) and loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  mean = lambda s, mb, w: jnp.mean(memory_bank_locality_loss(s, mb, w))
  grads = jax.grad(mean, argnums=(0, 1, 2))(student, bank[nbrs], weights)
  np.testing.assert_allclose(grads[0], expected_grad, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(grads[1], 0.0)  # stop_gradient on the bank...
  np.testing.assert_array_equal(grads[2], 0.0)  # ...and on the weights.


def test_memory_bank_loss_bad_shapes_raise():
  student, bank, _, nbrs, weights = make_bank_inputs()
  with pytest.raises(ValueError, match=r'bank_neighbours must have shape \(5, 3, 4\)'):
    memory_bank_locality_loss(student, bank[nbrs][:, :2], weights)


def reference_update(bank, ids, features, momentum):
  bank = np.array(bank, np.float64)
  done = set()
  for e, f in zip(ids, features, strict=True):
    if e not in done:  # The first row of a repeated id wins.
      bank[e] = momentum * bank[e] + (1.0 - momentum) * f
      done.add(e)
  return bank


@pytest.mark.parametrize('momentum', [0.0, 0.9])
def test_update_memory_bank_matches_reference(momentum):
  student, bank, ids, _, _ = make_bank_inputs(seed=2)
  ids[3] = ids[1]  # A repeated id.
  updated = jax.jit(update_memory_bank)(bank, ids, student, momentum=momentum)
  assert updated.dtype == bank.dtype and updated.shape == bank.shape
  expected = reference_update(bank, ids, student, momentum)
  np.testing.assert_allclose(updated, expected, rtol=1e-5, atol=1e-7)
  untouched = np.setdiff1d(np.arange(len(bank)), ids)
  np.testing.assert_array_equal(np.asarray(updated)[untouched], bank[untouched])


def test_update_memory_bank_keeps_dtype_and_passes_no_gradient():
  student, bank, ids, _, _ = make_bank_inputs(seed=3)
  updated = update_memory_bank(jnp.asarray(bank, jnp.bfloat16), ids, student)
  assert updated.dtype == jnp.bfloat16
  expected = jnp.asarray(student, jnp.bfloat16)
  np.testing.assert_array_equal(
    np.asarray(updated[ids], np.float32), np.asarray(expected, np.float32)
  )
  grad = jax.grad(lambda f: jnp.sum(update_memory_bank(bank, ids, f, momentum=0.5)))(student)
  np.testing.assert_array_equal(grad, 0.0)
  with pytest.raises(ValueError, match=r'momentum must lie in \[0, 1\]'):
    update_memory_bank(bank, ids, student, momentum=1.5)
  with pytest.raises(ValueError, match='features must have the bank width 4'):
    update_memory_bank(bank, ids, student[:, :2])


# --- neighbour_aware_index_batches -----------------------------------------------------------

NUM_EXAMPLES, K = 101, 5


@pytest.fixture(scope='module')
def ring_graph():
  """Each example's neighbours: the K following ones on a ring (distinct, never itself)."""
  return (np.arange(NUM_EXAMPLES)[:, None] + np.arange(1, K + 1)) % NUM_EXAMPLES


def epoch_batches(graph, m, epoch=0, start_step=0, batch_size=12):
  kwargs = dict(batch_size=batch_size, neighbours_per_anchor=m, seed=3, epoch=epoch)
  return list(neighbour_aware_index_batches(NUM_EXAMPLES, graph, start_step=start_step, **kwargs))


@pytest.mark.parametrize('m', [1, 2, 3, 5])
def test_sampler_batches_hold_anchors_and_distinct_graph_neighbours(ring_graph, m):
  batches = epoch_batches(ring_graph, m)
  assert len(batches) == data.steps_per_epoch(NUM_EXAMPLES, 12)
  assert all(b.dtype == np.int32 and b.shape == (12,) for b in batches)
  groups = np.stack(batches).reshape(-1, 1 + m)  # Interleaved: [anchor, its m neighbours].
  anchors, neighbours = groups[:, 0], groups[:, 1:]
  # Anchors: the first steps * A entries of the epoch's permutation, hence distinct.
  order = data.epoch_permutation(NUM_EXAMPLES, seed=3, epoch=0)
  np.testing.assert_array_equal(anchors, order[: len(anchors)])
  for a, nbrs in zip(anchors, neighbours, strict=True):
    assert set(nbrs) <= set(ring_graph[a]) and len(set(nbrs)) == m
  if m < K:  # Every slot is drawn somewhere: the draw is not "the m nearest".
    offsets = (neighbours - anchors[:, None]) % NUM_EXAMPLES
    assert set(offsets.ravel()) == set(range(1, K + 1))


def test_sampler_is_deterministic_and_resumes_exactly(ring_graph):
  full = epoch_batches(ring_graph, 2)
  again = epoch_batches(ring_graph, 2)
  np.testing.assert_array_equal(np.stack(full), np.stack(again))
  for start in (1, 5, len(full) - 1):
    np.testing.assert_array_equal(
      np.stack(epoch_batches(ring_graph, 2, start_step=start)), np.stack(full[start:])
    )
  assert epoch_batches(ring_graph, 2, start_step=len(full)) == []
  assert not np.array_equal(np.stack(full), np.stack(epoch_batches(ring_graph, 2, epoch=1)))


def test_sampler_without_neighbours_equals_ordinary_batches(ring_graph):
  ordinary = data.train_index_batches(NUM_EXAMPLES, batch_size=12, seed=3, epoch=0)
  np.testing.assert_array_equal(np.stack(epoch_batches(ring_graph, 0)), np.stack(list(ordinary)))


SAMPLER_ERRORS = [
  (dict(batch_size=10, neighbours_per_anchor=2), r'batch_size 10 must be divisible by 1 \+ '),
  (dict(neighbours_per_anchor=6), r'neighbours_per_anchor must be a Python int in \[0, k=5\]'),
  (dict(graph_indices=np.zeros((100, K), int)), 'graph_indices must have shape'),
  (dict(graph_indices=np.full((NUM_EXAMPLES, K), NUM_EXAMPLES)), r'must lie in \[0, 101\)'),
  (dict(start_step=-1), 'start_step must be >= 0'),
  (dict(batch_size=102, neighbours_per_anchor=1), 'batch_size 102 is larger than'),
]


@pytest.mark.parametrize('bad, match', SAMPLER_ERRORS)
def test_sampler_bad_input_raises(ring_graph, bad, match):
  kwargs = dict(graph_indices=ring_graph, batch_size=12, neighbours_per_anchor=2, seed=0, epoch=0)
  kwargs.update(bad)
  with pytest.raises(ValueError, match=match):
    next(neighbour_aware_index_batches(NUM_EXAMPLES, **kwargs))


def test_sampler_batches_feed_the_graph_loss(ring_graph):
  """Every anchor of a sampled batch has its sampled neighbours as edges inside the batch."""
  batch = epoch_batches(ring_graph, 2)[0]
  student = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
  weights = np.ones((12, K), np.float32)
  loss = jitted_batch_loss(student, batch, ring_graph[batch], weights)
  np.testing.assert_allclose(
    loss, reference_batch_loss(student, batch, ring_graph[batch], weights), rtol=1e-5
  )
  assert np.all(np.asarray(loss)[::3] > 0)


# --- docs, tracing ---------------------------------------------------------------------------


@pytest.mark.parametrize('module', [lpe.losses.graph, lpe.sampling])
def test_docstring_examples_run(module):
  result = doctest.testmod(module)
  assert result.failed == 0 and result.attempted > 0


def test_jit_does_not_retrace_for_same_shapes():
  student, ids, nbrs, weights, mask = make_batch()
  _, bank, bank_ids, bank_nbrs, bank_weights = make_bank_inputs()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(s, ids, nbrs, weights, where, bank, bank_ids, bank_nbrs, bank_weights):
    batch = graph_batch_locality_loss(s, ids, nbrs, weights, where=where)
    memory = memory_bank_locality_loss(s[:5], bank[bank_nbrs], bank_weights)
    return batch, memory, update_memory_bank(bank, bank_ids, s[:5], momentum=0.5)

  args = (student, ids, nbrs, weights, mask, bank, bank_ids, bank_nbrs, bank_weights)
  first = step(*args)
  moved = step(student + 1.0, ids[::-1], nbrs[::-1], 2.0 * weights, ~mask, *args[5:])
  assert not np.array_equal(first[0], moved[0])


def test_teacher_graph_sigma2_scale_multiplies_the_bandwidth():
  features = np.random.default_rng(4).normal(size=(40, 6)).astype(np.float32)
  plain = teacher_graph(features, k=3)
  wide = teacher_graph(features, k=3, sigma2_scale=3.0)
  np.testing.assert_array_equal(plain.indices, wide.indices)
  assert wide.sigma2 == pytest.approx(3.0 * plain.sigma2)
  np.testing.assert_allclose(wide.weights, plain.weights ** (1 / 3.0), rtol=1e-5)


# --- student_scale of the graph losses --------------------------------------------------------


def _l2_rows(x):
  norms = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
  return np.where(norms > 0, x / np.where(norms > 0, norms, 1.0), 0.0)


@pytest.mark.parametrize('student_scale', ['l2', 'mean'])
def test_graph_batch_scaled_loss_matches_reference_and_ignores_the_scale(student_scale):
  student, ids, nbrs, weights, mask = make_batch(seed=6)
  s = np.asarray(student, np.float64)
  if student_scale == 'l2':
    expected = reference_batch_loss(_l2_rows(s), ids, nbrs, weights, mask)
  else:
    rows = np.flatnonzero(mask)
    mu = np.mean([np.sum((s[i] - s[j]) ** 2) for i in rows for j in rows if i != j])
    expected = reference_batch_loss(s, ids, nbrs, weights, mask) / mu
  loss_fn = jax.jit(graph_batch_locality_loss, static_argnames='student_scale')
  loss = loss_fn(student, ids, nbrs, weights, where=mask, student_scale=student_scale)
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-7)
  scaled = loss_fn(student * 1e4, ids, nbrs, weights, where=mask, student_scale=student_scale)
  np.testing.assert_allclose(scaled, loss, rtol=2e-5)
  mean = lambda x: jnp.mean(loss_fn(x, ids, nbrs, weights, where=mask, student_scale=student_scale))
  jax.test_util.check_grads(mean, (student,), order=1, modes=('rev',), eps=1e-3)


@pytest.mark.parametrize('student_scale', ['l2', 'mean'])
def test_memory_bank_scaled_loss_matches_reference_and_ignores_the_scale(student_scale):
  student, bank, _, nbrs, weights = make_bank_inputs(seed=3)
  s, m = np.asarray(student, np.float64), np.asarray(bank, np.float64)
  n, k = nbrs.shape
  if student_scale == 'l2':
    s, m = _l2_rows(s), _l2_rows(m)
  expected = np.array(
    [
      sum(a * np.sum((s[i] - m[j]) ** 2) for j, a in zip(nbrs[i], weights[i], strict=True)) / k
      for i in range(n)
    ]
  )
  if student_scale == 'mean':  # Every batch row against every bank row.
    expected /= np.mean([np.sum((s[i] - m[j]) ** 2) for i in range(n) for j in range(len(m))])

  def loss_fn(x, bank):
    moments = losses.memory_bank_moments(bank)
    return memory_bank_locality_loss(
      x, bank[nbrs], weights, student_scale=student_scale, bank_moments=moments
    )

  np.testing.assert_allclose(loss_fn(student, bank), expected, rtol=1e-5)
  # The student and the bank it filled scale together.
  np.testing.assert_allclose(
    loss_fn(student * 300.0, bank * 300.0), loss_fn(student, bank), rtol=2e-5
  )
  grad = jax.grad(lambda x: jnp.mean(loss_fn(x, bank)))(student)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)
  jax.test_util.check_grads(
    lambda x: jnp.mean(loss_fn(x, bank)), (student,), order=1, modes=('rev',), eps=1e-3
  )


def test_memory_bank_mean_scale_needs_the_moments():
  student, bank, _, nbrs, weights = make_bank_inputs()
  with pytest.raises(ValueError, match='needs bank_moments'):
    memory_bank_locality_loss(student, bank[nbrs], weights, student_scale='mean')
