"""The input pipeline: TFDS image-classification splits held in memory, batched deterministically.

The small datasets this project trains on (MNIST, Fashion-MNIST, CIFAR) fit in memory, so a split is
read once through `tfds.data_source` (array_record, no TensorFlow needed), decoded to one uint8
array and cached next to the TFDS data. Training batches come from a permutation seeded by
`(seed, epoch)`, so any step of any epoch can be reproduced (and resumed) exactly.

Offline, Fashion-MNIST is prepared from the IDX files of Debian's `dataset-fashion-mnist` package.
"""

import dataclasses
import gzip
import os
import uuid
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

DEBIAN_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'


class DatasetUnavailableError(RuntimeError):
  """The requested dataset is not prepared and cannot be prepared offline."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset: its classes, image shape and normalisation constants."""

  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]


DATASETS: dict[str, DatasetInfo] = {
  'mnist': DatasetInfo(10, (28, 28, 1), (0.1307,), (0.3081,)),
  'fashion_mnist': DatasetInfo(10, (28, 28, 1), (0.2860,), (0.3530,)),
  'cifar10': DatasetInfo(10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
  'cifar100': DatasetInfo(100, (32, 32, 3), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a dataset, held in memory: `images` uint8 `[N, H, W, C]`, `labels` int32 `[N]`."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


def dataset_info(name: str) -> DatasetInfo:
  """Returns the `DatasetInfo` of `name`, or raises a ValueError naming the supported datasets."""
  if name not in DATASETS:
    raise ValueError(f'Unknown dataset {name!r}; supported datasets are: {", ".join(DATASETS)}.')
  return DATASETS[name]


def default_data_dir() -> str:
  """TFDS's data directory: `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`."""
  return os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets'))


def _read_idx(path: str, offset: int) -> np.ndarray:
  with gzip.open(path, 'rb') as f:
    return np.frombuffer(f.read(), np.uint8, offset=offset)


def prepare_fashion_mnist_from_idx(data_dir: str, idx_dir: str = DEBIAN_FASHION_MNIST_DIR) -> None:
  """Prepares the TFDS `fashion_mnist` dataset in `data_dir` from local gzipped IDX files.

  TFDS's own builder downloads the files and checks their checksums, which Debian's repacked files
  fail (the gzip header loses the file name). This subclass reads the same four files from
  `idx_dir` instead and writes the same features, in the array_record format.
  """
  import PIL.Image
  import tensorflow_datasets as tfds
  from tensorflow_datasets.image_classification import mnist

  files = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
  }

  class LocalFashionMNIST(mnist.FashionMNIST, skip_registration=True):
    name = 'fashion_mnist'

    def _split_generators(self, dl_manager):
      del dl_manager  # Nothing is downloaded.
      return [
        tfds.core.SplitGenerator(
          name=split,
          gen_kwargs=dict(
            image_path=os.path.join(idx_dir, images),
            label_path=os.path.join(idx_dir, labels),
          ),
        )
        for split, (images, labels) in files.items()
      ]

    def _generate_examples(self, image_path, label_path):
      labels = _read_idx(label_path, offset=8)
      images = _read_idx(image_path, offset=16).reshape(len(labels), 28, 28)
      for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        # A PIL image is PNG-encoded by PIL, so preparing needs no TensorFlow.
        yield index, {'image': PIL.Image.fromarray(image), 'label': int(label)}

  builder = LocalFashionMNIST(data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()


def _missing_message(name: str, data_dir: str) -> str:
  fix = (
    f'With internet and TensorFlow, prepare it once with `tfds build {name} --data_dir={data_dir} '
    '--file_format=array_record`, or set config.data_dir (or $TFDS_DATA_DIR) to a directory that '
    'holds it.'
  )
  if name == 'fashion_mnist':
    fix = (
      "Offline, install Debian's files with `sudo apt-get install dataset-fashion-mnist` and run "
      'again (lpe prepares the dataset from them). ' + fix
    )
  return f'Dataset {name!r} is not prepared in {data_dir}. {fix}'


def _open_source(name: str, split: str, data_dir: str):
  import tensorflow_datasets as tfds

  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except (tfds.core.DatasetNotFoundError, NotImplementedError, FileNotFoundError) as error:
    if tfds.builder(name, data_dir=data_dir).is_prepared():
      raise DatasetUnavailableError(
        f'Dataset {name!r} in {data_dir} is prepared in a format without random access; '
        f'rebuild it with `tfds build {name} --data_dir={data_dir} --file_format=array_record`.'
      ) from error
    if name == 'fashion_mnist' and os.path.isdir(DEBIAN_FASHION_MNIST_DIR):
      prepare_fashion_mnist_from_idx(data_dir)
      return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    raise DatasetUnavailableError(_missing_message(name, data_dir)) from error


def _decode(source, rows: range) -> Split:
  # Record by record through the Sequence protocol: TFDS's `tfds.testing.mock_data` mocks
  # `__getitem__` but breaks the batched `__getitems__`, and the decode runs once per cache.
  images, labels = [], []
  for index in rows:
    record = source[index]
    images.append(record['image'])
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
  safe_split = split.replace('[', '_').replace(']', '').replace(':', '-').replace('%', 'pc')
  return os.path.join(
    data_dir, 'lpe_cache', f'{name}-{info.version}-{safe_split}-{len(source)}.npz'
  )


def load_split(
  name: str, split: str, data_dir: str | None = None, *, shard: tuple[int, int] | None = None
) -> Split:
  """Loads a whole TFDS split into memory, preparing offline Fashion-MNIST when needed.

  Args:
    name: A dataset in `DATASETS`.
    split: A TFDS split expression, e.g. `'train'`, `'test'` or `'train[:90%]'`.
    data_dir: TFDS data directory; `None` means `default_data_dir()`.
    shard: `(index, count)` reads only that part of the split (`shard_rows`), e.g. this process's
      share on several hosts; None reads it all.

  Returns:
    The split, decoded; the decoded arrays are cached in `data_dir/lpe_cache/` after the first read
    (only data read from `data_dir` itself: never the random records of `tfds.testing.mock_data`).

  Raises:
    DatasetUnavailableError: the dataset is not prepared and cannot be prepared here; the message
      says how to get it.
  """
  info = dataset_info(name)
  data_dir = data_dir or default_data_dir()
  source = _open_source(name, split, data_dir)
  cache = _cache_path(source, name, split, data_dir)
  if cache and shard is not None:
    cache = cache.replace('.npz', f'-shard{shard[0]}of{shard[1]}.npz')
  if cache and os.path.exists(cache):
    with np.load(cache) as arrays:
      return Split(arrays['images'], arrays['labels'])
  data = _decode(source, shard_rows(len(source), shard))
  if data.images.shape[1:] != info.image_shape:
    raise ValueError(f'{name} images have shape {data.images.shape[1:]}, not {info.image_shape}.')
  if cache:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    # A name of its own: several processes (hosts sharing a data_dir) may write the same cache.
    tmp = f'{cache}.{uuid.uuid4().hex}.tmp.npz'
    np.savez(tmp, images=data.images, labels=data.labels)
    os.replace(tmp, cache)  # Atomic: a killed run never leaves a half-written cache.
  return data


def preprocess(images: jax.Array, info: DatasetInfo) -> jax.Array:
  """uint8 `[..., C]` images to float32, scaled to [0, 1] then standardised per channel.

  Runs inside the jitted steps, so only uint8 crosses to the device.
  """
  mean = jnp.asarray(info.mean, jnp.float32)
  std = jnp.asarray(info.std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Training steps in one epoch: the last partial batch is dropped."""
  if batch_size > num_examples:
    raise ValueError(
      f'batch_size {batch_size} is larger than the {num_examples} training examples; lower it.'
    )
  return num_examples // batch_size


def epoch_permutation(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
  """The order of the examples in `epoch`: a pure function of `(seed, epoch)`."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_index_batches(
  num_examples: int, *, batch_size: int, seed: int, epoch: int, start_step: int = 0
) -> Iterator[np.ndarray]:
  """Yields the example indices (int32 `[batch_size]`) of each batch of `epoch`, from
  `start_step` on: consecutive slices of `epoch_permutation`, the last partial batch dropped.

  Both input paths of the trainer read these: the host path indexes the NumPy split, the
  device-resident path gathers the same rows from the split held on the devices.
  """
  order = epoch_permutation(num_examples, seed=seed, epoch=epoch).astype(np.int32)
  for step in range(start_step, steps_per_epoch(num_examples, batch_size)):
    yield order[step * batch_size : (step + 1) * batch_size]


def train_batches(
  data: Split, *, batch_size: int, seed: int, epoch: int, start_step: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields the `(images uint8, labels int32)` batches of `epoch`, from step `start_step` on."""
  for index in train_index_batches(
    len(data), batch_size=batch_size, seed=seed, epoch=epoch, start_step=start_step
  ):
    yield data.images[index], data.labels[index]


def eval_batches(
  data: Split, *, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields `(images, labels, mask)` batches covering every example exactly once.

  The last batch is padded to `batch_size` (so it compiles once) and `mask` marks the real rows.
  """
  for start in range(0, len(data), batch_size):
    images = data.images[start : start + batch_size]
    labels = data.labels[start : start + batch_size]
    mask = np.ones(batch_size, bool)
    pad = batch_size - len(labels)
    if pad:
      mask[len(labels) :] = False
      images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
      labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    yield images, labels, mask
