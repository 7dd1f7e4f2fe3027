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

from lpe import checkpoint, data, evaluate, losses, metrics_io, models

Batch = tuple[jax.Array, jax.Array]


class TrainState(train_state.TrainState):
  """The student's state: params and optimizer state (from flax) plus BatchNorm statistics."""

  batch_stats: Any = None


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
  """A fresh train state for `model` on images of `image_shape`."""
  variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  return TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    batch_stats=variables.get('batch_stats', {}),
    tx=make_optimizer(config, steps_per_epoch),
  )


def augment_cifar(rng: jax.Array, images: jax.Array) -> jax.Array:
  """Random 4-pixel-padded crop and horizontal flip, per image (torchvision's CIFAR recipe)."""
  n, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  crop_rng, flip_rng = jax.random.split(rng)
  offsets = jax.random.randint(crop_rng, (n, 2), 0, 9)
  flips = jax.random.bernoulli(flip_rng, 0.5, (n,))

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
  *,
  student,
  teacher,
  info: data.DatasetInfo,
  distill: Mapping[str, Any],
  augment: str,
  seed: int,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on CE + lp_weight * LP + kd_weight * KD for the student.

  Args:
    state: The student's state.
    teacher_variables: The teacher's variables (None when not distilling); never differentiated.
    images: uint8 `[n, H, W, C]`, the global batch.
    labels: int32 `[n]`.
    student, teacher: The Flax modules (teacher None when not distilling).
    info: The dataset's normalisation constants.
    distill: Static hyper-parameters: lp_weight, k, sigma2, feature, kd_weight, kd_temperature.
    augment: 'none' or 'cifar'.
    seed: Base seed; the augmentation rng is `fold_in(key(seed), step)`, so a resumed run draws
      the same augmentations.

  Returns:
    The new state and scalar metrics: loss, ce, lp, kd, accuracy, grad_norm, param_norm.
  """
  if augment == 'cifar':
    images = augment_cifar(jax.random.fold_in(jax.random.key(seed), state.step), images)
  x = data.preprocess(images, info)
  if teacher is not None:
    t_logits, t_features = teacher.apply(teacher_variables, x, train=False)
    t_logits, t_features = jax.lax.stop_gradient((t_logits, t_features))

  def loss_fn(params):
    mutable = ['batch_stats'] if state.batch_stats else False
    out = student.apply(_variables(params, state.batch_stats), x, train=True, mutable=mutable)
    (logits, features), new_vars = out if mutable else (out, {})
    terms = {'ce': optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()}
    if distill['lp_weight']:
      terms['lp'] = losses.locality_preserving_loss(
        features[distill['feature']],
        t_features[distill['feature']],
        k=distill['k'],
        sigma2=distill['sigma2'],
      ).mean()
    if distill['kd_weight']:
      terms['kd'] = losses.kd_loss(logits, t_logits, temperature=distill['kd_temperature']).mean()
    loss = (
      terms['ce']
      + distill['lp_weight'] * terms.get('lp', 0.0)
      + distill['kd_weight'] * terms.get('kd', 0.0)
    )
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, (terms, accuracy, new_vars.get('batch_stats', state.batch_stats))

  (loss, (terms, accuracy, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state.params
  )
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = dict(
    terms,
    loss=loss,
    accuracy=accuracy,
    grad_norm=optax.tree.norm(grads),
    param_norm=optax.tree.norm(new_state.params),
  )
  return new_state, metrics


def count_params(params: Any) -> int:
  """The number of trainable parameters."""
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def load_teacher(config: ml_collections.ConfigDict, info: data.DatasetInfo, dtype=jnp.float32):
  """Builds the teacher module and loads its exported variables, checking they fit."""
  path = config.teacher.checkpoint
  if not path:
    raise ValueError(
      'Distillation is on (distill.lp_weight or distill.kd_weight > 0) but '
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
  data.dataset_info(config.dataset)
  if config.model not in models.names():
    models.build(config.model, 1)  # Raises the error that lists the valid names.
  for key in ('num_epochs', 'batch_size', 'eval_batch_size'):
    if not isinstance(config[key], int) or config[key] < 1:
      raise ValueError(f'config.{key} must be a positive integer, got {config[key]!r}.')
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] % num_devices:
      raise ValueError(
        f'config.{key}={config[key]} does not divide over {num_devices} devices; use a multiple '
        f'of {num_devices}.'
      )
  d = config.distill
  if d.lp_weight < 0 or d.kd_weight < 0:
    raise ValueError('config.distill.lp_weight and kd_weight must be >= 0.')
  if d.lp_weight and not 1 <= d.k < config.batch_size:
    raise ValueError(
      f'config.distill.k={d.k} must be at least 1 and smaller than the global batch '
      f'({config.batch_size}); lower k or raise batch_size.'
    )
  if d.sigma2 is not None and d.sigma2 <= 0:
    raise ValueError(f'config.distill.sigma2 must be positive or None, got {d.sigma2}.')
  if d.kd_weight and d.kd_temperature <= 0:
    raise ValueError(f'config.distill.kd_temperature must be positive, got {d.kd_temperature}.')
  if config.augment not in ('none', 'cifar'):
    raise ValueError(f'config.augment={config.augment!r} is unknown; use none or cifar.')


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config.model` on `config.dataset`, resuming from `workdir`, and evaluates it.

  Writes into `workdir`: config.json, metrics.jsonl (one line per epoch), TensorBoard events,
  orbax checkpoints, and at the end model.msgpack/model.json (the exported model) and
  result.json. Running the same command again resumes from the latest checkpoint; a finished run
  returns its saved result.

  Returns:
    The result: model, params, final and best test accuracy, epochs and training time.
  """
  devices = jax.devices()
  validate_config(config, len(devices))
  result_path = os.path.join(workdir, 'result.json')
  if os.path.exists(result_path) and os.path.exists(os.path.join(workdir, checkpoint.EXPORT_NAME)):
    with open(result_path) as f:
      result = json.load(f)
    if result.get('num_epochs') == config.num_epochs:
      logging.info('%s already finished; returning its result.', workdir)
      return result

  info = data.dataset_info(config.dataset)
  distilling = bool(config.distill.lp_weight or config.distill.kd_weight)
  teacher, teacher_vars, teacher_meta = (
    load_teacher(config, info) if distilling else (None, None, None)
  )
  train_data = data.load_split(config.dataset, config.train_split, config.data_dir or None)
  test_data = data.load_split(config.dataset, config.test_split, config.data_dir or None)
  steps_per_epoch = data.steps_per_epoch(len(train_data), config.batch_size)
  if config.steps_per_epoch_limit:
    steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch_limit)
  total_steps = steps_per_epoch * config.num_epochs

  student = models.build(config.model, info.num_classes)
  mesh = jax.sharding.Mesh(np.array(devices), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  state = create_train_state(
    student, config, jax.random.key(config.seed), info.image_shape, steps_per_epoch
  )
  state = jax.device_put(state, replicated)
  if teacher_vars is not None:
    teacher_vars = jax.device_put(teacher_vars, replicated)

  os.makedirs(workdir, exist_ok=True)
  manager = checkpoint.checkpoint_manager(workdir, max_to_keep=config.keep_checkpoints)
  restored = checkpoint.restore_latest(manager, state)
  if restored is not None:
    state = restored
    logging.info('Resumed %s from step %d.', workdir, int(state.step))
    print(f'Resuming {workdir} from step {int(state.step)}.', flush=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))

  step_fn = jax.jit(
    functools.partial(
      train_step,
      student=student,
      teacher=teacher,
      info=info,
      distill=dict(config.distill),
      augment=config.augment,
      seed=config.seed,
    ),
    donate_argnums=(0,),
  )
  writer = metrics_io.MetricsWriter(workdir)
  stop = _Stop()
  name = config.name or os.path.basename(os.path.normpath(workdir))
  step = int(state.step)
  try:
    while step < total_steps:
      epoch, offset = divmod(step, steps_per_epoch)
      epoch_metrics, window, t0, window_start = [], [], time.time(), step
      batches = data.train_batches(
        train_data,
        batch_size=config.batch_size,
        seed=config.seed,
        epoch=epoch,
        start_step=offset,
      )
      for images, labels in batches:
        if offset >= steps_per_epoch:
          break
        images = jax.device_put(images, batch_sharding)
        labels = jax.device_put(labels, batch_sharding)
        state, metrics = step_fn(state, teacher_vars, images, labels)
        step, offset = step + 1, offset + 1
        window.append(metrics)
        if step % config.log_every_steps == 0 or offset == steps_per_epoch:
          window = jax.device_get(window)
          epoch_metrics.extend(window)
          rate = (step - window_start) * config.batch_size / (time.time() - t0)
          eta = (total_steps - step) * config.batch_size / rate
          means = metrics_io.mean_metrics(window)
          terms = ' '.join(
            f'{k} {means[k]:.4f}' for k in ('loss', 'ce', 'lp', 'kd', 'accuracy') if k in means
          )
          print(
            f'[{name}] epoch {epoch + 1}/{config.num_epochs} step {offset}/{steps_per_epoch} '
            f'{terms} | {rate:.0f} img/s | eta {_format_duration(eta)}',
            flush=True,
          )
          window = []
        if step % config.checkpoint_every_steps == 0:
          checkpoint.save_state(manager, step, state)
        if stop.requested:
          break
      if stop.requested:
        checkpoint.save_state(manager, step, state)
        manager.wait_until_finished()
        print(
          f'[{name}] SIGTERM: saved step {step}; run the same command to resume.',
          flush=True,
        )
        raise SystemExit(143)
      checkpoint.save_state(manager, step, state)
      evaluation = evaluate.evaluate(
        student,
        _variables(state.params, state.batch_stats),
        test_data,
        info=info,
        batch_size=config.eval_batch_size,
        sharding=batch_sharding,
      )
      record = {
        'epoch': epoch + 1,
        'step': step,
        **{f'train_{k}': v for k, v in metrics_io.mean_metrics(epoch_metrics).items()},
        'test_accuracy': evaluation['accuracy'],
        'test_loss': evaluation['loss'],
        'epoch_time_s': time.time() - t0,
      }
      writer.write(record)
      print(
        f'[{name}] epoch {epoch + 1}/{config.num_epochs} test accuracy '
        f'{100 * evaluation["accuracy"]:.2f}%',
        flush=True,
      )
  finally:
    stop.close()
    manager.wait_until_finished()
    writer.close()

  history = metrics_io.read_metrics(workdir)
  accuracies = [r['test_accuracy'] for r in history]
  result = {
    'name': name,
    'model': config.model,
    'dataset': config.dataset,
    'num_classes': info.num_classes,
    'params': count_params(state.params),
    'num_epochs': config.num_epochs,
    'test_accuracy': accuracies[-1],
    'best_test_accuracy': max(accuracies),
    'train_time_s': sum(r['epoch_time_s'] for r in history),
    'teacher': teacher_meta and {k: teacher_meta.get(k) for k in ('model', 'test_accuracy')},
  }
  checkpoint.export_variables(
    os.path.join(workdir, checkpoint.EXPORT_NAME),
    _variables(state.params, state.batch_stats),
    {k: result[k] for k in ('model', 'dataset', 'num_classes', 'params', 'test_accuracy')},
  )
  with open(result_path, 'w') as f:
    json.dump(result, f, indent=2)
  return result
