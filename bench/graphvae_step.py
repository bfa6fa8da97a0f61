"""graphvae_step cases: one training step of the QM9 graph VAE (docs/graph_vae.md), as
``python/train_graphvae.py`` takes it, for each creation method.

The data: a batch of the training program's size (512 molecules), the committed sample
tests/data/qm9_sample.csv (400 molecules) repeated, so that the benchmark needs neither
qm9pack nor the network. One timed call is one step: forward, the loss (the authors' weights,
with ``--loss-weight edges=640000 --pred-order type``, the settings of the longer runs),
``loss.backward()``, gradient clipping at 4, ``optimizer.step()``, the gradients set to None.

Providers:

- ``eager``: ``GraphVAEConfig(backend="reference")``: the model in plain eager PyTorch
  (``nn.TransformerEncoderLayer``, ``F.log_softmax``) with the reference ``topn_create`` and
  ``set2graph_logits``.
- ``tuned``: ``backend="auto"``, the program's setting: the native ops and, on CPU, the
  decoder's layers and softmaxes from :mod:`topn_kernels.models.short_rows`.

Both use Adam in its default implementation, as the program does. Each case takes two
warm-up steps when it is built, then ten timed steps (``heavy``, ``repeats=10``; the runner
times the two providers of a creation method in turns): their median and p20-p80.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from topn_kernels.data import load_qm9
from topn_kernels.models import GraphLossConfig, GraphVAE, GraphVAEConfig, graph_vae_loss

from .cases import Case, training_cases

SAMPLE_CSV = Path(__file__).resolve().parent.parent / "tests" / "data" / "qm9_sample.csv"
CREATIONS = ("topn", "firstn", "iid", "mlp")
PROVIDERS = ("eager", "tuned")
BATCH = 512


def _step(creation: str, provider: str) -> Callable[[], object]:
    graphs, _ = load_qm9(SAMPLE_CSV, use_cache=False)
    index = torch.arange(BATCH) % len(graphs)
    lengths = graphs.lengths[index]
    width = int(lengths.max())
    atoms, bonds = graphs.atoms[index, :width], graphs.bonds[index, :width, :width]
    torch.manual_seed(0)
    backend = "reference" if provider == "eager" else "auto"
    model = GraphVAE(GraphVAEConfig(creation=creation, backend=backend))
    model.set_size_distribution(graphs.lengths)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_cfg = GraphLossConfig(edges=640000.0, pred_order="type")

    def step() -> float:
        terms = graph_vae_loss(model(atoms, lengths, bonds), atoms, lengths, bonds, loss_cfg)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(terms["total"].detach())

    step()  # warm-up: allocations, optimizer state
    step()
    step.model = model  # for tests
    return step


def cases(device: torch.device) -> Iterator[Case]:
    if device.type != "cpu":  # the program trains on CPU
        return

    def params(creation: str, provider: str) -> dict:
        return {"batch": BATCH, "creation": creation, "max_atoms": 9}

    yield from training_cases(
        "graphvae_step", "qm9", CREATIONS, PROVIDERS, _step, params, repeats=10
    )
