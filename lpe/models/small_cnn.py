"""Small CNNs for 28x28 grey images (MNIST, Fashion-MNIST): the core teacher and student."""

import flax.linen as nn
import jax.numpy as jnp

from lpe.models.base import Model
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
      # Flax's default init and 'SAME' padding, not layers.conv: the core models predate the zoo.
      x = nn.Conv(
        width, (3, 3), dtype=self.dtype, conv_general_dilated=conv_fn, name=f'conv{i + 1}'
      )(x)
      x = nn.relu(x)
      x = max_pool_2x2(x, self.conv_impl)
      features[f'stage{i + 1}'] = x
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.embedding_width, dtype=self.dtype, name='embed')(x))
    return x, features


@register('cnn_teacher')
def cnn_teacher(num_classes: int, **kwargs) -> nn.Module:
  """The core Fashion-MNIST teacher: 64/128 channels, a 256-wide embedding."""
  return SmallCNN(num_classes, widths=(64, 128), embedding_width=256, **kwargs)


@register('cnn_student')
def cnn_student(num_classes: int, **kwargs) -> nn.Module:
  """The core Fashion-MNIST student: 8/16 channels, a 32-wide embedding."""
  return SmallCNN(num_classes, widths=(8, 16), embedding_width=32, **kwargs)
