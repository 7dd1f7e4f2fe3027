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
from collections.abc import Callable
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


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over every device of every process, with axis `'data'`."""
  return jax.sharding.Mesh(np.array(jax.devices()), (AXIS,))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """The sharding of arrays held whole on every device (params, optimizer state)."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def batch_sharded(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """The sharding of arrays split along their first (batch) axis over the mesh."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def process_rows(global_batch: int) -> slice:
  """The rows of a global batch that this process feeds (its devices' contiguous share)."""
  per_process = global_batch // jax.process_count()
  return slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)


def global_batch(local: Any, sharding: jax.sharding.NamedSharding) -> Any:
  """Assembles this process's rows of each array into global arrays sharded along the batch."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def per_device(local: Any) -> Any:
  """Reshapes this process's rows `[n, ...]` to `[local devices, n / devices, ...]` for pmap."""
  devices = jax.local_device_count()
  return jax.tree.map(lambda x: x.reshape(devices, x.shape[0] // devices, *x.shape[1:]), local)


def replicate_for_pmap(tree: Any) -> Any:
  """Copies a pytree onto every local device, stacked along a leading device axis, for pmap."""
  devices = jax.local_devices()
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
  `'pmap'`, over every device of every process.

  The canonical state (checkpoints, evaluation, export) is always mesh-replicated; under pmap the
  step works on a per-device copy (`state`, and `canonical` to come back).
  """

  def __init__(self, mode: str):
    if mode not in ('jit', 'pmap'):
      raise ValueError(f'config.parallelism={mode!r} is unknown; use jit or pmap.')
    self.mode = mode
    self.mesh = make_mesh()
    self.replicated = replicated(self.mesh)
    self.sharded = batch_sharded(self.mesh)

  def compile(self, step: Callable) -> Callable:
    """`step` compiled for this mode, donating its first argument (the state)."""
    if self.mode == 'pmap':
      step = functools.partial(step, axis_name=AXIS)
      return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,))
    return jax.jit(step, donate_argnums=(0,))

  def state(self, canonical: Any) -> Any:
    """Canonical (mesh-replicated) state to the form the step takes."""
    if self.mode == 'pmap':
      return replicate_for_pmap(canonical)
    return jax.device_put(canonical, self.replicated)

  def canonical(self, state: Any) -> Any:
    """The step's state back to the canonical, mesh-replicated form."""
    return unreplicate(state, self.mesh) if self.mode == 'pmap' else state

  def batch(self, local_rows: Any) -> Any:
    """This process's rows of a global batch, placed for the step."""
    if self.mode == 'pmap':
      return per_device(local_rows)
    return global_batch(local_rows, self.sharded)

  def metrics(self, metrics: Any) -> Any:
    """The step's metrics as one (global) value each."""
    return first_replica(metrics) if self.mode == 'pmap' else metrics

  def resident(self, tree: Any) -> Any:
    """Host arrays (a whole split, cached teacher outputs) held whole on every device."""
    if self.mode == 'pmap':
      return replicate_for_pmap(tree)
    place = lambda x: jax.make_array_from_process_local_data(self.replicated, np.asarray(x))
    return jax.tree.map(place, tree)

  def compile_take(self) -> Callable[[Any, Any], Any]:
    """`take(resident, index)`: the rows `index` (placed by `batch`) of each resident array,
    gathered on the devices and placed like a batch."""
    take = lambda tree, index: jax.tree.map(lambda x: x[index], tree)
    if self.mode == 'pmap':
      return jax.pmap(take, axis_name=AXIS)
    return jax.jit(take, out_shardings=self.sharded)
