"""What happens around the train steps, each with its own trigger and state (as clu's
`periodic_actions`): checking the steps' metrics, the progress line, checkpoints, and SIGTERM.

The loop only calls `Hooks`: `start_epoch`, `after_step` after every step, and `end_epoch`;
`train_and_evaluate(..., hooks=[...])` adds the caller's own `StepHook`s to the built-in ones.
Every state that is saved or logged has had its steps checked for a non-finite loss or update
first.
"""

import dataclasses
import signal
import time
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import ml_collections
import orbax.checkpoint as ocp

from lpe import checkpoint, methods, metrics_io, parallel, report

_CHECKED = ('loss', 'ce', *methods.SHOWN, 'grad_norm', 'param_norm')


class NonFiniteLossError(FloatingPointError):
  """A train step gave a non-finite loss, gradient or update, and skipping was not asked for."""


class Preempted(SystemExit):
  """Raised once the state is saved after a SIGTERM: the process exits with status 143."""

  def __init__(self):
    super().__init__(128 + signal.SIGTERM)


@dataclasses.dataclass(frozen=True)
class StepEnd:
  """Where the run stands after a step: global `step`, `epoch` (0-based) and `offset` (steps
  done in this epoch), and whether a SIGTERM had arrived by the end of this step."""

  step: int
  epoch: int
  offset: int
  epoch_end: bool
  stopping: bool


class StepMetrics:
  """The steps' metrics, checked for non-finite values before anything saves or logs them.

  `add` keeps each step's device metrics without waiting for them; `check` brings the pending
  ones to the host and stops the run at the first non-finite step (or counts and drops it when
  skipping is configured).
  """

  def __init__(
    self,
    *,
    name: str,
    manager: ocp.CheckpointManager,
    place: Any,
    config: ml_collections.ConfigDict,
    steps_per_epoch: int,
  ):
    self._name, self._manager, self._place = name, manager, place
    self._skip, self._learning_rate = config.skip_nonfinite_batches, config.learning_rate
    # More skipped batches than this in one epoch stop the run.
    self._max_skipped = config.max_skipped_fraction * steps_per_epoch
    self._steps_per_epoch = steps_per_epoch
    self._pending: list[Any] = []
    self.window: list[dict[str, float]] = []  # Checked steps since the last progress line.
    self.epoch: list[dict[str, float]] = []  # Checked steps of this epoch.
    self.window_skipped = self.epoch_skipped = 0

  def add(self, metrics: Any) -> None:
    self._pending.append(self._place.metrics(metrics))

  def start_epoch(self) -> None:
    self.window, self.epoch, self.window_skipped, self.epoch_skipped = [], [], 0, 0

  def check(self, last_step: int) -> None:
    """Checks the pending steps, the last of which is `last_step`.

    Raises:
      NonFiniteLossError: at the first non-finite step, unless skipping; nothing is saved after.
    """
    pending, self._pending = jax.device_get(self._pending), []
    for i, metrics in enumerate(pending):
      metrics = {k: float(v) for k, v in metrics.items()}
      if metrics.pop('finite'):
        self.window.append(metrics)
        self.epoch.append(metrics)
        continue
      if not self._skip:
        self._raise(metrics, last_step - len(pending) + i + 1)
      self.window_skipped += 1
      self.epoch_skipped += 1
    if self.epoch_skipped > self._max_skipped:
      self._too_many_skipped(last_step)

  def take_window(self) -> tuple[dict[str, float], int]:
    """The mean metrics and skipped count since the last call, and a new window."""
    means, skipped = metrics_io.mean_metrics(self.window), self.window_skipped
    self.window, self.window_skipped = [], 0
    return means, skipped

  def _raise(self, metrics: dict[str, float], step: int):
    terms = ', '.join(f'{k} {metrics[k]:.4g}' for k in _CHECKED if k in metrics)
    raise NonFiniteLossError(
      f'[{self._name}] step {step} gave a non-finite loss or update ({terms}), so the run '
      f'stopped without saving it (last good checkpoint: {self._kept()}); {self._way_forward()}, '
      'check the inputs, or set config.skip_nonfinite_batches=True to skip such batches.'
    )

  def _too_many_skipped(self, step: int):
    epoch = (step - 1) // self._steps_per_epoch + 1
    raise NonFiniteLossError(
      f'[{self._name}] {self.epoch_skipped} of the {self._steps_per_epoch} batches of epoch '
      f'{epoch} were non-finite and skipped by step {step}, more than '
      'config.max_skipped_fraction allows, so the run stopped without saving (last good '
      f'checkpoint: {self._kept()}); {self._way_forward()}, or check the inputs.'
    )

  def _kept(self) -> str:
    saved = self._manager.latest_step()
    return f'step {saved}' if saved is not None else 'none was saved yet'

  def _way_forward(self) -> str:
    """The command that continues the run: the last good checkpoint, a lower learning rate."""
    saved = self._manager.latest_step()
    where = f'resume from step {saved}' if saved is not None else 'start again'
    return (
      f'to {where} with a lower learning rate, run the same command with '
      f'--allow_optimizer_change --config.learning_rate={self._learning_rate / 10:.3g} '
      "(resume='optimizer' in Python)"
    )


class ReportProgress:
  """Every `every_steps` steps and at the end of each epoch: the progress line."""

  def __init__(
    self,
    reporter: report.Reporter,
    metrics: StepMetrics,
    *,
    every_steps: int,
    batch_size: int,
    steps_per_epoch: int,
    num_epochs: int,
  ):
    self._reporter, self._metrics, self._every = reporter, metrics, every_steps
    self._batch, self._steps_per_epoch, self._num_epochs = batch_size, steps_per_epoch, num_epochs
    self._since: tuple[int, float] | None = None

  def start_epoch(self, step: int) -> None:
    """Speeds are measured from here (so evaluation and start-up time are left out)."""
    self._since = (step, time.time())

  def __call__(self, at: StepEnd, state: Any) -> None:
    del state
    if at.step % self._every and not at.epoch_end:
      return
    self._metrics.check(at.step)
    first_step, t0 = self._since
    rate = (at.step - first_step) * self._batch / (time.time() - t0)
    eta = (self._num_epochs * self._steps_per_epoch - at.step) * self._batch / rate
    means, skipped = self._metrics.take_window()
    self._reporter.progress(
      epoch=at.epoch,
      num_epochs=self._num_epochs,
      offset=at.offset,
      steps_per_epoch=self._steps_per_epoch,
      means=means,
      rate=rate,
      eta=eta,
      skipped=skipped,
    )


class SaveCheckpoints:
  """Every `every_steps` steps, and after a step that saw a SIGTERM: an orbax checkpoint."""

  def __init__(
    self,
    manager: ocp.CheckpointManager,
    metrics: StepMetrics,
    place: parallel.Placement,
    *,
    every_steps: int,
  ):
    self._manager, self._metrics, self._place, self._every = manager, metrics, place, every_steps

  def __call__(self, at: StepEnd, state: Any) -> None:
    if at.step % self._every and not at.stopping:
      return
    self.save(at.step, state)

  def save(self, step: int, state: Any) -> None:
    """Checks the pending steps, then saves `state` (in the step's form) at `step`."""
    self._metrics.check(step)
    checkpoint.save_state(self._manager, step, self._place.canonical(state))


class Preemption:
  """Turns SIGTERM into a flag the loop reads once per step, so a preempted run saves first."""

  def __init__(self, manager: ocp.CheckpointManager, reporter: report.Reporter):
    self._manager, self._reporter = manager, reporter
    self._requested = False
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: leave signals alone.
      self._previous = None

  @property
  def requested(self) -> bool:
    return self._requested

  def _handle(self, signum, frame):
    del signum, frame
    self._requested = True

  def stop(self, step: int) -> None:
    """After the step's checkpoint: waits for it, says so, and exits with status 143."""
    self._manager.wait_until_finished()
    self._reporter.preempted(step)
    raise Preempted()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class StepHook(Protocol):
  """An action of your own after every step (`train_and_evaluate(..., hooks=[...])`): it gets
  the step's `StepEnd` and the train state as the step holds it (per-device copies under pmap)
  and decides itself when to act, e.g. `if end.step % 100 == 0` or `if end.epoch_end`."""

  def __call__(self, end: StepEnd, state: Any) -> None: ...


class Hooks:
  """The actions around the steps of one run, in the order the loop needs them: the built-in
  ones, then `extra` (the caller's `StepHook`s)."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    *,
    manager: ocp.CheckpointManager,
    reporter: report.Reporter,
    place: parallel.Placement,
    steps_per_epoch: int,
    extra: Sequence[StepHook] = (),
  ):
    self.extra = tuple(extra)
    self.metrics = StepMetrics(
      name=reporter.name,
      manager=manager,
      place=place,
      config=config,
      steps_per_epoch=steps_per_epoch,
    )
    self.progress = ReportProgress(
      reporter,
      self.metrics,
      every_steps=config.log_every_steps,
      batch_size=config.batch_size,
      steps_per_epoch=steps_per_epoch,
      num_epochs=config.num_epochs,
    )
    self.checkpoints = SaveCheckpoints(
      manager, self.metrics, place, every_steps=config.checkpoint_every_steps
    )
    self.preemption = Preemption(manager, reporter)

  def start_epoch(self, step: int) -> None:
    self.metrics.start_epoch()
    self.progress.start_epoch(step)

  def stopping(self) -> bool:
    """Whether a SIGTERM has arrived; read once per step."""
    return self.preemption.requested

  def after_step(self, end: StepEnd, state: Any, metrics: Any) -> None:
    """Keeps the step's metrics, then logs, saves, and stops after a SIGTERM, as due."""
    self.metrics.add(metrics)
    self.progress(end, state)
    self.checkpoints(end, state)
    for hook in self.extra:
      hook(end, state)
    if end.stopping:
      self.preemption.stop(end.step)

  def end_epoch(self, step: int, state: Any) -> tuple[dict[str, float], int, int]:
    """Saves the epoch's last state; returns the epoch's mean metrics, the number of steps they
    average (this process's, since the start or resume, skipped ones left out) and the number
    of skipped steps."""
    self.checkpoints.save(step, state)
    metrics = self.metrics
    return metrics_io.mean_metrics(metrics.epoch), len(metrics.epoch), metrics.epoch_skipped

  def close(self) -> None:
    self.preemption.close()
