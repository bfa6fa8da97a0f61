"""setvae_epoch cases: one training epoch of the authors' preset of the set VAE
(docs/set_vae.md, "The authors' preset"), for each creation method.

The data: the paper's 2000 training sets (seed 0), in the preset's batches (128 sets of one
size, about 45 steps). One timed call is one epoch: for every batch, forward, the authors'
loss, ``loss.backward()``, gradient clipping at 4.0, ``optimizer.step()`` and the gradients
set to None, as ``python/train_setvae.py --preset authors`` does.

Providers:

- ``eager``: the model in plain eager PyTorch, the losses on the reference backend, Adam in its
  default (per-tensor) implementation: what the program would be without this library's
  kernels and choices.
- ``tuned``: the same model with the losses on ``auto`` (on CPU the native C++ losses) and
  Adam's fused CPU implementation.

Each case runs one warm-up epoch when it is built, outside the timed region, then one timed
epoch (``heavy``: the epochs take seconds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from topn_kernels.data import make_datasets
from topn_kernels.models import AuthorsConfig, AuthorsLossConfig, AuthorsSetVAE, authors_loss
from topn_kernels.models.authors import iterate_batches, size_grouped_batches

from .cases import Case

CREATIONS = ("topn", "firstn", "iid", "mlp")
PROVIDERS = {"eager": ("reference", False), "tuned": ("auto", True)}  # losses' backend, fused


def _epoch(creation: str, backend: str, fused: bool) -> Callable[[], object]:
    train, _ = make_datasets(2000, 1, seed=0)
    batches = size_grouped_batches(train.lengths, 128)
    torch.manual_seed(0)
    model = AuthorsSetVAE(AuthorsConfig(creation=creation))
    model.set_size_distribution(train.lengths)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4, fused=fused or None)
    loss_cfg = AuthorsLossConfig(backend=backend)

    def epoch() -> float:
        total = 0.0
        for points, lengths in iterate_batches(train.points, train.lengths, batches):
            loss = authors_loss(model(points, lengths), points, lengths, loss_cfg)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total += float(loss.detach())
        return total

    epoch()  # warm-up: allocations, KeOps formulas
    return epoch


def cases(device: torch.device) -> Iterator[Case]:
    if device.type != "cpu":  # the preset's programs run on CPU
        return
    for creation in CREATIONS:
        for provider, (backend, fused) in PROVIDERS.items():
            params = {"sets": 2000, "batch": 128, "creation": creation, "losses": backend}

            def build(creation=creation, backend=backend, fused=fused):
                return _epoch(creation, backend, fused)

            yield Case(
                "setvae_epoch",
                f"authors_{creation}",
                "fwd+bwd",
                provider,
                params,
                None,
                build,
                heavy=True,
            )
