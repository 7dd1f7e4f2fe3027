"""Everything a run shows a person: its console lines and the tables of finished runs.

One `Reporter` per run prints the progress line, the resume, save and recovery messages and the
epoch's test accuracy, on process 0 only (other processes stay quiet), so the wording of every
line lives here. `results_table` formats finished runs for comparisons (a method study's page is
written by the `studies` tool beside the library).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax

from lpe import methods

# The loss terms a progress line shows, in this order, when the step reports them.
PROGRESS_TERMS = ('loss', 'ce', *methods.SHOWN, 'accuracy')


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
