"""Small CNNs for 28x28 grey images (MNIST, Fashion-MNIST): the core teacher and student."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lpe.models.layers import conv_general_dilated_fn
from lpe.models.registry import register


class SmallCNN(nn.Module):
  """Two 3x3 conv + max-pool stages, a dense embedding layer and a linear classifier.

  Attributes:
    num_classes: Number of output classes.
    widths: Channels of the two convolution stages.
    embedding_width: Width of the pre-logit embedding (`features['embedding']`).
    dtype: Computation dtype (parameters stay float32).
    conv_impl: How the convs compute, one of `layers.CONV_IMPLS` (same parameters either way).
  """

  num_classes: int
  widths: tuple[int, int] = (8, 16)
  embedding_width: int = 32
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None  # Unused (no BatchNorm); accepted like every lpe model.
  conv_impl: str = 'xla'

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False):
    del train  # No dropout or BatchNorm: the same function in both modes.
    features = {}
    x = x.astype(self.dtype)
    conv_fn = conv_general_dilated_fn(self.conv_impl)
    for i, width in enumerate(self.widths):
      # Flax's default init and 'SAME' padding, not layers.conv: the core models predate the zoo.
      x = nn.Conv(
        width, (3, 3), dtype=self.dtype, conv_general_dilated=conv_fn, name=f'conv{i + 1}'
      )(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
      features[f'stage{i + 1}'] = x
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.embedding_width, dtype=self.dtype, name='embed')(x))
    features['embedding'] = x
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return logits, features


@register('cnn_teacher')
def cnn_teacher(num_classes: int, **kwargs) -> nn.Module:
  """The core Fashion-MNIST teacher: 64/128 channels, a 256-wide embedding."""
  return SmallCNN(num_classes, widths=(64, 128), embedding_width=256, **kwargs)


@register('cnn_student')
def cnn_student(num_classes: int, **kwargs) -> nn.Module:
  """The core Fashion-MNIST student: 8/16 channels, a 32-wide embedding."""
  return SmallCNN(num_classes, widths=(8, 16), embedding_width=32, **kwargs)
