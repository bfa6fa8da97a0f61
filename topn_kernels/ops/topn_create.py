"""Public ``topn_create``: validation, then the reference, the native or the Triton kernels
(docs/operators.md, topn_create)."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor

from .. import reference
from . import _checks, _dispatch
from .topn_create_op import topn_create as topn_create_op

__all__ = ["TopNOutput", "topn_create"]


class TopNOutput(NamedTuple):
    """Result of :func:`topn_create`; B sets, n_max slots, d features."""

    x: Tensor
    """(B, n_max, d), input dtype: the created points, rows past n_b are 0."""
    mask: Tensor
    """(B, n_max) bool: True on real points."""
    index: Tensor
    """(B, n_max) int64: the selected reference points sigma, -1 on padding."""
    weight: Tensor
    """(B, n_max), input dtype: the weights m, 0 on padding."""


_NAMES = ("query", "angles", "table", "bias", "film")
_SHAPES = ("(B, a)", "(n0, a)", "(n0, d)", "(B, d)", "(4, d)")


def _validate(query, angles, table, bias, n, film, n_max, score_norm, sorted, backend):
    """Checks every argument; returns (sizes int64 (B,), n_max, the backend to run, n_fixed).

    For the native and Triton kernels an int ``n`` is passed as the integer ``n_fixed`` (else
    -1), with ``sizes`` empty: no (B,) tensor to fill (on a GPU, one launch less)."""
    _checks.float_tensors((query, angles, table, bias, film), _NAMES, _SHAPES)
    batch, a = query.shape
    n0, d = table.shape
    if a < 1:
        raise ValueError(f"query has shape {tuple(query.shape)}: the angle dim a must be >= 1")
    shapes = (angles.shape[1], angles.shape[0], bias.shape, film.shape)
    if shapes != (a, n0, (batch, d), (4, d)):  # one comparison; the message from the checks
        _checks.dim_equal("angles", angles.shape, 1, a, "the angle dim a of query")
        _checks.dim_equal("table", table.shape, 0, angles.shape[0], "the n0 of angles")
        _checks.dim_equal("bias", bias.shape, 0, batch, "the batch size B of query")
        _checks.dim_equal("bias", bias.shape, 1, d, "the feature dim d of table")
        _checks.dim_equal("film", film.shape, 0, 4, "4 (gamma_w, gamma_b, beta_w, beta_b)")
        _checks.dim_equal("film", film.shape, 1, d, "the feature dim d of table")
    if score_norm != "selected":
        _checks.choice(score_norm, "score_norm", ("selected", "all"))
    _checks.flag(sorted, "sorted")
    chosen = _dispatch.resolve("topn_create", backend, query.device)
    if chosen != "reference" and not isinstance(n, Tensor):  # checked as for B = 0 sets
        n_max = _checks.fixed_size(n, n_max, n0, "n0")
        _checks.output_length(n_max, "n_max", batch, d, query.dtype)
        return _no_sizes(query.device), n_max, chosen, n
    check_values = host_checks_sizes(chosen, query.device, n_max)
    sizes, n_max = _checks.set_sizes(
        n, n_max, batch, n0, "n0", query.device, check_values=check_values
    )
    _checks.output_length(n_max, "n_max", batch, d, query.dtype)
    return sizes, n_max, chosen, -1


_NO_SIZES: dict[torch.device, Tensor] = {}


def _no_sizes(device: torch.device) -> Tensor:
    """An empty int64 tensor on ``device`` (the sizes argument when an int n is passed as
    n_fixed); made once per device, outside compilation: the op never writes it."""
    if torch.compiler.is_compiling():
        return torch.empty((0,), dtype=torch.int64, device=device)
    sizes = _NO_SIZES.get(device)
    if sizes is None:
        sizes = _NO_SIZES[device] = torch.empty((0,), dtype=torch.int64, device=device)
    return sizes


CHECK_SIZES_VAR = "TOPN_KERNELS_CHECK_SIZES"


def host_checks_sizes(chosen: str, device: torch.device, n_max: object) -> bool:
    """Whether the values of a tensor ``n`` are checked on the host before the kernels run.

    Not for the native kernel, which checks them itself. Not for the Triton kernels on CUDA
    when ``n_max`` is given: reading ``n`` would cost a device-to-host synchronisation per
    call, and the kernels clamp each n_b to [0, min(n0, n_max)] (without ``n_max`` the values
    are read anyway, to find it). ``TOPN_KERNELS_CHECK_SIZES=1`` keeps the check there too
    (debugging)."""
    if chosen == "native":
        return False
    if chosen == "triton" and device.type == "cuda" and n_max is not None:
        return os.environ.get(CHECK_SIZES_VAR, "0").strip().lower() in ("1", "true", "on", "yes")
    return True


def topn_create(
    query: Tensor,
    angles: Tensor,
    table: Tensor,
    bias: Tensor,
    n: int | Tensor,
    film: Tensor,
    *,
    n_max: int | None = None,
    score_norm: str = "selected",
    sorted: bool = True,
    backend: str = "auto",
) -> TopNOutput:
    """Top-n creation (Vignac & Frossard 2022, eqs. 5-10; docs/operators.md, topn_create).

    Per set b: score every reference angle by its cosine with the query, keep the ``n_b``
    best (equal scores by increasing index), weight them by a softmax of their scores, and
    return ``x_bj = h_bj * (m_bj gamma_w + gamma_b) + (m_bj beta_w + beta_b)`` with
    ``h_bj = table[sigma_bj] + bias_b``.

    Args:
        query: (B, a) angle query, ``MLP(z)``.
        angles: (n0, a) reference angles.
        table: (n0, d) reference points times the first linear map, ``R @ W1``.
        bias: (B, d) per-set additive term, ``z @ W2 + b``.
        n: int, or integer tensor (B,) of set sizes, each in [1, n0].
        film: (4, d) rows gamma_w, gamma_b, beta_w, beta_b.
        n_max: padded length of the output, >= every n_b (default: max n_b). Pass it when
            ``n`` is a tensor under ``torch.compile``: computing it reads ``n``.
        score_norm: "selected" (softmax over the selected scores, paper eq. 8) or "all"
            (``n_b * softmax`` over all n0 scores, as the authors' code).
        sorted: selected points in decreasing score order (True) or increasing index (False).
        backend: "auto", "reference", "native" (CPU) or "triton" (docs/operators.md,
            Backends and dispatch).

    Returns:
        :class:`TopNOutput` ``(x, mask, index, weight)``. float16/bfloat16/float32/float64
        inputs (one dtype for all); computed in float32 (float64 for float64), returned in the
        input dtype. Gradients reach query, angles, table, bias and film.
    """
    sizes, n_max, chosen, n_fixed = _validate(
        query, angles, table, bias, n, film, n_max, score_norm, sorted, backend
    )
    if chosen == "reference":
        kwargs = {"n_max": n_max, "score_norm": score_norm, "sorted": sorted}
        return TopNOutput(*reference.topn_create(query, angles, table, bias, sizes, film, **kwargs))
    args = (query, angles, table, bias, sizes, film, n_max, score_norm, sorted, chosen, n_fixed)
    return TopNOutput(*topn_create_op(*args))
