"""Every experiment config loads, is valid, documents its command, and trains one step.

The one-step runs use `tfds.testing.mock_data` (16 random examples in each split), a batch of 8
and one step per epoch: they check the whole path (data, train step, evaluation, export) and every
model's shapes, not accuracy. A distilling config loads the model that its teacher's config
exported, as the real runs do, so each teacher is compiled and run once for the whole file (one
pytest-xdist group per teacher). Tracing and compiling are nearly all of it (about half each for
the CIFAR ResNets with JAX's persistent compilation cache empty).
"""

import functools
import glob
import importlib
import json
import os
import re
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import pytest
import tensorflow_datasets as tfds
from absl import flags
from ml_collections import config_flags

from lpe import checkpoint, data, experiment, models, objectives, preflight, train

# ml_collections loads config files with the deprecated importlib `load_module`.
pytestmark = pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = ('__init__', 'common')  # Modules in configs/ that are not configs.
# A documented command: launch.py --config=configs/<file>.py[:<arg>] [\ newline] --workdir=<dir>.
COMMAND = re.compile(r'launch\.py --config=configs/(\S+)\s+(?:\\\s+)?--workdir=(\S+)')


def _doc(name: str) -> str:
  """The docstring of config `<file>`, `<file>.py` or `<file>.py:<arg>`."""
  return importlib.import_module(f'configs.{name.split(".")[0]}').__doc__ or ''


def _config_names() -> list[str]:
  """Every config string a config's docstring documents (`<file>.py` or `<file>.py:<arg>`)."""
  names = []
  for path in sorted(glob.glob(os.path.join(REPO, 'configs', '*.py'))):
    stem = os.path.basename(path)[: -len('.py')]
    if stem not in HELPERS:
      documented = [name for name, _ in COMMAND.findall(_doc(stem))]
      own = [n for n in dict.fromkeys(documented) if n.split(':')[0] == f'{stem}.py']
      names += own or [f'{stem}.py']  # Undocumented: fails the documentation test.
  return names


CONFIGS = _config_names()


def _load(name: str) -> ml_collections.ConfigDict:
  """Loads `name` as launch.py's --config flag does: `<file>.py:<arg>` calls get_config(arg)."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values)
  flag_values(['launch.py', f'--config={os.path.join(REPO, "configs", name)}'])
  return flag_values.config


def _runs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
  """The training runs of a config: itself, a comparison's `runs`, or a study's `base` run."""
  if 'runs' in config:
    return [config.runs[name] for name in config.runs]
  return [config.base] if 'grids' in config else [config]


def _single_run(config: ml_collections.ConfigDict) -> bool:
  return 'runs' not in config and 'grids' not in config


def _distilling(run: ml_collections.ConfigDict) -> bool:
  return bool(objectives.active(run.distill))


@functools.cache
def _teacher_config(model: str, dataset: str) -> str:
  """The one config that trains `model` on `dataset` from scratch."""
  found = [
    name
    for name in CONFIGS
    if _single_run(config := _load(name))
    and (config.model, config.dataset) == (model, dataset)
    and not _distilling(config)
  ]
  assert len(found) == 1, f'{len(found)} configs train a {model} teacher on {dataset}: {found}'
  return found[0]


@pytest.mark.parametrize('name', CONFIGS)
def test_config_is_valid_and_documents_its_command(name):
  for run in _runs(_load(name)):
    preflight.validate(run, 1)
  assert name in [config for config, _ in COMMAND.findall(_doc(name))], 'no launch command'


def test_teacher_checkpoints_are_their_teacher_configs_runs():
  """A distilling config's `runs/...` teacher is the workdir its teacher config documents."""
  workdirs = {name: workdir for n in CONFIGS for name, workdir in COMMAND.findall(_doc(n))}
  for name in CONFIGS:
    for run in _runs(_load(name)):
      if _distilling(run) and run.teacher.checkpoint.startswith('runs/'):
        teacher = _teacher_config(run.teacher.model, run.dataset)
        assert workdirs[teacher] == run.teacher.checkpoint, name


def test_unknown_config_argument_names_the_valid_ones():
  with pytest.raises(
    flags.IllegalFlagValueError, match='use one of resnet32x4-resnet8x4, wrn_40_2-wrn_16_2'
  ):
    _load('cifar100_crd_lp.py:resnet32x4-vgg8')
  with pytest.raises(flags.IllegalFlagValueError, match='use one of resnet32x4, wrn_40_2'):
    _load('cifar100_crd_teacher.py:resnet8')


def test_missing_cifar_stops_before_any_work(tmp_path):
  config = _load('cifar100_crd_teacher.py:resnet56')
  config.data_dir = str(tmp_path / 'tfds')
  with pytest.raises(data.DatasetUnavailableError, match='tfds build cifar100'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def _shrink(run: ml_collections.ConfigDict, data_dir: str) -> None:
  run.data_dir = data_dir
  run.image_size = min(run.image_size, 64)  # ImageNet's nets at 64 pixels: their shapes, faster.
  run.input_workers = 0
  run.num_epochs = 1
  run.steps_per_epoch_limit = 1
  run.batch_size = 8
  run.eval_batch_size = 8
  run.log_every_steps = 1
  run.distill.k = min(run.distill.k, 7)


def _trained_config(name: str) -> ml_collections.ConfigDict:
  """What the one-step test trains: the config, or a study's base run (studies.study's tests own the
  sweep itself, which is dozens of runs)."""
  config = _load(name)
  return config.base if 'grids' in config else config


@pytest.fixture(scope='module')
def run_one_step(tmp_path_factory):
  """Runs a config for one step on mock data, once per config; returns `(workdir, rows)`."""
  root = tmp_path_factory.mktemp('runs')
  done = {}

  def run(name: str) -> tuple[str, list[dict]]:
    if name not in done:
      config = _trained_config(name)
      for r in _runs(config):
        _shrink(r, str(root / 'tfds'))
        if teacher := _exported_teacher(r):
          r.teacher.checkpoint = run(teacher)[0]
        elif _distilling(r):  # A teacher converted from elsewhere: random weights of its model.
          r.teacher.checkpoint = _random_teacher(r, str(root / 'teachers'))
      if teacher := _compared_teacher(config):
        config.teacher_checkpoint = run(teacher)[0]
      workdir = str(root / name.replace(':', '_'))
      with tfds.testing.mock_data(num_examples=16):
        result = experiment.run(config, workdir)
      done[name] = workdir, result if isinstance(result, list) else [result]
    return done[name]

  return run


def _random_teacher(run: ml_collections.ConfigDict, folder: str) -> str:
  """Exports randomly initialised `run.teacher.model` variables as a teacher file."""
  info = data.info_of(run)
  module = models.build(run.teacher.model, info.num_classes)
  variables = module.init(jax.random.key(0), jnp.zeros((1, *info.image_shape)), train=False)
  path = os.path.join(folder, f'{run.teacher.model}.msgpack')
  meta = {'model': run.teacher.model, 'dataset': run.dataset, 'num_classes': info.num_classes}
  checkpoint.export_variables(path, variables, dict(meta, params=1, test_accuracy=None))
  return path


def _trained_runs(config: ml_collections.ConfigDict, workdir: str) -> list[tuple[str, object]]:
  """`(workdir, run config)` of each run a config trains (a comparison's loaded teacher is not)."""
  if 'runs' not in config:
    return [(workdir, config)]
  names = [n for n in config.runs if not (n == 'teacher' and config.teacher_checkpoint)]
  return [(os.path.join(workdir, n), config.runs[n]) for n in names]


def _exported_teacher(run: ml_collections.ConfigDict) -> str | None:
  """The teacher config whose exported run `run` distils from (its checkpoint under runs/)."""
  if _distilling(run) and run.teacher.checkpoint.startswith('runs/'):
    return _teacher_config(run.teacher.model, run.dataset)
  return None


def _compared_teacher(config: ml_collections.ConfigDict) -> str | None:
  """The teacher config whose run a comparison loads as its teacher (`teacher_checkpoint`)."""
  if config.get('teacher_checkpoint'):
    return _teacher_config(config.runs.teacher.model, config.runs.teacher.dataset)
  return None


def _loaded_teacher(name: str) -> str | None:
  """The teacher config whose exported run config `name` distils from, else None."""
  config = _trained_config(name)
  teachers = [_exported_teacher(run) for run in _runs(config)] + [_compared_teacher(config)]
  return next((t for t in teachers if t), None)


def _one_step_params() -> list:
  """CONFIGS, each in the pytest-xdist group of the teacher it trains or loads, so that each
  teacher trains once in the suite (`--dist loadgroup`, as scripts/test.sh runs it)."""
  with warnings.catch_warnings():  # Collection time: `pytestmark`'s filter does not apply yet.
    warnings.filterwarnings('ignore', 'the load_module', DeprecationWarning)
    loaded = {name: _loaded_teacher(name) for name in CONFIGS}
  teachers = set(loaded.values())
  params = []
  for name in CONFIGS:
    group = loaded[name] or (name if name in teachers else None)
    marks = [pytest.mark.xdist_group(f'teacher:{group}')] if group else []
    params.append(pytest.param(name, marks=marks))
  return params


@pytest.mark.parametrize('name', _one_step_params())
def test_config_trains_one_step(name, run_one_step):
  workdir, rows = run_one_step(name)
  trained = _trained_runs(_trained_config(name), workdir)
  assert sorted(r['model'] for r in rows if 'num_epochs' in r) == sorted(
    r.model for _, r in trained
  )
  for row in rows:
    assert row['params'] > 0 and 0 <= row['test_accuracy'] <= 1
  for run_dir, run in trained:
    assert os.path.exists(os.path.join(run_dir, 'model.msgpack'))
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
      (record,) = [json.loads(line) for line in f]
    assert ('train_lp' in record) == bool(run.distill.lp_weight)
    assert ('train_kd' in record) == bool(run.distill.kd_weight)
    assert record.get('train_lp', 1) > 0 and record.get('train_kd', 1) >= 0
