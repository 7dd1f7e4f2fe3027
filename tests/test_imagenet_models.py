"""Tests of the torchvision-style ImageNet models: exact parameter counts, shapes, train mode.

Counts and shapes come from `jax.eval_shape` (no FLOPs); that the layers compute what torchvision's
do is checked against PyTorch twins in test_from_torch.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpe.models import build, names

# name: (parameters at 1000 classes as torchvision counts them, embedding width, stage widths).
IMAGENET_MODELS = {
  'imagenet_resnet18': (11_689_512, 512, (64, 64, 128, 256, 512)),
  'imagenet_resnet34': (21_797_672, 512, (64, 64, 128, 256, 512)),
  'imagenet_resnet50': (25_557_032, 2048, (64, 256, 512, 1024, 2048)),
  'imagenet_mobilenet_v2': (3_504_872, 1280, (32, 24, 32, 96, 320)),
}
# Side of stage0..stage4 for a 224x224 input (strides 4, 4, 8, 16, 32; MobileNetV2's stem is 2).
STAGE_SIDES = {
  'imagenet_resnet18': (56, 56, 28, 14, 7),
  'imagenet_resnet34': (56, 56, 28, 14, 7),
  'imagenet_resnet50': (56, 56, 28, 14, 7),
  'imagenet_mobilenet_v2': (112, 56, 28, 14, 7),
}


def abstract_init_and_apply(name, num_classes, shape, **kwargs):
  model = build(name, num_classes, **kwargs)

  def init_and_apply():
    images = jnp.zeros(shape)
    variables = model.init(jax.random.key(0), images)
    return variables, model.apply(variables, images)

  return jax.eval_shape(init_and_apply)


def count_params(variables) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables['params']))


@pytest.mark.parametrize('name', sorted(IMAGENET_MODELS))
def test_torchvision_parameter_count_and_feature_shapes(name):
  expected_params, width, stage_widths = IMAGENET_MODELS[name]
  variables, (logits, features) = abstract_init_and_apply(name, 1000, (2, 224, 224, 3))
  assert name in names()
  assert count_params(variables) == expected_params
  assert logits.shape == (2, 1000)
  assert features['embedding'].shape == (2, width)
  stages = [features[f'stage{i}'].shape for i in range(5)]
  assert sorted(features) == ['embedding', 'stage0', 'stage1', 'stage2', 'stage3', 'stage4']
  assert stages == [(2, s, s, c) for s, c in zip(STAGE_SIDES[name], stage_widths, strict=True)]


@pytest.mark.parametrize('name', sorted(IMAGENET_MODELS))
def test_small_images_bfloat16_and_cpu_convs_keep_the_same_parameters(name):
  reference, _ = abstract_init_and_apply(name, 10, (1, 224, 224, 3))
  variables, (logits, features) = abstract_init_and_apply(
    name, 10, (1, 32, 32, 3), dtype=jnp.bfloat16, conv_impl='cpu'
  )
  shapes = lambda tree: jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), tree)
  assert shapes(variables) == shapes(reference)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert logits.shape == (1, 10) and logits.dtype == jnp.bfloat16
  assert features['stage4'].shape[1:3] == (1, 1)


def random_variables(model, images, seed: int = 0):
  """He-normal kernels and random BatchNorm statistics drawn with NumPy (no threefry compile)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    kind = path[-1].key
    if kind == 'kernel':
      std = math.sqrt(2.0 / math.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)
    if kind in ('scale', 'var'):
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
    return jnp.asarray(rng.normal(0.0, 0.1, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_mobilenet_v2_trains_its_statistics_and_drops_out_only_with_a_dropout_rng():
  model = build('imagenet_mobilenet_v2', 10)
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = random_variables(model, images)
  rng = {'dropout': jax.random.key(2)}

  @jax.jit
  def outputs(variables, images):
    train = lambda **kw: model.apply(variables, images, train=True, mutable=['batch_stats'], **kw)
    return (
      model.apply(variables, images),
      model.apply(variables, images, rngs=rng),
      train(),
      train(rngs=rng),
    )

  (logits, _), (logits_rng, _), ((train_logits, feats), updates), ((drop_logits, _), _) = outputs(
    variables, images
  )
  # Evaluation never drops; training drops only when the caller passes a 'dropout' rng.
  np.testing.assert_array_equal(logits, logits_rng)
  classifier = variables['params']['classifier']
  undropped = feats['embedding'] @ classifier['kernel'] + classifier['bias']
  np.testing.assert_allclose(train_logits, undropped, rtol=1e-4, atol=1e-4)
  assert not np.allclose(drop_logits, train_logits, atol=1e-3)
  assert not np.allclose(train_logits, logits, atol=1e-3)  # Batch statistics differ.
  for old, new in zip(
    jax.tree.leaves(variables['batch_stats']), jax.tree.leaves(updates['batch_stats']), strict=True
  ):
    assert not np.allclose(old, new)
    assert np.all(np.isfinite(new))
