"""Fault injection the reliability and input tests share."""

import os
import signal

from lpe import feed


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
