"""The student objective: CE plus any weighted combination of distillation terms.

`config.distill` names a weight per method (0 turns it off) and the features each one reads; the
cross-entropy has its own weight, `ce_weight` (1 by default; CRD's KD baseline uses 0.1 CE + 0.9
KD). The methods, what each reads and how its loss is called are the entries of
`lpe.methods.METHODS`; every term is built from its entry here:

| reads | term |
|---|---|
| `'lp'` | the locality-preserving loss in the form `lp_graph` and `student_scale` name (below) |
| `'logits'` | the loss of both nets' logits (KD), with the entry's settings as arguments |
| `'feature'` | the loss of both nets' `<name>_feature`; through a trainable regressor for FitNet |
| `'features'` | the sum over `<name>_features` of each feature's loss (AT) |

Relational terms (LP, and the entries marked so: SP, RKD, PKT) are taken over the global batch:
under `pmap` their inputs are gathered over the device axis, so they do not depend on the device
count; the others are means of per-example losses. With `lp_graph` 'neighbours' or 'bank', LP
keeps the neighbourhoods of the teacher's kNN graph over the whole training split instead
(`lpe.losses.graph`): the step then passes the batch's rows of that graph (`graph`: example
`ids`, graph `indices` and `weights`, and for 'bank' the bank's rows of each neighbour,
`bank_neighbours`).

A padded batch (the last of an epoch with `config.last_batch='masked'`) comes with `valid`, its
rows that hold examples: every term is then the term of those rows alone (per-example terms
average over them, relational ones and LP are taken on them, FitNet's regressor normalises by
their statistics).
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from lpe import losses
from lpe.methods import LABELS, METHODS

__all__ = ['LABELS', 'METHODS']


def active(distill: Mapping[str, Any]) -> tuple[str, ...]:
  """The methods whose weight is non-zero, in `METHODS` order."""
  return tuple(m for m in METHODS if distill.get(f'{m}_weight', 0.0))


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises a ValueError for an objective that cannot train on `num_devices` devices: no loss at
  all, LP's k not below the per-device batch, or LP's whole-split graph set up wrongly."""
  d = config.distill
  per_device = config.batch_size // num_devices
  if d.ce_weight == 0 and not active(d):
    raise ValueError(
      'config.distill.ce_weight=0 with no distillation weight leaves no loss to train on; set '
      'ce_weight > 0 or a distill.*_weight.'
    )
  if d.lp_weight and not 1 <= d.k < per_device:
    raise ValueError(
      f'config.distill.k={d.k} must be at least 1 and smaller than the per-device batch '
      f'({per_device * num_devices} over {num_devices} devices = {per_device}); lower k or raise '
      'batch_size.'
    )
  _check_graph(d, per_device * num_devices)


def _check_graph(d: ml_collections.ConfigDict, batch_size: int) -> None:
  if d.lp_graph == 'batch':
    return
  # With neighbours added on top, lp_weight=0 is the sampler's control row.
  control = d.lp_graph == 'neighbours' and d.neighbour_batches == 'added'
  if not d.lp_weight and not control:
    raise ValueError(
      f'config.distill.lp_graph={d.lp_graph!r} sets how LP sees neighbours, but '
      'config.distill.lp_weight is 0; set lp_weight > 0 or lp_graph=batch (or, for the '
      "sampler's control row, lp_graph=neighbours with neighbour_batches=added)."
    )
  graph_k = d.graph_k or d.k  # Both >= 1 or 0 (`lpe.config.DOMAINS`).
  if d.lp_graph == 'neighbours':
    m = d.graph_neighbours
    within = d.neighbour_batches == 'within'
    if not 1 <= m <= graph_k or (within and batch_size % (1 + m)):
      raise ValueError(
        f'config.distill.graph_neighbours={m} must be between 1 and the graph k ({graph_k}), and '
        f'1 + {m} must divide config.batch_size={batch_size} (each anchor comes with {m} '
        'neighbours); change one of them.'
      )


def needs_teacher(distill: Mapping[str, Any]) -> bool:
  """Whether the step needs the teacher's outputs: any active term but LP over the whole
  split's graph (which reads the graph, computed once before training)."""
  graph_lp = distill.get('lp_graph', 'batch') != 'batch'
  return any(m != 'lp' or not graph_lp for m in active(distill))


def feature_names(distill: Mapping[str, Any]) -> set[str]:
  """The feature-dict keys the active terms read (from both nets), and the one the whole split's
  graph is built from (`lp_graph` other than 'batch', also for the sampler's control row)."""
  names = set()
  if distill.get('lp_graph', 'batch') != 'batch':
    names.add(distill['feature'])
  for name in active(distill):
    names.update(_read_features(name, distill))
  return names


def _read_features(name: str, distill: Mapping[str, Any]) -> tuple[str, ...]:
  """The feature-dict keys method `name` reads (none for the logits)."""
  reads = METHODS[name].reads
  if reads == 'lp':
    return (distill['feature'],)
  if reads == 'feature':
    return (distill[f'{name}_feature'],)
  if reads == 'features':
    return tuple(distill[f'{name}_features'])
  return ()


def check_features(distill: Mapping[str, Any], s_features: Mapping, t_features: Mapping) -> None:
  """Raises a ValueError naming a configured feature that either net does not produce."""
  for name in sorted(feature_names(distill)):
    for who, features in (('student', s_features), ('teacher', t_features)):
      if name not in features:
        raise ValueError(
          f'The {who} has no feature {name!r} (it has: {", ".join(sorted(features))}); set the '
          'config.distill feature fields to names both models produce.'
        )


def describe(distill: Mapping[str, Any]) -> str:
  """A short name for the objective, e.g. 'CE + 0.1 LP + 1 KD' ('LP-bank' for LP over the whole
  split's graph with a memory bank, 'LP-neighbours' with neighbour-aware batches; '(l2)' or
  '(mean)' for a scale-invariant LP; '+ neighbour batches' for the sampler alone)."""
  ce_weight = distill.get('ce_weight', 1.0)
  ce = 'CE' if ce_weight == 1 else f'{ce_weight:g} CE'
  graph = distill.get('lp_graph', 'batch')
  scale = distill.get('student_scale', 'none')

  def label(method):
    if method != 'lp':
      return LABELS[method]
    name = 'LP' if graph == 'batch' else f'LP-{graph}'
    return name if scale == 'none' else f'{name} ({scale})'

  parts = [ce] + [f'{distill[m + "_weight"]:g} {label(m)}' for m in active(distill)]
  if graph == 'neighbours' and not distill.get('lp_weight'):
    parts.append('neighbour batches')
  return ' + '.join(parts)


def init_aux_params(
  distill: Mapping[str, Any], rng: jax.Array, s_features: Mapping, t_features: Mapping
) -> dict[str, Any]:
  """Trainable parameters the terms need besides the student's (FitNet's regressor), or {}."""
  aux = {}
  for name in active(distill):
    if METHODS[name].regressor:
      feature = distill[f'{name}_feature']
      regressor = losses.FitNetRegressor(features=t_features[feature].shape[-1])
      hint = jnp.zeros((1, *s_features[feature].shape[1:]))
      aux[f'{name}_regressor'] = regressor.init(rng, hint)['params']
  return aux


def row_mean(
  values: jax.Array, rows: jax.Array | None = None, *, axis_name: str | None = None
) -> jax.Array:
  """The mean of per-example `values` over all rows, or over the rows where `rows` is True (the
  anchors of batches with graph neighbours added on top, a padded batch's valid rows).

  With `axis_name` (under `pmap`, where the devices may hold different numbers of such rows)
  the sum is divided by the mean count over the devices instead of this device's count, so the
  mean over the devices (the step's `pmean`) is the mean over all of them."""
  values = jnp.asarray(values, jnp.float32)
  if rows is None:
    return values.mean()
  count = jnp.sum(rows)
  if axis_name is not None:
    count = jax.lax.pmean(count.astype(jnp.float32), axis_name)
  return jnp.sum(jnp.where(rows, values, 0.0)) / jnp.where(count > 0, count, 1)


def example_mean(
  anchors: jax.Array | None, valid: jax.Array | None, axis_name: str | None = None
) -> Callable[[jax.Array], jax.Array]:
  """How the step averages per-example values (CE, accuracy, the per-example terms): over
  every row, its `anchors` (the same number on every device), and its `valid` rows (a padded
  batch; their number differs between devices, so under `axis_name` the count is global)."""
  if valid is None:
    return lambda values: row_mean(values, anchors)
  rows = valid if anchors is None else anchors & valid
  return lambda values: row_mean(values, rows, axis_name=axis_name)


def _gather(x: jax.Array, axis_name: str | None) -> jax.Array:
  return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def distillation_terms(
  distill: Mapping[str, Any],
  s_logits: jax.Array,
  s_features: Mapping[str, jax.Array],
  t_logits: jax.Array,
  t_features: Mapping[str, jax.Array],
  aux_params: Mapping[str, Any],
  *,
  graph: Mapping[str, jax.Array] | None = None,
  axis_name: str | None = None,
  anchors: jax.Array | None = None,
  valid: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """The active distillation terms, each a scalar batch loss (unweighted).

  Per-example terms are means over this device's rows (the caller averages over devices), or
  over its `anchors` rows when given (batches with graph neighbours added on top); relational
  terms are computed on the gathered global batch, the same value on every device. `graph` holds
  the batch's rows of the whole split's teacher graph when `lp_graph` is not 'batch'. `valid`
  (`[n]` bool, this device's rows of a padded batch) restricts every term to those rows
  (`lp_graph` 'batch' only).
  """
  terms = {}
  mean = example_mean(anchors, valid, axis_name)
  gather = lambda x: _gather(x, axis_name)
  masked = {} if valid is None else {'where': gather(valid)}
  for name in active(distill):
    method = METHODS[name]
    if method.reads == 'lp':
      terms[name] = mean(_locality(distill, s_features, t_features, graph, axis_name, valid))
      continue
    fn = getattr(losses, method.loss)
    kwargs = {argument: distill[setting] for argument, setting in method.arguments.items()}
    if method.reads == 'logits':
      pairs = [(s_logits, t_logits)]
    else:
      pairs = [(s_features[f], t_features[f]) for f in _read_features(name, distill)]
    if method.regressor:
      regressor = losses.FitNetRegressor(features=pairs[0][1].shape[-1])
      hint = regressor.apply({'params': aux_params[f'{name}_regressor']}, pairs[0][0], valid)
      pairs = [(hint, pairs[0][1])]
    if method.relational:
      terms[name] = sum(fn(gather(s), gather(t), **masked, **kwargs) for s, t in pairs)
    else:
      terms[name] = sum(mean(fn(s, t, **kwargs)) for s, t in pairs)
  return terms


def _locality(distill, s_features, t_features, graph, axis_name, valid=None) -> jax.Array:
  """The per-example LP loss over the neighbourhoods `distill['lp_graph']` names (with `valid`,
  over those rows of the batch: 'batch' only)."""
  student = s_features[distill['feature']]
  mode = distill.get('lp_graph', 'batch')
  scale = distill.get('student_scale', 'none')
  if mode == 'neighbours':
    return losses.graph_batch_locality_loss(
      student,
      graph['ids'],
      graph['indices'],
      graph['weights'],
      axis_name=axis_name,
      student_scale=scale,
    )
  if mode == 'bank':
    return losses.memory_bank_locality_loss(
      student,
      graph['bank_neighbours'],
      graph['weights'],
      student_scale=scale,
      bank_moments=graph.get('bank_moments'),
      axis_name=axis_name,
    )
  return losses.locality_preserving_loss(
    student,
    t_features[distill['feature']],
    k=distill['k'],
    sigma2=distill['sigma2'],
    sigma2_scale=distill.get('sigma2_scale', 1.0),
    axis_name=axis_name,
    block_size=distill.get('knn_block_size'),
    student_scale=scale,
    **({} if valid is None else {'where': valid}),
  )


def total_loss(
  distill: Mapping[str, Any],
  ce: jax.Array,
  terms: Mapping[str, jax.Array],
  *,
  step: jax.Array | int | None = None,
) -> jax.Array:
  """`ce_weight` (default 1) times CE plus each term times its weight; LP's weight rises
  linearly from 0 over the first `lp_warmup_steps` steps (`step` counts from 0; the step factory
  sets it from `lp_warmup_epochs`)."""
  weights = {method: distill[f'{method}_weight'] for method in terms}
  warmup = distill.get('lp_warmup_steps', 0)
  if 'lp' in weights and warmup and step is not None:
    weights['lp'] = weights['lp'] * jnp.minimum(1.0, step / warmup)
  return distill.get('ce_weight', 1.0) * ce + sum(
    weights[method] * value for method, value in terms.items()
  )
