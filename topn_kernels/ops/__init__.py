"""Public functional API: validation, backend dispatch, and the calls into each backend."""

from ._dispatch import record_backends
from .losses import chamfer_loss, repulsion_penalty, sinkhorn_loss, valency_penalty
from .set2graph import set2graph_logits
from .topn_create import TopNOutput, topn_create

__all__ = [
    "TopNOutput",
    "chamfer_loss",
    "record_backends",
    "repulsion_penalty",
    "set2graph_logits",
    "sinkhorn_loss",
    "topn_create",
    "valency_penalty",
]
