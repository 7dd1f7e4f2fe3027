"""Fault injection the reliability and input tests share."""

import os
import signal

from lpe import data


def sigterm_before_step(monkeypatch, step: int, steps_per_epoch: int) -> None:
  """Sends this process a real SIGTERM just before the batch of `step` (1-based) is trained.

  Wraps `data.train_index_batches`, which both input paths of the trainer read.
  """
  original = data.train_index_batches

  def batches(num_examples, *, batch_size, seed, epoch, start_step=0):
    for offset, index in enumerate(
      original(num_examples, batch_size=batch_size, seed=seed, epoch=epoch, start_step=start_step),
      start_step,
    ):
      if epoch * steps_per_epoch + offset + 1 == step:
        os.kill(os.getpid(), signal.SIGTERM)
      yield index

  monkeypatch.setattr(data, 'train_index_batches', batches)
