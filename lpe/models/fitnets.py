"""The paper's students, FitNet-1 to FitNet-4, and FitNets' wide maxout teacher.

Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015), as paper.md describes them: thin,
deep stacks of 3x3 convs in three groups, each group followed by pooling, then a fully connected
layer and softmax. Choices the description leaves open, made here:

- Each conv is followed by BatchNorm and ReLU (`maxout=False`, the default), or, with
  `maxout=True`, produces twice the channels, is batch-normalised, and takes the max over adjacent
  pairs (maxout with k = 2 pieces; BN before the max keeps each piece affine, so the unit is still
  a maxout of affine maps). Convs followed by BN have no bias.
- Groups 1 and 2 end in a 2x2 max pool (stride 2); group 3 ends in a global average pool, which
  gives the embedding (its width is the last conv's) and makes the net input-size agnostic:
  32x32 -> 16 -> 8 -> pooled, 28x28 -> 14 -> 7 -> pooled.
- "A fully connected layer and softmax" is the single linear classifier on the embedding (the
  softmax lives in the loss).

The teacher (`maxout_teacher`): three maxout conv layers of 96, 192 and 192 units (3x3, k = 2,
BatchNorm before the max), each followed by a 2x2 max pool; the 4x4x192 map is flattened into a
500-unit maxout layer with k = 5 pieces (Goodfellow et al.'s CIFAR-10 maxout net uses 5 pieces in
its dense layer), then the linear classifier. Dropout is left out. With 10 classes this is about
8.7M parameters, close to the ~9M FitNets reports; the flatten makes the count input-size
dependent.

Features: `stage{g}` is the output of conv group `g` (1-based, as the paper numbers groups) after
its last activation and before its pool; `embedding` the classifier's input: for the FitNets the
last group's output globally average-pooled, `[n, groups[-1][-1]]`; for the teacher the 500-unit
maxout dense layer over the flattened map (not a pooled vector), `[n, 500]`.
"""

import flax.linen as nn
import jax.numpy as jnp

from lpe.models.base import Model
from lpe.models.initializers import LECUN_NORMAL
from lpe.models.layers import global_avg_pool, max_pool_2x2, maxout
from lpe.models.registry import register

_MAXOUT_CONV_PIECES = 2
_MAXOUT_DENSE_PIECES = 5


class FitNet(Model):
  """A FitNet: groups of 3x3 conv layers, pooled between groups, then a linear classifier.

  `features['embedding']` is the last group's output (after its last ReLU or maxout) averaged
  over space: `[n, groups[-1][-1]]`.

  Attributes:
    num_classes: Number of output classes.
    groups: Conv widths (units) of each group; groups but the last end in a 2x2 max pool, the
      last in a global average pool.
    maxout: Maxout units with 2 pieces instead of ReLU.
    dtype, bn_axis_name, conv_impl: As in `base.Model`.
  """

  groups: tuple[tuple[int, ...], ...]
  maxout: bool = False

  def embed(self, x: jnp.ndarray, train: bool) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    conv, norm = self.layer_defs(train)
    pieces = _MAXOUT_CONV_PIECES if self.maxout else 1
    features = {}
    for g, widths in enumerate(self.groups, start=1):
      for j, width in enumerate(widths):
        x = conv(width * pieces, 3, name=f'group{g}_conv{j}')(x)
        x = norm(name=f'group{g}_bn{j}')(x)
        x = maxout(x, pieces) if self.maxout else nn.relu(x)
      features[f'stage{g}'] = x
      if g < len(self.groups):
        x = max_pool_2x2(x, self.conv_impl)
    return global_avg_pool(x), features


class MaxoutTeacher(Model):
  """FitNets' wide CIFAR-10 maxout teacher: maxout convs 96-192-192, a 500-unit maxout layer.

  `features['embedding']` is not a pooled map: it is the maxout dense layer (`dense_units`
  units, each the max of 5 affine pieces) over the flattened map that the third conv layer's
  max pool leaves, `[n, dense_units]`.

  Attributes:
    num_classes: Number of output classes.
    conv_units: Units of the three maxout conv layers.
    dense_units: Units of the maxout fully connected layer (the embedding width).
    dtype, bn_axis_name, conv_impl: As in `base.Model`.
  """

  conv_units: tuple[int, ...] = (96, 192, 192)
  dense_units: int = 500

  def embed(self, x: jnp.ndarray, train: bool) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    conv, norm = self.layer_defs(train)
    features = {}
    for i, units in enumerate(self.conv_units, start=1):
      x = conv(units * _MAXOUT_CONV_PIECES, 3, name=f'conv{i}')(x)
      x = maxout(norm(name=f'bn{i}')(x), _MAXOUT_CONV_PIECES)
      features[f'stage{i}'] = x
      x = max_pool_2x2(x, self.conv_impl)
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(
      self.dense_units * _MAXOUT_DENSE_PIECES,
      dtype=self.dtype,
      kernel_init=LECUN_NORMAL,
      name='dense',
    )(x)
    return maxout(x, _MAXOUT_DENSE_PIECES), features


@register('fitnet1')
def fitnet1(num_classes: int, **kwargs) -> nn.Module:
  """FitNet-1: 16,16,16 | 32,32,32 | 48,48,64 (paper: about 250K parameters with maxout)."""
  return FitNet(num_classes, groups=((16, 16, 16), (32, 32, 32), (48, 48, 64)), **kwargs)


@register('fitnet2')
def fitnet2(num_classes: int, **kwargs) -> nn.Module:
  """FitNet-2: 16,32,32 | 48,64,80 | 96,96,128 (paper: about 862K)."""
  return FitNet(num_classes, groups=((16, 32, 32), (48, 64, 80), (96, 96, 128)), **kwargs)


@register('fitnet3')
def fitnet3(num_classes: int, **kwargs) -> nn.Module:
  """FitNet-3: 32,48,64,64 | 80,80,80,80 | 128,128,128 (paper: about 1.6M)."""
  return FitNet(num_classes, groups=((32, 48, 64, 64), (80, 80, 80, 80), (128, 128, 128)), **kwargs)


@register('fitnet4')
def fitnet4(num_classes: int, **kwargs) -> nn.Module:
  """FitNet-4: 32,32,32,48,48 | 80 x6 | 128 x6 (paper: about 2.5M)."""
  return FitNet(num_classes, groups=((32, 32, 32, 48, 48), (80,) * 6, (128,) * 6), **kwargs)


@register('fitnet_28')
def fitnet_28(num_classes: int, **kwargs) -> nn.Module:
  """A thin, deep FitNet sized for 28x28 images (MNIST, Fashion-MNIST): 8,8 | 16,16 | 32,32,64,
  seven 3x3 convs with BatchNorm and ReLU (about 37K parameters at 10 classes), a 64-wide pooled
  embedding."""
  return FitNet(num_classes, groups=((8, 8), (16, 16), (32, 32, 64)), **kwargs)


def _with_maxout(factory):
  def build(num_classes: int, **kwargs) -> nn.Module:
    return factory(num_classes, maxout=True, **kwargs)

  build.__doc__ = f'{factory.__doc__} Maxout units (2 pieces) instead of ReLU.'
  return build


# The paper's students as it trained them, selectable by name (`--config.model=fitnet4_maxout`).
for _number, _factory in enumerate((fitnet1, fitnet2, fitnet3, fitnet4), start=1):
  register(f'fitnet{_number}_maxout')(_with_maxout(_factory))


@register('maxout_teacher')
def maxout_teacher(num_classes: int, **kwargs) -> nn.Module:
  """FitNets' wide maxout teacher: 96-192-192 maxout convs, 500-unit maxout layer (~9M)."""
  return MaxoutTeacher(num_classes, **kwargs)
