"""Tests of `conv_impl`: 'cpu' convs equal lax's ('xla') in value, gradient and parameters.

'cpu' runs the same convolutions and changes only which buffer the weight gradient reads (see
`layers.conv_general_dilated_cpu`), so values and gradients agree to float32 rounding (in practice
exactly, except convs of one-channel inputs, whose forward 'cpu' computes as a sum of taps) and
the parameter trees are the same, checkpoints included.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpe.models import build
from lpe.models.layers import (
  CONV_IMPLS,
  AffineBatchNorm,
  batch_norm,
  conv,
  conv_general_dilated_fn,
  max_pool_2x2,
)

# (input [n, h, w, c], features, kernel, stride, groups, bias): every conv shape the zoo uses,
# on odd sizes; groups > 1 are ShuffleNet's grouped 1x1 and the depthwise 3x3 convs.
CONV_CASES = [
  ((2, 9, 7, 3), 5, 3, 1, 1, False),
  ((2, 9, 7, 4), 6, 3, 2, 1, False),
  ((3, 8, 5, 6), 4, 1, 1, 1, False),
  ((2, 7, 9, 6), 8, 1, 2, 1, False),
  ((2, 9, 7, 3), 5, 3, 1, 1, True),
  ((2, 9, 7, 4), 6, 3, 2, 1, True),
  ((2, 7, 7, 6), 9, 1, 1, 3, False),
  ((2, 9, 7, 6), 6, 3, 1, 6, False),
  ((2, 9, 7, 6), 6, 3, 2, 6, False),
  ((2, 9, 7, 1), 5, 3, 1, 1, True),  # One input channel: 'cpu' sums the taps itself.
  ((2, 9, 7, 1), 4, 3, 2, 1, False),
]
TOL = dict(rtol=1e-5, atol=1e-5)


def _normal(shape, seed=0):
  # NumPy, not jax.random: each new jax.random shape costs a compile of seconds on a busy CPU.
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _random_variables(module, x, seed=1):
  """Variables of `module` with random values (BatchNorm variances positive), without init."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  leaves, treedef = jax.tree.flatten(shapes)
  values = [0.5 + jnp.abs(_normal(a.shape, seed + i)) for i, a in enumerate(leaves)]
  return jax.tree.unflatten(treedef, values)


def _value_and_grads(module, variables, x):
  """Output, and the gradients of a fixed random projection of it w.r.t. variables and input."""
  weights = _normal(jax.eval_shape(module.apply, variables, x).shape, seed=7)

  def value_and_grads(v, x):
    y, vjp = jax.vjp(module.apply, v, x)
    return y, vjp(weights)

  return jax.jit(value_and_grads)(variables, x)


def _assert_trees_close(a, b, **tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert u.shape == v.shape and u.dtype == v.dtype
    np.testing.assert_allclose(u, v, **tol)


@pytest.mark.parametrize('shape,features,kernel,stride,groups,bias', CONV_CASES)
def test_cpu_conv_equals_lax_conv(shape, features, kernel, stride, groups, bias):
  x = _normal(shape)
  modules = {
    impl: conv(features, kernel, stride, groups=groups, use_bias=bias, conv_impl=impl)
    for impl in CONV_IMPLS
  }
  variables = _random_variables(modules['xla'], x)
  assert jax.eval_shape(modules['cpu'].init, jax.random.key(0), x) == jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables
  )
  y_xla, g_xla = _value_and_grads(modules['xla'], variables, x)
  y_cpu, g_cpu = _value_and_grads(modules['cpu'], variables, x)
  np.testing.assert_allclose(y_cpu, y_xla, **TOL)
  _assert_trees_close(g_cpu, g_xla, **TOL)


def test_cpu_conv_initialises_like_lax_conv():
  """Same module class and initialiser: the same key gives the same initial kernel."""
  x = jnp.zeros((1, 5, 5, 3))
  inits = [conv(4, 3, conv_impl=impl).init(jax.random.key(3), x) for impl in CONV_IMPLS]
  _assert_trees_close(inits[1], inits[0], rtol=0, atol=0)


def test_cpu_conv_equals_lax_conv_with_same_padding():
  """The small CNNs pass `conv_general_dilated` to `nn.Conv` with its default 'SAME' padding."""
  import flax.linen as nn

  x = _normal((2, 7, 7, 2))
  base = nn.Conv(3, (3, 3))
  fast = nn.Conv(3, (3, 3), conv_general_dilated=conv_general_dilated_fn('cpu'))
  variables = _random_variables(base, x)
  y_xla, g_xla = _value_and_grads(base, variables, x)
  y_cpu, g_cpu = _value_and_grads(fast, variables, x)
  np.testing.assert_allclose(y_cpu, y_xla, **TOL)
  _assert_trees_close(g_cpu, g_xla, **TOL)


def test_cpu_conv_keeps_its_fusion_barrier():
  """The speed-up rests on a conditional that XLA must not fold away; 'xla' has none."""
  x = jnp.ones((2, 6, 6, 3))
  texts = {}
  for impl in CONV_IMPLS:
    module = conv(4, 3, conv_impl=impl)
    variables = _random_variables(module, x)
    grad = jax.jit(jax.grad(lambda v, x, m=module: jnp.sum(m.apply(v, x) ** 2)))
    texts[impl] = grad.lower(variables, x).compile().as_text()
  assert 'conditional' in texts['cpu']
  assert 'conditional' not in texts['xla']


@pytest.mark.parametrize('shape', [(3, 8, 6, 4), (2, 7, 9, 3)])
def test_cpu_max_pool_equals_lax_pool_bit_for_bit_ties_included(shape):
  """'cpu' pools elementwise with a custom gradient; lax's gives each window's gradient to its
  first maximum (row-major), and so must 'cpu', also where ReLU makes whole windows tie at 0."""
  x = jax.nn.relu(jnp.round(_normal(shape)))  # Many ties: zeros and repeated small integers.
  g = _normal((shape[0], shape[1] // 2, shape[2] // 2, shape[3]), seed=3)
  out = {}
  for impl in CONV_IMPLS:
    y, vjp = jax.vjp(lambda x, impl=impl: max_pool_2x2(x, impl), x)
    out[impl] = (y, vjp(g)[0])
  assert out['xla'][0].shape == g.shape
  assert np.array_equal(out['cpu'][0], out['xla'][0])
  assert np.array_equal(out['cpu'][1], out['xla'][1])
  assert int(jnp.sum(out['cpu'][1] != 0)) == g.size  # One tap per window takes the gradient.


@pytest.mark.parametrize('train,axis_name', [(True, None), (False, None), (True, 'devices')])
def test_cpu_batch_norm_equals_flax_batch_norm(train, axis_name):
  """Same variables at init; the same output, running averages and gradients up to rounding, on
  activations whose mean is far from zero (where E[x^2] - E[x]^2 loses the most); with an
  `axis_name`, statistics over two vmapped shards, as under pmap."""
  x = 3.0 + 2.0 * _normal((2, 4, 5, 3, 6))  # [shards, n, h, w, c]
  norms = {
    impl: batch_norm(train, dtype=jnp.float32, axis_name=axis_name, conv_impl=impl)()
    for impl in CONV_IMPLS
  }
  assert isinstance(norms['cpu'], AffineBatchNorm)
  assert not isinstance(norms['xla'], AffineBatchNorm)
  inits = {impl: m.init(jax.random.key(0), x[0]) for impl, m in norms.items()}
  assert jax.tree.structure(inits['cpu']) == jax.tree.structure(inits['xla'])
  for u, v in zip(jax.tree.leaves(inits['cpu']), jax.tree.leaves(inits['xla']), strict=True):
    assert u.dtype == v.dtype and np.array_equal(u, v)
  variables = jax.tree.map(lambda a: a + 0.1 * _normal(a.shape, 5), inits['xla'])
  out = {}
  for impl, module in norms.items():

    def loss(params, x, module=module):
      v = {**variables, 'params': params}
      y, new = module.apply(v, x, mutable=['batch_stats']) if train else (module.apply(v, x), {})
      return jnp.sum(jnp.sin(y)), (y, new)

    grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    if axis_name:
      grad_fn = jax.vmap(grad_fn, in_axes=(None, 0), axis_name=axis_name)
      (_, aux), grads = grad_fn(variables['params'], x)
    else:
      (_, aux), grads = grad_fn(variables['params'], x[0])
    out[impl] = (aux, grads)
  _assert_trees_close(out['cpu'], out['xla'], rtol=1e-4, atol=1e-5)


def test_unknown_conv_impl_is_refused():
  with pytest.raises(ValueError, match="conv_impl='im2col' is unknown; use one of xla, cpu"):
    conv_general_dilated_fn('im2col')
  model = build('resnet8', 10, conv_impl='im2col')
  with pytest.raises(ValueError, match='is unknown'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


# Every kind of conv block of the zoo: basic/bottleneck ResNet, pre-activation WRN, VGG (bias),
# depthwise MobileNetV2, grouped ShuffleNets, FitNet maxout, the maxout teacher, the small CNN.
PARAM_TREE_MODELS = [
  ('resnet8', {}, (32, 32, 3)),
  ('ResNet50', {}, (32, 32, 3)),
  ('wrn_16_1', {}, (32, 32, 3)),
  ('vgg8', {}, (32, 32, 3)),
  ('MobileNetV2', {}, (32, 32, 3)),
  ('ShuffleV1', {}, (32, 32, 3)),
  ('ShuffleV2', {}, (32, 32, 3)),
  ('fitnet1', {'maxout': True}, (32, 32, 3)),
  ('maxout_teacher', {}, (32, 32, 3)),
  ('cnn_student', {}, (28, 28, 1)),
]


@pytest.mark.parametrize('name,kwargs,shape', PARAM_TREE_MODELS)
def test_zoo_parameter_trees_do_not_depend_on_conv_impl(name, kwargs, shape):
  x = jnp.zeros((1, *shape))
  trees = {
    impl: jax.eval_shape(build(name, 10, conv_impl=impl, **kwargs).init, jax.random.key(0), x)
    for impl in CONV_IMPLS
  }
  assert trees['cpu'] == trees['xla']  # Names, shapes and dtypes of params and batch stats.


@pytest.mark.parametrize(
  'name,shape', [('resnet8', (32, 32, 3)), ('cnn_student', (28, 28, 1)), ('fitnet1', (28, 28, 1))]
)
def test_zoo_model_same_logits_and_gradients(name, shape):
  """Same variables in, same logits (eval and train mode) and same training gradients out."""
  x = _normal((4, *shape))
  labels = jnp.arange(4) % 10
  models = {impl: build(name, 10, conv_impl=impl) for impl in CONV_IMPLS}
  variables = jax.tree.map(lambda a: 0.3 * a, _random_variables(models['xla'], x))

  def loss(params, model):
    (logits, _), _ = model.apply(
      {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
    )
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

  results = {}
  for impl, model in models.items():
    eval_logits, _ = jax.jit(lambda v, m=model: m.apply(v, x))(variables)
    grads = jax.jit(jax.grad(loss), static_argnums=1)(variables['params'], model)
    results[impl] = (eval_logits, grads)
  np.testing.assert_allclose(results['cpu'][0], results['xla'][0], **TOL)
  _assert_trees_close(results['cpu'][1], results['xla'][1], **TOL)


def test_config_conv_impl_auto_picks_cpu_on_the_cpu_backend_and_bad_values_are_refused(
  small_config,
):
  from lpe import preflight, train

  assert small_config.conv_impl == 'auto'
  assert train.conv_impl(small_config) == ('cpu' if jax.default_backend() == 'cpu' else 'xla')
  small_config.conv_impl = 'xla'
  assert train.conv_impl(small_config) == 'xla'
  small_config.conv_impl = 'im2col'
  with pytest.raises(
    ValueError, match="config.conv_impl='im2col' is unknown; use auto, xla or cpu"
  ):
    preflight.validate(small_config, 1)


def test_training_runs_with_either_conv_impl_end_alike(small_config, tmp_path):
  """Whole runs (2 epochs of the small CNN) with 'xla' and with 'cpu' end with nearly the same
  parameters, and the workdir check lets a run continue with another conv_impl.

  Not bitwise: 'cpu' sums the one-channel first conv's taps itself, and the float32 rounding
  of that sum grows over the steps (a ReLU or max-pool tie that flips changes a gradient), as it
  does between two XLA:CPU settings (benchmarks/xla_cpu_numerics.py). All parameters together
  must differ by under 1% of their norm (independent random vectors of one norm differ by
  about 141% of it).
  """
  from lpe import checkpoint, train
  from lpe import workdir as workdir_lib

  small_config.steps_per_epoch_limit = 4
  # SGD: Adam divides by the gradient's running size, so for a parameter whose gradient is near
  # zero it turns a rounding-sized difference into a step of size lr.
  small_config.optimizer, small_config.learning_rate = 'sgd', 0.05
  ends = {}
  for impl in CONV_IMPLS:
    small_config.conv_impl = impl
    workdir = str(tmp_path / impl)
    train.train_and_evaluate(small_config, workdir)
    ends[impl] = checkpoint.load_variables(workdir)[0]
  assert jax.tree.structure(ends['cpu']) == jax.tree.structure(ends['xla'])
  flat = {k: np.concatenate([np.ravel(a) for a in jax.tree.leaves(v)]) for k, v in ends.items()}
  assert np.linalg.norm(flat['cpu'] - flat['xla']) <= 1e-2 * np.linalg.norm(flat['xla'])
  small_config.conv_impl = 'auto'
  workdir_lib.check_config(small_config, str(tmp_path / 'xla'))  # Resume-safe: no error.
