"""The benchmark cases for pytest-benchmark: ``pytest bench/ --benchmark-only``.

Not part of ``make test`` (whose testpaths is tests/). ``python -m bench`` runs the same
cases with the table, JSON and plot of this project.
"""

from __future__ import annotations

import pytest
import torch

from .registry import all_cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = list(all_cases(DEVICE))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_benchmark(benchmark, case):
    call = case.build()
    benchmark.group = f"{case.op}-{case.shape}-{case.direction}"
    with case.context():
        benchmark(call)
