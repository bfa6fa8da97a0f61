"""Figures of ``train_setvae.py``: loss curves, and point sets in 3-D with their bonds."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor

from topn_kernels.models import LOSS_TERMS as CURVE_TERMS


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    """One panel per loss term (log scale) over epochs; test W2 where it was evaluated."""
    epochs = [h["epoch"] for h in history]
    evaluated = [h for h in history if "test_w2" in h]
    panels = len(CURVE_TERMS) + (1 if evaluated else 0)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.0), squeeze=False)
    for ax, term in zip(axes[0], CURVE_TERMS, strict=False):
        values = [max(h[term], 1e-12) for h in history]
        ax.plot(epochs, values, marker="." if len(epochs) < 30 else None)
        ax.set_yscale("log")
        ax.set_title(term)
        ax.set_xlabel("epoch")
    if evaluated:
        ax = axes[0][-1]
        ax.plot([h["epoch"] for h in evaluated], [h["test_w2"] for h in evaluated], marker="o")
        ax.set_title("test W2")
        ax.set_xlabel("epoch")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _center(x: Tensor) -> Tensor:
    return (x.amin(0) + x.amax(0)) / 2


def _draw_set(ax, points: Tensor, neighbor_dist: float, color: str, radius: float) -> None:
    x = points.detach().double().cpu()
    d = torch.cdist(x, x)
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1)
    bonded = d[i, j] < neighbor_dist
    for a, b in zip(i[bonded].tolist(), j[bonded].tolist(), strict=True):
        ax.plot(*x[[a, b]].T.tolist(), color="0.5", linewidth=1)
    ax.scatter(*x.T.tolist(), color=color, s=18, depthshade=True)
    ax.set_title(f"{x.shape[0]} points, {int(bonded.sum())} bonds", fontsize=8)
    for set_lim, c in zip(
        (ax.set_xlim, ax.set_ylim, ax.set_zlim), _center(x).tolist(), strict=True
    ):
        set_lim(c - radius, c + radius)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_zticks([])


def plot_samples(
    real: list[Tensor], generated: list[Tensor], path: Path, neighbor_dist: float, title: str = ""
) -> None:
    """Data sets (top row) and generated sets (bottom row), each (n, 3), each panel centred on
    its set at one common scale, bonds drawn between points closer than ``neighbor_dist``."""
    cols = max(len(real), len(generated))
    sets = [s.detach().double().cpu() for s in (*real, *generated)]
    radius = max(float((s - _center(s)).abs().max()) for s in sets) + 0.5  # one scale for all
    fig = plt.figure(figsize=(2.6 * cols, 5.4))
    for row, (sets, color, label) in enumerate(
        ((real, "tab:blue", "data"), (generated, "tab:orange", "generated"))
    ):
        for col, points in enumerate(sets):
            ax = fig.add_subplot(2, cols, row * cols + col + 1, projection="3d")
            _draw_set(ax, points, neighbor_dist, color, radius)
            if col == 0:
                ax.text2D(-0.1, 0.5, label, transform=ax.transAxes, rotation=90, va="center")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
