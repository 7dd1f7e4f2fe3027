"""The XLA:CPU setting chosen per processor (lpe/xla_cpu.py): ISA, merging, override, no JAX."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from lpe import xla_cpu

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOTS_FLAG = '--xla_cpu_experimental_ynn_fusion_type=individual_dot'
AVX2 = frozenset({'sse4_2', 'avx', 'avx2', 'fma', 'f16c'})
AVX512 = AVX2 | {'avx512f', 'avx512bw', 'avx512vl', 'avx512dq', 'avx512_vnni'}


def test_cpu_flags_reads_the_first_flags_line():
  text = 'processor\t: 0\nflags\t\t: fpu avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu\n'
  assert xla_cpu.cpu_flags(text) == {'fpu', 'avx', 'avx2', 'fma'}
  assert xla_cpu.cpu_flags('model name\t: something\n') == frozenset()


@pytest.mark.parametrize(
  'flags, isa',
  [
    (AVX2, 'AVX2'),
    (AVX512, 'AVX-512'),
    (AVX512 | {'amx_tile', 'amx_bf16'}, 'AMX'),
    (AVX2 | {'avx512f'}, 'AVX2'),  # AVX-512F alone is not what YNNPACK's kernels need.
    (frozenset({'sse2', 'avx'}), 'other'),
    (frozenset(), 'other'),
  ],
)
def test_cpu_isa(flags, isa):
  assert xla_cpu.cpu_isa(flags) == isa


def test_avx2_gets_convolutions_on_eigen_and_avx512_the_defaults():
  env = {}
  chosen = xla_cpu.configure(env, AVX2, cores=1)
  assert (chosen.isa, chosen.setting, chosen.source) == ('AVX2', 'ynn_dots', 'auto')
  assert env['XLA_FLAGS'] == DOTS_FLAG and chosen.added == (DOTS_FLAG,)
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  chosen = xla_cpu.configure(env, AVX512, cores=1)
  assert (chosen.isa, chosen.setting, chosen.added) == ('AVX-512', 'ynn', ())
  assert env['XLA_FLAGS'] == '--xla_force_host_platform_device_count=4'


def test_user_flags_are_kept_and_never_overridden():
  user = '--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type='
  env = {'XLA_FLAGS': user}
  chosen = xla_cpu.configure(env, AVX2, cores=1)
  assert env['XLA_FLAGS'] == user and chosen.added == ()
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  xla_cpu.configure(env, AVX2, cores=1)
  assert env['XLA_FLAGS'] == f'--xla_force_host_platform_device_count=8 {DOTS_FLAG}'
  env_again = dict(env)
  xla_cpu.configure(env_again, AVX2, cores=1)  # Idempotent: a second call adds nothing.
  assert env_again == env


def test_environment_variable_forces_or_turns_off_the_choice():
  env = {xla_cpu.ENV_VAR: 'off'}
  chosen = xla_cpu.configure(env, AVX2, cores=1)
  assert 'XLA_FLAGS' not in env and (chosen.setting, chosen.source) == ('off', xla_cpu.ENV_VAR)
  env = {xla_cpu.ENV_VAR: 'ynn_dots'}
  assert xla_cpu.configure(env, AVX512, cores=1).added == (DOTS_FLAG,)
  env = {xla_cpu.ENV_VAR: 'ynn'}
  assert xla_cpu.configure(env, AVX2, cores=1).added == ()
  with pytest.raises(ValueError, match='LPE_XLA_CPU=.eigen. names no XLA:CPU setting'):
    xla_cpu.configure({xla_cpu.ENV_VAR: 'eigen'}, AVX2, cores=1)


def test_one_host_device_per_core_where_the_setting_leaves_cores_idle():
  env = {}
  chosen = xla_cpu.configure(env, AVX512, cores=4)
  assert env['XLA_FLAGS'] == '--xla_force_host_platform_device_count=4' and chosen.devices == 4
  env = {}
  assert xla_cpu.configure(env, AVX512, cores=1).added == () and 'XLA_FLAGS' not in env
  # AVX2: Eigen's convolutions fill the cores; one device.
  env = {}
  assert xla_cpu.configure(env, AVX2, cores=4).added == (DOTS_FLAG,)
  env = {xla_cpu.DEVICES_ENV_VAR: '3'}
  assert xla_cpu.configure(env, AVX2, cores=2).added == (
    DOTS_FLAG,
    '--xla_force_host_platform_device_count=3',
  )
  env = {xla_cpu.DEVICES_ENV_VAR: '1'}
  assert xla_cpu.configure(env, AVX512, cores=8).added == () and 'XLA_FLAGS' not in env
  # The user's own count wins; 'off' adds nothing unless a count is asked for.
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  assert xla_cpu.configure(env, AVX512, cores=2).added == ()
  env = {xla_cpu.ENV_VAR: 'off'}
  assert xla_cpu.configure(env, AVX512, cores=2).added == () and 'XLA_FLAGS' not in env
  for bad in ('0', 'two', '-1'):
    with pytest.raises(ValueError, match='LPE_CPU_DEVICES=.* must be a whole number'):
      xla_cpu.configure({xla_cpu.DEVICES_ENV_VAR: bad}, AVX512, cores=2)


def _python(code: str, **env) -> str:
  unset = ('XLA_FLAGS', xla_cpu.ENV_VAR, xla_cpu.DEVICES_ENV_VAR)
  environ = {k: v for k, v in os.environ.items() if k not in unset}
  environ.update(env)
  out = subprocess.run(
    [sys.executable, '-c', textwrap.dedent(code)],
    cwd=ROOT,
    env=environ,
    capture_output=True,
    text=True,
    check=True,
  )
  return out.stdout.strip()


def test_configure_and_import_lpe_import_no_jax():
  code = """
    import sys
    import lpe, lpe.xla_cpu
    lpe.xla_cpu.configure()
    print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))
  """
  assert _python(code) == '[]'


def test_launch_applies_the_setting_before_jax_compiles():
  # Through launch.py's import, the forced setting reaches XLA: with convolutions on Eigen the
  # compiled conv has fewer YNNPACK fusions than with XLA's defaults.
  code = """
    import os
    import launch
    import jax, jax.numpy as jnp
    from jax import lax
    x, k = jnp.ones((8, 16, 16, 64)), jnp.ones((3, 3, 64, 64))
    conv = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), 'SAME',
                                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    text = jax.jit(conv).lower(x, k).compile().as_text()
    print(os.environ.get('XLA_FLAGS', ''), '|', text.count('__ynn_fusion'))
  """
  dots = _python(code, LPE_XLA_CPU='ynn_dots', LPE_CPU_DEVICES='1')
  default = _python(code, LPE_XLA_CPU='ynn', LPE_CPU_DEVICES='1')
  assert dots.startswith(DOTS_FLAG) and default.startswith('|')
  dots_fusions, default_fusions = (int(s.rsplit('|', 1)[1]) for s in (dots, default))
  if default_fusions == 0:
    pytest.skip('This jaxlib hands no convolution to YNNPACK, so the setting changes nothing.')
  assert dots_fusions < default_fusions


def test_configure_after_jax_started_warns():
  code = """
    import warnings
    import jax
    jax.devices()
    from lpe import xla_cpu
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      xla_cpu.configure()
    print([str(w.message) for w in caught])
  """
  assert 'call it before `import jax`' in _python(code, LPE_XLA_CPU='ynn_dots')
  assert _python(code, LPE_XLA_CPU='off') == '[]'  # Nothing added: nothing to warn about.
