"""Where each train step's inputs come from.

A `Feed` turns the deterministic index batches of an epoch (`data.train_index_batches`, a pure
function of `(seed, epoch)`) into the step's inputs `(images, labels, teacher_outputs)`, placed for
the data-parallel mode: gathered on the devices from a split held there (`'device'` input), or
copied from host memory (`'host'`), with this process's rows of every global batch and, when the
teacher's outputs are cached, their rows too. Every path gives the same batches, bit for bit.

With `config.last_batch='masked'` an epoch also trains on its last partial batch, padded to the
batch's shape: each step then also gets `valid`, which of its rows hold the batch's own examples
(`data.valid_rows`; the step leaves the others out of every loss and statistic). With 'drop' (the
default) that input is None and the last partial batch is left out.

With LP over the whole split's teacher graph (`config.distill.lp_graph` 'neighbours' or 'bank'),
the graph is held on the devices too and each step also gets its examples' ids and graph rows;
for 'neighbours' the batches are anchors with some of their graph neighbours
(`lpe.sampling.neighbour_aware_index_batches`, a pure function of `(seed, epoch, step)`).
"""

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from lpe import data, losses, objectives, parallel, sampling

# The largest split (images) the device-resident input path takes when `config.input` is 'auto'.
DEVICE_INPUT_MAX_BYTES = 2 * 2**30

# `(images, labels, teacher_outputs, graph, valid)`, as `lpe.step.train_step` takes them.
StepInputs = tuple[jax.Array, jax.Array, Any, Any, Any]


def per_process_data(config: ml_collections.ConfigDict) -> bool:
  """Whether each process holds only its share of the training split."""
  return config.distributed.per_process_data and jax.process_count() > 1


@dataclasses.dataclass(frozen=True)
class BatchShare:
  """What a process feeds of each step's global batch (`batch_share`).

  Attributes:
    index_batch: The batch its index batches are drawn for: its share of the global batch when it
      holds only its share of the data, else the whole global batch (of which it feeds its rows).
    rows: The rows of each index batch that it feeds.
    first_row: The global-batch row of `rows.start`.
    shard: `(index, count)`, the shard of the training split it holds (`data.shard_rows`), or
      None: it holds the whole split.
  """

  index_batch: int
  rows: slice
  first_row: int
  shard: tuple[int, int] | None

  @property
  def per_process(self) -> bool:
    return self.shard is not None


def batch_share(
  config: ml_collections.ConfigDict, process: tuple[int, int] | None = None
) -> BatchShare:
  """This process's share of each step's global batch and of the training split, the same for
  the in-memory input (`Feed`) and the streamed one (`lpe.stream.StreamFeed`); `process`:
  `(index, count)` of the process (None: this one)."""
  index, count = process or (jax.process_index(), jax.process_count())
  if config.distributed.per_process_data and count > 1:
    size = config.batch_size // count
    return BatchShare(size, slice(0, size), index * size, (index, count))
  rows = parallel.process_rows(step_batch_size(config), (index, count))
  return BatchShare(config.batch_size, rows, rows.start, None)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError for what a masked last batch (`config.last_batch='masked'`) is not
  implemented with, and for what per-process data (`config.distributed.per_process_data` on
  several processes) cannot do: whatever needs the whole training split on every process, or
  per-process arrays on the devices under sharded jit."""
  _check_last_batch(config)
  if not per_process_data(config):
    return
  if config.train_subset:
    raise ValueError(
      'config.train_subset draws one subset of the whole training split, but '
      'config.distributed.per_process_data=True gives each process only its share; turn one off.'
    )
  if config.distill.lp_graph != 'batch':
    raise ValueError(
      f'config.distill.lp_graph={config.distill.lp_graph!r} needs the whole training split on '
      'every process (the graph and its example ids are global), but '
      'config.distributed.per_process_data=True gives each process only its share; turn one off.'
    )
  if config.parallelism == 'jit':
    caching = config.teacher.cache_outputs and bool(objectives.active(config.distill))
    for what, on in (
      ('input=device', config.input == 'device'),
      ('teacher.cache_outputs', caching),
    ):
      if on:
        raise ValueError(
          f'config.{what} holds per-process data on the devices, which sharded jit cannot do '
          'with config.distributed.per_process_data=True on several processes; use '
          'parallelism=pmap, or turn one of them off.'
        )


def input_path(config: ml_collections.ConfigDict, split: data.Split) -> str:
  """'device' or 'host': where `config.input` ('auto', 'device', 'host') puts the training split.

  'auto' holds the split on the devices when its images take at most `DEVICE_INPUT_MAX_BYTES`
  (MNIST, Fashion-MNIST and CIFAR all do): only the batch's indices cross to the devices each
  step, and the gather, augmentation and the step run there. Both paths give the same batches.
  Under sharded jit with per-process data the split differs between processes, which a
  mesh-replicated array cannot hold, so 'auto' is 'host' there.
  """
  if config.input in ('device', 'host'):
    return config.input
  if per_process_data(config) and config.parallelism == 'jit':
    return 'host'
  return 'device' if split.images.nbytes <= DEVICE_INPUT_MAX_BYTES else 'host'


class Feed:
  """The inputs of every train step of a run, epoch by epoch."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    split: data.Split,
    place: parallel.Placement,
    teacher_outputs: Any = None,
    graph: losses.NeighbourGraph | None = None,
  ):
    """Holds `split` (this process's share with per-process data) for `config`'s steps.

    Args:
      config: The run's config (batch_size, seed, input, last_batch, steps_per_epoch_limit,
        distributed).
      split: The training split as this process holds it.
      place: The data-parallel placement of the step.
      teacher_outputs: The teacher's `(logits, features)` for every example of `split`
        (`lpe.teacher.outputs_cache`), held on the devices beside the split, or None.
      graph: The teacher's kNN graph over `split` (`lpe.losses.teacher_graph`) when LP uses it:
        each step then gets its rows' ids and graph rows.
    """
    self._split, self._place, self._seed = split, place, config.seed
    self._graph = graph
    self._neighbours = config.distill.lp_graph == 'neighbours' and config.distill.graph_neighbours
    self._layout = config.distill.neighbour_batches
    self._last_batch = config.last_batch
    share = batch_share(config)
    self._index_batch, self._rows = share.index_batch, share.rows
    self.steps_per_epoch = steps_in_epoch(config, len(split), share)
    resident = {}
    if input_path(config, split) == 'device':
      resident.update(images=split.images, labels=split.labels)
    if teacher_outputs is not None:
      resident['teacher'] = teacher_outputs
    if graph is not None:
      resident['graph'] = {'indices': graph.indices, 'weights': graph.weights}
    self._resident = place.resident(resident) if resident else None
    self._take = place.compile_take()

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[StepInputs]:
    """The inputs of the steps of `epoch` from its step `start_step` on."""
    kwargs = dict(batch_size=self._index_batch, seed=self._seed, epoch=epoch, start_step=start_step)
    if self._neighbours:
      indices = sampling.neighbour_aware_index_batches(
        len(self._split),
        self._graph.indices,
        neighbours_per_anchor=self._neighbours,
        layout=self._layout,
        **kwargs,
      )
    else:
      indices = data.train_index_batches(len(self._split), last_batch=self._last_batch, **kwargs)
    # The range first: zip stops at the epoch's last step without drawing another batch.
    for step, index in zip(range(start_step, self.steps_per_epoch), indices, strict=False):
      yield self._inputs(index, step)

  def close(self) -> None:
    """Nothing to stop: this input has no worker processes (`lpe.stream.StreamFeed` has)."""

  def _inputs(self, index: np.ndarray, step: int) -> StepInputs:
    """The step's inputs for the examples `index` (the global batch's indices) of step `step`."""
    local = index[self._rows]
    placed = self._place.batch(local) if self._resident else None
    gathered = self._take(self._resident, placed) if self._resident else {}
    if 'images' in gathered:
      images, labels = gathered['images'], gathered['labels']
    else:
      images, labels = self._place.batch((self._split.images[local], self._split.labels[local]))
    graph = None
    if 'graph' in gathered:
      graph = dict(gathered['graph'], ids=placed)
    valid = None
    if self._last_batch == 'masked':
      valid = self._place.batch(data.valid_rows(len(self._split), len(index), step)[self._rows])
    return images, labels, gathered.get('teacher'), graph, valid


def _check_last_batch(config: ml_collections.ConfigDict) -> None:
  if config.last_batch == 'drop':
    return
  refused = {
    # The graph samplers' batches and the memory bank's rows are the whole batch's.
    f'distill.lp_graph={config.distill.lp_graph!r}': config.distill.lp_graph != 'batch',
    # Each process's share would end its epoch on a partial batch of its own.
    'distributed.per_process_data=True': per_process_data(config),
    # A device whose rows are all padding would have no statistics of its own.
    'sync_batch_stats=False': config.parallelism == 'pmap' and not config.sync_batch_stats,
  }
  for what, on in refused.items():
    if on:
      raise ValueError(
        f"config.last_batch='masked' is not implemented with config.{what}; use "
        'last_batch=drop or turn that setting off.'
      )


def step_batch_size(config: ml_collections.ConfigDict) -> int:
  """Rows of a step's global batch: `batch_size`, or with graph neighbours added on top of the
  anchors (`distill.neighbour_batches='added'`) `batch_size * (1 + graph_neighbours)`."""
  d = config.distill
  if d.lp_graph == 'neighbours' and d.neighbour_batches == 'added':
    return config.batch_size * (1 + d.graph_neighbours)
  return config.batch_size


def steps_in_epoch(config: ml_collections.ConfigDict, num_examples: int, share: BatchShare) -> int:
  """Steps in an epoch of `num_examples` (this process's share with per-process data) drawn in
  index batches of `share.index_batch` (the last partial one dropped or masked,
  `config.last_batch`), capped by `config.steps_per_epoch_limit`."""
  steps = data.steps_per_epoch(num_examples, share.index_batch, config.last_batch)
  if share.per_process:  # Shares differ by at most one example: every process takes the fewest.
    steps = int(np.min(multihost_utils.process_allgather(np.int32(steps))))
  if config.steps_per_epoch_limit:
    steps = min(steps, config.steps_per_epoch_limit)
  return steps
