"""Train the set VAE (the default ``--task set``) or the QM9 graph VAE (``--task qm9``) with each
creation method (same budget, same seeds), evaluate, and write the results beside the paper's
Table 4 or Table 5.

    python python/compare_creation.py --epochs 150 --seeds 0 --out runs/compare
    python python/compare_creation.py --epochs 150 --seeds 0 1 2 --nproc 2 --out runs/compare
    python python/compare_creation.py --preset authors --creations topn firstn \
        --out runs/authors -- --max-minutes 60      # again, later: unfinished runs resume
    python python/compare_creation.py --task qm9 --epochs 30 --jobs 2 --out runs/qm9 \
        -- --max-minutes 60

Each run is ``python/train_setvae.py`` (``python/train_graphvae.py`` for qm9) in its own process
(under torchrun when ``--nproc`` > 1), writing into ``OUT/<creation>/seed<k>/``; arguments after
``--`` go to every run unchanged. ``--jobs J`` runs J of them at a time, each with
``cpu_count / J`` threads (unless OMP_NUM_THREADS is set).
``--reuse`` keeps runs whose ``metrics.json`` exists; a run with a checkpoint but no
``metrics.json`` (stopped by ``--max-minutes``) is resumed. Writes ``OUT/table.md`` (the table,
the paper's values, and whether the paper's ordering holds), ``OUT/results.json`` and
``OUT/rows.json`` (one row per finished run: creation, seed, epochs and every metric).

``--preset authors`` trains the authors' released model and recipe (docs/set_vae.md); its table
shows the matched distances as the authors' code prints them, the quantity of the paper's "W2"
columns. ``--task qm9`` (docs/graph_vae.md) tabulates validity and unique-and-valid (the paper's
columns), uniqueness and novelty, and ``OUT/rows.json`` holds one row per finished run:
creation, seed, epochs, validity, unique_and_valid.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
CREATIONS = ("mlp", "iid", "firstn", "topn")  # the paper's row order
NAMES = {"mlp": "MLP", "iid": "i.i.d.", "firstn": "First-n", "topn": "Top-n"}
COLUMNS = (
    ("train_w2", "Train W2"),
    ("test_w2", "Test W2"),
    ("valency_loss", "Valency loss"),
    ("incorrect_valency_pct", "Incorrect valency %"),
    ("diversity", "Diversity"),
    ("extrap_valency_loss", "Extrap. valency loss"),
    ("extrap_incorrect_valency_pct", "Extrap. incorrect valency %"),
    ("extrap_diversity", "Extrap. diversity"),
)
# the authors' preset: the paper's "W2" columns are matched distances (docs/set_vae.md)
AUTHORS_COLUMNS = (
    ("train_matched_printed", "Train W2 (matched, as printed)"),
    ("test_matched_printed", "Test W2 (matched, as printed)"),
    *COLUMNS[2:],
)
ROW_KEYS = (
    "creation",
    "seed",
    "epochs",
    "stopped",
    "train_w2",
    "test_w2",
    "train_matched",
    "test_matched",
    "train_matched_printed",
    "test_matched_printed",
    *(key for key, _ in COLUMNS[2:]),
)
PRESET_DEFAULTS = {
    "ours": {"epochs": 150, "lr": 1e-3, "batch_size": 64},
    "authors": {"epochs": 10000, "lr": 2e-4, "batch_size": 128},
}
# Vignac & Frossard (ICLR 2022), Table 4: mean over 5 runs, in the order of COLUMNS
PAPER = {
    "mlp": (0.47, 0.42, 0.73, 22.4, 4.6, 1.06, 26.6, 4.3),
    "iid": (1.20, 0.81, 1.40, 36.8, 5.0, 0.24, 7.8, 4.9),
    "firstn": (0.43, 0.50, 0.84, 24.6, 5.1, 0.81, 22.5, 4.6),
    "topn": (0.58, 0.44, 0.37, 13.9, 4.8, 0.80, 17.0, 4.5),
}
# Table 5, Set2GraphVAE rows: valid %, unique and valid % (mean ± std over runs)
PAPER_QM9 = {
    "mlp": ((60.5, 2.2), (55.4, 2.3)),
    "iid": ((34.9, 15.2), (29.9, 10.0)),
    "firstn": ((59.9, 2.7), (56.2, 2.7)),
    "topn": ((59.9, 1.4), (56.2, 1.1)),
}
# (metrics.json key, title, index of the paper's column shown beside it or None)
QM9_COLUMNS = (
    ("validity", "Valid %", 0),
    ("unique_and_valid", "Unique and valid %", 1),
    ("uniqueness", "Unique among valid %", None),
    ("novelty", "Novel among unique %", None),
    ("authors_validity", "Sanitizes % (authors' check)", 0),
    ("authors_unique_and_valid", "Unique and sanitizes % (authors' check)", 1),
)
QM9_ROW_KEYS = (
    "creation",
    "seed",
    "epochs",
    "validity",
    "unique_and_valid",
    "uniqueness",
    "authors_validity",
    "authors_unique_and_valid",
)
# two-sided 95% Student t quantiles by degrees of freedom
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--task", choices=("set", "qm9"), default="set", help="Table 4 or Table 5")
    p.add_argument("--preset", choices=("ours", "authors"), default="ours", help="set task only")
    p.add_argument("--epochs", type=int, help="default: 150 (ours), 10000 (authors), 30 (qm9)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--creations", nargs="+", choices=CREATIONS, default=list(CREATIONS))
    p.add_argument(
        "--lr",
        type=float,
        help="Adam lr; default 1e-3 (ours: the paper's 2e-4 needs thousands of epochs), 2e-4",
    )
    p.add_argument("--batch-size", type=int, help="default: 64 (ours), 128 (authors)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--nproc", type=int, default=1, help="DDP processes per run (torchrun)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--reuse", action="store_true", help="keep runs that have a metrics.json")
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = p.parse_args(argv)
    if args.task == "qm9":
        if args.preset != "ours" or args.nproc != 1 or args.backend != "auto":
            p.error("--task qm9 takes no --preset, --nproc or --backend")
        if args.epochs is None:
            args.epochs = 30
    for name, value in PRESET_DEFAULTS[args.preset].items():
        if getattr(args, name) is None and args.task == "set":
            setattr(args, name, value)
    if args.epochs < 1 or args.nproc < 1 or args.jobs < 1:
        p.error("--epochs, --nproc and --jobs must be >= 1")
    return args, extra


def _command(args, creation: str, seed: int, out: Path) -> list[str]:
    """The training program's command line for one run."""
    if args.task == "qm9":
        options = {"--creation": creation, "--epochs": args.epochs, "--seed": seed, "--out": out}
        if args.lr is not None:
            options["--lr"] = args.lr
        if args.batch_size is not None:
            options["--batch-size"] = args.batch_size
        flags = [str(v) for option in options.items() for v in option]
        return [sys.executable, str(HERE / "train_graphvae.py"), *flags]
    launcher = [sys.executable]
    if args.nproc > 1:
        distributed = ["torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
        launcher += ["-m", *distributed]
    options = {
        "--preset": args.preset,
        "--creation": creation,
        "--epochs": args.epochs,
        "--seed": seed,
        "--lr": args.lr,
        "--batch-size": args.batch_size,
        "--backend": args.backend,
        "--n-train": args.n_train,
        "--out": out,
    }
    flags = [str(v) for option in options.items() for v in option]
    return [*launcher, str(HERE / "train_setvae.py"), *flags]


def run_one(args, extra: list[str], creation: str, seed: int) -> dict | None:
    """The run's metrics.json, or None when it stopped before the end (--max-minutes)."""
    out = args.out / creation / f"seed{seed}"
    metrics_path = out / "metrics.json"
    if args.reuse and metrics_path.exists():
        return _flat(json.loads(metrics_path.read_text()))
    resume = not metrics_path.exists() and (out / "checkpoint.pt").exists()
    cmd = [*_command(args, creation, seed, out), *(["--resume"] * resume), *extra]
    env = dict(os.environ)
    if args.jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    print(f"== {creation} seed {seed}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    print(f"== {creation} seed {seed} done in {time.perf_counter() - t0:.0f}s", flush=True)
    if not metrics_path.exists():
        print(f"== {creation} seed {seed} is not finished: run again to resume it", flush=True)
        return None
    return _flat(json.loads(metrics_path.read_text()))


def _flat(metrics: dict) -> dict:
    """metrics.json with the authors' printed matched distances as top-level keys."""
    printed = metrics.get("as_the_authors_print", {})
    metrics["train_matched_printed"] = printed.get("train_matched", metrics.get("train_matched"))
    metrics["test_matched_printed"] = printed.get("test_matched", metrics.get("test_matched"))
    return metrics


def summarize(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% confidence interval (None for one run)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, T95.get(len(values) - 1, 1.96) * std / math.sqrt(len(values))


def _cell(mean: float, half: float | None, paper: float) -> str:
    ours = f"{mean:.3g}" if half is None else f"{mean:.3g} ± {half:.2g}"
    return f"{ours} ({paper:g})"


def ordering(results: dict[str, dict[str, float]], train_key: str = "train_w2") -> list[str]:
    """The paper's claims on this table: Top-n best on valency loss and incorrect valency,
    i.i.d. worst on train W2 (``train_key``: the column that holds it)."""
    lines = []
    checks = (
        ("valency_loss", min, "topn", "best (lowest) valency loss"),
        ("incorrect_valency_pct", min, "topn", "best (lowest) incorrect valency"),
        (train_key, max, "iid", "worst (highest) train W2"),
    )
    for key, pick, claimed, what in checks:
        if claimed not in results or len(results) < 2:
            continue
        winner = pick(results, key=lambda c: results[c][key])
        verdict = "holds" if winner == claimed else f"does not hold: {NAMES[winner]} is"
        lines.append(f"- {NAMES[claimed]} {what}: {verdict}")
    return lines


def _write_outputs(out: Path, text: str, summary: dict, rows: list[dict], seconds: float) -> None:
    """OUT/table.md, OUT/results.json (``summary`` and the wall time) and OUT/rows.json."""
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps({**summary, "seconds": seconds}, indent=2))
    (out / "rows.json").write_text(json.dumps(rows, indent=2) + "\n")


def write_qm9_table(args, runs: dict[str, list[dict]], seconds: float) -> str:
    """Table 5 beside the paper's; OUT/table.md, results.json and rows.json."""
    done = {c: runs[c] for c in CREATIONS if runs.get(c)}  # the paper's row order
    means: dict[str, dict[str, float]] = {}
    head = "| Generator | " + " | ".join(title for _, title, _ in QM9_COLUMNS) + " |"
    rows = [head, "|" + " --- |" * (len(QM9_COLUMNS) + 1)]
    for creation, finished in done.items():
        cells, means[creation] = [], {}
        for key, _, paper in QM9_COLUMNS:
            values = [100 * m[key] for m in finished if m.get(key) is not None]
            if not values:
                cells.append("-")
                continue
            mean, half = summarize(values)
            means[creation][key] = mean
            cell = f"{mean:.1f}" if half is None else f"{mean:.1f} ± {half:.1f}"
            if paper is not None:
                paper_mean, paper_std = PAPER_QM9[creation][paper]
                cell += f" ({paper_mean} ± {paper_std})"
            cells.append(cell)
        rows.append(f"| {NAMES[creation]} (runs: {len(finished)}) | " + " | ".join(cells) + " |")
    epochs = sorted({m["epochs"] for finished in done.values() for m in finished})
    missing = [NAMES[c] for c in args.creations if len(runs[c]) < len(args.seeds)]
    first = next(iter(done.values()))[0] if done else None
    data = first["data"]["split_sizes"]["train"] if first else "-"
    lr = first["args"]["lr"] if first else args.lr
    batch = first["args"]["batch_size"] if first else args.batch_size
    n = len(args.seeds)
    settings = first["args"] if first else {}
    pred_order = settings.get("pred_order", "score")
    weights = settings.get("loss_weights") or {}
    checks = []
    if "topn" in means and "validity" in means["topn"]:
        top = means["topn"]
        checks.append(f"- Top-n validity {top['validity']:.1f}% (target >= 50%)")
        checks.append(f"- Top-n unique and valid {top['unique_and_valid']:.1f}% (target >= 45%)")
    if "iid" in means and len(means) > 1:
        lowest = min(means, key=lambda c: means[c].get("validity", math.inf))
        verdict = "holds" if lowest == "iid" else f"does not hold: {NAMES[lowest]} is lowest"
        checks.append(f"- i.i.d. has the lowest validity: {verdict}")
    text = "\n".join(
        [
            "# Set creation methods in the QM9 graph VAE",
            "",
            f"{args.epochs} epochs (runs took {', '.join(map(str, epochs)) or '-'}), lr {lr} "
            f"halved on plateaus, batch {batch}, {data} training molecules, seeds {args.seeds} "
            f"({'one run' if n == 1 else 'mean ± 95% CI over the runs'}); in parentheses the "
            "paper's Table 5 (mean ± std over runs of 800 epochs at most; docs/graph_vae.md).",
            f"Each run generated {first['num_generated'] if first else '-'} molecules; valid "
            "means that RDKit sanitizes it as one connected molecule; the last two columns "
            "count every molecule RDKit sanitizes, fragments allowed, and the distinct SMILES "
            "among them: the only check the authors' released code runs. The paper's figures "
            "stand beside both checks.",
            f"Matching: the prediction's atoms ordered by {pred_order} (--pred-order); loss "
            f"weights {'as the authors' if not weights else 'changed: ' + str(weights)}.",
            "Uniqueness and novelty are for information (the paper does not report them).",
            _wall_time(args, seconds),
            *(["Not finished yet (rerun to resume): " + ", ".join(missing) + "."] * bool(missing)),
            "",
            *rows,
            "",
            *checks,
            "",
        ]
    )
    flat = [{k: m.get(k) for k in QM9_ROW_KEYS} for finished in done.values() for m in finished]
    summary = {"means": means, "runs": runs, "paper": PAPER_QM9}
    _write_outputs(args.out, text, summary, flat, seconds)
    return text


def write_table(args, runs: dict[str, list[dict]], seconds: float) -> str:
    columns = AUTHORS_COLUMNS if args.preset == "authors" else COLUMNS
    done = {c: runs[c] for c in args.creations if runs[c]}
    means: dict[str, dict[str, float]] = {}
    head = "| Generator | " + " | ".join(title for _, title in columns) + " |"
    rows = [head, "|" + " --- |" * (len(columns) + 1)]
    for creation, finished in done.items():
        cells = []
        means[creation] = {}
        for i, (key, _) in enumerate(columns):
            mean, half = summarize([m[key] for m in finished])
            means[creation][key] = mean
            cells.append(_cell(mean, half, PAPER[creation][i]))
        rows.append(f"| {NAMES[creation]} (runs: {len(finished)}) | " + " | ".join(cells) + " |")
    backends = "none finished"
    if done:
        first = next(iter(done.values()))[0]
        backends = "; ".join(
            f"{op}: " + ", ".join(f"{name} ({calls} calls)" for name, calls in used.items())
            for op, used in first["backends"]["training"].items()
        )
    epochs = sorted({m["epochs"] for finished in done.values() for m in finished})
    missing = [f"{NAMES[c]}" for c in args.creations if len(runs[c]) < len(args.seeds)]
    n = len(args.seeds)
    if args.preset == "authors":
        recipe = (
            f"The authors' preset: their model and recipe, lr {args.lr} halved on plateaus of "
            f"the total loss, stopped once below 1e-5 or at {args.epochs} epochs (runs took "
            f"{', '.join(map(str, epochs)) or '-'} epochs), batch {args.batch_size} of one set "
            f"size, {args.n_train} training sets, seeds {args.seeds}"
        )
        w2 = [
            "The W2 columns are matched distances (mean Euclidean distance under the optimal",
            "assignment) as the authors' code prints them: train, the last training epoch's",
            "reconstruction term; test, divided by the 2000 training sets (docs/set_vae.md).",
        ]
    else:
        recipe = (
            f"Ours: {args.epochs} epochs, lr {args.lr}, batch {args.batch_size}, "
            f"{args.n_train} training sets, seeds {args.seeds}"
        )
        w2 = ["W2 is the 2-Wasserstein distance; the paper's W2 columns are matched distances."]
    text = "\n".join(
        [
            "# Set creation methods on the synthetic molecule-like dataset",
            "",
            f"{recipe} ({'mean' if n == 1 else 'mean ± 95% CI over the runs'}); in "
            "parentheses the paper's Table 4 (mean over 5 runs of thousands of epochs).",
            f"Backends in training (a resumed run's last chunk): {backends}.",
            _wall_time(args, seconds),
            *(["Not finished yet (rerun to resume): " + ", ".join(missing) + "."] * bool(missing)),
            *w2,
            "Valency loss and incorrect valency compare generated sets with the data, diversity",
            "is the mean Euclidean OT cost between random pairs of generated sets (higher is more",
            "diverse); extrapolation sets have 10 more points than the training sizes.",
            "",
            *rows,
            "",
            "The paper's ordering here:",
            *ordering(means, columns[0][0]),
            "",
        ]
    )
    flat = [
        {key: m.get(key, m["args"]["seed"] if key == "seed" else None) for key in ROW_KEYS}
        for finished in done.values()
        for m in finished
    ]
    _write_outputs(args.out, text, {"means": means, "runs": runs, "paper": PAPER}, flat, seconds)
    return text


def _wall_time(args, seconds: float) -> str:
    if getattr(args, "all_reused", False):
        return (
            "Every run was reused from an earlier invocation (--reuse): this one wrote the table."
        )
    return f"Wall time of this invocation {seconds / 60:.1f} min."


def main(argv: list[str] | None = None) -> None:
    args, extra = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs: dict[str, list[dict]] = {c: [] for c in args.creations}
    todo = [(creation, seed) for seed in args.seeds for creation in args.creations]
    args.all_reused = args.reuse and all(
        (args.out / creation / f"seed{seed}" / "metrics.json").exists() for creation, seed in todo
    )
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda job: run_one(args, extra, *job), todo))
    for (creation, _), result in zip(todo, results, strict=True):
        if result is not None:
            runs[creation].append(result)
    write = write_qm9_table if args.task == "qm9" else write_table
    print(write(args, runs, time.perf_counter() - t0))
    print(f"wrote {args.out}/table.md and results.json")


if __name__ == "__main__":
    main()
