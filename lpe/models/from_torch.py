"""PyTorch weights into lpe models: RepDistiller's CIFAR teachers and torchvision's ImageNet nets.

`from_torch(name, state_dict)` returns the `{'params', 'batch_stats'}` variables of the lpe model
`name`, filled from the `state_dict` of the PyTorch definition that lpe's model reproduces, under
that definition's own key names:

- `resnet8` ... `resnet110`, `resnet8x4`, `resnet32x4`: RepDistiller's `models/resnet.py`
  (`layer1.0.conv1.weight`, `layer2.0.downsample.0.weight`, `fc.weight`);
- `ResNet50`: RepDistiller's `models/resnetv2.py` (`layer1.0.shortcut.0.weight`, `linear.weight`);
- `wrn_16_1`, `wrn_16_2`, `wrn_40_1`, `wrn_40_2`: RepDistiller's `models/wrn.py`
  (`block1.layer.0.convShortcut.weight`, `bn1.weight`, `fc.weight`);
- `vgg8` ... `vgg19`: RepDistiller's `models/vgg.py` with BatchNorm (its `vgg13` is `vgg13_bn`;
  `block0.0.weight`, `block0.1.running_mean`, `classifier.weight`);
- `imagenet_resnet18`, `imagenet_resnet34`, `imagenet_resnet50`: torchvision's `resnet18/34/50`
  (`layer1.0.conv1.weight`, `layer2.0.downsample.0.weight`, `fc.weight`);
- `imagenet_mobilenet_v2`: torchvision's `mobilenet_v2` (`features.0.0.weight`,
  `features.2.conv.1.0.weight`, `classifier.1.weight`).

Layouts: conv weights `[out, in, kh, kw]` (OIHW) become Flax kernels `[kh, kw, in, out]` (HWIO; a
depthwise conv's `[c, 1, 3, 3]` becomes `[3, 3, 1, c]`), linear weights `[out, in]` are transposed,
biases are copied, BatchNorm `weight`/`bias` become `scale`/`bias` and `running_mean`/`running_var`
the `batch_stats` `mean`/`var`; `num_batches_tracked` is ignored. BatchNorm epsilon (1e-5) and
momentum (0.1, Flax's 0.9) are already PyTorch's in every lpe model.

Every key of the state_dict must be used and every lpe variable filled, with the shape it needs;
anything else stops with an error naming the keys, so a wrong model name or depth cannot load
silently.
"""

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lpe.models import imagenet, registry

# The prefix `torch.nn.DataParallel` (and DistributedDataParallel) adds to every key.
_DATA_PARALLEL_PREFIX = 'module.'
# Flax leaf name -> PyTorch parameter name, per variable collection.
_LEAF_NAMES = {
  'params': {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'},
  'batch_stats': {'mean': 'running_mean', 'var': 'running_var'},
}
# How many key names an error lists before it says how many more there are.
_LISTED = 5


def _resnet_module(path: tuple[str, ...], *, shortcut: str, classifier: str) -> str:
  """`('layer2_0', 'shortcut_conv')` -> `'layer2.0.<shortcut>.0'`; `('fc',)` -> `classifier`."""
  if path == ('fc',):
    return classifier
  if len(path) == 1:
    return path[0]
  block, layer = path
  stage, index = block.split('_')
  layer = {'shortcut_conv': f'{shortcut}.0', 'shortcut_bn': f'{shortcut}.1'}.get(layer, layer)
  return f'{stage}.{index}.{layer}'


def _wrn_module(path: tuple[str, ...]) -> str:
  """`('block1_0', 'shortcut_conv')` -> `'block1.layer.0.convShortcut'`; top level unchanged."""
  if len(path) == 1:
    return path[0]
  block, layer = path
  stage, index = block.split('_')
  return f'{stage}.layer.{index}.{"convShortcut" if layer == "shortcut_conv" else layer}'


def _vgg_module(path: tuple[str, ...]) -> str:
  """`('block2_conv1',)` -> `'block2.3'`: each block is a Sequential of conv, BN, ReLU, ..."""
  (name,) = path
  if name == 'classifier':
    return name
  block, kind, index = re.fullmatch(r'(block\d+)_(conv|bn)(\d+)', name).groups()
  return f'{block}.{3 * int(index) + (kind == "bn")}'


def _mobilenet_v2_module(path: tuple[str, ...]) -> str:
  """`('group1_0', 'depthwise')` -> `'features.2.conv.1.0'`: torchvision's `features` indices."""
  total_blocks = sum(n for _, _, n, _ in imagenet.MOBILENET_V2_SETTING)
  top = {
    'conv1': 'features.0.0',
    'bn1': 'features.0.1',
    'conv2': f'features.{total_blocks + 1}.0',
    'bn2': f'features.{total_blocks + 1}.1',
    'classifier': 'classifier.1',
  }
  if len(path) == 1:
    return top[path[0]]
  block, layer = path
  group, index = (int(part) for part in block.removeprefix('group').split('_'))
  position = 1 + sum(n for _, _, n, _ in imagenet.MOBILENET_V2_SETTING[:group]) + index
  # `conv` is a Sequential: [expand ConvBNReLU6,] depthwise ConvBNReLU6, project conv, project BN.
  first = 0 if imagenet.MOBILENET_V2_SETTING[group][0] == 1 else 1
  inner = {
    'expand': 'conv.0.0',
    'expand_bn': 'conv.0.1',
    'depthwise': f'conv.{first}.0',
    'depthwise_bn': f'conv.{first}.1',
    'project': f'conv.{first + 1}',
    'project_bn': f'conv.{first + 2}',
  }[layer]
  return f'features.{position}.{inner}'


@dataclasses.dataclass(frozen=True)
class _Source:
  """Where an lpe model's PyTorch weights come from and how its module names translate."""

  definition: str
  module_name: Callable[[tuple[str, ...]], str]
  classifier: str


_REPDISTILLER_RESNET = _Source(
  "RepDistiller's models/resnet.py",
  lambda path: _resnet_module(path, shortcut='downsample', classifier='fc'),
  'fc',
)
_TORCHVISION_RESNET = dataclasses.replace(_REPDISTILLER_RESNET, definition='torchvision.models')
_WRN = _Source("RepDistiller's models/wrn.py", _wrn_module, 'fc')
_VGG = _Source("RepDistiller's models/vgg.py (with batch_norm=True)", _vgg_module, 'classifier')

SOURCES: dict[str, _Source] = {
  **{
    name: _REPDISTILLER_RESNET
    for name in (
      'resnet8',
      'resnet14',
      'resnet20',
      'resnet32',
      'resnet44',
      'resnet56',
      'resnet110',
      'resnet8x4',
      'resnet32x4',
    )
  },
  'ResNet50': _Source(
    "RepDistiller's models/resnetv2.py",
    lambda path: _resnet_module(path, shortcut='shortcut', classifier='linear'),
    'linear',
  ),
  **{name: _WRN for name in ('wrn_16_1', 'wrn_16_2', 'wrn_40_1', 'wrn_40_2')},
  **{name: _VGG for name in ('vgg8', 'vgg11', 'vgg13', 'vgg16', 'vgg19')},
  **{
    name: _TORCHVISION_RESNET
    for name in ('imagenet_resnet18', 'imagenet_resnet34', 'imagenet_resnet50')
  },
  'imagenet_mobilenet_v2': _Source(
    'torchvision.models.mobilenet_v2', _mobilenet_v2_module, 'classifier.1'
  ),
}


def _to_numpy(value: Any) -> np.ndarray:
  """A torch tensor (any device, any float dtype) or array-like as a NumPy array."""
  if hasattr(value, 'detach'):  # A torch.Tensor; torch itself need not be importable here.
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()  # NumPy has no bfloat16.
    return value.numpy()
  return np.asarray(value)


def _plain_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Drops the DataParallel prefix and `num_batches_tracked`; converts values to NumPy."""
  arrays = {}
  for key, value in state_dict.items():
    key = key.removeprefix(_DATA_PARALLEL_PREFIX)
    if key.endswith('num_batches_tracked'):
      continue
    arrays[key] = _to_numpy(value)
  return arrays


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape of a Flax leaf's shape: HWIO -> OIHW, `[in, out]` -> `[out, in]`."""
  if len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  return tuple(reversed(flax_shape))


def _to_flax(array: np.ndarray) -> np.ndarray:
  """A PyTorch weight in the Flax layout (OIHW -> HWIO, `[out, in]` -> `[in, out]`), float32."""
  if array.ndim == 4:
    array = array.transpose(2, 3, 1, 0)
  elif array.ndim == 2:
    array = array.T
  # A copy, always: `ascontiguousarray` would return a float32 1-D array (a BatchNorm statistic, a
  # bias) as a view of the PyTorch tensor's memory, so training that model on would change it.
  return np.array(array, dtype=np.float32, order='C', copy=True)


def torch_keys(name: str, num_classes: int) -> dict[tuple[str, ...], tuple[str, tuple[int, ...]]]:
  """The PyTorch key and shape of each variable of the lpe model `name`.

  Args:
    name: An lpe model name of `SOURCES`.
    num_classes: Outputs of the classifier.

  Returns:
    `{(collection, *module_path, leaf): (state_dict key, PyTorch shape)}`, for example
    `('params', 'layer1_0', 'conv1', 'kernel'): ('layer1.0.conv1.weight', (16, 16, 3, 3))`.
  """
  source = _source(name)
  model = registry.build(name, num_classes)
  # Parameter shapes do not depend on the image size (every net pools globally).
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  keys = {}
  for flat, leaf in traverse_util.flatten_dict(shapes).items():
    collection, *module_path, leaf_name = flat
    module = source.module_name(tuple(module_path))
    keys[flat] = (f'{module}.{_LEAF_NAMES[collection][leaf_name]}', _torch_shape(leaf.shape))
  return keys


def _source(name: str) -> _Source:
  if name not in SOURCES:
    raise ValueError(
      f'No PyTorch source is known for the lpe model {name!r}; from_torch converts: '
      f'{", ".join(sorted(SOURCES))}.'
    )
  return SOURCES[name]


def _listed(items: list[str]) -> str:
  """`'a, b, c, d, e and 7 more'`, or `'none'`."""
  if not items:
    return 'none'
  more = f' and {len(items) - _LISTED} more' if len(items) > _LISTED else ''
  return ', '.join(items[:_LISTED]) + more


def from_torch(
  name: str, state_dict: Mapping[str, Any], *, num_classes: int | None = None
) -> dict[str, Any]:
  """Converts a PyTorch `state_dict` into the variables of the lpe model `name`.

  Args:
    name: The lpe model name (one of `SOURCES`: RepDistiller's CIFAR nets by their RepDistiller
      names, torchvision's nets as `imagenet_resnet18`, ..., `imagenet_mobilenet_v2`).
    state_dict: `model.state_dict()` of the PyTorch definition of that model (see this module's
      docstring), with torch tensors or NumPy arrays as values; the `module.`
      prefix of a `DataParallel` model's keys is removed.
    num_classes: Outputs of the classifier; by default read from the state_dict's classifier.

  Returns:
    `{'params': ..., 'batch_stats': ...}` as NumPy float32 arrays, the tree `model.init` gives for
    `build(name, num_classes)`, ready for `model.apply(variables, images, train=False)` on NHWC
    images.

  Example:
    >>> import torch, lpe.models  # doctest: +SKIP
    >>> sd = torch.load('ckpt_epoch_240.pth', map_location='cpu', weights_only=True)['model']
    >>> variables = lpe.models.from_torch('resnet32x4', sd)
    >>> logits, features = lpe.models.build('resnet32x4', 100).apply(variables, nhwc_images)
  """
  source = _source(name)
  arrays = _plain_state_dict(state_dict)
  classifier_key = f'{source.classifier}.weight'
  if classifier_key not in arrays:
    raise ValueError(
      f'The state_dict has no {classifier_key!r}, the classifier of lpe {name!r} in '
      f'{source.definition}; pass the state_dict of that model (its keys are '
      f'{_listed(sorted(arrays))}).'
    )
  state_classes = arrays[classifier_key].shape[0]
  if num_classes is not None and num_classes != state_classes:
    raise ValueError(
      f'The state_dict classifies into {state_classes} classes ({classifier_key} has shape '
      f'{arrays[classifier_key].shape}), not num_classes={num_classes}; pass the matching number.'
    )
  keys = torch_keys(name, state_classes)
  wanted = {key for key, _ in keys.values()}
  missing = sorted(wanted - set(arrays))
  unused = sorted(set(arrays) - wanted)
  if missing or unused:
    raise ValueError(
      f'The state_dict does not fit lpe {name!r} ({source.definition}): missing '
      f'{_listed(missing)}; unused {_listed(unused)}; check the model name, its depth and width.'
    )
  wrong = [
    f'{key} has shape {arrays[key].shape} where lpe needs {shape}'
    for key, shape in keys.values()
    if arrays[key].shape != shape
  ]
  if wrong:
    raise ValueError(
      f'The state_dict does not fit lpe {name!r} ({source.definition}): '
      f'{_listed(wrong)}; check the model name, its depth and width.'
    )
  flat = {path: _to_flax(arrays[key]) for path, (key, _) in keys.items()}
  return traverse_util.unflatten_dict(flat)
