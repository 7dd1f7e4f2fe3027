"""The defaults every experiment config starts from (`configs/*.py` override them).

`default_config()` is also the schema: a run config may hold only its keys, with values of the
same types (`check_keys_and_types`), every numeric key has its range in `DOMAINS` (a test fails
for a number without one) and every string with a fixed set of values its `CHOICES`; `check`
checks all of that. What needs more than the config (the dataset, the devices, the models) is
checked by the module that owns it, all called by `lpe.preflight.validate` before any work.
`RESUME_SAFE_FIELDS` lists the fields a run may change when it resumes from its workdir
(`changed_fields`); a `Resume` policy allows more.

This module is data: it imports only `lpe.methods` (which imports nothing from lpe), and no JAX.
"""

import dataclasses
import difflib
import math
from collections.abc import Mapping
from typing import Any, Literal

import ml_collections
from ml_collections import config_dict

from lpe import methods


def default_config() -> ml_collections.ConfigDict:
  """Returns the default training config: a student trained alone on Fashion-MNIST."""
  config = ml_collections.ConfigDict()
  config.name = ''  # Shown in progress lines and tables; '' means the workdir's name.
  config.seed = 0
  # A TFDS image-classification dataset by name, 'folder:PATH' (PATH/train/<class>/<images> and
  # PATH/test/<class>/<images>) or 'npz:PATH' (train_images, train_labels, test_images,
  # test_labels); docs/data.md.
  config.dataset = 'fashion_mnist'
  config.data_dir = ''  # '' means $TFDS_DATA_DIR or ~/tensorflow_datasets.
  config.train_split = 'train'
  config.test_split = 'test'
  # >0: train on a fixed, class-stratified subset of this many examples of `train_split` (the
  # few-labels regime): the same subset for every seed and method, drawn with
  # `train_subset_seed` (`lpe.data.stratified_subset`).
  config.train_subset = 0
  config.train_subset_seed = 0
  config.image_size = 0  # >0: images resized (or, with augment='imagenet', cropped) to this size.
  # Per-channel normalisation constants; () means the published ones of mnist, fashion_mnist and
  # cifar, else computed once from the training split and cached beside the data.
  config.data_mean = ()
  config.data_std = ()
  # 'none', 'cifar' (4-pixel padded random crop and flip) or, with streaming input only,
  # 'imagenet' (random-resized crop to image_size and flip; evaluation on the central crop).
  config.augment = 'none'
  config.model = 'cnn_student'
  # PyTorch's (RepDistiller's) conventions where they differ from Flax's, for the CRD configs
  # (docs/reproducing.md): BatchNorm's running variance from the unbiased batch variance
  # (x n / (n - 1)), and the classifier's kernel and bias drawn as torch.nn.Linear draws them
  # (uniform in +-1/sqrt(fan_in)) instead of Flax's LeCun-normal kernel and zero bias.
  config.bn_unbiased_var = False
  config.torch_classifier_init = False

  config.num_epochs = 3
  config.batch_size = 128  # Global batch, split over all devices.
  config.eval_batch_size = 1000
  config.steps_per_epoch_limit = 0  # >0 caps the steps of an epoch (smoke tests).
  # The examples past an epoch's last full batch: 'drop' leaves them out (num_examples //
  # batch_size steps); 'masked' trains on them as PyTorch's DataLoader does (RepDistiller's 782
  # steps per CIFAR-100 epoch at batch 64, not 781): one more step of the same shape, padded with
  # rows that a mask leaves out of CE, every distillation term and BatchNorm's batch statistics.
  # The learning-rate schedule counts those steps. For in-memory input and LP over the batch
  # (lp_graph='batch') only; docs/reproducing.md.
  config.last_batch = 'drop'
  # Where the training split lives: 'device' (whole on every device; each step gathers its rows
  # there), 'host' (NumPy; each batch is copied over), 'stream' (read record by record from the
  # files by `input_workers` host processes, which also decode and augment; lpe/stream.py) or
  # 'auto' (device up to 2 GiB of images, host up to 8 GiB, else stream). All give the same
  # batches, bit for bit.
  config.input = 'auto'
  config.input_workers = 0  # 'stream': worker processes per host (0: read in this process).

  config.optimizer = 'adam'  # 'adam' or 'sgd'.
  config.learning_rate = 1e-3
  config.momentum = 0.9
  config.weight_decay = 0.0
  config.lr_schedule = 'cosine'  # 'constant', 'cosine' or 'step'.
  config.lr_decay_epochs = (150, 180, 210)
  config.lr_decay_factor = 0.1

  config.teacher = _teacher_defaults()
  config.distill = _distill_defaults()
  _device_defaults(config)

  config.log_every_steps = 100
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 3  # At least 2, so a corrupt latest checkpoint has a fallback.
  # A step with a non-finite loss, gradient or update stops the run (False) or is skipped (True):
  # its update is not applied and the skipped batches are counted in metrics.jsonl.
  config.skip_nonfinite_batches = False
  # Skipping stops the run once more than this share of an epoch's batches were skipped.
  config.max_skipped_fraction = 0.1
  return config


def _teacher_defaults() -> ml_collections.ConfigDict:
  """`config.teacher`: the frozen teacher."""
  # The frozen teacher: its architecture and its exported model (a run's workdir or .msgpack).
  teacher = ml_collections.ConfigDict()
  teacher.model = ''
  teacher.checkpoint = ''
  # Compute the teacher's outputs on the training split once, before training, instead of in
  # every step; only without augmentation (issue 6; docs/performance.md).
  teacher.cache_outputs = False
  # '' or a folder where the cached outputs are kept as files for later runs of the same teacher
  # and split (a study's runs share them).
  teacher.cache_dir = ''
  return teacher


def _distill_defaults() -> ml_collections.ConfigDict:
  """`config.distill`: the student objective's weights and the features each term reads."""
  # Student objective: ce_weight * CE + lp_weight * LP + kd_weight * KD + ... (a weight of 0
  # turns a term off).
  distill = ml_collections.ConfigDict()
  distill.ce_weight = 1.0
  distill.lp_weight = 0.0
  distill.k = 5
  distill.sigma2 = config_dict.placeholder(float)  # None: mean kNN distance in the batch.
  distill.sigma2_scale = 1.0  # Multiplies the bandwidth (sigma2, or the default).
  # The student's scale in LP (every form, lpe/losses): 'none' (the paper's loss, lowered by
  # shrinking the student's embedding), 'l2' (on L2-normalised student embeddings) or 'mean'
  # (divided by the batch's mean squared student distance); docs/scale_invariant_lp.md.
  distill.student_scale = 'none'
  # LP's weight rises linearly from 0 over this many first epochs (0: the full weight at once).
  distill.lp_warmup_epochs = 0.0
  distill.feature = 'embedding'  # A key of both models' feature dicts.
  # None: direct kNN up to 4096 rows, blockwise above; 0: always direct; n: blocks of n rows.
  distill.knn_block_size = config_dict.placeholder(int)
  # Whose neighbourhoods LP keeps (lpe/losses/graph.py; docs/locality_beyond_the_batch.md):
  # 'batch' (the teacher's kNN graph within each batch, the paper's loss), 'neighbours' (the
  # teacher's kNN graph over the whole training split, with batches of anchors and
  # `graph_neighbours` of their graph neighbours each) or 'bank' (the whole split's graph, every
  # neighbour read from a memory bank of student embeddings, refreshed as images pass through).
  distill.lp_graph = 'batch'
  distill.graph_k = 0  # Neighbours per example in the whole split's graph; 0 means `k`.
  distill.graph_neighbours = 1  # 'neighbours': graph neighbours drawn per anchor (m).
  # 'neighbours': 'within' (anchors and their neighbours share batch_size rows, so an epoch's CE
  # sees about 1 / (1 + m) of the images as anchors) or 'added' (the anchors are the ordinary
  # batch of batch_size, every image once per epoch; their neighbours come on top and CE and the
  # per-example terms average over the anchors). With lp_weight=0 the sampler runs alone: the
  # control that measures its own effect.
  distill.neighbour_batches = 'within'
  distill.bank_momentum = 0.0  # 'bank': a row becomes momentum * old + (1 - momentum) * new.
  # 'bank': how the bank is first filled by the initial student: 'inference' (running BatchNorm
  # statistics) or 'train' (batch statistics over training-size batches, as the step sees).
  distill.bank_fill = 'inference'
  # Every other method (lpe/methods.py): its weight, the features it reads (keys of both models'
  # feature dicts: the stage names of the small CNNs; the zoo's nets have stage0..3) and its
  # settings, e.g. kd_temperature, fitnet_feature (the hint layer; a trainable regressor maps
  # widths), at_features, sp_feature, rkd_feature.
  for name, method in methods.METHODS.items():
    distill[f'{name}_weight'] = 0.0
    distill.update(dict(method.settings))
  return distill


def _device_defaults(config: ml_collections.ConfigDict) -> None:
  """Sets the devices, hosts and numerics fields of `config`."""
  # Devices and hosts (see lpe/parallel.py).
  config.parallelism = 'jit'  # 'jit' (sharded jit over a mesh) or 'pmap'.
  config.sync_batch_stats = True  # pmap: BatchNorm statistics over all devices (cross-replica).
  # One process on CPU: how many of its host devices (one per core, lpe.xla_cpu) the batch is
  # split over; 0 chooses by the models' size (lpe.parallel.choose_devices). The count changes
  # the steps by float32 rounding only. Ignored on GPUs, TPUs and several processes (all devices).
  config.cpu_devices = 0
  # How the zoo's convs compute (same parameters either way; lpe.models.layers.CONV_IMPLS):
  # 'xla' (lax's convolution), 'cpu' (the same convolutions with a backward pass that runs about
  # a third faster on XLA:CPU; docs/performance_cpu_conv.md) or 'auto' ('cpu' on the CPU backend,
  # 'xla' on GPU and TPU).
  config.conv_impl = 'auto'
  config.half_precision = False  # bfloat16 forward passes; float32 params, optimizer and losses.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.auto = False  # TPU pods / SLURM: let JAX detect the cluster.
  config.distributed.coordinator_address = ''  # 'host:port' of process 0 ('' = single host).
  config.distributed.num_processes = 0
  config.distributed.process_id = -1
  # On several processes: False, every process reads the whole training split and feeds its rows
  # of each global batch (the batches, and so the run, do not depend on the process count); True,
  # each reads only its 1/P share (`data.shard_rows`, as TFDS even splits) and shuffles it alone,
  # so memory and reading scale with the hosts but the batches depend on their number.
  config.distributed.per_process_data = False


@dataclasses.dataclass(frozen=True)
class Domain:
  """The values a numeric setting may take: finite (never NaN or infinite), from `low` to `high`,
  each bound included unless it is `open`."""

  low: float = -math.inf
  high: float = math.inf
  low_open: bool = False
  high_open: bool = False
  why: str = ''  # Appended to the message, e.g. what the bound protects.

  def admits(self, value: float) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
      return False
    above = value > self.low if self.low_open else value >= self.low
    below = value < self.high if self.high_open else value <= self.high
    return above and below

  def describe(self, integer: bool) -> str:
    """`'>= 0'`, `'> 0'`, `'in [0, 1)'` or `'a positive integer'`."""
    if integer and self.low == 1 and self.high == math.inf:
      return 'a positive integer'
    if self.high == math.inf:
      return f'{">" if self.low_open else ">="} {_show(self.low)}'
    left, right = '(' if self.low_open else '[', ')' if self.high_open else ']'
    return f'in {left}{_show(self.low)}, {_show(self.high)}{right}'


def _show(x: float) -> str:
  return str(int(x)) if float(x).is_integer() else f'{x:g}'


_AT_LEAST_0, _AT_LEAST_1, _POSITIVE = Domain(0), Domain(1), Domain(0, low_open=True)
_SHARE = Domain(0, 1, high_open=True)

# The range of every numeric setting of `default_config()` (a tuple's elements each), keyed by
# its dotted path; `None`, where the default is a placeholder, is always allowed.
DOMAINS = {
  'seed': Domain(0, 2**31 - 1),
  'num_epochs': _AT_LEAST_1,
  'batch_size': _AT_LEAST_1,
  'eval_batch_size': _AT_LEAST_1,
  'steps_per_epoch_limit': _AT_LEAST_0,  # 0: no limit.
  'image_size': _AT_LEAST_0,  # 0: the images' own size.
  'train_subset': _AT_LEAST_0,  # 0: the whole split.
  'train_subset_seed': Domain(0, 2**31 - 1),
  'data_mean': _SHARE,  # Per channel, of pixels scaled to [0, 1].
  'data_std': _POSITIVE,
  'input_workers': _AT_LEAST_0,
  'learning_rate': _POSITIVE,
  'momentum': _SHARE,
  'weight_decay': _AT_LEAST_0,
  'lr_decay_epochs': _AT_LEAST_0,
  'lr_decay_factor': _POSITIVE,
  'distill.ce_weight': _AT_LEAST_0,
  **{f'distill.{name}_weight': _AT_LEAST_0 for name in methods.METHODS},
  'distill.k': _AT_LEAST_1,
  'distill.sigma2': _POSITIVE,
  'distill.sigma2_scale': _POSITIVE,
  'distill.lp_warmup_epochs': _AT_LEAST_0,
  'distill.knn_block_size': _AT_LEAST_0,
  'distill.graph_k': _AT_LEAST_0,  # 0: k.
  'distill.graph_neighbours': _AT_LEAST_1,
  'distill.bank_momentum': _SHARE,
  'distill.kd_temperature': _POSITIVE,
  'cpu_devices': _AT_LEAST_0,
  'distributed.num_processes': _AT_LEAST_0,
  'distributed.process_id': Domain(-1),  # -1: from the environment.
  'log_every_steps': _AT_LEAST_1,
  'checkpoint_every_steps': _AT_LEAST_1,
  'keep_checkpoints': Domain(
    2, why=' (so a damaged latest checkpoint has a fallback: keep at least 2)'
  ),
  'max_skipped_fraction': Domain(0, 1),
}
# The values of the settings that modules implement, named here so that the config stays data;
# the owners import them.
CONV_IMPLS = ('xla', 'cpu')  # How the zoo's convs compute (`lpe.models.layers`).
DEVICE_AUGMENTATIONS = ('none', 'cifar')  # Drawn on the devices inside the step (`lpe.augment`).
# 'imagenet' (random-resized crop and flip) is drawn by the streaming input's workers.
AUGMENTATIONS = (*DEVICE_AUGMENTATIONS, 'imagenet')
INPUTS = ('auto', 'device', 'host', 'stream')  # Where the training split lives (`lpe.feed`).
LAST_BATCHES = ('drop', 'masked')  # An epoch's last partial batch (`lpe.data`, `lpe.feed`).
LP_GRAPHS = ('batch', 'neighbours', 'bank')
# The string settings with a fixed set of values (names of models, datasets and features are
# checked against their registries by `lpe.preflight.validate`).
CHOICES = {
  'optimizer': ('adam', 'sgd'),
  'lr_schedule': ('constant', 'cosine', 'step'),
  'parallelism': ('jit', 'pmap'),
  'conv_impl': ('auto', *CONV_IMPLS),
  'augment': AUGMENTATIONS,
  'input': INPUTS,
  'last_batch': LAST_BATCHES,
  'distill.lp_graph': LP_GRAPHS,
  'distill.student_scale': ('none', 'l2', 'mean'),
  'distill.neighbour_batches': ('within', 'added'),
  'distill.bank_fill': ('inference', 'train'),
}


# Fields that do not change the trained parameters, so a run may resume with new values: where
# the data and teacher files live, how often to log and checkpoint, how many checkpoints to keep,
# the evaluation batch (masked, every example counted once), the cluster layout and the CPU
# device count (both change the steps by float32 rounding only), and the remedy
# for non-finite batches. Everything else (num_epochs included: it sets the learning-rate
# schedule) needs `resume='any'` (`--allow_config_change`).
RESUME_SAFE_FIELDS = (
  'name',
  'data_dir',
  'eval_batch_size',
  'input',
  'input_workers',
  'conv_impl',
  'cpu_devices',
  'log_every_steps',
  'checkpoint_every_steps',
  'keep_checkpoints',
  'skip_nonfinite_batches',
  'max_skipped_fraction',
  'teacher.checkpoint',
  'teacher.cache_dir',
  # The cluster layout (not distributed.per_process_data, which changes the batches).
  'distributed.auto',
  'distributed.coordinator_address',
  'distributed.num_processes',
  'distributed.process_id',
)
# The optimizer's settings that `resume='optimizer'` (`--allow_optimizer_change`) lets a resumed
# run change, and no others: the way forward after a divergence is to resume from the last good
# checkpoint with a lower learning rate. They change the schedule, not the optimizer state's
# shapes (`optimizer` itself would, so it is not one of them).
OPTIMIZER_FIELDS = (
  'learning_rate',
  'momentum',
  'weight_decay',
  'lr_schedule',
  'lr_decay_epochs',
  'lr_decay_factor',
)
# What a run may change when it resumes from a workdir made with another config, besides
# `RESUME_SAFE_FIELDS`: nothing ('same'), `OPTIMIZER_FIELDS` ('optimizer'; launch.py's
# --allow_optimizer_change) or any field ('any'; --allow_config_change).
Resume = Literal['same', 'optimizer', 'any']
RESUME_POLICIES: tuple[Resume, ...] = ('same', 'optimizer', 'any')


def _kind(default: Any) -> str:
  if isinstance(default, bool):
    return 'a bool'
  if isinstance(default, int):
    return 'an int'
  if isinstance(default, float):
    return 'a number'
  if isinstance(default, tuple | list):
    return 'a tuple of strings' if default and isinstance(default[0], str) else 'a tuple of numbers'
  return 'a string'


def _fits(value: Any, default: Any) -> bool:
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, int | float) and not isinstance(value, bool)
  if isinstance(default, tuple | list):
    element = default[0] if default else 1.0  # The default's elements say what may go in.
    return isinstance(value, tuple | list) and all(_fits(v, element) for v in value)
  return isinstance(value, str)


def _is_group(x: Any) -> bool:
  return isinstance(x, Mapping | ml_collections.ConfigDict)


def check_keys_and_types(
  config: Any, defaults: ml_collections.ConfigDict | None = None, prefix: str = 'config.'
) -> None:
  """Raises a ValueError for a key `default_config()` lacks or a value of another type.

  A typo in a config file (`config.learning_rat = 0.1`) would otherwise add a key that nothing
  reads. `None` is accepted where the default is a placeholder (e.g. `distill.sigma2`).
  """
  defaults = default_config() if defaults is None else defaults
  for key in config.keys():
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults.keys()), n=1)
      hint = f'did you mean {prefix}{close[0]}?' if close else 'remove it.'
      raise ValueError(
        f'{prefix}{key} is not a setting (the settings are the keys of '
        f'lpe.config.default_config()); {hint}'
      )
    value, default = config[key], defaults[key]
    if _is_group(default):
      if not _is_group(value):
        raise ValueError(f'{prefix}{key} must be a group of settings, got {value!r}; fix it.')
      check_keys_and_types(value, default, f'{prefix}{key}.')
      continue
    if default is None:  # A placeholder: None or a value of its declared type.
      if value is None:
        continue
      default = defaults.get_type(key)()
    if not _fits(value, default):
      raise ValueError(
        f'{prefix}{key} must be {_kind(default)}, got {value!r} ({type(value).__name__}); '
        'fix its value.'
      )


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if _is_group(value):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = list(value) if isinstance(value, tuple) else value
  return flat


def changed_fields(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """`'field: old -> new'` for each field that differs and is not in `RESUME_SAFE_FIELDS`.

  Both are plain dicts (a run's `config.json` and the new config's JSON); a field only one side
  has (written by another version of lpe) is not compared.
  """
  old, new = _flatten(saved), _flatten(current)
  safe = lambda key: any(key == f or key.startswith(f + '.') for f in RESUME_SAFE_FIELDS)
  return [
    f'{key}: {old[key]!r} -> {new[key]!r}'
    for key in sorted(set(old) & set(new))
    if not safe(key) and not _same(old[key], new[key])
  ]


def _same(a: Any, b: Any) -> bool:
  """Equality in which NaN equals NaN (a config.json may hold one from an older lpe)."""
  if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
    return True
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
  return a == b


def check_domains(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError for the first value outside its `DOMAINS` range or `CHOICES`.

  NaN and infinities are refused everywhere; `None` is allowed where the default is `None`.
  """
  for key, value in _flatten(config).items():
    if key in CHOICES and value not in CHOICES[key]:
      raise ValueError(f'config.{key}={value!r} is unknown; use {_one_of(CHOICES[key])}.')
    domain = DOMAINS.get(key)
    if domain is None or value is None:
      continue
    for element in value if isinstance(value, list) else [value]:
      if not domain.admits(element):
        integer = isinstance(element, int)
        wanted = domain.describe(integer)
        if isinstance(element, float) and not math.isfinite(element):
          wanted = f'a finite number {wanted}'
        each = 'each value of ' if isinstance(value, list) else ''
        raise ValueError(
          f'{each}config.{key} must be {wanted}{domain.why}, got {element!r}; fix its value.'
        )


def check(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError for what the config alone shows is wrong: a key `default_config()` lacks,
  a value of another type, a number outside its `DOMAINS` range or a string not in its `CHOICES`.

  Reads nothing else (`lpe.preflight.validate` adds the checks that need the dataset, devices and
  models).
  """
  check_keys_and_types(config)
  check_domains(config)


def _one_of(values) -> str:
  """`'a, b or c'`."""
  return f'{", ".join(values[:-1])} or {values[-1]}'
