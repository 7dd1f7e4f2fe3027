"""The zoo's random initializers: jax's own, bitwise, with one compiled draw per size class.

A model's `init` runs eagerly, and jax compiles each random draw for its exact shape: on XLA:CPU
each new shape of a normal draw took 0.6-0.9 s to compile (a flat draw 0.2 s), about half of a
cold ResNet-56 `init`. jax's draws are counter-based (threefry with `jax_threefry_partitionable`,
jax's default): element `i` of a draw depends on the key and `i` alone. So a draw of `n` values
is the first `n` of a flat draw of any larger size, which these initializers take at the next
power of two and cut: the same bits as jax's initializers (tests/test_models.py compares them),
with a few compiled draws for the whole zoo. Other random number generators (`rbg`, or threefry
without `jax_threefry_partitionable`) draw the shape itself, as jax does.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def _counter_based(key: jax.Array) -> bool:
  """Whether element `i` of `key`'s draws depends on `i` alone (partitionable threefry)."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    impl = str(jax.random.key_impl(key))
  else:  # A raw uint32 key: the default implementation's.
    impl = str(jax.config.jax_default_prng_impl)
  return 'threefry' in impl and bool(jax.config.jax_threefry_partitionable)


def _flat_draw(sample: Callable, key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
  """`sample(key, shape, dtype)`, bitwise, drawn flat at the next power of two and cut."""
  shape = tuple(int(d) for d in shape)
  n = math.prod(shape)
  if n < 2 or not _counter_based(key):
    return sample(key, shape, dtype)
  flat = sample(key, (1 << (n - 1).bit_length(),), dtype)
  return jax.lax.slice(flat, (0,), (n,)).reshape(shape)


def _fans(shape: tuple[int, ...]) -> tuple[float, float]:
  """Fan-in and fan-out of a `[..., in, out]` kernel, as `jax.nn.initializers` computes them."""
  if len(shape) < 2:
    raise ValueError(f'A kernel has at least 2 dimensions, [..., in, out]; got shape {shape}.')
  in_size, out_size = shape[-2], shape[-1]
  receptive_field_size = math.prod(shape) / in_size / out_size
  return in_size * receptive_field_size, out_size * receptive_field_size


def variance_scaling(scale: float, mode: str, distribution: str) -> Initializer:
  """`jax.nn.initializers.variance_scaling(scale, mode, distribution)` for float kernels
  `[..., in, out]`, bitwise, with `mode` 'fan_in' or 'fan_out' and `distribution` 'normal' or
  'truncated_normal'."""
  if mode not in ('fan_in', 'fan_out') or distribution not in ('normal', 'truncated_normal'):
    raise ValueError(f'Unsupported variance scaling: mode={mode!r}, distribution={distribution!r}.')

  def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    fan_in, fan_out = _fans(tuple(shape))
    variance = jnp.array(scale / (fan_in if mode == 'fan_in' else fan_out), dtype=dtype)
    if distribution == 'normal':
      return _flat_draw(jax.random.normal, key, shape, dtype) * jnp.sqrt(variance)
    # The constant is the standard deviation of a standard normal truncated to (-2, 2).
    stddev = jnp.sqrt(variance) / jnp.array(0.87962566103423978, dtype)
    truncated = lambda k, s, d: jax.random.truncated_normal(k, -2, 2, s, d)
    return _flat_draw(truncated, key, shape, dtype) * stddev

  return init


def uniform(bound: float) -> Initializer:
  """`jax.random.uniform(key, shape, dtype, -bound, bound)`, bitwise."""

  def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    draw = lambda k, s, d: jax.random.uniform(k, s, d, -bound, bound)
    return _flat_draw(draw, key, shape, dtype)

  return init


# He-normal over fan-out, as RepDistiller initialises its convs (kaiming_normal_(mode='fan_out')
# or normal(0, sqrt(2 / (k * k * out_channels))), which is the same distribution).
HE_NORMAL_FAN_OUT = variance_scaling(2.0, 'fan_out', 'normal')
# LeCun normal: flax's default kernel initializer for `nn.Dense` and `nn.Conv`.
LECUN_NORMAL = variance_scaling(1.0, 'fan_in', 'truncated_normal')

__all__ = ['HE_NORMAL_FAN_OUT', 'LECUN_NORMAL', 'uniform', 'variance_scaling']
