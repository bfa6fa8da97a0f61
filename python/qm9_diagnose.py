"""Where a trained QM9 graph VAE loses its molecules (python/results/table5_qm9.md): how well it
reconstructs training molecules, and how valid the molecules it draws are from the data's
latents against the prior's.

    python python/qm9_diagnose.py python/results/qm9_variants/topn_type_edges640000 [RUN ...]

For each run directory (a ``train_graphvae.py --out`` with its ``checkpoint.pt``), on the first
``--molecules`` molecules of the training split (the run's data, ``--seed`` split and
``--subset``):

- reconstruction from the latent mean, after the run's own matching (``--pred-order``): the
  share of atom pairs whose bond / no-bond decision (bond probability > 1/2) is right, the
  base rate of no-bond pairs, the bond cross-entropy per pair, and the share of molecules
  reconstructed exactly (most likely atom types, bonds and bond types);
- the latent codes: KL per molecule (nats), the encoder's mean sigma, the spread of its
  means across molecules, and the active dimensions (those whose mean varies across molecules
  with a variance above 0.01, Burda et al. 2016);
- molecules drawn as ``GraphVAE.generate`` draws them, with the sizes of those molecules, from
  z = mu (the encoder's mean), z = mu + sigma * eps (the posterior) and z ~ N(0, I) (the
  prior, as the run's ``validity`` draws them, there with sizes drawn from the training
  distribution), and from a diagonal Gaussian fitted to the codes of those molecules (the mean
  of mu, per dimension the variance of mu plus the mean of sigma^2: the aggregate posterior's
  first two moments), and from the Gaussian of its mean and full covariance (the covariance of
  mu plus the mean of sigma^2 on the diagonal, ``fitted_full``), and from one diagonal Gaussian
  per molecule size fitted to the codes of the molecules of that size (``fitted_by_size``);
  also from posterior samples decoded each at a size other than its molecule's, drawn from the
  other molecules' sizes (``posterior_other_sizes``: how much the decoder's size must agree
  with its code). For each: valid %
  (the strict check: RDKit sanitizes, one connected molecule), sanitizes % (fragments allowed),
  and the mean number of drawn bonds and of connected components per molecule;
- with ``--mixtures K:COV ...`` (scikit-learn), also from Gaussian mixtures of K components
  (covariance ``full`` or ``diag``) fitted by EM (seeded by ``--seed``) to one posterior sample
  of each of the first ``--fit-molecules`` training molecules, the same samples for every K:
  the ex-post density estimate of Ghosh et al. 2020, a prior that can take a non-Gaussian shape.

Prints one JSON object per run; ``--json PATH`` also writes them as a list.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_graphvae

from topn_kernels.data import qm9pack_csv_files
from topn_kernels.metrics_graph import check_graphs
from topn_kernels.models import GraphLossConfig, GraphVAE, GraphVAEConfig
from topn_kernels.models.graphvae import _pair_mask, match_graphs


def reconstruction(model: GraphVAE, atoms, lengths, bonds, pred_order: str) -> dict:
    x, e, mask = model.one_hot(atoms, lengths, bonds)
    mu, _ = model.encoder(x, e, mask)
    dec = model.decoder(mu, mask.sum(1), atoms.shape[1])
    neighbor = GraphLossConfig().neighbor  # the matching score train_graphvae.py trains with
    dec, t_atoms, t_bonds = match_graphs(dec, atoms, bonds, mask, neighbor, pred_order)
    pair = _pair_mask(mask)
    log_bond, log_none, log_types = dec.edge_log_probs()
    bonded = (t_bonds > 0) & pair
    predicted = (log_bond > log_none) & pair
    pred_bonds = torch.where(predicted, log_types.argmax(-1) + 1, torch.zeros_like(t_bonds))
    atoms_ok = ((dec.atom_logits.argmax(-1) == t_atoms) | ~mask).all(1)
    bonds_ok = ((pred_bonds == t_bonds) | ~pair).all((1, 2))
    pairs = pair.sum()
    return {
        "pair_accuracy": float(((predicted == bonded) & pair).sum() / pairs),
        "no_bond_rate": float(1 - bonded.sum() / pairs),
        "bond_bce": float(-torch.where(bonded, log_bond, log_none)[pair].mean()),
        "atoms_exact": float(atoms_ok.float().mean()),
        "exact": float((atoms_ok & bonds_ok).float().mean()),
    }


def graph_shape(bonds: torch.Tensor, lengths: torch.Tensor) -> tuple[float, float]:
    """Mean bonds and mean connected components per molecule of bonds (M, w, w) (symmetric,
    0 for no bond), counting the first lengths[m] atoms of molecule m only (1 <= lengths <= w).
    """
    if not isinstance(bonds, torch.Tensor) or bonds.dim() != 3 or bonds.shape[1] != bonds.shape[2]:
        raise ValueError(f"bonds must be a tensor (M, w, w), got {getattr(bonds, 'shape', bonds)}")
    if (
        not isinstance(lengths, torch.Tensor)
        or lengths.shape != bonds.shape[:1]
        or lengths.is_floating_point()
        or lengths.is_complex()
    ):
        raise ValueError(f"lengths must be an integer tensor ({bonds.shape[0]},) matching bonds")
    if len(lengths) == 0:
        raise ValueError("bonds must hold at least one molecule")
    if int(lengths.min()) < 1 or int(lengths.max()) > bonds.shape[1]:
        raise ValueError(f"lengths must be in [1, {bonds.shape[1]}], got {lengths.tolist()}")
    drawn = components = 0
    for adjacency, n in zip(bonds, lengths.tolist(), strict=True):
        graph = csr_matrix(adjacency[:n, :n].numpy() > 0)
        drawn += graph.nnz // 2
        components += connected_components(graph, directed=False, return_labels=False)
    return drawn / len(lengths), components / len(lengths)


def drawn_validity(model: GraphVAE, z, lengths) -> dict:
    atoms, _, bonds = model.generate(z.shape[0], lengths, z=z)
    smiles, sanitized = check_graphs(atoms, bonds)
    valid = sum(s is not None for s in smiles)
    sanitizes = sum(s is not None for s in sanitized)
    bonds_per, components_per = graph_shape(bonds, lengths)
    return {
        "valid": valid / z.shape[0],
        "sanitizes": sanitizes / z.shape[0],
        "bonds": bonds_per,
        "components": components_per,
    }


def diagnose(run: Path, splits_by_source: dict, args) -> dict:
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    saved = ckpt["args"]
    source = (
        saved.get("csv"),
        saved.get("smiles_column", "smiles"),
        int(saved.get("seed", 0)),
        saved.get("subset"),
    )
    if source[0] is None and qm9pack_csv_files() is None:
        raise SystemExit(f"{run} was trained on qm9pack, which is not installed here")
    if source not in splits_by_source:  # the run's own data, split and subset
        data_args = train_graphvae.parse_args(["--out", str(run), "--seed", str(source[2])])
        data_args.csv = None if source[0] is None else Path(source[0])
        data_args.smiles_column = source[1]
        data_args.subset = source[3]
        if saved.get("cache_dir") is not None:
            data_args.cache_dir = Path(saved["cache_dir"])
        with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON rows only
            splits_by_source[source] = train_graphvae.load_data(data_args)[0]
    train = splits_by_source[source]["train"]
    index = torch.arange(min(args.molecules, len(train)))
    atoms, lengths, bonds = train.atoms[index], train.lengths[index], train.bonds[index]
    model = GraphVAE(GraphVAEConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    row: dict = {"run": str(run), "epochs": ckpt["epoch"] + 1, "molecules": len(index)}
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(args.seed)
        row["reconstruction"] = reconstruction(
            model, atoms, lengths, bonds, ckpt["args"].get("pred_order", "score")
        )
        x, e, mask = model.one_hot(atoms, lengths, bonds)
        mu, log_var = model.encoder(x, e, mask)
        sigma = (0.5 * log_var).exp()
        kl = -0.5 * (1 + log_var - mu**2 - log_var.exp()).sum(1)
        mu_var = mu.var(0)
        row["latent"] = {
            "kl_per_molecule": float(kl.mean()),
            "mean_sigma": float(sigma.mean()),
            "mean_std_of_mu": float(mu.std(0).mean()),
            "active_dims": int((mu_var > 0.01).sum()),
        }
        # the aggregate posterior's mean and per-dimension variance, as one diagonal Gaussian
        spread = (mu_var + sigma.pow(2).mean(0)).sqrt()
        row["drawn"] = {
            "mu": drawn_validity(model, mu, lengths),
            "posterior": drawn_validity(model, mu + sigma * torch.randn_like(mu), lengths),
            "prior": drawn_validity(model, torch.randn_like(mu), lengths),
            "fitted": drawn_validity(model, mu.mean(0) + spread * torch.randn_like(mu), lengths),
            "fitted_full": drawn_validity(model, _full_gaussian(mu, sigma), lengths),
            "fitted_by_size": drawn_validity(model, _by_size(mu, sigma, lengths), lengths),
            "posterior_other_sizes": drawn_validity(
                model, mu + sigma * torch.randn_like(mu), _other_sizes(lengths)
            ),
        }
        if args.mixtures:
            codes = _posterior_codes(model, train, args.fit_molecules)
        for spec in args.mixtures:
            z = _mixture(codes, spec, len(index), args.seed)
            row["drawn"][f"mixture_{spec}"] = drawn_validity(model, z, lengths)
    return row


def _other_sizes(lengths: torch.Tensor) -> torch.Tensor:
    """For each molecule, a size drawn uniformly from the sizes of the molecules whose size is
    not its own (its own size where every molecule has it)."""
    out = lengths.clone()
    for n in lengths.unique():
        same, others = lengths == n, lengths[lengths != n]
        if len(others):
            out[same] = others[torch.randint(len(others), (int(same.sum()),))]
    return out


def _by_size(mu: torch.Tensor, sigma: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Draws (M, L): for each molecule, from the diagonal Gaussian fitted to the codes of the
    molecules of its size (a size with a single molecule: that molecule's posterior)."""
    z = torch.empty_like(mu)
    for n in lengths.unique():
        same = lengths == n
        spread = sigma[same].pow(2).mean(0)
        if int(same.sum()) > 1:
            spread = spread + mu[same].var(0)
        z[same] = mu[same].mean(0) + spread.sqrt() * torch.randn_like(mu[same])
    return z


def _posterior_codes(model: GraphVAE, train, count: int) -> torch.Tensor:
    """One posterior sample (count, L) of each of the first ``count`` training molecules."""
    codes = []
    for chunk in torch.arange(min(count, len(train))).split(4096):
        x, e, mask = model.one_hot(train.atoms[chunk], train.lengths[chunk], train.bonds[chunk])
        mu, log_var = model.encoder(x, e, mask)
        codes.append(mu + (0.5 * log_var).exp() * torch.randn_like(mu))
    return torch.cat(codes)


def _mixture(codes: torch.Tensor, spec: str, num: int, seed: int) -> torch.Tensor:
    """Draws (num, L) from a Gaussian mixture ``K:COV`` fitted to ``codes`` (M, L) by
    scikit-learn's EM, seeded by ``seed``, in random order."""
    try:
        from sklearn.mixture import GaussianMixture
    except ImportError:
        raise SystemExit("--mixtures needs scikit-learn (pip install scikit-learn)") from None
    k, covariance = spec.split(":")
    if int(k) > len(codes):
        raise SystemExit(f"--mixtures {spec}: more components than the {len(codes)} codes fitted")
    gmm = GaussianMixture(int(k), covariance_type=covariance, reg_covar=1e-4, random_state=seed)
    gmm.fit(codes.double().numpy())
    z, _ = gmm.sample(num)  # grouped by component: shuffled so that sizes are drawn independently
    z = np.random.default_rng(seed).permutation(z)
    return torch.from_numpy(z).to(codes.dtype)


def _full_gaussian(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Draws (M, L) from the Gaussian of the aggregate posterior's mean and full covariance:
    the covariance of the means plus the mean of the diagonal sigma^2 (in float64)."""
    mu, var = mu.double(), sigma.double().pow(2).mean(0)
    cov = torch.cov(mu.T) + torch.diag(var)
    dist = torch.distributions.MultivariateNormal(mu.mean(0), covariance_matrix=cov)
    return dist.sample((mu.shape[0],)).to(sigma.dtype)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+", help="train_graphvae.py output directories")
    p.add_argument("--molecules", type=int, default=1000, help="training molecules to use")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws")
    p.add_argument("--json", type=Path, help="also write the rows to this file")
    p.add_argument(
        "--mixtures",
        nargs="*",
        default=[],
        metavar="K:COV",
        help="also draw from Gaussian mixtures of K components, COV full or diag (scikit-learn)",
    )
    p.add_argument(
        "--fit-molecules",
        type=int,
        default=20000,
        help="training molecules whose posterior samples the mixtures are fitted to",
    )
    args = p.parse_args(argv)
    for spec in args.mixtures:
        k, _, covariance = spec.partition(":")
        if not (k.isascii() and k.isdigit()) or int(k) < 1 or covariance not in ("full", "diag"):
            p.error(f"--mixtures takes K:full or K:diag with K >= 1, got {spec!r}")
    if args.fit_molecules < 2:
        p.error("--fit-molecules must be >= 2")
    for spec in args.mixtures:
        if int(spec.partition(":")[0]) > args.fit_molecules:
            p.error(f"--mixtures {spec}: more components than --fit-molecules {args.fit_molecules}")
    for run in args.runs:
        if not (run / "checkpoint.pt").is_file():
            p.error(f"{run}/checkpoint.pt not found")
    if args.molecules < 2:
        p.error("--molecules must be >= 2")
    splits_by_source: dict = {}
    rows = []
    for run in args.runs:
        rows.append(diagnose(run, splits_by_source, args))
        print(json.dumps(rows[-1]), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
