"""locality_preserving_loss over 8 fake CPU devices (pmap and shard_map) vs. one device.

XLA reads `--xla_force_host_platform_device_count` only when jax starts, and other test modules
import jax first, so the checks run once in a fresh Python process (`_SCRIPT`) that prints one
JSON line of results; each test below asserts on its own entry.
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

from lpe.losses import locality_preserving_loss

N_DEVICES, N_LOCAL, K = 8, 4, 5
N_GLOBAL = N_DEVICES * N_LOCAL
assert jax.device_count() == N_DEVICES, jax.devices()
rng = np.random.default_rng(0)
STUDENT = rng.normal(size=(N_GLOBAL, 6)).astype(np.float32)
TEACHER = rng.normal(size=(N_GLOBAL, 5)).astype(np.float32)
MASKS = {'default': np.ones(N_GLOBAL, bool), 'mask': rng.random(N_GLOBAL) > 0.25}


def loss_and_grad(
    student, teacher, mask, use_mask, k=K, axis_name=None, block_size=None, scale='none'
):
    # Loss of these rows and jax.grad of their mean w.r.t. these rows' student features.
    kwargs = dict(
        k=k, where=mask if use_mask else None, axis_name=axis_name, block_size=block_size,
        student_scale=scale,
    )
    loss = locality_preserving_loss(student, teacher, **kwargs)
    mean = lambda s: jnp.mean(locality_preserving_loss(s, teacher, **kwargs))
    return loss, jax.grad(mean)(student)


def by_pmap(mask, use_mask, k=K, block_size=None, scale='none'):
    fn = lambda s, t, m: loss_and_grad(s, t, m, use_mask, k, 'data', block_size, scale)
    split = lambda x: x.reshape(N_DEVICES, N_LOCAL, *x.shape[1:])
    loss, grad = jax.pmap(fn, axis_name='data')(split(STUDENT), split(TEACHER), split(mask))
    return loss.reshape(N_GLOBAL), grad.reshape(N_GLOBAL, -1)


def by_shard_map(mask, use_mask, k=K, block_size=None, scale='none'):
    fn = lambda s, t, m: loss_and_grad(s, t, m, use_mask, k, 'data', block_size, scale)
    mesh = Mesh(np.array(jax.devices()), ('data',))
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=(P('data'),) * 3, out_specs=P('data'))
    return jax.jit(sharded)(STUDENT, TEACHER, mask)


def check_matches_single_device(run, case, block_size=None, scale='none'):
    mask = MASKS[case]
    use_mask = case == 'mask'
    # The single-device reference takes the direct path; a block size splits the global batch.
    loss, grad = run(mask, use_mask, block_size=block_size, scale=scale)
    expected_loss, expected_grad = jax.jit(
        loss_and_grad, static_argnums=3, static_argnames='scale'
    )(STUDENT, TEACHER, mask, use_mask, scale=scale)
    assert float(jnp.sum(expected_loss)) > 0
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-7)
    # Each device differentiates its local mean; the gather's transpose sums all devices'
    # cotangents, so the result is N_DEVICES times the single-device gradient of the global mean.
    np.testing.assert_allclose(grad, N_DEVICES * expected_grad, rtol=1e-5, atol=1e-6)


def check_k_too_large(run):
    try:
        run(MASKS['default'], False, k=N_GLOBAL)
    except ValueError as e:
        assert 'smaller than the (global) batch size 32' in str(e), e
    else:
        raise AssertionError('k >= global batch size did not raise ValueError')


CHECKS = {
    'pmap_default': lambda: check_matches_single_device(by_pmap, 'default'),
    'pmap_mask': lambda: check_matches_single_device(by_pmap, 'mask'),
    'shard_map_default': lambda: check_matches_single_device(by_shard_map, 'default'),
    'shard_map_mask': lambda: check_matches_single_device(by_shard_map, 'mask'),
    # 32 global rows in blocks of 5: the last block is padded.
    'pmap_mask_blockwise': lambda: check_matches_single_device(by_pmap, 'mask', 5),
    'shard_map_mask_blockwise': lambda: check_matches_single_device(by_shard_map, 'mask', 5),
    # The scale-invariant forms: 'mean' normalises by a mean over the global batch.
    'pmap_mask_l2': lambda: check_matches_single_device(by_pmap, 'mask', scale='l2'),
    'pmap_mask_mean': lambda: check_matches_single_device(by_pmap, 'mask', scale='mean'),
    'shard_map_mask_l2': lambda: check_matches_single_device(by_shard_map, 'mask', scale='l2'),
    'shard_map_mask_mean': lambda: check_matches_single_device(by_shard_map, 'mask', scale='mean'),
    'pmap_k_too_large': lambda: check_k_too_large(by_pmap),
    'shard_map_k_too_large': lambda: check_k_too_large(by_shard_map),
}
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


@pytest.mark.parametrize('case', ['default', 'mask'])
def test_pmap_matches_single_device(device_results, case):
  assert device_results[f'pmap_{case}'] == 'ok', device_results[f'pmap_{case}']


@pytest.mark.parametrize('case', ['default', 'mask'])
def test_shard_map_matches_single_device(device_results, case):
  assert device_results[f'shard_map_{case}'] == 'ok', device_results[f'shard_map_{case}']


@pytest.mark.parametrize('mapping', ['pmap', 'shard_map'])
def test_k_too_large_for_global_batch_raises_on_devices(device_results, mapping):
  assert device_results[f'{mapping}_k_too_large'] == 'ok', device_results[f'{mapping}_k_too_large']


@pytest.mark.parametrize('mapping', ['pmap', 'shard_map'])
def test_blockwise_knn_on_devices_matches_single_device(device_results, mapping):
  result = device_results[f'{mapping}_mask_blockwise']
  assert result == 'ok', result


@pytest.mark.parametrize('mapping', ['pmap', 'shard_map'])
@pytest.mark.parametrize('scale', ['l2', 'mean'])
def test_scale_invariant_forms_on_devices_match_single_device(device_results, mapping, scale):
  assert device_results[f'{mapping}_mask_{scale}'] == 'ok', device_results[
    f'{mapping}_mask_{scale}'
  ]
