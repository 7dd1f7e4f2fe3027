"""Wide ResNets of CRD/RepDistiller: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

Pre-activation blocks (BN-ReLU-conv). As in RepDistiller's `wrn.py`, a block that changes width
applies its first BN-ReLU to the input and feeds the *activated* input to the 1x1 projection
shortcut; a block that keeps the width adds the raw input. Dropout is omitted (RepDistiller's
`dropRate` is 0 for these four nets).

Features: `stage0` is the stem conv output, `stage{i}` the raw output of residual stage `i` (the
residual sum, before any BN-ReLU: the net is pre-activation, so this is what the next stage
receives; RepDistiller's `preact=False` features), `embedding` the pooled vector after the final
BN-ReLU.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lpe.models.layers import ModelOutput, ModuleDef, batch_norm, conv, global_avg_pool
from lpe.models.registry import register


class WideBasicBlock(nn.Module):
  """BN-ReLU-conv3x3 (strided) then BN-ReLU-conv3x3, plus an identity or 1x1 shortcut."""

  features: int
  strides: int
  norm: ModuleDef
  dtype: Any = jnp.float32
  conv_impl: str = 'xla'

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    activated = nn.relu(self.norm(name='bn1')(x))
    out = conv(
      self.features, 3, self.strides, dtype=self.dtype, conv_impl=self.conv_impl, name='conv1'
    )(activated)
    out = nn.relu(self.norm(name='bn2')(out))
    out = conv(self.features, 3, dtype=self.dtype, conv_impl=self.conv_impl, name='conv2')(out)
    if x.shape[-1] == self.features:
      shortcut = x
    else:
      shortcut = conv(
        self.features,
        1,
        self.strides,
        dtype=self.dtype,
        conv_impl=self.conv_impl,
        name='shortcut_conv',
      )(activated)
    return shortcut + out


class WideResNet(nn.Module):
  """WRN-depth-k for CIFAR: a 3x3 stem of 16, three stages of (depth - 4) / 6 blocks.

  Attributes:
    num_classes: Number of output classes.
    depth: Total depth, 6n + 4.
    widen_factor: Width multiplier k; the stages have 16k, 32k, 64k channels.
    dtype: Computation dtype (parameters stay float32).
    bn_axis_name: Axis name for cross-device BatchNorm statistics, or None.
    conv_impl: How the convs compute, one of `layers.CONV_IMPLS` (same parameters either way).
  """

  num_classes: int
  depth: int
  widen_factor: int
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  conv_impl: str = 'xla'

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> ModelOutput:
    if (self.depth - 4) % 6:
      raise ValueError(f'WideResNet depth must be 6n + 4, got {self.depth}.')
    n = (self.depth - 4) // 6
    norm = batch_norm(train, dtype=self.dtype, axis_name=self.bn_axis_name)
    x = x.astype(self.dtype)
    x = conv(16, 3, dtype=self.dtype, conv_impl=self.conv_impl, name='conv1')(x)
    features = {'stage0': x}
    for i, width in enumerate((16, 32, 64)):
      for j in range(n):
        strides = 2 if i > 0 and j == 0 else 1
        x = WideBasicBlock(
          width * self.widen_factor,
          strides,
          norm,
          self.dtype,
          conv_impl=self.conv_impl,
          name=f'block{i + 1}_{j}',
        )(x)
      features[f'stage{i + 1}'] = x
    x = nn.relu(norm(name='bn1')(x))
    x = global_avg_pool(x)
    features['embedding'] = x
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)
    return logits, features


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
