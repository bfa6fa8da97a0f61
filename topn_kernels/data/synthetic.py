"""The paper's synthetic molecule-like dataset (docs/set_vae.md; paper appendix D.2).

Each set is grown by rejection sampling. Candidate points are drawn uniformly in the box
``[low, high]^3``, each with a valency cap drawn from ``valencies`` with ``valency_probs``.
The first point is always accepted; a later candidate is rejected when

1. it is closer than ``min_dist`` to a point of the set;
2. it has no point of the set closer than ``neighbor_dist`` (it would not be connected);
3. it has more neighbours (points closer than ``neighbor_dist``) than its own cap;
4. it would push a point of the set over that point's cap.

The paper's stopping rule: a set stops at ``n_max`` points, or after ``patience`` rejections in
a row once it has more than ``min_stop_size`` points (``max_rejections`` in any case); sets of
fewer than 2 points are dropped (and replaced, so a call returns exactly the sets it is asked
for). The extrapolation variant grows each set to a given target size instead (sizes of the
training distribution plus ``extrapolation_n``), with ``max_rejections`` as its patience; a set
that gets stuck before its target is regenerated.

Vectorisation: all sets grow at once, and each step draws ``candidates`` candidates per set and
accepts the first valid one. Candidates before it are the rejections of the sequential
algorithm, so the sets have exactly the distribution of the one-candidate-at-a-time procedure;
only the random stream differs. Coordinates are rounded to float32 before any test, so the
float32 points a dataset stores satisfy the constraints exactly when checked in float64.

The valency of a point (its number of neighbours) is what the paper's metrics compare; it is
always in [1, cap] for a set of two points or more.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .._ragged import lengths_mask
from ..metrics import valency, valency_histogram
from ..ops._checks import integer

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


# the integer fields of SyntheticConfig and their minimums
_INTEGER_FIELDS = {
    "n_max": 2,
    "patience": 1,
    "min_stop_size": 0,
    "max_rejections": 1,
    "extrapolation_n": 0,
}


def _seed(value: object, name: str, sequence: bool = False) -> int | np.random.SeedSequence:
    """A seed: an int >= 0 (a Python or numpy integer, bool refused), or with ``sequence`` a
    numpy SeedSequence."""
    if sequence and isinstance(value, np.random.SeedSequence):
        return value
    return integer(value, name, minimum=0)


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the generator; the defaults are the paper's (its released config)."""

    low: float = -6.0
    high: float = 6.0
    min_dist: float = 1.0
    neighbor_dist: float = 2.0
    valencies: tuple[int, ...] = (1, 2, 3, 4)
    valency_probs: tuple[float, ...] = (0.05, 0.05, 0.1, 0.8)
    n_max: int = 35
    patience: int = 30
    min_stop_size: int = 4
    max_rejections: int = 1000
    extrapolation_n: int = 10

    def __post_init__(self) -> None:
        # integer fields first: a float n_max or cap was truncated or failed deep in numpy
        for name, minimum in _INTEGER_FIELDS.items():
            integer(getattr(self, name), name, minimum=minimum)
        for name in ("low", "high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if not self.high > self.low:
            raise ValueError(f"high must be > low, got low={self.low}, high={self.high}")
        if not 0 < self.min_dist < self.neighbor_dist:
            raise ValueError(
                f"need 0 < min_dist < neighbor_dist, got {self.min_dist}, {self.neighbor_dist}"
            )
        if len(self.valencies) != len(self.valency_probs) or not self.valencies:
            raise ValueError("valencies and valency_probs must be non-empty and of equal length")
        for i, cap in enumerate(self.valencies):
            integer(cap, f"valencies[{i}]", minimum=1)
        if min(self.valency_probs) < 0 or not math.isclose(sum(self.valency_probs), 1.0):
            raise ValueError(f"valency_probs must be >= 0 and sum to 1, got {self.valency_probs}")

    @property
    def max_valency(self) -> int:
        return max(self.valencies)


class SyntheticSets(Dataset):
    """A dataset of 3-D point sets stored padded.

    Attributes:
        points: (S, N, 3) float32, zero past each set's length.
        lengths: (S,) int64, each >= 2.
        caps: (S, N) int64, the valency cap of each point (0 on padding).
        valency: (S, N) int64, the number of neighbours of each point (0 on padding).
        config: the generator's parameters.

    ``dataset[i]`` is the (n_i, 3) float32 tensor of set i; :func:`collate_sets` batches them.
    """

    def __init__(
        self,
        points: Tensor,
        lengths: Tensor,
        caps: Tensor,
        valency: Tensor,
        config: SyntheticConfig,
    ) -> None:
        if points.dim() != 3 or points.shape[-1] != 3 or points.dtype != torch.float32:
            raise ValueError(f"points must be float32 (S, N, 3), got {points.dtype} {points.shape}")
        shape = tuple(points.shape[:2])
        for name, t in (("caps", caps), ("valency", valency)):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if tuple(lengths.shape) != shape[:1]:
            raise ValueError(f"lengths must have shape {shape[:1]}, got {tuple(lengths.shape)}")
        self.points, self.lengths, self.caps, self.valency = points, lengths, caps, valency
        self.config = config

    def __len__(self) -> int:
        return self.points.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.points[index, : int(self.lengths[index])]

    @property
    def mask(self) -> Tensor:
        """(S, N) bool, True on real points."""
        return lengths_mask(self.lengths, self.points.shape[1])


def collate_sets(sets: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Pads a list of (n_i, D) point sets into a batch.

    Returns ``(points, lengths)``: points (B, max n_i, D) in the sets' dtype, zero past each
    length; lengths (B,) int64. No need to group sets by size: every op and the model take
    ragged batches.
    """
    if not sets:
        raise ValueError("collate_sets needs at least one set")
    for i, s in enumerate(sets):
        if not isinstance(s, Tensor) or s.dim() != 2:
            raise TypeError(f"set {i} must be a 2-D tensor (n, D), got {type(s).__name__}")
    lengths = torch.tensor([s.shape[0] for s in sets], dtype=torch.int64)
    return torch.nn.utils.rnn.pad_sequence(sets, batch_first=True), lengths


# ---------------------------------------------------------------------------------------------
# Rejection sampling, all sets at once
# ---------------------------------------------------------------------------------------------


@dataclass
class _Growth:
    """State of ``num`` sets growing together (float64 coordinates on the float32 grid)."""

    pos: np.ndarray  # (S, cap, 3)
    caps: np.ndarray  # (S, cap) int64
    val: np.ndarray  # (S, cap) int64, current number of neighbours
    count: np.ndarray  # (S,) int64
    fails: np.ndarray  # (S,) int64, rejections in a row
    done: np.ndarray = field(init=False)  # (S,) bool
    stuck: np.ndarray = field(init=False)  # (S,) bool, stopped by rejections

    def __post_init__(self) -> None:
        self.done = np.zeros(self.count.shape, dtype=bool)
        self.stuck = np.zeros(self.count.shape, dtype=bool)


def _draw(rng: np.random.Generator, shape: tuple[int, ...], config: SyntheticConfig):
    """Uniform candidates (*shape, 3) on the float32 grid, and their caps (*shape)."""
    pos = rng.uniform(config.low, config.high, (*shape, 3)).astype(np.float32).astype(np.float64)
    caps = rng.choice(np.asarray(config.valencies), size=shape, p=np.asarray(config.valency_probs))
    return pos, caps.astype(np.int64)


def _grow(
    rng: np.random.Generator,
    targets: np.ndarray,
    config: SyntheticConfig,
    free_stop: bool,
    candidates: int,
) -> _Growth:
    """Grows ``len(targets)`` sets up to ``targets`` points each.

    ``free_stop``: the paper's stop rule (``patience`` rejections in a row once past
    ``min_stop_size`` points); otherwise only ``max_rejections`` stops a set (``stuck``).
    """
    num, capacity = len(targets), int(targets.max())
    first_pos, first_caps = _draw(rng, (num,), config)
    state = _Growth(
        pos=np.zeros((num, capacity, 3)),
        caps=np.zeros((num, capacity), dtype=np.int64),
        val=np.zeros((num, capacity), dtype=np.int64),
        count=np.ones(num, dtype=np.int64),
        fails=np.zeros(num, dtype=np.int64),
    )
    state.pos[:, 0], state.caps[:, 0] = first_pos, first_caps
    state.done = state.count >= targets
    slots = np.arange(capacity)
    while not state.done.all():
        idx = np.flatnonzero(~state.done)
        cand, cand_caps = _draw(rng, (len(idx), candidates), config)
        count = state.count[idx]
        real = slots[None, :] < count[:, None]  # (A, cap)
        dist = np.sqrt(((cand[:, :, None, :] - state.pos[idx][:, None, :, :]) ** 2).sum(-1))
        dist = np.where(real[:, None, :], dist, np.inf)  # (A, K, cap)
        nearest = dist.min(-1)
        bonds = dist < config.neighbor_dist  # (A, K, cap), only real points can be True
        degree = bonds.sum(-1)
        overflow = (state.val[idx][:, None, :] + bonds > state.caps[idx][:, None, :]).any(-1)
        valid = (
            (nearest >= config.min_dist)
            & (nearest < config.neighbor_dist)
            & (degree <= cand_caps)
            & ~overflow
        )
        has_valid = valid.any(1)
        first = valid.argmax(1)
        rejections = np.where(has_valid, first, candidates)
        if free_stop:
            limit = np.where(count > config.min_stop_size, config.patience, config.max_rejections)
        else:
            limit = np.full(len(idx), config.max_rejections)
        stops = state.fails[idx] + rejections > limit
        accept = has_valid & ~stops

        rows, k = np.flatnonzero(accept), first[accept]
        sets, slot = idx[rows], state.count[idx[rows]]
        state.pos[sets, slot] = cand[rows, k]
        state.caps[sets, slot] = cand_caps[rows, k]
        state.val[sets] += bonds[rows, k]
        state.val[sets, slot] = degree[rows, k]
        state.count[sets] += 1
        state.fails[sets] = 0
        state.fails[idx[~has_valid & ~stops]] += candidates
        state.stuck[idx[stops]] = True
        state.done[idx[stops]] = True
        state.done[sets] = state.count[sets] >= targets[sets]
    return state


def _to_dataset(states: list[tuple[_Growth, np.ndarray]], config: SyntheticConfig, width: int):
    """Concatenates the kept sets of several growth rounds into a SyntheticSets."""
    pos, caps, val, count = [], [], [], []
    for state, keep in states:
        pad = width - state.pos.shape[1]
        pos.append(np.pad(state.pos[keep], ((0, 0), (0, pad), (0, 0))))
        caps.append(np.pad(state.caps[keep], ((0, 0), (0, pad))))
        val.append(np.pad(state.val[keep], ((0, 0), (0, pad))))
        count.append(state.count[keep])
    return SyntheticSets(
        torch.from_numpy(np.concatenate(pos)).float(),
        torch.from_numpy(np.concatenate(count)),
        torch.from_numpy(np.concatenate(caps)),
        torch.from_numpy(np.concatenate(val)),
        config,
    )


def generate_sets(
    num_sets: int,
    *,
    seed: int | np.random.SeedSequence,
    config: SyntheticConfig | None = None,
    sizes: Tensor | np.ndarray | None = None,
    candidates: int = 32,
) -> SyntheticSets:
    """Generates ``num_sets`` sets of the synthetic dataset; deterministic given ``seed``.

    Args:
        num_sets: number of sets returned (>= 1).
        seed: an int >= 0 or a ``numpy.random.SeedSequence``.
        config: the generator's parameters (default: the paper's).
        sizes: None for the paper's stop rule; else an integer array (num_sets,) of exact target
            sizes in [2, max(n_max, ...)] (the extrapolation variant; the padded width is the
            largest target).
        candidates: candidates drawn per set per vectorised step (>= 1); changes the random
            stream, not the distribution.

    Returns:
        A :class:`SyntheticSets` whose padded width is ``config.n_max`` (or the largest target).
    """
    config = SyntheticConfig() if config is None else config
    if not isinstance(config, SyntheticConfig):
        raise TypeError(f"config must be a SyntheticConfig or None, got {type(config).__name__}")
    integer(num_sets, "num_sets", minimum=1)
    integer(candidates, "candidates", minimum=1)
    rng = np.random.default_rng(_seed(seed, "seed", sequence=True))
    if sizes is None:
        return _generate_free(num_sets, rng, config, candidates)
    targets = np.asarray(sizes.cpu() if isinstance(sizes, Tensor) else sizes)
    if targets.shape != (num_sets,) or not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"sizes must be an integer array ({num_sets},), got {targets.shape}")
    if targets.min() < 2:
        raise ValueError(f"sizes must be >= 2, got {int(targets.min())}")
    return _generate_targeted(targets.astype(np.int64), rng, config, candidates)


# rounds in a row that keep no set before a config is taken to be unable to make one (a valid
# config keeps most sets of every round)
_FUTILE_ROUNDS = 100


def _generate_free(num_sets, rng, config, candidates) -> SyntheticSets:
    rounds, kept, futile = [], 0, 0
    while kept < num_sets:  # sets of one point are dropped and replaced
        state = _grow(rng, np.full(num_sets - kept, config.n_max), config, True, candidates)
        keep = np.flatnonzero(state.count >= 2)
        rounds.append((state, keep))
        kept += len(keep)
        futile = 0 if len(keep) else futile + 1
        if futile == _FUTILE_ROUNDS:
            raise ValueError(
                f"config: no set reached 2 points in {_FUTILE_ROUNDS} rounds in a row (can a "
                f"second point be placed at all? {config})"
            )
    return _to_dataset(rounds, config, config.n_max)


def _generate_targeted(targets, rng, config, candidates) -> SyntheticSets:
    width = max(config.n_max, int(targets.max()))
    order = np.arange(len(targets))  # output position of each set of the current round
    rounds, slots = [], []
    futile = 0
    while len(order):  # stuck sets are regenerated with the same target
        state = _grow(rng, targets[order], config, False, candidates)
        keep = np.flatnonzero(~state.stuck)
        rounds.append((state, keep))
        slots.append(order[keep])
        order = order[state.stuck]
        futile = 0 if len(keep) else futile + 1
        if futile == _FUTILE_ROUNDS:
            raise ValueError(
                f"sizes: no set reached its target size in {_FUTILE_ROUNDS} rounds in a row "
                f"(targets {sorted(set(targets[order].tolist()))} under {config})"
            )
    data = _to_dataset(rounds, config, width)
    inverse = torch.from_numpy(np.argsort(np.concatenate(slots)))  # back to the targets' order
    return SyntheticSets(
        data.points[inverse],
        data.lengths[inverse],
        data.caps[inverse],
        data.valency[inverse],
        config,
    )


def make_datasets(
    n_train: int = 2000, n_test: int = 500, *, seed: int = 0, config: SyntheticConfig | None = None
) -> tuple[SyntheticSets, SyntheticSets]:
    """The train and test sets (the paper: 2000 and 500, each >= 1), from independent seeded
    streams (``seed``: an int >= 0)."""
    integer(n_train, "n_train", minimum=1)
    integer(n_test, "n_test", minimum=1)
    train_seed, test_seed = np.random.SeedSequence(_seed(seed, "seed")).spawn(2)
    return (
        generate_sets(n_train, seed=train_seed, config=config),
        generate_sets(n_test, seed=test_seed, config=config),
    )


def extrapolation_sizes(
    train: SyntheticSets, num: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """(num,) int64 sizes drawn from ``train``'s size distribution plus ``extrapolation_n``,
    clipped to ``n_max`` (the largest set the decoders can make)."""
    integer(num, "num", minimum=0)
    config = train.config
    picks = torch.randint(len(train), (num,), generator=generator)
    return (train.lengths[picks] + config.extrapolation_n).clamp(max=config.n_max)


def make_extrapolation_dataset(
    train: SyntheticSets, num_sets: int = 500, *, seed: int = 0
) -> SyntheticSets:
    """The extrapolation variant: ``num_sets`` sets whose sizes are those of ``train`` plus
    ``extrapolation_n`` (about 10 more points on average), clipped to ``n_max``; ``seed``: an
    int >= 0."""
    integer(num_sets, "num_sets", minimum=1)
    size_seed, set_seed = np.random.SeedSequence([_seed(seed, "seed"), 1]).spawn(2)
    generator = torch.Generator().manual_seed(int(size_seed.generate_state(1)[0]))
    sizes = extrapolation_sizes(train, num_sets, generator=generator)
    return generate_sets(num_sets, seed=set_seed, config=train.config, sizes=sizes)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetStatistics:
    """Size and valency statistics of a dataset.

    ``size_probs`` (n_max+1,) float64: fraction of sets of each size; ``valency_probs``
    (n_max,) float64: fraction of points with each number of neighbours 0..n_max-1.
    """

    num_sets: int
    num_points: int
    mean_size: float
    size_probs: Tensor
    valency_probs: Tensor

    def as_dict(self) -> dict:
        return {
            "num_sets": self.num_sets,
            "num_points": self.num_points,
            "mean_size": self.mean_size,
            "size_probs": self.size_probs.tolist(),
            "valency_probs": self.valency_probs.tolist(),
        }


def dataset_statistics(dataset: SyntheticSets) -> DatasetStatistics:
    """Size and valency statistics; valencies recomputed from the points (as the metrics do)."""
    width = dataset.points.shape[1]
    counts = valency(dataset.points, dataset.lengths, dataset.config.neighbor_dist)
    sizes = torch.bincount(dataset.lengths, minlength=width + 1).double()
    return DatasetStatistics(
        num_sets=len(dataset),
        num_points=int(dataset.lengths.sum()),
        mean_size=float(dataset.lengths.double().mean()),
        size_probs=sizes / sizes.sum(),
        valency_probs=valency_histogram(counts, dataset.lengths, width),
    )
