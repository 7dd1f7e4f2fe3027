"""Image transforms on the host, in NumPy and PIL: resizing, and the augmentations of the streaming
input (`lpe.stream`), drawn per image from a NumPy generator in the input's worker processes.

Every function takes and returns one uint8 image `[H, W, C]` (C = 1 or 3). The augmentation drawn
on the devices inside the step is `lpe.augment`; this module's `pad_crop_flip` is the same recipe
for images that stream.
"""

import math

import numpy as np
import PIL.Image

# ImageNet evaluation: the shorter side resized to size / 0.875 (256 for 224), then a centre crop.
CENTRE_CROP_FRACTION = 0.875


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """`image` resized to `[height, width, C]` (bilinear, antialiased by PIL); unchanged if it fits.

  >>> resize(np.zeros((5, 7, 3), np.uint8), 4, 4).shape
  (4, 4, 3)
  """
  if image.shape[:2] == (height, width):
    return image
  channels = image.shape[-1]
  pil = PIL.Image.fromarray(image[..., 0] if channels == 1 else image)
  out = np.asarray(pil.resize((width, height), PIL.Image.BILINEAR))
  return out.reshape(height, width, channels)


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
  """ImageNet's evaluation view: the shorter side resized to `size / 0.875`, then the central
  `size x size` crop."""
  h, w = image.shape[:2]
  short = round(size / CENTRE_CROP_FRACTION)
  scale = short / min(h, w)
  h, w = max(size, round(h * scale)), max(size, round(w * scale))
  image = resize(image, h, w)
  top, left = (h - size) // 2, (w - size) // 2
  return image[top : top + size, left : left + size]


def random_resized_crop(
  image: np.ndarray,
  size: int,
  rng: np.random.Generator,
  *,
  scale: tuple[float, float] = (0.08, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
  """Inception-style crop (torchvision's `RandomResizedCrop`): a random area fraction in `scale`
  and aspect ratio (log-uniform) in `ratio`, resized to `size x size`; after 10 failed draws, the
  central crop of the nearest allowed ratio."""
  h, w = image.shape[:2]
  area = h * w
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if 0 < cw <= w and 0 < ch <= h:
      top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
      return resize(image[top : top + ch, left : left + cw], size, size)
  aspect = w / h
  if aspect < ratio[0]:
    cw, ch = w, round(w / ratio[0])
  elif aspect > ratio[1]:
    cw, ch = round(h * ratio[1]), h
  else:
    cw, ch = w, h
  top, left = (h - ch) // 2, (w - cw) // 2
  return resize(image[top : top + ch, left : left + cw], size, size)


def flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """`image` mirrored left to right with probability 1/2."""
  return image[:, ::-1] if rng.random() < 0.5 else image


def pad_crop_flip(image: np.ndarray, rng: np.random.Generator, *, pad: int = 4) -> np.ndarray:
  """CIFAR's recipe (`lpe.augment.augment_cifar` on the devices): a random crop of the image
  zero-padded by `pad` pixels, back to its size, then a random horizontal flip."""
  h, w = image.shape[:2]
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  top, left = rng.integers(0, 2 * pad + 1, 2)
  return flip(padded[top : top + h, left : left + w], rng)
