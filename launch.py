"""Trains or evaluates an lpe experiment: the only file that defines flags.

.venv/bin/python launch.py --config=configs/fashion_mnist_lp.py --workdir=runs/lp
.venv/bin/python launch.py --mode=evaluate --workdir=runs/lp
.venv/bin/python launch.py --mode=convert_torch --checkpoint=ckpt_epoch_240.pth \
  --model=resnet32x4 --dataset=cifar100 --num_classes=100 --output=teachers/resnet32x4.msgpack

A converted teacher is then evaluated on the dataset's test split, when that is here, and its
accuracy printed beside the one the .pth records (a warning when they differ by over 0.5 points).

Killed, the same command resumes the run; a SIGTERM saves first and exits with status 143. A
mistake in the config, a missing dataset or teacher, a non-finite loss, a workdir in use by
another run, or a full or read-only disk stops with one line (exit status 1); `--verbosity=0`
also logs the traceback.
"""

from lpe import xla_cpu

xla_cpu.configure()  # XLA:CPU flags for this processor; XLA reads them once, when JAX starts.

import ast  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import logging as std_logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lpe import checkpoint, data, experiment, files, train, workdir  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
_MODE = flags.DEFINE_enum(
  'mode',
  'train',
  ['train', 'evaluate', 'convert_torch'],
  'Train, evaluate a model, or convert a PyTorch teacher (.pth) into an lpe teacher file.',
)
_CHECKPOINT = flags.DEFINE_string(
  'checkpoint',
  None,
  'evaluate: a model.msgpack or run workdir (default: --workdir); convert_torch: the .pth file.',
)
_MODEL = flags.DEFINE_string('model', None, 'convert_torch: the lpe model name, e.g. resnet32x4.')
_DATASET = flags.DEFINE_string('dataset', None, 'convert_torch: the dataset it was trained on.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', None, 'convert_torch: its classifier outputs.')
_OUTPUT = flags.DEFINE_string('output', None, 'convert_torch: the .msgpack file to write.')
_DATA_MEAN = flags.DEFINE_list(
  'data_mean',
  [],
  "convert_torch: the teacher's per-channel normalisation mean, if not the dataset's.",
)
_DATA_STD = flags.DEFINE_list(
  'data_std',
  [],
  "convert_torch: the teacher's per-channel normalisation std, if not the dataset's.",
)
_STEP = flags.DEFINE_integer('step', None, 'evaluate: the checkpoint step (default: latest).')
_SPLIT = flags.DEFINE_string(
  'split', None, "evaluate: the split or slice (default: the run's test_split, else test)."
)
_EVAL_BATCH_SIZE = flags.DEFINE_integer(
  'eval_batch_size', None, "evaluate: examples per batch (default: the run's eval_batch_size)."
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
  'allow_config_change',
  False,
  'train: continue a workdir whose run was started with a different config.',
)
_ALLOW_OPTIMIZER_CHANGE = flags.DEFINE_bool(
  'allow_optimizer_change',
  False,
  'train: resume a workdir with other optimizer settings (learning_rate, momentum, weight_decay, '
  'lr_schedule, lr_decay_epochs, lr_decay_factor) and no other change: after a non-finite stop, '
  'resume from the last good checkpoint with a lower --config.learning_rate.',
)

# Errors that explain themselves in one sentence: shown without a traceback.
_USER_ERRORS = (
  ValueError,
  FileNotFoundError,
  data.DatasetUnavailableError,
  checkpoint.CorruptCheckpointError,
  train.NonFiniteLossError,
  files.StorageError,
  workdir.WorkdirInUseError,
  ImportError,  # torch_convert without torch: the message says how to install it.
)


def _first_call_only():
  """A function that returns True on its first call and False on every later one, from any
  thread (a lock taken once and never released)."""
  return functools.partial(threading.Lock().acquire, False)


class _LibraryErrorsInOneLine(std_logging.Filter):
  """Orbax logs each failure of its background threads with a traceback (hundreds of lines for
  one full disk, before the run's own one-line error); keeps only their first lines. After a
  failed save asyncio also logs, with a traceback each, the write tasks and futures whose
  exceptions nothing awaited (launch.py runs no asyncio of its own: they are orbax's): the first
  becomes one line, the rest are dropped. Other libraries' errors stay whole."""

  def __init__(self):
    super().__init__()
    self._first_asyncio_error = _first_call_only()

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno < std_logging.ERROR:
      return True
    if record.name == 'asyncio':
      if not self._first_asyncio_error():
        return False
      error = record.exc_info[1] if record.exc_info else None
      line = record.getMessage().strip().splitlines()[0] + (f': {error}' if error else '')
    elif f'{os.sep}orbax{os.sep}' in record.pathname:
      line = record.getMessage()
    else:
      return True
    record.msg, record.args = line.strip().splitlines()[0][:300], ()
    record.exc_info, record.exc_text = None, None
    return True


def _library_failures_in_one_line() -> None:
  """Cuts orbax's failure reports (its log records, asyncio's and tensorstore's) to one line; with
  --verbosity given, launch.py leaves them whole."""
  one_line = _LibraryErrorsInOneLine()
  std_logging.getLogger('absl').addFilter(one_line)
  std_logging.getLogger('asyncio').addFilter(one_line)
  sys.unraisablehook = _closed_loop_reported_once(sys.unraisablehook)


def _closed_loop_reported_once(hook):
  """After a failed save, tensorstore reports each write that completes once orbax's event loop
  has closed as an unraisable exception (`PyErr_WriteUnraisable`, so sys.unraisablehook): a
  traceback per write, up to hundreds for one full disk, before the run's own one-line error.
  Shows the first as one line, drops the rest; anything else goes to `hook`."""
  first = _first_call_only()

  def unraisablehook(unraisable):
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == 'Event loop is closed'):
      return hook(unraisable)
    if first():
      print('orbax: more checkpoint writes failed after the save had stopped.', file=sys.stderr)

  return unraisablehook


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config_flags' unknown-field error as one line, not a traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except AttributeError as error:  # config_flags: `--config.<field>` names no field.
    try:
      detail = ast.literal_eval(str(error))
    except (ValueError, SyntaxError):
      detail = str(error)
    detail = ' '.join(str(detail).split())
    message = f'Error: a --config.<field> flag names no field of the config: {detail}'
    raise SystemExit(message) from None


def _convert_torch() -> dict:
  """Converts the .pth, then checks the teacher's accuracy (`torch_convert.check_accuracy`): the
  written metadata and the check's figures go to stdout as JSON, the check's line to stderr."""
  needed = {'checkpoint': _CHECKPOINT, 'model': _MODEL, 'dataset': _DATASET}
  needed.update(num_classes=_NUM_CLASSES, output=_OUTPUT)
  missing = [f'--{name}' for name, flag in needed.items() if flag.value is None]
  if missing:
    raise app.UsageError(f'--mode=convert_torch needs {", ".join(missing)}.')
  from lpe import torch_convert  # Imports torch only here.

  try:
    mean, std = ([float(x) for x in flag.value] for flag in (_DATA_MEAN, _DATA_STD))
  except ValueError:
    message = '--data_mean and --data_std take numbers, e.g. 0.5071,0.4867,0.4408.'
    raise app.UsageError(message) from None
  meta = torch_convert.convert_pth(
    _CHECKPOINT.value,
    _MODEL.value,
    _OUTPUT.value,
    num_classes=_NUM_CLASSES.value,
    dataset=_DATASET.value,
    mean=mean,
    std=std,
  )
  check = torch_convert.check_accuracy(_OUTPUT.value)
  print(check.report(), file=sys.stderr, flush=True)
  fields = ('recorded', 'measured', 'num_examples', 'tolerance', 'differs')
  return dict(meta, accuracy_check={k: getattr(check, k) for k in fields})


def _run_study() -> None:
  if _ALLOW_OPTIMIZER_CHANGE.value:
    raise ValueError(
      '--allow_optimizer_change resumes a run or a comparison, not a study; resume the '
      "study's run with its own config, or use --allow_config_change."
    )
  try:
    from studies import study
  except ImportError as error:
    raise ImportError(
      f'A study needs its extra dependencies ({error.name} is missing): pip install "lpe[study]" '
      '(scipy, matplotlib), or run scripts/setup.sh.'
    ) from None
  study.run(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)


def _resume() -> str:
  """The flags' resume policy (`lpe.config.Resume`): --allow_config_change allows any change."""
  if _ALLOW_CONFIG_CHANGE.value:
    return 'any'
  return 'optimizer' if _ALLOW_OPTIMIZER_CHANGE.value else 'same'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Progress goes to stdout; orbax's INFO is noise.
    _library_failures_in_one_line()
  try:
    if _MODE.value == 'evaluate':
      result = experiment.evaluate_and_save(
        _CHECKPOINT.value or _WORKDIR.value,
        step=_STEP.value,
        split=_SPLIT.value,
        batch_size=_EVAL_BATCH_SIZE.value,
      )
      print(json.dumps(result, indent=2))
      return
    if _MODE.value == 'convert_torch':
      print(json.dumps(_convert_torch(), indent=2))
      return
    if _CONFIG.value is None or _WORKDIR.value is None:
      raise app.UsageError('Training needs --config=configs/<experiment>.py and --workdir=<dir>.')
    if 'grids' in _CONFIG.value:  # A method study: the studies tool beside the library.
      _run_study()
      return
    experiment.run(_CONFIG.value, _WORKDIR.value, resume=_resume())
  except _USER_ERRORS as error:
    logging.info('Stopped:', exc_info=True)
    raise SystemExit(f'Error: {error}') from None


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
