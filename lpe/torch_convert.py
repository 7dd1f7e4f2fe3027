"""Turns a PyTorch teacher checkpoint (.pth) into an lpe teacher file (model.msgpack + .json).

For teachers trained elsewhere: RepDistiller's CIFAR teachers (its
`save/models/*/ckpt_epoch_240.pth` files hold `{'model': state_dict, 'epoch', 'accuracy',
'optimizer'}`, its `*_best.pth` files `'best_acc'` in place of `'accuracy'`) and torchvision's
ImageNet weights (a bare state_dict). The written file is what a run's
`config.teacher.checkpoint` names, read by `lpe.checkpoint.load_variables` with its SHA-256
checked. Its metadata keeps the accuracy the .pth records (`recorded_accuracy`, a fraction);
`meta['test_accuracy']` stays None.

`check_accuracy` is the check on import (`launch.py --mode=convert_torch` runs it): it evaluates
the written file as `launch.py --mode=evaluate --checkpoint=<the .msgpack>` does, on the dataset's
test split when that split is available here, and compares the result with the recorded accuracy:
a converter given the wrong architecture, normalisation or dataset gives a teacher that loads and
runs but scores less (RepDistiller's users report teachers of 70.27% where ~74% was expected).

torch is needed only here and is optional for the rest of lpe: `pip install torch==2.13.0`.

Example:
  >>> from lpe import torch_convert  # doctest: +SKIP
  >>> torch_convert.convert_pth('save/models/resnet32x4_vanilla/ckpt_epoch_240.pth', 'resnet32x4',
  ...                           'teachers/resnet32x4/model.msgpack', num_classes=100,
  ...                           dataset='cifar100')
"""

import argparse
import dataclasses
import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from lpe import checkpoint, data, models, sources
from lpe.state import count_params

TORCH_REQUIREMENT = 'torch==2.13.0'
# Where trainers keep the state_dict inside a saved dict: RepDistiller and torchvision's reference
# scripts use 'model', many others 'state_dict'.
_STATE_DICT_KEYS = ('model', 'state_dict')
# Where they keep the test accuracy: RepDistiller's ckpt_epoch_*.pth ('accuracy', that epoch's)
# and *_best.pth ('best_acc'), in percent.
_ACCURACY_KEYS = ('accuracy', 'best_acc')
# The largest difference (a fraction: 0.005 is 0.5 points) between the accuracy lpe measures and
# the recorded one that the check on import accepts without a warning. A faithful conversion
# differs only by float rounding of near ties (RepDistiller evaluates on a GPU, in cuDNN); a wrong
# normalisation or architecture costs points.
ACCURACY_TOLERANCE = 0.005


def _import_torch():
  try:
    import torch
  except ImportError as error:
    raise ImportError(
      f'Converting a PyTorch checkpoint needs torch, which is not installed; run '
      f'`pip install {TORCH_REQUIREMENT}` (the CPU build is enough).'
    ) from error
  return torch


def load_state_dict(pth_path: str) -> Mapping[str, Any]:
  """Reads the state_dict a `.pth` file holds, bare or under 'model' / 'state_dict'
  (`read_checkpoint`'s first value)."""
  return read_checkpoint(pth_path)[0]


def read_checkpoint(pth_path: str) -> tuple[Mapping[str, Any], float | None]:
  """Reads a `.pth` file: its state_dict (bare or under 'model' / 'state_dict') and the test
  accuracy it records, if any (`recorded_accuracy`).

  Loads with `weights_only=True` (no code from the file runs); `argparse.Namespace`, which
  RepDistiller's `*_last.pth` files store as 'opt', is allowed as plain data. A file torch cannot
  read that way (not a checkpoint, or a pickled model object) is a ValueError naming it.
  """
  torch = _import_torch()
  if not os.path.exists(pth_path):
    raise FileNotFoundError(f'PyTorch checkpoint {pth_path} does not exist; check the path.')
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      saved = torch.load(pth_path, map_location='cpu', weights_only=True)
  except Exception as error:  # Unpickling foreign bytes fails in many ways (KeyError, EOF, ...).
    raise ValueError(
      f'{pth_path} is not a PyTorch checkpoint of plain tensors that torch.load(weights_only=True) '
      'can read; give the file written by torch.save(model.state_dict(), path).'
    ) from error
  if not isinstance(saved, Mapping):
    raise ValueError(
      f'{pth_path} holds a {type(saved).__name__}, not a state_dict; save '
      '`model.state_dict()` (not the model) with torch.save.'
    )
  for key in _STATE_DICT_KEYS:
    if isinstance(saved.get(key), Mapping):
      return saved[key], recorded_accuracy(saved)
  if all(hasattr(value, 'shape') for value in saved.values()):
    return saved, None
  raise ValueError(
    f'{pth_path} holds neither a state_dict nor one under {" or ".join(_STATE_DICT_KEYS)!r} '
    f'(its keys are {", ".join(map(str, list(saved)[:8]))}); save `model.state_dict()`.'
  )


def recorded_accuracy(saved: Mapping[str, Any]) -> float | None:
  """The test accuracy a saved dict records under 'accuracy' or 'best_acc', as a fraction.

  RepDistiller records percent (a 0-d tensor such as `tensor(79.42)`); a value of at most 1 is
  read as a fraction already (for CIFAR-100, 1% is chance). None when neither key holds a finite
  number.
  """
  for key in _ACCURACY_KEYS:
    value = saved.get(key)
    try:
      value = float(value.item() if hasattr(value, 'item') else value)
    except (TypeError, ValueError, RuntimeError):  # Absent, or not one number.
      continue
    if math.isfinite(value):
      return value / 100 if value > 1 else value
  return None


def convert_pth(
  pth_path: str,
  model_name: str,
  output_path: str,
  *,
  num_classes: int,
  dataset: str,
  mean: Sequence[float] = (),
  std: Sequence[float] = (),
) -> dict[str, Any]:
  """Converts a PyTorch checkpoint into an lpe teacher file and returns its metadata.

  Args:
    pth_path: A `.pth` file holding a state_dict, bare or under 'model' (RepDistiller) or
      'state_dict'; a `DataParallel` model's 'module.' key prefix is fine.
    model_name: The lpe model name (see `lpe.models.from_torch`), e.g. 'resnet32x4', 'wrn_40_2',
      'imagenet_resnet50'.
    output_path: The `.msgpack` file to write; its metadata goes beside it as `.json`.
    num_classes: The classifier's outputs; must match the state_dict and `dataset`.
    dataset: The dataset the teacher was trained on (a TFDS name, `folder:PATH` or `npz:PATH`),
      whose normalisation its inputs get; for `imagenet*`, torchvision's constants at 224 pixels.
    mean, std: The per-channel normalisation the teacher was trained with, when it is not the
      dataset's (`lpe.data.dataset_info`), e.g. RepDistiller's CIFAR-100 constants
      (`configs/common.py`); recorded in the metadata, which evaluation reads.

  Returns:
    The metadata written beside the variables: model, dataset, num_classes, params, mean, std,
    test_accuracy (None), recorded_accuracy (the .pth's, a fraction, or None) and source (the
    absolute path of `pth_path`), plus its sha256.
  """
  imagenet = dataset.startswith('imagenet')  # torchvision's weights: its size and constants.
  inputs = dict(image_size=sources.IMAGENET_SIZE if imagenet else 0)
  if imagenet:
    inputs.update(mean=sources.IMAGENET_MEAN, std=sources.IMAGENET_STD)
  inputs.update({k: tuple(v) for k, v in (('mean', mean), ('std', std)) if v})
  info = data.dataset_info(dataset, **inputs)
  if info.num_classes != num_classes:
    raise ValueError(
      f'num_classes={num_classes} but {dataset} has {info.num_classes} classes; pass the dataset '
      'the teacher was trained on.'
    )
  state_dict, recorded = read_checkpoint(pth_path)
  variables = models.from_torch(model_name, state_dict, num_classes=num_classes)
  meta = {
    'model': model_name,
    'dataset': dataset,
    'num_classes': num_classes,
    'image_size': inputs['image_size'],
    'mean': list(info.mean),
    'std': list(info.std),
    'augment': 'imagenet' if imagenet else 'none',  # How it is evaluated: the centre crop.
    'params': count_params(variables['params']),
    'test_accuracy': None,
    'recorded_accuracy': recorded,
    'source': os.path.abspath(pth_path),
  }
  checkpoint.export_variables(output_path, variables, meta)
  _, written = checkpoint.load_variables(output_path)
  return written


@dataclasses.dataclass(frozen=True)
class AccuracyCheck:
  """What the check on import found.

  Attributes:
    path: The converted teacher file.
    dataset: The dataset it was evaluated on (its test split).
    recorded: The accuracy the .pth records (a fraction), or None.
    measured: The accuracy lpe measures, or None when the test split is not available here.
    num_examples: The test examples it was measured on (0 when skipped).
    skipped_because: Why it was not measured (the dataset's own message), or ''.
    tolerance: `ACCURACY_TOLERANCE`, or the one asked for.
  """

  path: str
  dataset: str
  recorded: float | None
  measured: float | None
  num_examples: int = 0
  skipped_because: str = ''
  tolerance: float = ACCURACY_TOLERANCE

  @property
  def differs(self) -> bool:
    """Whether both accuracies are known and differ by more than the tolerance."""
    if self.measured is None or self.recorded is None:
      return False
    return abs(self.measured - self.recorded) > self.tolerance

  def report(self) -> str:
    """One line for people: the two accuracies side by side, a warning naming the likely causes
    when they differ, or why the check was skipped and the command that runs it."""
    recorded = 'none' if self.recorded is None else f'{100 * self.recorded:.2f}%'
    if self.measured is None:
      return (
        f'Accuracy check skipped: the test split of {self.dataset} is not available here '
        f'({self.skipped_because.split(". ")[0]}); the .pth records {recorded}. Where it is, run '
        f'`launch.py --mode=evaluate --checkpoint={self.path}`.'
      )
    measured = (
      f'{100 * self.measured:.2f}% on the {self.num_examples} test images of {self.dataset}'
    )
    if self.recorded is None:
      return f'Accuracy check: the converted teacher scores {measured}; the .pth records none.'
    if not self.differs:
      return (
        f'Accuracy check: the converted teacher scores {measured}, the .pth records {recorded}: '
        f'they agree within {100 * self.tolerance:g} points.'
      )
    gap = 100 * abs(self.measured - self.recorded)
    return (
      f'WARNING: the converted teacher scores {measured} but the .pth records {recorded} '
      f'({gap:.2f} points apart, more than {100 * self.tolerance:g}): check --model (the '
      'architecture it was trained as), the normalisation constants (--data_mean, --data_std: '
      'those it was trained with) and --dataset (the data and test split it was measured on).'
    )


def check_accuracy(
  path: str, *, data_dir: str | None = None, tolerance: float = ACCURACY_TOLERANCE
) -> AccuracyCheck:
  """Evaluates the converted teacher `path` as `launch.py --mode=evaluate` does (writing its
  `<path>.evaluation.json`) and compares it with the accuracy its .pth records.

  A dataset that is not available here (`lpe.data.DatasetUnavailableError`) skips the
  evaluation; any other failure is raised.
  """
  from lpe import experiment  # noqa: PLC0415  (the evaluation path; JAX and the trainer)

  meta = checkpoint.read_meta(path)
  check = functools.partial(
    AccuracyCheck, path, meta['dataset'], meta.get('recorded_accuracy'), tolerance=tolerance
  )
  try:
    result = experiment.evaluate_and_save(path, data_dir=data_dir)
  except data.DatasetUnavailableError as error:
    return check(None, skipped_because=str(error))
  return check(result['accuracy'], num_examples=result['num_examples'])
