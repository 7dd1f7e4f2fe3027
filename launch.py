"""Trains or evaluates an lpe experiment: the only file that defines flags.

.venv/bin/python launch.py --config=configs/fashion_mnist_lp.py --workdir=runs/lp
.venv/bin/python launch.py --mode=evaluate --workdir=runs/lp
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from lpe import experiment

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'evaluate'], 'Train, or evaluate a model.')
_CHECKPOINT = flags.DEFINE_string(
  'checkpoint', None, 'evaluate: a model.msgpack or run workdir (default: --workdir).'
)
_STEP = flags.DEFINE_integer('step', None, 'evaluate: the checkpoint step (default: latest).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Progress goes to stdout; orbax's INFO is noise.
  if _MODE.value == 'evaluate':
    result = experiment.evaluate_and_save(_CHECKPOINT.value or _WORKDIR.value, step=_STEP.value)
    print(json.dumps(result, indent=2))
    return
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError('Training needs --config=configs/<experiment>.py and --workdir=<dir>.')
  experiment.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
