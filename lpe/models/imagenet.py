"""torchvision's ImageNet architectures: imagenet_resnet18/34/50 and imagenet_mobilenet_v2.

The same layers, shapes and parameter counts as `torchvision.models.resnet18`, `resnet34`,
`resnet50` and `mobilenet_v2` (11,689,512; 21,797,672; 25,557,032 and 3,504,872 parameters at
1000 classes), so that `lpe.models.from_torch` can load torchvision's weights into them and
a student can be trained against such a teacher. Inputs are NHWC images of any size from 32x32 up
(224x224 for ImageNet); every net ends in a global average pool.

ResNets: a 7x7 stride-2 conv (padding 3) + BN + ReLU stem, a 3x3 stride-2 max pool (padding 1),
four stages of 64, 128, 256, 512 base channels (the first keeps the resolution, each later one
halves it), a global average pool and a linear layer. The residual blocks are the CIFAR ResNets'
(`lpe.models.resnet`): post-activation, projection shortcut (1x1 conv + BN) whenever the stride or
the width changes, and the bottleneck's stride on its 3x3 conv (ResNet v1.5, as torchvision).

MobileNetV2: width multiplier 1.0, ReLU6, a 3x3 stride-2 stem of 32, seventeen inverted-residual
blocks in seven groups (the first group, expansion 1, has no expansion conv), a 1x1 conv to 1280,
a global average pool, dropout 0.2 and a linear layer. Dropout acts only when `train=True` *and*
a 'dropout' rng is passed to `apply` (`rngs={'dropout': key}`); lpe's trainer passes none, so
it trains without dropout, and evaluation never drops.

Features: ResNets: `stage0` the stem after the max pool (stride 4), `stage{i}` the output of stage
`i` after its final ReLU (strides 4, 8, 16, 32). MobileNetV2: `stage0` the stem output (stride 2),
`stage1` to `stage4` the output of the last block at strides 4, 8, 16 and 32 (groups 1, 2, 4, 6,
0-based: 24, 32, 96 and 320 channels; projections are linear, so these have no ReLU; the same
groups as the CIFAR MobileNetV2's features). `embedding` is the pooled vector before the
classifier (512, 512, 2048 and 1280 wide).
"""

from typing import Literal

import flax.linen as nn
import jax.numpy as jnp

from lpe.models import mobilenetv2
from lpe.models.base import Model
from lpe.models.layers import global_avg_pool
from lpe.models.registry import register
from lpe.models.resnet import BasicBlock, Bottleneck

# MobileNetV2's (expansion t, channels c, repeats n, first stride s) per group, as torchvision:
# the CIFAR net's table with ImageNet's stride 2 in group 1 (the CIFAR net keeps 32x32 there).
MOBILENET_V2_SETTING = tuple(
  (t, c, n, 2 if i == 1 else s) for i, (t, c, n, s) in enumerate(mobilenetv2.SETTING)
)
# Groups (0-based) whose outputs are the MobileNetV2 features stage1..stage4: the last group at
# each of the strides 4, 8, 16 and 32 (the CIFAR net's feature groups).
_MOBILENET_FEATURE_GROUPS = mobilenetv2.FEATURE_GROUPS


class ImageNetResNet(Model):
  """torchvision's ResNet: 7x7/2 stem, 3x3/2 max pool, four residual stages, pool, linear.

  `features['embedding']` is the last stage's output globally average-pooled, `[n, 512]` for
  basic blocks and `[n, 2048]` for bottlenecks.

  Attributes:
    num_classes: Number of output classes.
    stage_sizes: Blocks in each of the four stages.
    block: 'basic' (two 3x3 convs) or 'bottleneck' (1x1-3x3-1x1, expansion 4).
    dtype, bn_axis_name, conv_impl: As in `base.Model`.
  """

  classifier_name = 'fc'

  stage_sizes: tuple[int, ...]
  block: Literal['basic', 'bottleneck'] = 'basic'

  def embed(self, x: jnp.ndarray, train: bool) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    conv, norm = self.layer_defs(train)
    block_cls = {'basic': BasicBlock, 'bottleneck': Bottleneck}[self.block]
    x = nn.relu(norm(name='bn1')(conv(64, 7, 2, name='conv1')(x)))
    # Padding with -inf, as PyTorch's MaxPool2d(3, 2, padding=1) does.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    features = {'stage0': x}
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = block_cls(64 * 2**i, strides, conv=conv, norm=norm, name=f'layer{i + 1}_{j}')(x)
      features[f'stage{i + 1}'] = x
    return global_avg_pool(x), features


class ImageNetMobileNetV2(Model):
  """torchvision's MobileNetV2 at width multiplier 1.0.

  `features['embedding']` is the output of the last 1x1 conv + BN + ReLU6 globally
  average-pooled, `[n, 1280]` (before the dropout).

  Attributes:
    num_classes: Number of output classes.
    dropout_rate: Dropout before the classifier; active only with `train=True` and a 'dropout'
      rng passed to `apply`.
    dtype, bn_axis_name, conv_impl: As in `base.Model`.
  """

  dropout_rate: float = 0.2

  def embed(self, x: jnp.ndarray, train: bool) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    conv, norm = self.layer_defs(train)
    x = nn.relu6(norm(name='bn1')(conv(32, 3, 2, name='conv1')(x)))
    features = {'stage0': x}
    for i, (t, c, n, s) in enumerate(MOBILENET_V2_SETTING):
      for j in range(n):
        stride = s if j == 0 else 1
        x = mobilenetv2.InvertedResidual(
          c, stride, t, relu6=True, expand_at_1=False, conv=conv, norm=norm, name=f'group{i}_{j}'
        )(x)
      if i in _MOBILENET_FEATURE_GROUPS:
        features[f'stage{_MOBILENET_FEATURE_GROUPS.index(i) + 1}'] = x
    x = nn.relu6(norm(name='bn2')(conv(1280, 1, name='conv2')(x)))
    return global_avg_pool(x), features

  def before_classifier(self, embedding: jnp.ndarray, train: bool) -> jnp.ndarray:
    # The trainer passes no 'dropout' rng; without one, training runs without dropout rather
    # than failing.
    drop = train and self.has_rng('dropout')
    return nn.Dropout(self.dropout_rate, deterministic=not drop)(embedding)


@register('imagenet_resnet18')
def imagenet_resnet18(num_classes: int, **kwargs) -> nn.Module:
  """torchvision's `resnet18`: basic blocks 2-2-2-2; 11,689,512 parameters at 1000 classes."""
  return ImageNetResNet(num_classes, (2, 2, 2, 2), 'basic', **kwargs)


@register('imagenet_resnet34')
def imagenet_resnet34(num_classes: int, **kwargs) -> nn.Module:
  """torchvision's `resnet34`: basic blocks 3-4-6-3; 21,797,672 parameters at 1000 classes."""
  return ImageNetResNet(num_classes, (3, 4, 6, 3), 'basic', **kwargs)


@register('imagenet_resnet50')
def imagenet_resnet50(num_classes: int, **kwargs) -> nn.Module:
  """torchvision's `resnet50` (v1.5): bottlenecks 3-4-6-3; 25,557,032 parameters at 1000 classes."""
  return ImageNetResNet(num_classes, (3, 4, 6, 3), 'bottleneck', **kwargs)


@register('imagenet_mobilenet_v2')
def imagenet_mobilenet_v2(num_classes: int, **kwargs) -> nn.Module:
  """torchvision's `mobilenet_v2` (width 1.0): 3,504,872 parameters at 1000 classes."""
  return ImageNetMobileNetV2(num_classes, **kwargs)
