"""The student's train state: parameters, BatchNorm statistics, optimizer and trainable extras.

The student is the only thing differentiated and saved; the teacher never enters the state.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from lpe import data, evaluate, models, objectives, teacher


class TrainState(train_state.TrainState):
  """The student's state: params, BatchNorm statistics and optimizer state, plus `aux_params`.

  `aux_params` are the trainable parameters of distillation terms (FitNet's regressor): optimised
  with the student, checkpointed with it for resume, but not part of the exported student. `bank`
  is the memory bank of student embeddings (`[N, d]`, `distill.lp_graph='bank'`), or None:
  never differentiated, checkpointed for exact resume, not exported.
  """

  batch_stats: Any = None
  aux_params: Any = None
  bank: Any = None

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


def _schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  if config.lr_schedule == 'constant':
    return optax.constant_schedule(config.learning_rate)
  if config.lr_schedule == 'cosine':
    return optax.cosine_decay_schedule(
      config.learning_rate, max(config.num_epochs * steps_per_epoch, 1)
    )
  if config.lr_schedule == 'step':
    boundaries = {int(e * steps_per_epoch): config.lr_decay_factor for e in config.lr_decay_epochs}
    return optax.piecewise_constant_schedule(config.learning_rate, boundaries)
  raise ValueError(
    f'config.lr_schedule={config.lr_schedule!r} is unknown; use constant, cosine or step.'
  )


def make_optimizer(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
  """The optimizer and learning-rate schedule that `config` names."""
  schedule = _schedule(config, steps_per_epoch)
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
    num_classes = data.info_of(config).num_classes
    t_module = models.build(config.teacher.model, num_classes)
    s_features, t_features = (teacher.feature_shapes(m, image_shape) for m in (model, t_module))
    aux_params = objectives.init_aux_params(config.distill, aux_rng, s_features, t_features)
  return TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    batch_stats=variables.get('batch_stats', {}),
    aux_params=aux_params,
    tx=make_optimizer(config, steps_per_epoch),
  )


def embeddings(
  model,
  variables: dict[str, Any],
  split: data.Split,
  *,
  info,
  feature: str,
  batch_size: int,
  batch_statistics: bool = False,
) -> np.ndarray:
  """`model`'s `feature` `[N, d]` (float32) for every example of `split`: what a memory bank
  (`distill.lp_graph='bank'`) starts from.

  In inference mode by default. With `batch_statistics`, BatchNorm normalises each batch of
  `batch_size` by its own statistics, as the training step does (the running statistics are
  neither used nor changed); the last batch is completed with the split's first examples, whose
  rows are dropped, so every batch has `batch_size` rows. Models without BatchNorm give the same
  values either way. One pass over the split (`lpe.evaluate.forward_split`).
  """
  train = batch_statistics and bool(variables.get('batch_stats'))

  @jax.jit
  def forward(variables, images):
    x = data.preprocess(images, info)
    if train:
      (_, features), _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
    else:
      _, features = model.apply(variables, x, train=False)
    return features[feature].astype(jnp.float32)

  return evaluate.forward_split(
    lambda images, labels, mask: forward(variables, images), split, batch_size, wrap=train
  )


def variables_of(state: TrainState) -> dict[str, Any]:
  """The `{params, batch_stats}` variables of a train state, as `module.apply` takes them."""
  return make_variables(state.params, state.batch_stats)


def make_variables(params: Any, batch_stats: Any) -> dict[str, Any]:
  """`{params, batch_stats}`, without an empty `batch_stats` (models without BatchNorm)."""
  return {'params': params, 'batch_stats': batch_stats} if batch_stats else {'params': params}


def count_params(params: Any) -> int:
  """The number of trainable parameters."""
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))
