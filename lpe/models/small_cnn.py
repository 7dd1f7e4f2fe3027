"""Small CNNs for 28x28 grey images (MNIST, Fashion-MNIST): the core teacher and students, and a
BatchNorm teacher for the Fashion-MNIST study.

All of them name their features alike: `stage1` is the map after the first 2x2 max pool (14x14 for
a 28x28 input) and `stage2` after the second (7x7), so the feature-based baselines (FitNet, AT,
SP) pair a student's and a teacher's maps of the same size by name.
"""

import flax.linen as nn
import jax.numpy as jnp

from lpe.models.base import Model
from lpe.models.initializers import LECUN_NORMAL
from lpe.models.layers import conv_general_dilated_fn, max_pool_2x2
from lpe.models.registry import register


class SmallCNN(Model):
  """Two 3x3 conv + max-pool stages, a dense embedding layer and a linear classifier.

  `features['embedding']` is not a pooled map: it is a ReLU dense layer of `embedding_width`
  units over the flattened output of the second stage, `[n, embedding_width]`.

  Attributes:
    num_classes: Number of output classes.
    widths: Channels of the two convolution stages.
    embedding_width: Width of the pre-logit embedding (`features['embedding']`).
    dtype, conv_impl: As in `base.Model`; `bn_axis_name` is accepted and unused (no BatchNorm).
  """

  classifier_name = 'head'

  widths: tuple[int, int] = (8, 16)
  embedding_width: int = 32

  def embed(self, x: jnp.ndarray, train: bool) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    del train  # No dropout or BatchNorm: the same function in both modes.
    features = {}
    conv_fn = conv_general_dilated_fn(self.conv_impl)
    for i, width in enumerate(self.widths):
      # Flax's default init (LeCun normal) and 'SAME' padding, not layers.conv: the core models
      # predate the zoo.
      x = nn.Conv(
        width,
        (3, 3),
        dtype=self.dtype,
        kernel_init=LECUN_NORMAL,
        conv_general_dilated=conv_fn,
        name=f'conv{i + 1}',
      )(x)
      x = nn.relu(x)
      x = max_pool_2x2(x, self.conv_impl)
      features[f'stage{i + 1}'] = x
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(
      nn.Dense(self.embedding_width, dtype=self.dtype, kernel_init=LECUN_NORMAL, name='embed')(x)
    )
    return x, features


class BatchNormCNN(Model):
  """Three stages of 3x3 conv + BatchNorm + ReLU layers (VGG-style), a dense embedding, linear.

  Stages 1 and 2 end in a 2x2 max pool; stage 3 keeps the resolution. `features['embedding']` is
  a ReLU dense layer of `embedding_width` units over the flattened output of stage 3,
  `[n, embedding_width]`.

  Attributes:
    num_classes: Number of output classes.
    widths: Channels of each stage.
    convs_per_stage: 3x3 conv + BN + ReLU layers in each stage.
    embedding_width: Width of the pre-logit embedding.
    dtype, bn_axis_name, conv_impl: As in `base.Model`.
  """

  classifier_name = 'head'

  widths: tuple[int, ...] = (32, 64, 128)
  convs_per_stage: int = 2
  embedding_width: int = 256

  def embed(self, x: jnp.ndarray, train: bool) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    conv, norm = self.layer_defs(train)
    features = {}
    for i, width in enumerate(self.widths):
      for j in range(self.convs_per_stage):
        x = nn.relu(norm(name=f'bn{i + 1}_{j}')(conv(width, 3, name=f'conv{i + 1}_{j}')(x)))
      if i < 2:
        x = max_pool_2x2(x, self.conv_impl)
      features[f'stage{i + 1}'] = x
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(
      nn.Dense(self.embedding_width, dtype=self.dtype, kernel_init=LECUN_NORMAL, name='embed')(x)
    )
    return x, features


@register('cnn_teacher')
def cnn_teacher(num_classes: int, **kwargs) -> nn.Module:
  """The core Fashion-MNIST teacher: 64/128 channels, a 256-wide embedding."""
  return SmallCNN(num_classes, widths=(64, 128), embedding_width=256, **kwargs)


@register('cnn_student')
def cnn_student(num_classes: int, **kwargs) -> nn.Module:
  """The core Fashion-MNIST student: 8/16 channels, a 32-wide embedding."""
  return SmallCNN(num_classes, widths=(8, 16), embedding_width=32, **kwargs)


@register('cnn_tiny')
def cnn_tiny(num_classes: int, **kwargs) -> nn.Module:
  """The thinnest Fashion-MNIST student: 4/8 channels, an 8-wide embedding."""
  return SmallCNN(num_classes, widths=(4, 8), embedding_width=8, **kwargs)


@register('cnn_teacher_bn')
def cnn_teacher_bn(num_classes: int, **kwargs) -> nn.Module:
  """The Fashion-MNIST study's teacher: `BatchNormCNN`, two convs per stage of 32/64/128
  channels, a 256-wide embedding."""
  return BatchNormCNN(num_classes, **kwargs)
