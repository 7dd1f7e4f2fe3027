"""The model registry: one name per architecture, so configs name models by string."""

from collections.abc import Callable

import flax.linen as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
  """Registers `factory(num_classes, **kwargs) -> nn.Module` under `name`."""

  def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if name in _REGISTRY:
      raise ValueError(f'Model name {name!r} is registered twice.')
    _REGISTRY[name] = factory
    return factory

  return decorator


def names() -> list[str]:
  """Returns the registered model names, sorted."""
  return sorted(_REGISTRY)


def build(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Returns the Flax module registered as `name`, with `num_classes` outputs.

  Every module is a `base.Model`, called as `module.apply(variables, images, train=bool)` on
  NHWC images; it returns `(logits, features)`: `logits` is `[n, num_classes]`, `features` a dict
  of named intermediate outputs that always holds `'embedding'`, the pre-logit vector `[n, d]`
  that the linear classifier reads. What that vector is depends on the model (each model's
  docstring says): for the CIFAR zoo (ResNets, WRNs, VGGs, MobileNetV2, ShuffleNets) and the
  FitNets it is the last feature map globally average-pooled; for `maxout_teacher` a maxout
  dense layer, and for `cnn_*` a ReLU dense layer, over the flattened last map.

  Keyword arguments (for example `dtype` for the computation dtype, `bn_axis_name` for
  cross-device BatchNorm under `pmap`, `conv_impl` for how the convs compute, one of
  `layers.CONV_IMPLS`) are passed to the factory.
  """
  if name not in _REGISTRY:
    raise ValueError(f'Unknown model {name!r}; valid names are: {", ".join(names())}.')
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f'num_classes must be a positive int, got {num_classes!r}.')
  return _REGISTRY[name](num_classes=num_classes, **kwargs)
