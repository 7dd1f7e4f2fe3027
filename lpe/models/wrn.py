"""Wide ResNets of CRD/RepDistiller: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

Pre-activation blocks (BN-ReLU-conv). As in RepDistiller's `wrn.py`, a block that changes width
applies its first BN-ReLU to the input and feeds the *activated* input to the 1x1 projection
shortcut; a block that keeps the width adds the raw input. Dropout is omitted (RepDistiller's
`dropRate` is 0 for these four nets).

Features: `stage0` is the stem conv output, `stage{i}` the raw output of residual stage `i` (the
residual sum, before any BN-ReLU: the net is pre-activation, so this is what the next stage
receives; RepDistiller's `preact=False` features), `embedding` the last stage's output after the
final BN-ReLU, globally average-pooled, `[n, 64 * widen_factor]`.
"""

import flax.linen as nn
import jax.numpy as jnp

from lpe.models.base import Block, Model
from lpe.models.layers import global_avg_pool
from lpe.models.registry import register


class WideBasicBlock(Block):
  """BN-ReLU-conv3x3 (strided) then BN-ReLU-conv3x3, plus an identity or 1x1 shortcut.

  Attributes:
    features: Output channels, `width * widen_factor` of the stage.
    strides: Stride of the first conv and of the 1x1 shortcut, which reads the activated input.
    conv, norm: As in `base.Block`.
  """

  features: int
  strides: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    activated = nn.relu(self.norm(name='bn1')(x))
    out = self.conv(self.features, 3, self.strides, name='conv1')(activated)
    out = nn.relu(self.norm(name='bn2')(out))
    out = self.conv(self.features, 3, name='conv2')(out)
    if x.shape[-1] == self.features:
      shortcut = x
    else:
      shortcut = self.conv(self.features, 1, self.strides, name='shortcut_conv')(activated)
    return shortcut + out


class WideResNet(Model):
  """WRN-depth-k for CIFAR: a 3x3 stem of 16, three stages of (depth - 4) / 6 blocks.

  `features['embedding']` is the last stage's output after the final BN-ReLU, averaged over
  space: `[n, 64 * widen_factor]`.

  Attributes:
    num_classes: Number of output classes.
    depth: Total depth, 6n + 4.
    widen_factor: Width multiplier k; the stages have 16k, 32k, 64k channels.
    dtype, bn_axis_name, conv_impl: As in `base.Model`.
  """

  classifier_name = 'fc'

  depth: int
  widen_factor: int

  def embed(self, x: jnp.ndarray, train: bool) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    if (self.depth - 4) % 6:
      raise ValueError(f'WideResNet depth must be 6n + 4, got {self.depth}.')
    n = (self.depth - 4) // 6
    conv, norm = self.layer_defs(train)
    x = conv(16, 3, name='conv1')(x)
    features = {'stage0': x}
    for i, width in enumerate((16, 32, 64)):
      for j in range(n):
        strides = 2 if i > 0 and j == 0 else 1
        x = WideBasicBlock(
          width * self.widen_factor, strides, conv=conv, norm=norm, name=f'block{i + 1}_{j}'
        )(x)
      features[f'stage{i + 1}'] = x
    x = nn.relu(norm(name='bn1')(x))
    return global_avg_pool(x), features


@register('wrn_16_1')
def wrn_16_1(num_classes: int, **kwargs) -> nn.Module:
  """WRN-16-1: two blocks per stage, widths 16-32-64."""
  return WideResNet(num_classes, depth=16, widen_factor=1, **kwargs)


@register('wrn_16_2')
def wrn_16_2(num_classes: int, **kwargs) -> nn.Module:
  """WRN-16-2: two blocks per stage, widths 32-64-128 (the CRD student)."""
  return WideResNet(num_classes, depth=16, widen_factor=2, **kwargs)


@register('wrn_40_1')
def wrn_40_1(num_classes: int, **kwargs) -> nn.Module:
  """WRN-40-1: six blocks per stage, widths 16-32-64."""
  return WideResNet(num_classes, depth=40, widen_factor=1, **kwargs)


@register('wrn_40_2')
def wrn_40_2(num_classes: int, **kwargs) -> nn.Module:
  """WRN-40-2: six blocks per stage, widths 32-64-128 (the CRD teacher)."""
  return WideResNet(num_classes, depth=40, widen_factor=2, **kwargs)
