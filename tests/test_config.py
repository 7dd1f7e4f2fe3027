"""lpe.config: every numeric setting has a domain, every bad value is refused, NaN included."""

import ast
import math
import os
import re
import subprocess
import sys

import ml_collections
import pytest

from lpe import config as config_lib
from lpe import data, preflight
from tests.conftest import write_image_folder


def _numeric_settings(
  config: ml_collections.ConfigDict, prefix: str = ''
) -> dict[str, tuple[type, bool]]:
  """`{dotted key: (int or float, whether it is a tuple)}` for every number in the schema."""
  found = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      found.update(_numeric_settings(value, f'{prefix}{key}.'))
      continue
    if value is None:  # A placeholder: its declared type.
      value = config.get_type(key)()
    is_tuple = isinstance(value, tuple | list)
    element = (value[0] if value else 0.0) if is_tuple else value
    if isinstance(element, int | float) and not isinstance(element, bool):
      found[prefix + key] = (type(element), is_tuple)
  return found


NUMERIC = _numeric_settings(config_lib.default_config())


def _bad_values(domain: config_lib.Domain, kind: type) -> list:
  bad = [math.nan, math.inf, -math.inf]
  if domain.low > -math.inf:
    bad.append(domain.low if domain.low_open else domain.low - (1 if kind is int else 1e-3))
  if domain.high < math.inf:
    bad.append(domain.high if domain.high_open else domain.high + (1 if kind is int else 1e-3))
  return [kind(x) if kind is int and math.isfinite(x) else x for x in bad]


def test_every_numeric_setting_has_a_domain_and_its_default_is_in_it():
  """A new number in `default_config()` without a range in `DOMAINS` fails here."""
  assert sorted(NUMERIC) == sorted(config_lib.DOMAINS)
  defaults = config_lib.default_config()
  for key in NUMERIC:
    value = defaults[key] if '.' not in key else defaults[key.split('.')[0]][key.split('.')[1]]
    for element in value if isinstance(value, tuple | list) else [value]:
      if element is not None:
        assert config_lib.DOMAINS[key].admits(element), (key, element)


@pytest.mark.parametrize('key', sorted(NUMERIC))
def test_nan_and_out_of_range_values_of_every_numeric_setting_are_refused(key):
  kind, is_tuple = NUMERIC[key]
  for bad in _bad_values(config_lib.DOMAINS[key], kind):
    # As a dict: ConfigDict's own type check refuses a float (NaN) for an int field, but a
    # config.json or a config built from a dict can hold one.
    values = config_lib.default_config().to_dict()
    group, _, name = key.rpartition('.')
    (values[group] if group else values)[name] = (bad,) if is_tuple else bad
    with pytest.raises(ValueError, match=re.escape(f'config.{key}')):
      config_lib.check(ml_collections.ConfigDict(values))


@pytest.mark.parametrize(
  'key, value, message',
  [
    ('learning_rate', -0.1, 'config.learning_rate must be > 0, got -0.1'),
    ('learning_rate', math.nan, 'config.learning_rate must be a finite number > 0, got nan'),
    ('steps_per_epoch_limit', -5, 'config.steps_per_epoch_limit must be >= 0, got -5'),
    ('keep_checkpoints', 1, 'keep at least 2'),
    ('optimizer', 'lion', "config.optimizer='lion' is unknown; use adam or sgd"),
    ('lr_schedule', 'linear', "config.lr_schedule='linear' is unknown; use constant, cosine"),
  ],
)
def test_nan_and_bad_values_from_the_issue_are_refused_with_their_fix(key, value, message):
  config = config_lib.default_config()
  config[key] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    config_lib.check(config)


def test_nan_in_a_saved_config_is_not_a_change_on_resume():
  """An older lpe could save `learning_rate=nan`; NaN == NaN for the resume guard."""
  saved = {'learning_rate': math.nan, 'lr_decay_epochs': [1, math.nan], 'seed': 0}
  assert config_lib.changed_fields(saved, dict(saved)) == []
  changed = config_lib.changed_fields(saved, dict(saved, learning_rate=1e-3))
  assert changed == ['learning_rate: nan -> 0.001']


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lpe_imports(path: str) -> set[str]:
  """The lpe modules a source file imports (`from lpe import x`, `from lpe.x import y`,
  `import lpe.x`), as dotted names."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module == 'lpe':
        found.update(f'lpe.{alias.name}' for alias in node.names)
      elif node.module.startswith('lpe.'):
        found.add(node.module)
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith('lpe.'))
  return found


def _source(module: str) -> str:
  path = os.path.join(REPO, *module.split('.'))
  return os.path.join(path, '__init__.py') if os.path.isdir(path) else path + '.py'


def test_config_imports_only_leaves_of_lpe():
  """The config is data: every lpe module it imports imports nothing else from lpe (so the
  config stands at the edge of the import graph, not in its middle)."""
  imported = _lpe_imports(_source('lpe.config'))
  assert imported == {'lpe.methods'}  # A new import must be a leaf too (below).
  for module in imported:
    assert _lpe_imports(_source(module)) == set(), module


def test_importing_the_config_loads_no_jax():
  code = (
    'import sys, lpe.config; print(sorted(m for m in ("jax", "flax", "numpy") if m in sys.modules))'
  )
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == '[]'


def test_the_preflight_checks_a_dataset_without_computing_its_constants(tmp_path):
  """`lpe.preflight.validate` reads a folder dataset's metadata only: its normalisation constants
  are not computed nor cached (the run computes them when it loads its data), yet a bad split of
  the training data is refused before any work."""
  root = write_image_folder(tmp_path / 'pets', classes=3, per_class=(4, 2), sizes=((20, 24),))
  config = config_lib.default_config()
  config.dataset = f'folder:{root}'
  config.train_split = 'train[:9]'
  preflight.validate(config, 1)
  assert 'lpe_cache' not in os.listdir(root)
  data.info_of(config)  # What the run does: computes and caches them.
  assert 'lpe_cache' in os.listdir(root)
  config.train_split = 'trian'
  with pytest.raises(ValueError, match="has no split 'trian'"):
    preflight.validate(config, 1)
