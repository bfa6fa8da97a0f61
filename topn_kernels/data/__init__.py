"""Datasets: the paper's synthetic molecule-like point sets (docs/set_vae.md)."""

from .synthetic import *  # noqa: F403
from .synthetic import __all__  # noqa: F401
