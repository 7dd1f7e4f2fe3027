"""graph_batch_locality_loss and the memory bank over 4 and 8 fake CPU devices vs. one device.

As in test_locality_loss_devices.py, the checks run once in a fresh Python process (`_SCRIPT`,
started with 8 host devices) that prints one JSON line of results; each test asserts on its entry.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

_SCRIPT = r"""
import json
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

import functools

from lpe.losses import (
    graph_batch_locality_loss, memory_bank_locality_loss, memory_bank_moments, update_memory_bank
)

assert jax.device_count() == 8, jax.devices()
N_GLOBAL, NUM_EXAMPLES, K, D = 32, 24, 4, 3
rng = np.random.default_rng(0)
GRAPH = np.stack([rng.choice(np.delete(np.arange(NUM_EXAMPLES), i), K, replace=False)
                  for i in range(NUM_EXAMPLES)])
GRAPH_WEIGHTS = rng.uniform(0.1, 1.0, size=(NUM_EXAMPLES, K)).astype(np.float32)
# 32 rows from 16 ids: ids repeat within and across devices; 16..23 are never in the batch.
IDS = rng.integers(0, 16, size=N_GLOBAL).astype(np.int32)
STUDENT = rng.normal(size=(N_GLOBAL, D)).astype(np.float32)
MASKS = {'default': np.ones(N_GLOBAL, bool), 'mask': rng.random(N_GLOBAL) > 0.25}
BANK = rng.normal(size=(NUM_EXAMPLES, D)).astype(np.float32)
INPUTS = (STUDENT, IDS, GRAPH[IDS], GRAPH_WEIGHTS[IDS])


def loss_and_grad(student, ids, nbrs, weights, mask, use_mask, axis_name=None, scale='none'):
    # Loss of these rows and jax.grad of their mean w.r.t. these rows' student features.
    where = mask if use_mask else None
    loss_fn = lambda s: graph_batch_locality_loss(s, ids, nbrs, weights, axis_name=axis_name,
                                                  where=where, student_scale=scale)
    return loss_fn(student), jax.grad(lambda s: jnp.mean(loss_fn(s)))(student)


def by_pmap(fn, n_devices, args):
    split = lambda x: x.reshape(n_devices, -1, *x.shape[1:])
    out = jax.pmap(fn, axis_name='data', devices=jax.devices()[:n_devices])(*map(split, args))
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), out)


def by_shard_map(fn, n_devices, args):
    mesh = Mesh(np.array(jax.devices()[:n_devices]), ('data',))
    specs = (P('data'),) * len(args)
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P('data')))(*args)


MAPPINGS = {'pmap': by_pmap, 'shard_map': by_shard_map}


def check_graph_loss(mapping, n_devices, case, scale='none'):
    mask, use_mask = MASKS[case], case == 'mask'
    fn = lambda *args: loss_and_grad(*args, use_mask, 'data', scale)
    loss, grad = MAPPINGS[mapping](fn, n_devices, (*INPUTS, mask))
    expected_loss, expected_grad = jax.jit(loss_and_grad, static_argnums=(5, 7))(
        *INPUTS, mask, use_mask, None, scale)
    assert np.sum(np.asarray(expected_loss) > 0) > N_GLOBAL // 2, expected_loss
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-7)
    # Each device differentiates its local mean; the gather's transpose sums every device's
    # cotangents, so the result is n_devices times the gradient of the global mean.
    np.testing.assert_allclose(grad, n_devices * expected_grad, rtol=1e-5, atol=1e-6)


def check_bank_loss(mapping, n_devices, scale='none'):
    args = (STUDENT, BANK[GRAPH[IDS]], GRAPH_WEIGHTS[IDS])
    moments = memory_bank_moments(BANK)
    fn = lambda *a, axis_name=None: memory_bank_locality_loss(
        *a, student_scale=scale, bank_moments=moments, axis_name=axis_name)
    loss = MAPPINGS[mapping](functools.partial(fn, axis_name='data'), n_devices, args)
    np.testing.assert_allclose(loss, jax.jit(fn)(*args), rtol=1e-6)


def check_bank_update(mapping, n_devices):
    update = lambda bank, ids, feats: update_memory_bank(bank, ids, feats, momentum=0.5,
                                                         axis_name='data')
    expected = jax.jit(update_memory_bank)(BANK, IDS, STUDENT, momentum=0.5)
    if mapping == 'pmap':
        split = lambda x: x.reshape(n_devices, -1, *x.shape[1:])
        banks = jax.pmap(update, axis_name='data', in_axes=(None, 0, 0),
                         devices=jax.devices()[:n_devices])(BANK, split(IDS), split(STUDENT))
    else:
        mesh = Mesh(np.array(jax.devices()[:n_devices]), ('data',))
        sharded = jax.shard_map(update, mesh=mesh, in_specs=(P(), P('data'), P('data')),
                                out_specs=P())
        bank = jax.jit(sharded)(BANK, IDS, STUDENT)
        banks = [shard.data for shard in bank.addressable_shards]
    assert len(banks) == n_devices
    for bank in banks:  # Every device's replica holds every device's rows, identically.
        np.testing.assert_array_equal(bank, expected)


CHECKS = {}
for mapping in MAPPINGS:
    for n_devices in (4, 8):
        for case in MASKS:
            CHECKS[f'{mapping}_{n_devices}_loss_{case}'] = (
                lambda m=mapping, n=n_devices, c=case: check_graph_loss(m, n, c))
        CHECKS[f'{mapping}_{n_devices}_bank_loss'] = (
            lambda m=mapping, n=n_devices: check_bank_loss(m, n))
        for scale in ('l2', 'mean'):
            CHECKS[f'{mapping}_{n_devices}_loss_mask_{scale}'] = (
                lambda m=mapping, n=n_devices, s=scale: check_graph_loss(m, n, 'mask', s))
            CHECKS[f'{mapping}_{n_devices}_bank_loss_{scale}'] = (
                lambda m=mapping, n=n_devices, s=scale: check_bank_loss(m, n, s))
        CHECKS[f'{mapping}_{n_devices}_bank_update'] = (
            lambda m=mapping, n=n_devices: check_bank_update(m, n))
results = {}
for name, check in CHECKS.items():
    try:
        check()
        results[name] = 'ok'
    except Exception:
        results[name] = traceback.format_exc()
print('RESULTS ' + json.dumps(results))
"""


@pytest.fixture(scope='module')
def device_results() -> dict[str, str]:
  repo_root = pathlib.Path(__file__).resolve().parent.parent
  env = dict(os.environ)
  # The suite's XLA flags with 8 devices in place of conftest's one per core.
  flags = [f for f in env.get('XLA_FLAGS', '').split() if 'device_count' not in f]
  env['XLA_FLAGS'] = ' '.join([*flags, '--xla_force_host_platform_device_count=8'])
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(repo_root), env.get('PYTHONPATH')]))
  proc = subprocess.run(
    [sys.executable, '-c', _SCRIPT],
    env=env,
    cwd=repo_root,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-5000:]
  lines = [line for line in proc.stdout.splitlines() if line.startswith('RESULTS ')]
  assert lines, proc.stdout[-5000:] + proc.stderr[-5000:]
  return json.loads(lines[-1].removeprefix('RESULTS '))


MAPPINGS = ['pmap', 'shard_map']
DEVICE_COUNTS = [4, 8]


@pytest.mark.parametrize('case', ['default', 'mask'])
@pytest.mark.parametrize('n_devices', DEVICE_COUNTS)
@pytest.mark.parametrize('mapping', MAPPINGS)
def test_graph_batch_loss_matches_single_device(device_results, mapping, n_devices, case):
  result = device_results[f'{mapping}_{n_devices}_loss_{case}']
  assert result == 'ok', result


@pytest.mark.parametrize('n_devices', DEVICE_COUNTS)
@pytest.mark.parametrize('mapping', MAPPINGS)
def test_memory_bank_loss_matches_single_device(device_results, mapping, n_devices):
  result = device_results[f'{mapping}_{n_devices}_bank_loss']
  assert result == 'ok', result


@pytest.mark.parametrize('n_devices', DEVICE_COUNTS)
@pytest.mark.parametrize('mapping', MAPPINGS)
def test_memory_bank_update_is_global_and_identical_on_every_device(
  device_results, mapping, n_devices
):
  result = device_results[f'{mapping}_{n_devices}_bank_update']
  assert result == 'ok', result


@pytest.mark.parametrize('scale', ['l2', 'mean'])
@pytest.mark.parametrize('n_devices', DEVICE_COUNTS)
@pytest.mark.parametrize('mapping', MAPPINGS)
def test_scale_invariant_graph_losses_match_single_device(
  device_results, mapping, n_devices, scale
):
  for name in (
    f'{mapping}_{n_devices}_loss_mask_{scale}',
    f'{mapping}_{n_devices}_bank_loss_{scale}',
  ):
    assert device_results[name] == 'ok', device_results[name]
