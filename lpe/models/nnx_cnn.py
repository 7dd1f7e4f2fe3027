"""NNX twins of the Fashion-MNIST CNNs (`small_cnn`): the same networks written with `flax.nnx`.

`nnx_cnn_student` is `cnn_student` and `nnx_cnn_teacher_bn` is `cnn_teacher_bn`, with the same
parameter names and shapes, features and embedding, so weights copy across unchanged (as nested
dicts) and they compute the same function. They are registered through `nnx_adapter.register_nnx`
and trained, checkpointed and exported by the same code as every linen model.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lpe.models.layers import Dtype, ModelOutput, conv_general_dilated_fn, max_pool_2x2
from lpe.models.nnx_adapter import register_nnx


def _conv_fn(conv_impl: str) -> Callable[..., jnp.ndarray]:
  """What `nnx.Conv(conv_general_dilated=...)` takes for `conv_impl` (`layers.CONV_IMPLS`).

  `nnx.Conv` passes lax's `out_sharding` too, which the zoo's CPU conv does not take: it is
  dropped when None (no explicit output sharding), the only value the trainer uses.
  """
  conv_fn = conv_general_dilated_fn(conv_impl)
  if conv_fn is None:
    return jax.lax.conv_general_dilated

  def without_out_sharding(*args, out_sharding=None, **kwargs):
    if out_sharding is not None:
      raise ValueError("conv_impl='cpu' takes no out_sharding; use conv_impl='xla'.")
    return conv_fn(*args, **kwargs)

  return without_out_sharding


class NNXSmallCNN(nnx.Module):
  """`small_cnn.SmallCNN` in NNX: two 3x3 conv (SAME) + ReLU + 2x2 max-pool stages, a ReLU dense
  embedding of `embedding_width` units over the flattened map, a linear classifier `head`.

  Features: `stage1`, `stage2` (after each pool) and `embedding` `[n, embedding_width]`.
  `bn_axis_name` is accepted and unused (no BatchNorm). The input is 28x28x`in_channels`.
  """

  def __init__(
    self,
    num_classes: int,
    *,
    rngs: nnx.Rngs,
    widths: tuple[int, int] = (8, 16),
    embedding_width: int = 32,
    in_channels: int = 1,
    image_size: int = 28,
    dtype: Dtype = jnp.float32,
    bn_axis_name: str | None = None,
    conv_impl: str = 'xla',
  ):
    del bn_axis_name
    self.dtype, self.conv_impl = dtype, conv_impl
    conv_fn = _conv_fn(conv_impl)
    channels = in_channels
    for i, width in enumerate(widths):
      conv = nnx.Conv(channels, width, (3, 3), dtype=dtype, conv_general_dilated=conv_fn, rngs=rngs)
      setattr(self, f'conv{i + 1}', conv)
      channels = width
    self.num_stages = len(widths)
    flat = (image_size // 2 ** len(widths)) ** 2 * channels
    self.embed = nnx.Linear(flat, embedding_width, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(embedding_width, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jnp.ndarray, train: bool = False) -> ModelOutput:
    del train  # No dropout or BatchNorm.
    x = x.astype(self.dtype)
    features = {}
    for i in range(self.num_stages):
      x = max_pool_2x2(nnx.relu(getattr(self, f'conv{i + 1}')(x)), self.conv_impl)
      features[f'stage{i + 1}'] = x
    embedding = nnx.relu(self.embed(x.reshape(x.shape[0], -1)))
    features['embedding'] = embedding
    return self.head(embedding), features


class NNXBatchNormCNN(nnx.Module):
  """`small_cnn.BatchNormCNN` in NNX: stages of 3x3 conv (no bias, padding 1) + BatchNorm + ReLU,
  2x2 max pools after stages 1 and 2, a ReLU dense embedding and a linear classifier `head`.

  BatchNorm has PyTorch's defaults (momentum 0.9 here, epsilon 1e-5) and averages its batch
  statistics over `bn_axis_name` when set. Features: `stage1..3` and `embedding`.
  """

  def __init__(
    self,
    num_classes: int,
    *,
    rngs: nnx.Rngs,
    widths: tuple[int, ...] = (32, 64, 128),
    convs_per_stage: int = 2,
    embedding_width: int = 256,
    in_channels: int = 1,
    image_size: int = 28,
    dtype: Dtype = jnp.float32,
    bn_axis_name: str | None = None,
    conv_impl: str = 'xla',
  ):
    self.dtype, self.conv_impl = dtype, conv_impl
    self.widths, self.convs_per_stage = tuple(widths), convs_per_stage
    conv_fn = _conv_fn(conv_impl)
    channels = in_channels
    for i, width in enumerate(widths):
      for j in range(convs_per_stage):
        conv = nnx.Conv(
          channels,
          width,
          (3, 3),
          padding=((1, 1), (1, 1)),
          use_bias=False,
          dtype=dtype,
          conv_general_dilated=conv_fn,
          rngs=rngs,
        )
        norm = nnx.BatchNorm(
          width, momentum=0.9, epsilon=1e-5, dtype=dtype, axis_name=bn_axis_name, rngs=rngs
        )
        setattr(self, f'conv{i + 1}_{j}', conv)
        setattr(self, f'bn{i + 1}_{j}', norm)
        channels = width
    size = image_size // 4
    self.embed = nnx.Linear(size * size * channels, embedding_width, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(embedding_width, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jnp.ndarray, train: bool = False) -> ModelOutput:
    x = x.astype(self.dtype)
    features = {}
    for i in range(len(self.widths)):
      for j in range(self.convs_per_stage):
        x = getattr(self, f'conv{i + 1}_{j}')(x)
        x = nnx.relu(getattr(self, f'bn{i + 1}_{j}')(x, use_running_average=not train))
      if i < 2:
        x = max_pool_2x2(x, self.conv_impl)
      features[f'stage{i + 1}'] = x
    embedding = nnx.relu(self.embed(x.reshape(x.shape[0], -1)))
    features['embedding'] = embedding
    return self.head(embedding), features


@register_nnx('nnx_cnn_student')
class NNXCNNStudent(NNXSmallCNN):
  """`cnn_student` in NNX: 8/16 channels, a 32-wide embedding."""


@register_nnx('nnx_cnn_teacher_bn')
class NNXCNNTeacherBN(NNXBatchNormCNN):
  """`cnn_teacher_bn` in NNX: two convs per stage of 32/64/128 channels, a 256-wide embedding."""
