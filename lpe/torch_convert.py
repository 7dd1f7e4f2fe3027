"""Turns a PyTorch teacher checkpoint (.pth) into an lpe teacher file (model.msgpack + .json).

For teachers trained elsewhere: RepDistiller's CIFAR teachers (its
`save/models/*/ckpt_epoch_240.pth` files hold `{'model': state_dict, 'epoch', 'accuracy',
'optimizer'}`) and torchvision's ImageNet weights (a bare state_dict). The written file is what
a run's `config.teacher.checkpoint` names, read by `lpe.checkpoint.load_variables` with its
SHA-256 checked. `meta['test_accuracy']` stays None: lpe has not measured it; `launch.py
--mode=evaluate --checkpoint=<the .msgpack>` does, on lpe's own test split.

torch is needed only here and is optional for the rest of lpe: `pip install torch==2.13.0`.

Example:
  >>> from lpe import torch_convert  # doctest: +SKIP
  >>> torch_convert.convert_pth('save/models/resnet32x4_vanilla/ckpt_epoch_240.pth', 'resnet32x4',
  ...                           'teachers/resnet32x4/model.msgpack', num_classes=100,
  ...                           dataset='cifar100')
"""

import argparse
import os
from collections.abc import Mapping
from typing import Any

from lpe import checkpoint, data, models, sources
from lpe.state import count_params

TORCH_REQUIREMENT = 'torch==2.13.0'
# Where trainers keep the state_dict inside a saved dict: RepDistiller and torchvision's reference
# scripts use 'model', many others 'state_dict'.
_STATE_DICT_KEYS = ('model', 'state_dict')


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
  """Reads the state_dict a `.pth` file holds, bare or under 'model' / 'state_dict'.

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
      return saved[key]
  if all(hasattr(value, 'shape') for value in saved.values()):
    return saved
  raise ValueError(
    f'{pth_path} holds neither a state_dict nor one under {" or ".join(_STATE_DICT_KEYS)!r} '
    f'(its keys are {", ".join(map(str, list(saved)[:8]))}); save `model.state_dict()`.'
  )


def convert_pth(
  pth_path: str, model_name: str, output_path: str, *, num_classes: int, dataset: str
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

  Returns:
    The metadata written beside the variables: model, dataset, num_classes, params,
    test_accuracy (None) and source (the absolute path of `pth_path`), plus its sha256.
  """
  imagenet = dataset.startswith('imagenet')  # torchvision's weights: its size and constants.
  inputs = dict(image_size=sources.IMAGENET_SIZE if imagenet else 0)
  if imagenet:
    inputs.update(mean=sources.IMAGENET_MEAN, std=sources.IMAGENET_STD)
  info = data.dataset_info(dataset, **inputs)
  if info.num_classes != num_classes:
    raise ValueError(
      f'num_classes={num_classes} but {dataset} has {info.num_classes} classes; pass the dataset '
      'the teacher was trained on.'
    )
  state_dict = load_state_dict(pth_path)
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
    'source': os.path.abspath(pth_path),
  }
  checkpoint.export_variables(output_path, variables, meta)
  _, written = checkpoint.load_variables(output_path)
  return written
