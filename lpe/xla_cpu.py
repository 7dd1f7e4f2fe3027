"""The fastest XLA:CPU settings for this processor, chosen before JAX starts.

XLA:CPU (jaxlib 0.10) hands convolutions and dots to YNNPACK. On processors with AVX-512 that is
the fastest setting measured; on processors with AVX2 but no AVX-512 YNNPACK's convolutions are
slow, and giving them to Eigen instead (`--xla_cpu_experimental_ynn_fusion_type=individual_dot`:
only dots stay on YNNPACK) made a ResNet-20 training step 2.5x faster (issue 11;
docs/performance.md). XLA reads `XLA_FLAGS` once, when its CPU backend starts, so `configure()`
must run before that: `launch.py` and `tests/conftest.py` call it first, and a notebook calls it
before `import jax`:

  import lpe.xla_cpu
  lpe.xla_cpu.configure()  # Sets XLA_FLAGS for this processor; imports no JAX.
  import jax

The choice follows the processor's instruction sets (`cpu_isa`), so it is the same on every run
on one machine, and a run resumed there gets the same flags. The settings change how XLA computes
convolutions, never what is trained: parameters and checkpoints are the same. Results differ
between settings by float32 rounding (another kernel sums in another order; docs/performance.md),
and are bitwise reproducible within one setting.

`LPE_XLA_CPU` overrides the choice: `auto` (or unset) chooses by processor, `off` adds no flag,
and a key of `SETTINGS` forces that setting. Flags the user set in `XLA_FLAGS` always win: a flag
whose name is already there is never added or changed.

Every core: under the 'ynn' setting (AVX-512 and AMX processors) YNNPACK's convolutions keep
about 1.3 of 2 cores busy, so there `configure` also gives the process one host device per core
it may run on (`--xla_force_host_platform_device_count`), and the trainer splits a batch over
them where the models are large enough to gain (`lpe.parallel.choose_devices`,
`config.cpu_devices`; 1.6-2.0x per step on 2 cores). Under 'ynn_dots' (AVX2) Eigen's
convolutions already fill every core and a split gained -22% to +9%, so the process keeps one
device (docs/performance.md, "Every core"). `LPE_CPU_DEVICES` sets the count either way (1: one
device, as plain JAX). On GPUs and TPUs the host devices go unused.
"""

import dataclasses
import os
import sys
import warnings
from collections.abc import MutableMapping

ENV_VAR = 'LPE_XLA_CPU'
DEVICES_ENV_VAR = 'LPE_CPU_DEVICES'
DEVICES_FLAG = '--xla_force_host_platform_device_count'

# Named XLA:CPU settings: the flags each adds to XLA_FLAGS.
SETTINGS: dict[str, tuple[str, ...]] = {
  # XLA's defaults: convolutions and dots on YNNPACK.
  'ynn': (),
  # Convolutions on Eigen, dots on YNNPACK.
  'ynn_dots': ('--xla_cpu_experimental_ynn_fusion_type=individual_dot',),
}

# The settings under which one device leaves cores idle, so a process gets one host device per
# core (measured in docs/performance.md, "Every core").
SPLITS = frozenset({'ynn'})

# The setting each instruction-set family gets (`cpu_isa`); measured in docs/performance.md.
BY_ISA = {
  'AMX': 'ynn',
  'AVX-512': 'ynn',
  'AVX2': 'ynn_dots',
  'other': 'ynn',
}

_AVX512 = {'avx512f', 'avx512bw', 'avx512vl', 'avx512dq'}  # What YNNPACK's AVX-512 kernels need.


@dataclasses.dataclass(frozen=True)
class Selection:
  """What `configure` chose.

  Attributes:
    isa: The processor's instruction-set family (`cpu_isa`).
    setting: The key of `SETTINGS` applied, or 'off'.
    source: Why: 'auto' (by `isa`) or `ENV_VAR` (forced).
    added: The flags added to XLA_FLAGS (those the user had not set).
    xla_flags: XLA_FLAGS as set.
    devices: The host devices asked for (`host_devices`); the user's own flag wins over it.
  """

  isa: str
  setting: str
  source: str
  added: tuple[str, ...]
  xla_flags: str
  devices: int = 1

  def describe(self) -> str:
    """One line for logs and benchmark tables."""
    added = ' '.join(self.added) or 'none'
    return f'XLA:CPU: {self.isa} processor, setting {self.setting!r} ({self.source}); added {added}'


def usable_cores() -> int:
  """The cores this process may run on (its CPU affinity; `os.cpu_count()` where unknown)."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def host_devices(environ: MutableMapping[str, str], cores: int | None = None) -> int:
  """How many host devices to make: `LPE_CPU_DEVICES` when set, else one per usable core.

  Raises:
    ValueError: `LPE_CPU_DEVICES` is not a whole number of at least 1.
  """
  forced = environ.get(DEVICES_ENV_VAR, '').strip()
  if not forced:
    return usable_cores() if cores is None else cores
  if not forced.isdigit() or int(forced) < 1:
    raise ValueError(
      f'{DEVICES_ENV_VAR}={forced!r} must be a whole number of CPU devices, at least 1 (1: one '
      'device, as plain JAX).'
    )
  return int(forced)


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
  """The processor's feature flags, as Linux lists them in /proc/cpuinfo (empty elsewhere).

  Args:
    cpuinfo: The text of /proc/cpuinfo; read from the file when None.
  """
  if cpuinfo is None:
    try:
      with open('/proc/cpuinfo') as f:
        cpuinfo = f.read()
    except OSError:
      return frozenset()
  for line in cpuinfo.splitlines():
    key, _, value = line.partition(':')
    if key.strip() in ('flags', 'Features'):
      return frozenset(value.split())
  return frozenset()


def cpu_isa(flags: frozenset[str] | None = None) -> str:
  """The widest x86 vector family the processor has: 'AMX', 'AVX-512', 'AVX2' or 'other'.

  Args:
    flags: Feature flags as `cpu_flags` returns them; this processor's when None.

  Example:
    >>> cpu_isa(frozenset({'avx', 'avx2', 'fma'}))
    'AVX2'
  """
  flags = cpu_flags() if flags is None else flags
  if _AVX512 <= flags:
    return 'AMX' if 'amx_tile' in flags else 'AVX-512'
  if {'avx2', 'fma'} <= flags:
    return 'AVX2'
  return 'other'


def _flag_name(flag: str) -> str:
  return flag.split('=', 1)[0].lstrip('-')


def merge_flags(user_flags: str, flags: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
  """Appends to `user_flags` those of `flags` whose names it does not set.

  Args:
    user_flags: An XLA_FLAGS value (space-separated `--name=value` flags), possibly empty.
    flags: Flags to add.

  Returns:
    The merged XLA_FLAGS value and the flags actually added.

  Example:
    >>> merge_flags('--xla_cpu_foo=1', ('--xla_cpu_foo=2', '--xla_cpu_bar=3'))
    ('--xla_cpu_foo=1 --xla_cpu_bar=3', ('--xla_cpu_bar=3',))
  """
  taken = {_flag_name(f) for f in user_flags.split()}
  added = tuple(f for f in flags if _flag_name(f) not in taken)
  return ' '.join([*user_flags.split(), *added]), added


def _backend_started() -> bool:
  """Whether JAX has already started a backend in this process (it then ignores new flags)."""
  bridge = sys.modules.get('jax._src.xla_bridge')
  return bool(getattr(bridge, '_backends', None))


def configure(
  environ: MutableMapping[str, str] | None = None,
  flags: frozenset[str] | None = None,
  cores: int | None = None,
) -> Selection:
  """Adds this processor's XLA:CPU setting and host devices to `XLA_FLAGS`; call it before JAX
  starts.

  Args:
    environ: The environment to read `LPE_XLA_CPU` and `LPE_CPU_DEVICES` from and write
      `XLA_FLAGS` to (os.environ when None).
    flags: The processor's feature flags (`cpu_flags()` when None).
    cores: The usable cores (`usable_cores()` when None).

  Returns:
    What was chosen and added.

  Raises:
    ValueError: `LPE_XLA_CPU` names no setting, or `LPE_CPU_DEVICES` no count.
  """
  environ = os.environ if environ is None else environ
  isa = cpu_isa(flags)
  forced = environ.get(ENV_VAR, '').strip()
  if forced in ('', 'auto'):
    setting, source = BY_ISA[isa], 'auto'
  elif forced == 'off' or forced in SETTINGS:
    setting, source = forced, ENV_VAR
  else:
    names = ', '.join(['auto', 'off', *SETTINGS])
    raise ValueError(f'{ENV_VAR}={forced!r} names no XLA:CPU setting; use one of {names}.')
  # Host devices where the setting leaves cores idle, or where asked for by count.
  asked = setting in SPLITS or environ.get(DEVICES_ENV_VAR, '').strip()
  devices = host_devices(environ, cores) if asked else 1
  wanted = (*SETTINGS.get(setting, ()), *([f'{DEVICES_FLAG}={devices}'] if devices > 1 else []))
  xla_flags, added = merge_flags(environ.get('XLA_FLAGS', ''), wanted)
  if added:
    environ['XLA_FLAGS'] = xla_flags
    if _backend_started() and environ is os.environ:
      warnings.warn(
        'lpe.xla_cpu.configure() ran after JAX started its backend, so XLA ignores the flags it '
        'set; call it before `import jax`.',
        stacklevel=2,
      )
  return Selection(isa, setting, source, added, xla_flags, devices)
