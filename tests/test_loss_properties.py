"""Property-based tests of the distillation losses (hypothesis): random shapes, dtypes, masks and
hyper-parameters find no failure other than the documented ValueErrors, finite inputs give
finite losses and finite gradients, a NaN or inf anywhere gives a non-finite loss, and
`knn_graph` never lists a row as its own neighbour.

Inputs are finite with |x| <= 1e4 (float16's range is 6.5e4), and scaled up to about 1e34 in
float32 for the losses that are scale-invariant (the relational ones, attention, KD logits and
the LP teacher; FitNet's squared error and the LP student distances are not, and overflow).
Shapes come from small sets so that the jitted functions compile a bounded number of times.
`derandomize=True` makes every run try the same examples; `pytest --hypothesis-show-statistics`
reports how many ran.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lpe import losses

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
BATCHES = (2, 3, 8)
WIDTHS = (1, 4)
LIMIT = 1e4

SETTINGS = settings(
  max_examples=60,
  deadline=None,
  derandomize=True,
  database=None,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def arrays(draw, shape, dtype):
  """A finite array of `shape`: random values, all zeros, repeated rows, or tiny and huge ones."""
  size = int(np.prod(shape))
  kind = draw(st.sampled_from(['random', 'zeros', 'repeated rows', 'mixed scales']))
  if kind == 'zeros':
    values = np.zeros(size)
  else:
    element = st.floats(-LIMIT, LIMIT, allow_nan=False, width=16 if dtype == jnp.float16 else 32)
    values = np.asarray(draw(st.lists(element, min_size=size, max_size=size)), np.float64)
  x = values.reshape(shape)
  if kind == 'repeated rows':  # Coincident points: every row equals the first or the second.
    x = x[np.arange(shape[0]) % min(2, shape[0])]
  if kind == 'mixed scales':
    x = x * np.logspace(-6, 0, shape[-1])
  return jnp.asarray(x, dtype)


def _finite(tree) -> bool:
  return all(bool(jnp.isfinite(jnp.asarray(x, jnp.float32)).all()) for x in jax.tree.leaves(tree))


_BASELINES = {
  'kd': lambda s, t, hyper: losses.kd_loss(s, t, temperature=hyper),
  'fitnet': lambda s, t, hyper: losses.fitnet_loss(s, t),
  'attention': lambda s, t, hyper: losses.attention_transfer_loss(s, t, p=hyper),
  'sp': lambda s, t, hyper: losses.similarity_preserving_loss(s, t),
  'rkd': lambda s, t, hyper: losses.rkd_loss(s, t),
  'pkt': lambda s, t, hyper: losses.pkt_loss(s, t, eps=hyper),
}


@functools.partial(jax.jit, static_argnames=('name',))
def _baseline(student, teacher, hyper, *, name):
  """A baseline's loss and its gradient in the student (the hyper-parameter is traced)."""
  loss = functools.partial(_BASELINES[name], t=teacher, hyper=hyper)
  return loss(student), jax.grad(lambda s: jnp.sum(loss(s)))(student.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=('k',))
def _lp(student, teacher, where, sigma2, *, k):
  def total(s):
    return losses.locality_preserving_loss(s, teacher, k=k, sigma2=sigma2, where=where).sum()

  loss = losses.locality_preserving_loss(student, teacher, k=k, sigma2=sigma2, where=where)
  return loss, jax.grad(total)(student.astype(jnp.float32))


@SETTINGS
@given(data=st.data())
def test_locality_preserving_loss_is_finite_nonnegative_and_masked(data):
  n = data.draw(st.sampled_from(BATCHES))
  dtype = data.draw(st.sampled_from(DTYPES))
  student = data.draw(arrays((n, data.draw(st.sampled_from(WIDTHS))), dtype))
  teacher = data.draw(arrays((n, data.draw(st.sampled_from(WIDTHS))), dtype))
  k = data.draw(st.integers(1, n - 1))
  where = data.draw(st.none() | st.lists(st.booleans(), min_size=n, max_size=n).map(np.array))
  sigma2 = data.draw(st.none() | st.floats(1e-6, 1e6).map(jnp.float32))
  loss, grad = _lp(student, teacher, where, sigma2, k=k)
  assert loss.shape == (n,) and loss.dtype == jnp.float32
  assert _finite(loss) and _finite(grad), (loss, grad)
  assert bool((loss >= 0).all())
  if where is not None:
    assert not np.asarray(loss)[~where].any()  # Masked rows: exactly 0.


@SETTINGS
@given(
  n=st.sampled_from(BATCHES),
  teacher_n=st.sampled_from(BATCHES),
  rank=st.sampled_from([1, 2, 3]),
  k=st.integers(-1, 9) | st.just(2.0),
  sigma2=st.none() | st.sampled_from([-1.0, 0.0, 1e-3, 2.0]),
  where_size=st.none() | st.sampled_from(BATCHES),
)
def test_locality_preserving_loss_raises_only_the_documented_value_errors(
  n, teacher_n, rank, k, sigma2, where_size
):
  student = jnp.ones((n, 3)[:rank] + (2,) * max(rank - 2, 0))
  teacher = jnp.arange(teacher_n * 3, dtype=jnp.float32).reshape(teacher_n, 3)
  where = None if where_size is None else jnp.ones(where_size, bool)
  valid = (
    rank == 2
    and teacher_n == n
    and isinstance(k, int)
    and 1 <= k < n
    and (sigma2 is None or sigma2 > 0)
    and (where_size is None or where_size == n)
  )
  if valid:
    assert _finite(
      losses.locality_preserving_loss(student, teacher, k=k, sigma2=sigma2, where=where)
    )
  else:
    with pytest.raises(ValueError):
      losses.locality_preserving_loss(student, teacher, k=k, sigma2=sigma2, where=where)


@SETTINGS
@given(data=st.data())
def test_per_example_baselines_are_finite(data):
  """kd_loss, fitnet_loss and attention_transfer_loss: `[n]` finite losses and gradients."""
  n = data.draw(st.sampled_from(BATCHES))
  dtype = data.draw(st.sampled_from(DTYPES))
  which = data.draw(st.sampled_from(['kd', 'fitnet', 'attention']))
  if which == 'kd':
    student, teacher = (data.draw(arrays((n, 10), dtype)) for _ in range(2))
    value, grad = _baseline(student, teacher, data.draw(st.floats(0.05, 20.0)), name='kd')
  elif which == 'fitnet':
    shape = data.draw(st.sampled_from([(n, 4), (n, 2, 2, 3)]))
    student, teacher = (data.draw(arrays(shape, dtype)) for _ in range(2))
    value, grad = _baseline(student, teacher, 0.0, name='fitnet')
  else:
    student = data.draw(arrays((n, data.draw(st.sampled_from([2, 4])), 4, 3), dtype))
    teacher = data.draw(arrays((n, 4, 4, 2), dtype))
    # |x|^p has an infinite slope at 0 for p < 1, so gradients are checked for p >= 1.
    value, grad = _baseline(student, teacher, data.draw(st.floats(1.0, 4.0)), name='attention')
  assert value.shape == (n,) and value.dtype == jnp.float32
  assert _finite(value) and _finite(grad), (which, value, grad)
  assert bool((value >= -1e-6).all())


@SETTINGS
@given(data=st.data())
def test_batch_relational_baselines_are_finite(data):
  """similarity_preserving_loss, rkd_loss and pkt_loss: finite scalars and gradients."""
  n = data.draw(st.sampled_from(BATCHES))
  dtype = data.draw(st.sampled_from(DTYPES))
  student = data.draw(arrays((n, data.draw(st.sampled_from(WIDTHS))), dtype))
  teacher = data.draw(arrays((n, 2, 2, 2), dtype))
  which = data.draw(st.sampled_from(['sp', 'rkd', 'pkt']))
  eps = data.draw(st.floats(1e-12, 1e-3))  # pkt's; the others take no hyper-parameter.
  value, grad = _baseline(student, teacher, eps, name=which)
  assert value.shape == () and value.dtype == jnp.float32
  assert _finite(value) and _finite(grad), (which, value, grad)


@SETTINGS
@given(
  which=st.sampled_from(['kd', 'fitnet', 'attention', 'sp', 'rkd', 'pkt']),
  n=st.sampled_from([1, 2, 3]),
  teacher_n=st.sampled_from([1, 2, 3]),
  rank=st.sampled_from([1, 2, 4]),
  hyper=st.sampled_from([-1.0, 0.0, 0.5]),
)
def test_baselines_raise_only_the_documented_value_errors(which, n, teacher_n, rank, hyper):
  shape = lambda m: (m, 3, 3, 2)[:rank]
  student, teacher = jnp.ones(shape(n)), jnp.arange(np.prod(shape(teacher_n)), dtype=float)
  teacher = teacher.reshape(shape(teacher_n))
  same_batch = n == teacher_n
  positive = hyper > 0
  valid = (
    same_batch
    and {
      'kd': rank == 2 and positive,
      'fitnet': rank >= 2,
      'attention': rank == 4 and positive,
      'sp': rank >= 2,
      'rkd': rank >= 2 and n >= 2,
      'pkt': rank >= 2 and positive,
    }[which]
  )
  loss = functools.partial(_BASELINES[which], hyper=hyper)
  if valid:
    assert _finite(loss(student, teacher))
  else:
    with pytest.raises(ValueError):
      loss(student, teacher)


# --- bad input and scale ------------------------------------------------------------------------

_SHAPES = {
  'kd': ((10,), (10,)),
  'fitnet': ((2, 2, 3), (2, 2, 3)),
  'attention': ((4, 4, 3), (2, 2, 2)),
  'sp': ((4,), (2, 2, 2)),
  'rkd': ((4,), (2, 2, 2)),
  'pkt': ((4,), (2, 2, 2)),
  'lp': ((4,), (3,)),
}
_HYPER = {'kd': 4.0, 'attention': 2.0, 'pkt': 1e-7}


@functools.partial(jax.jit, static_argnames=('name',))
def _loss(student, teacher, *, name):
  if name == 'lp':
    return losses.locality_preserving_loss(student, teacher, k=2)
  return _BASELINES[name](student, teacher, _HYPER.get(name))


@SETTINGS
@given(data=st.data())
def test_a_nonfinite_input_anywhere_gives_a_nonfinite_loss(data):
  """Per-example losses: that example's loss; relational losses and LP: the batch's."""
  name = data.draw(st.sampled_from(sorted(_SHAPES)))
  n = data.draw(st.sampled_from([3, 8]))
  student, teacher = (data.draw(arrays((n, *shape), jnp.float32)) for shape in _SHAPES[name])
  side = data.draw(st.sampled_from(['student', 'teacher']))
  # A -inf logit is a probability of 0 for kd_loss (documented): finite where that is.
  bad = data.draw(st.sampled_from([np.nan, np.inf] + ([] if name == 'kd' else [-np.inf])))
  x = np.array(student if side == 'student' else teacher)
  row = data.draw(st.integers(0, n - 1))
  x[row].reshape(-1)[data.draw(st.integers(0, x[0].size - 1))] = bad
  student, teacher = (x, teacher) if side == 'student' else (student, x)
  value = np.asarray(_loss(student, teacher, name=name))
  if value.ndim:
    assert not np.isfinite(value[row]), (name, side, bad, value)
  assert not np.isfinite(value.mean()), (name, side, bad, value)


@SETTINGS
@given(data=st.data())
def test_knn_graph_never_lists_a_row_as_its_own_neighbour(data):
  n = data.draw(st.sampled_from(BATCHES))
  teacher = np.array(data.draw(arrays((n, data.draw(st.sampled_from(WIDTHS))), jnp.float32)))
  teacher = teacher * np.float32(2.0 ** data.draw(st.integers(0, 110)))
  for _ in range(data.draw(st.integers(0, 2))):  # Non-finite or huge entries anywhere.
    value = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, 3e38, -3e38]))
    teacher.reshape(-1)[data.draw(st.integers(0, teacher.size - 1))] = value
  k = data.draw(st.integers(1, n - 1))
  where = data.draw(st.none() | st.lists(st.booleans(), min_size=n, max_size=n).map(np.array))
  block_size = data.draw(st.sampled_from([0, 1, 2]))
  indices, sq_dist = _graph(teacher, where, k=k, block_size=block_size)
  indices, sq_dist = np.asarray(indices), np.asarray(sq_dist)
  assert not (indices == np.arange(n)[:, None]).any(), indices
  assert ((0 <= indices) & (indices < n)).all()
  # Filled slots: min(k, other valid rows) per valid row, none for masked rows.
  valid = np.ones(n, bool) if where is None else where
  filled = (sq_dist != np.inf).sum(axis=1)
  np.testing.assert_array_equal(filled, np.where(valid, np.minimum(k, valid.sum() - 1), 0))
  held = sq_dist[sq_dist != np.inf]
  if np.isfinite(teacher[valid]).all():
    assert np.isfinite(held).all()  # Distances beyond float32's range saturate.
  else:
    assert np.isnan(held).all()  # The graph is undefined.


@functools.partial(jax.jit, static_argnames=('k', 'block_size'))
def _graph(teacher, where, *, k, block_size):
  return losses.knn_graph(teacher, k=k, where=where, block_size=block_size)


@SETTINGS
@given(data=st.data())
def test_locality_preserving_loss_is_unchanged_by_power_of_two_teacher_scales(data):
  n = data.draw(st.sampled_from(BATCHES))
  student = data.draw(arrays((n, data.draw(st.sampled_from(WIDTHS))), jnp.float32))
  teacher = data.draw(arrays((n, data.draw(st.sampled_from(WIDTHS))), jnp.float32))
  k = data.draw(st.integers(1, n - 1))
  where = data.draw(st.none() | st.lists(st.booleans(), min_size=n, max_size=n).map(np.array))
  factor = np.float32(2.0 ** data.draw(st.integers(-20, 110)))
  loss, grad = _lp(student, teacher, where, None, k=k)
  scaled_loss, scaled_grad = _lp(student, teacher * factor, where, None, k=k)
  # Exact but for features that the scaling moves across float32's smallest normal.
  np.testing.assert_allclose(scaled_loss, loss, rtol=1e-6, atol=1e-30)
  np.testing.assert_allclose(scaled_grad, grad, rtol=1e-6, atol=1e-30)


@SETTINGS
@given(data=st.data())
def test_scale_invariant_losses_stay_finite_at_large_magnitudes(data):
  """Finite inputs up to about 1e34 (and their gradients): no overflow to inf or NaN."""
  name = data.draw(st.sampled_from(['kd', 'attention', 'sp', 'rkd', 'pkt', 'lp']))
  n = data.draw(st.sampled_from([3, 8]))
  student, teacher = (data.draw(arrays((n, *shape), jnp.float32)) for shape in _SHAPES[name])
  scale = lambda: np.float32(2.0 ** data.draw(st.integers(0, 100)))
  teacher = teacher * scale()
  if name != 'lp':  # LP's student distances are not scale-free: they may overflow.
    student = student * scale()
  hyper = data.draw(st.floats(0.5, 8.0)) if name == 'kd' else _HYPER.get(name, 0.0)
  if name == 'lp':
    value, grad = _lp(student, teacher, None, None, k=2)
  else:
    value, grad = _baseline(student, teacher, hyper, name=name)
  assert _finite(value) and _finite(grad), (name, value, grad)


@SETTINGS
@given(data=st.data())
def test_scale_invariant_lp_forms_ignore_the_student_scale(data):
  """'l2' and 'mean' give the same loss for `c * student`, any c > 0, any finite input."""
  n = data.draw(st.sampled_from(BATCHES[1:]))
  student = data.draw(arrays((n, data.draw(st.sampled_from(WIDTHS))), jnp.float32))
  teacher = data.draw(arrays((n, data.draw(st.sampled_from(WIDTHS))), jnp.float32))
  k = data.draw(st.integers(1, n - 1))
  student_scale = data.draw(st.sampled_from(['l2', 'mean']))
  factor = np.float32(data.draw(st.floats(1e-3, 1e3)))
  # Entries below float32's smallest normal (before or after scaling) lose bits: not a scale.
  magnitudes = np.abs(np.concatenate([np.ravel(student), np.ravel(student * factor)]))
  assume(not np.any((magnitudes > 0) & (magnitudes < np.finfo(np.float32).tiny)))
  loss = lambda s: losses.locality_preserving_loss(s, teacher, k=k, student_scale=student_scale)
  value, scaled = loss(student), loss(student * factor)
  assert _finite(value) and _finite(scaled)
  np.testing.assert_allclose(scaled, value, rtol=1e-4, atol=1e-6)
