"""Datasets: the paper's synthetic molecule-like point sets (DESIGN 6)."""

from .synthetic import *  # noqa: F403
from .synthetic import __all__  # noqa: F401
