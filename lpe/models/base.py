"""The bases of every registered model (`Model`) and of the zoo's blocks (`Block`).

Every model the registry builds is called as `model.apply(variables, images, train=bool)` and
returns `(logits, features)`. What all of them share lives in `Model` once: the fields the trainer
sets (`dtype`, `bn_axis_name`, `conv_impl`), casting the images to `dtype`, recording the
pre-logit vector as `features['embedding']`, and the linear classifier on it. A subclass writes
only its network up to that vector, in `embed`, and says in its docstring what the vector is.
`Model.layer_defs` sets up the conv and BatchNorm constructors from those fields; a `Block` takes
them as its `conv` and `norm`, so no block repeats the model's settings.

Example:

  class Tiny(Model):
    classifier_name = 'fc'

    def embed(self, x, train):
      conv, norm = self.layer_defs(train)
      x = nn.relu(norm(name='bn1')(conv(16, 3, name='conv1')(x)))
      return layers.global_avg_pool(x), {'stage1': x}

  model = Tiny(10, dtype=jnp.bfloat16)
  variables = model.init(jax.random.key(0), images)  # params: conv1, bn1, fc
  logits, features = model.apply(variables, images)  # [n, 10]; stage1, embedding [n, 16]
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from lpe.models import initializers
from lpe.models.layers import Dtype, ModelOutput, ModuleDef, batch_norm, conv


def torch_linear_init(fan_in: int) -> Callable[..., jax.Array]:
  """`torch.nn.Linear`'s draw for its kernel and its bias: uniform in `+-1/sqrt(fan_in)`.

  (`kaiming_uniform_(a=sqrt(5))` gives the kernel that bound, and PyTorch draws the bias with it.)
  """
  return initializers.uniform(1.0 / math.sqrt(fan_in))


class Model(nn.Module):
  """A classifier that returns its logits and named features, the embedding among them.

  `__call__(x, train)` casts `x` `[n, h, w, c]` to `dtype`, calls `embed`, stores the embedding
  `[n, d]` it returns as `features['embedding']` and applies one linear layer (the submodule
  `classifier_name`) to it: `logits = embedding @ W + b`, `[n, num_classes]`.

  Attributes:
    num_classes: Number of output classes (the only positional field of this base).
    dtype: Computation dtype (parameters stay float32). Keyword-only, like the two below.
    bn_axis_name: Axis name for cross-device BatchNorm statistics, or None. Models without
      BatchNorm accept and ignore it, so the trainer can build every model the same way.
    conv_impl: How the convs compute, one of `layers.CONV_IMPLS` (same parameters either way).
    bn_unbiased_var: Update BatchNorm's running variance with the unbiased batch variance, as
      PyTorch does (`layers.AffineBatchNorm`); normalisation itself uses the biased one either way.
    torch_classifier_init: Initialise the classifier as `torch.nn.Linear` does: kernel and bias
      uniform in `+-1/sqrt(fan_in)` (Flax's default: LeCun-normal kernel, zero bias).
  """

  # The classifier's submodule name, the PyTorch original's, which the parameter tree keeps.
  classifier_name: ClassVar[str] = 'classifier'

  num_classes: int
  # The fields below are keyword-only, so `num_classes` and each subclass's own fields keep
  # their positions (a base field with a default could not precede them otherwise).
  _: dataclasses.KW_ONLY
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  conv_impl: str = 'xla'
  bn_unbiased_var: bool = False
  torch_classifier_init: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> ModelOutput:
    embedding, features = self.embed(x.astype(self.dtype), train)
    features['embedding'] = embedding
    x = self.before_classifier(embedding, train)
    init = {'kernel_init': initializers.LECUN_NORMAL}  # Flax's default, drawn faster.
    if self.torch_classifier_init:
      init = dict.fromkeys(('kernel_init', 'bias_init'), torch_linear_init(x.shape[-1]))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name=self.classifier_name, **init)(x)
    return logits, features

  def before_classifier(self, embedding: jnp.ndarray, train: bool) -> jnp.ndarray:
    """What the classifier reads of the embedding: the embedding itself, unless a model puts
    a parameter-free layer there (MobileNetV2's dropout)."""
    del train
    return embedding

  def embed(self, x: jnp.ndarray, train: bool) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """The network up to the classifier (subclasses define it).

    Its submodules belong to the model itself (it runs inside `__call__`), so their names are
    the model's top-level parameter names.

    Args:
      x: Images `[n, h, w, c]`, already in `dtype`.
      train: Whether BatchNorm uses (and updates) batch statistics.

    Returns:
      The embedding `[n, d]` and the intermediate features by name (`stage0`, `stage1`, ...).
    """
    raise NotImplementedError(f'{type(self).__name__} must define embed(x, train).')

  def layer_defs(self, train: bool) -> tuple[ModuleDef, ModuleDef]:
    """Returns `(conv, norm)`: `layers.conv` and `layers.batch_norm` set up for this model.

    `conv(features, kernel_size, strides=1, *, groups=1, use_bias=False, name=None)` computes in
    `dtype` with `conv_impl`; `norm(name=...)` is a BatchNorm in `dtype` that uses batch
    statistics when `train` and averages them over `bn_axis_name`. A `Block` takes these two as
    its `conv` and `norm`.
    """
    return (
      functools.partial(conv, dtype=self.dtype, conv_impl=self.conv_impl),
      batch_norm(
        train,
        dtype=self.dtype,
        axis_name=self.bn_axis_name,
        conv_impl=self.conv_impl,
        unbiased_var=self.bn_unbiased_var,
      ),
    )


class Block(nn.Module):
  """Base of the zoo's blocks: they build their layers with the model's `conv` and `norm`.

  A block holds no dtype, `conv_impl` or BatchNorm settings of its own: the model passes its
  `layer_defs(train)`, so every conv and BatchNorm of a model is set up in one place, as in
  Flax's ImageNet ResNet. A subclass adds its own (positional) fields and `__call__`.

  Attributes:
    conv: `layers.conv` with the model's dtype and conv_impl (keyword-only).
    norm: `layers.batch_norm` constructor with the model's train flag, dtype and axis name
      (keyword-only).
  """

  _: dataclasses.KW_ONLY
  conv: ModuleDef
  norm: ModuleDef
