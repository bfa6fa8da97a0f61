"""QM9 data, the graph VAE, its matching loss, generation, the RDKit metrics and the training
program (docs/graph_vae.md). Uses the committed sample tests/data/qm9_sample.csv, never qm9pack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from topn_kernels.data import (
    MAX_ATOMS,
    PAD_ATOM,
    QM9Graphs,
    iterate_graph_batches,
    load_qm9,
    parse_smiles,
    smiles_to_graph,
    split_qm9,
)
from topn_kernels.metrics_graph import (
    canonical_smiles,
    check_graphs,
    graph_to_mol,
    graphs_sanitize,
    graphs_to_smiles,
    molecule_metrics,
    sanitized_smiles,
    valid_smiles,
)
from topn_kernels.models import (
    GRAPH_CREATIONS,
    GraphLossConfig,
    GraphVAE,
    GraphVAEConfig,
    graph_vae_loss,
)
from topn_kernels.models.graphvae import (
    PRED_ORDERS,
    GraphDecoding,
    GraphVAEOutput,
    match_graphs,
    matching_score,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "qm9_sample.csv"
C, N, O, F = 0, 1, 2, 3
SMALL = {  # a small model keeps the tests fast; the structure is the default one's
    "latent_dim": 16,
    "encoder_final_hidden": 32,
    "decoder_initial_hidden": 32,
    "decoder_hidden": 16,
    "feedforward": 32,
    "spatial_dim": 16,
    "last_hidden": 32,
    "edge_hidden": 16,
    "creation_mlp_hidden": 32,
    "dropout": 0.0,
}


def padded(atoms: list[int], bonds: list[tuple[int, int, int]], width: int = MAX_ATOMS):
    a = torch.full((width,), PAD_ATOM, dtype=torch.int64)
    a[: len(atoms)] = torch.tensor(atoms)
    b = torch.zeros(width, width, dtype=torch.int64)
    for i, j, t in bonds:
        b[i, j] = b[j, i] = t
    return a, b


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def test_parse_known_smiles_exact_atoms_and_bonds():
    atoms, bonds, canonical, charged = smiles_to_graph("OCC#N")
    assert atoms == [O, C, C, N]
    assert sorted(bonds) == [(0, 1, 1), (1, 2, 1), (2, 3, 3)]
    assert canonical == "N#CCO" and not charged
    # aromatic input is kekulized: benzene-like ring of alternating single / double bonds
    atoms, bonds, _, _ = smiles_to_graph("c1ccncc1")
    assert atoms == [C, C, C, N, C, C]
    types = sorted(t for _, _, t in bonds)
    assert types == [1, 1, 1, 2, 2, 2]
    # explicit hydrogens are removed; fluorine and a double bond
    atoms, bonds, _, _ = smiles_to_graph("[H]C([H])(F)C=O")
    assert atoms == [C, F, C, O]
    assert sorted(bonds) == [(0, 1, 1), (0, 2, 1), (2, 3, 2)]


def test_parse_smiles_pads_and_counts_skipped():
    smiles = ["CCO", "not a smiles", "CCS", "CCCCCCCCCC", "C1=CC=CC=C1", "C[NH3+]", "C[O-]"]
    graphs, report = parse_smiles(smiles)
    assert report.total == 7 and report.kept == 4 and report.num_skipped == 3
    assert report.skipped == {"unparsable": 1, "element": 1, "too_many_atoms": 1}
    assert report.charged == 2
    assert graphs.smiles == ["CCO", "c1ccccc1", "C[NH3+]", "C[O-]"]
    assert graphs.lengths.tolist() == [3, 6, 2, 2]
    assert graphs.atoms[0].tolist() == [C, C, O] + [PAD_ATOM] * 6
    expected = torch.zeros(MAX_ATOMS, MAX_ATOMS, dtype=torch.int64)
    expected[0, 1] = expected[1, 0] = expected[1, 2] = expected[2, 1] = 1
    assert torch.equal(graphs.bonds[0], expected)
    assert torch.equal(graphs.bonds, graphs.bonds.transpose(1, 2))
    assert int(graphs.bonds[1].sum()) == 2 * (3 * 1 + 3 * 2)  # kekulé benzene


def test_hydrogen_only_smiles_are_empty_not_element():
    # RemoveHs keeps hydrogens bonded to hydrogens (and lone ones): no heavy atom is left, the
    # report's "empty", not "element"; a hydrogen kept beside a heavy atom stays an "element"
    hydrogens = ["[H][H]", "[HH]", "[H]", "[H+]", "[2H][2H]", "[H].[H]"]
    for smiles in hydrogens:
        with pytest.raises(ValueError, match=r"^empty: "):
            smiles_to_graph(smiles)
    with pytest.raises(ValueError, match=r"^element: .* contains H"):
        smiles_to_graph("[2H]C")
    graphs, report = parse_smiles([*hydrogens, "[2H]C", "C"])
    assert report.skipped == {"empty": len(hydrogens), "element": 1}
    assert report.kept == 1 and graphs.smiles == ["C"]


def test_sample_cache_round_trip_and_errors(tmp_path):
    graphs, report = load_qm9(SAMPLE, cache_dir=tmp_path)
    assert report.total == 400 and report.kept == len(graphs) > 390
    files = list(tmp_path.glob("qm9_*.pt"))
    assert len(files) == 1
    again, report2 = load_qm9(SAMPLE, cache_dir=tmp_path)
    assert report2.as_dict() == report.as_dict()
    for name in ("atoms", "lengths", "bonds"):
        assert torch.equal(getattr(again, name), getattr(graphs, name))
    assert again.smiles == graphs.smiles
    fresh, _ = load_qm9(SAMPLE, use_cache=False)
    assert torch.equal(fresh.bonds, graphs.bonds)
    # a cached file is what is read: tampering with it shows up
    blob = torch.load(files[0], weights_only=True)
    blob["lengths"] = blob["lengths"].clone()
    blob["smiles"][0] = "tampered"
    torch.save(blob, files[0])
    assert load_qm9(SAMPLE, cache_dir=tmp_path)[0].smiles[0] == "tampered"
    with pytest.raises(FileNotFoundError, match="csv_path"):
        load_qm9(tmp_path / "missing.csv", cache_dir=tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("name,value\nx,1\n")
    with pytest.raises(ValueError, match="no column 'smiles'"):
        load_qm9(bad, cache_dir=tmp_path)


def test_missing_sources_error_names_both_options(monkeypatch):
    import topn_kernels.data.qm9 as qm9

    monkeypatch.setattr(qm9, "qm9pack_csv_files", lambda: None)
    with pytest.raises(FileNotFoundError) as err:
        qm9.load_qm9(None, use_cache=False)
    assert "csv_path" in str(err.value) and "qm9pack" in str(err.value)


def test_split_is_deterministic_and_disjoint(tmp_path):
    graphs, _ = load_qm9(SAMPLE, cache_dir=tmp_path)
    a, b = split_qm9(graphs, seed=3), split_qm9(graphs, seed=3)
    c = split_qm9(graphs, seed=4)
    assert {k: len(v) for k, v in a.items()} == {
        "train": round(0.8 * len(graphs)),
        "val": round(0.1 * len(graphs)),
        "test": len(graphs) - round(0.8 * len(graphs)) - round(0.1 * len(graphs)),
    }
    for k in a:
        assert a[k].smiles == b[k].smiles and torch.equal(a[k].bonds, b[k].bonds)
    assert a["train"].smiles != c["train"].smiles
    index = {s: i for i, s in enumerate(graphs.smiles)}
    seen = [index[s] for part in a.values() for s in part.smiles]
    assert sorted(seen) == list(range(len(graphs)))
    with pytest.raises(ValueError, match="fractions"):
        split_qm9(graphs, fractions=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="fractions"):  # NaN passed every comparison
        split_qm9(graphs, fractions=(float("nan"), 0.5, 0.5))
    with pytest.raises(TypeError, match="column"):
        load_qm9(ROOT / "tests" / "data" / "qm9_sample.csv", column=None)


def test_batches_cover_every_molecule_cut_to_width():
    graphs, _ = parse_smiles(["C", "CC", "CCO", "C#N", "OCC#N"])
    seen = []
    for atoms, lengths, bonds in iterate_graph_batches(graphs, 2, torch.Generator().manual_seed(0)):
        assert atoms.shape[1] == int(lengths.max()) and bonds.shape[1:] == (atoms.shape[1],) * 2
        seen += lengths.tolist()
    assert sorted(seen) == [1, 2, 2, 3, 4]
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_graph_batches(graphs, 0))


# ---------------------------------------------------------------------------------------------
# Matching and loss
# ---------------------------------------------------------------------------------------------


def test_matching_score_orders_atoms_by_type_then_edges_then_neighbours():
    # N#C-C(-O)-C-F: atoms [C0, C1, C2, N3, O4, F5]
    atoms, bonds = padded(
        [C, C, C, N, O, F], [(0, 3, 3), (0, 1, 1), (1, 4, 1), (1, 2, 1), (2, 5, 1)], 7
    )
    mask = atoms >= 0
    a = atoms.clamp(min=0).double() + 1
    score = matching_score(a[None], (bonds > 0).double()[None], bonds.double()[None], mask[None])
    s = score[0].tolist()
    assert s[6] == float("inf")  # padding sorts last
    # atom type dominates: every carbon < N < O < F
    assert max(s[:3]) < s[3] < s[4] < s[5]
    # among carbons: C1 (3 bonds) > C0 and C2 (2 bonds each)
    assert s[1] > s[0] and s[1] > s[2]
    # C0 (triple bond to N: 10^3 * 2, single to C: 10 * 1) vs C2 (singles to C and F: 10 + 40)
    assert s[0] == pytest.approx(1e5 * 1 + 1e4 * 2 + 1000 * 2 + 10 * 1)
    assert s[2] == pytest.approx(1e5 * 1 + 1e4 * 2 + 10 * 1 + 10 * 4)
    lin = matching_score(
        a[None], (bonds > 0).double()[None], bonds.double()[None], mask[None], "linear"
    )
    assert lin[0, 0].item() == pytest.approx(1e5 + 2e4 + 3 * 2 + 1 * 1)
    with pytest.raises(ValueError, match="neighbor"):
        matching_score(a[None], bonds.double()[None], bonds.double()[None], mask[None], "x")


def perfect_decoding(atoms: torch.Tensor, bonds: torch.Tensor, mask: torch.Tensor, margin=40.0):
    """Logits that put probability ~1 on the given graph."""
    atom_logits = margin * torch.nn.functional.one_hot(atoms.clamp(min=0), 4).double()
    cls = torch.where(bonds > 0, bonds - 1, torch.full_like(bonds, 3))
    edge_logits = margin * torch.nn.functional.one_hot(cls, 4).double()
    pair = (mask[:, :, None] & mask[:, None, :])[..., None]
    return GraphDecoding(atom_logits * mask[..., None], edge_logits * pair, mask)


def test_loss_is_zero_on_a_permuted_perfect_prediction_and_positive_otherwise():
    # atoms of equal score must be interchangeable (the methyls of neopentane are); the atoms
    # of a benzene ring are not, and tie: the matching cannot align a permuted ring
    graphs, _ = parse_smiles(["OCC#N", "CC(=O)NF", "C", "CC(C)(C)C"])
    atoms, lengths, bonds = graphs.atoms[:, :6], graphs.lengths, graphs.bonds[:, :6, :6]
    mask = atoms >= 0
    # the prediction lists each molecule's atoms in another order: matching must undo it
    gen = torch.Generator().manual_seed(0)
    p_atoms, p_bonds = atoms.clone(), bonds.clone()
    for i, n in enumerate(lengths.tolist()):
        perm = torch.randperm(n, generator=gen)
        p_atoms[i, :n] = atoms[i, perm]
        p_bonds[i, :n, :n] = bonds[i][perm][:, perm]
    zeros = torch.zeros(4, 8, dtype=torch.float64)
    out = GraphVAEOutput(perfect_decoding(p_atoms, p_bonds, mask), zeros, zeros)
    terms = graph_vae_loss(out, atoms, lengths, bonds)
    for k, v in terms.items():
        assert abs(v.item()) < 1e-8, (k, v.item())
    # without the matching, the same prediction costs a lot
    unmatched = graph_vae_loss(out, atoms, lengths, bonds, GraphLossConfig(matching=False))
    assert unmatched["total"].item() > 1.0
    # a wrong atom type or a missing bond is penalised
    wrong = p_atoms.clone()
    wrong[0, 0] = F if int(wrong[0, 0]) != F else C
    bad = graph_vae_loss(
        GraphVAEOutput(perfect_decoding(wrong, p_bonds, mask), zeros, zeros), atoms, lengths, bonds
    )
    # one atom of 4 wrong with log-probability -40: 10 * 40 / 4; formula off by one in two types
    assert bad["atoms"].item() == pytest.approx(100.0)
    assert bad["formula"].item() == pytest.approx(2 / 4)
    cut = p_bonds.clone()
    i, j = torch.nonzero(cut[1] > 0)[0].tolist()
    cut[1, i, j] = cut[1, j, i] = 0
    bad = graph_vae_loss(
        GraphVAEOutput(perfect_decoding(p_atoms, cut, mask), zeros, zeros), atoms, lengths, bonds
    )
    assert (
        bad["edges"].item() > 1 and bad["num_edges"].item() > 0.01 and bad["valency"].item() > 0.01
    )
    # KL: zero at the prior, positive away from it, weighted 0.001
    kl = graph_vae_loss(
        GraphVAEOutput(out.decoding, torch.ones(4, 8, dtype=torch.float64), zeros),
        atoms,
        lengths,
        bonds,
    )["kl"]
    assert kl.item() == pytest.approx(0.001 * 0.5 * 32)


def test_match_graphs_reorders_targets_by_score():
    atoms, bonds = padded([F, C, O], [(0, 1, 1), (1, 2, 2)], 4)
    atoms, bonds = atoms[None], bonds[None]
    mask = atoms >= 0
    dec = perfect_decoding(atoms, bonds, mask)
    matched, t_atoms, t_bonds = match_graphs(dec, atoms, bonds, mask)
    assert t_atoms[0].tolist() == [C, O, F, PAD_ATOM]
    assert t_bonds[0, 0, 1].item() == 2 and t_bonds[0, 0, 2].item() == 1
    assert matched.atom_logits.argmax(-1)[0, :3].tolist() == [C, O, F]


def test_match_graphs_prediction_orders():
    """ "score" sorts the prediction by its expected score; "type" by its most likely atom type
    only, slots of one type in decoder order; "slot" leaves the prediction as it is. The target
    is sorted by its score in every case."""
    # target C-C-O; the prediction lists O, then two carbons, the second one bonded to the O
    atoms, bonds = padded([C, C, O], [(0, 1, 1), (1, 2, 1)], 4)
    p_atoms, p_bonds = padded([O, C, C], [(0, 2, 1), (1, 2, 1)], 4)
    atoms, bonds, p_atoms, p_bonds = atoms[None], bonds[None], p_atoms[None], p_bonds[None]
    mask = atoms >= 0
    dec = _marked(perfect_decoding(p_atoms, p_bonds, mask))
    for order, expected in [("score", [1, 2, 0]), ("type", [1, 2, 0]), ("slot", [0, 1, 2])]:
        matched, t_atoms, t_bonds = match_graphs(dec, atoms, bonds, mask, pred_order=order)
        assert t_atoms[0].tolist() == [C, C, O, PAD_ATOM]  # the terminal carbon first
        assert torch.equal(t_bonds, bonds)  # already in score order
        picked = _rows(dec.atom_logits[0], matched.atom_logits[0])
        assert picked[:3] == expected, order
        # pairs follow their atoms: bond logits of the new (0, 1) pair are the old pair's
        a, b = expected[0], expected[1]
        assert torch.equal(matched.edge_logits[0, 0, 1], dec.edge_logits[0, a, b])
    # "score" puts the carbon with the O neighbour last; "type" keeps the decoder's order
    s_atoms, s_bonds = padded([O, C, C], [(0, 1, 1), (1, 2, 1)], 4)
    swapped = _marked(perfect_decoding(s_atoms[None], s_bonds[None], mask))
    by_score = match_graphs(swapped, atoms, bonds, mask, pred_order="score")[0]
    by_type = match_graphs(swapped, atoms, bonds, mask, pred_order="type")[0]
    assert _rows(swapped.atom_logits[0], by_score.atom_logits[0])[:3] == [2, 1, 0]
    assert _rows(swapped.atom_logits[0], by_type.atom_logits[0])[:3] == [1, 2, 0]
    # the reordered logits stay differentiable: each slot's gradient lands on its own logits
    for order in PRED_ORDERS:
        logits = dec.atom_logits.clone().requires_grad_()
        leaf = GraphDecoding(logits, dec.edge_logits, mask)
        matched = match_graphs(leaf, atoms, bonds, mask, pred_order=order)[0]
        (matched.atom_logits[0, :, 0] * torch.arange(1.0, 5.0, dtype=logits.dtype)).sum().backward()
        assert logits.grad is not None, order
        assert logits.grad[0, :, 0].tolist()[:3] != [0.0, 0.0, 0.0], order
    with pytest.raises(ValueError, match="pred_order"):
        match_graphs(dec, atoms, bonds, mask, pred_order="sorted")
    with pytest.raises(ValueError, match="pred_order"):
        GraphLossConfig(pred_order="sorted")


def _marked(dec: GraphDecoding) -> GraphDecoding:
    """The decoding with each slot's atom logits made distinct (a tiny, slot-dependent logit of
    fluorine), so that a reordering can be read back."""
    mark = torch.zeros_like(dec.atom_logits)
    mark[..., F] = 1e-3 * torch.arange(dec.atom_logits.shape[1], dtype=mark.dtype)
    return GraphDecoding(dec.atom_logits + mark, dec.edge_logits, dec.mask)


def _rows(original: torch.Tensor, reordered: torch.Tensor) -> list[int]:
    """The row of ``original`` that each row of ``reordered`` is."""
    return [
        next(i for i in range(original.shape[0]) if torch.equal(original[i], row))
        for row in reordered
    ]


@pytest.mark.parametrize("creation", GRAPH_CREATIONS)
def test_gradients_reach_every_parameter(creation):
    torch.manual_seed(0)
    model = GraphVAE(GraphVAEConfig(creation=creation, **SMALL))
    graphs, _ = parse_smiles(["OCC#N", "CC(=O)NF", "C", "C1=CC=CC=C1", "CC"])
    w = int(graphs.lengths.max())
    atoms, lengths, bonds = graphs.atoms[:, :w], graphs.lengths, graphs.bonds[:, :w, :w]
    out = model(atoms, lengths, bonds)
    assert out.decoding.atom_logits.shape == (5, w, 4)
    assert out.decoding.edge_logits.shape == (5, w, w, 4)
    terms = graph_vae_loss(out, atoms, lengths, bonds)
    assert all(torch.isfinite(v) for v in terms.values())
    terms["total"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # a few steps on one batch reduce the loss
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = terms["total"].item()
    for _ in range(25):
        noise = torch.zeros(5, model.cfg.latent_dim)
        loss = graph_vae_loss(model(atoms, lengths, bonds, noise=noise), atoms, lengths, bonds)
        opt.zero_grad()
        loss["total"].backward()
        opt.step()
    assert loss["total"].item() < 0.7 * first


def test_dense_nnconv_matches_a_per_edge_loop():
    """out_i = W_root h_i + b + mean over bonded j of h_j Theta(e_ij), Theta = Linear(3, c c)."""
    from topn_kernels.models.graphvae import DenseNNConv

    torch.manual_seed(0)
    conv = DenseNNConv(5, 4, 3).double()
    h = torch.randn(2, 4, 5, dtype=torch.float64)
    bonds = torch.tensor(
        [
            [[0, 1, 0, 0], [1, 0, 3, 0], [0, 3, 0, 0], [0, 0, 0, 0]],
            [[0, 2, 1, 1], [2, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]],
        ]
    )
    edges = torch.nn.functional.one_hot(bonds, 4)[..., 1:].double()
    out = conv(h, edges)
    for b in range(2):
        for i in range(4):
            expected = conv.root(h[b, i])
            nbrs = [j for j in range(4) if bonds[b, i, j] > 0]
            if nbrs:
                msgs = [h[b, j] @ conv.edge_net(edges[b, i, j]).view(5, 4) for j in nbrs]
                expected = expected + torch.stack(msgs).mean(0)
            torch.testing.assert_close(out[b, i], expected)


def test_model_rejects_bad_input():
    model = GraphVAE(GraphVAEConfig(**SMALL))
    atoms, bonds = padded([C, O], [(0, 1, 1)], 3)
    atoms, bonds, lengths = atoms[None], bonds[None], torch.tensor([2])
    with pytest.raises(TypeError, match="atoms"):
        model(atoms.float(), lengths, bonds)
    with pytest.raises(ValueError, match="lengths"):
        model(atoms, torch.tensor([4]), bonds)
    with pytest.raises(ValueError, match="bonds"):
        model(atoms, lengths, bonds[:, :2])
    with pytest.raises(ValueError, match="bonds"):
        model(atoms, lengths, bonds + 4)
    with pytest.raises(ValueError, match="atoms"):
        model(torch.tensor([[C, 7, PAD_ATOM]]), lengths, bonds)
    one_way = bonds.clone()
    one_way[0, 1, 0] = 0  # a bond in one direction only changed the loss silently
    with pytest.raises(ValueError, match="bonds must be symmetric"):
        model(atoms, lengths, one_way)
    with pytest.raises(ValueError, match="diagonal"):
        model(atoms, lengths, bonds + torch.diag(torch.tensor([2, 0, 0])))
    with pytest.raises(TypeError, match="bonds"):
        model(atoms, lengths, bonds.bool())
    with pytest.raises(TypeError, match="atoms"):
        model(atoms.bool(), lengths, bonds)
    with pytest.raises(ValueError, match="creation"):
        GraphVAEConfig(creation="topk")
    with pytest.raises(ValueError, match="n_ref"):
        GraphVAEConfig(n_ref=5)


def test_max_atoms_below_1_is_refused_at_config():
    # the size distribution over 1..max_atoms was NaN with max_atoms=0
    with pytest.raises(ValueError, match="max_atoms must be >= 1, got 0"):
        GraphVAEConfig(max_atoms=0, n_ref=12)
    with pytest.raises(TypeError, match="max_atoms must be an int"):
        GraphVAEConfig(max_atoms=9.0)


@pytest.mark.parametrize("max_atoms", [1, 2])
def test_smallest_max_atoms_work_and_authors_clip_needs_3(max_atoms):
    torch.manual_seed(0)
    model = GraphVAE(GraphVAEConfig(max_atoms=max_atoms, **SMALL))
    assert model.size_probs.isfinite().all()
    sizes = model.sample_sizes(20)
    assert sizes.min() >= 1 and sizes.max() <= max_atoms
    atoms = torch.zeros(2, max_atoms, dtype=torch.int64)
    bonds = torch.zeros(2, max_atoms, max_atoms, dtype=torch.int64)
    terms = graph_vae_loss(
        model(atoms, torch.full((2,), max_atoms), bonds), atoms, torch.full((2,), max_atoms), bonds
    )
    assert all(torch.isfinite(v) for v in terms.values())
    _, lengths, _ = model.eval().generate(4)
    assert lengths.min() >= 1 and lengths.max() <= max_atoms
    # clamp(2, max_atoms - 1) gave sizes max_atoms - 1 (0 or 1), not 2
    with pytest.raises(ValueError, match="authors_clip needs max_atoms >= 3"):
        model.sample_sizes(5, authors_clip=True)
    with pytest.raises(ValueError, match="authors_clip needs max_atoms >= 3"):
        model.generate(5, authors_clip=True)


# ---------------------------------------------------------------------------------------------
# Generation and metrics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("creation", ["topn", "iid"])
def test_generation_shapes_and_sizes(creation):
    torch.manual_seed(1)
    model = GraphVAE(GraphVAEConfig(creation=creation, **SMALL)).eval()
    model.set_size_distribution(torch.tensor([3, 5, 5, 9]))
    atoms, lengths, bonds = model.generate(64)
    assert set(lengths.tolist()) <= {3, 5, 9}
    w = int(lengths.max())
    assert atoms.shape == (64, w) and bonds.shape == (64, w, w)
    mask = torch.arange(w)[None] < lengths[:, None]
    assert (atoms[~mask] == PAD_ATOM).all() and ((atoms[mask] >= 0) & (atoms[mask] < 4)).all()
    assert torch.equal(bonds, bonds.transpose(1, 2))
    assert (torch.diagonal(bonds, dim1=1, dim2=2) == 0).all()
    assert (bonds[~(mask[:, :, None] & mask[:, None, :])] == 0).all()
    assert int(bonds.max()) <= 3
    clipped = model.sample_sizes(200, authors_clip=True)
    assert set(clipped.tolist()) <= {3, 5, 8}
    sizes = torch.tensor([2, 2, 4])
    atoms, lengths, bonds = model.generate(3, sizes)
    assert torch.equal(lengths, sizes) and atoms.shape == (3, 4)
    with pytest.raises(ValueError, match="sizes"):
        model.generate(1, torch.tensor([10]))
    smiles = graphs_to_smiles(*model.generate(20)[::2])
    assert len(smiles) == 20


def test_generation_from_given_latents_is_generation_from_those_prior_draws():
    torch.manual_seed(1)
    model = GraphVAE(GraphVAEConfig(**SMALL)).eval()
    sizes = torch.tensor([3, 5, 4, 5])
    torch.manual_seed(7)
    drawn = model.generate(4, sizes)
    torch.manual_seed(7)
    z = torch.randn(4, model.cfg.latent_dim)
    given = model.generate(4, sizes, z=z)
    for a, b in zip(drawn, given, strict=True):
        assert torch.equal(a, b)
    seen = []  # the codes reach the decoder as given
    model.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model.generate(4, sizes, z=z + 3.0)
    assert torch.equal(seen[0], z + 3.0)
    with pytest.raises(ValueError, match="z must have shape"):
        model.generate(4, sizes, z=z[:3])
    with pytest.raises(TypeError, match="z must be a float tensor"):
        model.generate(4, sizes, z=z.long())
    with pytest.raises(ValueError, match="z must be finite"):
        model.generate(4, sizes, z=z.index_fill(0, torch.tensor([1]), float("nan")))
    with pytest.raises(ValueError, match="sizes must have shape"):
        model.generate(4, sizes[:3], z=z)


def test_validity_of_hand_made_smiles():
    assert canonical_smiles("CCO") == "CCO"
    assert canonical_smiles("OCC") == "CCO"
    assert canonical_smiles("C(C)(C)(C)(C)C") is None  # pentavalent carbon
    assert canonical_smiles("C.C") is None  # two fragments
    assert canonical_smiles("O=O=O") is None
    assert canonical_smiles("C1=CC=CC=C1") == "c1ccccc1"
    generated = ["CCO", "OCC", "C(C)(C)(C)(C)C", "C.C", "C#N", "CC"]
    gen = [canonical_smiles(s) for s in generated]
    m = molecule_metrics(gen, training_smiles={"CC"})
    assert m["validity"] == pytest.approx(4 / 6)
    assert m["unique_and_valid"] == pytest.approx(3 / 6)
    assert m["uniqueness"] == pytest.approx(3 / 4)
    assert m["novelty"] == pytest.approx(2 / 3)
    assert (m["num_generated"], m["num_valid"], m["num_unique"]) == (6, 4, 3)
    none = molecule_metrics([None, "INVALID"])
    assert none["validity"] == 0 and none["uniqueness"] == 0
    with pytest.raises(ValueError, match="generated"):
        molecule_metrics([])
    with pytest.raises(TypeError, match="generated"):
        molecule_metrics("CCO")


def test_graphs_to_molecules():
    atoms, bonds = padded([C, C, O], [(0, 1, 1), (1, 2, 1)], 4)
    assert valid_smiles(graph_to_mol(atoms, bonds)) == "CCO"
    five, five_bonds = padded([C, C, C, C, C, C], [(0, k, 1) for k in range(1, 6)])
    assert valid_smiles(graph_to_mol(five, five_bonds)) is None
    apart, apart_bonds = padded([C, C, O], [(0, 1, 1)])
    assert valid_smiles(graph_to_mol(apart, apart_bonds)) is None
    # kekulé benzene built from a graph is valid and aromatic once sanitized
    ring, ring_bonds = padded([C] * 6, [(i, (i + 1) % 6, 1 + i % 2) for i in range(6)])
    assert valid_smiles(graph_to_mol(ring, ring_bonds)) == "c1ccccc1"
    batch = graphs_to_smiles(
        torch.stack([atoms[:3], apart[:3]]), torch.stack([bonds[:3, :3], apart_bonds[:3, :3]])
    )
    assert batch == ["CCO", None]
    # the authors' validity: sanitizes, fragments allowed
    sanitized = graphs_sanitize(
        torch.stack([atoms, apart[:4], five[:4]]),
        torch.stack([bonds, apart_bonds[:4, :4], five_bonds[:4, :4]]),
    )
    assert sanitized == [True, True, True]
    # both checks on one build of each molecule
    three = torch.stack([atoms, apart[:4], five[:4]])
    three_bonds = torch.stack([bonds, apart_bonds[:4, :4], five_bonds[:4, :4]])
    strict, authors = check_graphs(three, three_bonds)
    assert strict == ["CCO", None, "CC(C)C"]
    assert authors == ["CCO", "CC.O", "CC(C)C"]  # the fragments kept, joined by '.'
    assert check_graphs(five[None], five_bonds[None]) == ([None], [None])
    assert graphs_sanitize(five[None], five_bonds[None]) == [False]
    # the authors' unique and valid counts distinct sanitized SMILES, fragments included
    again = check_graphs(torch.cat([three, three[1:2]]), torch.cat([three_bonds, three_bonds[1:2]]))
    authors_metrics = molecule_metrics(again[1] + [None])
    assert authors_metrics["validity"] == 4 / 5
    assert authors_metrics["unique_and_valid"] == 3 / 5
    assert molecule_metrics(again[0] + [None])["unique_and_valid"] == 2 / 5
    with pytest.raises(ValueError, match="bonds"):
        graphs_sanitize(atoms[None], bonds)
    with pytest.raises(ValueError, match="atoms"):
        graph_to_mol([C, 9], torch.zeros(2, 2, dtype=torch.int64))
    # padding in the middle, one-way or self bonds, and non-integer types are refused (they
    # were truncated, read on one triangle, or rounded)
    chain = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]])
    assert valid_smiles(graph_to_mol([C, C, O], chain)) == "CCO"
    with pytest.raises(ValueError, match="padding"):
        graph_to_mol([C, PAD_ATOM, O], chain)
    with pytest.raises(ValueError, match="symmetric"):
        graph_to_mol([C, C, O], chain.tril())
    with pytest.raises(ValueError, match="diagonal"):
        graph_to_mol([C, C, O], chain + torch.eye(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="bonds"):
        graph_to_mol([C, C, O], chain * 1.7)
    with pytest.raises(TypeError, match="atoms"):
        graph_to_mol([True, False, True], chain)
    with pytest.raises(TypeError, match="generated"):
        molecule_metrics([1, 2.0, b"CC"])
    with pytest.raises(TypeError, match="training_smiles"):
        molecule_metrics(["CCO"], "CCO")
    with pytest.raises(ValueError, match="bonds"):
        graph_to_mol([C, C], torch.tensor([[0, 5], [5, 0]]))


def test_dataset_round_trips_through_the_metrics(tmp_path):
    """Every neutral molecule of the sample, rebuilt from its graph, is valid with its SMILES."""
    graphs, _ = load_qm9(SAMPLE, cache_dir=tmp_path)
    smiles = graphs_to_smiles(graphs.atoms, graphs.bonds)
    neutral = [i for i, s in enumerate(graphs.smiles) if "+" not in s and "-" not in s]
    assert len(neutral) >= 390
    assert all(smiles[i] == graphs.smiles[i] for i in neutral)
    assert isinstance(graphs, QM9Graphs)


# ---------------------------------------------------------------------------------------------
# Training program
# ---------------------------------------------------------------------------------------------


def _program(args: list[str]) -> subprocess.CompletedProcess:
    """Runs ``python ARGS`` from the repository root on one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_training_program_smoke_then_resume(tmp_path, capsys):
    """One epoch on 200 molecules of the committed sample: every output, then --resume."""
    out = tmp_path / "run"
    cmd = [
        "python/train_graphvae.py",
        "--creation",
        "topn",
        "--subset",
        "200",
        "--seed",
        "1",
        "--csv",
        str(SAMPLE),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
    ]
    run = _program([*cmd, "--epochs", "1"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "epoch 1/1" in run.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("validity", "unique_and_valid", "uniqueness", "novelty", "train_losses"):
        assert key in metrics
    assert 0 <= metrics["unique_and_valid"] <= metrics["validity"] <= 1
    assert metrics["validity"] <= metrics["authors_validity"] <= 1  # fragments allowed
    assert 0 <= metrics["authors_unique_and_valid"] <= metrics["authors_validity"]
    assert 0 <= metrics["authors_uniqueness"] <= 1
    assert metrics["data"]["split_sizes"]["train"] == 200
    assert set(metrics["train_losses"]) >= {"atoms", "edges", "kl", "total"}
    lines = (out / "generated.smi").read_text().splitlines()
    assert len(lines) >= 1000
    valid = [s for s in lines if s != "INVALID"]
    assert len(valid) == metrics["num_valid"]
    assert all(canonical_smiles(s) == s for s in valid[:50])
    for name in ("curves.png", "molecules.png", "checkpoint.pt", "history.json"):
        assert (out / name).stat().st_size > 0
    resume = ["--resume", "--no-plots", "--eval-every", "2", "--eval-size", "30"]
    run = _program([*cmd, "--epochs", "2", *resume])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert "validity" not in history[0]  # the default checks every 5 epochs
    assert 0 <= history[1]["unique_and_valid"] <= history[1]["validity"] <= 1
    assert history[1]["eval_size"] == 30
    assert history[1]["validity"] <= history[1]["authors_validity"] <= 1
    run = _program([*cmd, "--epochs", "3", "--resume", "--pred-order", "type"])
    assert run.returncode != 0 and "--pred-order" in run.stderr  # not the run's own order
    # a new run from the trained weights, with another KL weight
    tuned = tmp_path / "tuned"
    init = ["--init-from", str(out / "checkpoint.pt"), "--out", str(tuned), "--no-plots"]
    run = _program([*cmd[:-2], *init, "--epochs", "1", "--loss-weight", "kl=0.003"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    started = json.loads((tuned / "metrics.json").read_text())
    assert started["args"]["init_from"] == str(out / "checkpoint.pt")
    assert started["epochs"] == 1 and started["loss"]["kl"] == 0.003
    # trained weights: its first epoch fits the atom types better than the first run's
    assert started["train_losses"]["atoms"] < history[0]["atoms"]
    run = _program([*cmd[:-2], *init, "--epochs", "2", "--resume"])
    assert run.returncode != 0 and "--init-from" in run.stderr
    other = [*init[:-3], "--out", str(tmp_path / "other")]
    run = _program([*cmd[:-2], *other, "--creation", "firstn", "--epochs", "1"])
    assert run.returncode != 0 and "--init-from" in run.stderr  # another model
    diagnose = ["python/qm9_diagnose.py", str(out), "--molecules", "50"]
    mixtures = ["--mixtures", "3:diag", "2:full", "--fit-molecules", "60"]
    diagnosis = _program([*diagnose, *mixtures])
    assert diagnosis.returncode == 0, diagnosis.stdout[-3000:] + diagnosis.stderr[-3000:]
    row = json.loads(diagnosis.stdout.splitlines()[-1])
    assert (row["epochs"], row["molecules"]) == (2, 50)
    rec = row["reconstruction"]
    assert 0 < rec["no_bond_rate"] < 1 and 0 <= rec["pair_accuracy"] <= 1 and rec["bond_bce"] > 0
    assert 0 <= rec["exact"] <= rec["atoms_exact"] <= 1
    assert row["latent"]["kl_per_molecule"] >= 0 and row["latent"]["mean_sigma"] > 0
    assert 0 <= row["latent"]["active_dims"] <= 256
    assert set(row["drawn"]) == {
        *("mu", "posterior", "posterior_other_sizes", "prior"),
        *("fitted", "fitted_full", "fitted_by_size", "mixture_3:diag", "mixture_2:full"),
    }
    for drawn in row["drawn"].values():
        assert 0 <= drawn["valid"] <= drawn["sanitizes"] <= 1
        assert drawn["bonds"] >= 0 and 1 <= drawn["components"] <= 9
    program = _load_program("qm9_diagnose")
    for bad in (
        ["--mixtures", "3"],
        ["--mixtures", "0:diag"],
        ["--mixtures", "2:tied"],
        ["--mixtures", "\u00b3:diag"],  # a digit, not an ASCII one
        ["--mixtures", "61:diag", "--fit-molecules", "60"],
    ):
        with pytest.raises(SystemExit):
            program.main([*diagnose[1:], *bad])
        assert "--mixtures" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="more components than the 5 codes"):
        program._mixture(torch.zeros(5, 3), "6:diag", 10, seed=0)


def _load_program(name: str):
    """The module of ``python/<name>.py`` (the programs are scripts, not a package)."""
    import importlib.util

    sys.path.insert(0, str(ROOT / "python"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / f"python/{name}.py")
        program = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(program)
    finally:
        sys.path.remove(str(ROOT / "python"))
    return program


def test_diagnosis_counts_bonds_and_fragments():
    """graph_shape: bonds and connected components inside each molecule's size only."""
    program = _load_program("qm9_diagnose")
    bonds = torch.zeros(3, 4, 4, dtype=torch.int64)
    for k, i, j, t in [(0, 0, 1, 1), (0, 1, 2, 2), (0, 2, 3, 1), (1, 0, 1, 3), (2, 0, 3, 1)]:
        bonds[k, i, j] = bonds[k, j, i] = t
    # molecule 0: a chain of 4 (1 component); 1: one bond among 3 atoms (2); 2: its only bond
    # reaches past its size 2: no bond, 2 isolated atoms
    per_bonds, per_components = program.graph_shape(bonds, torch.tensor([4, 3, 2]))
    assert per_bonds == pytest.approx(4 / 3)
    assert per_components == pytest.approx((1 + 2 + 2) / 3)
    # lengths that do not fit the matrices, or a batch without molecules, are refused
    for bad in (torch.tensor([4, 3, 5]), torch.tensor([4, 3, 0]), torch.tensor([4, 3])):
        with pytest.raises(ValueError, match="lengths"):
            program.graph_shape(bonds, bad)
    with pytest.raises(ValueError, match="lengths"):
        program.graph_shape(bonds, torch.tensor([4.0, 3.0, 2.0]))
    with pytest.raises(ValueError, match="bonds"):
        program.graph_shape(bonds[:, :3], torch.tensor([3, 3, 2]))
    with pytest.raises(ValueError, match="bonds"):
        program.graph_shape(bonds[:0], torch.tensor([], dtype=torch.int64))


def test_diagnosis_draws_other_sizes():
    """_other_sizes gives every molecule a size that is not its own, drawn from the others'."""
    program = _load_program("qm9_diagnose")
    lengths = torch.tensor([9] * 300 + [8] * 100 + [5] * 20)
    torch.manual_seed(0)
    other = program._other_sizes(lengths)
    assert (other != lengths).all()
    assert set(other.tolist()) <= {5, 8, 9}
    # the 9-atom molecules draw 8 five times as often as 5, as the other molecules hold them
    nines = other[:300]
    assert 3 < (nines == 8).sum().item() / (nines == 5).sum().item() < 8
    assert torch.equal(program._other_sizes(torch.tensor([7, 7, 7])), torch.tensor([7, 7, 7]))


def test_diagnosis_samples_the_fitted_mixture():
    """_mixture draws from the fitted mixture: whole rows near the components' means, in
    their proportions, shuffled, reproducibly for a seed."""
    program = _load_program("qm9_diagnose")
    pytest.importorskip("sklearn")
    torch.manual_seed(0)
    centres = torch.tensor([[10.0, -10.0, 0.0], [-10.0, 10.0, 5.0]])
    codes = torch.cat(
        [centres[0] + 0.1 * torch.randn(300, 3), centres[1] + 0.1 * torch.randn(100, 3)]
    )
    z = program._mixture(codes, "2:full", 400, seed=3)
    assert z.shape == (400, 3) and z.dtype == codes.dtype
    nearest = torch.cdist(z, centres).argmin(1)
    assert torch.cdist(z, centres).min(1).values.max().item() < 1.0  # rows kept whole
    assert 0.65 < (nearest == 0).float().mean().item() < 0.85  # 3:1 proportions
    assert 0 < nearest[:200].sum().item() < 200  # not grouped by component
    assert torch.equal(z, program._mixture(codes, "2:full", 400, seed=3))
    assert not torch.equal(z, program._mixture(codes, "2:full", 400, seed=4))


def test_diagnosis_fits_one_gaussian_per_size():
    """_by_size draws each molecule around the codes of its own size."""
    program = _load_program("qm9_diagnose")
    lengths = torch.tensor([3] * 400 + [9] * 400 + [5])
    mu = torch.where((lengths == 3)[:, None], -5.0, 5.0).expand(-1, 2).clone()
    mu[-1] = 100.0  # the only molecule of size 5: its posterior
    mu[:800] += 0.1 * torch.randn(800, 2)
    sigma = torch.full_like(mu, 0.01)
    torch.manual_seed(0)
    z = program._by_size(mu, sigma, lengths)
    assert z[:400].mean().item() == pytest.approx(-5, abs=0.05)
    assert z[400:800].mean().item() == pytest.approx(5, abs=0.05)
    assert 0.07 < z[:400].std(0).min().item() < 0.13  # the spread of the means, plus sigma
    assert (z[-1] - 100).abs().max().item() < 0.05


def test_compare_creation_writes_table5(tmp_path):
    """compare_creation --task qm9: two creations side by side, the table beside the paper's
    Table 5 and one row per run with the metrics of that run's metrics.json."""
    out = tmp_path / "cmp"
    cmd = [
        sys.executable,
        "python/compare_creation.py",
        "--task",
        "qm9",
        "--epochs",
        "1",
        "--creations",
        "iid",
        "topn",
        "--jobs",
        "2",
        "--out",
        str(out),
        "--",
        "--csv",
        str(SAMPLE),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--subset",
        "100",
        "--n-generated",
        "50",
        "--no-plots",
        "--pred-order",
        "type",
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads((out / "rows.json").read_text())
    assert [r["creation"] for r in rows] == ["iid", "topn"]  # the paper's row order
    for row in rows:
        metrics = json.loads((out / row["creation"] / "seed0" / "metrics.json").read_text())
        assert row == {k: metrics[k] for k in row}
        assert row["epochs"] == 1 and row["seed"] == 0
    table = (out / "table.md").read_text()
    assert "| Top-n (runs: 1) |" in table and "(59.9 ± 1.4)" in table
    assert "| i.i.d. (runs: 1) |" in table and "(34.9 ± 15.2)" in table
    assert "ordered by type" in table
    assert "authors_unique_and_valid" in rows[0]
    # the paper's validity and unique-and-valid beside both checks: 4 figures per row
    top = next(line for line in table.splitlines() if line.startswith("| Top-n"))
    assert top.count("(59.9 ± 1.4)") == 2 and top.count("(56.2 ± 1.1)") == 2
    assert "Wall time of this invocation" in table
    # --reuse keeps the finished runs and only writes the table again
    split = cmd.index("--")
    again = subprocess.run(
        [*cmd[:split], "--reuse", *cmd[split:]], cwd=ROOT, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "== " not in again.stdout  # no run started
    assert json.loads((out / "rows.json").read_text()) == rows
    assert "Every run was reused" in (out / "table.md").read_text()


def test_training_program_loss_weights(capsys):
    """--loss-weight TERM=W overrides one weight of GraphLossConfig; anything else is refused
    with a message naming the flag."""
    program = _load_program("train_graphvae")
    args = program.parse_args(
        ["--out", "x", "--loss-weight", "edges=640000", "--loss-weight", "kl=0.01"]
    )
    assert args.loss_weights == {"edges": 640000.0, "kl": 0.01}
    assert GraphLossConfig(**args.loss_weights).edges == 640000.0
    assert program.parse_args(["--out", "x"]).pred_order == "score"
    assert program.parse_args(["--out", "x", "--pred-order", "type"]).pred_order == "type"
    with pytest.raises(SystemExit):
        program.parse_args(["--out", "x", "--pred-order", "sorted"])
    assert "--pred-order" in capsys.readouterr().err
    for bad in ("total=1", "bonds=1", "edges=x", "edges=-1"):
        with pytest.raises(SystemExit):
            program.parse_args(["--out", "x", "--loss-weight", bad])
        assert "--loss-weight" in capsys.readouterr().err


def test_training_program_generates_under_both_checks():
    """train_graphvae.generate returns, in generation order, each molecule's SMILES under the
    strict check and under the authors' (fragments allowed), None where a check fails."""
    program = _load_program("train_graphvae")
    ethanol, ethanol_bonds = padded([C, C, O], [(0, 1, 1), (1, 2, 1)], 4)
    apart, apart_bonds = padded([C, C, O], [(0, 1, 1)], 4)
    five, five_bonds = padded([C] * 4, [(0, 1, 2), (0, 2, 2), (0, 3, 1)], 4)  # carbon valence 5
    empty = torch.full((4,), -1, dtype=torch.int64)
    graphs = [(ethanol, ethanol_bonds), (apart, apart_bonds), (five, five_bonds)]
    graphs.append((empty, torch.zeros(4, 4, dtype=torch.int64)))

    class Fixed(torch.nn.Module):
        def generate(self, num, authors_clip=False):
            picked = [graphs[k % len(graphs)] for k in range(num)]
            atoms = torch.stack([a for a, _ in picked])
            return atoms, (atoms >= 0).sum(1), torch.stack([b for _, b in picked])

    strict, authors = program.generate(Fixed(), 8, seed=0, authors_sizes=False)
    assert strict == ["CCO", None, None, None] * 2
    assert authors == ["CCO", "CC.O", None, None] * 2
    assert molecule_metrics(authors)["unique_and_valid"] == 2 / 8
    assert sanitized_smiles(graph_to_mol(empty, torch.zeros(4, 4, dtype=torch.int64))) is None


def test_curves_plot_the_periodic_checks_under_both_checks(tmp_path, monkeypatch):
    """curves.png's third panel plots the periodic checks: strict validity, unique and valid,
    and the authors' check where every check recorded it (older histories did not)."""
    import matplotlib.pyplot as plt

    program = _load_program("train_graphvae")
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    terms = dict.fromkeys(program.GRAPH_LOSS_TERMS, 1.0)
    check = {"validity": 0.05, "unique_and_valid": 0.04, "eval_size": 500}
    history = [
        {"epoch": 1, **terms, "lr": 2e-3},
        {"epoch": 2, **terms, "lr": 2e-3, **check, "authors_validity": 0.5},
        {"epoch": 4, **terms, "lr": 1e-3, **check, "authors_validity": 0.6},
    ]
    program.plot_curves(history, tmp_path / "both.png", "t")
    program.plot_curves(
        [{k: v for k, v in h.items() if k != "authors_validity"} for h in history],
        tmp_path / "strict.png",
        "t",
    )
    both, strict = (fig.axes[2] for fig in figures)
    assert [line.get_label() for line in both.get_lines()] == [
        "valid (strict)",
        "unique and valid (strict)",
        "sanitizes (authors' check)",
    ]
    assert list(both.get_lines()[2].get_xdata()) == [2, 4]
    assert list(both.get_lines()[2].get_ydata()) == [50.0, 60.0]
    assert list(both.get_lines()[0].get_ydata()) == [5.0, 5.0]
    assert len(strict.get_lines()) == 2
    assert (tmp_path / "both.png").stat().st_size > 0
    monkeypatch.undo()
    for fig in figures:
        plt.close(fig)
