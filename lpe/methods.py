"""The distillation methods: one entry each, from which the rest of lpe derives its lists.

An entry gives a method's label, the `config.distill` settings it has besides its weight
(`<name>_weight`, 0 turns it off) with their defaults, the `lpe.losses` function that computes it
and how that function is called (what it reads, which settings it takes), and whether it is
relational (computed on the global batch). `lpe.config` makes the defaults from it,
`lpe.objectives` the terms, `lpe.report` and `lpe.hooks` the progress line and the checks; the
studies' rows name methods by these keys. Adding a loss is its function in `lpe/losses/` and one
entry here (docs/architecture.md).

LP, the project's own loss, is the first entry; its many settings (the graph, the bandwidth, the
student's scale) are spelled out in `lpe.config` with their documentation.

This module imports nothing from lpe, so the config can read it without loading JAX.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Method:
  """A distillation method.

  Attributes:
    label: How pages and tables name it.
    loss: The name of its function in `lpe.losses`.
    reads: What the function takes from both nets: 'logits', 'feature' (the feature named by the
      `<name>_feature` setting), 'features' (each feature named by `<name>_features`, the terms
      summed) or 'lp' (LP's own forms, `lpe.objectives`).
    settings: Its `config.distill` settings besides `<name>_weight`, with their defaults.
    arguments: The function's keyword arguments taken from settings: `{argument: setting}`.
    relational: Computed on the global batch (its inputs gathered over the device axis), so its
      value does not depend on the device count; otherwise the mean of per-example losses.
    regressor: Reads its student feature through a trainable regressor to the teacher's width
      (FitNet; counted as extra parameters).
    shown: In the progress line and checked for a finite value at every step's check.
  """

  label: str
  loss: str
  reads: str
  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  arguments: Mapping[str, str] = dataclasses.field(default_factory=dict)
  relational: bool = False
  regressor: bool = False
  shown: bool = False


METHODS: dict[str, Method] = {
  'lp': Method('LP', 'locality_preserving_loss', 'lp', shown=True),
  'kd': Method(
    'KD',
    'kd_loss',
    'logits',
    {'kd_temperature': 4.0},
    {'temperature': 'kd_temperature'},
    shown=True,
  ),
  'fitnet': Method(
    'FitNet', 'fitnet_loss', 'feature', {'fitnet_feature': 'stage2'}, regressor=True
  ),
  'at': Method('AT', 'attention_transfer_loss', 'features', {'at_features': ('stage1', 'stage2')}),
  'sp': Method(
    'SP', 'similarity_preserving_loss', 'feature', {'sp_feature': 'stage2'}, relational=True
  ),
  'rkd': Method('RKD', 'rkd_loss', 'feature', {'rkd_feature': 'embedding'}, relational=True),
  'pkt': Method('PKT', 'pkt_loss', 'feature', {'pkt_feature': 'embedding'}, relational=True),
}
LABELS = {name: method.label for name, method in METHODS.items()}
# The step metrics a progress line shows and every check reads, besides loss and CE.
SHOWN = tuple(name for name, method in METHODS.items() if method.shown)
