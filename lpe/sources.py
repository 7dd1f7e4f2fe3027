"""Where the examples come from: a TFDS dataset by name, a folder of class-named images or one .npz.

`config.dataset` takes three forms:
- a TFDS image-classification dataset by name (`'cifar10'`, `'imagenet2012'`, ...), read from its
  prepared array_record files (never downloaded here): classes, image shape and splits come from
  the builder's info;
- `'folder:PATH'`: `PATH/<split>/<class name>/<image files>` (PNG or JPEG), classes sorted by name;
- `'npz:PATH'`: one .npz holding `<split>_images` uint8 `[N, H, W, C]` and `<split>_labels` int
  `[N]` for the splits `train` and `test`.

A split is named as TFDS names it, a slice included (`'train[:90%]'`, `'train[3200:]'`): TFDS
reads the slice of its own datasets, `split_rows` that of a folder or an .npz, with TFDS's rounding.

Each split opens as a random-access sequence of `{'image': uint8 [H, W, C], 'label': int}` records
(`open_split`); `read_info` gives the dataset's `DatasetInfo`, with normalisation constants computed
from the training split once and cached. Nothing here imports JAX.
"""

import contextlib
import dataclasses
import difflib
import functools
import json
import os
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from lpe import files, transforms

FOLDER, NPZ = 'folder:', 'npz:'
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
# Normalisation constants are computed from at most this many evenly spaced training images.
STATS_MAX_EXAMPLES = 10_000
DEBIAN_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
# A split expression as TFDS writes one: `name` or `name[from:to]`, each bound empty, an example
# count or a percentage (decimals allowed), negative ones counted from the end.
_BOUND = r'(-?\d+(?:\.\d+)?%|-?\d+)?'
_SPLIT_RE = re.compile(rf'([\w-]+)(?:\[{_BOUND}:{_BOUND}\])?')
SPLIT_FORMS = 'train, train[:90%], train[90%:], train[:3200], train[3200:] or train[100:200]'
NPZ_ARRAYS = 'train_images and test_images uint8 [N, H, W, C], train_labels and test_labels int [N]'


class DatasetUnavailableError(RuntimeError):
  """The requested dataset is not prepared and cannot be prepared offline."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset: its classes, image shape and normalisation constants."""

  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]


# The published constants of the datasets lpe's configs use (no pass over the data needed).
KNOWN: dict[str, DatasetInfo] = {
  'mnist': DatasetInfo(10, (28, 28, 1), (0.1307,), (0.3081,)),
  'fashion_mnist': DatasetInfo(10, (28, 28, 1), (0.2860,), (0.3530,)),
  'cifar10': DatasetInfo(10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
  'cifar100': DatasetInfo(100, (32, 32, 3), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


# The constants torchvision's ImageNet models were trained with (`transforms.Normalize`), which
# a teacher converted from them (`lpe.torch_convert`) expects, as do the ImageNet configs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_SIZE = 224


def default_data_dir() -> str:
  """TFDS's data directory: `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`."""
  return os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets'))


def form(dataset: str) -> str:
  """`'folder'`, `'npz'` or `'tfds'`: which of the three forms `dataset` names."""
  for kind, prefix in (('folder', FOLDER), ('npz', NPZ)):
    if dataset.startswith(prefix):
      return kind
  return 'tfds'


def split_rows(expression: str, sizes: Mapping[str, int], where: str) -> tuple[str, slice]:
  """The split that `expression` names and the rows of it that it selects, as TFDS selects them.

  Percentages become `round(p * n / 100)` examples (TFDS's 'closest' rounding, halves to even) and
  negative bounds count from the end, so `'train[:90%]'` of an .npz is the rows TFDS would read
  from a split of the same size.

  Args:
    expression: `'train'`, `'train[:90%]'`, `'train[10%:]'`, `'train[:3200]'`, `'train[100:200]'`.
    sizes: The number of examples of each split the dataset has.
    where: The dataset, as its errors name it.

  Raises:
    ValueError: an unknown split, a malformed or out-of-range slice, or one that selects nothing.

  Example:
    >>> split_rows('train[:90%]', {'train': 25, 'test': 5}, 'npz:d.npz')
    ('train', slice(0, 22, None))
  """
  match = _SPLIT_RE.fullmatch(expression)
  fix = f'write a split of {where} ({", ".join(sizes)}) or a slice of one: {SPLIT_FORMS}.'
  if not match:
    raise ValueError(f'The split {expression!r} is not a split name nor a TFDS slice; {fix}')
  name, *bounds = match.groups()
  if '[' in expression and not any(bounds):  # TFDS refuses `train[:]` too.
    raise ValueError(f'{expression!r} has an empty slice; {fix}')
  if name not in sizes:
    raise ValueError(f'{where} has no split {name!r} (in {expression!r}); {fix}')
  n = sizes[name]
  if len({b.endswith('%') for b in bounds if b}) > 1:
    raise ValueError(f'{expression!r} mixes a percentage and an example count; {fix}')
  rows = []
  for bound, default in zip(bounds, (0, n), strict=True):
    if not bound:
      rows.append(default)
      continue
    value = float(bound[:-1]) if bound.endswith('%') else int(bound)
    if abs(value) > (100 if bound.endswith('%') else n):
      raise ValueError(f'{expression!r} reaches past the {n} examples of {name}; {fix}')
    value = int(round(value * n / 100)) if bound.endswith('%') else value
    rows.append(value + n if value < 0 else value)
  if rows[0] >= rows[1]:
    raise ValueError(f'{expression!r} selects none of the {n} examples of {name}; {fix}')
  return name, slice(*rows)


def split_key(split: str) -> str:
  """`split` as part of a file name: `'train[:90%]'` -> `'train_-90pc'`."""
  return split.replace('[', '_').replace(']', '').replace(':', '-').replace('%', 'pc')


def _path(dataset: str) -> str:
  return os.path.abspath(os.path.expanduser(dataset.split(':', 1)[1]))


def open_split(dataset: str, split: str, data_dir: str | None = None) -> Sequence[dict[str, Any]]:
  """The records of `split` of `dataset` (any of the three forms), read on demand.

  Raises:
    DatasetUnavailableError: a TFDS dataset is not prepared; the message says how to prepare it.
    ValueError: the name or the files are wrong; the message names the problem and the fix.
  """
  kind = form(dataset)
  if kind == 'folder':
    return _folder(_path(dataset), split)
  if kind == 'npz':
    return _npz(_path(dataset), split)
  return open_tfds(dataset, split, data_dir or default_data_dir())


def read_info(
  dataset: str,
  data_dir: str | None = None,
  *,
  image_size: int = 0,
  mean: Sequence[float] = (),
  std: Sequence[float] = (),
  train_split: str = 'train',
) -> DatasetInfo:
  """The classes, image shape and normalisation constants of `dataset`.

  Args:
    dataset: A TFDS name, `folder:PATH` or `npz:PATH`.
    data_dir: TFDS data directory (None: `default_data_dir()`).
    image_size: >0 resizes every image to `image_size x image_size` (and allows images of mixed
      sizes); 0 keeps the dataset's own size, which all its images must share.
    mean, std: Per-channel normalisation constants; empty means the published ones (`KNOWN`),
      else computed from `train_split` once (at most `STATS_MAX_EXAMPLES` images, after
      resizing) and cached beside the data, under a name that holds the split's slice.
    train_split: The split (or slice, e.g. `'train[:90%]'`) the constants are computed from.
  """
  num_classes, shape = _classes_and_shape(dataset, data_dir or default_data_dir(), image_size)
  if image_size:
    shape = (image_size, image_size, shape[-1])
  if not mean or not std:
    known = KNOWN.get(dataset)
    if known and not image_size:
      mean, std = mean or known.mean, std or known.std
    else:
      stats = _cached_stats(dataset, data_dir or default_data_dir(), shape, train_split)
      mean, std = mean or stats[0], std or stats[1]
  _check_channels(dataset, shape, mean, std)
  return DatasetInfo(num_classes, shape, tuple(map(float, mean)), tuple(map(float, std)))


def check_info(
  dataset: str,
  data_dir: str | None = None,
  *,
  image_size: int = 0,
  mean: Sequence[float] = (),
  std: Sequence[float] = (),
  train_split: str = 'train',
) -> None:
  """Raises what `read_info` would for these arguments, without computing the normalisation
  constants: reads the dataset's classes and image shape, checks the given constants' channels
  and, where constants would be computed from `train_split`, that the split opens (a check before
  any work, which writes no cache)."""
  shape = _classes_and_shape(dataset, data_dir or default_data_dir(), image_size)[1]
  _check_channels(dataset, shape, mean, std)
  if (not mean or not std) and (image_size or dataset not in KNOWN):
    open_split(dataset, train_split, data_dir)


def _check_channels(dataset: str, shape: tuple, mean: Sequence[float], std: Sequence[float]):
  for what, values in (('mean', mean), ('std', std)):
    if values and len(values) != shape[-1]:
      raise ValueError(
        f'config.data_{what} has {len(values)} values but {dataset} images have {shape[-1]} '
        'channels; give one per channel, or () to compute them.'
      )


def _classes_and_shape(dataset: str, data_dir: str, image_size: int) -> tuple[int, tuple]:
  kind = form(dataset)
  if kind == 'folder':
    return _folder_info(_path(dataset), image_size)
  if kind == 'npz':
    arrays = _npz_arrays(_path(dataset))
    return arrays['num_classes'], arrays['train_images'].shape[1:]
  if dataset in KNOWN:  # No TFDS metadata needed (nor TFDS's mock data in tests).
    return KNOWN[dataset].num_classes, KNOWN[dataset].image_shape
  features = tfds_builder(dataset, data_dir).info.features
  try:
    image, label = features['image'], features['label']
  except KeyError as error:
    raise ValueError(
      f'TFDS dataset {dataset!r} has no image and label features (it has '
      f'{", ".join(features.keys())}); pick an image-classification dataset.'
    ) from error
  shape = tuple(image.shape)
  if None in shape[:2] and not image_size:
    raise ValueError(
      f'{dataset} images differ in size; set config.image_size (e.g. 224) to resize them to one.'
    )
  return label.num_classes, shape


# --- TFDS ---------------------------------------------------------------------------------------


def tfds_builder(name: str, data_dir: str):
  """TFDS's builder for `name` (registered, or prepared in `data_dir`); an unknown name is a
  ValueError naming the close matches."""
  import tensorflow_datasets as tfds

  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as error:
    names = tfds.list_builders(with_community_datasets=False)
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f'did you mean {" or ".join(close)}?' if close else 'see `tfds.list_builders()`.'
    raise ValueError(
      f'config.dataset={name!r} is not a TFDS dataset, nor prepared in {data_dir}, nor '
      f'folder:PATH or npz:PATH; {hint}'
    ) from error


def _missing_message(name: str, data_dir: str) -> str:
  build = f'tfds build {name} --data_dir={data_dir} --file_format=array_record'
  fix = (
    f'With internet and TensorFlow, prepare it once with `{build}`, or set config.data_dir (or '
    '$TFDS_DATA_DIR) to a directory that holds it.'
  )
  if name == 'fashion_mnist':
    fix = (
      "Offline, install Debian's files with `sudo apt-get install dataset-fashion-mnist` and run "
      'again (lpe prepares the dataset from them). ' + fix
    )
  elif name.startswith('imagenet'):
    fix = (
      f'Put the ImageNet archives in a folder and prepare it once with `{build} '
      '--manual_dir=<that folder>` (docs/data.md), or set config.data_dir (or $TFDS_DATA_DIR) to '
      'a directory that holds it.'
    )
  return f'Dataset {name!r} is not prepared in {data_dir}. {fix}'


def open_tfds(name: str, split: str, data_dir: str):
  """`tfds.data_source` of a prepared split (array_record); offline Fashion-MNIST is prepared
  from Debian's files on first use."""
  import tensorflow_datasets as tfds

  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except (tfds.core.DatasetNotFoundError, NotImplementedError, FileNotFoundError) as error:
    if tfds_builder(name, data_dir).is_prepared():
      raise DatasetUnavailableError(
        f'Dataset {name!r} in {data_dir} is prepared in a format without random access; '
        f'rebuild it with `tfds build {name} --data_dir={data_dir} --file_format=array_record`.'
      ) from error
    if name == 'fashion_mnist' and os.path.isdir(DEBIAN_FASHION_MNIST_DIR):
      prepare_fashion_mnist_from_idx(data_dir)
      return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    raise DatasetUnavailableError(_missing_message(name, data_dir)) from error


def _read_idx(path: str, offset: int) -> np.ndarray:
  import gzip

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


# --- folder:PATH ---------------------------------------------------------------------------------


class FolderSource(Sequence):
  """The images of `root/<class>/`, labelled by their class's index in `classes`, decoded to
  `channels` (1: greyscale, 3: RGB) on access."""

  def __init__(self, files: list[str], labels: list[int], channels: int):
    self.files, self.labels, self.channels = files, labels, channels

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index):
    if isinstance(index, slice):
      raise TypeError('FolderSource takes one index at a time.')
    with _open_image(self.files[index]) as pil:
      image = np.asarray(pil.convert('L' if self.channels == 1 else 'RGB'))
    return {'image': image.reshape(*image.shape[:2], self.channels), 'label': self.labels[index]}


@contextlib.contextmanager
def _open_image(path: str) -> Iterator[Any]:
  """`PIL.Image.open(path)`, where a file PIL cannot read or decode (corrupt, truncated, not an
  image) is a ValueError that names it and says to remove or replace it."""
  import PIL.Image

  try:
    with PIL.Image.open(path) as pil:
      yield pil
  except (PIL.UnidentifiedImageError, OSError, SyntaxError) as error:  # SyntaxError: bad headers.
    raise ValueError(
      f'{path} is not a readable PNG or JPEG image (corrupt, truncated or another kind of file); '
      'remove or replace it.'
    ) from error


def _classes(root: str, split: str) -> tuple[list[str], dict[str, list[str]]]:
  folder = os.path.join(root, split)
  if not os.path.isdir(folder):
    raise ValueError(
      f'folder:{root} has no {split}/ folder; put the images in {folder}/<class name>/.'
    )
  classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
  if not classes:
    raise ValueError(f'{folder} holds no class folders; put each class in {folder}/<class name>/.')
  files = {}
  for name in classes:
    path = os.path.join(folder, name)
    found = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
      raise ValueError(
        f'The class folder {path} holds no PNG or JPEG images; add some or remove the folder.'
      )
    files[name] = [os.path.join(path, f) for f in found]
  return classes, files


@functools.lru_cache(maxsize=8)
def _folder_index(root: str) -> tuple[tuple[str, ...], dict[str, tuple[list[str], list[int]]]]:
  """The classes (from `train/`) and each split's files and labels."""
  classes, train = _classes(root, 'train')
  index = {'train': train}
  for split in ('test',):
    if os.path.isdir(os.path.join(root, split)):
      names, index[split] = _classes(root, split)
      extra = sorted(set(names) - set(classes))
      if extra:
        raise ValueError(
          f'{root}/{split} has classes that train/ lacks ({", ".join(extra[:5])}); give both '
          'splits the same class folders.'
        )
  splits = {}
  for split, by_class in index.items():
    pairs = [(f, classes.index(c)) for c in sorted(by_class) for f in by_class[c]]
    splits[split] = ([f for f, _ in pairs], [label for _, label in pairs])
  return tuple(classes), splits


@functools.lru_cache(maxsize=8)
def _folder_channels(root: str) -> int:
  """1 when a sample of up to 100 evenly spaced images are all greyscale, else 3 (RGB)."""
  files = _folder_index(root)[1]['train'][0]
  modes = set()
  for path in files[:: max(1, len(files) // 100)]:
    with _open_image(path) as pil:
      modes.add(pil.mode)
  return 1 if modes <= {'L', '1', 'I;16'} else 3


@functools.lru_cache(maxsize=8)
def _folder_info(root: str, image_size: int) -> tuple[int, tuple[int, int, int]]:
  """Classes and image shape; without `image_size` every image must share one size."""
  classes, splits = _folder_index(root)
  files = [f for split_files, _ in splits.values() for f in split_files]
  sizes = {}
  for path in files[:1] if image_size else files:  # Only the headers are read.
    with _open_image(path) as pil:
      sizes.setdefault(pil.size, path)
  if len(sizes) > 1:
    (a, path_a), (b, path_b) = list(sizes.items())[:2]
    raise ValueError(
      f'folder:{root} mixes image sizes ({path_a} is {a[0]}x{a[1]}, {path_b} is {b[0]}x{b[1]}); '
      'set config.image_size to resize them all to one size.'
    )
  (width, height) = next(iter(sizes))
  return len(classes), (height, width, _folder_channels(root))


def _folder(root: str, split: str) -> FolderSource:
  _, splits = _folder_index(root)
  sizes = {name: len(files) for name, (files, _) in splits.items()}
  name, rows = split_rows(split, sizes, f'folder:{root}')
  files, labels = splits[name]
  return FolderSource(files[rows], labels[rows], _folder_channels(root))


# --- npz:PATH ------------------------------------------------------------------------------------


class ArraySource(Sequence):
  """Records from in-memory arrays: `images` uint8 `[N, H, W, C]`, `labels` `[N]`."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index):
    return {'image': self.images[index], 'label': int(self.labels[index])}


@functools.lru_cache(maxsize=4)
def _npz_arrays(path: str) -> dict[str, Any]:
  """The arrays of an `npz:` dataset, checked: uint8 images, int labels in range."""
  if not os.path.isfile(path):
    raise ValueError(f'npz:{path} does not exist; give the path of an .npz file.')
  arrays = _read_npz(path)
  for split in ('train', 'test'):
    for key, ndim in ((f'{split}_images', 4), (f'{split}_labels', 1)):
      if key not in arrays or arrays[key].ndim != ndim:
        raise ValueError(
          f'npz:{path} needs {key} with {ndim} dimensions ({NPZ_ARRAYS}); it holds '
          f'{", ".join(f"{k} {v.shape}" for k, v in arrays.items())}.'
        )
    images, labels = arrays[f'{split}_images'], arrays[f'{split}_labels']
    if images.dtype != np.uint8 or labels.dtype.kind not in 'iu' or len(images) != len(labels):
      raise ValueError(
        f'npz:{path}: {split}_images must be uint8 and {split}_labels int, one label per image; '
        f'got {images.dtype} {images.shape} and {labels.dtype} {labels.shape}.'
      )
  if arrays['train_images'].shape[1:] != arrays['test_images'].shape[1:]:
    raise ValueError(
      f'npz:{path}: train images are {arrays["train_images"].shape[1:]} but test images are '
      f'{arrays["test_images"].shape[1:]}; give both splits one image shape.'
    )
  num_classes = int(arrays['train_labels'].max()) + 1
  for split in ('train', 'test'):
    labels = arrays[f'{split}_labels']
    if labels.min() < 0 or labels.max() >= num_classes:
      raise ValueError(
        f'npz:{path}: {split}_labels run from {labels.min()} to {labels.max()}, out of the range '
        f'0..{num_classes - 1} of the training labels; number the classes 0..C-1.'
      )
  used = len(np.unique(arrays['train_labels']))
  if used < num_classes:  # Not an error: a subset of a larger label set is legitimate.
    logging.warning(
      'npz:%s: train_labels run from %d to %d, so the classifier head will have %d classes with '
      'only %d of them used; number the classes 0..%d if the others do not exist.',
      path,
      arrays['train_labels'].min(),
      num_classes - 1,
      num_classes,
      used,
      used - 1,
    )
  return dict(arrays, num_classes=num_classes)


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays of the .npz at `path`; a file that is not one, or pickled object arrays (which
  are not loaded: unpickling runs code), is a ValueError naming the file and the arrays wanted."""
  unreadable = ValueError(
    f'npz:{path} is not a readable .npz file; save one with np.savez holding {NPZ_ARRAYS}.'
  )
  try:
    loaded = np.load(path)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
    raise unreadable from error
  if not isinstance(loaded, np.lib.npyio.NpzFile):  # One .npy array.
    raise unreadable
  arrays = {}
  with loaded:
    for key in loaded.files:
      try:
        arrays[key] = loaded[key]
      except ValueError as error:  # numpy's 'Object arrays cannot be loaded' (allow_pickle).
        raise ValueError(
          f'npz:{path} holds {key} as pickled Python objects, which lpe does not load; save '
          f'{NPZ_ARRAYS} as plain arrays.'
        ) from error
      except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise unreadable from error
  return arrays


def _npz(path: str, split: str) -> ArraySource:
  arrays = _npz_arrays(path)
  sizes = {name: len(arrays[f'{name}_labels']) for name in ('train', 'test')}
  name, rows = split_rows(split, sizes, f'npz:{path}')
  images, labels = arrays[f'{name}_images'][rows], arrays[f'{name}_labels'][rows]
  return ArraySource(images, labels.astype(np.int32))


# --- normalisation constants ---------------------------------------------------------------------


def channel_stats(
  source: Sequence[dict[str, Any]], fit: Callable[[np.ndarray], np.ndarray]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and standard deviation of the [0, 1]-scaled pixels of at most
  `STATS_MAX_EXAMPLES` evenly spaced records of `source`, each image passed through `fit`."""
  rows = np.linspace(0, len(source) - 1, min(len(source), STATS_MAX_EXAMPLES)).astype(int)
  total = total_sq = 0.0
  count = 0
  for row in np.unique(rows):
    pixels = fit(source[int(row)]['image']).astype(np.float64) / 255.0
    pixels = pixels.reshape(-1, pixels.shape[-1])
    total, total_sq, count = (
      total + pixels.sum(0),
      total_sq + (pixels**2).sum(0),
      count + len(pixels),
    )
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _cached_stats(dataset: str, data_dir: str, shape: tuple, split: str) -> tuple[tuple, tuple]:
  """`channel_stats` of `split` at `shape`, cached in the data's `lpe_cache/`."""
  kind = form(dataset)
  folder = os.path.join(data_dir, 'lpe_cache') if kind == 'tfds' else None
  if kind == 'folder':
    folder = os.path.join(_path(dataset), 'lpe_cache')
  name = dataset if kind == 'tfds' else kind
  stats_file = f'{name}-{split_key(split)}-stats-{shape[0]}x{shape[1]}.json'
  cache = folder and os.path.join(folder, stats_file)
  if cache and os.path.exists(cache):
    with open(cache) as f:
      saved = json.load(f)
    return tuple(saved['mean']), tuple(saved['std'])
  source = open_split(dataset, split, data_dir)
  stats = channel_stats(source, lambda image: transforms.resize(image, shape[0], shape[1]))
  if cache:
    try:
      os.makedirs(folder, exist_ok=True)
      files.write_atomic(cache, json.dumps({'mean': stats[0], 'std': stats[1]}))
    except (OSError, files.StorageError):  # Read-only data: computed again next time.
      pass
  return stats
