"""lpe: knowledge distillation by locality-preserving feature embedding, in JAX/Flax.

Submodules load on first use (`import lpe; lpe.losses.locality_preserving_loss`), so a process that
needs only part of lpe (the input workers, which need no JAX) imports only that part.
"""

import importlib

__version__ = '0.1.0'

_SUBMODULES = (
  'augment checkpoint config data diagnostics evaluate experiment feed hooks losses metrics_io '
  'models objectives parallel preflight report sampling sources state step stream teacher '
  'torch_convert train transforms workdir'
).split()


def __getattr__(name: str):
  if name in _SUBMODULES:
    return importlib.import_module(f'lpe.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted([*globals(), *_SUBMODULES])
