"""Datasets: the paper's synthetic molecule-like point sets (docs/set_vae.md) and QM9 as padded
molecular graphs (docs/graph_vae.md)."""

from . import qm9 as _qm9
from . import synthetic as _synthetic
from .qm9 import *  # noqa: F403
from .synthetic import *  # noqa: F403

__all__ = [*_synthetic.__all__, *_qm9.__all__]
