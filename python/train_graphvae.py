"""Train the Set2Graph VAE on QM9 and measure its generated molecules with RDKit
(docs/graph_vae.md).

    python python/train_graphvae.py --creation topn --epochs 30 --seed 0 --out runs/qm9_topn
    python python/train_graphvae.py --creation topn --epochs 30 --seed 0 --out runs/qm9_topn \\
        --resume --max-minutes 60
    python python/train_graphvae.py --epochs 1 --subset 2000 --out runs/qm9_smoke

Data: ``--csv PATH`` (a CSV file with a SMILES column, e.g. MoleculeNet's qm9.csv), else the
optional package qm9pack (pip install 'topn_kernels[qm9]'), else, with a note, the 400-molecule
sample committed in tests/data/qm9_sample.csv (a smoke test, not a real training set). The
molecules are split 80/10/10 with ``--seed``; ``--subset N`` trains on the first N molecules of
the (shuffled) training split. Parsed tensors are cached in ``--cache-dir``.

Training: Adam, learning rate ``--lr`` (2e-3), halved when the epoch's total loss has not
improved for ``--patience`` epochs, gradients clipped to norm 4, batches of ``--batch-size``
(512) shuffled molecules padded to the batch's largest. ``--max-minutes`` stops cleanly after
the epoch that passes the limit (checkpoint written, no evaluation); ``--resume`` continues
from ``--out/checkpoint.pt`` (model, optimizer, scheduler, random state and history).
``--init-from CKPT`` starts a new run from another run's model weights (a fresh optimizer,
schedule and history; metrics.json records CKPT), e.g. to go on with other loss weights.

Matching: the loss sorts the target's atoms by the paper's score and orders the predicted
atoms by ``--pred-order`` (score, the authors' way, by default; type and slot give each decoder
slot a target that does not move between steps).

Writes into ``--out``: ``metrics.json`` (``validity``, ``unique_and_valid``, ``uniqueness``,
``novelty``; ``authors_validity``, ``authors_unique_and_valid`` and ``authors_uniqueness``, the
same under the released code's check (RDKit sanitizes, fragments allowed); the final epoch's
weighted loss terms ``train_losses``, time per epoch, the data report and the settings),
``history.json`` (per-epoch losses), ``generated.smi`` (one line per generated molecule in
generation order: its canonical SMILES or INVALID), ``curves.png`` (loss terms, learning rate,
and the periodic checks' validity under both checks), ``molecules.png`` (a grid of valid
generated molecules drawn by RDKit) and ``checkpoint.pt``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from topn_kernels.data import (
    iterate_graph_batches,
    load_qm9,
    qm9pack_csv_files,
    split_qm9,
)
from topn_kernels.metrics_graph import INVALID, check_graphs, molecule_metrics
from topn_kernels.models import (
    GRAPH_CREATIONS,
    GRAPH_LOSS_TERMS,
    GraphLossConfig,
    GraphVAE,
    GraphVAEConfig,
    graph_vae_loss,
)
from topn_kernels.models.graphvae import PRED_ORDERS

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CSV = ROOT / "tests" / "data" / "qm9_sample.csv"
MIN_LR = 1e-6
CLIP_NORM = 4.0
# the authors' check (sanitizes, fragments allowed): its metrics, as authors_<key> in metrics.json
AUTHORS_KEYS = ("validity", "unique_and_valid", "uniqueness")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--creation", choices=GRAPH_CREATIONS, default="topn", help="set creation")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    p.add_argument("--subset", type=int, help="train on this many molecules of the train split")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the model and training")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--csv", type=Path, help="CSV file with a SMILES column (default: qm9pack)")
    p.add_argument("--smiles-column", default="smiles", help="the CSV's SMILES column")
    p.add_argument("--cache-dir", type=Path, help="parsed-data cache (~/.cache/topn_kernels/qm9)")
    p.add_argument("--batch-size", type=int, default=512, help="molecules per batch (512)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (2e-3)")
    p.add_argument(
        "--patience",
        type=int,
        default=10,
        help="epochs without improvement of the total loss before the lr halves (10)",
    )
    p.add_argument("--n-generated", type=int, default=1000, help="molecules generated (1000)")
    p.add_argument(
        "--eval-every",
        type=int,
        default=5,
        help="every this many epochs, generate --eval-size molecules and record their validity "
        "in history.json and curves.png (5; 0: never)",
    )
    p.add_argument("--eval-size", type=int, default=500, help="molecules per periodic check (500)")
    p.add_argument(
        "--authors-sizes",
        action="store_true",
        help="generate with the authors' size rounding (sizes 1 -> 2 and 9 -> 8)",
    )
    p.add_argument(
        "--loss-weight",
        action="append",
        default=[],
        metavar="TERM=W",
        help="override the weight of a loss term (repeatable), e.g. edges=640000; the terms "
        "and their defaults (the authors') are GraphLossConfig's (docs/graph_vae.md, Loss)",
    )
    p.add_argument(
        "--pred-order",
        choices=PRED_ORDERS,
        default="score",
        help="how the loss orders the predicted atoms before comparing them with the target's "
        "sorted atoms: score (the authors' expected matching score, default), type (most likely "
        "atom type, decoder order within a type) or slot (decoder order); docs/graph_vae.md",
    )
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument(
        "--init-from",
        type=Path,
        metavar="CKPT",
        help="start from the model weights of another run's checkpoint.pt (same --creation), "
        "with a new optimizer, schedule and history: e.g. to go on with other --loss-weight",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        help="stop after the epoch that passes this many minutes of this run (resume later)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip curves.png and molecules.png")
    args = p.parse_args(argv)
    if args.init_from is not None and args.resume:
        p.error("--init-from starts a run, --resume continues one: give one of them")
    if args.init_from is not None and not args.init_from.is_file():
        p.error(f"--init-from: no checkpoint file {args.init_from}")
    for name in ("epochs", "batch_size", "n_generated", "eval_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.subset is not None and args.subset < 1:
        p.error("--subset must be >= 1")
    weights = {}
    for item in args.loss_weight:
        term, _, value = item.partition("=")
        if term not in GRAPH_LOSS_TERMS or term == "total":
            terms = list(GRAPH_LOSS_TERMS[:-1])
            p.error(f"--loss-weight {item!r}: the term must be one of {terms}")
        try:
            weights[term] = float(value)
        except ValueError:
            p.error(f"--loss-weight {item!r}: the weight must be a number")
        if not weights[term] >= 0:
            p.error(f"--loss-weight {item!r}: the weight must be >= 0")
    args.loss_weights = weights
    if args.lr <= 0 or args.patience < 0 or args.eval_every < 0:
        p.error("--lr must be > 0, --patience and --eval-every >= 0")
    return args


class Progress:
    """One line per epoch on stderr, redrawn in place: bar, step count, running mean loss."""

    def __init__(self, epoch: int, epochs: int, steps: int) -> None:
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        self.start = time.perf_counter()
        self.interactive = sys.stderr.isatty()

    def update(self, step: int, running: dict[str, float], final: bool = False) -> None:
        if not (final or self.interactive):
            return
        width = 20
        done = int(width * step / max(self.steps, 1))
        terms = " ".join(f"{k[:6]} {v:.4g}" for k, v in running.items())
        line = (
            f"epoch {self.epoch + 1}/{self.epochs} [{'#' * done}{'.' * (width - done)}] "
            f"{step}/{self.steps} {terms} {time.perf_counter() - self.start:.1f}s"
        )
        print(f"\r{line}", end="\n" if final else "", file=sys.stderr, flush=True)


def load_data(args) -> tuple[dict, dict]:
    """(splits, data report); the train split cut to --subset."""
    csv_path = args.csv
    if csv_path is None and qm9pack_csv_files() is None:
        print(
            f"note: qm9pack is not installed and no --csv was given; using the "
            f"{SAMPLE_CSV.relative_to(ROOT)} sample (400 molecules, a smoke test). Install "
            "the full data with: pip install 'topn_kernels[qm9]'",
            file=sys.stderr,
        )
        csv_path = SAMPLE_CSV
    t0 = time.perf_counter()
    graphs, report = load_qm9(csv_path, column=args.smiles_column, cache_dir=args.cache_dir)
    splits = split_qm9(graphs, seed=args.seed)
    if args.subset is not None:
        if args.subset > len(splits["train"]):
            print(
                f"note: --subset {args.subset} > {len(splits['train'])} training molecules; "
                "training on all of them",
                file=sys.stderr,
            )
        splits["train"] = splits["train"].subset(
            torch.arange(min(args.subset, len(splits["train"])))
        )
    info = {
        **report.as_dict(),
        "split_sizes": {k: len(v) for k, v in splits.items()},
        "train_size_counts": splits["train"].size_counts().tolist(),
        "seconds": time.perf_counter() - t0,
    }
    print(report.summary())
    return splits, info


def train_epoch(
    model, optimizer, train, batch_size: int, generator, progress, loss_cfg
) -> dict[str, float]:
    """One pass; returns each weighted loss term summed over the epoch / training molecules
    (the authors' logging convention)."""
    model.train()
    sums = dict.fromkeys(GRAPH_LOSS_TERMS, 0.0)
    for step, (atoms, lengths, bonds) in enumerate(
        iterate_graph_batches(train, batch_size, generator), 1
    ):
        out = model(atoms, lengths, bonds)
        terms = graph_vae_loss(out, atoms, lengths, bonds, loss_cfg)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        optimizer.step()
        for k, v in terms.items():
            sums[k] += float(v.detach())
        progress.update(step, {"total": sums["total"] / (step * batch_size)})
    return {k: v / len(train) for k, v in sums.items()}


def generate(
    model, num: int, seed: int, authors_sizes: bool
) -> tuple[list[str | None], list[str | None]]:
    """``num`` generated molecules, in order: their canonical SMILES under the strict check and
    under the authors' (sanitizes, fragments allowed), None where the check fails."""
    model.eval()
    out: list[str | None] = []
    sanitized: list[str | None] = []
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        for start in range(0, num, 500):
            atoms, _, bonds = model.generate(min(500, num - start), authors_clip=authors_sizes)
            smiles, authors = check_graphs(atoms, bonds)
            out += smiles
            sanitized += authors
    return out, sanitized


def save_checkpoint(path: Path, model, optimizer, scheduler, epoch, history, gen, args) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "config": model.cfg.as_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "history": history,
            "rng": torch.get_rng_state(),
            "batch_rng": gen.get_state(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        },
        tmp,
    )
    tmp.replace(path)


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checks = [h for h in history if "validity" in h]
    fig, axes = plt.subplots(1, 3 if checks else 2, figsize=(16 if checks else 11, 4))
    ax1, ax2 = axes[0], axes[1]
    epochs = [h["epoch"] for h in history]
    for k in GRAPH_LOSS_TERMS:
        values = [max(h[k], 1e-12) for h in history]
        ax1.plot(epochs, values, label=k, lw=2 if k == "total" else 1, marker=".")
    ax1.set_yscale("log")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("weighted loss per molecule")
    ax1.legend(fontsize=7)
    ax2.plot(epochs, [h["lr"] for h in history], marker=".")
    ax2.set_yscale("log")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("learning rate")
    if checks:
        ax3 = axes[2]
        series = [
            ("validity", "valid (strict)", {"marker": "o"}),
            ("unique_and_valid", "unique and valid (strict)", {"marker": "o"}),
            ("authors_validity", "sanitizes (authors' check)", {"marker": "s", "ls": "--"}),
        ]
        for key, label, style in series:
            if all(key in h for h in checks):  # older histories lack the authors' check
                values = [100 * h[key] for h in checks]
                ax3.plot([h["epoch"] for h in checks], values, label=label, **style)
        ax3.legend(fontsize=7)
        ax3.set_ylim(0, 100)
        ax3.set_xlabel("epoch")
        ax3.set_ylabel(f"% of {checks[-1]['eval_size']} generated molecules")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_molecules(smiles: list[str | None], path: Path, title: str, count: int = 24) -> int:
    """A grid of the first ``count`` valid molecules (RDKit); returns how many were drawn."""
    from rdkit import Chem
    from rdkit.Chem import Draw

    valid = [s for s in smiles if s is not None][:count]
    if valid:
        mols = [Chem.MolFromSmiles(s) for s in valid]
        image = Draw.MolsToGridImage(mols, molsPerRow=6, subImgSize=(200, 200), legends=valid)
        image.save(str(path))
        return len(valid)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, f"{title}: no valid molecule among {len(smiles)}", ha="center")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return 0


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    splits, data_info = load_data(args)
    train = splits["train"]

    model = GraphVAE(GraphVAEConfig(creation=args.creation))
    model.set_size_distribution(train.lengths)
    loss_cfg = GraphLossConfig(**args.loss_weights, pred_order=args.pred_order)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=0.5, patience=args.patience, min_lr=MIN_LR
    )
    batch_gen = torch.Generator().manual_seed(args.seed + 1)
    history: list[dict] = []
    start_epoch = 0
    ckpt_path = args.out / "checkpoint.pt"
    if args.resume:
        if not ckpt_path.is_file():
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, weights_only=False)
        if ckpt["args"]["creation"] != args.creation:
            raise SystemExit(f"{ckpt_path} is a --creation {ckpt['args']['creation']} run")
        if ckpt["args"].get("loss_weights", {}) != args.loss_weights:
            raise SystemExit(
                f"{ckpt_path} was trained with --loss-weight {ckpt['args'].get('loss_weights')}; "
                f"resume with the same weights, not {args.loss_weights}"
            )
        if ckpt["args"].get("pred_order", "score") != args.pred_order:
            raise SystemExit(
                f"{ckpt_path} was trained with --pred-order {ckpt['args'].get('pred_order')}; "
                f"resume with the same order, not {args.pred_order}"
            )
        args.init_from = ckpt["args"].get("init_from")  # the run's origin, for metrics.json
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, history = ckpt["epoch"] + 1, ckpt["history"]
        torch.set_rng_state(ckpt["rng"])
        batch_gen.set_state(ckpt["batch_rng"])
    elif args.init_from is not None:
        init = torch.load(args.init_from, map_location="cpu", weights_only=False)
        if init.get("config") != model.cfg.as_dict():
            raise SystemExit(
                f"--init-from {args.init_from}: its model ({init.get('config')}) is not this "
                f"run's ({model.cfg.as_dict()})"
            )
        model.load_state_dict(init["model"])
        print(f"model weights from {args.init_from} (after {init['epoch'] + 1} epochs)")
    print(
        f"creation {args.creation}: {sum(p.numel() for p in model.parameters())} parameters; "
        f"{len(train)} training molecules, batch {args.batch_size}, "
        f"{torch.get_num_threads()} thread(s); epochs {start_epoch + 1}..{args.epochs}"
    )

    steps = math.ceil(len(train) / args.batch_size)
    stopped = None
    for epoch in range(start_epoch, args.epochs):
        progress = Progress(epoch, args.epochs, steps)
        t0 = time.perf_counter()
        terms = train_epoch(model, optimizer, train, args.batch_size, batch_gen, progress, loss_cfg)
        seconds = time.perf_counter() - t0
        scheduler.step(terms["total"])
        record = {"epoch": epoch + 1, **terms, "lr": optimizer.param_groups[0]["lr"]}
        record["seconds"] = seconds
        if args.eval_every and (epoch + 1) % args.eval_every == 0:
            smiles, sanitized = generate(
                model, args.eval_size, args.seed + 1000 + epoch, args.authors_sizes
            )
            check = molecule_metrics(smiles, set())
            record.update(
                validity=check["validity"],
                authors_validity=molecule_metrics(sanitized)["validity"],
                unique_and_valid=check["unique_and_valid"],
                eval_size=args.eval_size,
            )
            print(
                f"epoch {epoch + 1}: validity {check['validity']:.1%}, unique and valid "
                f"{check['unique_and_valid']:.1%} of {args.eval_size} generated",
                flush=True,
            )
        history.append(record)
        progress.update(steps, {"total": terms["total"]}, final=True)
        save_checkpoint(ckpt_path, model, optimizer, scheduler, epoch, history, batch_gen, args)
        out_of_time = args.max_minutes is not None and (
            time.perf_counter() - started > 60 * args.max_minutes
        )
        if out_of_time and epoch + 1 < args.epochs:
            stopped = f"--max-minutes {args.max_minutes:g} reached after {epoch + 1} epochs"
            print(f"{stopped}: checkpoint in {ckpt_path}; continue with --resume")
            return None

    t0 = time.perf_counter()
    smiles, sanitized = generate(model, args.n_generated, args.seed, args.authors_sizes)
    values = molecule_metrics(smiles, set(train.smiles))
    authors = molecule_metrics(sanitized)
    values.update({f"authors_{k}": authors[k] for k in AUTHORS_KEYS})
    eval_seconds = time.perf_counter() - t0
    (args.out / "generated.smi").write_text(
        "".join(f"{s if s is not None else INVALID}\n" for s in smiles)
    )
    run_epochs = [h["seconds"] for h in history if h["epoch"] > start_epoch]
    if math.isnan(values["novelty"]):
        values["novelty"] = None  # no valid molecule: JSON null
    result = {
        **{
            k: values[k]
            for k in (
                "validity",
                "unique_and_valid",
                "uniqueness",
                "novelty",
                *(f"authors_{k}" for k in AUTHORS_KEYS),
            )
        },
        "num_generated": values["num_generated"],
        "num_valid": values["num_valid"],
        "num_unique": values["num_unique"],
        "train_losses": {k: history[-1][k] for k in GRAPH_LOSS_TERMS} if history else None,
        "creation": args.creation,
        "seed": args.seed,
        "epochs": history[-1]["epoch"] if history else 0,
        "epoch_seconds_median": statistics.median(run_epochs) if run_epochs else None,
        "eval_seconds": eval_seconds,
        "threads": torch.get_num_threads(),
        "data": data_info,
        "model": model.cfg.as_dict(),
        "loss": loss_cfg.as_dict(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    (args.out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    if not args.no_plots:
        plot_curves(history, args.out / "curves.png", f"QM9 graph VAE, {args.creation}")
        draw_molecules(smiles, args.out / "molecules.png", args.creation)
    print(
        json.dumps(
            {
                k: None if result[k] is None else round(result[k], 4)
                for k in ("validity", "unique_and_valid", "uniqueness", "novelty")
            }
        )
    )
    print(f"wrote {args.out}: metrics.json, history.json, generated.smi, checkpoint.pt", end="")
    print("" if args.no_plots else ", curves.png, molecules.png")
    return result


if __name__ == "__main__":
    main()
