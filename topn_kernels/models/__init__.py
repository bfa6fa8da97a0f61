"""The reference set VAE (docs/set_vae.md): the model the fused ops are checked inside."""

from .backends import BACKEND_NAMES, BackendLog, OpBackends
from .setvae import CREATIONS, SetVAE, SetVAEConfig, VAEOutput
from .training import LOSS_TERMS, LossConfig, setvae_loss, train_step

__all__ = [
    "BACKEND_NAMES",
    "CREATIONS",
    "LOSS_TERMS",
    "BackendLog",
    "LossConfig",
    "OpBackends",
    "SetVAE",
    "SetVAEConfig",
    "VAEOutput",
    "setvae_loss",
    "train_step",
]
