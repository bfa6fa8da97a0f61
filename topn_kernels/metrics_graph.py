"""Molecule metrics of generated graphs, measured with RDKit (docs/graph_vae.md, Metrics).

- A generated graph is *valid* when RDKit builds and sanitizes the molecule (valences and
  kekulé structure), its canonical SMILES parses again, and that SMILES is one connected
  molecule (no '.').
- ``validity``: valid molecules / generated molecules.
- ``unique_and_valid``: distinct canonical SMILES among the valid molecules / generated.
- ``uniqueness``: distinct canonical SMILES among the valid molecules / valid molecules.
- ``novelty``: distinct valid SMILES absent from the training SMILES / distinct valid SMILES.
- ``sanitizes`` (:func:`graphs_sanitize`): RDKit sanitizes the molecule, fragments allowed:
  the validity of the authors' released training program (the only molecule metric it runs),
  which counts disconnected molecules as valid. Its uniqueness counts the distinct SMILES that
  RDKit writes for those molecules (:func:`sanitized_smiles`, fragments joined by '.').

Atom types index ``topn_kernels.data.qm9.ATOM_SYMBOLS`` (C, N, O, F); bond types are 0 (none),
1 (single), 2 (double) and 3 (triple).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from .data.qm9 import ATOM_SYMBOLS, BOND_NAMES, PAD_ATOM
from .ops._checks import integer_dtype

__all__ = [
    "INVALID",
    "canonical_smiles",
    "check_graphs",
    "graph_to_mol",
    "graphs_sanitize",
    "graphs_to_smiles",
    "molecule_metrics",
    "sanitized_smiles",
    "valid_smiles",
]

INVALID = "INVALID"


def _chem():
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    return Chem


def graph_to_mol(atoms: Sequence[int] | Tensor, bonds: Tensor):
    """An unsanitized RDKit ``RWMol`` from integer atom types (n,) (entries equal to -1 are
    padding and must come last) and an integer bond-type matrix (>= n, >= n), symmetric with a
    zero diagonal over the real atoms."""
    chem = _chem()
    atoms_t, bonds = torch.as_tensor(atoms), torch.as_tensor(bonds)
    for name, t in (("atoms", atoms_t), ("bonds", bonds)):
        if not integer_dtype(t.dtype):
            raise TypeError(f"{name} must hold integers, got {t.dtype}")
    atoms = atoms_t.tolist()
    if PAD_ATOM in atoms:
        real = atoms.index(PAD_ATOM)
        if any(a != PAD_ATOM for a in atoms[real:]):
            raise ValueError(f"atoms: padding (-1) must come last, got {atoms}")
        atoms = atoms[:real]
    if bonds.dim() != 2 or min(bonds.shape) < len(atoms):
        raise ValueError(
            f"bonds must be a matrix of at least {len(atoms)} x {len(atoms)}, got "
            f"{tuple(bonds.shape)}"
        )
    square = bonds[: len(atoms), : len(atoms)]
    if not torch.equal(square, square.T) or bool(square.diagonal().any()):
        raise ValueError("bonds must be symmetric with a zero diagonal over the real atoms")
    mol = chem.RWMol()
    for a in atoms:
        if not 0 <= a < len(ATOM_SYMBOLS):
            raise ValueError(f"atoms must be in [0, {len(ATOM_SYMBOLS)}) or -1, got {a}")
        mol.AddAtom(chem.Atom(ATOM_SYMBOLS[a]))
    n = len(atoms)
    sub = bonds[:n, :n]
    for i, j in torch.nonzero(torch.triu(sub, diagonal=1)).tolist():
        t = int(sub[i, j])
        if not 1 <= t <= len(BOND_NAMES):
            raise ValueError(f"bonds must be in [0, {len(BOND_NAMES)}], got {t}")
        mol.AddBond(i, j, getattr(chem.BondType, BOND_NAMES[t - 1]))
    return mol


def valid_smiles(mol) -> str | None:
    """The canonical SMILES of an RDKit molecule when it is valid (sanitizes, its SMILES parses
    again, one fragment), else None. ``mol`` is not modified."""
    return _strict(sanitized_smiles(mol))


def _strict(smiles: str | None) -> str | None:
    """The strict check of a :func:`sanitized_smiles` result: it parses again, one fragment."""
    if smiles is None:
        return None
    chem = _chem()
    again = chem.MolFromSmiles(smiles)
    if again is None or again.GetNumAtoms() == 0:
        return None
    canonical = chem.MolToSmiles(again)
    return None if "." in canonical else canonical


def canonical_smiles(smiles: str) -> str | None:
    """``valid_smiles`` of a SMILES string parsed without sanitization (None if it does not
    parse): the validity test applied to a SMILES string."""
    if not isinstance(smiles, str):
        raise TypeError(f"smiles must be a str, got {type(smiles).__name__}")
    chem = _chem()
    return valid_smiles(chem.MolFromSmiles(smiles, sanitize=False))


def graphs_to_smiles(atoms: Tensor, bonds: Tensor) -> list[str | None]:
    """Canonical SMILES (None when invalid) of each graph of a batch: atoms (B, n) int with -1
    past each molecule's atoms, bonds (B, n, n) int symmetric."""
    return [valid_smiles(mol) for mol in _batch_mols(atoms, bonds)]


def _batch_mols(atoms: Tensor, bonds: Tensor) -> list:
    """:func:`graph_to_mol` of each graph of a batch, inputs as :func:`graphs_to_smiles`."""
    if not isinstance(atoms, Tensor) or atoms.dim() != 2:
        raise TypeError("atoms must be an integer tensor (B, n)")
    if not isinstance(bonds, Tensor) or bonds.shape != (*atoms.shape, atoms.shape[1]):
        raise ValueError(
            f"bonds must be a tensor {(*atoms.shape, atoms.shape[1])}, got "
            f"{tuple(bonds.shape) if isinstance(bonds, Tensor) else type(bonds).__name__}"
        )
    atoms, bonds = atoms.cpu(), bonds.cpu()
    return [graph_to_mol(atoms[b], bonds[b]) for b in range(atoms.shape[0])]


def molecule_metrics(
    generated: Sequence[str | None], training_smiles: Iterable[str] | None = None
) -> dict[str, float | int]:
    """Validity metrics of a list of generated molecules, each its canonical SMILES or None
    (or ``INVALID``) when invalid (as :func:`graphs_to_smiles` returns them).

    ``training_smiles``: canonical SMILES of the training set, for ``novelty`` (NaN without
    them, or without any valid molecule). Returns ``validity``, ``unique_and_valid``,
    ``uniqueness`` (0 without any valid molecule), ``novelty``, ``num_generated``,
    ``num_valid`` and ``num_unique``.
    """
    if (
        isinstance(generated, str)
        or not isinstance(generated, Sequence)
        or not all(s is None or isinstance(s, str) for s in generated)
    ):
        raise TypeError("generated must be a sequence of SMILES strings or None")
    if isinstance(training_smiles, str):
        raise TypeError("training_smiles must be an iterable of SMILES strings, not one string")
    if len(generated) == 0:
        raise ValueError("generated must hold at least one molecule")
    valid = [s for s in generated if s is not None and s != INVALID]
    unique = set(valid)
    novelty = float("nan")
    if training_smiles is not None and unique:
        novelty = len(unique - set(training_smiles)) / len(unique)
    return {
        "validity": len(valid) / len(generated),
        "unique_and_valid": len(unique) / len(generated),
        "uniqueness": len(unique) / len(valid) if valid else 0.0,
        "novelty": novelty,
        "num_generated": len(generated),
        "num_valid": len(valid),
        "num_unique": len(unique),
    }


def sanitized_smiles(mol) -> str | None:
    """The canonical SMILES of a sanitized copy of ``mol`` when RDKit sanitizes it, fragments
    allowed (joined by '.'), else None: what the authors' released code counts as a valid
    molecule, and the string its uniqueness compares."""
    chem = _chem()
    if mol is None:
        return None
    mol = chem.Mol(mol)
    if mol.GetNumAtoms() == 0:
        return None
    try:
        chem.SanitizeMol(mol)
    except Exception:
        return None
    return chem.MolToSmiles(mol)


def sanitizes(mol) -> bool:
    """Whether RDKit sanitizes a copy of ``mol`` (fragments allowed): the authors' validity."""
    return sanitized_smiles(mol) is not None


def graphs_sanitize(atoms: Tensor, bonds: Tensor) -> list[bool]:
    """:func:`sanitizes` of each graph of a batch, inputs as :func:`graphs_to_smiles`."""
    return [sanitizes(mol) for mol in _batch_mols(atoms, bonds)]


def check_graphs(atoms: Tensor, bonds: Tensor) -> tuple[list[str | None], list[str | None]]:
    """Both checks of a batch, each molecule built once: per graph its :func:`valid_smiles`
    (the strict check) and its :func:`sanitized_smiles` (the authors' check), None where the
    check fails. Inputs as :func:`graphs_to_smiles`."""
    authors = [sanitized_smiles(mol) for mol in _batch_mols(atoms, bonds)]
    return [_strict(smiles) for smiles in authors], authors
