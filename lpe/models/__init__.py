"""Flax models that return `(logits, features)`; see `build` and `names`."""

# Importing a model module registers its architectures.
from lpe.models import (  # noqa: F401
  fitnets,
  imagenet,
  mobilenetv2,
  nnx_cnn,
  resnet,
  shufflenet,
  small_cnn,
  vgg,
  wrn,
)
from lpe.models.from_torch import from_torch
from lpe.models.registry import build, names

__all__ = ['build', 'from_torch', 'names']
