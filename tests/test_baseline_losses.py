"""Tests for lpe.losses.baselines against float64 NumPy references written from the maths."""

import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lpe.losses import baselines
from lpe.losses.baselines import (
  FitNetRegressor,
  attention_transfer_loss,
  fitnet_loss,
  kd_loss,
  pkt_loss,
  rkd_loss,
  similarity_preserving_loss,
)

RTOL = 2e-5
ATOL = 1e-6


def _normal(seed: int, *shape: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# NumPy references (float64, loops where natural).


def _ref_kd(s: np.ndarray, t: np.ndarray, temperature: float) -> np.ndarray:
  def log_softmax(z):
    z = z - z.max()
    return z - math.log(np.exp(z).sum())

  out = np.zeros(s.shape[0])
  for i in range(s.shape[0]):
    log_q = log_softmax(s[i].astype(np.float64) / temperature)
    log_p = log_softmax(t[i].astype(np.float64) / temperature)
    p = np.exp(log_p)
    # 0 log 0 = 0: classes with p = 0 (to float64 precision) contribute nothing.
    out[i] = sum(p[c] * (log_p[c] - log_q[c]) for c in range(len(p)) if p[c] > 0)
  return out * temperature**2


def _ref_adaptive_pool(x: np.ndarray, height: int, width: int) -> np.ndarray:
  n, h_in, w_in, c = x.shape
  out = np.zeros((n, height, width, c))
  for i in range(height):
    h0, h1 = math.floor(i * h_in / height), math.ceil((i + 1) * h_in / height)
    for j in range(width):
      w0, w1 = math.floor(j * w_in / width), math.ceil((j + 1) * w_in / width)
      out[:, i, j, :] = x[:, h0:h1, w0:w1, :].mean(axis=(1, 2))
  return out


def _ref_at(s: np.ndarray, t: np.ndarray, p: float) -> np.ndarray:
  s, t = s.astype(np.float64), t.astype(np.float64)
  height, width = min(s.shape[1], t.shape[1]), min(s.shape[2], t.shape[2])
  s, t = _ref_adaptive_pool(s, height, width), _ref_adaptive_pool(t, height, width)
  out = np.zeros(s.shape[0])
  for i in range(s.shape[0]):
    a_s = (np.abs(s[i]) ** p).mean(axis=-1).ravel()
    a_t = (np.abs(t[i]) ** p).mean(axis=-1).ravel()
    a_s /= max(np.linalg.norm(a_s), 1e-12)
    a_t /= max(np.linalg.norm(a_t), 1e-12)
    out[i] = np.mean((a_s - a_t) ** 2)
  return out


def _ref_sp(s: np.ndarray, t: np.ndarray) -> float:
  n = s.shape[0]

  def gram(f):
    f = f.reshape(n, -1).astype(np.float64)
    g = np.array([[f[i] @ f[j] for j in range(n)] for i in range(n)])
    return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)

  return float(np.sum((gram(s) - gram(t)) ** 2) / n**2)


def _ref_huber_mean(x: np.ndarray, y: np.ndarray) -> float:
  d = np.abs(x - y)
  return float(np.mean(np.where(d < 1, 0.5 * d**2, d - 0.5)))


def _ref_rkd(s: np.ndarray, t: np.ndarray, w_d: float, w_a: float) -> float:
  n = s.shape[0]

  def distances(f):
    d = np.zeros((n, n))
    for i in range(n):
      for j in range(n):
        if i != j:
          d[i, j] = math.sqrt(max(np.sum((f[i] - f[j]) ** 2), 1e-12))
    return d / d[d > 0].mean()

  def angles(f):
    a = np.zeros((n, n, n))
    for i in range(n):
      e = [(f[j] - f[i]) / max(np.linalg.norm(f[j] - f[i]), 1e-12) for j in range(n)]
      for j in range(n):
        for k in range(n):
          a[i, j, k] = e[j] @ e[k]
    return a

  s = s.reshape(n, -1).astype(np.float64)
  t = t.reshape(n, -1).astype(np.float64)
  loss_d = _ref_huber_mean(distances(s), distances(t))
  loss_a = _ref_huber_mean(angles(s), angles(t))
  return w_d * loss_d + w_a * loss_a


def _ref_pkt(s: np.ndarray, t: np.ndarray, eps: float) -> float:
  n = s.shape[0]

  def probabilities(f):
    f = f.reshape(n, -1).astype(np.float64)
    f = f / (np.linalg.norm(f, axis=1, keepdims=True) + eps)
    k = np.array([[(f[i] @ f[j] + 1) / 2 for j in range(n)] for i in range(n)])
    return k / k.sum(axis=1, keepdims=True)

  p_s, p_t = probabilities(s), probabilities(t)
  return float(np.mean(p_t * np.log((p_t + eps) / (p_s + eps))))


# ---------------------------------------------------------------------------------------------
# Values against the references, under jit.


@pytest.mark.parametrize('temperature', [1.0, 4.0])
def test_kd_matches_reference(temperature):
  s, t = 3 * _normal(0, 5, 7), 3 * _normal(1, 5, 7)
  got = jax.jit(lambda a, b: kd_loss(a, b, temperature=temperature))(s, t)
  assert got.shape == (5,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _ref_kd(s, t, temperature), rtol=RTOL, atol=ATOL)


def test_kd_batch_mean_equals_summed_kl_over_batch_size():
  # RepDistiller's DistillKL: kl_div summed over everything, times T^2, divided by n.
  s, t = _normal(2, 6, 4), _normal(3, 6, 4)
  expected = _ref_kd(s, t, 4.0).sum() / 6
  np.testing.assert_allclose(kd_loss(s, t, temperature=4.0).mean(), expected, rtol=RTOL)


def test_fitnet_matches_reference():
  s, t = _normal(4, 3, 4, 5, 6), _normal(5, 3, 4, 5, 6)
  got = jax.jit(fitnet_loss)(s, t)
  expected = [np.mean((s[i].astype(np.float64) - t[i]) ** 2) for i in range(3)]
  np.testing.assert_allclose(got, expected, rtol=RTOL)
  np.testing.assert_allclose(got.mean(), np.mean((s.astype(np.float64) - t) ** 2), rtol=RTOL)


@pytest.mark.parametrize(
  'student_shape, teacher_shape',
  [
    ((3, 4, 4, 5), (3, 4, 4, 7)),  # Same size, different channels.
    ((3, 8, 8, 2), (3, 4, 4, 6)),  # Student larger: pooled by 2.
    ((3, 2, 2, 4), (3, 4, 4, 3)),  # Teacher larger.
    ((2, 5, 7, 3), (2, 3, 3, 3)),  # Not a multiple: overlapping adaptive windows.
    ((2, 6, 4, 3), (2, 3, 8, 2)),  # Height and width pooled on different maps.
  ],
)
def test_attention_transfer_matches_reference(student_shape, teacher_shape):
  s, t = _normal(6, *student_shape), _normal(7, *teacher_shape)
  got = jax.jit(attention_transfer_loss)(s, t)
  assert got.shape == (student_shape[0],)
  np.testing.assert_allclose(got, _ref_at(s, t, 2.0), rtol=RTOL, atol=ATOL)


def test_attention_transfer_other_p():
  s, t = _normal(8, 2, 4, 4, 3), _normal(9, 2, 2, 2, 3)
  got = attention_transfer_loss(s, t, p=3.0)
  np.testing.assert_allclose(got, _ref_at(s, t, 3.0), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('student_shape, teacher_shape', [((6, 5), (6, 9)), ((4, 2, 2, 3), (4, 7))])
def test_similarity_preserving_matches_reference(student_shape, teacher_shape):
  s, t = _normal(10, *student_shape), _normal(11, *teacher_shape)
  got = jax.jit(similarity_preserving_loss)(s, t)
  assert got.shape == ()
  np.testing.assert_allclose(got, _ref_sp(s, t), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('student_shape, teacher_shape', [((6, 5), (6, 9)), ((4, 2, 2, 3), (4, 7))])
def test_rkd_matches_reference(student_shape, teacher_shape):
  s, t = _normal(12, *student_shape), _normal(13, *teacher_shape)
  got = jax.jit(rkd_loss)(s, t)
  assert got.shape == ()
  np.testing.assert_allclose(got, _ref_rkd(s, t, 25.0, 50.0), rtol=1e-4, atol=ATOL)
  weighted = jax.jit(rkd_loss, static_argnames=('distance_weight', 'angle_weight'))(
    s, t, distance_weight=1.0, angle_weight=2.0
  )
  np.testing.assert_allclose(weighted, _ref_rkd(s, t, 1.0, 2.0), rtol=1e-4, atol=ATOL)


@pytest.mark.parametrize('student_shape, teacher_shape', [((6, 5), (6, 9)), ((4, 2, 2, 3), (4, 7))])
def test_pkt_matches_reference(student_shape, teacher_shape):
  s, t = _normal(14, *student_shape), _normal(15, *teacher_shape)
  got = jax.jit(pkt_loss)(s, t)
  assert got.shape == ()
  np.testing.assert_allclose(got, _ref_pkt(s, t, 1e-7), rtol=1e-4, atol=ATOL)


@pytest.mark.parametrize(
  'loss, reference',
  [
    (similarity_preserving_loss, _ref_sp),
    (rkd_loss, lambda s, t: _ref_rkd(s, t, 25.0, 50.0)),
    (pkt_loss, lambda s, t: _ref_pkt(s, t, 1e-7)),
  ],
)
def test_relational_losses_with_where_are_the_losses_of_those_rows_alone(loss, reference):
  """A padded batch (`where`): the value is the reference on the valid rows only, whatever the
  padding holds (here inf and huge values), and the padding gets exactly zero gradient."""
  s, t = _normal(40, 7, 2, 2, 3), _normal(41, 7, 5)
  where = np.array([1, 0, 1, 1, 0, 1, 0], bool)
  s[~where], t[~where] = np.inf, 1e30
  got = jax.jit(loss)(s, t, where=where)
  np.testing.assert_allclose(got, reference(s[where], t[where]), rtol=1e-4, atol=ATOL)
  grad = jax.jit(jax.grad(lambda x: loss(x, t, where=where)))(jnp.asarray(s))
  expected = jax.grad(loss)(jnp.asarray(s[where]), t[where])
  assert np.all(np.asarray(grad)[~where] == 0)
  np.testing.assert_allclose(np.asarray(grad)[where], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('loss', [similarity_preserving_loss, rkd_loss, pkt_loss])
@pytest.mark.parametrize('valid', [0, 1])
def test_relational_losses_with_fewer_than_two_valid_rows_are_zero(loss, valid):
  """A padded last batch with one real row (or none) has no relations to keep: the loss is 0 with
  a zero gradient up to rounding, not NaN (RKD's mean distance over no pairs once made the run
  stop)."""
  s, t = _normal(42, 5, 3), _normal(43, 5, 4)
  where = np.arange(5) < valid
  value, grad = jax.jit(jax.value_and_grad(lambda x: loss(x, t, where=where)))(jnp.asarray(s))
  assert abs(float(value)) < 1e-12
  assert np.all(np.abs(np.asarray(grad)) < 1e-12) and np.all(np.asarray(grad)[valid:] == 0)


def test_relational_losses_with_duplicate_and_zero_rows_match_reference():
  s = _normal(16, 5, 4)
  s[3] = s[1]
  s[4] = 0.0
  t = _normal(17, 5, 6)
  np.testing.assert_allclose(jax.jit(rkd_loss)(s, t), _ref_rkd(s, t, 25.0, 50.0), rtol=1e-4)
  np.testing.assert_allclose(jax.jit(pkt_loss)(s, t), _ref_pkt(s, t, 1e-7), rtol=1e-4, atol=ATOL)
  sp = jax.jit(similarity_preserving_loss)(s, t)
  np.testing.assert_allclose(sp, _ref_sp(s, t), rtol=RTOL)


# Features far from 1: squares overflow float32 above about 1e19. The relational losses and the
# attention maps are scale-invariant (bar their tiny clamps), so they must not care.
EXTREME_SCALES = [1e19, 2.0**100, 2e37]


@pytest.mark.parametrize('scale', EXTREME_SCALES)
def test_scale_invariant_losses_at_extreme_magnitudes_match_reference(scale):
  big = lambda x: (x.astype(np.float64) * scale).astype(np.float32)
  s, t = big(_normal(40, 5, 4)), big(_normal(41, 5, 2, 3))
  np.testing.assert_allclose(jax.jit(rkd_loss)(s, t), _ref_rkd(s, t, 25.0, 50.0), rtol=1e-4)
  np.testing.assert_allclose(jax.jit(similarity_preserving_loss)(s, t), _ref_sp(s, t), rtol=RTOL)
  np.testing.assert_allclose(jax.jit(pkt_loss)(s, t), _ref_pkt(s, t, 1e-7), rtol=1e-4, atol=ATOL)
  # Only one side far from 1.
  s = _normal(40, 5, 4)
  np.testing.assert_allclose(jax.jit(rkd_loss)(s, t), _ref_rkd(s, t, 25.0, 50.0), rtol=1e-4)
  np.testing.assert_allclose(jax.jit(similarity_preserving_loss)(s, t), _ref_sp(s, t), rtol=RTOL)
  np.testing.assert_allclose(jax.jit(pkt_loss)(s, t), _ref_pkt(s, t, 1e-7), rtol=1e-4, atol=ATOL)
  s, t = big(_normal(42, 3, 4, 4, 2)), big(_normal(43, 3, 2, 2, 5))
  for p in (2.0, 3.0):
    got = jax.jit(lambda a, b, p=p: attention_transfer_loss(a, b, p=p))(s, t)
    np.testing.assert_allclose(got, _ref_at(s, t, p), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('temperature', [4.0, 1.0, 0.5])
def test_kd_at_extreme_logits_matches_reference(temperature):
  """Logits near float32's limit: x - max(x) and x / T overflow, but are the limit there."""
  s, t = _normal(44, 4, 6), _normal(45, 4, 6)
  # Logits up to +-3e38: x - max(x) overflows to -inf (p = 0 there), as does x / 0.5.
  t_big = np.clip(t.astype(np.float64) * 2e38, -3e38, 3e38).astype(np.float32)
  t_big[0, :2] = [3e38, -3e38]
  kd = jax.jit(kd_loss, static_argnames='temperature')
  for student, teacher in [(s, t_big), (1e30 * s, t), (1e30 * s, t_big)]:
    got = kd(student, teacher, temperature=temperature)
    want = _ref_kd(student, teacher, temperature)
    assert np.isfinite(want).all()
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_bfloat16_inputs_compute_in_float32():
  s, t = _normal(18, 4, 3, 3, 5), _normal(19, 4, 3, 3, 5)
  sb, tb = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  s32, t32 = np.asarray(sb, np.float32), np.asarray(tb, np.float32)
  for fn in [fitnet_loss, attention_transfer_loss, similarity_preserving_loss, pkt_loss]:
    got = jax.jit(fn)(sb, tb)
    assert got.dtype == jnp.float32, fn.__name__
    np.testing.assert_allclose(got, jax.jit(fn)(s32, t32), rtol=1e-6, err_msg=fn.__name__)
  got = kd_loss(sb[:, 0, 0], tb[:, 0, 0], temperature=2.0)
  assert got.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Gradients.

_STUDENT_TEACHER = [
  ('kd', lambda s, t: kd_loss(s, t, temperature=4.0).mean(), (4, 6), (4, 6)),
  ('fitnet', lambda s, t: fitnet_loss(s, t).mean(), (4, 2, 2, 3), (4, 2, 2, 3)),
  ('at', lambda s, t: attention_transfer_loss(s, t).mean(), (4, 4, 4, 3), (4, 2, 2, 5)),
  ('sp', similarity_preserving_loss, (4, 3), (4, 5)),
  ('rkd', rkd_loss, (4, 3), (4, 5)),
  ('pkt', pkt_loss, (4, 3), (4, 5)),
]


@pytest.mark.parametrize('name, loss, s_shape, t_shape', _STUDENT_TEACHER)
def test_teacher_gets_exactly_zero_gradient(name, loss, s_shape, t_shape):
  s, t = _normal(20, *s_shape), _normal(21, *t_shape)
  grad_s, grad_t = jax.jit(jax.grad(loss, argnums=(0, 1)))(s, t)
  assert np.all(np.asarray(grad_t) == 0.0), name
  assert np.all(np.isfinite(grad_s)) and np.any(np.asarray(grad_s) != 0.0), name


@pytest.mark.parametrize('loss', [rkd_loss, pkt_loss, similarity_preserving_loss])
def test_finite_gradients_with_duplicate_and_zero_rows(loss):
  s = _normal(22, 5, 4)
  s[2] = s[0]
  s[4] = 0.0
  t = _normal(23, 5, 3)
  t[1] = t[3]
  grad = jax.jit(jax.grad(loss))(s, t)
  assert np.all(np.isfinite(grad))
  # Fully collapsed student (all rows equal): still finite.
  grad = jax.jit(jax.grad(loss))(np.ones((4, 3), np.float32), t[:4])
  assert np.all(np.isfinite(grad))


def test_attention_transfer_finite_gradient_for_zero_map():
  s = np.zeros((2, 2, 2, 3), np.float32)
  t = _normal(24, 2, 2, 2, 3)
  grad = jax.jit(jax.grad(lambda x: attention_transfer_loss(x, t).mean()))(s)
  assert np.all(np.isfinite(grad))


def test_student_gradients_match_finite_differences():
  s = _normal(25, 3, 4)
  t = _normal(26, 3, 5)
  tol = dict(atol=5e-2, rtol=5e-2, eps=1e-2)
  for loss in [rkd_loss, pkt_loss]:
    check_grads(jax.jit(lambda x, loss=loss: loss(x, t)), (s,), 1, ['rev'], **tol)


# ---------------------------------------------------------------------------------------------
# Transformations.


def test_per_example_losses_under_vmap_and_relational_losses_per_group():
  s, t = _normal(27, 2, 3, 6), _normal(28, 2, 3, 6)
  kd = jax.jit(jax.vmap(lambda a, b: kd_loss(a, b, temperature=2.0)))(s, t)
  np.testing.assert_allclose(kd[1], kd_loss(s[1], t[1], temperature=2.0), rtol=1e-6)
  rkd = jax.jit(jax.vmap(rkd_loss))(s, t)
  np.testing.assert_allclose(rkd[0], jax.jit(rkd_loss)(s[0], t[0]), rtol=1e-5)


def test_traced_hyper_parameters_under_jit():
  s, t = _normal(29, 3, 5), _normal(30, 3, 5)
  got = jax.jit(lambda a, b, temp: kd_loss(a, b, temperature=temp))(s, t, 3.0)
  np.testing.assert_allclose(got, kd_loss(s, t, temperature=3.0), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad inputs.

_BAD_INPUTS = [
  (lambda: kd_loss(np.zeros(4), np.zeros(4), temperature=1.0), 'shape'),
  (lambda: kd_loss(np.zeros((4, 10)), np.zeros((4, 100)), temperature=1.0), 'differ'),
  (lambda: kd_loss(np.zeros((4, 10)), np.zeros((3, 10)), temperature=1.0), 'differ'),
  (lambda: kd_loss(np.zeros((4, 10)), np.zeros((4, 10)), temperature=0.0), 'temperature'),
  (lambda: kd_loss(np.zeros((4, 10)), np.zeros((4, 10)), temperature=-1.0), 'temperature'),
  (lambda: fitnet_loss(np.zeros((4, 2, 2, 3)), np.zeros((4, 2, 2, 5))), 'FitNetRegressor'),
  (lambda: fitnet_loss(np.zeros((4, 4, 4, 3)), np.zeros((4, 2, 2, 3))), 'differs'),
  (lambda: fitnet_loss(np.zeros(4), np.zeros(4)), 'shape'),
  (lambda: attention_transfer_loss(np.zeros((4, 2, 2)), np.zeros((4, 2, 2, 3))), 'NHWC'),
  (lambda: attention_transfer_loss(np.zeros((4, 2, 2, 3)), np.zeros((3, 2, 2, 3))), 'batch'),
  (lambda: attention_transfer_loss(np.ones((1, 2, 2, 3)), np.ones((1, 2, 2, 3)), p=0), 'p '),
  (lambda: similarity_preserving_loss(np.zeros((4, 3)), np.zeros((5, 3))), 'batch'),
  (lambda: similarity_preserving_loss(np.zeros(4), np.zeros(4)), 'shape'),
  (lambda: rkd_loss(np.zeros((4, 3)), np.zeros((2, 3))), 'batch'),
  (lambda: rkd_loss(np.zeros((1, 3)), np.zeros((1, 3))), 'at least 2'),
  (lambda: pkt_loss(np.zeros((4, 3)), np.zeros((3, 3))), 'batch'),
  (lambda: pkt_loss(np.zeros((4, 3)), np.zeros((4, 3)), eps=0.0), 'eps'),
  (lambda: FitNetRegressor(4).init(jax.random.key(0), np.zeros((2, 3, 3))), 'shape'),
]


@pytest.mark.parametrize('call, match', _BAD_INPUTS)
def test_bad_inputs_raise_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# ---------------------------------------------------------------------------------------------
# FitNetRegressor.


def _num_params(params) -> int:
  return sum(p.size for p in jax.tree.leaves(params))


def test_fitnet_regressor_nhwc_is_conv_batchnorm_relu():
  reg = FitNetRegressor(features=4)
  x = _normal(31, 3, 2, 2, 5)
  variables = jax.jit(reg.init)(jax.random.key(1), jnp.asarray(x, jnp.bfloat16))
  assert set(variables) == {'params'}  # No batch_stats to thread through the train step.
  assert _num_params(variables) == 5 * 4 + 4 + 2 * 4  # Conv kernel + bias, norm scale + bias.
  y = jax.jit(reg.apply)(variables, x)
  assert y.shape == (3, 2, 2, 4) and y.dtype == jnp.float32
  p = variables['params']
  z = np.einsum('nhwc,cf->nhwf', x.astype(np.float64), p['conv']['kernel'][0, 0])
  z += p['conv']['bias']
  z = (z - z.mean(axis=(0, 1, 2))) / np.sqrt(z.var(axis=(0, 1, 2)) + 1e-5)
  expected = np.maximum(z * p['bn_scale'] + p['bn_bias'], 0)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_fitnet_regressor_with_where_normalises_by_those_rows_alone():
  reg = FitNetRegressor(features=4)
  x = _normal(33, 5, 2, 2, 3)
  where = np.array([1, 1, 0, 1, 0], bool)
  variables = reg.init(jax.random.key(2), x)
  masked = jax.jit(reg.apply)(variables, x, where)
  np.testing.assert_allclose(
    np.asarray(masked)[where], reg.apply(variables, x[where]), rtol=1e-5, atol=1e-6
  )


def test_fitnet_regressor_maps_vectors_to_teacher_width():
  reg = FitNetRegressor(features=6)
  x = _normal(32, 4, 10)
  variables = jax.jit(reg.init)(jax.random.key(0), x)
  y = jax.jit(reg.apply)(variables, x)
  assert y.shape == (4, 6)
  assert _num_params(variables) == 10 * 6 + 6
  kernel = variables['params']['dense']['kernel']
  bias = variables['params']['dense']['bias']
  np.testing.assert_allclose(y, np.maximum(x @ kernel + bias, 0), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Docstrings.


def test_docstring_examples_run():
  result = doctest.testmod(baselines, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0
  assert result.failed == 0


def test_kd_loss_defaults_to_temperature_4():
  rng = np.random.default_rng(7)
  s, t = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  np.testing.assert_array_equal(kd_loss(s, t), kd_loss(s, t, temperature=4.0))
