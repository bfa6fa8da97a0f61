"""Datasets: the paper's synthetic molecule-like point sets (DESIGN 6)."""

from .synthetic import (
    DatasetStatistics,
    SyntheticConfig,
    SyntheticSets,
    collate_sets,
    dataset_statistics,
    extrapolation_sizes,
    generate_sets,
    make_datasets,
    make_extrapolation_dataset,
)

__all__ = [
    "DatasetStatistics",
    "SyntheticConfig",
    "SyntheticSets",
    "collate_sets",
    "dataset_statistics",
    "extrapolation_sizes",
    "generate_sets",
    "make_datasets",
    "make_extrapolation_dataset",
]
