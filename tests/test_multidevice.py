"""Data parallelism gives the single-device numbers: 8 fake CPU devices, and 2 CPU processes.

Each check runs in its own process, since the device count is fixed when jax is imported.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices: int) -> dict:
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  # The caller's XLA flags (conftest's XLA:CPU setting, or a forced ISA) plus the fake devices.
  flags = [f for f in env.get('XLA_FLAGS', '').split() if 'device_count' not in f]
  env['XLA_FLAGS'] = ' '.join([*flags, f'--xla_force_host_platform_device_count={devices}'])
  return env


def _check(name: str) -> dict:
  proc = subprocess.run(
    [sys.executable, os.path.join(REPO, 'tests', 'multidevice_checks.py'), name],
    env=_env(8),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  line = [x for x in proc.stdout.splitlines() if x.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT ') :])


@pytest.mark.parametrize(
  'check', ['step_cnn', 'step_resnet_bn', 'step_resnet_bn_masked', 'step_nnx_bn']
)
def test_pmap_and_sharded_jit_step_match_single_device(check):
  """One LP+KD step: params after the update, loss and metrics equal the 1-device step up to
  float32 rounding. Splitting the batch changes the reductions' order and shapes: on an AVX2
  processor with lpe's XLA:CPU setting (dots in YNNPACK, `lpe.xla_cpu`) the ResNet step's
  parameters differed by 1.7e-4, 1.1e-3 of the step's largest update, and its metrics by 2.0e-5 of
  their size (2.5e-7 and 3.7e-7 without that setting), so the bounds are relative: a missing or
  doubled device average would differ by the order of the update itself.

  The masked check (a padded batch whose valid rows fill 2.75 of the 8 devices) also compares
  the 1-device masked step with the plain step on the valid rows alone (`sub_batch`)."""
  result = _check(check)
  assert result['param_change'] > 1e-4  # The step did move the parameters.
  for mode in ('pmap', 'jit', 'sub_batch')[: 2 + ('sub_batch' in result)]:
    assert result[mode]['max_param_diff'] < 5e-3 * result['param_change'], (mode, result)
    assert result[mode]['max_metric_rel_diff'] < 2e-4, (mode, result)
    np.testing.assert_allclose(result[mode]['loss'], result['single_loss'], rtol=1e-5)


def test_eval_counts_each_example_once_on_1_3_and_8_devices():
  result = _check('eval')
  assert {r['num_examples'] for r in result.values()} == {101}
  assert len({r['accuracy'] for r in result.values()}) == 1


def _launch(args, devices, **kwargs):
  # Every device (on one process lpe would keep this small model on one: cpu_devices=0).
  return subprocess.Popen(
    [sys.executable, os.path.join(REPO, 'launch.py'), *args, f'--config.cpu_devices={devices}'],
    cwd=REPO,
    env=_env(devices),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    **kwargs,
  )


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run_args(data_dir, workdir, teacher, steps=4):
  return [
    '--config=configs/fashion_mnist_lp.py',
    f'--workdir={workdir}',
    f'--config.data_dir={data_dir}',
    f'--config.teacher.checkpoint={teacher}',
    '--config.teacher.model=cnn_student',
    '--config.num_epochs=1',
    f'--config.steps_per_epoch_limit={steps}',
    '--config.batch_size=32',
    '--config.eval_batch_size=20',
    '--config.distill.k=3',
  ]


@pytest.fixture(scope='module')
def small_teacher(fashion_data_dir, tmp_path_factory):
  from configs import fashion_mnist_student
  from lpe import train

  config = fashion_mnist_student.get_config()
  config.data_dir, config.num_epochs, config.steps_per_epoch_limit = fashion_data_dir, 1, 2
  config.batch_size, config.eval_batch_size = 32, 26
  workdir = str(tmp_path_factory.mktemp('teacher'))
  train.train_and_evaluate(config, workdir)
  return workdir


def _params(workdir):
  from lpe import checkpoint

  return checkpoint.load_variables(workdir)[0]


@pytest.mark.parametrize('mode', ['jit', 'pmap'])
def test_device_count_does_not_change_the_run(fashion_data_dir, small_teacher, tmp_path, mode):
  """Whole LP runs through launch.py on 1 and on 4 devices end with the same parameters; on 4
  devices, the host input path gives bitwise the device-resident path's parameters, and cached
  teacher outputs the same parameters to float tolerance."""
  live = '--config.teacher.cache_outputs=False'  # fashion_mnist_lp caches by default.
  runs = {
    '1': (1, [live]),
    '4': (4, [live]),
    '4_host': (4, [live, '--config.input=host']),
    '4_cached': (4, ['--config.teacher.cache_outputs=True']),
  }
  outs = {}
  for name, (devices, extra) in runs.items():
    workdir = tmp_path / name
    args = _run_args(fashion_data_dir, workdir, small_teacher) + [f'--config.parallelism={mode}']
    proc = _launch([*args, *extra], devices)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    outs[name] = _leaves(_params(str(workdir)))
  for a, b, host, cached in zip(*outs.values(), strict=True):
    np.testing.assert_allclose(a, b, atol=2e-5)
    np.testing.assert_array_equal(b, host)
    np.testing.assert_allclose(b, cached, atol=2e-5)


@pytest.mark.parametrize('lp_graph', ['neighbours', 'bank'])
def test_graph_lp_gives_the_same_run_on_1_and_4_devices(
  fashion_data_dir, small_teacher, tmp_path, lp_graph
):
  """LP over the whole split's graph (neighbour-aware batches, or the memory bank that every
  device's rows update) through launch.py: 1 device, and 4 under jit and under pmap.

  Two steps: the second reads bank rows that the first wrote (a few of its rows' neighbours).
  Over more steps Adam turns the float32 rounding of another summation order into differences
  of about its learning rate (2.7e-5 after 4 steps on an AVX2 processor), as a wrong row would.
  """
  outs = {}
  for name, devices, mode in (('1', 1, 'jit'), ('4_jit', 4, 'jit'), ('4_pmap', 4, 'pmap')):
    workdir = tmp_path / name
    args = _run_args(fashion_data_dir, workdir, small_teacher, steps=2) + [
      f'--config.parallelism={mode}',
      f'--config.distill.lp_graph={lp_graph}',
    ]
    proc = _launch(args, devices)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert ' lp ' in out  # The LP term trained.
    outs[name] = _leaves(_params(str(workdir)))
  for a, b, c in zip(*outs.values(), strict=True):
    np.testing.assert_allclose(a, b, atol=2e-5)
    np.testing.assert_allclose(a, c, atol=2e-5)


def _leaves(tree):
  import jax

  return jax.tree.leaves(tree)


def _two_processes(args: list[str]) -> list[str]:
  """Runs launch.py with `args` as 2 processes x 2 fake devices; returns their outputs."""
  port = _free_port()
  cluster = [
    f'--config.distributed.coordinator_address=127.0.0.1:{port}',
    '--config.distributed.num_processes=2',
  ]
  procs = [
    _launch([*args, *cluster, f'--config.distributed.process_id={pid}'], 2) for pid in (0, 1)
  ]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs, strict=True):
    assert p.returncode == 0, out
  assert '[lp] epoch 1/1 test accuracy' in outs[0]
  return outs


def test_distributed_two_processes_match_one_process(fashion_data_dir, small_teacher, tmp_path):
  """2 CPU processes x 2 devices (gloo collectives) give the 1-process, 4-device result."""
  workdir = tmp_path / 'two_hosts'
  args = _run_args(fashion_data_dir, workdir, small_teacher)
  outs = _two_processes([*args, '--config.teacher.cache_outputs=False'])
  assert '[lp]' not in outs[1]  # Only process 0 logs.
  single = tmp_path / 'one_host'
  proc = _launch(
    [*_run_args(fashion_data_dir, single, small_teacher), '--config.teacher.cache_outputs=False'], 4
  )
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  for a, b in zip(_leaves(_params(str(workdir))), _leaves(_params(str(single))), strict=True):
    np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.parametrize('mode', ['jit', 'pmap'])
def test_distributed_per_process_data_reads_each_share_and_trains(
  fashion_data_dir, small_teacher, tmp_path, mode
):
  """2 CPU processes x 2 devices, each reading only its half of the training split (under pmap
  with the device-resident input and the teacher cache; under jit through the host path)."""
  workdir = tmp_path / 'shares'
  # A copy of the data without the decoded-split cache, whose files show what each process read.
  data_dir = tmp_path / 'data'
  shutil.copytree(fashion_data_dir, data_dir, ignore=shutil.ignore_patterns('lpe_cache'))
  _two_processes(
    _run_args(str(data_dir), workdir, small_teacher)
    + [
      f'--config.parallelism={mode}',
      '--config.distributed.per_process_data=True',
      f'--config.teacher.cache_outputs={mode == "pmap"}',
    ]
  )
  assert all(np.isfinite(leaf).all() for leaf in _leaves(_params(str(workdir))))
  with open(workdir / 'config.json') as f:
    assert json.load(f)['distributed']['per_process_data'] is True
  train_files = [n for n in os.listdir(data_dir / 'lpe_cache') if '-train-' in n]
  assert sorted(n.split('-')[-1] for n in train_files) == ['shard0of2.npz', 'shard1of2.npz']


_CPU_SPLIT_SCRIPT = """
import json, sys
from lpe import xla_cpu
xla_cpu.configure()
import jax
import numpy as np
from configs import fashion_mnist_student
from lpe import checkpoint, data, models, train

data_dir, workdir = sys.argv[1], sys.argv[2]


def config_of(model, batch=64, **fields):
  config = fashion_mnist_student.get_config()
  config.model, config.batch_size, config.eval_batch_size = model, batch, 26
  config.data_dir, config.num_epochs, config.steps_per_epoch_limit = data_dir, 1, 4
  config.checkpoint_every_steps, config.learning_rate = 2, 1e-3
  config.update(fields)
  return config


def chosen(config):
  info = data.info_of(config)
  return len(train.devices(config, info, models.build(config.model, info.num_classes)))


out = {'devices': jax.device_count()}
out['small'] = chosen(config_of('cnn_student'))
out['large'] = chosen(config_of('cnn_teacher'))
out['large_odd_batch'] = chosen(config_of('cnn_teacher', batch=63))
out['large_forced_1'] = chosen(config_of('cnn_teacher', cpu_devices=1))
try:
  chosen(config_of('cnn_teacher', cpu_devices=3))
except ValueError as error:
  out['too_many'] = str(error)


class Crash(Exception):
  pass


def crash_at_3(end, state):
  if end.step == 3:
    raise Crash()


params = {}
for name, fields, hooks in (
  ('auto', {}, []),
  ('one', {'cpu_devices': 1}, []),
  ('crashed', {}, [crash_at_3]),
):
  try:
    train.train_and_evaluate(config_of('cnn_teacher', **fields), f'{workdir}/{name}', hooks=hooks)
  except Crash:
    train.train_and_evaluate(config_of('cnn_teacher', **fields), f'{workdir}/{name}')
  params[name] = jax.tree.leaves(checkpoint.load_variables(f'{workdir}/{name}')[0])
out['max_diff_one'] = max(float(np.abs(a - b).max()) for a, b in zip(params['auto'], params['one']))
out['resumed_equal'] = all(np.array_equal(a, b) for a, b in zip(params['auto'], params['crashed']))
print('RESULT ' + json.dumps(out))
"""


def test_a_cpu_process_splits_large_models_over_its_cores(fashion_data_dir, tmp_path):
  """With 2 host devices (`LPE_CPU_DEVICES=2`, as `lpe.xla_cpu` makes them where one device leaves
  cores idle), the trainer splits a large model's batch over both, keeps a small model (or a
  batch that does not divide) on one, and obeys `config.cpu_devices`; the split run trains the
  one-device run's model up to float32 rounding, and a crashed split run resumes bitwise."""
  env = _env(1)
  env['XLA_FLAGS'] = env['XLA_FLAGS'].replace('--xla_force_host_platform_device_count=1', '')
  env['LPE_CPU_DEVICES'] = '2'
  proc = subprocess.run(
    [sys.executable, '-c', _CPU_SPLIT_SCRIPT, fashion_data_dir, str(tmp_path)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  out = json.loads([x for x in proc.stdout.splitlines() if x.startswith('RESULT ')][-1][7:])
  assert out['devices'] == 2
  assert (out['small'], out['large'], out['large_odd_batch'], out['large_forced_1']) == (1, 2, 1, 1)
  assert (
    'config.cpu_devices=3 asks for more CPU devices than this process has (2)' in (out['too_many'])
  )
  assert 0 < out['max_diff_one'] < 1e-4, out
  assert out['resumed_equal'], out
