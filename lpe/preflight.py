"""The checks before any work: every value of a run's config, each by the module it concerns.

`lpe.config` is data: it checks what the config alone shows (keys, types, ranges, choices). What
needs more is checked where it is implemented, and `validate` calls each in turn: the dataset
(`lpe.data`, from its metadata), the model's name (`lpe.models`), the devices (`lpe.parallel`),
the objective (`lpe.objectives`), the streaming and per-process inputs (`lpe.stream`, `lpe.feed`)
and the teacher's cache (`lpe.teacher`). Nothing is written.
"""

import ml_collections

from lpe import config as config_lib
from lpe import data, feed, models, objectives, parallel, stream, teacher


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Stops before any work on config values that cannot run on `num_devices` devices: raises a
  ValueError (or `lpe.data.DatasetUnavailableError`) whose message names the fix."""
  config_lib.check(config)
  data.check_config(config)
  if config.model not in models.names():
    models.build(config.model, 1)  # Raises the error that lists the valid names.
  parallel.check_config(config, num_devices)
  objectives.check_config(config, num_devices)
  stream.check_config(config)
  feed.check_config(config)
  teacher.check_config(config)
