"""CIFAR MobileNetV2 of CRD/RepDistiller (`mobile_half`: expansion 6, width multiplier 0.5).

Differences from the ImageNet MobileNetV2 that RepDistiller's `mobilenetv2.py` makes, kept here:
ReLU instead of ReLU6; the expansion 1x1 conv is present even in the first block (expansion 1);
the stem is a stride-2 3x3 conv of `int(32 * width)` channels; the last 1x1 conv keeps 1280
channels for widths <= 1; the classifier is a single linear layer.

Features (RepDistiller's `is_feat=True` list): `stage0` the stem output, `stage1` to `stage4` the
outputs of inverted-residual groups 1, 2, 4 and 6 (0-based; resolutions 16, 8, 4 and 2 for a 32x32
input; these outputs are linear, there is no ReLU after a projection), `embedding` the output of
the last 1x1 conv + BN + ReLU globally average-pooled, `[n, 1280]`.
"""

import flax.linen as nn
import jax.numpy as jnp

from lpe.models.base import Block, Model
from lpe.models.layers import global_avg_pool
from lpe.models.registry import register

# (expansion t, channels c, repeats n, first stride s), before the width multiplier.
SETTING = (
  (1, 16, 1, 1),
  (6, 24, 2, 1),
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
)
# Groups (0-based) whose outputs RepDistiller exposes as features f1..f4.
FEATURE_GROUPS = (1, 2, 4, 6)


class InvertedResidual(Block):
  """[1x1 expand + BN + act,] 3x3 depthwise (strided) + BN + act, 1x1 linear project + BN.

  RepDistiller's CIFAR block (ReLU, the expansion conv even at expansion 1) by default;
  torchvision's (`relu6=True, expand_at_1=False`) for the ImageNet MobileNetV2.

  Attributes:
    features: Output channels of the linear 1x1 projection.
    strides: Stride of the depthwise conv; the input is added back only at stride 1 and
      unchanged width.
    expansion: Hidden channels per input channel (the 1x1 expansion's factor).
    relu6: ReLU6 (torchvision) instead of ReLU (RepDistiller) after the expansion and depthwise.
    expand_at_1: Whether a block of expansion 1 still has its 1x1 expansion conv (RepDistiller's
      does, torchvision's does not).
    conv, norm: As in `base.Block`.
  """

  features: int
  strides: int
  expansion: int
  relu6: bool = False
  expand_at_1: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    act = nn.relu6 if self.relu6 else nn.relu
    hidden = x.shape[-1] * self.expansion
    out = x
    if self.expansion != 1 or self.expand_at_1:
      out = act(self.norm(name='expand_bn')(self.conv(hidden, 1, name='expand')(out)))
    out = self.conv(hidden, 3, self.strides, groups=hidden, name='depthwise')(out)
    out = act(self.norm(name='depthwise_bn')(out))
    out = self.norm(name='project_bn')(self.conv(self.features, 1, name='project')(out))
    if self.strides == 1 and x.shape[-1] == self.features:
      out = out + x
    return out


class MobileNetV2(Model):
  """RepDistiller's CIFAR MobileNetV2.

  `features['embedding']` is the output of the last 1x1 conv + BN + ReLU (1280 channels for
  `width_mult <= 1`) averaged over space: `[n, 1280]` for the registered net.

  Attributes:
    num_classes: Number of output classes.
    expansion: Expansion ratio T of every group but the first (which has 1).
    width_mult: Channel multiplier of the stem and the inverted-residual groups.
    dtype, bn_axis_name, conv_impl: As in `base.Model`.
  """

  expansion: int = 6
  width_mult: float = 0.5

  def embed(self, x: jnp.ndarray, train: bool) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    conv, norm = self.layer_defs(train)
    x = nn.relu(norm(name='bn1')(conv(int(32 * self.width_mult), 3, 2, name='conv1')(x)))
    features = {'stage0': x}
    for i, (t, c, n, s) in enumerate(SETTING):
      t = t if t == 1 else self.expansion
      for j in range(n):
        x = InvertedResidual(
          int(c * self.width_mult),
          s if j == 0 else 1,
          t,
          conv=conv,
          norm=norm,
          name=f'group{i}_{j}',
        )(x)
      if i in FEATURE_GROUPS:
        features[f'stage{FEATURE_GROUPS.index(i) + 1}'] = x
    last_channels = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
    x = nn.relu(norm(name='bn2')(conv(last_channels, 1, name='conv2')(x)))
    # RepDistiller's AvgPool2d(2, ceil_mode=True) covers the whole 2x2 map of a 32x32 input.
    return global_avg_pool(x), features


@register('MobileNetV2')
def mobilenetv2(num_classes: int, **kwargs) -> nn.Module:
  """RepDistiller's `mobile_half`: expansion 6, width multiplier 0.5, a 1280-wide embedding."""
  return MobileNetV2(num_classes, **kwargs)
