"""A method study's results page (markdown) and its plots, written from the study's ledger.

Every number on the page is read from the ledger records of `lpe.study` (each run's epoch
records and result); nothing is computed here but means, spreads and paired t-intervals.
"""

import math
import os
import statistics
from typing import Any

import numpy as np
from scipy import stats

from lpe import files, objectives
from lpe import methods as lpe_methods

Records = list[dict[str, Any]]
# A study's row labels.
LABELS = {
  'student': 'student alone',
  **objectives.LABELS,
  'lp_kd': 'LP+KD',
  'lp_neighbours': 'LP, graph neighbours in the batch',
  'lp_bank': 'LP, graph with a memory bank',
  'lp_l2': 'LP, L2-normalised student',
  'lp_mean': 'LP, mean-normalised student',
  'lp_neighbours_added': 'LP, graph neighbours added to the batch',
  'neighbours_control': 'graph neighbours added, LP off (control)',
  'lp_bank_warm': 'LP, memory bank with warm-up',
}


def paired_interval(
  values: list[float], baseline: list[float], confidence: float = 0.95
) -> tuple[float, float, float]:
  """`(mean, low, high)` of the per-seed differences `values - baseline`: the mean and its
  t-interval (two-sided, `confidence`) over the pairs; `(mean, nan, nan)` for fewer than 2."""
  diffs = np.asarray(values, np.float64) - np.asarray(baseline, np.float64)
  diffs = diffs[~np.isnan(diffs)]  # A pair with a diverged run (NaN) is left out.
  if len(diffs) == 0:
    return math.nan, math.nan, math.nan
  mean = float(np.mean(diffs))
  if len(diffs) < 2:
    return mean, math.nan, math.nan
  half = (
    stats.t.ppf(0.5 + confidence / 2, len(diffs) - 1)
    * np.std(diffs, ddof=1)
    / math.sqrt(len(diffs))
  )
  return mean, mean - float(half), mean + float(half)


def summarise(records: Records) -> dict[str, Any]:
  """One final row's seeds: accuracies (last and best epoch), curves, diagnostics, sizes.

  A seed that diverged (`lpe.study` records it with `diverged`) counts in `diverged` and is NaN
  in the per-seed lists, so means, spreads and paired intervals are over the other seeds.
  """
  done = [r['history'] if not r.get('diverged') else None for r in records]
  finished = [h for h in done if h]
  result = next((r['result'] for r in records if r['result']), None)
  if result is None:
    raise ValueError(f'every seed of {records[0]["run"].rsplit("/", 1)[0]} diverged.')

  def each(value):
    return [value(h) if h else math.nan for h in done]

  return {
    'last': each(lambda h: h[-1]['test_accuracy']),
    'best': each(lambda h: max(e['test_accuracy'] for e in h)),
    'curves': [[e['test_accuracy'] for e in h] for h in finished],
    'kept': each(lambda h: h[-1].get('test_neighbourhood_preservation', math.nan)),
    'cka': each(lambda h: h[-1].get('test_cka', math.nan)),
    'epoch_time': statistics.fmean(e['epoch_time_s'] for h in finished for e in h),
    'params': result['params'],
    'extra_params': result.get('extra_params', 0),
    'objective': result.get('objective', ''),
    'diverged': len(records) - len(finished),
  }


def _finite(values: list[float]) -> list[float]:
  return [v for v in values if not math.isnan(v)]


def _pct(values: list[float]) -> str:
  values = _finite(values)
  mean = 100 * statistics.fmean(values)
  if len(values) < 2:  # One seed has no spread to show.
    return f'{mean:.2f}'
  return f'{mean:.2f} ± {100 * statistics.stdev(values):.2f}'


def _plain(values: list[float]) -> str:
  values = _finite(values)
  if not values:
    return '-'
  return f'{statistics.fmean(values):.3f}'


def _interval(values: list[float], baseline: list[float]) -> tuple[str, str]:
  """`'+0.41 [+0.10, +0.72]'` (percentage points) and whether the interval excludes 0."""
  mean, low, high = (100 * x for x in paired_interval(values, baseline))
  if math.isnan(low):
    return f'{mean:+.2f}', 'one seed'
  verdict = 'better' if low > 0 else 'worse' if high < 0 else 'not resolved'
  return f'{mean:+.2f} [{low:+.2f}, {high:+.2f}]', verdict


def student_table(rows: dict[str, dict[str, Any]]) -> list[str]:
  """The markdown table of one student's final rows."""
  lines = [
    '| method | objective | last epoch (%) | best epoch (%) | last vs student alone, pp [95% CI] '
    '| verdict | last vs KD, pp [95% CI] | kept | CKA | extra params | epoch (s) |',
    '|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|',
  ]
  alone, kd = rows['student']['last'], rows.get('kd', {}).get('last')
  for name, s in rows.items():
    vs_alone, verdict = ('-', '') if name == 'student' else _interval(s['last'], alone)
    vs_kd = '-' if kd is None or name in ('kd', 'student') else _interval(s['last'], kd)[0]
    label = LABELS[name]
    if s['diverged']:
      label += f' ({s["diverged"]} of {len(s["last"])} seeds diverged)'
    lines.append(
      f'| {label} | {s["objective"]} | {_pct(s["last"])} | {_pct(s["best"])} '
      f'| {vs_alone} | {verdict} | {vs_kd} | {_plain(s["kept"])} | {_plain(s["cka"])} '
      f'| {s["extra_params"]:,} | {s["epoch_time"]:.1f} |'
    )
  return lines


def _score(accuracy: float) -> str:
  return 'diverged' if math.isinf(accuracy) else f'{100 * accuracy:.2f}'


def sweep_tables(student: str, sweeps: dict[str, dict[str, Any]]) -> list[str]:
  """Every sweep point of one student: value and validation accuracy, the chosen one bold."""
  lines = []
  for method, sweep in sweeps.items():
    for dimension in sweep['dimensions']:
      key = dimension['key'].split('.')[-1]
      cells = []
      for row in dimension['rows']:
        text = f'{row["value"]:g}: {_score(row["val_accuracy"])}'
        if len(row.get('seeds', ())) > 1:  # Each seed too: one collapsed seed shows.
          text += ' (' + ', '.join(_score(v) for v in row['seeds']) + ')'
        text += ' (added)' if row['added'] else ''
        cells.append(f'**{text}**' if row['chosen'] else text)
      lines.append(
        f'| {student} | {LABELS[method]} | {key} | {"; ".join(cells)} | {dimension["status"]} |'
      )
  return lines


# The gain-vs-size plot's rows from the first student on: KD, LP and studies.study.GRAPH_VARIANTS
# (study imports this module, not the reverse; a test keeps the two in step).
_ALWAYS_PLOTTED = ('kd', 'lp', 'lp_neighbours', 'lp_bank')


def _plot_gain_vs_size(summaries, path: str) -> None:
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  methods = sorted({m for rows in summaries.values() for m in rows if m != 'student'})
  # And a baseline where more than one student has it (the best relational one).
  shown = [
    m for m in methods if m in _ALWAYS_PLOTTED or sum(m in r for r in summaries.values()) > 1
  ]
  for i, method in enumerate(shown):
    points = []
    for rows in summaries.values():
      if method in rows:
        mean, low, high = paired_interval(rows[method]['last'], rows['student']['last'])
        points.append((rows['student']['params'], 100 * mean, 100 * (mean - low)))
    x, y, err = (np.array(v) for v in zip(*sorted(points), strict=True))
    x = x * 1.04 ** (i - (len(shown) - 1) / 2)  # Side by side, so no interval hides another.
    ax.errorbar(x, y, yerr=np.nan_to_num(err), marker='o', capsize=3, label=LABELS[method])
  ax.axhline(0, color='black', linewidth=0.8)
  ax.set_xscale('log')
  sizes = [rows['student']['params'] for rows in summaries.values()]
  ax.set_xlim(min(sizes) / 2, max(sizes) * 2)
  ax.set_xlabel('student parameters')
  ax.set_ylabel('gain over the student alone (pp, 95% CI)')
  ax.legend(fontsize=7)
  fig.tight_layout()
  _save(fig, path)


def _plot_paired(rows, path: str) -> None:
  import matplotlib.pyplot as plt

  methods = [m for m in rows if m != 'student']
  fig, ax = plt.subplots(figsize=(8, 4))
  for i, method in enumerate(methods):
    diffs = 100 * (np.array(rows[method]['last']) - np.array(rows['student']['last']))
    ax.scatter(np.full(len(diffs), i), diffs, color='tab:blue', s=14)
    mean, low, high = (
      100 * v for v in paired_interval(rows[method]['last'], rows['student']['last'])
    )
    ax.errorbar(
      i + 0.2, mean, yerr=[[mean - low], [high - mean]], color='tab:red', capsize=3, marker='_'
    )
  ax.axhline(0, color='black', linewidth=0.8)
  ax.set_xticks(range(len(methods)), [LABELS[m] for m in methods], rotation=30, ha='right')
  ax.set_ylabel('minus the student alone,\nsame seed (pp, last epoch)')
  fig.tight_layout()
  _save(fig, path)


def _plot_curves(curves: dict[str, list[list[float]]], path: str, ylabel: str) -> None:
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 4))
  for name, runs in curves.items():
    mean = 100 * np.mean(np.asarray(runs), axis=0)
    ax.plot(np.arange(1, len(mean) + 1), mean, marker='.', label=LABELS.get(name, name))
  ax.set_xlabel('epoch')
  ax.set_ylabel(ylabel)
  ax.legend(ncol=2, fontsize=7)
  fig.tight_layout()
  _save(fig, path)


def _save(fig, path: str) -> None:
  """Writes `fig` as a PNG file atomically (`lpe.files.write_atomic`) and closes it."""
  import matplotlib.pyplot as plt

  files.write_atomic(path, lambda f: fig.savefig(f, format='png', dpi=110))
  plt.close(fig)


def write_plots(config, summaries, recipes: dict[str, dict], folder: str, stem: str) -> dict:
  """The page's plots as PNG files beside it; returns their file names by role."""
  import matplotlib

  matplotlib.use('Agg')
  names = {r: f'{stem}_{r}.png' for r in ('gain_vs_size', 'paired', 'curves', 'recipes')}
  main = summaries.get(config.main_student)
  if main is None:  # No final rows yet: only the recipes' curves.
    names = {'recipes': names['recipes']}
  else:
    _plot_gain_vs_size(summaries, os.path.join(folder, names['gain_vs_size']))
    _plot_paired(main, os.path.join(folder, names['paired']))
    _plot_curves(
      {m: s['curves'] for m, s in main.items()},
      os.path.join(folder, names['curves']),
      'test accuracy (%), mean over seeds',
    )
  recipe_curves = {
    n: [[e['test_accuracy'] for e in r['history']]] for n, r in recipes.items() if r['history']
  }
  _plot_curves(recipe_curves, os.path.join(folder, names['recipes']), 'validation accuracy (%)')
  return names


def wall_time(records) -> str:
  """'10.3 hours of wall time on 2 CPU cores': the sum of the runs' wall times, and the machines
  their ledger records name (older records name none)."""
  records = list(records)
  hours = sum(r.get('wall_s', 0.0) for r in records) / 3600
  named = sorted({r['machine'] for r in records if r.get('machine')})
  text = f'{hours:.1f} hours of wall time' + (f' on {"; ".join(named)}' if named else '')
  if any(not r.get('machine') for r in records):
    text += f', {"some " if named else ""}on machines the ledger does not name'
  return text


def _setting(config, teacher, recipe, summaries, wall) -> list[str]:
  base, final, sweep = config.base, config.final, config.sweep
  changes = ', '.join(f'{k}={v}' for k, v in sorted(config.recipes[recipe].items()))
  students = ', '.join(
    f'`{name}` ({rows["student"]["params"]:,} parameters)' for name, rows in summaries.items()
  )
  gap = "the main student's final rows are not trained yet"
  if config.main_student in summaries:
    alone = statistics.fmean(_finite(summaries[config.main_student]['student']['last']))
    gap = f'{100 * (teacher["test_accuracy"] - alone):.2f} points above the main student alone'
  return [
    f'Produced by `{config.command}` ({config.description}). All its runs took '
    f'{wall} (the sum over runs, across sittings; '
    f'the runs are recorded in `{config.ledger}`, so the command resumes where it stopped).',
    '',
    f'Teacher: `{teacher["model"]}` ({teacher["params"]:,} parameters, '
    f'{100 * teacher["test_accuracy"]:.2f}% test accuracy, `{base.teacher.checkpoint}`), '
    f'{gap}. Students: {students or "none finished yet"}.',
    '',
    f'Recipe (chosen on validation, below): `{recipe}` ({changes}), {final.epochs} epochs, batch '
    f"{base.batch_size}, no augmentation (the teacher's outputs are cached), the same for every "
    f'method. Final rows: {final.seeds} seeds (0..{final.seeds - 1}), trained on the whole '
    'training split and scored on the whole test split after every epoch; mean ± standard '
    'deviation over seeds. Differences are paired by seed (the same initialisation and data '
    'order) with a 95% t-interval over the pairs; "better"/"worse" means the interval excludes 0. '
    f'Sweeps: one seed ({sweep.seed}), {sweep.epochs} epochs, trained on `{sweep.train_split}` '
    f'and scored on `{sweep.val_split}`. "kept": the mean fraction of each test image\'s k '
    f'nearest teacher neighbours among its k nearest student neighbours (k={base.distill.k}, test '
    f'batches of {base.eval_batch_size}); CKA: linear CKA of the embeddings.',
  ]


def write_study_page(config, *, teacher, recipe, recipes, sweeps, finals, wall, pending=()) -> str:
  """Writes the study's page and plots; returns the page's path.

  Args:
    config: The study config (`page`, `title`, `command`, `base`, `final`, `sweep`, ...).
    teacher: The teacher's `model.json` (model, params, test_accuracy).
    recipe: The chosen recipe's name; `recipes`: each recipe run's ledger record.
    sweeps: Per student and method, `Study.sweep`'s result.
    finals: Per student and row, its seeds' ledger records.
    wall: What every run of the study took (`wall_time` of the ledger's records).
    pending: Students whose runs are not finished yet; the page says so at its top.
  """
  page = config.page
  folder = os.path.dirname(os.path.abspath(page))
  os.makedirs(folder, exist_ok=True)
  stem = os.path.splitext(os.path.basename(page))[0]
  summaries = {s: {row: summarise(r) for row, r in rows.items()} for s, rows in finals.items()}
  plots = write_plots(config, summaries, recipes, folder, stem)
  lines = [f'# {config.title}', '']
  if pending:
    names = ', '.join(f'`{s}`' for s in pending)
    lines += [
      f'**In progress**: the runs of {names} are not finished yet; this page shows the finished '
      'sweeps, and each final row with the seeds that every row of its student has so far. Rerun '
      "the study's command below to continue.",
      '',
    ]
  lines += [*_setting(config, teacher, recipe, summaries, wall), '']
  for student, rows in summaries.items():
    role = 'main student, every method' if student == config.main_student else 'subset'
    seeds = len(rows['student']['last'])
    if seeds < config.final.seeds:
      role += f'; {seeds} of {config.final.seeds} seeds so far'
    lines += ['', f'## `{student}` ({role})', '', *student_table(rows)]
  if summaries:
    lines += _plots_section(plots)
  lines += _recipe_section(config, recipe, recipes, plots['recipes'])
  lines += _sweeps_section(sweeps)
  notes = config.notes_file
  if notes and os.path.exists(notes):
    with open(notes) as f:
      lines += ['', f.read().strip()]
  files.write_atomic(page, '\n'.join(lines) + '\n')
  return page


def _plots_section(plots: dict[str, str]) -> list[str]:
  return [
    '',
    '## Plots',
    '',
    f'![gain over the student alone against student size]({plots["gain_vs_size"]})',
    '',
    f'![per-seed paired differences, main student]({plots["paired"]})',
    '',
    f'![learning curves, main student]({plots["curves"]})',
  ]


def _recipe_section(config, recipe: str, recipes: dict[str, dict], plot: str) -> list[str]:
  lines = [
    '',
    '## Recipe',
    '',
    'The student alone with each candidate recipe, trained on the validation split for the final '
    'budget (the curve shows where it plateaus):',
    '',
    f'![recipe candidates]({plot})',
    '',
    '| recipe | settings | last-epoch validation accuracy (%) |',
    '|---|---|---:|',
  ]
  for name, record in recipes.items():
    settings = ', '.join(f'{k}={v}' for k, v in sorted(config.recipes[name].items()))
    mark = '**' if name == recipe else ''
    accuracy = 'diverged'
    if not record.get('diverged'):
      accuracy = f'{100 * record["history"][-1]["test_accuracy"]:.2f}'
    lines.append(f'| {mark}{name}{mark} | {settings} | {mark}{accuracy}{mark} |')
  return lines


def _sweeps_section(sweeps: dict[str, dict]) -> list[str]:
  lines = [
    '',
    '## Sweeps',
    '',
    'Validation accuracy (%) of every point; bold: chosen; "(added)": a point past the edge of '
    'the starting grid, added because the best value lay on that edge. "optimum": bracketed (a '
    'better-scoring neighbour on neither side), at a hard bound (k = 1), still on an edge after '
    "the last extension, or one value (not swept). Each student's first row is the student alone "
    'at the sweep budget, for reference.',
    '',
    '| student | method | setting | value: validation accuracy | optimum |',
    '|---|---|---|---|---|',
  ]
  for student, methods in sweeps.items():
    lines += sweep_tables(student, methods)
  return lines


def paired_p_value(values: list[float], baseline: list[float]) -> float:
  """The two-sided paired t-test's p-value of `values - baseline` (NaN pairs left out): NaN for
  fewer than 2 pairs; for pairs that all differ by the same amount, 0 (or 1 if it is 0)."""
  diffs = np.asarray(values, np.float64) - np.asarray(baseline, np.float64)
  diffs = diffs[~np.isnan(diffs)]
  if len(diffs) < 2:
    return math.nan
  if np.all(diffs == diffs[0]):
    return 0.0 if diffs[0] else 1.0
  return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def holm_adjusted(p_values: dict[str, float]) -> dict[str, float]:
  """Holm's step-down adjusted p-values of one family of comparisons: with the `m` p-values
  sorted ascending, `adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))` (i, j from 1). A
  comparison is resolved at family-wise level alpha when its adjusted value is below alpha. NaN
  p-values take no part (their adjusted value is NaN).

  Example:
    >>> {k: round(v, 3) for k, v in holm_adjusted({'a': 0.01, 'b': 0.04, 'c': 0.03}).items()}
    {'a': 0.03, 'b': 0.06, 'c': 0.06}
  """
  tested = sorted((p, name) for name, p in p_values.items() if not math.isnan(p))
  m, running, adjusted = len(tested), 0.0, {}
  for i, (p, name) in enumerate(tested):
    running = max(running, min(1.0, (m - i) * p))
    adjusted[name] = running
  return {name: adjusted.get(name, math.nan) for name in p_values}


def followup_table(
  rows: dict[str, dict[str, Any]], reused: tuple[str, ...] = (), alpha: float = 0.05
) -> list[str]:
  """One setting's final rows with paired intervals against the student alone and Holm's
  correction over the setting's comparisons; `reused` rows are marked as the previous study's."""
  alone = rows['student']['last']
  p_values = {n: paired_p_value(s['last'], alone) for n, s in rows.items() if n != 'student'}
  adjusted = holm_adjusted(p_values)
  lines = [
    '| method | objective | last epoch (%) | best epoch (%) | last vs student alone, pp [95% CI] '
    f'| p | Holm-adjusted p | verdict (Holm, {alpha:g}) | kept | CKA | epoch (s) |',
    '|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|',
  ]
  for name, s in rows.items():
    cells = ['-', '-', '-', '']
    if name != 'student':
      interval, _ = _interval(s['last'], alone)
      mean = statistics.fmean(_finite(s['last'])) - statistics.fmean(_finite(alone))
      adj = adjusted[name]
      cells = [interval, _p(p_values[name]), _p(adj), _verdict(adj, mean, alpha)]
    label = LABELS[name] + (' (reused)' if name in reused else '')
    if s['diverged']:
      label += f' ({s["diverged"]} of {len(s["last"])} seeds diverged)'
    lines.append(
      f'| {label} | {s["objective"]} | {_pct(s["last"])} | {_pct(s["best"])} | '
      + ' | '.join(cells)
      + f' | {_plain(s["kept"])} | {_plain(s["cka"])} | {s["epoch_time"]:.1f} |'
    )
  return lines


def _verdict(adjusted_p: float, mean: float, alpha: float) -> str:
  """'better' or 'worse' when the Holm-adjusted p is under `alpha`, else 'not resolved' ('one
  seed' when there is no p)."""
  if math.isnan(adjusted_p):
    return 'one seed'
  if adjusted_p < alpha:
    return 'better' if mean > 0 else 'worse'
  return 'not resolved'


# The relational baselines (computed on the batch as a whole, LP aside), against the best of which
# the LP rows are compared; `studies.study` chooses among the same ones.
RELATIONAL_BASELINES = tuple(
  n for n, m in lpe_methods.METHODS.items() if m.relational and n != 'lp'
)


def _is_lp(name: str) -> bool:
  return name == 'lp' or name.startswith('lp_')


def against_best_baseline(rows: dict[str, dict[str, Any]], alpha: float = 0.05) -> list[str]:
  """Each LP row of a setting against its best relational baseline (SP, RKD or PKT, whichever
  has the highest mean last-epoch accuracy over its seeds), paired by seed, with Holm's correction
  over these comparisons. Empty without a baseline or an LP row."""
  baselines = [n for n in RELATIONAL_BASELINES if n in rows]
  lp_rows = [n for n in rows if _is_lp(n)]
  if not baselines or not lp_rows:
    return []
  best = max(baselines, key=lambda n: statistics.fmean(_finite(rows[n]['last'])))
  reference = rows[best]['last']
  p_values = {n: paired_p_value(rows[n]['last'], reference) for n in lp_rows}
  adjusted = holm_adjusted(p_values)
  lines = [
    f'Each LP row against the best relational baseline, {LABELS[best]} '
    f'({_pct(reference)}; the best by its own mean over the final seeds, a choice on the test '
    "split that favours the baseline), paired by seed, Holm's correction over these "
    f'{len(lp_rows)} comparisons:',
    '',
    f'| method | last vs {LABELS[best]}, pp [95% CI] | p | Holm-adjusted p | '
    f'verdict (Holm, {alpha:g}) |',
    '|---|---:|---:|---:|---|',
  ]
  for name in lp_rows:
    interval, _ = _interval(rows[name]['last'], reference)
    mean = statistics.fmean(_finite(rows[name]['last'])) - statistics.fmean(_finite(reference))
    adj = adjusted[name]
    verdict = _verdict(adj, mean, alpha)
    lines.append(f'| {LABELS[name]} | {interval} | {_p(p_values[name])} | {_p(adj)} | {verdict} |')
  return lines


def _p(p: float) -> str:
  return '-' if math.isnan(p) else f'{p:.3f}'


def write_followup_page(config, *, teacher, recipe, sweeps, finals, wall, pending=()) -> str:
  """Writes a follow-up study's page (`lpe.study.run_followup`) and its plots; returns its path.

  Args:
    config: The follow-up study's config (`page`, `title`, `settings`, `previous`, ...).
    teacher: The teacher's `model.json`.
    recipe: The previous study's recipe name (kept by every run).
    sweeps: Per setting and method, `Study.sweep`'s result.
    finals: Per setting and row, its seeds' ledger records.
    wall: What this study's own runs took (`wall_time`; the reused ones are the previous
      study's).
    pending: Settings whose runs are not finished yet.
  """
  import matplotlib

  matplotlib.use('Agg')
  page = config.page
  folder = os.path.dirname(os.path.abspath(page))
  os.makedirs(folder, exist_ok=True)
  stem = os.path.splitext(os.path.basename(page))[0]
  summaries = {s: {row: summarise(r) for row, r in rows.items()} for s, rows in finals.items()}
  lines = [f'# {config.title}', '']
  if pending:
    names = ', '.join(f'`{s}`' for s in pending)
    lines += [
      f'**In progress**: the runs of {names} are not finished yet; this page shows the finished '
      'sweeps and settings. Rerun the command below to continue.',
      '',
    ]
  final, sweep = config.final, config.sweep
  seeds = tuple(sweep.get('seeds', ())) or (sweep.seed,)
  lines += [
    f'Produced by `{config.command}`. Its own runs took {wall} '
    f'(the sum over runs, across sittings; recorded in `{config.ledger}`, so the command '
    'resumes where it stopped). Rows marked as reused are the final runs of the previous study '
    f'(`{config.previous.page}`), read from its ledger and not trained again.',
    '',
    f'Teacher: `{teacher["model"]}` ({100 * teacher["test_accuracy"]:.2f}% test accuracy). '
    f"Recipe: the previous study's `{recipe}` for every run. Final rows: {final.seeds} seeds, "
    'last-epoch test accuracy, mean ± standard deviation; differences are paired by seed with a '
    "95% t-interval, a two-sided paired t-test's p, and Holm's step-down correction over each "
    "setting's comparisons with the student alone (the verdict uses the corrected p). New "
    f'sweeps: {len(seeds)} seeds ({", ".join(map(str, seeds))}), the choice by their mean, '
    f'trained on `{sweep.train_split}` and scored on `{sweep.val_split}`.',
  ]
  for name, rows in summaries.items():
    setting = config.settings[name]
    table = followup_table(rows, tuple(setting.get('reused', ())))
    lines += ['', f'## `{name}`: {setting.description}', '', *table]
    comparison = against_best_baseline(rows)
    lines += ['', *comparison] if comparison else []
    paired, curves = f'{stem}_{name}_paired.png', f'{stem}_{name}_curves.png'
    _plot_paired(rows, os.path.join(folder, paired))
    _plot_curves(
      {m: s['curves'] for m, s in rows.items()},
      os.path.join(folder, curves),
      'test accuracy (%), mean over seeds',
    )
    lines += [
      '',
      f'![per-seed paired differences, {name}]({paired})',
      '',
      f'![learning curves, {name}]({curves})',
    ]
  lines += _sweeps_section(sweeps)
  notes = config.get('notes_file', '')
  if notes and os.path.exists(notes):
    with open(notes) as f:
      lines += ['', f.read().strip()]
  files.write_atomic(page, '\n'.join(lines) + '\n')
  return page
