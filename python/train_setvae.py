"""Train the reference set VAE on the paper's synthetic molecule-like dataset and evaluate it.

    python python/train_setvae.py --creation topn --epochs 100 --out runs/topn
    torchrun --nproc_per_node=2 python/train_setvae.py --creation topn --out runs/topn   # DDP
    python python/train_setvae.py --preset authors --creation topn --max-minutes 60 --out runs/a
    python python/train_setvae.py --preset authors --creation topn --resume --out runs/a

``--preset``: ``ours`` (this library's set VAE, :class:`topn_kernels.models.SetVAE`, with a
Sinkhorn reconstruction loss, shuffled padded batches) or ``authors`` (the authors' released
code: :class:`topn_kernels.models.AuthorsSetVAE`, the matched-distance loss summed over each
batch, batches of one set size in a fixed order, 10,000 epochs at most, the learning rate
halved after ``--patience`` epochs without improvement of the total loss and training stopped
once it falls below 1e-5). docs/set_vae.md lists what each preset does.

``--max-minutes`` stops cleanly after the epoch that passes the limit (the checkpoint is
written, no evaluation); ``--resume`` continues from the checkpoint exactly as if the run had
not stopped (model, optimizer, scheduler and random state are restored).

Writes into ``--out``: ``metrics.json`` (the paper's Table 4 metrics: ``train_w2``,
``test_w2``, ``train_matched``, ``test_matched``, ``valency_loss``, ``incorrect_valency_pct``,
``diversity`` and the same with an ``extrap_`` prefix, the matched distances as the authors'
code prints them, plus the backends each op ran on, timings, the Sinkhorn-vs-exact-OT gaps
and the run's settings), ``history.json`` (per-epoch losses), ``curves.png`` (loss curves),
``samples.png`` (data and generated sets in 3-D, bonds between points closer than the neighbour
distance) and ``checkpoint.pt`` (rewritten after every epoch; ``--resume`` continues from it).

``--backend`` (see ``topn_kernels.models.backends``): ``reference`` runs every op in plain
PyTorch; ``native`` runs ``topn_create`` on the C++ CPU kernel and the losses on ``auto``;
``auto`` lets each op pick (native / Triton for ``topn_create``; for the losses KeOps, or the
reference on problems small enough that it is faster, or where KeOps is unavailable);
``keops`` runs every loss on KeOps. The program prints and records, op by op, how many calls
ran on which backend, in training and in evaluation (``backends`` in metrics.json).

``--batch-size`` is the global batch: under DDP each of the W processes takes batch-size / W
sets per step (gloo on CPU, nccl on GPU), so 1 and W processes follow the same schedule.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from topn_kernels import metrics
from topn_kernels.data import (
    collate_sets,
    dataset_statistics,
    extrapolation_sizes,
    make_datasets,
    make_extrapolation_dataset,
)
from topn_kernels.models import (
    BACKEND_NAMES,
    CREATIONS,
    LOSS_TERMS,
    AuthorsConfig,
    AuthorsLossConfig,
    AuthorsSetVAE,
    BackendLog,
    LossConfig,
    OpBackends,
    SetVAE,
    authors_loss,
    make_adam,
    setvae_loss,
    train_step,
)
from topn_kernels.models.authors import iterate_batches, size_grouped_batches

METRIC_KEYS = (
    "train_w2",
    "test_w2",
    "train_matched",
    "test_matched",
    "valency_loss",
    "incorrect_valency_pct",
    "diversity",
    "extrap_valency_loss",
    "extrap_incorrect_valency_pct",
    "extrap_diversity",
)


PRESETS = ("ours", "authors")
PRESET_DEFAULTS = {
    "ours": {"epochs": 100, "batch_size": 64},
    "authors": {"epochs": 10000, "batch_size": 128},
}
# the authors' stopping rule: no epoch starts once the learning rate is below this
AUTHORS_MIN_LR = 1e-5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="ours", help="model and training recipe")
    p.add_argument("--creation", choices=CREATIONS, default="topn", help="set creation method")
    p.add_argument("--epochs", type=int, help="default: 100 (ours), 10000 (authors)")
    p.add_argument("--batch-size", type=int, help="global batch size; default 64 / 128")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (paper: 2e-4)")
    p.add_argument("--backend", choices=BACKEND_NAMES, default="auto")
    p.add_argument("--seed", type=int, default=0, help="seeds the data, the model and training")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--n-train", type=int, default=2000, help="training sets (paper: 2000)")
    p.add_argument("--n-test", type=int, default=500, help="test sets (paper: 500)")
    p.add_argument("--n-generated", type=int, default=1000, help="sets generated per evaluation")
    p.add_argument("--n-pairs", type=int, default=1000, help="pairs for the diversity score")
    p.add_argument(
        "--patience",
        type=int,
        default=750,
        help="epochs without improvement of the reconstruction before the lr halves",
    )
    p.add_argument(
        "--score-norm",
        choices=("all", "selected"),
        default="all",
        help="Top-n weights: 'all' (released code) or 'selected' (paper eq. 8)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="also evaluate every N epochs (0: only at the end)",
    )
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument(
        "--max-minutes",
        type=float,
        help="stop after the epoch that passes this many minutes of this run (resume later)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip curves.png and samples.png")
    args = p.parse_args(argv)
    for name, value in PRESET_DEFAULTS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("epochs", "batch_size", "n_train", "n_test", "n_generated", "n_pairs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.n_train < 2 or args.n_generated < 2:
        p.error("--n-train and --n-generated must be >= 2")
    return args


# ---------------------------------------------------------------------------------------------
# Distributed set-up
# ---------------------------------------------------------------------------------------------


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(values, t.tolist(), strict=True))


# ---------------------------------------------------------------------------------------------
# Progress bar (stderr, rank 0)
# ---------------------------------------------------------------------------------------------


class Progress:
    """One line per epoch, redrawn in place: bar, step count, running mean losses, time."""

    def __init__(self, epoch: int, epochs: int, steps: int, enabled: bool) -> None:
        self.epoch, self.epochs, self.steps, self.enabled = epoch, epochs, steps, enabled
        self.start = time.perf_counter()
        self.interactive = sys.stderr.isatty()

    def update(self, step: int, running: dict[str, float], final: bool = False) -> None:
        if not self.enabled or not (final or self.interactive):
            return
        width = 20
        done = int(width * step / max(self.steps, 1))
        terms = " ".join(f"{k[:5]} {v:.4g}" for k, v in running.items())
        line = (
            f"epoch {self.epoch + 1}/{self.epochs} [{'#' * done}{'.' * (width - done)}] "
            f"{step}/{self.steps} {terms} {time.perf_counter() - self.start:.1f}s"
        )
        end = "\n" if final else ""
        print(f"\r{line}", end=end, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train_epoch(
    model, optimizer, batches, loss_cfg, loss, progress: Progress, per_set: int | None
) -> dict[str, float]:
    """One pass over ``batches`` of (points, lengths). Returns the loss terms averaged over the
    steps, or, with ``per_set`` (the authors' convention for losses summed over a batch),
    summed over the steps and divided by ``per_set``."""
    sums = dict.fromkeys(LOSS_TERMS, 0.0)
    steps = 0
    device = next(model.parameters()).device
    for points, lengths in batches:
        terms = train_step(
            model, optimizer, points.to(device), lengths.to(device), loss_cfg, loss=loss
        )
        steps += 1
        for k, v in terms.items():
            sums[k] += v
        progress.update(steps, {k: v / (per_set or steps) for k, v in sums.items()})
    return {k: v / (per_set or max(steps, 1)) for k, v in sums.items()}


def evaluate(model, data: dict, args, backend: str) -> dict:
    extrap_sizes, extrap_probs = data["extrap_sizes"], data["stats"]["extrap"].valency_probs
    if args.preset == "authors":  # sizes of the training distribution + 10, capped; the
        # training valency histogram as the reference
        gen = torch.Generator().manual_seed(args.seed + 2)
        extrap_sizes = model.sample_sizes(args.n_generated, shift=10, generator=gen).cpu()
        extrap_probs = data["stats"]["train"].valency_probs
    return metrics.evaluate(
        model,
        data["train"].points,
        data["train"].lengths,
        data["test"].points,
        data["test"].lengths,
        data["stats"]["train"].valency_probs,
        extrap_probs,
        extrap_sizes,
        num_generated=args.n_generated,
        num_pairs=args.n_pairs,
        seed=args.seed,
        neighbor_dist=data["train"].config.neighbor_dist,
        max_valency=data["train"].config.max_valency,
        backend=backend,
    )


def build_data(args) -> dict:
    t0 = time.perf_counter()
    train, test = make_datasets(args.n_train, args.n_test, seed=args.seed)
    extrap = make_extrapolation_dataset(train, args.n_test, seed=args.seed)
    sizes = extrapolation_sizes(
        train, args.n_generated, generator=torch.Generator().manual_seed(args.seed + 2)
    )
    stats = {
        name: dataset_statistics(d)
        for name, d in (("train", train), ("test", test), ("extrap", extrap))
    }
    return {
        "train": train,
        "test": test,
        "extrap": extrap,
        "extrap_sizes": sizes,
        "stats": stats,
        "seconds": time.perf_counter() - t0,
    }


def save_checkpoint(path: Path, model, optimizer, scheduler, epoch: int, history, args) -> None:
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
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        },
        tmp,
    )
    tmp.replace(path)


def as_the_authors_print(values: dict, history: list[dict], args) -> dict:
    """The matched distances as the released code prints them: its train figure is the
    reconstruction term of the last training epoch (posterior samples, training mode), summed
    over the epoch and divided by the number of training sets; its test figure is the test sets'
    sum divided by the number of training sets too."""
    out = {"test_matched": values["test_matched"] * args.n_test / args.n_train}
    if args.preset == "authors" and history:
        out["train_matched"] = history[-1]["reconstruction"]
    return out


def build_model(args, data: dict, ops: OpBackends, device: torch.device):
    """(model, loss config, loss function) of the preset."""
    geometry = {
        "neighbor_dist": data["train"].config.neighbor_dist,
        "min_dist": data["train"].config.min_dist,
        "max_valency": data["train"].config.max_valency,
    }
    if args.preset == "authors":
        model = AuthorsSetVAE(AuthorsConfig(creation=args.creation))
        loss_cfg, loss = AuthorsLossConfig(backend=ops.losses, **geometry), authors_loss
    else:
        model = SetVAE.with_backend(
            args.backend, creation=args.creation, score_norm=args.score_norm
        )
        loss_cfg, loss = LossConfig(backend=ops.losses, **geometry), setvae_loss
    model.set_size_distribution(data["train"].lengths)
    return model.to(device), loss_cfg, loss


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    lead = rank == 0
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by {world} processes")
    if args.preset == "authors" and world > 1:
        raise SystemExit("--preset authors runs in one process (its batches hold one set size)")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    data = build_data(args)
    ops = OpBackends.from_name(args.backend)
    with warnings.catch_warnings(record=True) as caught:  # fallbacks: printed below
        warnings.simplefilter("always")
        preferred = ops.resolved(device)  # raises now if a requested backend cannot run
    model, loss_cfg, loss = build_model(args, data, ops, device)
    optimizer = make_adam(model.parameters(), args.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=0.5, patience=args.patience, min_lr=1e-6
    )
    history: list[dict] = []
    start_epoch = 0
    ckpt_path = args.out / "checkpoint.pt"
    if args.resume:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt["args"].get("preset", "ours") != args.preset:
            raise SystemExit(f"{ckpt_path} is a --preset {ckpt['args'].get('preset')} run")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, history = ckpt["epoch"] + 1, ckpt["history"]
        if "rng" in ckpt:
            torch.set_rng_state(ckpt["rng"])

    if lead:
        train_stats = data["stats"]["train"]
        print(
            f"data: {args.n_train} train / {args.n_test} test / {args.n_test} extrapolation "
            f"sets in {data['seconds']:.1f}s; mean size {train_stats.mean_size:.2f} "
            f"(extrapolation {data['stats']['extrap'].mean_size:.2f})"
        )
        print(
            f"preset {args.preset}, creation {args.creation}, backend {args.backend!r}: ops "
            f"resolve to {preferred} (large problems)"
        )
        for w in caught:
            print(f"  note: {w.message}")
        print(
            f"{sum(p.numel() for p in model.parameters())} parameters, {world} process(es), "
            f"device {device}, {torch.get_num_threads()} thread(s) each"
        )

    net = DistributedDataParallel(model) if world > 1 else model
    if args.preset == "authors":
        groups = size_grouped_batches(data["train"].lengths, args.batch_size)
        steps_per_epoch, sampler = len(groups), None
        watched, per_set = "loss", args.n_train
    else:
        sampler = DistributedSampler(
            data["train"], num_replicas=world, rank=rank, shuffle=True, seed=args.seed
        )
        loader = DataLoader(
            data["train"],
            batch_size=args.batch_size // world,
            sampler=sampler,
            collate_fn=collate_sets,
        )
        steps_per_epoch, watched, per_set = len(loader), "reconstruction", None
    train_time = 0.0
    stopped = None  # why training ended before --epochs, if it did
    train_log, eval_log = BackendLog(), BackendLog()
    for epoch in range(start_epoch, args.epochs):
        if args.preset == "authors" and optimizer.param_groups[0]["lr"] < AUTHORS_MIN_LR:
            stopped = f"learning rate below {AUTHORS_MIN_LR:g} after {epoch} epochs"
            break
        if sampler is not None:
            sampler.set_epoch(epoch)
            batches = loader
        else:
            batches = iterate_batches(data["train"].points, data["train"].lengths, groups)
        model.train()
        progress = Progress(epoch, args.epochs, steps_per_epoch, lead)
        t0 = time.perf_counter()
        with train_log:
            terms = train_epoch(net, optimizer, batches, loss_cfg, loss, progress, per_set)
        seconds = time.perf_counter() - t0
        train_time += seconds
        terms = mean_across_ranks(terms, device)
        scheduler.step(terms[watched])
        record = {
            "epoch": epoch + 1,
            **terms,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": seconds,
        }
        if args.eval_every and (epoch + 1) % args.eval_every == 0 and epoch + 1 < args.epochs:
            if lead:
                record.update(evaluate(model, data, args, ops.losses))
            if world > 1:
                dist.barrier()
        history.append(record)
        progress.update(steps_per_epoch, terms, final=True)
        if lead:
            save_checkpoint(ckpt_path, model, optimizer, scheduler, epoch, history, args)
        out_of_time = args.max_minutes is not None and (
            time.perf_counter() - started > 60 * args.max_minutes
        )
        if world > 1:  # every process stops at the same epoch: rank 0's clock decides
            flag = torch.tensor([float(out_of_time)], device=device)
            dist.broadcast(flag, 0)
            out_of_time = bool(flag.item())
        if out_of_time and epoch + 1 < args.epochs:
            stopped = f"--max-minutes {args.max_minutes:g} reached after {epoch + 1} epochs"
            break

    if stopped is not None and stopped.startswith("--max-minutes"):
        if lead:
            print(f"{stopped}: checkpoint in {ckpt_path}; continue with --resume")
        if world > 1:
            dist.destroy_process_group()
        return None

    result = None
    if lead:
        t0 = time.perf_counter()
        with eval_log:
            values = evaluate(model, data, args, ops.losses)
        eval_seconds = time.perf_counter() - t0
        history_epochs = [h for h in history if h["epoch"] > start_epoch]
        result = {
            **{k: values[k] for k in METRIC_KEYS},
            "as_the_authors_print": as_the_authors_print(values, history, args),
            "exactness": values["exactness"],
            "preset": args.preset,
            "creation": args.creation,
            "backend": args.backend,
            "backends": {
                "requested": args.backend,
                "training": train_log.summary(),
                "evaluation": eval_log.summary(),
            },
            "epochs": history[-1]["epoch"] if history else 0,
            "epochs_requested": args.epochs,
            "stopped": stopped,
            "processes": world,
            "threads_per_process": torch.get_num_threads(),
            "device": str(device),
            "train_seconds": train_time,
            "epoch_seconds_median": (
                statistics.median(h["seconds"] for h in history_epochs) if history_epochs else None
            ),
            "eval_seconds": eval_seconds,
            "final_losses": {k: history[-1][k] for k in LOSS_TERMS} if history else None,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "model": model.cfg.as_dict(),
            "loss": asdict(loss_cfg),
            "data": {
                k: {"num_sets": s.num_sets, "mean_size": s.mean_size}
                for k, s in data["stats"].items()
            },
        }
        (args.out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "history.json").write_text(json.dumps(history, indent=2) + "\n")
        if not args.no_plots:
            from setvae_plots import plot_curves, plot_samples

            plot_curves(history, args.out / "curves.png", title=f"{args.creation} ({args.backend})")
            model.eval()
            with torch.no_grad(), torch.random.fork_rng():
                torch.manual_seed(args.seed)
                x, mask = model.generate(model.sample_sizes(4).to(device))
            real = [data["test"][i] for i in range(4)]
            fake = [x[i][mask[i]].cpu() for i in range(4)]
            plot_samples(
                real,
                fake,
                args.out / "samples.png",
                data["train"].config.neighbor_dist,
                title=args.creation,
            )
        for phase in ("training", "evaluation"):
            calls = result["backends"][phase]
            print(f"{phase} ops ran on (calls): {calls}")
        print(json.dumps({k: round(result[k], 4) for k in METRIC_KEYS}))
        print(
            f"wrote {args.out}/metrics.json, history.json, checkpoint.pt"
            + ("" if args.no_plots else ", curves.png, samples.png")
        )
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
