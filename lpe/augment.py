"""Augmentation drawn on the devices inside the train step, the same for any device count."""

import jax
import jax.numpy as jnp

# The values of `config.augment` drawn here ('imagenet' is drawn by the streaming input).
from lpe.config import DEVICE_AUGMENTATIONS as AUGMENTATIONS


def augment_cifar(rng: jax.Array, images: jax.Array, *, axis_name: str | None = None) -> jax.Array:
  """Random 4-pixel zero-padded crop and horizontal flip, per image (torchvision's CIFAR recipe).

  Under `pmap` pass `axis_name`: the draws are made for the global batch and each device takes its
  rows, so the augmentation does not depend on the device count.
  """
  n, h, w, _ = images.shape
  total = n * (jax.lax.psum(1, axis_name) if axis_name else 1)
  crop_rng, flip_rng = jax.random.split(rng)
  offsets = jax.random.randint(crop_rng, (total, 2), 0, 9)
  flips = jax.random.bernoulli(flip_rng, 0.5, (total,))
  if axis_name:
    start = jax.lax.axis_index(axis_name) * n
    offsets = jax.lax.dynamic_slice_in_dim(offsets, start, n)
    flips = jax.lax.dynamic_slice_in_dim(flips, start, n)
  padded = jnp.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))

  def one(image, offset, flip):
    image = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))
    return jnp.where(flip, image[:, ::-1], image)

  return jax.vmap(one)(padded, offsets, flips)


def augment(
  name: str, rng: jax.Array, images: jax.Array, *, axis_name: str | None = None
) -> jax.Array:
  """`images` augmented as `name` (one of `AUGMENTATIONS`) says, with draws from `rng`."""
  if name == 'none':
    return images
  if name == 'cifar':
    return augment_cifar(rng, images, axis_name=axis_name)
  raise ValueError(f'config.augment={name!r} is unknown; use {" or ".join(AUGMENTATIONS)}.')
