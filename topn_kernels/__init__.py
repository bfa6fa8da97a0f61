"""topn_kernels: Top-n set creation and ragged set losses for one-shot set and graph generation.

Operators (docs/operators.md): :func:`topn_create`, :func:`chamfer_loss`,
:func:`sinkhorn_loss`, :func:`repulsion_penalty`, :func:`valency_penalty`; creation layers in
:mod:`topn_kernels.nn`; the pure-PyTorch oracle in :mod:`topn_kernels.reference`.
"""

from . import native
from .ops import (
    TopNOutput,
    chamfer_loss,
    record_backends,
    repulsion_penalty,
    set2graph_logits,
    sinkhorn_loss,
    topn_create,
    valency_penalty,
)

__version__ = "0.1.0"

__all__ = [
    "TopNOutput",
    "chamfer_loss",
    "native",
    "record_backends",
    "repulsion_penalty",
    "set2graph_logits",
    "sinkhorn_loss",
    "topn_create",
    "valency_penalty",
]
