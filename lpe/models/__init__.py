"""Flax models that return `(logits, features)`; see `build` and `names`."""

# Importing a model module registers its architectures.
from lpe.models import small_cnn  # noqa: F401
from lpe.models.registry import build, names

__all__ = ['build', 'names']
