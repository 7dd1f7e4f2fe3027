"""Distillation losses as pure functions that work under jit, pmap and shard_map."""

from lpe.losses.baselines import (
  FitNetRegressor,
  attention_transfer_loss,
  fitnet_loss,
  kd_loss,
  pkt_loss,
  rkd_loss,
  similarity_preserving_loss,
)
from lpe.losses.locality import knn_graph, locality_preserving_loss, pairwise_sq_distances

__all__ = [
  'FitNetRegressor',
  'attention_transfer_loss',
  'fitnet_loss',
  'kd_loss',
  'knn_graph',
  'locality_preserving_loss',
  'pairwise_sq_distances',
  'pkt_loss',
  'rkd_loss',
  'similarity_preserving_loss',
]
