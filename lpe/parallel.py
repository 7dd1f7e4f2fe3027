"""Devices and hosts: the data-parallel mesh, batch placement, and multi-host start-up.

Two data-parallel modes, one result:
- `'jit'` (default): the train step is `jax.jit`-compiled over a 1-D device mesh; the batch is
  sharded along `'data'` with `NamedSharding` and XLA inserts the collectives. BatchNorm statistics
  are over the global batch.
- `'pmap'`: the classic SPMD path; the step runs per device with axis name `'data'`, gradients
  and metrics are `pmean`-ed and the LP loss gathers the features over the axis.
Either way the LP neighbourhoods are taken over the global batch, so the loss does not depend on
the device count.
"""

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

AXIS = 'data'


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """Starts multi-host JAX when the config or the environment asks for it.

  Config: `distributed.coordinator_address`, `num_processes`, `process_id`. Environment:
  `LPE_COORDINATOR_ADDRESS`, `LPE_NUM_PROCESSES`, `LPE_PROCESS_ID`. On TPU pods and SLURM,
  `distributed.auto=True` lets JAX detect everything. Call before any other JAX work.
  """
  dist = config.get('distributed')
  address = (dist and dist.coordinator_address) or os.environ.get('LPE_COORDINATOR_ADDRESS', '')
  auto = bool(dist and dist.auto)
  if not address and not auto:
    return
  if jax.distributed.is_initialized():
    return
  if auto:
    jax.distributed.initialize()
    return
  num = (dist and dist.num_processes) or int(os.environ.get('LPE_NUM_PROCESSES', '0'))
  pid = dist.process_id if dist and dist.process_id >= 0 else None
  pid = pid if pid is not None else int(os.environ.get('LPE_PROCESS_ID', '-1'))
  if num < 1 or pid < 0:
    raise ValueError(
      f'Multi-host needs the number of processes and this process id with coordinator {address}; '
      'set config.distributed.num_processes and process_id (or LPE_NUM_PROCESSES and '
      'LPE_PROCESS_ID).'
    )
  # Collectives between CPU processes (harmless on GPU/TPU, where the CPU client is unused).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(address, num_processes=num, process_id=pid)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh with axis `'data'` over `devices` (every device of every process when None)."""
  return jax.sharding.Mesh(np.array(jax.devices() if devices is None else devices), (AXIS,))


# One process on CPU splits a batch over its host devices (one per core, `lpe.xla_cpu`) only when
# each device gets at least this much forward work per step (student and teacher, FLOPs): below
# it the split's own cost ate the gain (docs/performance.md, "Every core").
MIN_SPLIT_FLOPS = 2e8


def forward_flops(module: Any, image_shape: tuple[int, ...], variables: Any = None) -> float:
  """XLA's count of the floating-point operations of one example's forward pass through
  `module` (in eval mode), from its lowered computation: nothing is compiled or run. 0 when
  the backend gives no count."""
  import jax.numpy as jnp  # noqa: PLC0415

  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  if variables is None:
    variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)
  cost = jax.jit(lambda v, x: module.apply(v, x, train=False)).lower(variables, x).cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  return float((cost or {}).get('flops', 0.0))


def fixed_device_count() -> int:
  """The devices every run uses whatever its config (`choose_devices`): all of them on GPUs, TPUs
  and several processes; 1 (at least) on one CPU process, which chooses its count per run."""
  if jax.process_count() > 1 or jax.default_backend() != 'cpu':
    return jax.device_count()
  return 1


def choose_devices(
  requested: int,
  batch_size: int,
  flops_per_example: Callable[[], float],
  fits: Callable[[int], bool],
) -> list[jax.Device]:
  """The devices a run trains on.

  On GPUs and TPUs, and on several processes, every device. One process on CPU (whose host
  devices `lpe.xla_cpu.configure` makes one per core) takes `requested` of them (at most the
  count there is), or with `requested=0` chooses: every host device when each then gets at least
  `MIN_SPLIT_FLOPS` of forward work per step (`flops_per_example() * batch_size / devices`), and
  one device otherwise; fewer when `fits(n)` (the config's divisibility checks) says no.

  The choice depends only on the machine's core count, the models and the config, so a run
  resumed on the same machine gets the same devices and resumes bitwise; other device counts
  train the same model up to float32 rounding.
  """
  devices = jax.devices()
  if jax.process_count() > 1 or jax.default_backend() != 'cpu':
    return devices
  if requested > len(devices):
    raise ValueError(
      f'config.cpu_devices={requested} asks for more CPU devices than this process has '
      f'({len(devices)}); lower it, or set LPE_CPU_DEVICES={requested} before JAX starts '
      '(lpe.xla_cpu).'
    )
  if requested:
    return devices[:requested]
  n, flops = len(devices), functools.cache(flops_per_example)
  while n > 1 and not (fits(n) and flops() * batch_size / n >= MIN_SPLIT_FLOPS):
    n -= 1
  return devices[:n]


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """The sharding of arrays held whole on every device (params, optimizer state)."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def batch_sharded(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """The sharding of arrays split along their first (batch) axis over the mesh."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises a ValueError for batches that do not divide over `num_devices` devices, or BatchNorm
  statistics per device under sharded jit (which has only the global batch's)."""
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] % num_devices:
      raise ValueError(
        f'config.{key}={config[key]} does not divide over {num_devices} devices; use a multiple '
        f'of {num_devices}.'
      )
  if config.parallelism == 'jit' and not config.sync_batch_stats:
    raise ValueError(
      'config.sync_batch_stats=False needs config.parallelism=pmap: under sharded jit BatchNorm '
      'statistics are always over the global batch.'
    )


def process_rows(global_batch: int, process: tuple[int, int] | None = None) -> slice:
  """The rows of a global batch that this process feeds (its devices' contiguous share);
  `process`: `(index, count)` of the process (None: this one)."""
  index, count = process or (jax.process_index(), jax.process_count())
  per_process = global_batch // count
  return slice(index * per_process, (index + 1) * per_process)


def global_batch(local: Any, sharding: jax.sharding.NamedSharding) -> Any:
  """Assembles this process's rows of each array into global arrays sharded along the batch."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def per_device(local: Any, devices: int | None = None) -> Any:
  """Reshapes this process's rows `[n, ...]` to `[devices, n / devices, ...]` for pmap (`devices`:
  the count pmap maps over; every local device when None)."""
  devices = jax.local_device_count() if devices is None else devices
  return jax.tree.map(lambda x: x.reshape(devices, x.shape[0] // devices, *x.shape[1:]), local)


def replicate_for_pmap(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
  """Copies a pytree onto `devices` (every local device when None), stacked along a leading
  device axis, for pmap."""
  devices = jax.local_devices() if devices is None else devices
  sharding = jax.sharding.NamedSharding(
    jax.sharding.Mesh(np.array(devices), (AXIS,)), jax.sharding.PartitionSpec(AXIS)
  )
  stack = lambda x: jax.device_put(np.broadcast_to(x, (len(devices), *np.shape(x))), sharding)
  return jax.tree.map(stack, jax.device_get(tree))


def first_replica(tree: Any) -> Any:
  """This process's first copy of each leaf of a pmap output, as host arrays."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)


def unreplicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Takes the first local copy of a pmap-replicated pytree, as a mesh-replicated pytree."""
  return jax.device_put(first_replica(tree), replicated(mesh))


class Placement:
  """Where the state, batches and resident arrays live for a data-parallel mode, `'jit'` or
  `'pmap'`, over `devices` (every device of every process when None; `choose_devices`).

  The canonical state (checkpoints, evaluation, export) is always mesh-replicated; under pmap the
  step works on a per-device copy (`state`, and `canonical` to come back).
  """

  def __init__(self, mode: str, devices: Sequence[jax.Device] | None = None):
    if mode not in ('jit', 'pmap'):
      raise ValueError(f'config.parallelism={mode!r} is unknown; use jit or pmap.')
    self.mode = mode
    self.devices = list(jax.devices() if devices is None else devices)
    # pmap maps over this process's share of the devices; given all of them it is told none (on
    # several processes pmap wants every device or none).
    self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
    self._pmap_devices = None if len(self.devices) == jax.device_count() else self.devices
    self.mesh = make_mesh(self.devices)
    self.replicated = replicated(self.mesh)
    self.sharded = batch_sharded(self.mesh)

  def compile(self, step: Callable) -> Callable:
    """`step` compiled for this mode, donating its first argument (the state)."""
    if self.mode == 'pmap':
      step = functools.partial(step, axis_name=AXIS)
      return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,), devices=self._pmap_devices)
    return jax.jit(step, donate_argnums=(0,))

  def state(self, canonical: Any) -> Any:
    """Canonical (mesh-replicated) state to the form the step takes."""
    if self.mode == 'pmap':
      return replicate_for_pmap(canonical, self.local_devices)
    return jax.device_put(canonical, self.replicated)

  def canonical(self, state: Any) -> Any:
    """The step's state back to the canonical, mesh-replicated form."""
    return unreplicate(state, self.mesh) if self.mode == 'pmap' else state

  def batch(self, local_rows: Any) -> Any:
    """This process's rows of a global batch, placed for the step."""
    if self.mode == 'pmap':
      return per_device(local_rows, len(self.local_devices))
    return global_batch(local_rows, self.sharded)

  def metrics(self, metrics: Any) -> Any:
    """The step's metrics as one (global) value each."""
    return first_replica(metrics) if self.mode == 'pmap' else metrics

  def resident(self, tree: Any) -> Any:
    """Host arrays (a whole split, cached teacher outputs) held whole on every device."""
    if self.mode == 'pmap':
      return replicate_for_pmap(tree, self.local_devices)
    place = lambda x: jax.make_array_from_process_local_data(self.replicated, np.asarray(x))
    return jax.tree.map(place, tree)

  def compile_take(self) -> Callable[[Any, Any], Any]:
    """`take(resident, index)`: the rows `index` (placed by `batch`) of each resident array,
    gathered on the devices and placed like a batch."""
    take = lambda tree, index: jax.tree.map(lambda x: x[index], tree)
    if self.mode == 'pmap':
      return jax.pmap(take, axis_name=AXIS, devices=self._pmap_devices)
    return jax.jit(take, out_shardings=self.sharded)
