"""The in-memory input: whole splits held in memory as uint8 arrays, batched deterministically.

A split of any dataset form (`lpe.sources`: a TFDS name, `folder:PATH` or `npz:PATH`) is read once
(TFDS through `tfds.data_source`, array_record, no TensorFlow needed), decoded to one uint8 array
and, for TFDS, cached next to the TFDS data. Training batches come from a permutation seeded by
`(seed, epoch)`, so any step of any epoch can be reproduced (and resumed) exactly; the streaming
input (`lpe.stream`) reads the same batches record by record.

Offline, Fashion-MNIST is prepared from the IDX files of Debian's `dataset-fashion-mnist` package.
"""

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lpe import files, sources, transforms
from lpe.config import LAST_BATCHES
from lpe.sources import (  # noqa: F401  (the names lpe.data has always offered)
  DEBIAN_FASHION_MNIST_DIR,
  DatasetInfo,
  DatasetUnavailableError,
  default_data_dir,
  prepare_fashion_mnist_from_idx,
)

DATASETS = sources.KNOWN


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a dataset, held in memory: `images` uint8 `[N, H, W, C]`, `labels` int32 `[N]`."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


def dataset_info(
  name: str,
  data_dir: str | None = None,
  *,
  image_size: int = 0,
  mean: Sequence[float] = (),
  std: Sequence[float] = (),
  train_split: str = 'train',
) -> DatasetInfo:
  """The `DatasetInfo` of `name` (a TFDS name, `folder:PATH` or `npz:PATH`; see
  `lpe.sources.read_info` for the arguments). Raises a ValueError naming an unknown dataset."""
  return sources.read_info(
    name, data_dir, image_size=image_size, mean=mean, std=std, train_split=train_split
  )


def info_of(config: ml_collections.ConfigDict) -> DatasetInfo:
  """The `DatasetInfo` of a run config's dataset, image size and normalisation constants (a
  config.json written before these fields existed reads as their defaults)."""
  return dataset_info(
    config.dataset,
    config.get('data_dir') or None,
    image_size=config.get('image_size', 0),
    mean=config.get('data_mean', ()),
    std=config.get('data_std', ()),
    train_split=config.get('train_split', 'train'),
  )


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError (or `DatasetUnavailableError`) for a dataset that cannot be read as
  `config` sets it, from its metadata (`sources.check_info`): the normalisation constants are
  computed, and cached, when the run loads its data (`info_of`), not by a check."""
  sources.check_info(
    config.dataset,
    config.data_dir or None,
    image_size=config.image_size,
    mean=config.data_mean,
    std=config.data_std,
    train_split=config.train_split,
  )


def info_of_model(meta: dict[str, Any], data_dir: str | None = None) -> DatasetInfo:
  """The `DatasetInfo` of the inputs an exported model was trained on, from its `model.json`."""
  return dataset_info(
    meta['dataset'],
    data_dir,
    image_size=meta.get('image_size', 0),
    mean=meta.get('mean', ()),
    std=meta.get('std', ()),
  )


def _decode(source: Sequence[dict[str, Any]], rows: range, image_size: int, where: str) -> Split:
  # Record by record through the Sequence protocol: TFDS's `tfds.testing.mock_data` mocks
  # `__getitem__` but breaks the batched `__getitems__`, and the decode runs once per cache.
  images, labels = [], []
  for index in rows:
    record = source[index]
    image = record['image']
    if image_size:
      image = transforms.resize(image, image_size, image_size)
    if images and image.shape != images[0].shape:
      raise ValueError(
        f'{where} mixes image sizes ({images[0].shape[:2]} and {image.shape[:2]} at row '
        f'{index}); set config.image_size to resize them all to one size.'
      )
    images.append(image)
    labels.append(record['label'])
  return Split(np.stack(images).astype(np.uint8), np.asarray(labels, np.int32))


def shard_rows(num_examples: int, shard: tuple[int, int] | None) -> range:
  """The rows of shard `(index, count)` of a split of `num_examples`: `count` contiguous, even
  parts (sizes differ by at most one), as `tfds.even_splits`; all rows when `shard` is None."""
  if shard is None:
    return range(num_examples)
  index, count = shard
  if not 0 <= index < count:
    raise ValueError(f'Shard {index} of {count} does not exist.')
  return range(index * num_examples // count, (index + 1) * num_examples // count)


def _cache_path(source, name: str, split: str, data_dir: str) -> str | None:
  """Where the decoded split is cached, or None when `source` is not read from `data_dir`.

  A source read from elsewhere (under `tfds.testing.mock_data` it is random records described by
  TFDS's bundled metadata) is never cached, so fake data can neither shadow nor be shadowed by
  the real dataset.
  """
  info = getattr(source, 'dataset_info', None)
  source_dir = os.path.realpath(str(getattr(info, 'data_dir', '')))
  if not source_dir.startswith(os.path.realpath(data_dir) + os.sep):
    return None
  return os.path.join(
    data_dir, 'lpe_cache', f'{name}-{info.version}-{sources.split_key(split)}-{len(source)}.npz'
  )


def load_split(
  name: str,
  split: str,
  data_dir: str | None = None,
  *,
  shard: tuple[int, int] | None = None,
  image_size: int = 0,
) -> Split:
  """Loads a whole split into memory, preparing offline Fashion-MNIST when needed.

  Args:
    name: A TFDS dataset name, `folder:PATH` or `npz:PATH` (`lpe.sources`).
    split: A TFDS split expression, e.g. `'train'`, `'test'` or `'train[:90%]'`, for every
      dataset form (`lpe.sources.split_rows` slices a folder or an .npz as TFDS would).
    data_dir: TFDS data directory; `None` means `default_data_dir()`.
    shard: `(index, count)` reads only that part of the split (`shard_rows`), e.g. this process's
      share on several hosts; None reads it all.
    image_size: >0 resizes every image to `image_size x image_size`; 0 keeps their size, which
      they must share.

  Returns:
    The split, decoded; a TFDS split's decoded arrays are cached in `data_dir/lpe_cache/` after
    the first read (only data read from `data_dir` itself: never the random records of
    `tfds.testing.mock_data`).

  Raises:
    DatasetUnavailableError: the dataset is not prepared and cannot be prepared here; the message
      says how to get it.
  """
  data_dir = data_dir or default_data_dir()
  source = sources.open_split(name, split, data_dir)
  cache = None
  if sources.form(name) == 'tfds':
    cache = _cache_path(source, name, split, data_dir)
  if cache and image_size:
    cache = cache.replace('.npz', f'-{image_size}px.npz')
  if cache and shard is not None:
    cache = cache.replace('.npz', f'-shard{shard[0]}of{shard[1]}.npz')
  if cache and os.path.exists(cache):
    with np.load(cache) as arrays:
      return Split(arrays['images'], arrays['labels'])
  data = _decode(source, shard_rows(len(source), shard), image_size, f'{name} {split}')
  if cache:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    # Atomic, and safe for several processes (hosts sharing a data_dir) writing the same cache.
    files.write_atomic(cache, lambda f: np.savez(f, images=data.images, labels=data.labels))
  return data


def preprocess(images: jax.Array, info: DatasetInfo) -> jax.Array:
  """uint8 `[..., C]` images to float32, scaled to [0, 1] then standardised per channel.

  Runs inside the jitted steps, so only uint8 crosses to the device.
  """
  mean = jnp.asarray(info.mean, jnp.float32)
  std = jnp.asarray(info.std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def stratified_subset(split: Split, size: int, *, seed: int) -> Split:
  """A fixed subset of `size` examples of `split` with its classes in the split's proportions.

  Each class present gets `floor(size * share)` examples, and the remaining ones go to the classes
  with the largest remainders (ties to the lower label), so the result has exactly `size`
  examples; within a class they are drawn uniformly without replacement by
  `np.random.default_rng([seed, label])`. A pure function of `(split, size, seed)`, kept in the
  split's order.

  Example:
    >>> split = Split(np.zeros((10, 1, 1, 1), np.uint8), np.array([0] * 6 + [1] * 4, np.int32))
    >>> np.bincount(stratified_subset(split, 5, seed=0).labels).tolist()
    [3, 2]
  """
  n = len(split)
  if not 1 <= size <= n:
    raise ValueError(
      f'train_subset={size} must be between 1 and the {n} examples of the training split; '
      'lower it (or 0 for the whole split).'
    )
  classes, counts = np.unique(split.labels, return_counts=True)
  exact = size * counts / n
  take = np.floor(exact).astype(int)
  by_remainder = sorted(range(len(classes)), key=lambda c: (-(exact[c] - take[c]), classes[c]))
  take[by_remainder[: size - int(take.sum())]] += 1
  chosen = []
  for label, count in zip(classes, take, strict=True):
    members = np.flatnonzero(split.labels == label)
    rng = np.random.default_rng([seed, int(label)])
    chosen.append(rng.choice(members, count, replace=False))
  index = np.sort(np.concatenate(chosen))
  return Split(split.images[index], split.labels[index])


def steps_per_epoch(num_examples: int, batch_size: int, last_batch: str = 'drop') -> int:
  """Training steps in one epoch: `num_examples // batch_size` with the last partial batch
  dropped (`last_batch='drop'`), `ceil(num_examples / batch_size)` with it trained on
  (`'masked'`: one more batch of the same shape, padded with rows that a mask leaves out of every
  loss and statistic, as PyTorch's DataLoader with `drop_last=False`, RepDistiller's, trains on
  its last partial batch)."""
  if batch_size > num_examples:
    raise ValueError(
      f'batch_size {batch_size} is larger than the {num_examples} training examples; lower it.'
    )
  if last_batch not in LAST_BATCHES:
    raise ValueError(f'last_batch={last_batch!r} is unknown; use drop or masked.')
  if last_batch == 'masked':
    return -(-num_examples // batch_size)
  return num_examples // batch_size


def epoch_permutation(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
  """The order of the examples in `epoch`: a pure function of `(seed, epoch)`."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_index_batches(
  num_examples: int,
  *,
  batch_size: int,
  seed: int,
  epoch: int,
  start_step: int = 0,
  last_batch: str = 'drop',
) -> Iterator[np.ndarray]:
  """Yields the example indices (int32 `[batch_size]`) of each batch of `epoch`, from
  `start_step` on: consecutive slices of `epoch_permutation`.

  The last partial batch is dropped, or with `last_batch='masked'` trained on: its
  `num_examples % batch_size` examples are padded to `batch_size` with the epoch's first ones,
  whose rows `valid_rows` marks as padding. Either way the other batches are the same.

  Both input paths of the trainer read these: the host path indexes the NumPy split, the
  device-resident path gathers the same rows from the split held on the devices.
  """
  order = epoch_permutation(num_examples, seed=seed, epoch=epoch).astype(np.int32)
  for step in range(start_step, steps_per_epoch(num_examples, batch_size, last_batch)):
    index = order[step * batch_size : (step + 1) * batch_size]
    if len(index) < batch_size:  # Padding: real examples, so every gather and feature is sound.
      index = np.concatenate([index, order[: batch_size - len(index)]])
    yield index


def valid_rows(num_examples: int, batch_size: int, step: int) -> np.ndarray:
  """Which rows of batch `step` of `train_index_batches` hold its own examples (`[batch_size]`
  bool): all of them but the padding of a masked last batch."""
  return np.arange(step * batch_size, (step + 1) * batch_size) < num_examples


def train_batches(
  data: Split, *, batch_size: int, seed: int, epoch: int, start_step: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields the `(images uint8, labels int32)` batches of `epoch`, from step `start_step` on."""
  for index in train_index_batches(
    len(data), batch_size=batch_size, seed=seed, epoch=epoch, start_step=start_step
  ):
    yield data.images[index], data.labels[index]


def eval_batches(
  data: Split, *, batch_size: int, wrap: bool = False
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields `(images, labels, mask)` batches covering every example exactly once.

  The last batch is padded to `batch_size` (so it compiles once) and `mask` marks the real rows.
  The padding is zeros, or with `wrap` the split's first examples (cyclically), so that a pass
  whose BatchNorm normalises each batch by its own statistics sees only real images. A split
  that is not in memory (`lpe.stream.EvalStream`) gives its own batches, in which only this
  process's rows are read.
  """
  if not isinstance(data, Split):
    if wrap:
      raise ValueError('Only a split held in memory can wrap its last batch around.')
    yield from data.eval_batches(batch_size)
    return
  for start in range(0, len(data), batch_size):
    images = data.images[start : start + batch_size]
    labels = data.labels[start : start + batch_size]
    mask = np.ones(batch_size, bool)
    pad = batch_size - len(labels)
    if pad:
      mask[len(labels) :] = False
      if wrap:
        index = np.arange(start, start + batch_size) % len(data)
        images, labels = data.images[index], data.labels[index]
      else:
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    yield images, labels, mask
