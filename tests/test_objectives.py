"""The objective assembles the configured terms exactly as the loss functions define them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpe import config as lpe_config
from lpe import losses, objectives


def _features(seed, n=12):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(size=(n, 10)), jnp.float32)
  features = {
    'stage1': jnp.asarray(rng.normal(size=(n, 8, 8, 4)), jnp.float32),
    'stage2': jnp.asarray(rng.normal(size=(n, 4, 4, 6)), jnp.float32),
    'embedding': jnp.asarray(rng.normal(size=(n, 5 + seed)), jnp.float32),
  }
  return logits, features


def _distill(**weights):
  distill = dict(lpe_config.default_config().distill)
  distill.update(weights)
  return distill


def test_each_term_equals_its_loss_function():
  s_logits, s = _features(0)
  t_logits, t = _features(3)
  distill = _distill(
    lp_weight=0.5,
    kd_weight=2.0,
    at_weight=3.0,
    sp_weight=4.0,
    rkd_weight=5.0,
    pkt_weight=6.0,
    fitnet_weight=7.0,
    at_features=('stage1', 'stage2'),
    fitnet_feature='stage2',
  )
  aux = objectives.init_aux_params(distill, jax.random.key(0), s, t)
  terms = objectives.distillation_terms(distill, s_logits, s, t_logits, t, aux)
  assert set(terms) == set(objectives.METHODS)
  e_s, e_t = s['embedding'], t['embedding']
  np.testing.assert_allclose(terms['lp'], losses.locality_preserving_loss(e_s, e_t, k=5).mean())
  np.testing.assert_allclose(
    terms['kd'], losses.kd_loss(s_logits, t_logits, temperature=4.0).mean(), rtol=1e-6
  )
  at = sum(losses.attention_transfer_loss(s[n], t[n]).mean() for n in ('stage1', 'stage2'))
  np.testing.assert_allclose(terms['at'], at, rtol=1e-6)
  s_last, t_last = s['stage2'], t['stage2']
  np.testing.assert_allclose(
    terms['sp'], losses.similarity_preserving_loss(s_last, t_last), rtol=1e-6
  )
  np.testing.assert_allclose(terms['rkd'], losses.rkd_loss(e_s, e_t), rtol=1e-6)
  np.testing.assert_allclose(terms['pkt'], losses.pkt_loss(e_s, e_t), rtol=1e-6)
  reg = losses.FitNetRegressor(features=6)
  hint = reg.apply({'params': aux['fitnet_regressor']}, s['stage2'])
  np.testing.assert_allclose(terms['fitnet'], losses.fitnet_loss(hint, t['stage2']).mean())
  ce = jnp.float32(1.5)
  want = ce + sum(distill[f'{m}_weight'] * terms[m] for m in terms)
  np.testing.assert_allclose(objectives.total_loss(distill, ce, terms), want, rtol=1e-6)


def test_off_terms_are_not_computed_and_need_no_params():
  s_logits, s = _features(0)
  t_logits, t = _features(1)
  distill = _distill()
  assert objectives.active(distill) == ()
  assert objectives.init_aux_params(distill, jax.random.key(0), s, t) == {}
  assert objectives.distillation_terms(distill, s_logits, s, t_logits, t, {}) == {}
  assert objectives.describe(_distill(lp_weight=0.1, kd_weight=1.0)) == 'CE + 0.1 LP + 1 KD'


def test_ce_weight_scales_the_cross_entropy_only():
  """CRD's KD baseline: 0.1 CE + 0.9 KD."""
  distill = _distill(kd_weight=0.9, ce_weight=0.1)
  terms = {'kd': jnp.float32(2.0)}
  np.testing.assert_allclose(objectives.total_loss(distill, jnp.float32(1.5), terms), 1.95)
  assert objectives.describe(distill) == '0.1 CE + 0.9 KD'


def test_fitnet_regressor_gets_gradients():
  s_logits, s = _features(0)
  t_logits, t = _features(1)
  distill = _distill(fitnet_weight=1.0, fitnet_feature='stage1')
  aux = objectives.init_aux_params(distill, jax.random.key(0), s, t)
  grads = jax.grad(
    lambda a: objectives.distillation_terms(distill, s_logits, s, t_logits, t, a)['fitnet']
  )(aux)
  assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize('method', ['sp', 'rkd', 'pkt'])
def test_relational_terms_use_the_global_batch_under_pmap(method):
  """On one device the gathered batch is the batch: values equal the plain call."""
  s_logits, s = _features(0, n=8)
  t_logits, t = _features(2, n=8)
  distill = _distill(**{f'{method}_weight': 1.0})
  plain = objectives.distillation_terms(distill, s_logits, s, t_logits, t, {})[method]
  mapped = jax.pmap(
    lambda sl, sf, tl, tf: objectives.distillation_terms(
      distill, sl, sf, tl, tf, {}, axis_name='d'
    )[method],
    axis_name='d',
  )(*jax.tree.map(lambda x: x[None], (s_logits, s, t_logits, t)))
  np.testing.assert_allclose(mapped[0], plain, rtol=1e-6)
