"""A method comparison study: a validation sweep per method, then seeds, then a results page.

1. Sweep: for every method and weight in `config.grid` (and every k for LP), train the student on
   `config.sweep.train_split` and score it on `config.sweep.val_split`, both carved from the
   training set: the test set is never used to choose anything.
2. Final: the student alone, each method at its best weight, and LP+KD at the best LP and KD
   weights, each trained on the whole training split with `config.final.seeds` seeds.
3. The page: `config.page` (markdown with tables and two PNG plots beside it), every number read
   back from the runs' `metrics.jsonl` and `result.json`.

Every run is an ordinary `train_and_evaluate` run in its own workdir, so the study resumes after a
kill and finished runs are not repeated.
"""

import json
import os
import statistics
from typing import Any

import jax
import ml_collections
import numpy as np

from lpe import checkpoint, data, evaluate, metrics_io, models, report, train

# The page's row order (ConfigDict keys come back sorted).
ORDER = ('kd', 'fitnet', 'at', 'sp', 'rkd', 'pkt', 'lp')


def _run_config(base: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
  config = base.copy_and_resolve_references()
  for key, value in changes.items():
    target = config
    *parents, leaf = key.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def _sweep_points(config) -> list[tuple[str, dict[str, Any]]]:
  points = []
  for method in (m for m in ORDER if m in config.grid):
    for weight in config.grid[method]:
      ks = config.lp_k_grid if method == 'lp' else (None,)
      for k in ks:
        changes = {f'distill.{method}_weight': float(weight)}
        name = f'{method}_w{weight:g}'
        if k is not None:
          changes['distill.k'] = int(k)
          name += f'_k{k}'
        points.append((name, changes))
  return points


def _last(workdir: str) -> dict[str, Any]:
  return metrics_io.read_metrics(workdir)[-1]


def sweep(config, workdir: str, *, allow_config_change: bool = False) -> dict[str, dict[str, Any]]:
  """Runs the validation sweep; returns, per method, the best point's changes and its score."""
  best: dict[str, dict[str, Any]] = {}
  rows = []
  for name, changes in _sweep_points(config):
    run = _run_config(
      config.base,
      name=f'sweep/{name}',
      seed=config.sweep.seed,
      num_epochs=config.sweep.epochs,
      train_split=config.sweep.train_split,
      test_split=config.sweep.val_split,
      steps_per_epoch_limit=config.sweep.steps_per_epoch_limit,
      **changes,
    )
    run_dir = os.path.join(workdir, 'sweep', name)
    train.train_and_evaluate(run, run_dir, allow_config_change=allow_config_change)
    score = _last(run_dir)['test_accuracy']
    method = name.split('_w')[0]
    rows.append({'run': name, 'method': method, 'val_accuracy': score, **changes})
    if method not in best or score > best[method]['val_accuracy']:
      best[method] = {'changes': changes, 'val_accuracy': score, 'run': name}
  with open(os.path.join(workdir, 'sweep.json'), 'w') as f:
    json.dump({'rows': rows, 'best': best}, f, indent=2)
  return best


def _final_rows(config, best) -> list[tuple[str, dict[str, Any]]]:
  rows = [('student', {})]
  rows += [(method, best[method]['changes']) for method in ORDER if method in best]
  if 'lp' in best and 'kd' in best:
    rows.append(('lp_kd', {**best['lp']['changes'], **best['kd']['changes']}))
  return rows


def final(config, workdir: str, best, *, allow_config_change: bool = False) -> dict[str, list[str]]:
  """Trains every final row with every seed; returns the run directories per row."""
  dirs = {}
  for row, changes in _final_rows(config, best):
    dirs[row] = []
    for seed in range(config.final.seeds):
      run = _run_config(
        config.base,
        name=f'{row}/seed{seed}',
        seed=seed,
        num_epochs=config.final.epochs,
        steps_per_epoch_limit=config.final.steps_per_epoch_limit,
        **changes,
      )
      run_dir = os.path.join(workdir, 'final', row, f'seed{seed}')
      train.train_and_evaluate(run, run_dir, allow_config_change=allow_config_change)
      dirs[row].append(run_dir)
  return dirs


def summarise(dirs: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
  """Per row: last/best test accuracies, neighbourhood preservation, extra params, epoch time."""
  out = {}
  for row, run_dirs in dirs.items():
    histories = [metrics_io.read_metrics(d) for d in run_dirs]
    results = []
    for d in run_dirs:
      with open(os.path.join(d, 'result.json')) as f:
        results.append(json.load(f))
    out[row] = {
      'last': [h[-1]['test_accuracy'] for h in histories],
      'best': [max(r['test_accuracy'] for r in h) for h in histories],
      'curves': [[r['test_accuracy'] for r in h] for h in histories],
      'kept': [h[-1].get('test_neighbourhood_preservation', float('nan')) for h in histories],
      'cka': [h[-1].get('test_cka', float('nan')) for h in histories],
      'epoch_time': [statistics.fmean(r['epoch_time_s'] for r in h) for h in histories],
      'extra_params': results[0].get('extra_params', 0),
      'objective': results[0].get('objective', ''),
      'params': results[0]['params'],
    }
  return out


def _teacher_row(config) -> dict[str, Any]:
  variables, meta = checkpoint.load_variables(config.base.teacher.checkpoint)
  info = data.dataset_info(meta['dataset'])
  test = data.load_split(meta['dataset'], config.base.test_split, config.base.data_dir or None)
  model = models.build(meta['model'], meta['num_classes'])
  variables = jax.tree.map(np.asarray, variables)
  result = evaluate.evaluate(
    model, variables, test, info=info, batch_size=config.base.eval_batch_size
  )
  return {'accuracy': result['accuracy'], 'model': meta['model'], 'params': meta['params']}


def run(config: ml_collections.ConfigDict, workdir: str, *, allow_config_change=False) -> str:
  """The whole study: sweep, final runs, page. Returns the page's path."""
  os.makedirs(workdir, exist_ok=True)
  best = sweep(config, workdir, allow_config_change=allow_config_change)
  dirs = final(config, workdir, best, allow_config_change=allow_config_change)
  summary = summarise(dirs)
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump({'best': best, 'summary': summary}, f, indent=2)
  with open(os.path.join(workdir, 'sweep.json')) as f:
    sweep_rows = json.load(f)['rows']
  path = report.write_study_page(config, best, summary, sweep_rows, _teacher_row(config))
  report.Reporter('study').say(f'Wrote {path}.')
  return path
