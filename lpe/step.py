"""The distillation train step: CE plus the configured terms, differentiating only the student.

`make_train_step(config, student, teacher, info)` is the one way to build the step; the trainer,
the tests and the benchmarks all use it and compile it with `parallel.Placement.compile` (or
`jax.jit` on one device).
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import optax

from lpe import augment, data, losses, objectives, parallel
from lpe.models import layers
from lpe.state import TrainState, make_variables

Metrics = dict[str, jax.Array]


def train_step(
  state: TrainState,
  teacher_variables: Mapping[str, Any] | None,
  images: jax.Array,
  labels: jax.Array,
  teacher_outputs: tuple[jax.Array, Mapping[str, jax.Array]] | None = None,
  graph: Mapping[str, jax.Array] | None = None,
  valid: jax.Array | None = None,
  *,
  student: nn.Module,
  teacher: nn.Module | None,
  info: data.DatasetInfo,
  distill: Mapping[str, Any],
  augmentation: str,
  seed: int,
  skip_nonfinite: bool = False,
  axis_name: str | None = None,
) -> tuple[TrainState, Metrics]:
  """One optimizer step of the student on CE plus the weighted terms of `distill`.

  Args:
    state: The student's state.
    teacher_variables: The teacher's variables (None when not distilling, or when
      `teacher_outputs` are given); never differentiated.
    images: uint8 `[n, H, W, C]`: the global batch, or this device's rows under `axis_name`.
    labels: int32 `[n]`.
    teacher_outputs: The teacher's `(logits, features)` for these rows, cached ahead of training
      (`lpe.teacher.outputs_cache`; only without augmentation), or None to run the teacher here.
    graph: With `distill['lp_graph']` 'neighbours' or 'bank', these rows' example `ids` `[n]` and
      their rows of the whole split's teacher graph (`indices`, `weights`, `[n, k]`;
      `lpe.feed.Feed`); None otherwise. For 'bank' the state's memory bank supplies each
      neighbour's embedding and is refreshed with these rows' embeddings after the step.
    valid: For a padded batch (the last of an epoch with `config.last_batch='masked'`), bool
      `[n]`: the rows that hold its examples. CE, accuracy and every distillation term are then
      those rows' alone, and BatchNorm's batch statistics are over them only
      (`student_forward`); the other rows (padding) change nothing. None: every row counts.
    student, teacher: The Flax modules (teacher None when not distilling).
    info: The dataset's normalisation constants.
    distill: Static hyper-parameters of the objective (`config.distill`; see lpe.objectives).
    augmentation: One of `lpe.augment.AUGMENTATIONS`.
    seed: Base seed; the augmentation rng is `fold_in(key(seed), step)`, so a resumed run draws
      the same augmentations.
    skip_nonfinite: When the loss, gradient norm or new parameter norm is not finite, keep the
      old params, optimizer state and BatchNorm statistics (the step count still advances, so the
      data order and augmentation stay those of the uninterrupted run).
    axis_name: Under `pmap`, the device axis: the LP loss gathers over it and gradients, metrics
      and BatchNorm statistics are averaged over it.

  Returns:
    The new state (its bank refreshed, for 'bank') and scalar metrics: loss, ce, the active
    terms (lp, kd, ...), accuracy, grad_norm, param_norm, and finite (1.0, or 0.0 when this
    step's loss or update is not finite).
  """
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  x = data.preprocess(augment.augment(augmentation, rng, images, axis_name=axis_name), info)
  if teacher is not None and teacher_outputs is None:
    teacher_outputs = teacher.apply(teacher_variables, x, train=False)
  t_logits, t_features = None, {}
  if teacher_outputs is not None:
    t_logits, t_features = jax.lax.stop_gradient(teacher_outputs)
  if state.bank is not None:  # Every neighbour's last embedding; the bank gets no gradient.
    graph = dict(graph, bank_neighbours=state.bank[graph['indices']])
    if distill.get('student_scale', 'none') == 'mean':
      graph['bank_moments'] = losses.memory_bank_moments(state.bank)
  anchors = anchor_rows(distill, labels.shape[0])
  mean = objectives.example_mean(anchors, valid, axis_name)

  def loss_fn(params, aux_params):
    mutable = ['batch_stats'] if state.batch_stats else False
    variables = make_variables(params, state.batch_stats)
    out = student_forward(student, variables, x, valid=valid, mutable=mutable)
    (logits, features), new_vars = out if mutable else (out, {})
    logits = logits.astype(jnp.float32)
    ce = mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    terms = {}
    if objectives.active(distill):
      terms = objectives.distillation_terms(
        distill,
        logits,
        features,
        t_logits,
        t_features,
        aux_params,
        graph=graph,
        axis_name=axis_name,
        anchors=anchors,
        valid=valid,
      )
    loss = objectives.total_loss(distill, ce, terms, step=state.step)
    accuracy = mean(jnp.argmax(logits, -1) == labels)
    batch_stats = new_vars.get('batch_stats', state.batch_stats)
    return loss, (dict(terms, ce=ce), accuracy, batch_stats, features.get(distill['feature']))

  (loss, (terms, accuracy, batch_stats, embedding)), (grads, aux_grads) = jax.value_and_grad(
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
  if state.bank is not None:
    bank = losses.update_memory_bank(
      state.bank, graph['ids'], embedding, momentum=distill['bank_momentum'], axis_name=axis_name
    )
    new_state = new_state.replace(bank=bank)
  metrics['grad_norm'] = optax.tree.norm(grads)
  metrics['param_norm'] = optax.tree.norm(new_state.params)
  finite = jnp.isfinite(jnp.stack([metrics[k] for k in ('loss', 'grad_norm', 'param_norm')])).all()
  if skip_nonfinite:
    new_state = _keep_if(finite, new_state, state)
  metrics['finite'] = finite.astype(jnp.float32)
  return new_state, metrics


def student_forward(
  student: nn.Module,
  variables: Mapping[str, Any],
  x: jax.Array,
  *,
  valid: jax.Array | None = None,
  mutable: Any = False,
) -> Any:
  """`student.apply(variables, x, train=True, mutable=mutable)`: the training forward pass.

  With `valid` (`[n]` bool) BatchNorm's batch statistics, and so its running averages, are over
  those rows only (`lpe.models.layers.batch_statistics_over`), as PyTorch's are over a partial
  batch's own rows. Raises a ValueError naming the modules of `variables['batch_stats']` that
  this could not reach (an NNX or hand-written BatchNorm), whose statistics would count padding.
  """
  if valid is None:
    return student.apply(variables, x, train=True, mutable=mutable)
  with layers.batch_statistics_over(valid) as reached:
    out = student.apply(variables, x, train=True, mutable=mutable)
  stats = flax.traverse_util.flatten_dict(dict(variables.get('batch_stats') or {}))
  missed = sorted({'/'.join(path[:-1]) for path in stats if tuple(path[:-1]) not in reached})
  if missed:
    raise ValueError(
      "config.last_batch='masked' takes BatchNorm's batch statistics over a padded batch's own "
      "rows in flax.linen.BatchNorm and lpe's AffineBatchNorm only, but "
      f'{type(student).__name__} keeps batch statistics in {", ".join(missed)}, which it cannot '
      'reach; use config.last_batch=drop (or those BatchNorms).'
    )
  return out


def check_masked_batch_statistics(student: nn.Module, image_shape: tuple[int, ...]) -> None:
  """Raises `student_forward`'s ValueError now, when `config.last_batch='masked'` cannot mask
  the student's BatchNorm statistics: traces (compiles and runs nothing) its forward pass on a
  padded batch of 2 rows, under the device axis a pmap student averages its statistics over."""
  one = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
  variables = jax.eval_shape(lambda x: student.init(jax.random.key(0), x, train=False), one)
  x = jax.ShapeDtypeStruct((1, *one.shape), jnp.float32)  # One device of the mapped axis.
  valid = jax.ShapeDtypeStruct((1, 2), jnp.bool_)
  mutable = ['batch_stats'] if variables.get('batch_stats') else False

  def forward(variables, x, valid):
    return student_forward(student, variables, x, valid=valid, mutable=mutable)

  jax.eval_shape(jax.vmap(forward, (None, 0, 0), axis_name=parallel.AXIS), variables, x, valid)


def anchor_rows(distill: Mapping[str, Any], rows: int) -> jax.Array | None:
  """With graph neighbours added on top of the anchors (`neighbour_batches='added'`), which of
  these `rows` are anchors (`[rows]` bool; rows `g * (1 + m)`, `lpe.sampling`), else None.

  A device's rows hold whole groups of `1 + m`, so the pattern is the same on every device."""
  if distill.get('lp_graph') != 'neighbours' or distill.get('neighbour_batches') != 'added':
    return None
  return jnp.arange(rows) % (1 + distill['graph_neighbours']) == 0


def _keep_if(finite: jax.Array, new: TrainState, old: TrainState) -> TrainState:
  """`new`, with the old params, optimizer state and statistics where `finite` is False."""
  keep = functools.partial(jax.tree.map, lambda n, o: jnp.where(finite, n, o))
  return new.replace(
    params=keep(new.params, old.params),
    opt_state=keep(new.opt_state, old.opt_state),
    aux_params=keep(new.aux_params, old.aux_params),
    batch_stats=keep(new.batch_stats, old.batch_stats),
    bank=keep(new.bank, old.bank),
  )


def make_train_step(
  config: ml_collections.ConfigDict,
  student: nn.Module,
  teacher: nn.Module | None,
  info: data.DatasetInfo,
  *,
  augmentation: str | None = None,
  steps_per_epoch: int | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
  """`train_step` with everything static bound from `config`, ready to compile.

  `augmentation` overrides `config.augment` for the step (`'none'` when the input arrives
  augmented, as streamed images do). `steps_per_epoch` turns `distill.lp_warmup_epochs` into the
  steps over which LP's weight rises (`lp_warmup_steps`); it is needed only with a warm-up.

  The result takes `(state, teacher_variables, images, labels, teacher_outputs=None,
  graph=None, valid=None)`; the teacher runs only when an active term of `config.distill` needs
  its outputs (`objectives.needs_teacher`) and they are not given. Under `pmap` bind `axis_name` too
  (`parallel.Placement.compile` does).
  """
  distill = dict(config.distill)
  if config.distill.lp_warmup_epochs:
    if not steps_per_epoch:
      raise ValueError(
        'config.distill.lp_warmup_epochs needs the steps per epoch; pass steps_per_epoch to '
        'make_train_step.'
      )
    distill['lp_warmup_steps'] = max(round(config.distill.lp_warmup_epochs * steps_per_epoch), 1)
  return functools.partial(
    train_step,
    student=student,
    teacher=teacher if objectives.needs_teacher(config.distill) else None,
    info=info,
    distill=distill,
    augmentation=config.augment if augmentation is None else augmentation,
    seed=config.seed,
    skip_nonfinite=config.skip_nonfinite_batches,
  )
