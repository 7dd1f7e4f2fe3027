"""Fault injection the reliability and input tests share."""

import os
import signal
import subprocess
import sys

from lpe import feed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Holds a workdir's lock until killed.
_HOLDER = """
import sys, time
from lpe import workdir
with workdir.lock(sys.argv[1]):
  print('HELD', flush=True)
  time.sleep(600)
"""


def sigterm_before_step(monkeypatch, step: int, steps_per_epoch: int, feed_class=feed.Feed) -> None:
  """Sends this process a real SIGTERM just before the batch of `step` (1-based) is trained.

  Wraps `feed_class.epoch` (`feed.Feed`, or `lpe.stream.StreamFeed` for streamed input), where the
  trainer gets its steps' inputs.
  """
  original = feed_class.epoch

  def epoch_inputs(self, epoch, start_step=0):
    for offset, inputs in enumerate(original(self, epoch, start_step), start_step):
      if epoch * steps_per_epoch + offset + 1 == step:
        os.kill(os.getpid(), signal.SIGTERM)
      yield inputs

  monkeypatch.setattr(feed_class, 'epoch', epoch_inputs)


def hold_lock(workdir: str) -> subprocess.Popen:
  """Starts another process that takes `workdir`'s lock (as a run does); returns once it holds
  it. Stop it with `send_signal(signal.SIGKILL)` and `wait()`."""
  proc = subprocess.Popen(
    [sys.executable, '-c', _HOLDER, workdir],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu'),
    stdout=subprocess.PIPE,
    text=True,
  )
  assert proc.stdout.readline().strip() == 'HELD'
  return proc
