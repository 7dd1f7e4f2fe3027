"""Tests of the CIFAR augmentation (`config.augment='cifar'`): a true padded crop and flip."""

import itertools

import jax
import numpy as np

from lpe import augment

# Every (dy, dx, flipped) a 32x32 crop of a 4-pixel zero-padded 32x32 image can take.
CHOICES = list(itertools.product(range(9), range(9), (False, True)))


def _matches(image: np.ndarray, augmented: np.ndarray) -> list[tuple[int, int, bool]]:
  """The (dy, dx, flipped) crops of the zero-padded `image` equal to each `augmented` image."""
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  crops = np.stack(
    [padded[dy : dy + 32, dx : dx + 32][:, :: -1 if flip else 1] for dy, dx, flip in CHOICES]
  )
  equal = np.all(crops[None] == augmented[:, None], axis=(2, 3, 4))  # [n, choices]
  return [[CHOICES[c] for c in np.flatnonzero(row)] for row in equal]


def test_each_output_is_a_padded_crop_possibly_flipped():
  images = np.random.default_rng(0).integers(1, 256, (64, 32, 32, 3)).astype(np.uint8)
  out = np.asarray(jax.jit(augment.augment_cifar)(jax.random.key(0), images))
  assert out.shape == images.shape and out.dtype == images.dtype
  chosen = []
  for image, augmented in zip(images, out, strict=True):
    # Pixels are nonzero, so the crops and flips of an image all differ: exactly one must match.
    (match,) = _matches(image, augmented[None])
    assert len(match) == 1, 'not a crop of the zero-padded image, flipped or not'
    chosen.append(match[0])
  assert len({(dy, dx) for dy, dx, _ in chosen}) > 20  # 64 draws from 81 offsets.
  assert 10 < sum(flip for _, _, flip in chosen) < 54  # Flipped with probability 1/2.


def test_offsets_reach_the_full_range():
  image = np.random.default_rng(1).integers(1, 256, (32, 32, 3)).astype(np.uint8)
  out = np.asarray(augment.augment_cifar(jax.random.key(2), np.repeat(image[None], 512, axis=0)))
  chosen = [match[0] for match in _matches(image, out)]
  assert {dy for dy, _, _ in chosen} == set(range(9)) == {dx for _, dx, _ in chosen}


def test_same_key_same_augmentation():
  images = np.random.default_rng(3).integers(0, 256, (8, 32, 32, 3)).astype(np.uint8)
  a = augment.augment_cifar(jax.random.key(5), images)
  np.testing.assert_array_equal(a, augment.augment_cifar(jax.random.key(5), images))
  assert not np.array_equal(a, augment.augment_cifar(jax.random.key(6), images))
