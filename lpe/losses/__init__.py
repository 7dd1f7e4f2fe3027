"""Distillation losses as pure functions that work under jit, pmap and shard_map."""

from lpe.losses.locality import knn_graph, locality_preserving_loss, pairwise_sq_distances

__all__ = ['knn_graph', 'locality_preserving_loss', 'pairwise_sq_distances']
