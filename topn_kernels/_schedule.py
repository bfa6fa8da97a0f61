"""The eps-scaling schedule of the Sinkhorn backends (geomloss's), from packed ragged batches.

The reference keeps its own copy (it imports nothing of the package); the KeOps and native
backends share this one.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ._ragged import Packed, pack


def epsilon_schedule(p: int, diameter: float, blur: float, scaling: float) -> list[float]:
    """geomloss's eps-scaling: diameter^p, then down by scaling^p per step, to blur^p; a zero
    or non-finite diameter starts at blur (a short, valid schedule)."""
    if not math.isfinite(diameter) or diameter < blur:
        diameter = blur
    steps = np.arange(p * np.log(diameter), p * np.log(blur), p * np.log(scaling))
    return [diameter**p] + [float(np.exp(e)) for e in steps] + [blur**p]


def batch_diameter(px: Packed, py: Packed) -> float:
    """Diagonal of the bounding box of the real points of the whole batch (geomloss's rule),
    points with a NaN or infinite coordinate left out: they make their own set's value NaN,
    and must not change the schedule, hence the values, of the other sets."""
    pts = torch.cat([px.points, py.points]).detach()
    pts = pts[pts.isfinite().all(1)]
    if pts.shape[0] == 0:
        return 0.0
    return float((pts.amax(0) - pts.amin(0)).norm())


def prepare(
    x: Tensor,
    y: Tensor,
    x_lengths: Tensor | None,
    y_lengths: Tensor | None,
    *,
    p: int,
    blur: float,
    scaling: float,
    diameter: float | None,
) -> tuple[Packed, Packed, list[float]]:
    """The packed batches and the eps schedule of one Sinkhorn call; ``diameter=None`` is
    the batch's (real points only), so that each set's value equals that set alone with it."""
    px, py = pack(x, x_lengths), pack(y, y_lengths)
    if diameter is None:
        diameter = batch_diameter(px, py)
    return px, py, epsilon_schedule(p, diameter, blur, scaling)
