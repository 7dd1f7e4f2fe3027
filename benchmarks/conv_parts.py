"""ResNet-20's convolutions one by one, lpe (JAX) against PyTorch: forward, input, weight gradient.

    .venv/bin/python benchmarks/conv_parts.py            # ~15 s on 2 cores
    .venv/bin/python benchmarks/conv_parts.py --rounds=5 --reps=10
    .venv/bin/python benchmarks/conv_parts.py --torch-python=/path/to/python-with-torch

Where a ResNet-20 training step's convolution time goes on this processor, part by part. Every
distinct conv of ResNet-20 at batch 128 (CIFAR, 32x32, PyTorch's padding of kernel // 2) is timed
alone: its forward pass, its input gradient and its weight gradient. The JAX side is one process
under lpe's automatic XLA:CPU setting (`lpe.xla_cpu.configure`, one device), each part a jitted
program of lpe's CPU conv (`lpe.models.layers.conv_general_dilated_cpu`, what the trainer builds on
CPU); the PyTorch side is another process (`--torch-python`, by default this Python, which
scripts/test.sh gives the pinned torch) at PyTorch's default threads, the same parts through
`torch.ops.aten.convolution_backward` (NCHW, oneDNN), as its autograd calls them. Each side takes
`--reps` calls of one part in turn, for `--rounds` rounds, so the load of a shared machine falls on
both alike. Reported: the median wall time per call (ms), its process CPU time, and the sum over
one step of ResNet-20 (each conv times how often the net has it; the stem's input gradient is
not needed and not counted). A step also runs BatchNorm, ReLU, the loss and the optimizer, which
this leaves out. Nothing is asserted.
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
# (name, height and width of the input, in channels, out channels, kernel, stride, count in a step)
CONVS = (
  ('stem 3->16', 32, 3, 16, 3, 1, 1),
  ('3x3 16->16', 32, 16, 16, 3, 1, 6),
  ('3x3 16->32 /2', 32, 16, 32, 3, 2, 1),
  ('1x1 16->32 /2', 32, 16, 32, 1, 2, 1),
  ('3x3 32->32', 16, 32, 32, 3, 1, 5),
  ('3x3 32->64 /2', 16, 32, 64, 3, 2, 1),
  ('1x1 32->64 /2', 16, 32, 64, 1, 2, 1),
  ('3x3 64->64', 8, 64, 64, 3, 1, 5),
)
PARTS = ('forward', 'input grad', 'weight grad')
BATCH = 128


def _out_size(size: int, kernel: int, stride: int) -> int:
  return (size + 2 * (kernel // 2) - kernel) // stride + 1


def _jax_parts():
  """Compiles every part on lpe's CPU conv; returns `call((conv, part))` and a banner."""
  sys.path.insert(0, str(ROOT))
  from lpe import xla_cpu

  setting = xla_cpu.configure().describe()
  import jax
  import jax.numpy as jnp
  import numpy as np

  from lpe.models import layers

  rng = np.random.default_rng(0)
  parts = {}
  for name, size, cin, cout, kernel, stride, _ in CONVS:
    pad = kernel // 2
    out = _out_size(size, kernel, stride)
    x = jnp.asarray(rng.normal(size=(BATCH, size, size, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, cin, cout)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(BATCH, out, out, cout)), jnp.float32)

    def conv(x, w, stride=stride, pad=pad):
      return layers.conv_general_dilated_cpu(
        x, w, (stride, stride), ((pad, pad), (pad, pad)), None, None, ('NHWC', 'HWIO', 'NHWC')
      )

    parts[name, 'forward'] = jax.jit(conv), (x, w)
    parts[name, 'input grad'] = (
      jax.jit(lambda x, w, dy, conv=conv: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]),
      (x, w, dy),
    )
    parts[name, 'weight grad'] = (
      jax.jit(lambda x, w, dy, conv=conv: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]),
      (x, w, dy),
    )
  for fn, args in parts.values():
    jax.block_until_ready(fn(*args))  # Compiles, and warms up.

  def call(key):
    fn, args = parts[key]
    jax.block_until_ready(fn(*args))

  return call, f'jax {jax.__version__}; {setting}'


def _torch_parts():
  """The same parts in PyTorch at its default threads; returns `call((conv, part))` and a banner."""
  import torch

  torch.manual_seed(0)
  parts = {}
  for name, size, cin, cout, kernel, stride, _ in CONVS:
    pad = kernel // 2
    out = _out_size(size, kernel, stride)
    x = torch.randn(BATCH, cin, size, size)
    w = torch.randn(cout, cin, kernel, kernel)
    dy = torch.randn(BATCH, cout, out, out)

    def backward(mask, x=x, w=w, dy=dy, stride=stride, pad=pad):
      return torch.ops.aten.convolution_backward(
        dy, x, w, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1, mask
      )

    parts[name, 'forward'] = lambda x=x, w=w, s=stride, p=pad: torch.conv2d(x, w, None, s, p)
    parts[name, 'input grad'] = lambda b=backward: b([True, False, False])
    parts[name, 'weight grad'] = lambda b=backward: b([False, True, False])
  for fn in parts.values():
    fn()  # Warm-up.
  isa = torch.backends.cpu.get_cpu_capability()
  return (
    lambda key: parts[key]()
  ), f'torch {torch.__version__} {isa} threads={torch.get_num_threads()}'


def run_worker(side: str) -> None:
  """Prepares every part, prints `ready ...`, then answers lines `CONV|PART REPS` with timings (the
  protocol of benchmarks/cpu_vs_torch.py's workers, whose `Side` drives these)."""
  call, ready = _jax_parts() if side == 'jax' else _torch_parts()
  print(f'ready {ready}', flush=True)
  for line in sys.stdin:
    key, reps = line.rstrip('\n').rsplit(' ', 1)
    walls, cpus = [], []
    for _ in range(int(reps)):
      t0, c0 = time.perf_counter(), time.process_time()
      call(tuple(key.split('|')))
      walls.append(time.perf_counter() - t0)
      cpus.append(time.process_time() - c0)
    print(json.dumps({'wall': walls, 'cpu': cpus}), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--reps', type=int, default=5, help='Calls per part per side per round.')
  parser.add_argument('--torch-python', default=sys.executable, help='A Python with torch.')
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    run_worker(args.worker)
    return
  sys.path[:0] = [str(ROOT), str(ROOT / 'benchmarks')]
  from cpu_vs_torch import Side, isa_line  # The same long-lived workers, taking turns.

  start, load_before = time.perf_counter(), os.getloadavg()[0]
  keys = [f'{name}|{part}' for name, *_ in CONVS for part in PARTS]
  sides = []
  for label, side, python in (
    ('JAX', 'jax', sys.executable),
    ('PyTorch', 'torch', args.torch_python),
  ):
    sides.append(Side(label, [python, __file__, '--worker', side], dict(os.environ), keys))
    try:
      sides[-1].wait_until_ready()
    except RuntimeError:
      hint = ' (is torch installed there? pass --torch-python)' if side == 'torch' else ''
      raise RuntimeError(
        f'the {label} worker ({python}) stopped before it was ready{hint}'
      ) from None
  for _ in range(args.rounds):
    for key in keys:
      for side in sides:
        side.time(key, args.reps)
  for side in sides:
    side.close()
  print(f'{isa_line()}; {os.cpu_count()} CPUs, {platform.machine()}')
  for side in sides:
    print(f'- {side.label}: {side.banner.removeprefix("ready ")}')
  print()
  columns = 'JAX ms (CPU ms) | PyTorch ms (CPU ms) | JAX / PyTorch'
  print(f'| conv (batch 128) | in a step | part | {columns} |')
  print('|---|---:|---|---:|---:|---:|')
  totals = {(s, p): 0.0 for s in ('JAX', 'PyTorch') for p in PARTS}
  for name, *_, count in CONVS:
    for part in PARTS:
      if name.startswith('stem') and part == 'input grad':
        continue  # A step never needs the images' gradient.
      cells = []
      for side in sides:
        key = f'{name}|{part}'
        wall, cpu = statistics.median(side.times[key]) * 1e3, statistics.median(side.cpu[key]) * 1e3
        totals[side.label, part] += count * wall
        cells.append((wall, cpu))
      (jw, jc), (tw, tc) = cells
      print(
        f'| {name} | {count} | {part} | {jw:.2f} ({jc:.1f}) | {tw:.2f} ({tc:.1f}) | {jw / tw:.2f} |'
      )
  print()
  print('| one ResNet-20 step | JAX ms | PyTorch ms | JAX / PyTorch |')
  print('|---|---:|---:|---:|')
  for part in (*PARTS, 'all'):
    parts = PARTS if part == 'all' else (part,)
    jax_ms = sum(totals['JAX', p] for p in parts)
    torch_ms = sum(totals['PyTorch', p] for p in parts)
    print(f'| {part} | {jax_ms:.1f} | {torch_ms:.1f} | {jax_ms / torch_ms:.2f} |')
  print()
  print(
    f'Medians of {args.rounds * args.reps} calls per cell ({args.rounds} interleaved rounds of '
    f'{args.reps}); one step: each conv times its count in ResNet-20. Load average (1 minute) '
    f'{load_before:.1f} before, {os.getloadavg()[0]:.1f} after; '
    f'{time.perf_counter() - start:.0f} s in all.'
  )


if __name__ == '__main__':
  main()
