"""Tests of the evaluation diagnostics against plain NumPy written from their definitions."""

import numpy as np
import pytest

from lpe import diagnostics


def _knn_sets(x, k):
  d = ((x[:, None] - x[None]) ** 2).sum(-1)
  np.fill_diagonal(d, np.inf)
  return [set(np.argsort(row, kind='stable')[:k].tolist()) for row in d]


@pytest.mark.parametrize('k', [1, 3, 7])
def test_neighbourhood_preservation_matches_numpy(k):
  rng = np.random.default_rng(k)
  t = rng.normal(size=(20, 6)).astype(np.float32)
  s = (t[:, :3] + 0.3 * rng.normal(size=(20, 3))).astype(np.float32)
  got = np.asarray(diagnostics.neighbourhood_preservation(s, t, k=k))
  nt, ns = _knn_sets(t, k), _knn_sets(s, k)
  want = np.array([len(a & b) / k for a, b in zip(nt, ns, strict=True)])
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_neighbourhood_preservation_extremes_and_mask():
  rng = np.random.default_rng(0)
  t = rng.normal(size=(12, 4)).astype(np.float32)
  np.testing.assert_allclose(diagnostics.neighbourhood_preservation(2 * t, t, k=3), 1.0)
  where = np.arange(12) < 9
  got = np.asarray(diagnostics.neighbourhood_preservation(t, t, k=3, where=where))
  np.testing.assert_allclose(got[:9], 1.0)
  np.testing.assert_allclose(got[9:], 0.0)


def test_top1_agreement():
  s = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
  t = np.array([[3.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
  np.testing.assert_array_equal(diagnostics.top1_agreement(s, t), [1.0, 0.0, 0.0])
  with pytest.raises(ValueError, match='Logits must both be'):
    diagnostics.top1_agreement(s, t[:2])


def test_linear_cka_invariances_and_range():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 8))
  q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
  assert diagnostics.linear_cka(x, 3.0 * x @ q + 1.0) == pytest.approx(1.0)
  unrelated = diagnostics.linear_cka(x, rng.normal(size=(50, 5)))
  assert 0.0 <= unrelated < 0.5
  # Reference: the HSIC form with centred Gram matrices.
  y = x[:, :4] + 0.5 * rng.normal(size=(50, 4))
  h = np.eye(50) - 1 / 50
  kx, ky = h @ x @ x.T @ h, h @ y @ y.T @ h
  want = (kx * ky).sum() / np.sqrt((kx * kx).sum() * (ky * ky).sum())
  assert diagnostics.linear_cka(x, y) == pytest.approx(want, rel=1e-9)


def _random_split_and_student(seed: int):
  """45 random Fashion-MNIST-shaped images with labels, the dataset's info, and cnn_student."""
  from lpe import data, models

  rng = np.random.default_rng(seed)
  split = data.Split(
    rng.integers(0, 255, (45, 28, 28, 1)).astype(np.uint8), rng.integers(0, 10, 45).astype(np.int32)
  )
  return split, data.dataset_info('fashion_mnist'), models.build('cnn_student', 10)


def test_evaluate_reports_diagnostics_against_a_teacher():
  import jax
  import jax.numpy as jnp

  from lpe import evaluate, models

  split, info, model = _random_split_and_student(0)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  plain = evaluate.evaluate(model, variables, split, info=info, batch_size=20)
  assert set(plain) == {'accuracy', 'loss', 'num_examples'}
  # The model as its own teacher: full agreement, every neighbourhood kept, CKA 1.
  same = evaluate.evaluate(
    model, variables, split, info=info, batch_size=20, teacher=(model, variables), k=3
  )
  assert same['num_examples'] == 45 and same['accuracy'] == plain['accuracy']
  assert same['agreement'] == pytest.approx(1.0)
  assert same['neighbourhood_preservation'] == pytest.approx(1.0)
  assert same['cka'] == pytest.approx(1.0)
  other = models.build('cnn_student', 10)
  other_vars = other.init(jax.random.key(7), jnp.zeros((1, 28, 28, 1)))
  diff = evaluate.evaluate(
    model, variables, split, info=info, batch_size=20, teacher=(other, other_vars), k=3
  )
  assert diff['neighbourhood_preservation'] < 1.0 and 0.0 <= diff['cka'] <= 1.0


def test_evaluator_keeps_the_teachers_outputs_not_the_images_between_calls():
  """A run's evaluator is called every epoch: the frozen teacher's outputs are computed once and
  kept, the images are placed again each time (a large split holds no memory between calls)."""
  import jax
  import jax.numpy as jnp

  from lpe import evaluate

  split, info, model = _random_split_and_student(1)
  student = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  teacher = model.init(jax.random.key(1), jnp.zeros((1, 28, 28, 1)))
  evaluator = evaluate.Evaluator(model, split, info, 20, teacher=(model, teacher), k=3)
  first, again = evaluator(student), evaluator(student)
  assert first == again
  assert first == evaluate.evaluate(
    model, student, split, info=info, batch_size=20, teacher=(model, teacher), k=3
  )
  fields = ('model', 'split', 'info', 'teacher')  # What it was given; the rest it keeps.
  state = {name: value for name, value in vars(evaluator).items() if name not in fields}
  kept = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array | np.ndarray)]
  assert len(kept) == 2 * 3  # Logits and embedding of each of the 3 batches, no images.
  assert all(x.shape[0] == 20 and x.ndim == 2 for x in kept)
