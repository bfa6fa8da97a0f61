"""The synthetic dataset (docs/set_vae.md, "Dataset"): every set obeys every constraint, the
vectorised generator has the size distribution of the literal one-point-at-a-time algorithm,
determinism, the extrapolation variant, statistics and collation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from topn_kernels.data import (
    SyntheticConfig,
    collate_sets,
    dataset_statistics,
    extrapolation_sizes,
    generate_sets,
    make_datasets,
    make_extrapolation_dataset,
)

CONFIG = SyntheticConfig()


def assert_constraints(data, config=CONFIG):
    """Box, minimum distance, connectivity, valency caps, tracked valencies, zero padding."""
    pts, lengths = data.points.double(), data.lengths
    mask = data.mask
    assert lengths.min() >= 2
    assert (pts[~mask] == 0).all() and (data.caps[~mask] == 0).all()
    real = pts[mask]
    assert real.min() >= config.low and real.max() <= config.high
    dist = torch.cdist(pts, pts, compute_mode="donot_use_mm_for_euclid_dist")
    pairs = mask[:, :, None] & mask[:, None, :] & ~torch.eye(pts.shape[1], dtype=torch.bool)
    assert dist[pairs].min() >= config.min_dist
    bonds = pairs & (dist < config.neighbor_dist)
    degree = bonds.sum(-1)
    assert torch.equal(degree[mask], data.valency[mask]), "tracked valency != recomputed"
    assert (degree[mask] >= 1).all(), "a point without neighbour"
    assert (degree[mask] <= data.caps[mask]).all(), "a point over its valency cap"
    assert set(data.caps[mask].unique().tolist()) <= set(config.valencies)
    # connectivity: grow the component of point 0 along bonds until it stops changing
    reached = torch.zeros_like(mask)
    reached[:, 0] = True
    for _ in range(pts.shape[1]):
        reached = reached | (bonds & reached[:, None, :]).any(-1)
    assert torch.equal(reached, mask), "a set is not connected"


def literal_sizes(num_sets: int, seed: int, config=CONFIG) -> np.ndarray:
    """Set sizes of the paper's algorithm written one candidate at a time (docs/set_vae.md)."""
    rng = np.random.default_rng(seed)
    sizes = []
    while len(sizes) < num_sets:
        pos, cur, cap, fails = [], [], [], 0
        while len(pos) < config.n_max:
            c = rng.uniform(config.low, config.high, 3)
            v = rng.choice(config.valencies, p=config.valency_probs)
            if not pos:
                pos.append(c), cur.append(0), cap.append(v)
                continue
            d = np.sqrt(((np.array(pos) - c) ** 2).sum(1))
            near = d < config.neighbor_dist
            ok = config.min_dist <= d.min() < config.neighbor_dist and near.sum() <= v
            ok = ok and not np.any(np.array(cur) + near > np.array(cap))
            if ok:
                cur = list(np.array(cur) + near)
                pos.append(c), cur.append(int(near.sum())), cap.append(v)
                fails = 0
            else:
                fails += 1
                limit = (
                    config.patience if len(pos) > config.min_stop_size else config.max_rejections
                )
                if fails > limit:
                    break
        if len(pos) >= 2:
            sizes.append(len(pos))
    return np.array(sizes)


def test_generated_sets_obey_every_constraint():
    data = generate_sets(400, seed=0)
    assert len(data) == 400 and data.points.shape == (400, CONFIG.n_max, 3)
    assert data.points.dtype == torch.float32
    assert_constraints(data)


def test_size_distribution_matches_the_literal_algorithm():
    """Sizes: the vectorised generator against the sequential algorithm (fixed seeds): the
    mean within 3.5 standard errors, and the share of the modal size (5: a set stops soon after
    passing min_stop_size) within 0.06."""
    ours = generate_sets(1500, seed=1).lengths.numpy()
    literal = literal_sizes(600, seed=2)
    se = np.sqrt(ours.var() / len(ours) + literal.var() / len(literal))
    assert abs(ours.mean() - literal.mean()) < 3.5 * se, (ours.mean(), literal.mean(), se)
    assert abs((ours == 5).mean() - (literal == 5).mean()) < 0.06
    assert ours.max() <= CONFIG.n_max and 6.5 < ours.mean() < 8.5


def test_generator_is_deterministic_and_vectorised_candidates_keep_the_constraints():
    a, b = generate_sets(50, seed=7), generate_sets(50, seed=7)
    for name in ("points", "lengths", "caps", "valency"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.points, generate_sets(50, seed=8).points)
    assert_constraints(generate_sets(50, seed=7, candidates=1))


def test_train_and_test_sets_are_independent_streams():
    train, test = make_datasets(40, 20, seed=3)
    train2, _ = make_datasets(40, 10, seed=3)
    assert len(train) == 40 and len(test) == 20
    assert torch.equal(train.points, train2.points)  # the train set ignores n_test
    assert not torch.equal(train.points[:20], test.points)
    equal_sizes, other = make_datasets(20, 20, seed=3)
    assert not torch.equal(equal_sizes.points, other.points)  # one seed would make them equal


def test_extrapolation_variant():
    train = generate_sets(300, seed=4)
    extrap = make_extrapolation_dataset(train, 200, seed=4)
    assert_constraints(extrap)
    assert extrap.lengths.max() <= CONFIG.n_max
    gain = extrap.lengths.double().mean() - train.lengths.double().mean()
    assert 8.0 < gain <= CONFIG.extrapolation_n  # +10, less what the n_max cap clips
    sizes = extrapolation_sizes(train, 500, generator=torch.Generator().manual_seed(0))
    shifted = set((train.lengths + CONFIG.extrapolation_n).clamp(max=CONFIG.n_max).tolist())
    assert set(sizes.tolist()) <= shifted and len(set(sizes.tolist())) > 5  # drawn, not fixed
    targets = torch.tensor([2, 35, 17, 9])
    exact = generate_sets(4, seed=5, sizes=targets)
    assert torch.equal(exact.lengths, targets)  # exact sizes, in the order asked
    assert_constraints(exact)


def test_statistics():
    data = generate_sets(300, seed=6)
    stats = dataset_statistics(data)
    assert stats.num_sets == 300 and stats.num_points == int(data.lengths.sum())
    assert stats.mean_size == pytest.approx(data.lengths.double().mean().item())
    assert stats.size_probs.sum() == pytest.approx(1) and stats.size_probs[:2].sum() == 0
    assert stats.size_probs[5] == pytest.approx((data.lengths == 5).double().mean().item())
    probs = stats.valency_probs
    assert probs.sum() == pytest.approx(1) and probs[0] == 0 and probs[5:].sum() == 0
    counts = torch.bincount(data.valency[data.mask], minlength=5).double()
    torch.testing.assert_close(probs[:5], counts / counts.sum())


def test_collate_sets_pads_ragged_sets():
    data = generate_sets(5, seed=9)
    points, lengths = collate_sets([data[i] for i in range(5)])
    assert torch.equal(lengths, data.lengths)
    width = int(data.lengths.max())
    assert points.shape == (5, width, 3)
    assert torch.equal(points, data.points[:, :width])
    with pytest.raises(ValueError, match="at least one"):
        collate_sets([])
    with pytest.raises(TypeError, match="2-D"):
        collate_sets([torch.zeros(3)])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(low=1.0, high=1.0), "high must be"),
        (dict(min_dist=3.0), "min_dist < neighbor_dist"),
        (dict(valency_probs=(0.5, 0.5, 0.5, 0.5)), "sum to 1"),
        (dict(valencies=(1, 2)), "equal length"),
        (dict(n_max=1), "n_max"),
    ],
)
def test_bad_config_is_a_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(n_max=5.5), TypeError, "n_max must be an int, got float"),
        (dict(n_max=True), TypeError, "n_max must be an int, got bool"),
        (dict(patience=2.5), TypeError, "patience must be an int"),
        (dict(min_stop_size=4.0), TypeError, "min_stop_size must be an int"),
        (dict(min_stop_size=-1), ValueError, "min_stop_size must be >= 0"),
        (dict(max_rejections=10.0), TypeError, "max_rejections must be an int"),
        (dict(max_rejections=0), ValueError, "max_rejections must be >= 1"),
        (dict(extrapolation_n=1.5), TypeError, "extrapolation_n must be an int"),
        (dict(extrapolation_n=-3), ValueError, "extrapolation_n must be >= 0"),
        (dict(valencies=(1.5, 2, 3, 4)), TypeError, r"valencies\[0\] must be an int"),
        (dict(valencies=(1, 2, 0, 4)), ValueError, r"valencies\[2\] must be >= 1"),
        (dict(low=float("-inf")), ValueError, "low must be finite"),
        (dict(high="6"), TypeError, "high must be a number"),
    ],
)
def test_config_integer_fields_are_checked(kwargs, error, match):
    # a float n_max failed in numpy's indexing, float caps and counts were used as is
    with pytest.raises(error, match=match):
        SyntheticConfig(**kwargs)


def test_numpy_integers_are_integers():
    """numpy integers (a size read from an array) are taken wherever an int is: the same sets
    as with Python ints (the checks refused them once)."""
    config = SyntheticConfig(
        n_max=np.int64(12), valencies=(1, np.int32(2), 3, 4), low=np.float32(0)
    )
    plain = SyntheticConfig(n_max=12, valencies=(1, 2, 3, 4), low=0.0)
    got, want = (
        generate_sets(np.int64(3), seed=np.int64(1), config=config),
        generate_sets(3, seed=1, config=plain),
    )
    assert torch.equal(got.points, want.points) and torch.equal(got.lengths, want.lengths)


@pytest.mark.parametrize(
    "seed, error, match",
    [
        (-1, ValueError, "seed must be >= 0, got -1"),
        (1.5, TypeError, "seed must be an int"),
        (None, TypeError, "seed must be an int.*NoneType"),
        (True, TypeError, "seed must be an int.*bool"),
    ],
)
def test_seeds_are_checked(seed, error, match):
    # numpy's errors before (no name), and None drew an unseeded, irreproducible stream
    with pytest.raises(error, match=match):
        generate_sets(2, seed=seed)
    with pytest.raises(error, match=match):
        make_datasets(2, 2, seed=seed)
    with pytest.raises(error, match=match):
        make_extrapolation_dataset(generate_sets(2, seed=0), 2, seed=seed)
    seq = np.random.SeedSequence(5)  # generate_sets also takes a SeedSequence
    assert torch.equal(generate_sets(2, seed=seq).points, generate_sets(2, seed=5).points)
    assert torch.equal(generate_sets(2, seed=np.int64(5)).points, generate_sets(2, seed=5).points)


def test_make_datasets_names_its_own_arguments():
    with pytest.raises(ValueError, match="n_train must be >= 1, got 0"):
        make_datasets(0, 2)
    with pytest.raises(ValueError, match="n_test must be >= 1, got 0"):
        make_datasets(2, 0)
    with pytest.raises(TypeError, match="n_train must be an int, got float"):
        make_datasets(2.0, 2)
    with pytest.raises(ValueError, match="num_sets must be >= 1"):
        make_extrapolation_dataset(generate_sets(2, seed=0), 0)
    with pytest.raises(TypeError, match="num_sets must be an int"):
        generate_sets(2.0, seed=0)
    with pytest.raises(TypeError, match="candidates must be an int"):
        generate_sets(2, seed=0, candidates=1.5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_sets"):
        generate_sets(0, seed=0)
    with pytest.raises(ValueError, match="sizes must be >= 2"):
        generate_sets(2, seed=0, sizes=np.array([1, 3]))
    with pytest.raises(ValueError, match="sizes must be an integer array"):
        generate_sets(2, seed=0, sizes=np.array([3.0, 3.0]))


@pytest.mark.parametrize(
    ("config", "sizes", "names"),
    [
        (SyntheticConfig(low=0.0, high=0.1), None, "config"),  # no second point fits the box
        (SyntheticConfig(low=0.0, high=0.1), torch.tensor([3, 3]), "sizes"),
        (
            SyntheticConfig(valencies=(1,), valency_probs=(1.0,), max_rejections=5),
            torch.tensor([3, 3]),  # a chain of 3 needs a point of valency 2
            "sizes",
        ),
    ],
)
def test_impossible_configs_are_an_error_not_a_hang(config, sizes, names):
    with pytest.raises(ValueError, match=names):
        generate_sets(2, seed=0, config=config, sizes=sizes)
