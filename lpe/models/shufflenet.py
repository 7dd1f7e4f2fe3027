"""CIFAR ShuffleNets of CRD/RepDistiller: ShuffleV1 (groups 3) and ShuffleV2 (net size 1).

Both use RepDistiller's CIFAR stem, a 1x1 conv of 24 channels + BN + ReLU at full resolution, and
three stages that each halve the resolution; global average pooling (RepDistiller's
`avg_pool2d(out, 4)` over the 4x4 map of a 32x32 input) and one linear layer.

Features: `stage0` the stem output, `stage{i}` the output of stage `i` as the next stage receives
it (after the final ReLU for V1; after the concatenation and channel shuffle for V2), i.e.
RepDistiller's `preact=False` features; `embedding` the classifier's input `[n, d]`: for V1
the last stage's output, for V2 the output of its final 1x1 conv + BN + ReLU, globally
average-pooled.
"""

import flax.linen as nn
import jax.numpy as jnp

from lpe.models.base import Block, Model
from lpe.models.layers import ModuleDef, channel_shuffle, global_avg_pool
from lpe.models.registry import register


class ShuffleV1Unit(Block):
  """ShuffleNet v1 bottleneck: grouped 1x1, shuffle, 3x3 depthwise, grouped 1x1.

  A stride-2 unit concatenates its branch with a 3x3 average-pooled shortcut (so `features` is
  the branch width only); a stride-1 unit adds the identity. The first grouped 1x1 of the net
  (input of 24 channels) is dense, as in the paper.

  Attributes:
    features: Output channels of the conv branch (at stride 2 the pooled input is appended).
    strides: 1 (the input is added) or 2 (the input, average-pooled, is concatenated).
    groups: Groups of the pointwise convs (1 for the first conv of the net's first unit).
    conv, norm: As in `base.Block`.
  """

  features: int
  strides: int
  groups: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    mid = self.features // 4
    g = 1 if x.shape[-1] == 24 else self.groups
    out = self.conv(mid, 1, groups=g, name='conv1')(x)
    out = nn.relu(self.norm(name='bn1')(out))
    out = channel_shuffle(out, g)
    out = self.conv(mid, 3, self.strides, groups=mid, name='conv2')(out)
    out = nn.relu(self.norm(name='bn2')(out))
    out = self.conv(self.features, 1, groups=self.groups, name='conv3')(out)
    out = self.norm(name='bn3')(out)
    if self.strides == 2:
      # PyTorch's AvgPool2d(3, 2, padding=1) counts the zero padding in the mean.
      shortcut = nn.avg_pool(
        x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=True
      )
      return nn.relu(jnp.concatenate([out, shortcut], axis=-1))
    return nn.relu(out + x)


def _stem(x: jnp.ndarray, conv: ModuleDef, norm: ModuleDef) -> jnp.ndarray:
  """RepDistiller's CIFAR stem of both ShuffleNets: 1x1 conv of 24 + BN + ReLU, full resolution."""
  return nn.relu(norm(name='bn1')(conv(24, 1, name='conv1')(x)))


class ShuffleNetV1(Model):
  """ShuffleNet v1 for CIFAR.

  `features['embedding']` is the last stage's output (after its final ReLU) averaged over space:
  `[n, stage_widths[-1]]`, `[n, 960]` for the registered net.

  Attributes:
    num_classes: Number of output classes.
    stage_widths: Output channels of the three stages.
    stage_sizes: Units per stage; the first unit of each is strided.
    groups: Groups of the pointwise convs.
    dtype, bn_axis_name, conv_impl: As in `base.Model`.
  """

  classifier_name = 'linear'

  stage_widths: tuple[int, ...] = (240, 480, 960)
  stage_sizes: tuple[int, ...] = (4, 8, 4)
  groups: int = 3

  def embed(self, x: jnp.ndarray, train: bool) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    conv, norm = self.layer_defs(train)
    x = _stem(x, conv, norm)
    features = {'stage0': x}
    for i, (width, size) in enumerate(zip(self.stage_widths, self.stage_sizes, strict=True)):
      for j in range(size):
        # The strided unit's branch supplies only what the pooled shortcut does not.
        branch = width - x.shape[-1] if j == 0 else width
        x = ShuffleV1Unit(
          branch,
          2 if j == 0 else 1,
          self.groups,
          conv=conv,
          norm=norm,
          name=f'layer{i + 1}_{j}',
        )(x)
      features[f'stage{i + 1}'] = x
    return global_avg_pool(x), features


class ShuffleV2Unit(Block):
  """ShuffleNet v2 basic unit: split channels in half, transform the second, concat, shuffle.

  Attributes:
    conv, norm: As in `base.Block`.
  """

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1] // 2
    x1, x2 = x[..., :c], x[..., c:]
    out = self.conv(c, 1, name='conv1')(x2)
    out = nn.relu(self.norm(name='bn1')(out))
    out = self.conv(c, 3, groups=c, name='conv2')(out)
    out = self.norm(name='bn2')(out)
    out = self.conv(c, 1, name='conv3')(out)
    out = nn.relu(self.norm(name='bn3')(out))
    return channel_shuffle(jnp.concatenate([x1, out], axis=-1), 2)


class ShuffleV2Down(Block):
  """ShuffleNet v2 down-sampling unit: two strided branches of `features // 2`, concat, shuffle.

  Attributes:
    features: Output channels.
    conv, norm: As in `base.Block`.
  """

  features: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c_in, mid = x.shape[-1], self.features // 2
    left = self.conv(c_in, 3, 2, groups=c_in, name='conv1')(x)
    left = self.norm(name='bn1')(left)
    left = self.conv(mid, 1, name='conv2')(left)
    left = nn.relu(self.norm(name='bn2')(left))
    right = self.conv(mid, 1, name='conv3')(x)
    right = nn.relu(self.norm(name='bn3')(right))
    right = self.conv(mid, 3, 2, groups=mid, name='conv4')(right)
    right = self.norm(name='bn4')(right)
    right = self.conv(mid, 1, name='conv5')(right)
    right = nn.relu(self.norm(name='bn5')(right))
    return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(Model):
  """ShuffleNet v2 for CIFAR.

  `features['embedding']` is the output of the final 1x1 conv + BN + ReLU averaged over space:
  `[n, last_width]`, `[n, 1024]` for the registered net.

  Attributes:
    num_classes: Number of output classes.
    stage_widths: Output channels of the three stages.
    stage_sizes: Basic units per stage, after the stage's down-sampling unit.
    last_width: Channels of the final 1x1 conv (the embedding width).
    dtype, bn_axis_name, conv_impl: As in `base.Model`.
  """

  classifier_name = 'linear'

  stage_widths: tuple[int, ...] = (116, 232, 464)
  stage_sizes: tuple[int, ...] = (3, 7, 3)
  last_width: int = 1024

  def embed(self, x: jnp.ndarray, train: bool) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    conv, norm = self.layer_defs(train)
    x = _stem(x, conv, norm)
    features = {'stage0': x}
    for i, (width, size) in enumerate(zip(self.stage_widths, self.stage_sizes, strict=True)):
      x = ShuffleV2Down(width, conv=conv, norm=norm, name=f'layer{i + 1}_down')(x)
      for j in range(size):
        x = ShuffleV2Unit(conv=conv, norm=norm, name=f'layer{i + 1}_{j}')(x)
      features[f'stage{i + 1}'] = x
    x = nn.relu(norm(name='bn2')(conv(self.last_width, 1, name='conv2')(x)))
    return global_avg_pool(x), features


@register('ShuffleV1')
def shuffle_v1(num_classes: int, **kwargs) -> nn.Module:
  """RepDistiller's ShuffleV1: groups 3, stages 240-480-960 of 4-8-4 units."""
  return ShuffleNetV1(num_classes, **kwargs)


@register('ShuffleV2')
def shuffle_v2(num_classes: int, **kwargs) -> nn.Module:
  """RepDistiller's ShuffleV2 (net size 1): stages 116-232-464 of 3-7-3 units, 1024 last conv."""
  return ShuffleNetV2(num_classes, **kwargs)
