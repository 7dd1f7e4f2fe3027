"""Where the test suite's time goes: per test file, seconds of tests, XLA compilation, tracing.

  .venv/bin/python benchmarks/suite_profile.py                    # the whole suite, ~25 min
  .venv/bin/python benchmarks/suite_profile.py -m quick           # any pytest arguments
  .venv/bin/python benchmarks/suite_profile.py --warm tests/test_train.py

Runs pytest as scripts/test.sh does (one pytest-xdist worker per core, `--dist loadgroup`) with
this file loaded as a plugin, and a fresh, empty persistent compilation cache unless `--warm`
(then the suite's own, .pytest_cache/jax_compilation). In every test process the plugin listens
to jax.monitoring's compile events and adds each one's duration to the test that was running:
`backend_compile_duration` (XLA compiling a program, or loading it from the persistent cache),
`jaxpr_trace_duration` (tracing Python to a jaxpr) and `jaxpr_to_mlir_module_duration`
(lowering). Tests that start processes of their own (launch.py runs, the multi-device checks)
show their whole time under "tests s" but none of their children's compilation. Printed: a
markdown table per file, the slowest tests, and the totals, with the processor's vector ISA, the
cores and the load averages (1, 5, 15 minutes) before and after. Nothing is asserted.
"""

import argparse
import collections
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT_ENV = 'LPE_SUITE_PROFILE_DIR'
EVENTS = {
  '/jax/core/compile/backend_compile_duration': 'compile',
  '/jax/core/compile/jaxpr_trace_duration': 'trace',
  '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower',
}

# --- The pytest plugin (loaded in every test process with `-p benchmarks.suite_profile`). ---

_times: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
_ran_here = [True]  # Whether this process runs tests (not pytest-xdist's controller).


def _listener(event: str, duration: float, **kwargs) -> None:
  kind = EVENTS.get(event)
  if kind:
    test = os.environ.get('PYTEST_CURRENT_TEST', '(outside a test)').rsplit(' ', 1)[0]
    _times[test][kind] += duration
    _times[test][kind + '_count'] += 1


def pytest_configure(config) -> None:
  _ran_here[0] = hasattr(config, 'workerinput') or not getattr(config.option, 'numprocesses', 0)


def pytest_sessionstart(session) -> None:
  # After tests/conftest.py has set XLA_FLAGS and the cache's environment, so jax starts as it
  # would without this plugin.
  import jax.monitoring  # noqa: PLC0415

  jax.monitoring.register_event_duration_secs_listener(_listener)


def pytest_runtest_logreport(report) -> None:
  if _ran_here[0]:
    _times[report.nodeid]['tests'] += report.duration


def pytest_sessionfinish(session) -> None:
  folder = os.environ.get(OUT_ENV)
  if folder and _ran_here[0]:
    with open(os.path.join(folder, f'{os.getpid()}.jsonl'), 'w') as f:
      for test, counts in _times.items():
        f.write(json.dumps({'test': test, **counts}) + '\n')


# --- The runner. ---


def _machine() -> str:
  sys.path.insert(0, str(ROOT))
  from lpe import xla_cpu  # noqa: PLC0415

  return f'processor ISA {xla_cpu.cpu_isa()}; {xla_cpu.usable_cores()} CPUs'


def _load() -> str:
  return ', '.join(f'{x:.1f}' for x in os.getloadavg())


def _table(rows: dict[str, collections.Counter], key, title: str, limit: int | None) -> list[str]:
  lines = [
    f'| {title} | tests s | compile s (programs) | trace s | lower s |',
    '|---|---:|---:|---:|---:|',
  ]
  ordered = sorted(rows.items(), key=lambda item: -item[1]['tests'])
  for name, c in ordered[:limit]:
    lines.append(
      f'| {key(name)} | {c["tests"]:.1f} | {c["compile"]:.1f} ({c["compile_count"]}) | '
      f'{c["trace"]:.1f} | {c["lower"]:.1f} |'
    )
  return lines


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--warm', action='store_true', help="The suite's own compilation cache.")
  parser.add_argument('--workers', default='auto', help="pytest-xdist's -n (default auto).")
  args, pytest_args = parser.parse_known_args()
  out = tempfile.mkdtemp(prefix='suite_profile_')
  env = dict(os.environ, **{OUT_ENV: out})
  if not args.warm:
    env['JAX_COMPILATION_CACHE_DIR'] = os.path.join(out, 'jax_compilation')
  machine, load_before = _machine(), _load()
  command = [
    sys.executable,
    *('-m pytest -q -p benchmarks.suite_profile -p no:cacheprovider --dist loadgroup'.split()),
    f'-n={args.workers}',
    *pytest_args,
  ]
  start = time.time()
  proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
  wall = time.time() - start
  summary = [line for line in proc.stdout.splitlines() if ' in ' in line and 'passed' in line]
  per_test: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for path in pathlib.Path(out).glob('*.jsonl'):
    for line in path.read_text().splitlines():
      record = json.loads(line)
      per_test[record.pop('test')].update(record)
  shutil.rmtree(out, ignore_errors=True)
  per_file: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for test, counts in per_test.items():
    per_file[test.split('::')[0]].update(counts)
  total = sum(per_file.values(), collections.Counter())
  print(f'{machine}; load average {load_before} before, {_load()} after; {" ".join(command[1:])}')
  print(f'pytest: {summary[-1].strip("= ") if summary else "no summary"}; {wall:.0f} s wall')
  print(
    f'Sum over tests: {total["tests"]:.0f} s; in the test processes XLA compilation '
    f'{total["compile"]:.0f} s ({total["compile_count"]} programs), tracing '
    f'{total["trace"]:.0f} s, lowering {total["lower"]:.0f} s.\n'
  )
  print('\n'.join(_table(per_file, lambda name: f'`{name}`', 'file', None)))
  print()
  print('\n'.join(_table(per_test, lambda name: f'`{name.split("/")[-1]}`', 'test', 20)))
  if proc.returncode:
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    sys.exit(proc.returncode)


if __name__ == '__main__':
  main()
