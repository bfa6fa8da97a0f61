"""QM9 as padded dense molecular graphs (docs/graph_vae.md, Data).

Heavy atoms only: carbon, nitrogen, oxygen and fluorine (atom types 0..3) and kekulized bonds:
single, double and triple (bond types 1..3, 0 for no bond). A molecule has at most
``MAX_ATOMS`` = 9 heavy atoms. A set of molecules is stored as

- ``atoms`` (M, 9) int64: the atom type of each atom, ``PAD_ATOM`` (-1) past its length;
- ``lengths`` (M,) int64: the number of heavy atoms, in [1, 9];
- ``bonds`` (M, 9, 9) int64: symmetric bond types, 0 on the diagonal and on padding;
- ``smiles``: the canonical SMILES (RDKit, hydrogens removed) of each molecule.

Sources: a CSV file with a SMILES column that the caller names, or, when none is named, the
CSV files shipped inside the wheel of the optional package ``qm9pack`` (pip install
'topn_kernels[qm9]'), read directly (the package itself is never imported). RDKit parses each
SMILES, removes the hydrogens and kekulizes; molecules it cannot parse, or with another
element, more than 9 heavy atoms, another bond type or no heavy atom (hydrogens only, e.g.
"[H][H]"), are counted in a :class:`ParseReport` by reason and skipped. Molecules with formal
charges (580 zwitterions in QM9) are kept, as in the authors' data; their charges are not part
of the graph, and the report counts them.

Parsed tensors are cached on disk (``cache_dir``, default ``~/.cache/topn_kernels/qm9``), keyed
by the source file's path, size and modification time. :func:`split_qm9` is a fixed, seeded
split.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ATOM_SYMBOLS",
    "BOND_NAMES",
    "MAX_ATOMS",
    "PAD_ATOM",
    "ParseReport",
    "QM9Graphs",
    "default_cache_dir",
    "iterate_graph_batches",
    "load_qm9",
    "parse_smiles",
    "qm9pack_csv_files",
    "read_smiles_csv",
    "smiles_to_graph",
    "split_qm9",
]

ATOM_SYMBOLS = ("C", "N", "O", "F")
BOND_NAMES = ("SINGLE", "DOUBLE", "TRIPLE")  # bond types 1, 2, 3
MAX_ATOMS = 9
PAD_ATOM = -1
_CACHE_VERSION = 2  # 2: hydrogen-only molecules are counted "empty" (were "element")
_QM9PACK_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")


def _rdkit():
    """The RDKit ``Chem`` module, with its error log silenced (failures are counted instead)."""
    try:
        from rdkit import Chem, RDLogger
    except ImportError as err:  # pragma: no cover - rdkit is a dependency
        raise ImportError("QM9 parsing needs RDKit: pip install rdkit") from err
    RDLogger.DisableLog("rdApp.*")
    return Chem


@dataclass
class ParseReport:
    """What parsing kept and skipped: ``total`` SMILES read, ``kept``, ``skipped`` (reason ->
    count; reasons: "unparsable", "element", "too_many_atoms", "bond_type", "empty"), and
    ``charged``, the kept molecules with a formal charge (their charges are dropped)."""

    total: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    charged: int = 0
    source: str = ""

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "total": self.total,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "num_skipped": self.num_skipped,
            "charged_kept": self.charged,
        }

    def summary(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"{self.kept} of {self.total} molecules kept from {self.source or 'SMILES'}; "
            f"skipped {self.num_skipped} ({reasons}); {self.charged} kept with formal charges"
        )


@dataclass
class QM9Graphs:
    """Padded molecular graphs: atoms (M, 9) int64 (-1 past each length), lengths (M,) int64,
    bonds (M, 9, 9) int64 symmetric in {0, 1, 2, 3}, smiles (M canonical SMILES)."""

    atoms: Tensor
    lengths: Tensor
    bonds: Tensor
    smiles: list[str]

    def __post_init__(self) -> None:
        m = self.atoms.shape[0]
        if self.atoms.shape != (m, MAX_ATOMS) or self.lengths.shape != (m,):
            raise ValueError(
                f"atoms must be (M, {MAX_ATOMS}) and lengths (M,), got "
                f"{tuple(self.atoms.shape)} and {tuple(self.lengths.shape)}"
            )
        if self.bonds.shape != (m, MAX_ATOMS, MAX_ATOMS) or len(self.smiles) != m:
            raise ValueError(
                f"bonds must be (M, {MAX_ATOMS}, {MAX_ATOMS}) with M SMILES, got "
                f"{tuple(self.bonds.shape)} and {len(self.smiles)} SMILES for M={m}"
            )

    def __len__(self) -> int:
        return self.atoms.shape[0]

    def subset(self, index: Tensor | Sequence[int]) -> QM9Graphs:
        """The molecules at ``index`` (a 1-D integer tensor or sequence), in that order."""
        index = torch.as_tensor(index, dtype=torch.int64)
        if index.dim() != 1:
            raise ValueError(f"index must be 1-D, got shape {tuple(index.shape)}")
        return QM9Graphs(
            self.atoms[index],
            self.lengths[index],
            self.bonds[index],
            [self.smiles[i] for i in index.tolist()],
        )

    def size_counts(self) -> Tensor:
        """(MAX_ATOMS + 1,) int64: how many molecules have each number of heavy atoms."""
        return torch.bincount(self.lengths, minlength=MAX_ATOMS + 1)


def smiles_to_graph(smiles: str) -> tuple[list[int], list[tuple[int, int, int]], str, bool]:
    """One SMILES -> (atom types, bonds as (i, j, type) with i < j, canonical SMILES, charged).

    Hydrogens are removed and the molecule kekulized. Raises ValueError naming the reason
    ("unparsable", "element", "too_many_atoms", "bond_type", "empty") as its first word;
    "empty" is a molecule of hydrogens only (no heavy atom, e.g. "[H][H]" or "[HH]"), and a
    hydrogen RDKit keeps beside heavy atoms (an isotope, e.g. "[2H]C") is an "element".
    """
    if not isinstance(smiles, str):
        raise TypeError(f"smiles must be a str, got {type(smiles).__name__}")
    chem = _rdkit()
    mol = chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"unparsable: RDKit cannot parse {smiles!r}")
    mol = chem.RemoveHs(mol)
    canonical = chem.MolToSmiles(mol)
    try:
        chem.Kekulize(mol, clearAromaticFlags=True)
    except Exception as err:
        raise ValueError(f"unparsable: {smiles!r} cannot be kekulized ({err})") from err
    # RemoveHs keeps hydrogens bonded only to hydrogens, and isotopes or lone ions ("[H][H]",
    # "[HH]", "[H+]"): the heavy atoms are those that are not hydrogen
    n = sum(atom.GetAtomicNum() != 1 for atom in mol.GetAtoms())
    if n == 0:
        raise ValueError(f"empty: {smiles!r} has no heavy atom")
    if n > MAX_ATOMS:
        raise ValueError(f"too_many_atoms: {smiles!r} has {n} heavy atoms (> {MAX_ATOMS})")
    atoms, charged = [], False
    for atom in mol.GetAtoms():
        symbol = atom.GetSymbol()
        if symbol not in ATOM_SYMBOLS:
            raise ValueError(f"element: {smiles!r} contains {symbol}")
        atoms.append(ATOM_SYMBOLS.index(symbol))
        charged = charged or atom.GetFormalCharge() != 0
    bonds = []
    for bond in mol.GetBonds():
        name = str(bond.GetBondType())
        if name not in BOND_NAMES:
            raise ValueError(f"bond_type: {smiles!r} has a {name} bond")
        i, j = sorted((bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()))
        bonds.append((i, j, BOND_NAMES.index(name) + 1))
    return atoms, bonds, canonical, charged


def parse_smiles(smiles: Iterable[str], source: str = "") -> tuple[QM9Graphs, ParseReport]:
    """Parses SMILES strings into :class:`QM9Graphs`, skipping (and counting by reason) the
    molecules :func:`smiles_to_graph` rejects. The kept molecules keep their input order."""
    report = ParseReport(source=source)
    smiles = list(smiles)
    atoms_arr = np.full((len(smiles), MAX_ATOMS), PAD_ATOM, dtype=np.int64)
    bonds_arr = np.zeros((len(smiles), MAX_ATOMS, MAX_ATOMS), dtype=np.int64)
    lengths, canon = [], []
    for s in smiles:
        report.total += 1
        try:
            atoms, bonds, canonical, charged = smiles_to_graph(str(s).strip())
        except ValueError as err:
            reason = str(err).split(":", 1)[0]
            report.skipped[reason] = report.skipped.get(reason, 0) + 1
            continue
        k = report.kept
        atoms_arr[k, : len(atoms)] = atoms
        for i, j, t in bonds:
            bonds_arr[k, i, j] = bonds_arr[k, j, i] = t
        lengths.append(len(atoms))
        canon.append(canonical)
        report.kept += 1
        report.charged += int(charged)
    k = report.kept
    graphs = QM9Graphs(
        torch.from_numpy(atoms_arr[:k].copy()),
        torch.tensor(lengths, dtype=torch.int64).reshape(k),
        torch.from_numpy(bonds_arr[:k].copy()),
        canon,
    )
    return graphs, report


def read_smiles_csv(path: str | os.PathLike, column: str = "smiles") -> list[str]:
    """The ``column`` values (matched case-insensitively) of a CSV file with a header row.
    Lines before the header that start with '#' are comments."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"csv: no file {str(path)!r}")
    csv.field_size_limit(sys.maxsize)  # qm9pack rows hold long coordinate fields
    with path.open(newline="") as f:
        lines = (line for line in f if not line.startswith("#"))
        reader = csv.reader(lines)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"csv: {str(path)!r} is empty")
        names = [h.strip().lower() for h in header]
        if column.lower() not in names:
            raise ValueError(
                f"csv: {str(path)!r} has no column {column!r} (columns: {', '.join(header)})"
            )
        at = names.index(column.lower())
        return [row[at] for row in reader if len(row) > at and row[at].strip()]


def qm9pack_csv_files() -> list[Path] | None:
    """The QM9 CSV files inside the installed ``qm9pack`` wheel, or None when it is absent.
    The package is located, not imported (its import needs setuptools' pkg_resources)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = [folder / name for name in _QM9PACK_FILES]
    return files if all(f.is_file() for f in files) else None


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/topn_kernels/qm9`` (``~/.cache/topn_kernels/qm9`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "topn_kernels" / "qm9"


def _cache_key(files: list[Path], column: str) -> str:
    h = hashlib.sha1(f"v{_CACHE_VERSION}:{column}".encode())
    for f in files:
        st = f.stat()
        h.update(f"|{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load_qm9(
    csv_path: str | os.PathLike | None = None,
    *,
    column: str = "smiles",
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> tuple[QM9Graphs, ParseReport]:
    """All parseable molecules of the source, in file order, and the parse report.

    Args:
        csv_path: a CSV file with a SMILES column; None: the data of the ``qm9pack`` package.
        column: the SMILES column's name (case-insensitive).
        cache_dir: where parsed tensors are cached (default :func:`default_cache_dir`).
        use_cache: read and write the cache.

    Raises:
        FileNotFoundError: ``csv_path`` does not exist, or it is None and qm9pack is not
            installed (the message names both options).
    """
    if not isinstance(column, str):
        raise TypeError(f"column must be a str, got {type(column).__name__}")
    if csv_path is not None:
        files = [Path(csv_path)]
        if not files[0].is_file():
            raise FileNotFoundError(f"csv_path: no file {str(csv_path)!r}")
        source = str(files[0])
    else:
        files = qm9pack_csv_files()
        if files is None:
            raise FileNotFoundError(
                "QM9 needs a source: pass csv_path (a CSV file with a SMILES column, e.g. "
                "MoleculeNet's qm9.csv; the program option --csv), or install the optional "
                "package qm9pack (pip install 'topn_kernels[qm9]' or pip install qm9pack), "
                "which ships QM9 in its wheel"
            )
        source = "qm9pack"
    cache_file = None
    if use_cache:
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        cache_file = folder / f"qm9_{_cache_key(files, column)}.pt"
        if cache_file.is_file():
            blob = torch.load(cache_file, weights_only=True)
            graphs = QM9Graphs(blob["atoms"], blob["lengths"], blob["bonds"], blob["smiles"])
            report = ParseReport(**blob["report"])
            return graphs, report
    smiles: list[str] = []
    for f in files:
        smiles += read_smiles_csv(f, column)
    graphs, report = parse_smiles(smiles, source=source)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        torch.save(
            {
                "atoms": graphs.atoms,
                "lengths": graphs.lengths,
                "bonds": graphs.bonds,
                "smiles": graphs.smiles,
                "report": {
                    "total": report.total,
                    "kept": report.kept,
                    "skipped": report.skipped,
                    "charged": report.charged,
                    "source": report.source,
                },
            },
            tmp,
        )
        tmp.replace(cache_file)
    return graphs, report


def split_qm9(
    graphs: QM9Graphs, seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> dict[str, QM9Graphs]:
    """A fixed split into "train", "val" and "test": a permutation drawn from ``seed`` (its own
    generator; the global RNG is untouched) cut at the cumulative ``fractions``."""
    if (
        isinstance(fractions, str)
        or len(fractions) != 3
        or not all(isinstance(f, (int, float)) and 0 <= f <= 1 for f in fractions)
        or abs(sum(fractions) - 1) > 1e-6
    ):
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    m = len(graphs)
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    n_train = round(fractions[0] * m)
    n_val = round(fractions[1] * m)
    return {
        "train": graphs.subset(perm[:n_train]),
        "val": graphs.subset(perm[n_train : n_train + n_val]),
        "test": graphs.subset(perm[n_train + n_val :]),
    }


def iterate_graph_batches(
    graphs: QM9Graphs, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Shuffled batches (``generator``; None keeps the order) of (atoms (b, w), lengths (b,),
    bonds (b, w, w)), cut to the batch's largest molecule w."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    m = len(graphs)
    order = torch.randperm(m, generator=generator) if generator is not None else torch.arange(m)
    for start in range(0, m, batch_size):
        idx = order[start : start + batch_size]
        lengths = graphs.lengths[idx]
        w = int(lengths.max())
        yield graphs.atoms[idx, :w], lengths, graphs.bonds[idx, :w, :w]
