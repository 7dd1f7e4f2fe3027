"""Running experiments: one training run, a comparison of runs, or the evaluation of a saved model.

This is what `launch.py` calls; everything here is also usable from a notebook.
"""

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from lpe import checkpoint, data, evaluate, models, train


def evaluate_saved(path: str, *, data_dir: str | None = None, step: int | None = None) -> dict:
  """Evaluates a saved model on its dataset's test split.

  Args:
    path: an exported `model.msgpack`, or a run's workdir (its latest orbax checkpoint, or `step`).
    data_dir: TFDS data directory (default: the run's config, else TFDS's default).
    step: with a workdir, the checkpoint step to evaluate (default: the latest).

  Returns:
    `{'accuracy', 'loss', 'num_examples', 'model', 'dataset', 'step', 'source'}`.
  """
  if os.path.isdir(path) and os.path.isdir(os.path.join(path, 'checkpoints')):
    config_path = os.path.join(path, 'config.json')
    if not os.path.exists(config_path):
      raise FileNotFoundError(f'{config_path} is missing; cannot tell which model {path} holds.')
    with open(config_path) as f:
      config = ml_collections.ConfigDict(json.load(f))
    info = data.dataset_info(config.dataset)
    model = models.build(config.model, info.num_classes)
    manager = checkpoint.checkpoint_manager(path, max_to_keep=config.keep_checkpoints)
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f'{path}/checkpoints holds no checkpoint yet.')
    step = steps[-1] if step is None else step
    if step not in steps:
      raise ValueError(f'{path} has no checkpoint at step {step}; it has steps {list(steps)}.')
    state = jax.eval_shape(
      lambda: train.create_train_state(model, config, jax.random.key(0), info.image_shape, 1)
    )
    state = manager.restore(step, args=checkpoint.ocp.args.StandardRestore(state))
    variables = train.variables_of(state)
    dataset, data_dir = config.dataset, data_dir or config.data_dir or None
  else:
    variables, meta = checkpoint.load_variables(path)
    dataset, info = meta['dataset'], data.dataset_info(meta['dataset'])
    model = models.build(meta['model'], meta['num_classes'])
    expected = jax.eval_shape(
      functools.partial(model.init, train=False),
      jax.random.key(0),
      jnp.zeros((1, *info.image_shape)),
    )
    checkpoint.check_variables_match(variables, expected, what=f'Model file {path}')
    config = ml_collections.ConfigDict({'model': meta['model']})
  test = data.load_split(dataset, 'test', data_dir)
  result = evaluate.evaluate(model, variables, test, info=info, batch_size=1000)
  return dict(result, model=config.model, dataset=dataset, step=step, source=os.path.abspath(path))


def _table(rows: list[dict[str, Any]]) -> str:
  lines = [
    '| run | model | parameters | test accuracy (last epoch) | best epoch | train time |',
    '|---|---|---:|---:|---:|---:|',
  ]
  for r in rows:
    best = f'{100 * r["best_test_accuracy"]:.2f}%' if r.get('best_test_accuracy') else '-'
    time_s = f'{r["train_time_s"]:.0f} s' if r.get('train_time_s') else '-'
    lines.append(
      f'| {r["name"]} | {r["model"]} | {r["params"]:,} | {100 * r["test_accuracy"]:.2f}% '
      f'| {best} | {time_s} |'
    )
  return '\n'.join(lines)


def compare(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """Trains each run of `config.runs` in `workdir/<name>` and prints a table of the results.

  The teacher run is trained first unless `config.teacher_checkpoint` names an exported teacher,
  which is then evaluated instead; every distilling run uses that teacher. Finished runs are
  skipped and interrupted ones resume, so the same command can be run again after a kill.
  """
  runs = dict(config.runs)
  rows = []
  if config.teacher_checkpoint:
    teacher_path = config.teacher_checkpoint
    evaluation = evaluate_saved(teacher_path, data_dir=runs['teacher'].data_dir or None)
    _, meta = checkpoint.load_variables(teacher_path)
    rows.append(
      dict(
        name='teacher (loaded)',
        model=meta['model'],
        params=meta['params'],
        test_accuracy=evaluation['accuracy'],
      )
    )
  else:
    teacher_path = os.path.join(workdir, 'teacher')
    rows.append(train.train_and_evaluate(runs['teacher'], teacher_path))
  # Students alone first, then the distilling runs (ConfigDict keys come back sorted).
  students = sorted(
    (name for name in runs if name != 'teacher'),
    key=lambda name: bool(runs[name].distill.lp_weight or runs[name].distill.kd_weight),
  )
  for name in students:
    run = runs[name].copy_and_resolve_references()
    if run.distill.lp_weight or run.distill.kd_weight:
      run.teacher.checkpoint = teacher_path
    rows.append(train.train_and_evaluate(run, os.path.join(workdir, name)))
  table = _table(rows)
  print('\n' + table, flush=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'summary.md'), 'w') as f:
      f.write(table + '\n')
  return rows


def run(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Runs a config: a comparison when it has `runs`, else one training run."""
  if 'runs' in config:
    return compare(config, workdir)
  return train.train_and_evaluate(config, workdir)


def evaluate_and_save(
  path: str | None, *, data_dir: str | None = None, step: int | None = None
) -> dict[str, Any]:
  """`evaluate_saved`, also writing the result to `evaluation.json` beside the model."""
  if not path:
    raise ValueError('Name the model to evaluate: --checkpoint=<model.msgpack or run workdir>.')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist; pass a model.msgpack or a run workdir.')
  result = evaluate_saved(path, data_dir=data_dir, step=step)
  folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  name = 'evaluation.json' if os.path.isdir(path) else os.path.basename(path) + '.evaluation.json'
  with open(os.path.join(folder, name), 'w') as f:
    json.dump(result, f, indent=2)
  return result
