"""NNX models in the trainer: `NNXModel` gives an `nnx.Module` linen's `init`/`apply` interface.

The trainer, checkpoints, export, the teacher cache and the device placement all work on
`variables = {'params': ..., 'batch_stats': ...}` pytrees of arrays and call
`model.apply(variables, images, train=..., mutable=...)`. `NNXModel` keeps an NNX module's static
structure (its `GraphDef`) outside those pytrees and rebuilds the module from them inside each
call with `nnx.merge`, so the step stays a pure function of arrays and nothing else changes.
`nnx.Param` variables go to `'params'` and `nnx.BatchStat` to `'batch_stats'`, as plain nested
dicts keyed by attribute name (the same layout a linen model with the same submodule names has).

Registering an NNX model (`register_nnx`):

  @register_nnx('my_net')
  class MyNet(nnx.Module):
    def __init__(self, num_classes, *, rngs, dtype=jnp.float32, bn_axis_name=None,
                 conv_impl='xla'):
      ...
    def __call__(self, x, train=False):
      ...  # BatchNorm: use_running_average=not train
      return logits, {'stage1': ..., 'embedding': embedding}

The constructor takes the number of classes, `rngs` (an `nnx.Rngs` with a `params` stream) and the
keyword arguments every registered model takes (`dtype`, `bn_axis_name`, `conv_impl`, see
`registry.build`); `__call__(x, train)` returns `(logits [n, num_classes], features)` where
`features` holds `'embedding'` `[n, d]` and any intermediate maps the feature losses read.
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx

from lpe.models.registry import register


@dataclasses.dataclass(frozen=True)
class NNXModel:
  """An NNX module class behind linen's `init`/`apply`, as the registry's models are called.

  Attributes:
    module_class: `module_class(num_classes, rngs=..., **kwargs)` builds the `nnx.Module`.
    num_classes: Number of output classes.
    kwargs: The constructor's other keyword arguments, as sorted `(name, value)` pairs.
  """

  module_class: Callable[..., nnx.Module]
  num_classes: int
  kwargs: tuple[tuple[str, Any], ...] = ()

  def create(self, rng: jax.Array) -> nnx.Module:
    """A fresh `nnx.Module` with parameters drawn from `rng` (for a loop of your own)."""
    return self.module_class(self.num_classes, rngs=nnx.Rngs(params=rng), **dict(self.kwargs))

  @functools.cached_property
  def _abstract(self) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """The module's GraphDef and its Param and BatchStat states of shapes only (built once)."""
    module = nnx.eval_shape(lambda: self.create(jax.random.key(0)))
    graphdef, params, batch_stats, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
    if jax.tree.leaves(rest):
      kinds = sorted({type(v).__name__ for v in jax.tree.leaves(rest, is_leaf=_is_var)})
      raise ValueError(
        f'{self.module_class.__name__} holds state other than nnx.Param and nnx.BatchStat '
        f'({", ".join(kinds)}); keep only parameters and BatchNorm statistics in a registered '
        'NNX model.'
      )
    return graphdef, params, batch_stats

  def clone(self, **overrides: Any) -> 'NNXModel':
    """The same model with some constructor keyword arguments replaced (as linen's `clone`)."""
    return dataclasses.replace(
      self, kwargs=tuple(sorted({**dict(self.kwargs), **overrides}.items()))
    )

  def init(self, rngs: jax.Array | Mapping[str, jax.Array], x: jax.Array, train: bool = False):
    """Fresh variables `{'params', 'batch_stats'}` (no `batch_stats` without BatchNorm).

    `x` is only checked to run: an NNX module's shapes are set by its constructor.
    """
    rng = rngs['params'] if isinstance(rngs, Mapping) else rngs
    module = self.create(rng)
    _, params, batch_stats = nnx.split(module, nnx.Param, nnx.BatchStat)
    variables = {'params': nnx.to_pure_dict(params)}
    if jax.tree.leaves(batch_stats):
      variables['batch_stats'] = nnx.to_pure_dict(batch_stats)
    del train, x
    return variables

  def merge(self, variables: Mapping[str, Any]) -> nnx.Module:
    """The `nnx.Module` holding `variables` (`{'params', 'batch_stats'}` as `init` returns them,
    a checkpoint's or `lpe.checkpoint.load_variables`'s)."""
    graphdef, abstract_params, abstract_stats = self._abstract
    params = _filled(abstract_params, variables['params'])
    batch_stats = _filled(abstract_stats, variables.get('batch_stats', {}))
    return nnx.merge(graphdef, params, batch_stats)

  def apply(
    self,
    variables: Mapping[str, Any],
    x: jax.Array,
    train: bool = False,
    mutable: bool | list[str] | tuple[str, ...] = False,
    rngs: Any = None,
  ):
    """`(logits, features)`, and with `mutable=['batch_stats']` the updated statistics too.

    As linen's `apply`: with `mutable` it returns `((logits, features), {'batch_stats': ...})`.
    """
    del rngs  # Registered NNX models draw no random numbers when called.
    module = self.merge(variables)
    out = module(x, train=train)
    if not mutable:
      return out
    return out, {'batch_stats': nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))}


def _is_var(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _filled(abstract: nnx.State, values: Mapping[str, Any]) -> nnx.State:
  """The shapes-only state `abstract` with the arrays of `values` (a nested dict) in its places."""
  flat = nnx.traversals.flatten_mapping(values)
  return nnx.from_flat_state(
    [(path, var.replace(flat[path])) for path, var in nnx.to_flat_state(abstract)]
  )


def register_nnx(name: str) -> Callable[[type], type]:
  """Registers the `nnx.Module` class it decorates under `name` (see the module docstring).

  `registry.build(name, num_classes, **kwargs)` then returns an `NNXModel` of it, which the
  trainer uses as it uses a linen model.
  """

  def decorator(module_class: type) -> type:
    def factory(num_classes: int, **kwargs: Any) -> NNXModel:
      return NNXModel(module_class, num_classes, tuple(sorted(kwargs.items())))

    register(name)(factory)
    return module_class

  return decorator
