"""The streaming input: batches read record by record from the dataset's files as training runs.

For splits too large for memory (ImageNet) or images of mixed sizes (`config.input='stream'`, or
'auto' for those), a grain pipeline reads each step's records from the dataset's random-access
source (TFDS array_record, a folder of images or an .npz; `lpe.sources`), and decodes, resizes and
augments them in `config.input_workers` host processes (`lpe.transforms`):

- the batches are those of the in-memory path (`lpe.data.train_index_batches`, a pure function of
  `(seed, epoch)`), so without augmentation a streamed run trains bitwise like an in-memory one;
- each process reads only its own records: its rows of every global batch, or with
  `config.distributed.per_process_data` its contiguous shard of the split (`data.shard_rows`);
- each image's augmentation is drawn from `(seed, epoch, step, row in the global batch)`, so it
  depends neither on the worker count nor on the process count;
- the input's position is the train state's step: a resumed run (from the orbax checkpoint that
  holds that step) restarts the pipeline at exactly the next batch.

`StreamFeed` is the trainer's `Feed` for this path and `EvalStream` the test split's batches.
"""

import functools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from lpe import data, objectives, parallel, sources, transforms
from lpe import feed as feed_lib

# The largest training split (its images' bytes) that `config.input='auto'` holds in memory.
IN_MEMORY_MAX_BYTES = 8 * 2**30
# Batches each reader (a worker, or this process without workers) prepares ahead.
PREFETCH_BATCHES = 2

View = Callable[[np.ndarray, np.random.Generator | None], np.ndarray]


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError for what the streaming input needs and cannot do: ImageNet-style
  augmentation needs it (with an image size), and with `config.input='stream'`, whatever needs
  the whole split in memory (`check_streamable`)."""
  if config.augment == 'imagenet':
    if config.input in ('device', 'host') or not config.image_size:
      raise ValueError(
        "config.augment='imagenet' crops each image at its own size, which needs "
        "config.input='stream' (or 'auto') and config.image_size > 0 (e.g. 224); set them."
      )
  if config.input == 'stream':
    check_streamable(config)


def check_streamable(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError for what streaming cannot do: whatever needs the whole split in memory,
  and a masked last batch (`config.last_batch='masked'`), which it does not implement."""
  needs_split = {
    'teacher.cache_outputs=True': config.teacher.cache_outputs
    and objectives.active(config.distill),
    f'distill.lp_graph={config.distill.lp_graph!r}': config.distill.lp_graph != 'batch',
    f'train_subset={config.train_subset}': config.train_subset > 0,
  }
  for what, on in needs_split.items():
    if on:
      raise ValueError(
        f"config.{what} needs the whole training split in memory, which config.input='stream' "
        "does not hold; turn it off or use config.input='device' or 'host'."
      )
  if config.last_batch != 'drop':
    raise ValueError(
      f"config.last_batch={config.last_batch!r} is not implemented for config.input='stream' "
      "(streamed epochs drop their last partial batch); use last_batch='drop' or "
      "config.input='device' or 'host'."
    )


def streams(config: ml_collections.ConfigDict, num_examples: int, info: data.DatasetInfo) -> bool:
  """Whether the training split streams: `config.input='stream'`, or 'auto' with augment='imagenet'
  or a split whose images take more than `IN_MEMORY_MAX_BYTES`."""
  if config.input != 'auto':
    return config.input == 'stream'
  size = num_examples * int(np.prod(info.image_shape))
  return config.augment == 'imagenet' or size > IN_MEMORY_MAX_BYTES


def image_view(augment: str, image_shape: tuple[int, int, int], *, train: bool) -> View:
  """How a decoded image becomes a `image_shape` input: for training, `augment`'s random view
  (from the generator it is given); for evaluation, the matching deterministic view."""
  height, width = image_shape[:2]
  if augment == 'imagenet':
    if train:
      return lambda image, rng: transforms.flip(
        transforms.random_resized_crop(image, height, rng), rng
      )
    return lambda image, rng: transforms.centre_crop(image, height)
  fit = functools.partial(_fit, height=height, width=width)
  if augment == 'cifar' and train:
    return lambda image, rng: transforms.pad_crop_flip(fit(image), rng)
  return lambda image, rng: fit(image)


def _fit(image: np.ndarray, *, height: int, width: int) -> np.ndarray:
  return transforms.resize(image, height, width)


@functools.lru_cache(maxsize=2)
def _permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  return data.epoch_permutation(num_examples, seed=seed, epoch=epoch)


class StepBatches:
  """`step -> (images uint8 [b, H, W, C], labels int32 [b])`: this process's rows of the global
  batch of a run's step (steps counted from the start of training). Runs in the input workers,
  so it holds only what pickles cheaply (the source, the seed and the shapes).

  Args:
    source: The training split's records.
    seed: The run's seed.
    steps_per_epoch: Steps in each epoch.
    index_batch: The batch the index batches are drawn for (`data.train_index_batches`).
    rows: The rows of each index batch that this process reads.
    first_row: The global-batch row of `rows.start` (each image's augmentation is drawn from it).
    shard: The source records the index batches number (`data.shard_rows`).
    augment: `config.augment`; shape: the images' `[H, W, C]`.
  """

  def __init__(
    self, source, *, seed, steps_per_epoch, index_batch, rows, first_row, shard, augment, shape
  ):
    self.source, self.seed, self.steps_per_epoch = source, seed, steps_per_epoch
    self.index_batch, self.rows, self.first_row, self.shard = index_batch, rows, first_row, shard
    self.augment, self.shape = augment, shape

  def keys(self, step: int) -> np.ndarray:
    """The source records (int64 `[b]`) this process reads for `step`."""
    epoch, offset = divmod(step, self.steps_per_epoch)
    order = _permutation(len(self.shard), self.seed, epoch)
    batch = order[offset * self.index_batch : (offset + 1) * self.index_batch]
    return batch[self.rows] + self.shard.start

  def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    epoch, offset = divmod(step, self.steps_per_epoch)
    view = image_view(self.augment, self.shape, train=True)
    images, labels = [], []
    for row, key in enumerate(self.keys(step), self.first_row):
      record = self.source[int(key)]
      images.append(view(record['image'], np.random.default_rng([self.seed, epoch, offset, row])))
      labels.append(record['label'])
    return np.stack(images).astype(np.uint8), np.asarray(labels, np.int32)


def iterate(fn: Callable[[int], Any], indices: range, workers: int) -> grain.DatasetIterator:
  """`fn(i)` for each `i` of `indices`, in order, computed in `workers` processes (0: here, in a
  background thread), each preparing `PREFETCH_BATCHES` ahead."""
  read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=PREFETCH_BATCHES)
  dataset = grain.MapDataset.range(indices.start, indices.stop).map(fn).to_iter_dataset(read)
  if workers:
    from absl import flags

    if not flags.FLAGS.is_parsed():  # A notebook or test: grain reads its flags' defaults.
      flags.FLAGS.mark_as_parsed()
    options = grain.MultiprocessingOptions(
      num_workers=workers, per_worker_buffer_size=PREFETCH_BATCHES
    )
    dataset = dataset.mp_prefetch(options, worker_init_fn=_exit_with_parent)
  return iter(dataset)


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
  """Ends an input worker soon after its trainer dies: a SIGKILL gives the trainer no time to stop
  its workers, which would otherwise wait forever."""
  del worker_index, worker_count
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(0)

  threading.Thread(target=watch, daemon=True).start()


class StreamFeed:
  """The inputs of every train step, streamed: the `lpe.feed.Feed` of `config.input='stream'`."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    source: Sequence[dict[str, Any]],
    info: data.DatasetInfo,
    place: parallel.Placement,
  ):
    """Streams `source` (the whole training split) for `config`'s steps, placed by `place`."""
    share = feed_lib.batch_share(config)
    shard = data.shard_rows(len(source), share.shard)
    self.steps_per_epoch = feed_lib.steps_in_epoch(config, len(shard), share)
    self.batches = StepBatches(
      source,
      seed=config.seed,
      steps_per_epoch=self.steps_per_epoch,
      index_batch=share.index_batch,
      rows=share.rows,
      first_row=share.first_row,
      shard=shard,
      augment=config.augment,
      shape=info.image_shape,
    )
    self._place, self._workers = place, config.input_workers
    self._total = self.steps_per_epoch * config.num_epochs
    self._iterator, self._next = None, -1

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[feed_lib.StepInputs]:
    """The inputs of the steps of `epoch` from its step `start_step` on."""
    at = epoch * self.steps_per_epoch + start_step
    if at != self._next:  # A fresh run, or a resume: the pipeline starts at this step.
      self.close()
      self._iterator = iterate(self.batches, range(at, self._total), self._workers)
      self._next = at
    for _ in range(self.steps_per_epoch - start_step):
      images, labels = next(self._iterator)
      self._next += 1
      yield (*self._place.batch((images, labels)), None, None, None)

  def close(self) -> None:
    """Stops the input workers."""
    if self._iterator is not None:
      self._iterator.close()
      self._iterator, self._next = None, -1


class EvalBatches:
  """`b -> (images, labels, mask)`: evaluation batch `b` of `batch_size` rows, the last padded;
  only this process's rows of each batch are read (the others stay zero)."""

  def __init__(self, source, *, batch_size: int, rows: slice, augment: str, shape):
    self.source, self.batch_size, self.rows = source, batch_size, rows
    self.view = image_view(augment, shape, train=False)
    self.shape = shape

  def __call__(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    start = b * self.batch_size
    mask = np.arange(start, start + self.batch_size) < len(self.source)
    images = np.zeros((self.batch_size, *self.shape), np.uint8)
    labels = np.zeros(self.batch_size, np.int32)
    for row in range(self.rows.start, self.rows.stop):
      if mask[row]:
        record = self.source[start + row]
        images[row], labels[row] = self.view(record['image'], None), record['label']
    return images, labels, mask


class EvalStream:
  """A test split read as it is evaluated: `len()` and `eval_batches(batch_size)`, which
  `lpe.evaluate` takes in place of an in-memory `data.Split`."""

  def __init__(self, source, *, augment: str, shape, workers: int):
    self.source, self.augment, self.shape, self.workers = source, augment, shape, workers

  def __len__(self) -> int:
    return len(self.source)

  def eval_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`(images, labels, mask)` batches covering every example once (`data.eval_batches`)."""
    fn = EvalBatches(
      self.source,
      batch_size=batch_size,
      rows=parallel.process_rows(batch_size),
      augment=self.augment,
      shape=self.shape,
    )
    iterator = iterate(fn, range(-(-len(self) // batch_size)), self.workers)
    try:
      yield from iterator
    finally:
      iterator.close()


def open_streams(
  config: ml_collections.ConfigDict, info: data.DatasetInfo, place: parallel.Placement
) -> tuple[StreamFeed, EvalStream]:
  """The run's streamed training feed and test split."""
  data_dir = config.data_dir or None
  train = sources.open_split(config.dataset, config.train_split, data_dir)
  test = sources.open_split(config.dataset, config.test_split, data_dir)
  shape = info.image_shape
  evaluation = EvalStream(test, augment=config.augment, shape=shape, workers=config.input_workers)
  return StreamFeed(config, train, info, place), evaluation


def test_split(
  dataset: str,
  split: str,
  data_dir: str | None,
  info: data.DatasetInfo,
  *,
  image_size: int = 0,
  augment: str = 'none',
  workers: int = 0,
) -> data.Split | EvalStream:
  """A split to evaluate on: in memory (`data.load_split`) when its images fit in
  `IN_MEMORY_MAX_BYTES` and need no ImageNet-style centre crop, else streamed."""
  source = sources.open_split(dataset, split, data_dir)
  if augment == 'imagenet' or len(source) * np.prod(info.image_shape) > IN_MEMORY_MAX_BYTES:
    return EvalStream(source, augment=augment, shape=info.image_shape, workers=workers)
  return data.load_split(dataset, split, data_dir, image_size=image_size)
