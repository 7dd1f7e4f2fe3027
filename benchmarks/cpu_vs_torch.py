"""Training-step times on CPU, lpe (JAX) against the same networks and steps in PyTorch.

  TORCH=/tmp/venv-torch-perf/bin/python   # a Python with torch 2.13 (CPU)
  .venv/bin/python benchmarks/cpu_vs_torch.py --torch-python=$TORCH            # ~15 min
  .venv/bin/python benchmarks/cpu_vs_torch.py --torch-python=$TORCH --quick    # small nets
  # Also JAX under each XLA:CPU setting, and AVX2 emulated (see --avx2):
  .venv/bin/python benchmarks/cpu_vs_torch.py --torch-python=$TORCH --settings=ynn,ynn_dots

Rows (`kind:model:batch[:teacher]`): `ce` a student step (CE), `ce_cifar` the same with the
4-pixel crop and flip, `kd` a KD step (0.1 CE + 0.9 KD at T = 4, teacher in eval mode), `lp` the
LP step (CE + 0.1 LP, k = 5) against PyTorch's KD step (RepDistiller has no LP), `forward` the
teacher's forward pass alone. The JAX steps are the trainer's (`lpe.step.make_train_step`, SGD
with momentum 0.9 and weight decay 5e-4, the student's convs as `config.conv_impl='auto'` builds
them); the PyTorch twins are in benchmarks/cpu_vs_torch_torch.py.

Every side runs in its own long-lived process (JAX under the automatic XLA:CPU setting of
`lpe.xla_cpu` with the trainer's device choice (`[2 dev]`: the batch split over 2 host devices,
`lpe.train.devices`), the same on one device (`LPE_CPU_DEVICES=1`; `--no-one-device` skips it),
JAX under each `--settings` value (also on one device), optionally JAX from another checkout with
`--before`, and PyTorch with its default threads): each compiles or builds all rows once, then
the driver asks them in turn for `--reps` steps of one row, for `--rounds` rounds, so the load of
a shared machine falls on all sides alike. Reported: the median wall time per step (ms) and the
ratio of JAX (automatic setting) to PyTorch at its default threads (the headline: PyTorch as
users run it); `--torch-one-thread` adds PyTorch on one thread as a footnote column. The header
gives the processor's vector ISA, the setting chosen and the load average. Nothing is asserted.

`--avx2` emulates a processor without AVX-512 as far as flags allow: XLA's own code generation
(`--xla_cpu_max_isa=AVX2`), PyTorch's ATen kernels (`ATEN_CPU_CAPABILITY=avx2`) and oneDNN
(`ONEDNN_MAX_CPU_ISA=AVX2`). YNNPACK picks its kernels from CPUID with no override, so its
convolutions and dots keep their AVX-512 kernels: the emulation does not reproduce YNNPACK's
AVX2 speed, which is what `lpe.xla_cpu` chooses by on a real AVX2 processor.
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import types

ROOT = pathlib.Path(__file__).resolve().parent.parent
ROWS = (
  'ce:resnet20:128',
  'kd:resnet8x4:64:resnet32x4',
  'lp:resnet8x4:64:resnet32x4',
  'forward:resnet32x4:64',
  'ce:cnn_student:128',
  'ce:cnn_teacher:128',
  'ce:cnn_tiny:128',
  'ce:fitnet1:128',
  'ce_cifar:cnn_teacher_bn:128',
)
QUICK = ('ce:cnn_student:128', 'ce:cnn_tiny:128', 'ce:fitnet1:128', 'ce_cifar:cnn_teacher_bn:128')
AVX2_ENV = {'ATEN_CPU_CAPABILITY': 'avx2', 'ONEDNN_MAX_CPU_ISA': 'AVX2'}


# ------------------------------------------------------------------ JAX worker


def _jax_row(row: str):
  """The compiled step of one row, its arguments (the same inputs on every call), its parameter
  count and the devices it runs on, as the trainer places it (`lpe.train.devices`: on one CPU
  process, split over the host devices where the models are large enough to gain)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from lpe import config as lpe_config
  from lpe import data, models, parallel, state, step, train

  kind, name, batch, *teacher_name = row.split(':')
  config = lpe_config.default_config()
  config.dataset = 'fashion_mnist' if name.startswith(('cnn', 'fitnet')) else 'cifar100'
  config.batch_size = config.eval_batch_size = int(batch)
  info = data.dataset_info(config.dataset)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (int(batch), *info.image_shape)).astype(np.uint8)
  labels = rng.integers(0, info.num_classes, int(batch)).astype(np.int32)
  config.optimizer, config.learning_rate, config.weight_decay = 'sgd', 0.05, 5e-4
  config.augment = 'cifar' if kind == 'ce_cifar' else 'none'
  if kind == 'forward':
    teacher = models.build(name, info.num_classes)
    variables = teacher.init(jax.random.key(1), jnp.zeros((1, *info.image_shape)), train=False)
    config.model = name  # The forward pass splits as a student of its size would.
    place = parallel.Placement('jit', train.devices(config, info, teacher))
    fn = jax.jit(lambda v, x: teacher.apply(v, data.preprocess(x, info), train=False))
    args = (jax.device_put(variables, place.replicated), place.batch((images,))[0])
    params = sum(x.size for x in jax.tree.leaves(variables['params']))
    return fn.lower(*args).compile(), args, params, len(place.devices)
  config.model = name
  student = models.build(name, info.num_classes, conv_impl=train.conv_impl(config))
  variables = state.create_train_state(student, config, jax.random.key(0), info.image_shape, 100)
  teacher, teacher_variables, loaded = None, None, None
  if teacher_name:
    teacher = models.build(teacher_name[0], info.num_classes)
    teacher_variables = teacher.init(
      jax.random.key(1), jnp.zeros((1, *info.image_shape)), train=False
    )
    loaded = types.SimpleNamespace(module=teacher, variables=teacher_variables)
  if kind == 'kd':
    config.distill.ce_weight, config.distill.kd_weight = 0.1, 0.9
  if kind == 'lp':
    config.distill.lp_weight = 0.1
  config.teacher.cache_outputs = False
  place = parallel.Placement('jit', train.devices(config, info, student, loaded))
  fn = jax.jit(step.make_train_step(config, student, teacher, info))
  args = (
    jax.device_put(variables, place.replicated),
    None if teacher is None else jax.device_put(teacher_variables, place.replicated),
    *place.batch((images, labels)),
  )
  params = sum(x.size for x in jax.tree.leaves(variables.params))
  return fn.lower(*args).compile(), args, params, len(place.devices)


def run_jax_worker(rows: list[str]) -> None:
  """Compiles every row, prints its parameter count and `ready`, then answers `ROW REPS`."""
  sys.path.insert(0, os.environ.get('LPE_ROOT', str(ROOT)))
  try:
    from lpe import xla_cpu

    chosen = xla_cpu.configure().describe()
  except ImportError:  # A checkout from before lpe.xla_cpu (--before).
    chosen = 'XLA:CPU: no lpe.xla_cpu in this checkout'
  import jax

  compiled = {}
  for row in rows:
    fn, args, params, devices = _jax_row(row)
    jax.block_until_ready(fn(*args))  # Warm-up.
    jax.block_until_ready(fn(*args))
    compiled[row] = (fn, args)
    print(json.dumps(dict(row=row, params=int(params), devices=devices)), flush=True)
  flags = os.environ.get('XLA_FLAGS', '') or 'none'
  print(f'ready jax {jax.__version__}; {chosen}; XLA_FLAGS: {flags}', flush=True)
  for line in sys.stdin:
    row, reps = line.split()
    fn, args = compiled[row]
    walls, cpus = [], []
    for _ in range(int(reps)):
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*args))
      walls.append(time.perf_counter() - t0)
      cpus.append(time.process_time() - c0)
    print(json.dumps(dict(wall=walls, cpu=cpus)), flush=True)


# ------------------------------------------------------------------ driver


class Side:
  """One long-lived worker process (one JAX setting, or PyTorch)."""

  def __init__(self, label: str, cmd: list[str], env: dict, rows: list[str]):
    self.label, self.rows = label, rows
    self.proc = subprocess.Popen(
      cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    self.params, self.devices, self.banner = {}, {}, ''
    self.times, self.cpu = {row: [] for row in rows}, {row: [] for row in rows}

  def wait_until_ready(self) -> None:
    """Reads the worker's parameter counts until it says it has compiled every row."""
    while True:
      line = self.proc.stdout.readline()
      if not line:
        raise RuntimeError(f'The {self.label} worker stopped before it was ready (its stderr).')
      if line.startswith('ready'):
        self.banner = line.strip()
        break
      if line.startswith('{'):
        info = json.loads(line)
        self.params[info['row']] = info['params']
        self.devices[info['row']] = info.get('devices', 1)

  def row(self, row: str) -> str:
    """This side's row for a JAX row: PyTorch times RepDistiller's KD step for LP."""
    return 'kd' + row[2:] if self.label.startswith('PyTorch') and row.startswith('lp:') else row

  def time(self, row: str, reps: int) -> None:
    self.proc.stdin.write(f'{row} {reps}\n')
    self.proc.stdin.flush()
    result = json.loads(self.proc.stdout.readline())
    self.times[row] += result['wall']
    self.cpu[row] += result['cpu']

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()


def isa_line() -> str:
  sys.path.insert(0, str(ROOT))
  from lpe import xla_cpu

  flags = xla_cpu.cpu_flags()
  listed = sorted(f for f in flags if f.startswith(('avx', 'amx', 'fma')))
  return f'processor ISA {xla_cpu.cpu_isa(flags)} ({" ".join(listed) or "no x86 vector flags"})'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--torch-python', default='', help='A Python with torch (PyTorch column).')
  parser.add_argument('--torch-one-thread', action='store_true', help='Also PyTorch, 1 thread.')
  parser.add_argument('--quick', action='store_true', help=f'Only {", ".join(QUICK)}.')
  parser.add_argument('--rows', default='', help='Comma-separated rows (overrides --quick).')
  parser.add_argument('--settings', default='', help='Also JAX under these LPE_XLA_CPU values.')
  parser.add_argument('--before', default='', help='Also JAX from this checkout (its lpe).')
  parser.add_argument('--avx2', action='store_true', help='Emulate an AVX2-only processor.')
  parser.add_argument(
    '--no-one-device', action='store_true', help='Skip the JAX side on one CPU device.'
  )
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--reps', type=int, default=3, help='Steps per row per side per round.')
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    run_jax_worker(args.worker.split(','))
    return
  rows = args.rows.split(',') if args.rows else list(QUICK if args.quick else ROWS)
  start, load_before = time.perf_counter(), os.getloadavg()
  base_env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'LPE_XLA_CPU')}
  if args.avx2:
    base_env['XLA_FLAGS'] = '--xla_cpu_max_isa=AVX2'
  jax_cmd = [sys.executable, __file__, '--worker', ','.join(rows)]
  sides = [Side('JAX (auto)', jax_cmd, base_env, rows)]
  if not args.no_one_device:
    sides.append(Side('JAX (1 device)', jax_cmd, dict(base_env, LPE_CPU_DEVICES='1'), rows))
  for setting in filter(None, args.settings.split(',')):
    sides.append(Side(f'JAX ({setting})', jax_cmd, dict(base_env, LPE_XLA_CPU=setting), rows))
    if not args.no_one_device:
      env = dict(base_env, LPE_XLA_CPU=setting, LPE_CPU_DEVICES='1')
      sides.append(Side(f'JAX ({setting}, 1 device)', jax_cmd, env, rows))
  if args.before:
    sides.append(Side('JAX (before)', jax_cmd, dict(base_env, LPE_ROOT=args.before), rows))
  if args.torch_python:
    torch_rows = list(dict.fromkeys('kd' + r[2:] if r.startswith('lp:') else r for r in rows))
    torch_env = dict(base_env, **AVX2_ENV) if args.avx2 else base_env
    cmd = [args.torch_python, str(ROOT / 'benchmarks' / 'cpu_vs_torch_torch.py')]
    sides.append(Side('PyTorch', [*cmd, *torch_rows], torch_env, torch_rows))
    if args.torch_one_thread:
      sides.append(
        Side('PyTorch 1 thread', [*cmd, '--threads=1', *torch_rows], torch_env, torch_rows)
      )
  for side in sides:  # They start (and compile) side by side.
    side.wait_until_ready()
  for _ in range(args.rounds):
    for row in rows:
      for side in sides:
        side.time(side.row(row), args.reps)
  for side in sides:
    side.close()
  print_report(args, rows, sides, time.perf_counter() - start, load_before)


def print_report(args, rows, sides, seconds, load_before) -> None:
  print(
    f'{isa_line()}; {"AVX2 emulated (--avx2); " if args.avx2 else ""}'
    f'{os.cpu_count()} CPUs, {platform.machine()}'
  )
  for side in sides:
    print(f'- {side.label}: {side.banner}')
  wall = {s.label: {r: 1e3 * statistics.median(t) for r, t in s.times.items()} for s in sides}
  cpu = {s.label: {r: 1e3 * statistics.median(t) for r, t in s.cpu.items()} for s in sides}
  torch_sides = [s for s in sides if s.label.startswith('PyTorch')]
  head = ['row', *[f'{s.label}: ms (CPU ms)' for s in sides]]
  head += [f'JAX (auto) / {s.label}' for s in torch_sides]
  print('\n| ' + ' | '.join(head) + ' |')
  print('|---|' + '---:|' * (len(head) - 1))
  for row in rows:
    cells = [f'`{row}`']
    for side in sides:
      r = side.row(row)
      devices = f' [{side.devices[r]} dev]' if side.devices.get(r, 1) > 1 else ''
      cells.append(f'{wall[side.label][r]:.1f} ({cpu[side.label][r]:.1f}){devices}')
    for side in torch_sides:
      cells.append(f'{wall["JAX (auto)"][row] / wall[side.label][side.row(row)]:.2f}')
    print('| ' + ' | '.join(cells) + ' |')
  load_after = os.getloadavg()
  print(
    f'\nMedians of {args.rounds * args.reps} steps per cell ({args.rounds} interleaved rounds of '
    f'{args.reps}); CPU ms: process CPU time per step, all threads. Load average (1 minute) '
    f'{load_before[0]:.1f} before, {load_after[0]:.1f} after ({load_after[2]:.1f} over 15 '
    f'minutes); {seconds:.0f} s in all.'
  )
  mismatched = {
    row for row in rows for s in torch_sides if sides[0].params[row] != s.params[s.row(row)]
  }
  if mismatched:
    print(f'Parameter counts differ from the PyTorch twin in: {", ".join(sorted(mismatched))}.')


if __name__ == '__main__':
  main()
