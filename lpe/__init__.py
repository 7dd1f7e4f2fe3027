"""lpe: knowledge distillation by locality-preserving feature embedding, in JAX/Flax."""

__version__ = '0.1.0'
