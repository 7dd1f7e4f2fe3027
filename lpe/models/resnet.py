"""CIFAR ResNets of CRD/RepDistiller: resnet8 ... resnet110, resnet8x4, resnet32x4, ResNet50.

RepDistiller's `resnet.py` (the 6n+2 CIFAR ResNets) and `resnetv2.py` (ResNet50 with a 3x3 stem
and no max-pool) share the same post-activation blocks and projection shortcuts (1x1 conv + BN
whenever the stride or the width changes), so one module covers both.

Features: `stage0` is the stem output, `stage{i}` the output of residual stage `i` after its
final ReLU (RepDistiller's `is_feat=True, preact=False` features), `embedding` the last stage's
output globally average-pooled, `[n, widths[-1] * expansion]` (the classifier's input).
"""

from typing import Literal

import flax.linen as nn
import jax.numpy as jnp

from lpe.models.base import Block, Model
from lpe.models.layers import global_avg_pool
from lpe.models.registry import register


class BasicBlock(Block):
  """Two 3x3 convs with BN; the stride sits on the first conv.

  Attributes:
    features: Output channels.
    strides: Stride of the first conv (and of the projection shortcut).
    conv, norm: As in `base.Block`.
  """

  features: int
  strides: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    out = self.conv(self.features, 3, self.strides, name='conv1')(x)
    out = nn.relu(self.norm(name='bn1')(out))
    out = self.conv(self.features, 3, name='conv2')(out)
    out = self.norm(name='bn2')(out)
    return nn.relu(out + _shortcut(self, x, self.features))


class Bottleneck(Block):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4, each with BN.

  Attributes:
    features: Width of the 1x1 reduction; the block outputs `4 * features` channels.
    strides: Stride of the 3x3 conv (and of the projection shortcut).
    conv, norm: As in `base.Block`.
  """

  features: int
  strides: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    out = self.conv(self.features, 1, name='conv1')(x)
    out = nn.relu(self.norm(name='bn1')(out))
    out = self.conv(self.features, 3, self.strides, name='conv2')(out)
    out = nn.relu(self.norm(name='bn2')(out))
    out = self.conv(self.features * 4, 1, name='conv3')(out)
    out = self.norm(name='bn3')(out)
    return nn.relu(out + _shortcut(self, x, self.features * 4))


def _shortcut(block: BasicBlock | Bottleneck, x: jnp.ndarray, out_features: int) -> jnp.ndarray:
  """Identity, or a strided 1x1 conv + BN when the block changes resolution or width."""
  if block.strides == 1 and x.shape[-1] == out_features:
    return x
  x = block.conv(out_features, 1, block.strides, name='shortcut_conv')(x)
  return block.norm(name='shortcut_bn')(x)


class ResNet(Model):
  """A CIFAR ResNet: 3x3 stem conv + BN + ReLU, residual stages, global average pool, linear.

  `features['embedding']` is the output of the last stage (after its final ReLU) averaged over
  space, `[n, widths[-1]]` for basic blocks and `[n, 4 * widths[-1]]` for bottlenecks.

  Attributes:
    num_classes: Number of output classes.
    stage_sizes: Blocks per stage; the first stage keeps the resolution, each later one halves it.
    widths: Stem width followed by the base width of each stage (the block output is
      `width * expansion`).
    block: 'basic' (two 3x3 convs) or 'bottleneck' (1x1-3x3-1x1, expansion 4).
    dtype, bn_axis_name, conv_impl: As in `base.Model`.
  """

  classifier_name = 'fc'

  stage_sizes: tuple[int, ...]
  widths: tuple[int, ...]
  block: Literal['basic', 'bottleneck'] = 'basic'

  def embed(self, x: jnp.ndarray, train: bool) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    conv, norm = self.layer_defs(train)
    block_cls = {'basic': BasicBlock, 'bottleneck': Bottleneck}[self.block]
    x = nn.relu(norm(name='bn1')(conv(self.widths[0], 3, name='conv1')(x)))
    features = {'stage0': x}
    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths[1:], strict=True)):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = block_cls(width, strides, conv=conv, norm=norm, name=f'layer{i + 1}_{j}')(x)
      features[f'stage{i + 1}'] = x
    return global_avg_pool(x), features


def _cifar_resnet(depth: int, widths: tuple[int, ...], num_classes: int, **kwargs) -> ResNet:
  """RepDistiller's `ResNet(depth, num_filters, 'basicblock')`: 3 stages of (depth - 2) / 6."""
  n = (depth - 2) // 6
  return ResNet(num_classes, stage_sizes=(n, n, n), widths=widths, block='basic', **kwargs)


_THIN = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


@register('resnet8')
def resnet8(num_classes: int, **kwargs) -> nn.Module:
  """CIFAR ResNet-8: one basic block per stage, widths 16-32-64 (RepDistiller `resnet8`)."""
  return _cifar_resnet(8, _THIN, num_classes, **kwargs)


@register('resnet14')
def resnet14(num_classes: int, **kwargs) -> nn.Module:
  """CIFAR ResNet-14: two basic blocks per stage, widths 16-32-64."""
  return _cifar_resnet(14, _THIN, num_classes, **kwargs)


@register('resnet20')
def resnet20(num_classes: int, **kwargs) -> nn.Module:
  """CIFAR ResNet-20: three basic blocks per stage, widths 16-32-64."""
  return _cifar_resnet(20, _THIN, num_classes, **kwargs)


@register('resnet32')
def resnet32(num_classes: int, **kwargs) -> nn.Module:
  """CIFAR ResNet-32: five basic blocks per stage, widths 16-32-64."""
  return _cifar_resnet(32, _THIN, num_classes, **kwargs)


@register('resnet44')
def resnet44(num_classes: int, **kwargs) -> nn.Module:
  """CIFAR ResNet-44: seven basic blocks per stage, widths 16-32-64."""
  return _cifar_resnet(44, _THIN, num_classes, **kwargs)


@register('resnet56')
def resnet56(num_classes: int, **kwargs) -> nn.Module:
  """CIFAR ResNet-56: nine basic blocks per stage, widths 16-32-64."""
  return _cifar_resnet(56, _THIN, num_classes, **kwargs)


@register('resnet110')
def resnet110(num_classes: int, **kwargs) -> nn.Module:
  """CIFAR ResNet-110: eighteen basic blocks per stage, widths 16-32-64."""
  return _cifar_resnet(110, _THIN, num_classes, **kwargs)


@register('resnet8x4')
def resnet8x4(num_classes: int, **kwargs) -> nn.Module:
  """CIFAR ResNet-8 four times wider: stem 32, stages 64-128-256 (the CRD student)."""
  return _cifar_resnet(8, _X4, num_classes, **kwargs)


@register('resnet32x4')
def resnet32x4(num_classes: int, **kwargs) -> nn.Module:
  """CIFAR ResNet-32 four times wider: stem 32, stages 64-128-256 (the CRD teacher)."""
  return _cifar_resnet(32, _X4, num_classes, **kwargs)


@register('ResNet50')
def resnet50(num_classes: int, **kwargs) -> nn.Module:
  """RepDistiller's CIFAR ResNet50: 3x3 stem of 64, bottleneck stages 3-4-6-3 at 64-512."""
  return ResNet(
    num_classes,
    stage_sizes=(3, 4, 6, 3),
    widths=(64, 64, 128, 256, 512),
    block='bottleneck',
    **kwargs,
  )
