"""Time and memory of locality_preserving_loss, direct vs. blockwise kNN, as the batch grows.

Run from anywhere:

    .venv/bin/python benchmarks/loss_scaling.py --quick  # 3 sizes x 2 widths, ~10 s on 2 cores
    .venv/bin/python benchmarks/loss_scaling.py          # 256 ... 16384 x 64 ... 2048, ~12 min

For each global batch size n and teacher width d_t (student width 64, k = 5, default sigma2) it
compiles `jax.jit(jax.value_and_grad(mean loss))` for the direct path (`block_size=0`, one
`[n, n]` distance matrix) and the blockwise path (`block_size=B`, `[B, n]` per step), and reports

- time: median wall time of a few calls after one warm-up call (value and student gradient);
- temp: `compiled.memory_analysis().temp_size_in_bytes`, the scratch buffer XLA's buffer
  assignment reserves beyond the arguments and outputs. It is known before running, so a size is
  compiled but not run when its temp exceeds `--memory-cap-gib`. On XLA:CPU it omits scratch
  that a library kernel allocates by itself (a matmul fused into an XNNPACK/YNNPACK `__ynn_fusion`
  with a reduction, Eigen's packing buffers), so it is a lower bound on the real peak; here every
  `[rows, n]` distance block feeds `top_k` and so is an XLA buffer that it counts.

Prints a markdown table, the crossover per width, and the machine note. Numbers on a shared
machine move with the other jobs' load; the load average is printed with them.
"""

import argparse
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# A plain checkout without `pip install -e .` still finds the library.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from lpe.losses import locality  # noqa: E402

K = 5
STUDENT_WIDTH = 64
QUICK = dict(sizes=(256, 1024, 4096), widths=(64, 512), repeats=3)
NOISE = 1.1  # Blockwise / direct time ratios up to this count as a tie.
FULL = dict(sizes=(256, 1024, 2048, 4096, 8192, 16384), widths=(64, 512, 2048), repeats=3)


def mean_loss(student: jax.Array, teacher: jax.Array, block_size: int) -> jax.Array:
  return jnp.mean(locality.locality_preserving_loss(student, teacher, k=K, block_size=block_size))


def measure(n: int, width: int, block_size: int, repeats: int, cap_bytes: float) -> dict:
  """Compiles value-and-grad for one path; times it unless its temp buffer exceeds the cap."""
  rng = np.random.default_rng(0)
  student = jnp.asarray(rng.normal(size=(n, STUDENT_WIDTH)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(n, width)), jnp.float32)
  fn = jax.jit(jax.value_and_grad(mean_loss), static_argnames='block_size')
  compiled = fn.lower(student, teacher, block_size=block_size).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  if temp > cap_bytes:
    return dict(temp=temp, time=None)
  jax.block_until_ready(compiled(student, teacher))  # Warm-up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(student, teacher))
    times.append(time.perf_counter() - start)
  return dict(temp=temp, time=statistics.median(times))


def crossover(rows: list, width: int, i: int) -> str:
  """The smallest n from which block size i stays within NOISE of the direct time."""
  ratios = [
    (n, bw[i]['time'] / d['time'])
    for w, n, d, bw in rows
    if w == width and bw[i] is not None and d['time'] is not None
  ]
  found = None
  for n, ratio in reversed(ratios):
    if ratio > NOISE:
      break
    found = n
  return 'none measured' if found is None else f'n = {found}'


def fmt_time(result: dict | None) -> str:
  if result is None:
    return '= direct'
  return 'not run (cap)' if result['time'] is None else f'{1e3 * result["time"]:.1f}'


def fmt_temp(result: dict | None) -> str:
  return '= direct' if result is None else f'{result["temp"] / 2**20:.1f}'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='a few sizes, about a minute')
  parser.add_argument(
    '--block-sizes',
    default=f'256,{locality.KNN_BLOCK_SIZE}',
    help='comma-separated rows per block for the blockwise columns',
  )
  parser.add_argument('--memory-cap-gib', type=float, default=2.0)
  args = parser.parse_args()
  grid = QUICK if args.quick else FULL
  blocks = [int(b) for b in args.block_sizes.split(',')]
  cap = args.memory_cap_gib * 2**30

  print(f'Command: .venv/bin/python benchmarks/loss_scaling.py {" ".join(sys.argv[1:])}'.rstrip())
  print(
    f'\nMachine: {platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} on '
    f'{jax.devices()[0].platform}; load average at start {os.getloadavg()[0]:.1f}.'
  )
  print(
    f'k = {K}, student width {STUDENT_WIDTH}, default sigma2; jit(value_and_grad) of the mean '
    f'loss, median of {grid["repeats"]} calls after a warm-up, in ms; temp = compiled '
    f'memory_analysis().temp_size_in_bytes in MiB. Direct runs whose temp exceeds '
    f'{args.memory_cap_gib:g} GiB are compiled but not run. A block of n rows or more is the '
    f'direct path itself (= direct). Automatic choice: direct for n <= '
    f'{locality.KNN_DIRECT_MAX_ROWS}, else blocks of {locality.KNN_BLOCK_SIZE}.\n'
  )
  header = ['n', 'd_t', 'direct ms', 'direct temp']
  header += [f'{name} b={b}' for b in blocks for name in ('ms', 'temp')]
  print('| ' + ' | '.join(header) + ' |')
  print('|' + '---:|' * len(header))
  rows = []
  for width in grid['widths']:
    for n in grid['sizes']:
      direct = measure(n, width, 0, grid['repeats'], cap)
      blockwise = [
        measure(n, width, b, grid['repeats'], float('inf')) if b < n else None for b in blocks
      ]
      cells = [str(n), str(width), fmt_time(direct), fmt_temp(direct)]
      cells += [f(r) for r in blockwise for f in (fmt_time, fmt_temp)]
      print('| ' + ' | '.join(cells) + ' |', flush=True)
      rows.append((width, n, direct, blockwise))

  print(
    f'\nCrossover: the smallest n from which blockwise took at most {NOISE:g} x the direct time '
    'at every larger measured n (timings on a shared machine vary by about 10%):'
  )
  for width in grid['widths']:
    for i, b in enumerate(blocks):
      print(f'- d_t = {width}, b = {b}: {crossover(rows, width, i)}')
  print(f'\nLoad average at end {os.getloadavg()[0]:.1f}.')


if __name__ == '__main__':
  main()
