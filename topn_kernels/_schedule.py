"""The eps-scaling schedule of the Sinkhorn backends (geomloss's), from packed ragged batches.

The reference keeps its own copy (it imports nothing of the package); the KeOps and native
backends share this one.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._ragged import Packed


def epsilon_schedule(p: int, diameter: float, blur: float, scaling: float) -> list[float]:
    """geomloss's eps-scaling: diameter^p, then down by scaling^p per step, to blur^p; a zero
    or non-finite diameter starts at blur (a short, valid schedule)."""
    if not math.isfinite(diameter) or diameter < blur:
        diameter = blur
    steps = np.arange(p * np.log(diameter), p * np.log(blur), p * np.log(scaling))
    return [diameter**p] + [float(np.exp(e)) for e in steps] + [blur**p]


def batch_diameter(px: Packed, py: Packed) -> float:
    """Diagonal of the bounding box of the real points of the whole batch (geomloss's rule)."""
    pts = torch.cat([px.points, py.points]).detach()
    if pts.shape[0] == 0:
        return 0.0
    return float((pts.amax(0) - pts.amin(0)).norm())
