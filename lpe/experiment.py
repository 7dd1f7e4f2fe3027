"""Running experiments: one training run, a comparison of runs, or the evaluation of a saved model.

This is what `launch.py` calls; everything here is also usable from a notebook.
"""

import os
import re
from typing import Any

import jax
import ml_collections

from lpe import (
  checkpoint,
  data,
  evaluate,
  files,
  models,
  objectives,
  parallel,
  preflight,
  report,
  state,
  stream,
  teacher,
  train,
)
from lpe import config as config_lib
from lpe import workdir as workdir_lib


def evaluate_saved(
  path: str,
  *,
  data_dir: str | None = None,
  step: int | None = None,
  split: str | None = None,
  batch_size: int | None = None,
) -> dict:
  """Evaluates a saved model on a split of its dataset, every example once.

  Args:
    path: an exported `model.msgpack`, or a run's workdir (its latest orbax checkpoint, or `step`).
    data_dir: TFDS data directory (default: the run's config, else TFDS's default).
    step: with a workdir, the checkpoint step to evaluate (default: the latest).
    split: the split, or slice, to evaluate on (default: a workdir's `config.test_split`, else
      'test').
    batch_size: examples per evaluation batch (default: a workdir's `config.eval_batch_size`, else
      that of `lpe.config.default_config()`).

  Returns:
    `{'accuracy', 'loss', 'num_examples', 'model', 'dataset', 'split', 'step', 'source'}`.
  """
  if os.path.isdir(path) and os.path.isdir(os.path.join(path, 'checkpoints')):
    config = _run_config(path)
    config.data_dir = data_dir or config.data_dir
    info = data.info_of(config)
    model, variables, step = _restore_checkpoint(path, config, info, step)
    meta = {k: config.get(k) for k in ('dataset', 'image_size', 'augment')}
  else:
    meta = checkpoint.read_meta(path)
    info = data.info_of_model(meta, data_dir)
    model, variables, meta = checkpoint.load_model(path, info.image_shape)
    config = ml_collections.ConfigDict({'model': meta['model']})
  defaults = config_lib.default_config()
  split = split or config.get('test_split', defaults.test_split)
  batch_size = batch_size or config.get('eval_batch_size', defaults.eval_batch_size)
  dataset, data_dir = meta['dataset'], data_dir or config.get('data_dir') or None
  test = stream.test_split(
    dataset,
    split,
    data_dir,
    info,
    image_size=meta.get('image_size') or 0,
    augment=meta.get('augment') or 'none',
  )
  result = evaluate.evaluate(model, variables, test, info=info, batch_size=batch_size)
  return dict(
    result,
    model=config.model,
    dataset=dataset,
    split=split,
    step=step,
    source=os.path.abspath(path),
  )


def _run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was made with (its config.json)."""
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'{config_path} is missing; cannot tell which model {workdir} holds.')
  saved = files.read_json(config_path, fix=f'restore it from a config.<time>.json in {workdir}')
  return ml_collections.ConfigDict(saved)


def _restore_checkpoint(
  workdir: str, config: ml_collections.ConfigDict, info: data.DatasetInfo, step: int | None
) -> tuple[Any, dict[str, Any], int]:
  """`(module, variables, step)` of the student in checkpoint `step` (None: the latest) of the
  run in `workdir`, whose config is `config`."""
  model = models.build(config.model, info.num_classes)
  manager = checkpoint.checkpoint_manager(
    workdir, max_to_keep=config.keep_checkpoints, for_training=False
  )
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(
      f'{workdir}/checkpoints holds no checkpoint yet; train it first or pass a model.msgpack.'
    )
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ValueError(f'{workdir} has no checkpoint at step {step}; it has steps {list(steps)}.')
  abstract = jax.eval_shape(
    lambda: state.create_train_state(model, config, jax.random.key(0), info.image_shape, 1)
  )
  # A memory bank (distill.lp_graph='bank') is as large as the training split it was made for.
  abstract = abstract.replace(bank=checkpoint.saved_array(manager, step, 'bank'))
  # Checks the shapes against config.json's model first, so another architecture is a clear
  # error rather than an orbax shape error.
  restored = checkpoint.restore_step(manager, step, abstract)
  return model, state.variables_of(restored), step


COMPARISON_KEYS = ('teacher_checkpoint', 'runs')


def _comparison_plan(
  config: ml_collections.ConfigDict, workdir: str, *, resume: config_lib.Resume
) -> tuple[str, list[tuple[str, ml_collections.ConfigDict]]]:
  """The teacher path and the `(name, run config)` to train, in order, all checked before any work.

  Each run's keys, types and values are validated, its workdir's config compared, and every
  distilling run's teacher checked against the teacher it will get (the exported file, or the
  teacher run's model and dataset), so a mistake in the last run stops the first.
  """
  for key in config.keys():
    if key not in COMPARISON_KEYS:
      raise ValueError(
        f'config.{key} is not a setting of a comparison (it has {", ".join(COMPARISON_KEYS)}); '
        'remove it or move it into config.runs.<name>.'
      )
  runs = dict(config.runs)
  if 'teacher' not in runs:
    raise ValueError('config.runs has no teacher run; add config.runs.teacher.')
  teacher_path = config.teacher_checkpoint or os.path.join(workdir, 'teacher')
  # Students alone first, then the distilling runs (ConfigDict keys come back sorted).
  students = sorted(
    (name for name in runs if name != 'teacher'),
    key=lambda name: bool(objectives.active(runs[name].distill)),
  )
  plan = [] if config.teacher_checkpoint else [('teacher', runs['teacher'])]
  for name in students:
    run = runs[name].copy_and_resolve_references()
    if objectives.active(run.distill):
      run.teacher.checkpoint = teacher_path
    plan.append((name, run))
  for name, run in plan:
    try:
      preflight.validate(run, parallel.fixed_device_count())
    except ValueError as error:
      raise ValueError(_in_run(str(error), name)) from error
    workdir_lib.check_config(run, os.path.join(workdir, name), resume=resume)
  if config.teacher_checkpoint:
    meta = checkpoint.load_variables(config.teacher_checkpoint)[1]
  else:
    info = data.info_of(runs['teacher'])
    meta = {'model': runs['teacher'].model, 'num_classes': info.num_classes}
  for name, run in plan:
    if name == 'teacher' or not objectives.active(run.distill):
      continue
    classes = data.info_of(run).num_classes
    try:
      teacher.check_compatible(meta, run, classes, where=teacher_path)
    except ValueError as error:
      raise ValueError(_in_run(str(error), name)) from error
  return teacher_path, plan


def _in_run(message: str, name: str) -> str:
  """A run config's error message with its fields named as fields of `config.runs.<name>`."""
  named, count = re.subn(r'(?<![\w.])config\.', f'config.runs.{name}.', message)
  return named if count else f'config.runs.{name}: {message}'


def compare(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  resume: config_lib.Resume = 'same',
) -> list[dict[str, Any]]:
  """Trains each run of `config.runs` in `workdir/<name>` and prints a table of the results.

  The teacher run is trained first unless `config.teacher_checkpoint` names an exported teacher,
  which is then evaluated instead; every distilling run uses that teacher. Every run is checked
  before the first one trains. Finished runs are skipped and interrupted ones resume, so the same
  command can be run again after a kill (with `resume='optimizer'` after a non-finite stop,
  whose message names the run's fields as `config.runs.<name>.*`).
  """
  teacher_path, plan = _comparison_plan(config, workdir, resume=resume)
  rows = []
  if config.teacher_checkpoint:
    teacher_run = config.runs.teacher
    evaluation = evaluate_saved(
      teacher_path,
      data_dir=teacher_run.data_dir or None,
      split=teacher_run.test_split,
      batch_size=teacher_run.eval_batch_size,
    )
    meta = checkpoint.read_meta(teacher_path)
    rows.append(
      dict(
        name='teacher (loaded)',
        model=meta['model'],
        params=meta['params'],
        test_accuracy=evaluation['accuracy'],
      )
    )
  for name, run in plan:
    try:
      rows.append(train.train_and_evaluate(run, os.path.join(workdir, name), resume=resume))
    except train.NonFiniteLossError as error:  # Its advice names this run's fields.
      raise train.NonFiniteLossError(_in_run(str(error), name)) from error
  table = report.results_table(rows)
  reporter = report.Reporter('compare')
  reporter.say('\n' + table)
  if reporter.active:
    files.write_atomic(os.path.join(workdir, 'summary.md'), table + '\n')
  return rows


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  resume: config_lib.Resume = 'same',
) -> Any:
  """Runs a config: a comparison when it has `runs`, else one run (a study config, one with
  `grids`, is run by the `studies` tool: `studies.study.run`, as launch.py does).

  `resume='any'` lets a workdir's run continue with a config that differs from the one it was
  started with (see `lpe.config.RESUME_SAFE_FIELDS` for the fields that may always change);
  `resume='optimizer'` allows only `lpe.config.OPTIMIZER_FIELDS` to differ (the way to resume
  after a non-finite stop with a lower learning rate); `lpe.config.Resume`.
  """
  if 'grids' in config:
    raise ValueError(
      'This is a study config (it has grids): run it with launch.py or studies.study.run.'
    )
  if 'runs' in config:
    return compare(config, workdir, resume=resume)
  return train.train_and_evaluate(config, workdir, resume=resume)


def evaluate_and_save(
  path: str | None,
  *,
  data_dir: str | None = None,
  step: int | None = None,
  split: str | None = None,
  batch_size: int | None = None,
) -> dict[str, Any]:
  """`evaluate_saved`, also writing the result to `evaluation.json` beside the model."""
  if not path:
    raise ValueError('Name the model to evaluate: --checkpoint=<model.msgpack or run workdir>.')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist; pass a model.msgpack or a run workdir.')
  result = evaluate_saved(path, data_dir=data_dir, step=step, split=split, batch_size=batch_size)
  folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  name = 'evaluation.json' if os.path.isdir(path) else os.path.basename(path) + '.evaluation.json'
  files.write_json(os.path.join(folder, name), result)
  return result
