"""setvae_epoch cases: one training epoch of the authors' preset of the set VAE
(docs/set_vae.md, "The authors' preset"), for each creation method.

The data: the paper's 2000 training sets (seed 0), in the preset's batches (128 sets of one
size, about 45 steps). One timed call is one epoch: for every batch, forward, the authors'
loss, ``loss.backward()``, gradient clipping at 4.0, ``optimizer.step()`` and the gradients
set to None, as ``python/train_setvae.py --preset authors`` does.

Providers:

- ``eager``: the model in plain eager PyTorch (``AuthorsSetVAE(native=False)``), the losses on
  the reference backend, Adam in its default (per-tensor) implementation: what the program
  would be without this library's kernels and choices.
- ``tuned``: the step of the program (:func:`topn_kernels.models.train_step` with
  :func:`~topn_kernels.models.make_adam`): the model's native paths (the fused transformer layer
  and two-pass PNA variance, :meth:`AuthorsSetVAE.use_native`), the losses on ``auto`` (on CPU
  the native C++ losses) and fused Adam. Both clip the gradients with one foreach call (what
  ``clip_grad_norm_`` does by default on CPU).

Each case runs one warm-up epoch when it is built, outside the timed region, then five timed
epochs (``heavy``, ``repeats=5``: the epochs take about a second, and a shared 2-core VM's
epoch times vary by 20-30% from one to the next): their median and p20-p80. The runner times
the two providers of a creation method in turns (eager, tuned, eager, ...;
``bench.run.in_turns``), so that the VM's drift during the run falls on both alike.
:func:`cpu_targets` reads the rows against the targets: tuned >= 2x eager, <= 1.0 s an epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from topn_kernels.data import make_datasets
from topn_kernels.models import (
    AuthorsConfig,
    AuthorsLossConfig,
    AuthorsSetVAE,
    authors_loss,
    make_adam,
    train_step,
)
from topn_kernels.models.authors import iterate_batches, size_grouped_batches

from .cases import Case, training_cases

CREATIONS = ("topn", "firstn", "iid", "mlp")
PROVIDERS = ("eager", "tuned")


def _epoch(creation: str, provider: str) -> Callable[[], object]:
    train, _ = make_datasets(2000, 1, seed=0)
    batches = size_grouped_batches(train.lengths, 128)
    torch.manual_seed(0)
    tuned = provider == "tuned"
    model = AuthorsSetVAE(AuthorsConfig(creation=creation), native=tuned)
    model.set_size_distribution(train.lengths)
    loss_cfg = AuthorsLossConfig(backend="auto" if tuned else "reference")
    if tuned:
        optimizer = make_adam(model.parameters(), 2e-4)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)

    def eager_step(points, lengths) -> float:
        loss = authors_loss(model(points, lengths), points, lengths, loss_cfg)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def tuned_step(points, lengths) -> float:
        return train_step(model, optimizer, points, lengths, loss_cfg, loss=authors_loss)["loss"]

    step = tuned_step if tuned else eager_step

    def epoch() -> float:
        return sum(step(p, n) for p, n in iterate_batches(train.points, train.lengths, batches))

    epoch()  # warm-up: allocations, KeOps formulas
    return epoch


def cases(device: torch.device) -> Iterator[Case]:
    if device.type != "cpu":  # the preset's programs run on CPU
        return

    def params(creation: str, provider: str) -> dict:
        losses = "auto" if provider == "tuned" else "reference"
        return {"sets": 2000, "batch": 128, "creation": creation, "losses": losses}

    yield from training_cases(
        "setvae_epoch", "authors", CREATIONS, PROVIDERS, _epoch, params, repeats=5
    )


def cpu_targets(rows: list[dict]) -> list[dict]:
    """The targets of the authors' preset's epoch on CPU, per creation method, from the rows of
    one run: ``tuned`` at least 2x faster than ``eager``, and at most 1.0 s an epoch. Each
    entry: target, shape, measured (None if a row is missing), met, and a unit where the
    measure is not a ratio."""
    ms = {(r["shape"], r["provider"]): r["ms"] for r in rows if r["op"] == "setvae_epoch"}
    out = []
    for creation in CREATIONS:
        shape = f"authors_{creation}"
        eager, tuned = ms.get((shape, "eager")), ms.get((shape, "tuned"))
        ratio = None if eager is None or tuned is None else eager / tuned
        seconds = None if tuned is None else tuned / 1e3
        out.append(
            {
                "target": "setvae_epoch: tuned >= 2x eager",
                "shape": shape,
                "measured": ratio,
                "met": ratio is not None and ratio >= 2.0,
            }
        )
        out.append(
            {
                "target": "setvae_epoch: tuned <= 1.0 s an epoch",
                "shape": shape,
                "measured": seconds,
                "met": seconds is not None and seconds <= 1.0,
                "unit": " s",
            }
        )
    return out
