"""Training: the student's train state, the distillation train step, and the training loop.

The student is the only thing differentiated and saved. The teacher runs in inference mode from
its exported variables, which are passed to the step as a static input and never updated or saved
with the student. The same trainer trains a teacher from scratch (no distillation term).
"""

import functools
import json
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state
from jax.experimental import multihost_utils

from lpe import checkpoint, data, evaluate, metrics_io, models, objectives, parallel
from lpe import config as config_lib

Batch = tuple[jax.Array, jax.Array]


class NonFiniteLossError(FloatingPointError):
  """A train step gave a non-finite loss, gradient or update, and skipping was not asked for."""


class Preempted(SystemExit):
  """Raised once the state is saved after a SIGTERM: the process exits with status 143."""

  def __init__(self):
    super().__init__(128 + signal.SIGTERM)


class TrainState(train_state.TrainState):
  """The student's state: params, BatchNorm statistics and optimizer state, plus `aux_params`.

  `aux_params` are the trainable parameters of distillation terms (FitNet's regressor): optimised
  with the student, checkpointed with it for resume, but not part of the exported student.
  """

  batch_stats: Any = None
  aux_params: Any = None

  @classmethod
  def create(cls, *, apply_fn, params, tx, aux_params=None, **kwargs):
    aux_params = aux_params or {}
    opt_state = tx.init({'student': params, 'aux': aux_params})
    return cls(
      step=0,
      apply_fn=apply_fn,
      params=params,
      tx=tx,
      opt_state=opt_state,
      aux_params=aux_params,
      **kwargs,
    )

  def apply_gradients(self, *, grads, aux_grads=None, **kwargs):
    """One optimizer update of the student's params and `aux_params` together."""
    both = {'student': self.params, 'aux': self.aux_params}
    if aux_grads is None:
      aux_grads = jax.tree.map(jnp.zeros_like, self.aux_params)
    updates, opt_state = self.tx.update({'student': grads, 'aux': aux_grads}, self.opt_state, both)
    new = optax.apply_updates(both, updates)
    return self.replace(
      step=self.step + 1,
      params=new['student'],
      aux_params=new['aux'],
      opt_state=opt_state,
      **kwargs,
    )


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """The optimizer and learning-rate schedule that `config` names."""
  total = config.num_epochs * steps_per_epoch
  if config.lr_schedule == 'constant':
    schedule = optax.constant_schedule(config.learning_rate)
  elif config.lr_schedule == 'cosine':
    schedule = optax.cosine_decay_schedule(config.learning_rate, max(total, 1))
  elif config.lr_schedule == 'step':
    boundaries = {int(e * steps_per_epoch): config.lr_decay_factor for e in config.lr_decay_epochs}
    schedule = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
  else:
    raise ValueError(
      f'config.lr_schedule={config.lr_schedule!r} is unknown; use constant, cosine or step.'
    )
  if config.optimizer == 'sgd':
    opt = optax.sgd(schedule, momentum=config.momentum, nesterov=False)
  elif config.optimizer == 'adam':
    opt = optax.adam(schedule)
  else:
    raise ValueError(f'config.optimizer={config.optimizer!r} is unknown; use sgd or adam.')
  # Weight decay as an L2 term on the gradient, as PyTorch's SGD applies it (the CRD recipe).
  return optax.chain(optax.add_decayed_weights(config.weight_decay), opt)


def create_train_state(model, config, rng: jax.Array, image_shape, steps_per_epoch) -> TrainState:
  """A fresh train state for `model` on images of `image_shape`.

  When the config's objective has trainable parts (FitNet's regressor), they are created from the
  shapes of the student's and the configured teacher's features (no teacher weights needed).
  """
  x = jnp.zeros((1, *image_shape), jnp.float32)
  student_rng, aux_rng = jax.random.split(rng)
  variables = model.init(student_rng, x, train=False)
  aux_params = {}
  if config.distill.fitnet_weight:
    teacher = models.build(config.teacher.model, data.dataset_info(config.dataset).num_classes)
    features = lambda m: jax.eval_shape(lambda: m.apply(m.init(aux_rng, x), x))[1]
    aux_params = objectives.init_aux_params(
      config.distill, aux_rng, features(model), features(teacher)
    )
  return TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    batch_stats=variables.get('batch_stats', {}),
    aux_params=aux_params,
    tx=make_optimizer(config, steps_per_epoch),
  )


def augment_cifar(rng: jax.Array, images: jax.Array, *, axis_name: str | None = None) -> jax.Array:
  """Random 4-pixel zero-padded crop and horizontal flip, per image (torchvision's CIFAR recipe).

  Under `pmap` pass `axis_name`: the draws are made for the global batch and each device takes its
  rows, so the augmentation does not depend on the device count.
  """
  n, h, w, _ = images.shape
  total = n * (jax.lax.psum(1, axis_name) if axis_name else 1)
  crop_rng, flip_rng = jax.random.split(rng)
  offsets = jax.random.randint(crop_rng, (total, 2), 0, 9)
  flips = jax.random.bernoulli(flip_rng, 0.5, (total,))
  if axis_name:
    start = jax.lax.axis_index(axis_name) * n
    offsets = jax.lax.dynamic_slice_in_dim(offsets, start, n)
    flips = jax.lax.dynamic_slice_in_dim(flips, start, n)
  padded = jnp.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))

  def one(image, offset, flip):
    image = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))
    return jnp.where(flip, image[:, ::-1], image)

  return jax.vmap(one)(padded, offsets, flips)


def variables_of(state) -> dict[str, Any]:
  """The `{params, batch_stats}` variables of a train state, as `module.apply` takes them."""
  return _variables(state.params, state.batch_stats)


def _variables(params, batch_stats) -> dict[str, Any]:
  return {'params': params, 'batch_stats': batch_stats} if batch_stats else {'params': params}


def train_step(
  state: TrainState,
  teacher_variables: Mapping[str, Any] | None,
  images: jax.Array,
  labels: jax.Array,
  teacher_outputs: tuple[jax.Array, Mapping[str, jax.Array]] | None = None,
  *,
  student,
  teacher,
  info: data.DatasetInfo,
  distill: Mapping[str, Any],
  augment: str,
  seed: int,
  skip_nonfinite: bool = False,
  axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step of the student on CE plus the weighted terms of `distill`.

  Args:
    state: The student's state.
    teacher_variables: The teacher's variables (None when not distilling); never differentiated.
    images: uint8 `[n, H, W, C]`: the global batch, or this device's rows under `axis_name`.
    labels: int32 `[n]`.
    teacher_outputs: The teacher's `(logits, features)` for these rows, cached ahead of training
      (`teacher_outputs_cache`; only without augmentation), or None to run the teacher here.
    student, teacher: The Flax modules (teacher None when not distilling).
    info: The dataset's normalisation constants.
    distill: Static hyper-parameters of the objective (`config.distill`; see lpe.objectives).
    augment: 'none' or 'cifar'.
    seed: Base seed; the augmentation rng is `fold_in(key(seed), step)`, so a resumed run draws
      the same augmentations.
    skip_nonfinite: When the loss, gradient norm or new parameter norm is not finite, keep the
      old params, optimizer state and BatchNorm statistics (the step count still advances, so the
      data order and augmentation stay those of the uninterrupted run).
    axis_name: Under `pmap`, the device axis: the LP loss gathers over it and gradients, metrics
      and BatchNorm statistics are averaged over it.

  Returns:
    The new state and scalar metrics: loss, ce, lp, kd, accuracy, grad_norm, param_norm, and
    finite (1.0, or 0.0 when this step's loss or update is not finite).
  """
  if augment == 'cifar':
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    images = augment_cifar(rng, images, axis_name=axis_name)
  x = data.preprocess(images, info)
  if teacher is not None:
    if teacher_outputs is None:
      teacher_outputs = teacher.apply(teacher_variables, x, train=False)
    t_logits, t_features = jax.lax.stop_gradient(teacher_outputs)

  def loss_fn(params, aux_params):
    mutable = ['batch_stats'] if state.batch_stats else False
    out = student.apply(_variables(params, state.batch_stats), x, train=True, mutable=mutable)
    (logits, features), new_vars = out if mutable else (out, {})
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    terms = {}
    if teacher is not None:
      terms = objectives.distillation_terms(
        distill, logits, features, t_logits, t_features, aux_params, axis_name=axis_name
      )
    loss = objectives.total_loss(distill, ce, terms)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, (dict(terms, ce=ce), accuracy, new_vars.get('batch_stats', state.batch_stats))

  (loss, (terms, accuracy, batch_stats)), (grads, aux_grads) = jax.value_and_grad(
    loss_fn, argnums=(0, 1), has_aux=True
  )(state.params, state.aux_params)
  metrics = dict(terms, loss=loss, accuracy=accuracy)
  if axis_name:
    # Every term is a mean over this device's rows (or a global relational value), so the mean
    # over devices is the global value; the gathered terms' gradients already hold every
    # device's share through the gather's transpose.
    grads, aux_grads, metrics, batch_stats = jax.lax.pmean(
      (grads, aux_grads, metrics, batch_stats), axis_name
    )
  new_state = state.apply_gradients(grads=grads, aux_grads=aux_grads, batch_stats=batch_stats)
  metrics['grad_norm'] = optax.tree.norm(grads)
  metrics['param_norm'] = optax.tree.norm(new_state.params)
  finite = jnp.isfinite(jnp.stack([metrics[k] for k in ('loss', 'grad_norm', 'param_norm')])).all()
  if skip_nonfinite:
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    new_state = new_state.replace(
      params=keep(new_state.params, state.params),
      opt_state=keep(new_state.opt_state, state.opt_state),
      aux_params=keep(new_state.aux_params, state.aux_params),
      batch_stats=keep(new_state.batch_stats, state.batch_stats),
    )
  metrics['finite'] = finite.astype(jnp.float32)
  return new_state, metrics


# The largest split (images) the device-resident input path takes when `config.input` is 'auto',
# and the largest teacher-output cache `config.teacher.cache_outputs` builds.
DEVICE_INPUT_MAX_BYTES = 2 * 2**30
TEACHER_CACHE_MAX_BYTES = 2 * 2**30


def conv_impl(config: ml_collections.ConfigDict) -> str:
  """The `conv_impl` the student is built with: `config.conv_impl`, with 'auto' resolved to
  'cpu' on the CPU backend and 'xla' elsewhere (the two give the same parameters and, on this
  project's CPU, bitwise the same steps; docs/performance_cpu_conv.md)."""
  if config.conv_impl != 'auto':
    return config.conv_impl
  return 'cpu' if jax.default_backend() == 'cpu' else 'xla'


def _per_process_data(config: ml_collections.ConfigDict) -> bool:
  """Whether each process holds only its share of the training split."""
  return config.distributed.per_process_data and jax.process_count() > 1


def input_path(config: ml_collections.ConfigDict, split: data.Split) -> str:
  """'device' or 'host': where `config.input` ('auto', 'device', 'host') puts the training split.

  'auto' holds the split on the devices when its images take at most `DEVICE_INPUT_MAX_BYTES`
  (MNIST, Fashion-MNIST and CIFAR all do): only the batch's indices cross to the devices each
  step, and the gather, augmentation and the step run there. Both paths give the same batches.
  Under sharded jit with per-process data the split differs between processes, which a
  mesh-replicated array cannot hold, so 'auto' is 'host' there.
  """
  if config.input in ('device', 'host'):
    return config.input
  if _per_process_data(config) and config.parallelism == 'jit':
    return 'host'
  return 'device' if split.images.nbytes <= DEVICE_INPUT_MAX_BYTES else 'host'


def teacher_outputs_cache(
  teacher,
  teacher_variables: Mapping[str, Any],
  split: data.Split,
  *,
  info: data.DatasetInfo,
  distill: Mapping[str, Any],
  batch_size: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """The teacher's `(logits [N, classes], {feature: [N, ...]})` for every example of `split`.

  Only the features the active distillation terms read are kept. Valid only while the training
  images are not augmented (the teacher then sees exactly these images every epoch).

  Raises:
    ValueError: the cache would exceed `TEACHER_CACHE_MAX_BYTES`; the message names its size.
  """
  names = sorted(objectives.feature_names(distill))
  x = jax.ShapeDtypeStruct((1, *info.image_shape), jnp.float32)
  logits, features = jax.eval_shape(lambda x: teacher.apply(teacher_variables, x, train=False), x)
  per_example = [logits] + [features[n] for n in names]
  size = len(split) * sum(np.prod(a.shape[1:]) * np.dtype(a.dtype).itemsize for a in per_example)
  if size > TEACHER_CACHE_MAX_BYTES:
    raise ValueError(
      f'config.teacher.cache_outputs would hold {size / 2**30:.1f} GiB of teacher outputs '
      f'(logits and {", ".join(names) or "no features"} for {len(split)} examples), more than '
      f'{TEACHER_CACHE_MAX_BYTES / 2**30:.0f} GiB; set config.teacher.cache_outputs=False.'
    )

  @jax.jit
  def forward(variables, images):
    logits, features = teacher.apply(variables, data.preprocess(images, info), train=False)
    return logits, {n: features[n] for n in names}

  chunks = []
  for images, _, mask in data.eval_batches(split, batch_size=batch_size):
    outputs = forward(teacher_variables, images)
    chunks.append(jax.tree.map(lambda a, m=mask: np.asarray(a)[m], outputs))
  return jax.tree.map(lambda *parts: np.concatenate(parts), *chunks)


def count_params(params: Any) -> int:
  """The number of trainable parameters."""
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def load_teacher(config: ml_collections.ConfigDict, info: data.DatasetInfo, dtype=jnp.float32):
  """Builds the teacher module and loads its exported variables, checking they fit."""
  path = config.teacher.checkpoint
  if not path:
    raise ValueError(
      'Distillation is on (a config.distill weight is > 0) but '
      'config.teacher.checkpoint'
      " is empty; set it to a teacher run's workdir or its model.msgpack."
    )
  variables, meta = checkpoint.load_variables(path)
  if meta.get('model') != config.teacher.model:
    raise ValueError(
      f'The teacher checkpoint {path} holds a {meta.get("model")!r} model, but '
      f'config.teacher.model is {config.teacher.model!r}; make them agree.'
    )
  if meta.get('num_classes') != info.num_classes:
    raise ValueError(
      f'The teacher checkpoint {path} has {meta.get("num_classes")} classes, but the dataset has '
      f'{info.num_classes}; use a teacher trained on {config.dataset}.'
    )
  teacher = models.build(config.teacher.model, info.num_classes, dtype=dtype)
  expected = jax.eval_shape(
    functools.partial(teacher.init, train=False),
    jax.random.key(0),
    jnp.zeros((1, *info.image_shape)),
  )
  checkpoint.check_variables_match(variables, expected, what=f'Teacher checkpoint {path}')
  return teacher, jax.tree.map(jnp.asarray, variables), meta


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Stops before any work on config values that cannot run, naming the fix."""
  config_lib.check_keys_and_types(config)
  data.dataset_info(config.dataset)
  if config.model not in models.names():
    models.build(config.model, 1)  # Raises the error that lists the valid names.
  positive = ('num_epochs', 'batch_size', 'eval_batch_size', 'log_every_steps')
  for key in (*positive, 'checkpoint_every_steps'):
    if not isinstance(config[key], int) or config[key] < 1:
      raise ValueError(f'config.{key} must be a positive integer, got {config[key]!r}.')
  if config.keep_checkpoints < 2:
    raise ValueError(
      f'config.keep_checkpoints={config.keep_checkpoints} leaves no checkpoint to fall back on '
      'when the latest is damaged; keep at least 2.'
    )
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] % num_devices:
      raise ValueError(
        f'config.{key}={config[key]} does not divide over {num_devices} devices; use a multiple '
        f'of {num_devices}.'
      )
  if config.parallelism not in ('jit', 'pmap'):
    raise ValueError(f'config.parallelism={config.parallelism!r} is unknown; use jit or pmap.')
  if config.parallelism == 'jit' and not config.sync_batch_stats:
    raise ValueError(
      'config.sync_batch_stats=False needs config.parallelism=pmap: under sharded jit BatchNorm '
      'statistics are always over the global batch.'
    )
  d = config.distill
  if d.ce_weight < 0:
    raise ValueError(f'config.distill.ce_weight must be >= 0, got {d.ce_weight}.')
  if d.ce_weight == 0 and not objectives.active(d):
    raise ValueError(
      'config.distill.ce_weight=0 with no distillation weight leaves no loss to train on; set '
      'ce_weight > 0 or a distill.*_weight.'
    )
  for method in objectives.METHODS:
    if d[f'{method}_weight'] < 0:
      raise ValueError(f'config.distill.{method}_weight must be >= 0, got {d[method + "_weight"]}.')
  per_device = config.batch_size // num_devices
  if d.lp_weight and not 1 <= d.k < per_device:
    raise ValueError(
      f'config.distill.k={d.k} must be at least 1 and smaller than the per-device batch '
      f'({config.batch_size} over {num_devices} devices = {per_device}); lower k or raise '
      'batch_size.'
    )
  if d.sigma2 is not None and d.sigma2 <= 0:
    raise ValueError(f'config.distill.sigma2 must be positive or None, got {d.sigma2}.')
  if d.kd_weight and d.kd_temperature <= 0:
    raise ValueError(f'config.distill.kd_temperature must be positive, got {d.kd_temperature}.')
  if config.conv_impl not in ('auto', *models.layers.CONV_IMPLS):
    raise ValueError(
      f'config.conv_impl={config.conv_impl!r} is unknown; use auto, '
      f'{", ".join(models.layers.CONV_IMPLS)}.'
    )
  if config.augment not in ('none', 'cifar'):
    raise ValueError(f'config.augment={config.augment!r} is unknown; use none or cifar.')
  if config.input not in ('auto', 'device', 'host'):
    raise ValueError(f'config.input={config.input!r} is unknown; use auto, device or host.')
  if _per_process_data(config) and config.parallelism == 'jit':
    for what, on in (
      ('input=device', config.input == 'device'),
      ('teacher.cache_outputs', config.teacher.cache_outputs and objectives.active(d)),
    ):
      if on:
        raise ValueError(
          f'config.{what} holds per-process data on the devices, which sharded jit cannot do '
          'with config.distributed.per_process_data=True on several processes; use '
          'parallelism=pmap, or turn one of them off.'
        )
  if config.teacher.cache_outputs and objectives.active(d) and config.augment != 'none':
    raise ValueError(
      f'config.teacher.cache_outputs=True needs config.augment=none: with {config.augment!r} '
      'augmentation the teacher sees new images every step, so its outputs cannot be cached; '
      'turn one of them off.'
    )


def check_workdir_config(
  config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> list[str]:
  """Refuses to continue the run in `workdir` with a config that differs from its config.json.

  Fields in `lpe.config.RESUME_SAFE_FIELDS` may change freely. Reads files only.

  Returns:
    The changed fields (`'field: old -> new'`), allowed by `allow_config_change`.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return []
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as error:
    raise ValueError(
      f'{path} is unreadable ({error}); move it aside if {workdir} holds the run you mean to '
      'continue, or use another --workdir.'
    ) from error
  changes = config_lib.changed_fields(saved, json.loads(config.to_json_best_effort()))
  if changes and not allow_config_change:
    shown = '; '.join(changes[:3]) + (f'; and {len(changes) - 3} more' if len(changes) > 3 else '')
    raise ValueError(
      f'{workdir} holds a run made with another config ({shown}); use another --workdir, or '
      'pass --allow_config_change (allow_config_change=True) to continue it with this config.'
    )
  return changes


def _write_config(config: ml_collections.ConfigDict, workdir: str, changes: list[str]) -> None:
  """Writes config.json atomically; a replaced config is kept as config.<time>.json."""
  path = os.path.join(workdir, 'config.json')
  if changes:
    os.replace(path, os.path.join(workdir, f'config.{time.strftime("%Y%m%d-%H%M%S")}.json'))
  with open(path + '.tmp', 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(path + '.tmp', path)


class _Placement:
  """Puts state and batches on the devices for the configured data-parallel mode.

  The canonical state (checkpoints, evaluation, export) is always mesh-replicated; under pmap the
  step works on a per-device copy.
  """

  def __init__(self, mode: str):
    self.mode = mode
    self.mesh = parallel.make_mesh()
    self.replicated = parallel.replicated(self.mesh)
    self.sharded = parallel.batch_sharded(self.mesh)

  def compile(self, step):
    if self.mode == 'pmap':
      step = functools.partial(step, axis_name=parallel.AXIS)
      return jax.pmap(step, axis_name=parallel.AXIS, donate_argnums=(0,))
    return jax.jit(step, donate_argnums=(0,))

  def state(self, canonical):
    """Canonical (mesh-replicated) state to the form the step takes."""
    if self.mode == 'pmap':
      return parallel.replicate_for_pmap(canonical)
    return jax.device_put(canonical, self.replicated)

  def canonical(self, state):
    """The step's state back to the canonical, mesh-replicated form."""
    return parallel.unreplicate(state, self.mesh) if self.mode == 'pmap' else state

  def batch(self, local_rows):
    """This process's rows of a global batch, placed for the step."""
    if self.mode == 'pmap':
      return parallel.per_device(local_rows)
    return parallel.global_batch(local_rows, self.sharded)

  def metrics(self, metrics):
    return parallel.first_replica(metrics) if self.mode == 'pmap' else metrics

  def resident(self, tree):
    """Host arrays (a whole split, cached teacher outputs) held whole on every device."""
    if self.mode == 'pmap':
      return parallel.replicate_for_pmap(tree)
    place = lambda x: jax.make_array_from_process_local_data(self.replicated, np.asarray(x))
    return jax.tree.map(place, tree)

  def compile_take(self):
    """`take(resident, index)`: the rows `index` (placed by `batch`) of each resident array,
    gathered on the devices and placed like a batch."""
    take = lambda tree, index: jax.tree.map(lambda x: x[index], tree)
    if self.mode == 'pmap':
      return jax.pmap(take, axis_name=parallel.AXIS)
    return jax.jit(take, out_shardings=self.sharded)


class _Stop:
  """Turns SIGTERM into a flag the loop checks, so a preempted run saves before it exits."""

  def __init__(self):
    self.requested = False
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: leave signals alone.
      self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _format_duration(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  return f'{minutes}m{seconds:02d}s' if minutes else f'{seconds}s'


def _finished_result(workdir: str, config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  path = os.path.join(workdir, 'result.json')
  if not (os.path.exists(path) and os.path.exists(os.path.join(workdir, checkpoint.EXPORT_NAME))):
    return None
  with open(path) as f:
    result = json.load(f)
  return result if result.get('num_epochs') == config.num_epochs else None


def _progress_line(name, epoch, offset, steps_per_epoch, config, means, rate, eta, skipped) -> str:
  terms = ' '.join(
    f'{k} {means[k]:.4f}' for k in ('loss', 'ce', 'lp', 'kd', 'accuracy') if k in means
  )
  skips = f' | skipped {skipped} non-finite batches' if skipped else ''
  return (
    f'[{name}] epoch {epoch + 1}/{config.num_epochs} step {offset}/{steps_per_epoch} '
    f'{terms}{skips} | {rate:.0f} img/s | eta {_format_duration(eta)}'
  )


def _finite_metrics(
  window: list[dict[str, Any]], last_step: int, *, skip: bool, name: str, last_saved: int | None
) -> tuple[list[dict[str, float]], int]:
  """Host metrics of the steps ending at `last_step` that were finite, and how many were not.

  Raises:
    NonFiniteLossError: at the first non-finite step, unless `skip`; nothing is saved after it.
  """
  finite, skipped = [], 0
  for i, metrics in enumerate(jax.device_get(window)):
    metrics = {k: float(v) for k, v in metrics.items()}
    if metrics.pop('finite'):
      finite.append(metrics)
      continue
    if not skip:
      terms = ', '.join(
        f'{k} {metrics[k]:.4g}'
        for k in ('loss', 'ce', 'lp', 'kd', 'grad_norm', 'param_norm')
        if k in metrics
      )
      kept = f'step {last_saved}' if last_saved is not None else 'none was saved yet'
      raise NonFiniteLossError(
        f'[{name}] step {last_step - len(window) + i + 1} gave a non-finite loss or update '
        f'({terms}), so the run stopped without saving it (last good checkpoint: {kept}); lower '
        'config.learning_rate, check the inputs, or set config.skip_nonfinite_batches=True to '
        'skip such batches.'
      )
    skipped += 1
  return finite, skipped


def _epoch_record_missing(workdir: str, step: int, steps_per_epoch: int) -> bool:
  """Whether `step` ends an epoch that metrics.jsonl has no record of (killed before writing it)."""
  if step == 0 or step % steps_per_epoch:
    return False
  epochs = {r['epoch'] for r in metrics_io.read_metrics(workdir)}
  missing = np.int32(step // steps_per_epoch not in epochs)
  if jax.process_count() > 1:  # Evaluation is collective: every process must agree.
    from jax.experimental import multihost_utils

    missing = multihost_utils.broadcast_one_to_all(missing)
  return bool(missing)


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> dict[str, Any]:
  """Trains `config.model` on `config.dataset`, resuming from `workdir`, and evaluates it.

  Writes into `workdir` (process 0 only): config.json, metrics.jsonl (one line per epoch),
  TensorBoard events, and at the end model.msgpack/model.json (the exported model) and
  result.json; every process takes part in the orbax checkpoints. Running the same command again
  resumes from the latest good checkpoint; a finished run returns its saved result. The config
  is checked (and the teacher and data loaded) before anything is written; a workdir that holds a
  run made with another config is refused unless `allow_config_change` (see
  `lpe.config.RESUME_SAFE_FIELDS` for the fields that may always change).

  A SIGTERM saves the state and raises `Preempted` (exit status 143); a non-finite step raises
  `NonFiniteLossError` without saving (or is skipped with `config.skip_nonfinite_batches`).

  Returns:
    The result: model, params, final and best test accuracy, epochs and training time.
  """
  parallel.maybe_initialize_distributed(config)
  validate_config(config, jax.device_count())
  changes = check_workdir_config(config, workdir, allow_config_change=allow_config_change)
  finished = _finished_result(workdir, config)
  if finished is not None:
    logging.info('%s already finished; returning its result.', workdir)
    return finished

  info = data.dataset_info(config.dataset)
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  distilling = bool(objectives.active(config.distill))
  # A configured teacher is also loaded without distillation, for the evaluation diagnostics
  # (agreement, neighbourhood preservation, CKA); only distilling steps run it.
  teacher, teacher_vars, teacher_meta = (
    load_teacher(config, info, dtype)
    if distilling or config.teacher.checkpoint
    else (None, None, None)
  )
  per_process = _per_process_data(config)
  train_data = data.load_split(
    config.dataset,
    config.train_split,
    config.data_dir or None,
    shard=(jax.process_index(), jax.process_count()) if per_process else None,
  )
  test_data = data.load_split(config.dataset, config.test_split, config.data_dir or None)
  # The batch each process draws its index batches for: its share of the global batch when it
  # holds only its share of the data, else the whole global batch (of which it feeds its rows).
  index_batch = config.batch_size // jax.process_count() if per_process else config.batch_size
  steps_per_epoch = data.steps_per_epoch(len(train_data), index_batch)
  if per_process:  # Shares differ by at most one example: every process takes the fewest steps.
    steps = multihost_utils.process_allgather(np.int32(steps_per_epoch))
    steps_per_epoch = int(np.min(steps))
  if config.steps_per_epoch_limit:
    steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch_limit)
  total_steps = steps_per_epoch * config.num_epochs

  place = _Placement(config.parallelism)
  sync_bn = config.parallelism == 'pmap' and config.sync_batch_stats
  student = models.build(
    config.model,
    info.num_classes,
    dtype=dtype,
    bn_axis_name=parallel.AXIS if sync_bn else None,
    conv_impl=conv_impl(config),
  )
  eval_model = student.clone(bn_axis_name=None)
  if teacher is not None:
    x = jnp.zeros((1, *info.image_shape))
    features = lambda m: jax.eval_shape(lambda: m.apply(m.init(jax.random.key(0), x), x))[1]
    objectives.check_features(config.distill, features(student), features(teacher))
  # What the devices hold for the whole run: the split (device-resident input) and the teacher's
  # outputs (config.teacher.cache_outputs); each step gathers its rows of them by index. Made
  # before any write, since the cache may refuse its size.
  resident = {}
  if input_path(config, train_data) == 'device':
    resident.update(images=train_data.images, labels=train_data.labels)
  if distilling and config.teacher.cache_outputs:
    resident['teacher'] = teacher_outputs_cache(
      teacher,
      teacher_vars,
      train_data,
      info=info,
      distill=config.distill,
      batch_size=config.eval_batch_size,
    )
  resident = place.resident(resident) if resident else None
  cached_teacher = resident is not None and 'teacher' in resident
  state = create_train_state(
    student, config, jax.random.key(config.seed), info.image_shape, steps_per_epoch
  )
  state = jax.device_put(state, place.replicated)

  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
  manager = checkpoint.checkpoint_manager(workdir, max_to_keep=config.keep_checkpoints)
  restored = checkpoint.restore_latest(manager, state)
  if restored is not None:
    state = restored
    logging.info('Resumed %s from step %d.', workdir, int(state.step))
    if is_main:
      print(f'Resuming {workdir} from step {int(state.step)}.', flush=True)
  if is_main:
    if changes:
      print(f'{workdir}: continuing with a changed config: {"; ".join(changes)}.', flush=True)
    _write_config(config, workdir, changes)

  step_fn = place.compile(
    functools.partial(
      train_step,
      student=student,
      teacher=teacher if distilling else None,
      info=info,
      distill=dict(config.distill),
      augment=config.augment,
      seed=config.seed,
      skip_nonfinite=config.skip_nonfinite_batches,
    )
  )
  eval_teacher = None
  if teacher_vars is not None:
    teacher_vars = jax.device_put(teacher_vars, place.replicated)
    eval_teacher = (teacher, teacher_vars)
    # With cached outputs the step never reads the teacher's variables.
    teacher_vars = place.state(teacher_vars) if distilling and not cached_teacher else None
  rows = slice(None) if per_process else parallel.process_rows(config.batch_size)
  take = place.compile_take()

  def batch(index):
    """The step's inputs for the examples `index` (the global batch's indices)."""
    local = index[rows]
    gathered = take(resident, place.batch(local)) if resident else {}
    if 'images' in gathered:
      images, labels = gathered['images'], gathered['labels']
    else:
      images, labels = place.batch((train_data.images[local], train_data.labels[local]))
    return images, labels, gathered.get('teacher')

  writer = metrics_io.MetricsWriter(workdir)
  name = config.name or os.path.basename(os.path.normpath(workdir))
  say = (lambda line: print(line, flush=True)) if is_main else (lambda line: None)

  def evaluate_state(canonical_state) -> dict[str, float]:
    return evaluate.evaluate(
      eval_model,
      variables_of(canonical_state),
      test_data,
      info=info,
      batch_size=config.eval_batch_size,
      sharding=place.sharded,
      teacher=eval_teacher,
      k=config.distill.k,
      feature=config.distill.feature,
    )

  def evaluation_fields(evaluation: dict[str, float]) -> dict[str, float]:
    keys = ('accuracy', 'loss', 'agreement', 'neighbourhood_preservation', 'cka')
    return {f'test_{k}': evaluation[k] for k in keys if k in evaluation}

  step = int(state.step)
  if _epoch_record_missing(workdir, step, steps_per_epoch):
    # Killed between the epoch's checkpoint and its record: the test accuracy is recomputed
    # exactly from the checkpoint; the epoch's training means and time were lost with the process.
    evaluation = evaluate_state(state)
    writer.write(
      {
        'epoch': step // steps_per_epoch,
        'step': step,
        **evaluation_fields(evaluation),
        'epoch_time_s': 0.0,
        'recovered': True,
      }
    )
    say(f'[{name}] epoch {step // steps_per_epoch} record recovered from its checkpoint.')
  stop = _Stop()
  check = functools.partial(_finite_metrics, skip=config.skip_nonfinite_batches, name=name)
  state = place.state(state)
  try:
    while step < total_steps:
      epoch, offset = divmod(step, steps_per_epoch)
      epoch_metrics, window, pending, t0, window_start = [], [], [], time.time(), step
      skipped = epoch_skipped = 0
      indices = data.train_index_batches(
        len(train_data),
        batch_size=index_batch,
        seed=config.seed,
        epoch=epoch,
        start_step=offset,
      )
      for index in indices:
        if offset >= steps_per_epoch:
          break
        state, metrics = step_fn(state, teacher_vars, *batch(index))
        step, offset = step + 1, offset + 1
        pending.append(place.metrics(metrics))
        log_now = step % config.log_every_steps == 0 or offset == steps_per_epoch
        # Read the flag once: a SIGTERM that lands later in this step is handled after the next.
        stopping = stop.requested
        save_now = step % config.checkpoint_every_steps == 0 or stopping
        if log_now or save_now:  # Every saved state has had its steps checked for NaN/Inf.
          finite, n = check(pending, step, last_saved=manager.latest_step())
          pending, skipped, epoch_skipped = [], skipped + n, epoch_skipped + n
          window.extend(finite)
          epoch_metrics.extend(finite)
        if log_now:
          rate = (step - window_start) * config.batch_size / (time.time() - t0)
          eta = (total_steps - step) * config.batch_size / rate
          means = metrics_io.mean_metrics(window)
          say(
            _progress_line(name, epoch, offset, steps_per_epoch, config, means, rate, eta, skipped)
          )
          window, skipped = [], 0
        if save_now:
          checkpoint.save_state(manager, step, place.canonical(state))
        if stopping:
          manager.wait_until_finished()
          say(f'[{name}] SIGTERM: saved step {step}; run the same command to resume.')
          raise Preempted()
      if pending:  # Only when the data ran out before steps_per_epoch: check before saving.
        finite, n = check(pending, step, last_saved=manager.latest_step())
        pending, epoch_skipped = [], epoch_skipped + n
        epoch_metrics.extend(finite)
      train_time = time.time() - t0
      checkpoint.save_state(manager, step, place.canonical(state))
      evaluation = evaluate_state(place.canonical(state))
      record = {
        'epoch': epoch + 1,
        'step': step,
        **{f'train_{k}': v for k, v in metrics_io.mean_metrics(epoch_metrics).items()},
        **evaluation_fields(evaluation),
        'epoch_time_s': train_time,
      }
      if config.skip_nonfinite_batches:
        record['skipped_batches'] = epoch_skipped
      writer.write(record)
      say(
        f'[{name}] epoch {epoch + 1}/{config.num_epochs} test accuracy '
        f'{100 * evaluation["accuracy"]:.2f}%'
      )
  finally:
    stop.close()
    manager.wait_until_finished()
    writer.close()

  state = place.canonical(state)
  history = metrics_io.read_metrics(workdir) if is_main else []
  accuracies = [r['test_accuracy'] for r in history] or [float('nan')]
  result = {
    'name': name,
    'model': config.model,
    'dataset': config.dataset,
    'num_classes': info.num_classes,
    'params': count_params(state.params),
    'extra_params': count_params(state.aux_params),
    'objective': objectives.describe(config.distill),
    'num_epochs': config.num_epochs,
    'test_accuracy': accuracies[-1],
    'best_test_accuracy': max(accuracies),
    'train_time_s': sum(r['epoch_time_s'] for r in history),
    'skipped_batches': sum(r.get('skipped_batches', 0) for r in history),
    'teacher': teacher_meta and {k: teacher_meta.get(k) for k in ('model', 'test_accuracy')},
  }
  if is_main:
    checkpoint.export_variables(
      os.path.join(workdir, checkpoint.EXPORT_NAME),
      variables_of(state),
      {k: result[k] for k in ('model', 'dataset', 'num_classes', 'params', 'test_accuracy')},
    )
    with open(os.path.join(workdir, 'result.json'), 'w') as f:
      json.dump(result, f, indent=2)
  return result
