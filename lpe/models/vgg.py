"""VGG with BatchNorm for CIFAR, as in CRD/RepDistiller: vgg8, vgg11, vgg13, vgg16, vgg19.

RepDistiller's `vgg.py` with `batch_norm=True` (its `model_dict` maps `vgg8` to `vgg8_bn` and so
on): five blocks of 3x3 convs *with bias*, each followed by BN and ReLU; 2x2 max pools after
blocks 0, 1 and 2 (after block 3 too, but only for 64x64 inputs); a global average pool and a
single 512 -> classes linear layer (the ImageNet VGG's fully connected layers are removed).

Features: `stage{i}` is the output of block `i` after its ReLU and before its pool
(RepDistiller's `preact=False` features), `embedding` the last block's output globally
average-pooled, `[n, 512]`.
"""

import flax.linen as nn
import jax.numpy as jnp

from lpe.models.base import Model
from lpe.models.layers import global_avg_pool, max_pool_2x2
from lpe.models.registry import register

_CONFIGS = {
  8: ((64,), (128,), (256,), (512,), (512,)),
  11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
  13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
  16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
  19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(Model):
  """CIFAR VGG-BN.

  `features['embedding']` is the output of the fifth block (after its ReLU; it is never pooled
  by a max pool) averaged over space: `[n, 512]`.

  Attributes:
    num_classes: Number of output classes.
    blocks: Conv widths of each of the five blocks.
    dtype, bn_axis_name, conv_impl: As in `base.Model`.
  """

  blocks: tuple[tuple[int, ...], ...]

  def embed(self, x: jnp.ndarray, train: bool) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    conv, norm = self.layer_defs(train)
    # RepDistiller pools after block 3 only for 64x64 inputs (keeping a 4x4 map for block 4).
    pool_after = {0, 1, 2, 3} if x.shape[1] == 64 else {0, 1, 2}
    features = {}
    for i, widths in enumerate(self.blocks):
      for j, width in enumerate(widths):
        x = conv(width, 3, use_bias=True, name=f'block{i}_conv{j}')(x)
        x = nn.relu(norm(name=f'block{i}_bn{j}')(x))
      features[f'stage{i}'] = x
      if i in pool_after:
        x = max_pool_2x2(x, self.conv_impl)
    return global_avg_pool(x), features


def _vgg(depth: int, num_classes: int, **kwargs) -> VGG:
  return VGG(num_classes, blocks=_CONFIGS[depth], **kwargs)


@register('vgg8')
def vgg8(num_classes: int, **kwargs) -> nn.Module:
  """VGG-8-BN (RepDistiller config 'S'): one conv per block, widths 64-128-256-512-512."""
  return _vgg(8, num_classes, **kwargs)


@register('vgg11')
def vgg11(num_classes: int, **kwargs) -> nn.Module:
  """VGG-11-BN (config 'A')."""
  return _vgg(11, num_classes, **kwargs)


@register('vgg13')
def vgg13(num_classes: int, **kwargs) -> nn.Module:
  """VGG-13-BN (config 'B'), the CRD teacher of vgg8."""
  return _vgg(13, num_classes, **kwargs)


@register('vgg16')
def vgg16(num_classes: int, **kwargs) -> nn.Module:
  """VGG-16-BN (config 'D')."""
  return _vgg(16, num_classes, **kwargs)


@register('vgg19')
def vgg19(num_classes: int, **kwargs) -> nn.Module:
  """VGG-19-BN (config 'E')."""
  return _vgg(19, num_classes, **kwargs)
