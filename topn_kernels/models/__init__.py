"""The reference set VAE (docs/set_vae.md): the model the fused ops are checked inside, and the
authors' released variant of it (:mod:`.authors`)."""

from .authors import AuthorsConfig, AuthorsLossConfig, AuthorsSetVAE, authors_loss
from .backends import BACKEND_NAMES, BackendLog, OpBackends
from .setvae import CREATIONS, SetVAE, SetVAEConfig, VAEOutput
from .training import LOSS_TERMS, LossConfig, setvae_loss, train_step

__all__ = [
    "BACKEND_NAMES",
    "CREATIONS",
    "LOSS_TERMS",
    "AuthorsConfig",
    "AuthorsLossConfig",
    "AuthorsSetVAE",
    "BackendLog",
    "LossConfig",
    "OpBackends",
    "SetVAE",
    "SetVAEConfig",
    "VAEOutput",
    "authors_loss",
    "setvae_loss",
    "train_step",
]
