"""Tests of the model zoo: exact CRD/RepDistiller parameter counts, shapes, real forward passes.

Parameter counts and shapes come from `jax.eval_shape` (no FLOPs, no memory), so every
architecture is checked in well under a second; real forward passes run only for a few small nets
on two images.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpe.models import build, names
from lpe.models.layers import AffineBatchNorm, batch_statistics_over, channel_shuffle, maxout

# name: (parameters with 100 classes, embedding width). Counts are those of the PyTorch
# definitions in RepDistiller's models/ (BN scale and bias included, running statistics not).
CIFAR_MODELS = {
  'resnet8': (83_892, 64),
  'resnet14': (181_108, 64),
  'resnet20': (278_324, 64),
  'resnet32': (472_756, 64),
  'resnet44': (667_188, 64),
  'resnet56': (861_620, 64),
  'resnet110': (1_736_564, 64),
  'resnet8x4': (1_233_540, 256),
  'resnet32x4': (7_433_860, 256),
  'wrn_16_1': (180_916, 64),
  'wrn_16_2': (703_284, 128),
  'wrn_40_1': (569_780, 64),
  'wrn_40_2': (2_255_156, 128),
  'vgg8': (3_965_028, 512),
  'vgg11': (9_277_284, 512),
  'vgg13': (9_462_180, 512),
  'vgg16': (14_774_436, 512),
  'vgg19': (20_086_692, 512),
  'MobileNetV2': (812_836, 1280),
  'ShuffleV1': (949_258, 960),
  'ShuffleV2': (1_355_528, 1024),
  'ResNet50': (23_705_252, 2048),
}

# (name, kwargs): (parameters with 10 classes on 32x32x3, embedding width). Our own choices (see
# lpe/models/fitnets.py), pinned so that a change to them is deliberate; paper.md's
# approximations are compared in docs/models.md.
FITNET_MODELS = {
  ('fitnet1', False): (91_546, 64),
  ('fitnet2', False): (366_938, 128),
  ('fitnet3', False): (688_266, 128),
  ('fitnet4', False): (1_210_026, 128),
  ('fitnet1', True): (182_442, 64),
  ('fitnet2', True): (732_586, 128),
  ('fitnet3', True): (1_375_242, 128),
  ('fitnet4', True): (2_418_762, 128),
}


def abstract_init_and_apply(name, num_classes, shape, **kwargs):
  """Shapes of `(variables, (logits, features))` for one eval-mode call, without computing."""
  model = build(name, num_classes, **kwargs)

  def init_and_apply():
    images = jnp.zeros(shape)
    variables = model.init(jax.random.key(0), images)
    return variables, model.apply(variables, images)

  return jax.eval_shape(init_and_apply)


def count_params(variables) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables['params']))


def check_outputs(logits, features, batch, num_classes, width):
  assert logits.shape == (batch, num_classes)
  assert features['embedding'].shape == (batch, width)
  stage_names = sorted(k for k in features if k != 'embedding')
  assert stage_names and all(k.startswith('stage') for k in stage_names), stage_names
  assert all(f.shape[0] == batch and f.ndim == 4 for k, f in features.items() if k in stage_names)


@pytest.mark.parametrize('name', sorted(CIFAR_MODELS))
def test_cifar_model_matches_repdistiller_count_and_widths(name):
  expected_params, width = CIFAR_MODELS[name]
  variables, (logits, features) = abstract_init_and_apply(name, 100, (1, 32, 32, 3))
  assert count_params(variables) == expected_params
  check_outputs(logits, features, 1, 100, width)


@pytest.mark.parametrize(('name', 'use_maxout'), sorted(FITNET_MODELS))
def test_fitnet_count_and_widths(name, use_maxout):
  expected_params, width = FITNET_MODELS[name, use_maxout]
  variables, (logits, features) = abstract_init_and_apply(
    name, 10, (1, 32, 32, 3), maxout=use_maxout
  )
  assert count_params(variables) == expected_params
  check_outputs(logits, features, 1, 10, width)
  assert sorted(features) == ['embedding', 'stage1', 'stage2', 'stage3']
  # Pools after groups 1 and 2 only: 32 -> 16 -> 8.
  assert [features[f'stage{g}'].shape[1] for g in (1, 2, 3)] == [32, 16, 8]


@pytest.mark.parametrize('number', [1, 2, 3, 4])
def test_maxout_fitnets_are_selectable_by_name(number):
  """`fitnetN_maxout` (what a config can name) is `fitnetN` built with `maxout=True`."""
  by_name, _ = abstract_init_and_apply(f'fitnet{number}_maxout', 10, (1, 32, 32, 3))
  by_kwarg, _ = abstract_init_and_apply(f'fitnet{number}', 10, (1, 32, 32, 3), maxout=True)
  assert (
    count_params(by_name) == count_params(by_kwarg) == FITNET_MODELS[f'fitnet{number}', True][0]
  )
  assert build(f'fitnet{number}_maxout', 10).maxout


def test_maxout_teacher_is_about_nine_million_and_takes_mnist():
  variables, (logits, features) = abstract_init_and_apply('maxout_teacher', 10, (1, 32, 32, 3))
  assert count_params(variables) == 8_689_942
  check_outputs(logits, features, 1, 10, 500)
  _, (logits, features) = abstract_init_and_apply('maxout_teacher', 10, (1, 28, 28, 1))
  check_outputs(logits, features, 1, 10, 500)


@pytest.mark.parametrize('name', ['resnet8', 'wrn_16_2', 'vgg8', 'ShuffleV1', 'MobileNetV2'])
def test_global_pooling_makes_cifar_nets_take_28x28_grey_images(name):
  _, width = CIFAR_MODELS[name]
  _, (logits, features) = abstract_init_and_apply(name, 10, (1, 28, 28, 1))
  check_outputs(logits, features, 1, 10, width)


def test_bfloat16_computation_keeps_float32_params():
  variables, (logits, features) = abstract_init_and_apply(
    'resnet8', 10, (1, 32, 32, 3), dtype=jnp.bfloat16
  )
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert logits.dtype == jnp.bfloat16
  assert features['embedding'].dtype == jnp.bfloat16


FORWARD_CASES = [
  ('resnet8', {}, (2, 32, 32, 3)),
  ('resnet8', {}, (2, 28, 28, 1)),
  ('wrn_16_1', {}, (2, 32, 32, 3)),
  ('fitnet1', {}, (2, 32, 32, 3)),
  ('fitnet1', {}, (2, 28, 28, 1)),
  ('fitnet1', {'maxout': True}, (2, 28, 28, 1)),
  ('ShuffleV2', {}, (2, 32, 32, 3)),
  ('MobileNetV2', {}, (2, 32, 32, 3)),
  ('vgg8', {}, (2, 32, 32, 3)),
]


def random_variables(model, images, seed: int = 0):
  """He-normal kernels, unit BN scales and variances, zero biases and means, drawn with NumPy.

  Real `model.init` under XLA on CPU spends most of its time compiling the threefry random
  number generator for every kernel (half a minute for MobileNetV2 on a busy 2-core machine);
  the forward pass does not care where its weights came from. `init` itself is traced by the
  eval_shape tests above.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    kind = path[-1].key
    if kind == 'kernel':
      fan_in = math.prod(leaf.shape[:-1])
      return jnp.asarray(rng.normal(0.0, math.sqrt(2.0 / fan_in), leaf.shape), leaf.dtype)
    if kind in ('scale', 'var'):
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.zeros(leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize(('name', 'kwargs', 'shape'), FORWARD_CASES)
def test_real_forward_in_both_modes(name, kwargs, shape):
  model = build(name, 10, **kwargs)
  images = jax.random.normal(jax.random.key(1), shape)
  variables = random_variables(model, images)

  @jax.jit
  def eval_and_train(variables, images):
    return (
      model.apply(variables, images, train=False),
      model.apply(variables, images, train=True, mutable=['batch_stats']),
    )

  (logits, features), ((train_logits, train_features), updates) = eval_and_train(variables, images)
  for out, feats in [(logits, features), (train_logits, train_features)]:
    assert out.shape == (2, 10)
    assert 'embedding' in feats and feats['embedding'].shape[0] == 2
    assert all(bool(jnp.all(jnp.isfinite(f))) for f in [out, *feats.values()])
  old_stats = jax.tree.leaves(variables['batch_stats'])
  new_stats = jax.tree.leaves(updates['batch_stats'])
  assert len(new_stats) == len(old_stats) > 0
  assert any(not np.allclose(a, b) for a, b in zip(old_stats, new_stats, strict=True))


def test_bn_axis_name_averages_batch_statistics_over_the_mapped_axis():
  # Two "devices" of one image each, with statistics shared over the axis, must compute exactly
  # what one device does with both images.
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  local = build('resnet8', 10)
  shared = build('resnet8', 10, bn_axis_name='batch')
  variables = random_variables(local, images)

  def train_apply(model, x):
    return model.apply(variables, x, train=True, mutable=['batch_stats'])

  (want_logits, _), want_updates = jax.jit(lambda x: train_apply(local, x))(images)
  per_device = jax.jit(jax.vmap(lambda x: train_apply(shared, x), axis_name='batch'))
  (got_logits, _), got_updates = per_device(images[:, None])
  np.testing.assert_allclose(got_logits[:, 0], want_logits, rtol=1e-4, atol=1e-4)
  for got, want in zip(jax.tree.leaves(got_updates), jax.tree.leaves(want_updates), strict=True):
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[1], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('axis_name', [None, 'batch'])
def test_unbiased_running_variance_is_pytorchs(axis_name):
  # torch.nn.BatchNorm2d: running_var = 0.9 * running_var + 0.1 * var * n / (n - 1), n being the
  # values per channel over every device; the batch is normalised with the biased var.
  x = jax.random.normal(jax.random.key(2), (2, 3, 4, 4, 5)) * 3.0 + 1.0
  bn = AffineBatchNorm(unbiased_var=True, axis_name=axis_name)
  variables = bn.init(jax.random.key(0), x[0])

  def apply(xs):
    return bn.apply(variables, xs, mutable=['batch_stats'])

  if axis_name:
    y, updates = jax.vmap(apply, axis_name=axis_name)(x)
    y, var = y.reshape(-1, 4, 4, 5), updates['batch_stats']['var'][0]
  else:
    y, updates = apply(x.reshape(-1, 4, 4, 5))
    var = updates['batch_stats']['var']
  flat = np.asarray(x, np.float64).reshape(-1, 5)
  want = 0.9 + 0.1 * flat.var(0, ddof=1)
  np.testing.assert_allclose(var, want, rtol=1e-5)
  normalised = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 5), normalised, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
  'make, axis_name, ddof',
  [
    (lambda axis: AffineBatchNorm(unbiased_var=True, axis_name=axis), None, 1),
    (lambda axis: AffineBatchNorm(unbiased_var=True, axis_name=axis), 'batch', 1),
    (lambda axis: AffineBatchNorm(axis_name=axis), 'batch', 0),
    (lambda axis: nn.BatchNorm(False, momentum=0.9, epsilon=1e-5, axis_name=axis), None, 0),
  ],
)
def test_masked_batch_statistics_are_those_of_the_valid_rows(make, axis_name, ddof):
  """Under `batch_statistics_over(rows)` the statistics, the running averages and the valid
  rows' outputs are those of the valid rows alone (on 2 devices holding 3 and 1 of them)."""
  x = jax.random.normal(jax.random.key(3), (2, 3, 4, 4, 5)) * 3.0 + 1.0
  rows = jnp.array([[True, True, True], [True, False, False]])
  bn = make(axis_name)
  variables = bn.init(jax.random.key(0), x[0])

  def apply(xs, rows):
    with batch_statistics_over(rows):
      return bn.apply(variables, xs, mutable=['batch_stats'])

  if axis_name:
    y, updates = jax.vmap(apply, axis_name=axis_name)(x, rows)
    stats = jax.tree.map(lambda v: v[0], updates['batch_stats'])
  else:
    y, updates = apply(x.reshape(-1, 4, 4, 5), rows.reshape(-1))
    stats = updates['batch_stats']
  valid = np.asarray(rows).reshape(-1)
  flat = np.asarray(x, np.float64).reshape(6, -1, 5)[valid].reshape(-1, 5)
  np.testing.assert_allclose(stats['mean'], 0.1 * flat.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * flat.var(0, ddof=ddof), rtol=1e-5)
  normalised = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)
  got = np.asarray(y).reshape(6, -1, 5)[valid].reshape(-1, 5)
  np.testing.assert_allclose(got, normalised, rtol=1e-4, atol=1e-4)


def test_flax_batch_norm_statistics_are_not_masked_over_a_device_axis():
  """flax's BatchNorm averages per-device means: with masks it would weight the devices' rows
  wrongly, so masking it under an axis is refused, naming the way out."""
  bn = nn.BatchNorm(False, axis_name='batch')
  x = jnp.ones((2, 3, 5))
  variables = bn.init(jax.random.key(0), x[0])

  def apply(xs):
    with batch_statistics_over(jnp.ones(3, bool)):
      return bn.apply(variables, xs, mutable=['batch_stats'])

  with pytest.raises(ValueError, match='bn_unbiased_var=True or conv_impl=cpu'):
    jax.vmap(apply, axis_name='batch')(x)


def test_torch_classifier_init_draws_as_torch_linear():
  model = build('resnet8x4', 100, torch_classifier_init=True)
  fc = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']['fc']
  bound = 1 / math.sqrt(256)
  for leaf in (fc['kernel'], fc['bias']):
    assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.95 * bound
  assert abs(float(np.std(fc['kernel'])) - bound / math.sqrt(3)) < 0.002  # 0.036, not 0.062.
  default = build('resnet8x4', 100).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert not np.any(default['params']['fc']['bias'])


def test_channel_shuffle_matches_pytorch_view_permute():
  x = np.arange(2 * 3 * 3 * 12, dtype=np.float32).reshape(2, 3, 3, 12)
  nchw = x.transpose(0, 3, 1, 2)
  n, c, h, w = nchw.shape
  want = nchw.reshape(n, 3, c // 3, h, w).transpose(0, 2, 1, 3, 4).reshape(n, c, h, w)
  np.testing.assert_array_equal(channel_shuffle(jnp.asarray(x), 3), want.transpose(0, 2, 3, 1))


def test_maxout_takes_max_of_adjacent_pieces():
  x = jnp.array([[1.0, 5.0, -2.0, -3.0, 0.0, 7.0]])
  np.testing.assert_array_equal(maxout(x, 2), [[5.0, -2.0, 7.0]])
  np.testing.assert_array_equal(maxout(x, 3), [[5.0, 7.0]])
  with pytest.raises(ValueError, match='divisible'):
    maxout(x, 4)


def test_unknown_name_lists_the_valid_ones():
  with pytest.raises(ValueError, match='nope') as error:
    build('nope', 10)
  assert 'resnet32x4' in str(error.value) and 'fitnet1' in str(error.value)


def test_names_lists_every_model():
  expected = {*CIFAR_MODELS, 'fitnet1', 'fitnet2', 'fitnet3', 'fitnet4', 'maxout_teacher'}
  assert expected <= set(names())


# Conv kernels (a one-channel input, a pointwise and a depthwise conv), dense kernels.
_KERNEL_SHAPES = [(3, 3, 1, 8), (1, 1, 24, 144), (3, 3, 1, 96), (512, 10), (1, 1)]


def test_zoo_initializers_draw_bitwise_what_jax_initializers_draw():
  """The zoo's initializers (flat draws cut to shape, `lpe.models.initializers`) give exactly
  jax's values: He-normal over fan-out (the convs), LeCun normal (flax's default, the dense
  layers) and PyTorch's uniform (a classifier's `torch_classifier_init`), for typed and raw keys."""
  from lpe.models import initializers

  pairs = [
    (initializers.HE_NORMAL_FAN_OUT, nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')),
    (initializers.LECUN_NORMAL, nn.initializers.lecun_normal()),
    (initializers.uniform(0.25), lambda k, s, d: jax.random.uniform(k, s, d, -0.25, 0.25)),
  ]
  cases = [(shape, jnp.float32) for shape in _KERNEL_SHAPES] + [((3, 3, 4, 4), jnp.bfloat16)]
  for key in (jax.random.key(3), jax.random.PRNGKey(4)):
    for ours, theirs in pairs:
      for shape, dtype in cases:
        got, want = ours(key, shape, dtype), theirs(key, shape, dtype)
        assert got.shape == want.shape and got.dtype == want.dtype, shape
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(shape))


def test_zoo_initializers_draw_shapes_as_jax_does_with_another_generator():
  """With a generator whose draws depend on their shape (`rbg`), the draw is of the shape itself:
  still jax's values."""
  from lpe.models import initializers

  key = jax.random.key(0, impl='rbg')
  want = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')(key, (3, 3, 4, 8))
  np.testing.assert_array_equal(initializers.HE_NORMAL_FAN_OUT(key, (3, 3, 4, 8)), want)
