"""Bad input never hides behind a finite loss.

Non-finite features give non-finite losses (so the trainer's non-finite guard stops the run), a bad
`sigma2` raises when concrete and gives NaN when traced, and `knn_graph` never lists a row as its
own neighbour, whatever the values. Values at extreme but finite magnitudes are checked against the
NumPy references in test_locality_loss.py and test_baseline_losses.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpe import diagnostics
from lpe.losses import (
  attention_transfer_loss,
  fitnet_loss,
  kd_loss,
  knn_graph,
  locality_preserving_loss,
  pkt_loss,
  rkd_loss,
  similarity_preserving_loss,
)

N = 8
NONFINITE = [np.nan, np.inf, -np.inf]

lp = jax.jit(locality_preserving_loss, static_argnames=('k', 'block_size'))
graph = jax.jit(knn_graph, static_argnames=('k', 'block_size'))


def _inputs(seed=0, n=N):
  rng = np.random.default_rng(seed)
  student = rng.normal(size=(n, 4)).astype(np.float32)
  teacher = rng.normal(size=(n, 6)).astype(np.float32)
  mask = np.arange(n) % 3 != 2  # Rows 2 and 5 are masked.
  return student, teacher, mask


# --- locality_preserving_loss: non-finite features -------------------------------------------


@pytest.mark.parametrize('block_size', [0, 3])
@pytest.mark.parametrize('sigma2', [None, 2.0])
@pytest.mark.parametrize('bad', NONFINITE)
def test_nonfinite_teacher_row_makes_every_row_nan(bad, sigma2, block_size):
  """Its distance to every row is undefined, so every row's graph (and the default sigma2) is."""
  student, teacher, _ = _inputs()
  teacher[3, 1] = bad
  loss = lp(student, teacher, k=3, sigma2=sigma2, block_size=block_size)
  assert np.isnan(loss).all(), loss
  assert np.isnan(lp(student, np.full_like(teacher, bad), k=3, sigma2=sigma2)).all()


@pytest.mark.parametrize('bad', NONFINITE)
def test_nonfinite_student_row_reaches_itself_and_the_rows_that_have_it_as_neighbour(bad):
  student, teacher, _ = _inputs(seed=1)
  clean = np.asarray(lp(student, teacher, k=2))
  student[3, 0] = bad
  loss = np.asarray(lp(student, teacher, k=2))
  indices, _ = knn_graph(teacher, k=2)
  touched = (np.arange(N) == 3) | (np.asarray(indices) == 3).any(axis=1)
  assert 0 < touched.sum() < N
  assert not np.isfinite(loss[touched]).any(), loss
  # Rows whose neighbourhood does not hold row 3 are well defined and unchanged.
  np.testing.assert_array_equal(loss[~touched], clean[~touched])


@pytest.mark.parametrize('side', ['student', 'teacher'])
def test_nonfinite_row_without_neighbours_is_nan(side):
  """The only valid row has no neighbour (no term to carry the NaN): it is NaN all the same."""
  student, teacher, _ = _inputs()
  (student if side == 'student' else teacher)[0, 0] = np.nan
  where = np.arange(N) == 0
  loss = np.asarray(lp(student, teacher, k=3, where=where))
  assert np.isnan(loss[0]) and (loss[1:] == 0.0).all(), loss


def test_masked_rows_may_hold_nonfinite_features():
  """Masked rows take no part: padding with garbage in it changes nothing, values or gradients."""
  student, teacher, mask = _inputs(seed=2)
  bad_student, bad_teacher = student.copy(), teacher.copy()
  bad_student[~mask] = np.nan
  bad_teacher[~mask] = np.inf
  value_and_grad = jax.jit(
    jax.value_and_grad(lambda s, t: jnp.mean(locality_preserving_loss(s, t, k=3, where=mask)))
  )
  for block_size in (0, 3):
    loss = lp(bad_student, bad_teacher, k=3, where=mask, block_size=block_size)
    np.testing.assert_array_equal(loss, lp(student, teacher, k=3, where=mask))
  value, grad = value_and_grad(bad_student, bad_teacher)
  clean_value, clean_grad = value_and_grad(student, teacher)
  np.testing.assert_array_equal(value, clean_value)
  np.testing.assert_array_equal(grad, clean_grad)


# --- locality_preserving_loss: sigma2 ---------------------------------------------------------

BAD_SIGMA2 = [
  np.nan,
  np.inf,
  -np.inf,
  0.0,
  -1.0,
  1e39,  # Beyond float32's range: it would be inf.
  np.float32(np.nan),
  np.float64(np.inf),
  np.float32(-2.0),
  np.float32(0.0),
]


@pytest.mark.parametrize('under_jit', [False, True], ids=['eager', 'jit'])
@pytest.mark.parametrize('sigma2', BAD_SIGMA2, ids=repr)
def test_bad_concrete_sigma2_raises(sigma2, under_jit):
  student, teacher, _ = _inputs()
  fn = lambda s, t: locality_preserving_loss(s, t, k=3, sigma2=sigma2)  # Closed over: concrete.
  with pytest.raises(ValueError, match='sigma2 must be > 0'):
    (jax.jit(fn) if under_jit else fn)(student, teacher)


@pytest.mark.parametrize('sigma2', [np.nan, np.inf, 0.0, -1.0, -1e-30])
def test_bad_traced_sigma2_gives_nan(sigma2):
  student, teacher, mask = _inputs()
  fn = jax.jit(lambda s, t, sigma2: locality_preserving_loss(s, t, k=3, sigma2=sigma2, where=mask))
  loss = np.asarray(fn(student, teacher, sigma2))
  assert np.isnan(loss[mask]).all(), loss
  np.testing.assert_array_equal(loss[~mask], 0.0)
  # A good traced value is the concrete one.
  concrete = locality_preserving_loss(student, teacher, k=3, sigma2=2.0, where=mask)
  np.testing.assert_allclose(fn(student, teacher, 2.0), concrete, rtol=1e-6)


def test_sigma2_must_be_a_scalar():
  student, teacher, _ = _inputs()
  with pytest.raises(ValueError, match='sigma2 must be a scalar'):
    locality_preserving_loss(student, teacher, k=3, sigma2=np.ones(2))


# --- knn_graph: never a row's own neighbour ---------------------------------------------------


@pytest.mark.parametrize('block_size', [0, 1, 3])
@pytest.mark.parametrize('masked', [False, True])
@pytest.mark.parametrize('fill', [np.nan, np.inf, 1e19, 3e38, 0.0])
def test_knn_graph_never_lists_a_row_as_its_own_neighbour(fill, masked, block_size):
  _, teacher, mask = _inputs(seed=3)
  if fill in (1e19, 3e38):  # Huge: the distances overflow float32.
    teacher = np.clip(fill * teacher.astype(np.float64), -3e38, 3e38).astype(np.float32)
  teacher[[1, 4]] = fill  # Non-finite, huge or tied rows.
  where = mask if masked else None
  k = 4 if masked else N - 1  # Masked: 5 valid rows, so valid rows have 4 neighbours, no more.
  indices, sq_dist = graph(teacher, k=k, where=where, block_size=block_size)
  indices, sq_dist = np.asarray(indices), np.asarray(sq_dist)
  assert not (indices == np.arange(N)[:, None]).any(), indices
  assert ((0 <= indices) & (indices < N)).all()
  filled = sq_dist != np.inf
  if masked:
    assert not filled[~mask].any() and filled[mask].all()
    assert mask[indices[filled]].all()
  else:
    assert filled.all()
  if np.isfinite(fill):
    assert np.isfinite(sq_dist[filled]).all()
  else:
    assert np.isnan(sq_dist[filled]).all()  # The graph is undefined: no slot claims a distance.


# --- baselines: non-finite input --------------------------------------------------------------


@pytest.mark.parametrize('side', ['student', 'teacher'])
@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_kd_nan_or_positive_infinite_logit_makes_its_row_nan(bad, side):
  student, teacher, _ = _inputs()
  clean = np.asarray(kd_loss(student, teacher[:, :4], temperature=4.0))
  logits = {'student': student, 'teacher': teacher[:, :4].copy()}
  logits[side][2, 1] = bad
  loss = np.asarray(jax.jit(kd_loss)(logits['student'], logits['teacher'], temperature=4.0))
  assert np.isnan(loss[2]), loss
  np.testing.assert_array_equal(np.delete(loss, 2), np.delete(clean, 2))


def test_kd_negative_infinite_logit_is_a_zero_probability():
  """-inf is the usual way to mask a class: exactly the limit, p = 0 (and q = 0 costs nothing)."""
  student, teacher, _ = _inputs()
  teacher, student = teacher[:, :4].copy(), student.copy()
  teacher[:, 0] = -np.inf
  loss = jax.jit(kd_loss)(student, teacher, temperature=2.0)
  # The limit: p puts no mass on class 0, so its term vanishes; q still normalises over it.
  log_q = jax.nn.log_softmax(student / 2.0)
  log_p = jax.nn.log_softmax(teacher[:, 1:] / 2.0)
  want = 4.0 * np.sum(np.exp(log_p) * (log_p - log_q[:, 1:]), axis=1)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  student[:, 0] = -np.inf  # q = 0 where p = 0 too: finite, the KL over classes 1 to 3.
  np.testing.assert_allclose(
    jax.jit(kd_loss)(student, teacher, temperature=2.0),
    4.0 * np.sum(np.exp(log_p) * (log_p - jax.nn.log_softmax(student[:, 1:] / 2.0)), axis=1),
    rtol=1e-5,
  )
  student[:, 0], student[:, 1] = 0.0, -np.inf  # q = 0 where p > 0: KL is infinite.
  assert np.isposinf(kd_loss(student, teacher, temperature=2.0)).all()


@pytest.mark.parametrize('bad', NONFINITE)
def test_per_example_baselines_make_the_bad_row_nonfinite(bad):
  rng = np.random.default_rng(4)
  s, t = rng.normal(size=(2, 4, 3, 3, 2)).astype(np.float32)
  for side in (0, 1):
    args = [s.copy(), t.copy()]
    args[side][1, 0, 2, 1] = bad
    for fn in (fitnet_loss, attention_transfer_loss):
      loss = np.asarray(jax.jit(fn)(*args))
      assert not np.isfinite(loss[1]) and np.isfinite(np.delete(loss, 1)).all(), (fn, loss)


@pytest.mark.parametrize('loss', [similarity_preserving_loss, rkd_loss, pkt_loss])
@pytest.mark.parametrize('bad', NONFINITE)
def test_relational_baselines_are_nan_for_nonfinite_features(bad, loss):
  student, teacher, _ = _inputs()
  for side in (0, 1):
    args = [student.copy(), teacher.copy()]
    args[side][5, 1] = bad
    assert np.isnan(jax.jit(loss)(*args)), (loss, side)


# --- diagnostics -----------------------------------------------------------------------------


@pytest.mark.parametrize('side', ['student', 'teacher'])
def test_neighbourhood_preservation_is_nan_for_nonfinite_features(side):
  student, teacher, mask = _inputs()
  bad = {'student': student, 'teacher': teacher}
  bad[side][0, 0] = np.nan
  got = np.asarray(diagnostics.neighbourhood_preservation(student, teacher, k=2, where=mask))
  assert np.isnan(got[mask]).all() and (got[~mask] == 0.0).all(), got
  bad[side][0, 0] = 0.0
  bad[side][~mask] = np.nan  # Masked rows are ignored.
  got = np.asarray(diagnostics.neighbourhood_preservation(student, teacher, k=2, where=mask))
  assert np.isfinite(got).all()
