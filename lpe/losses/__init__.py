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
from lpe.losses.graph import (
  NeighbourGraph,
  graph_batch_locality_loss,
  memory_bank_locality_loss,
  memory_bank_moments,
  teacher_graph,
  update_memory_bank,
)
from lpe.losses.locality import (
  STUDENT_SCALES,
  knn_graph,
  l2_normalised,
  locality_preserving_loss,
  mean_pair_sq_distance,
  pairwise_sq_distances,
)

__all__ = [
  'STUDENT_SCALES',
  'FitNetRegressor',
  'NeighbourGraph',
  'attention_transfer_loss',
  'fitnet_loss',
  'graph_batch_locality_loss',
  'kd_loss',
  'knn_graph',
  'l2_normalised',
  'locality_preserving_loss',
  'memory_bank_locality_loss',
  'memory_bank_moments',
  'mean_pair_sq_distance',
  'pairwise_sq_distances',
  'pkt_loss',
  'rkd_loss',
  'similarity_preserving_loss',
  'teacher_graph',
  'update_memory_bank',
]
