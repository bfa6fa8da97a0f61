"""The reference set VAE (docs/set_vae.md): the model the fused ops are checked inside, and the
authors' released variant of it (:mod:`.authors`), and the QM9 graph VAE (:mod:`.graphvae`,
docs/graph_vae.md)."""

from .authors import AuthorsConfig, AuthorsLossConfig, AuthorsSetVAE, authors_loss
from .backends import BACKEND_NAMES, BackendLog, OpBackends
from .graphvae import (
    GRAPH_CREATIONS,
    GRAPH_LOSS_TERMS,
    GraphLossConfig,
    GraphVAE,
    GraphVAEConfig,
    graph_vae_loss,
)
from .setvae import CREATIONS, SetVAE, SetVAEConfig, VAEOutput
from .training import LOSS_TERMS, LossConfig, make_adam, setvae_loss, train_step

__all__ = [
    "BACKEND_NAMES",
    "CREATIONS",
    "GRAPH_CREATIONS",
    "GRAPH_LOSS_TERMS",
    "LOSS_TERMS",
    "AuthorsConfig",
    "AuthorsLossConfig",
    "AuthorsSetVAE",
    "BackendLog",
    "GraphLossConfig",
    "GraphVAE",
    "GraphVAEConfig",
    "LossConfig",
    "OpBackends",
    "SetVAE",
    "SetVAEConfig",
    "VAEOutput",
    "authors_loss",
    "graph_vae_loss",
    "make_adam",
    "setvae_loss",
    "train_step",
]
