"""Everything a run shows a person: its console lines and the tables of finished runs.

One `Reporter` per run prints the progress line, the resume, save and recovery messages and the
epoch's test accuracy, on process 0 only (other processes stay quiet), so the wording of every
line lives here. `results_table` formats finished runs for comparisons, and `write_study_page`
a method study's results page with its plots.
"""

import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from lpe import objectives

# A study's row labels.
LABELS = {'student': 'student alone', **objectives.LABELS, 'lp_kd': 'LP+KD'}
# The loss terms a progress line shows, in this order, when the step reports them.
PROGRESS_TERMS = ('loss', 'ce', 'lp', 'kd', 'accuracy')


def format_duration(seconds: float) -> str:
  """`'1m05s'` or `'42s'`."""
  minutes, seconds = divmod(int(seconds), 60)
  return f'{minutes}m{seconds:02d}s' if minutes else f'{seconds}s'


class Reporter:
  """Prints a run's lines, prefixed with its name, on process 0 only."""

  def __init__(self, name: str, *, active: bool | None = None):
    self.name = name
    self.active = jax.process_index() == 0 if active is None else active

  def say(self, line: str) -> None:
    """Prints `line` as it is (flushed, so logs follow a running job)."""
    if self.active:
      print(line, flush=True)

  def resumed(self, workdir: str, step: int) -> None:
    self.say(f'Resuming {workdir} from step {step}.')

  def config_changed(self, workdir: str, changes: Sequence[str]) -> None:
    self.say(f'{workdir}: continuing with a changed config: {"; ".join(changes)}.')

  def progress(
    self,
    *,
    epoch: int,
    num_epochs: int,
    offset: int,
    steps_per_epoch: int,
    means: Mapping[str, float],
    rate: float,
    eta: float,
    skipped: int,
  ) -> None:
    """The progress line: position, mean loss terms since the last line, speed and time left."""
    terms = ' '.join(f'{k} {means[k]:.4f}' for k in PROGRESS_TERMS if k in means)
    skips = f' | skipped {skipped} non-finite batches' if skipped else ''
    self.say(
      f'[{self.name}] epoch {epoch + 1}/{num_epochs} step {offset}/{steps_per_epoch} '
      f'{terms}{skips} | {rate:.0f} img/s | eta {format_duration(eta)}'
    )

  def epoch_done(self, epoch: int, num_epochs: int, accuracy: float) -> None:
    self.say(f'[{self.name}] epoch {epoch}/{num_epochs} test accuracy {100 * accuracy:.2f}%')

  def record_recovered(self, epoch: int) -> None:
    self.say(f'[{self.name}] epoch {epoch} record recovered from its checkpoint.')

  def preempted(self, step: int) -> None:
    self.say(f'[{self.name}] SIGTERM: saved step {step}; run the same command to resume.')

  def warning(self, message: str) -> None:
    self.say(f'Warning: {message}')


def results_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """A markdown table of finished runs (their `result.json`, or a loaded teacher's row)."""
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


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
  mean = scale * statistics.fmean(values)
  std = scale * statistics.stdev(values) if len(values) > 1 else 0.0
  return f'{mean:.{digits}f} ± {std:.{digits}f}'


def _plots(summary, teacher_accuracy: float, folder: str, stem: str) -> tuple[str, str]:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  rows = list(summary)
  bars = f'{stem}_accuracy.png'
  fig, ax = plt.subplots(figsize=(8, 4))
  means = [100 * np.mean(summary[r]['last']) for r in rows]
  stds = [
    100 * np.std(summary[r]['last'], ddof=1) if len(summary[r]['last']) > 1 else 0.0 for r in rows
  ]
  ax.bar([LABELS[r] for r in rows], means, yerr=stds, capsize=4, color='tab:blue')
  ax.axhline(100 * teacher_accuracy, color='tab:red', linestyle='--', label='teacher')
  low = min(m - s for m, s in zip(means, stds, strict=True))
  ax.set_ylim(max(0.0, low - 2.0), max(100 * teacher_accuracy, max(means)) + 1.0)
  ax.set_ylabel('test accuracy, last epoch (%)')
  ax.set_title('mean ± std over seeds')
  ax.legend()
  plt.setp(ax.get_xticklabels(), rotation=30, ha='right')
  fig.tight_layout()
  fig.savefig(os.path.join(folder, bars), dpi=110)
  plt.close(fig)

  curves = f'{stem}_curves.png'
  fig, ax = plt.subplots(figsize=(8, 4))
  for r in rows:
    curve = 100 * np.mean(np.asarray(summary[r]['curves']), axis=0)
    ax.plot(np.arange(1, len(curve) + 1), curve, marker='o', label=LABELS[r])
  ax.set_xlabel('epoch')
  ax.set_ylabel('test accuracy (%), mean over seeds')
  ax.legend(ncol=2, fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(folder, curves), dpi=110)
  plt.close(fig)
  return bars, curves


def write_study_page(config, best, summary, sweep_rows, teacher) -> str:
  """Writes a method study's results page and its plots (lpe.study); returns the page's path.

  Args:
    config: The study's config (`page`, `title`, `command`, `base`, `sweep`, `final`, ...).
    best: Per method, the chosen sweep point (`run`).
    summary: Per final row, its seeds' results (`lpe.study.summarise`).
    sweep_rows: Every sweep run with its validation accuracy.
    teacher: The teacher's `accuracy`, `model` and `params`.
  """
  page = config.page
  folder = os.path.dirname(os.path.abspath(page))
  os.makedirs(folder, exist_ok=True)
  stem = os.path.splitext(os.path.basename(page))[0]
  bars, curves = _plots(summary, teacher['accuracy'], folder, stem)
  base = config.base
  lines = [
    f'# {config.title}',
    '',
    f'Produced by `{config.command}` ({config.description}).',
    '',
    f'Teacher: `{teacher["model"]}` ({teacher["params"]:,} parameters), loaded from '
    f'`{base.teacher.checkpoint}`. Student: `{base.model}` ({summary["student"]["params"]:,} '
    f'parameters). Each student row is {config.final.epochs} epochs, {base.optimizer} at learning '
    f'rate {base.learning_rate:g} ({base.lr_schedule}), batch {base.batch_size}, over '
    f'{config.final.seeds} seeds (0..{config.final.seeds - 1}); accuracies are on the whole test '
    'split, mean ± standard deviation over seeds. "kept" is the neighbourhood preservation: the '
    f"mean fraction of each test image's {base.distill.k} nearest teacher neighbours that are "
    f'among its {base.distill.k} nearest student neighbours, within test batches of '
    f'{base.eval_batch_size}. Epoch time is the training time of one epoch on this machine.',
    '',
    '| method | objective | last epoch (%) | best epoch (%) | extra trainable params | kept '
    '| linear CKA | epoch time (s) |',
    '|---|---|---:|---:|---:|---:|---:|---:|',
    f'| teacher | CE | {100 * teacher["accuracy"]:.2f} | - | - | 1 | 1 | - |',
  ]
  for row, s in summary.items():
    lines.append(
      f'| {LABELS[row]} | {s["objective"]} | {_mean_std(s["last"])} | {_mean_std(s["best"])} '
      f'| {s["extra_params"]:,} | {_mean_std(s["kept"], 1.0, 3)} | {_mean_std(s["cka"], 1.0, 3)} '
      f'| {statistics.fmean(s["epoch_time"]):.0f} |'
    )
  lines += [
    '',
    f'![test accuracy per method]({bars})',
    '',
    f'![test accuracy per epoch]({curves})',
    '',
    '## The sweep',
    '',
    f'Each weight (and k for LP) trained once (seed {config.sweep.seed}, {config.sweep.epochs} '
    f'epoch(s)) on `{config.sweep.train_split}` and scored on `{config.sweep.val_split}` '
    '(validation accuracy, %); the best per method (bold) is used above.',
    '',
    '| run | validation accuracy (%) |',
    '|---|---:|',
  ]
  chosen = {b['run'] for b in best.values()}
  for r in sweep_rows:
    mark = '**' if r['run'] in chosen else ''
    lines.append(f'| {mark}{r["run"]}{mark} | {mark}{100 * r["val_accuracy"]:.2f}{mark} |')
  notes = config.notes_file
  if notes and os.path.exists(notes):
    with open(notes) as f:
      lines += ['', f.read().strip()]
  else:
    lines += ['', f'(No notes: {notes or "config.notes_file"} does not exist.)']
  with open(page, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return page
