"""Building blocks shared by the model zoo: PyTorch-compatible conv, BatchNorm, pooling, maxout.

The CIFAR architectures are ports of PyTorch definitions (CRD/RepDistiller), so the helpers here
pin down the PyTorch behaviours that Flax does not default to: explicit symmetric padding (so
stride-2 convs give the same shapes and pixel alignment as PyTorch, which 'SAME' does not),
BatchNorm momentum 0.9 / epsilon 1e-5, and average pooling that counts padded zeros.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any
Dtype = Any
# What every zoo model returns: logits `[n, classes]` and named features, always 'embedding'.
ModelOutput = tuple[jnp.ndarray, dict[str, jnp.ndarray]]

# He-normal over fan-out, as RepDistiller initialises its convs (kaiming_normal_(mode='fan_out')
# or normal(0, sqrt(2 / (k * k * out_channels))), which is the same distribution).
CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv(
  features: int,
  kernel_size: int,
  strides: int = 1,
  *,
  groups: int = 1,
  use_bias: bool = False,
  dtype: Dtype = jnp.float32,
  name: str | None = None,
) -> nn.Conv:
  """Returns a square conv with PyTorch's `padding=kernel_size // 2` on every side.

  Args:
    features: Output channels.
    kernel_size: Height and width of the kernel (odd).
    strides: Stride in both spatial dimensions.
    groups: `feature_group_count` (PyTorch's `groups`); equal to the input channels for a
      depthwise conv.
    use_bias: Whether the conv has a bias (PyTorch's `bias=`); most convs here are followed by
      BatchNorm and have none.
    dtype: Computation dtype; the kernel itself stays float32.
    name: Optional submodule name.
  """
  pad = kernel_size // 2
  return nn.Conv(
    features,
    (kernel_size, kernel_size),
    strides=(strides, strides),
    padding=((pad, pad), (pad, pad)),
    feature_group_count=groups,
    use_bias=use_bias,
    dtype=dtype,
    kernel_init=CONV_INIT,
    name=name,
  )


def batch_norm(train: bool, *, dtype: Dtype, axis_name: str | None) -> Callable[..., nn.BatchNorm]:
  """Returns a BatchNorm constructor with PyTorch's defaults (momentum 0.1 there is 0.9 here).

  Args:
    train: Whether to normalise with batch statistics (and update the running averages in the
      mutable `batch_stats` collection) rather than with the running averages.
    dtype: Computation dtype; scale and bias stay float32.
    axis_name: Mapped axis over which batch statistics are averaged (`pmap`/`vmap` axis name),
      or None for per-device statistics.
  """
  return functools.partial(
    nn.BatchNorm,
    use_running_average=not train,
    momentum=0.9,
    epsilon=1e-5,
    dtype=dtype,
    axis_name=axis_name,
  )


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """2x2 max pooling with stride 2, flooring odd sizes like PyTorch's `MaxPool2d(2, 2)`."""
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')


def global_avg_pool(x: jnp.ndarray) -> jnp.ndarray:
  """Averages `[n, h, w, c]` over space to `[n, c]`.

  RepDistiller pools with fixed windows (`AvgPool2d(8)`, `avg_pool2d(out, 4)`) that cover the
  whole map for 32x32 inputs; the global mean is identical there and also works for 28x28.
  """
  return jnp.mean(x, axis=(1, 2))


def channel_shuffle(x: jnp.ndarray, groups: int) -> jnp.ndarray:
  """ShuffleNet's channel shuffle on NHWC: channel `g * (c / groups) + i` moves to `i * groups + g`.

  This is PyTorch's `view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4)` with channels last.
  """
  n, h, w, c = x.shape
  x = x.reshape(n, h, w, groups, c // groups)
  return jnp.swapaxes(x, 3, 4).reshape(n, h, w, c)


def maxout(x: jnp.ndarray, pieces: int) -> jnp.ndarray:
  """Maxout over the last axis: `[..., c * pieces] -> [..., c]`, the max of adjacent pieces.

  Unit `i` is the max of channels `i * pieces` to `i * pieces + pieces - 1` (pylearn2's grouping).
  """
  *lead, c = x.shape
  if c % pieces:
    raise ValueError(f'maxout needs channels ({c}) divisible by pieces ({pieces}).')
  return jnp.max(x.reshape(*lead, c // pieces, pieces), axis=-1)
