"""What every Python process of lpe pays before any work: importing ml_dtypes, jax and launch.py.

  .venv/bin/python benchmarks/import_time.py                 # ~1 min on 2 cores
  .venv/bin/pip install -q --no-deps --target /tmp/ml_dtypes_070 ml-dtypes==0.7.0
  .venv/bin/python benchmarks/import_time.py --ml-dtypes=/tmp/ml_dtypes_070

Each measurement is a fresh process (as each launch.py run, pytest-xdist worker and process a test
starts): it imports ml_dtypes, then jax, then launch.py's module, timing each step, and the whole
process is timed from outside (interpreter start included). The first row uses the environment's
ml_dtypes (requirements.txt pins it); each `--ml-dtypes` folder (made with `pip install --no-deps
--target`) is put first on the path for a row of its own. Rounds alternate the rows, so that the
load of a shared machine falls on all. Reported: medians in seconds; the header gives the
processor's vector ISA and the load average before and after. Nothing is asserted.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

_WORKER = r"""
import json, sys, time
start = time.perf_counter()
import ml_dtypes
dtypes = time.perf_counter()
import jax
jax_ = time.perf_counter()
sys.argv = ['launch.py']
import launch
done = time.perf_counter()
steps = {'ml_dtypes': dtypes - start, 'jax': jax_ - dtypes, 'launch': done - jax_}
print(json.dumps({'version': ml_dtypes.__version__, **steps}))
"""


def _measure(path: str | None) -> dict:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (path, str(ROOT)) if p))
  start = time.perf_counter()
  out = subprocess.run(
    [sys.executable, '-c', _WORKER], env=env, capture_output=True, text=True, check=True, cwd=ROOT
  )
  result = json.loads(out.stdout.strip().splitlines()[-1])
  result['process'] = time.perf_counter() - start
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--ml-dtypes',
    action='append',
    default=[],
    help='a folder holding another ml_dtypes (pip install --no-deps --target); repeatable',
  )
  parser.add_argument('--rounds', type=int, default=5)
  args = parser.parse_args()
  sys.path.insert(0, str(ROOT))
  from lpe import xla_cpu

  load = ', '.join(f'{x:.1f}' for x in os.getloadavg())
  print(f'# ISA {xla_cpu.cpu_isa()}, {os.cpu_count()} CPUs, load average {load} before')
  paths = [None, *args.ml_dtypes]
  runs = {path: [] for path in paths}
  for _ in range(args.rounds):
    for path in paths:
      runs[path].append(_measure(path))
  print('| ml_dtypes | import ml_dtypes s | then jax s | then launch s | whole process s |')
  print('|---|---:|---:|---:|---:|')
  for path in paths:
    median = {
      k: statistics.median(r[k] for r in runs[path]) for k in runs[path][0] if k != 'version'
    }
    version = runs[path][0]['version'] + ('' if path is None else f' ({path})')
    cells = ' | '.join(f'{median[k]:.2f}' for k in ('ml_dtypes', 'jax', 'launch', 'process'))
    print(f'| {version} | {cells} |')
  load = ', '.join(f'{x:.1f}' for x in os.getloadavg())
  print(f'# {args.rounds} rounds, medians; load average {load} after')


if __name__ == '__main__':
  main()
