"""The Triton kernels of topn_create compiled for a Hopper GPU (sm_90) on the CPU, without one
(tests/triton_aot.py): every variant the host code launches, as Triton's launcher
specialises it, compiles, spills nothing, and keeps the forward's rounding.

The compiler runs in a subprocess without ``TRITON_INTERPRET`` (this session runs the kernels
in the interpreter). Its table of registers and spills is printed (``pytest -s``, or with the
failure).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {
    "normalize_angles_kernel",
    "select_kernel",
    "film_kernel",
    "fused_kernel",
    "set_backward_kernel",
    "point_gather_kernel",
    "angles_finish_kernel",
    "point_dense_kernel",
}


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> list[dict]:
    """The rows of ``python -m tests.triton_aot``, one per compiled variant."""
    pytest.importorskip("triton.backends.nvidia")
    rows = tmp_path_factory.mktemp("aot") / "rows.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.triton_aot", "--json", str(rows)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    print(result.stdout)
    assert rows.exists(), result.stderr[-3000:]
    return [json.loads(line) for line in rows.read_text().splitlines()]


@pytest.mark.slow  # minutes from a cold Triton cache (6 min on 2 busy cores); seconds once cached
def test_every_variant_compiles_for_hopper_without_spilling(variants):
    """Every kernel the host code can launch compiles, under every path choice, and no
    variant spills registers to local memory (spill store bytes reported by ptxas)."""
    assert {r["kernel"] for r in variants} == KERNELS
    spilled = [
        f"{r['kernel']} {r['shapes']} {r['constexprs']}: {r['spill_bytes']} bytes"
        for r in variants
        if r["spill_bytes"]
    ]
    assert not spilled, "\n".join(spilled)


@pytest.mark.slow
def test_launch_specialisations_are_compiled(variants):
    """The variants Triton's launcher makes from the arguments are among those compiled:
    integers equal to 1 as constants, 16-byte aligned pointers and multiples of 16 as such,
    and variants with neither."""
    assert any(r["ones"] for r in variants)
    assert any(r["aligned"] for r in variants)
    assert any(r["aligned"] == 0 and not r["ones"] for r in variants)
    # each selection method, each writer, and the sort for its own dtypes only
    selects = {
        (r["kernel"], r["constexprs"]["USE_SORT"])
        for r in variants
        if "USE_SORT" in r["constexprs"]
    }
    assert selects == {(k, s) for k in ("select_kernel", "fused_kernel") for s in (False, True)}
    for r in variants:
        if r["constexprs"].get("USE_SORT"):
            assert not r["constexprs"]["IS_F64"] and r["constexprs"]["ONE_CHUNK"], r
    norms = {r["constexprs"]["NORM_ANGLES"] for r in variants if r["kernel"] == "fused_kernel"}
    assert norms == {False, True}
    dense = {r["constexprs"]["DENSE_OUT"] for r in variants if r["kernel"] == "set_backward_kernel"}
    assert dense == {False, True}


@pytest.mark.slow
def test_forward_keeps_the_reference_rounding(variants):
    """The forward kernels round as the reference does: no fused multiply-add (they compile
    with fp fusion off) and no approximate division or square root."""
    for r in variants:
        if r["fp_fusion"]:
            continue
        assert r["approx_div_sqrt"] == 0, r
        # float64 exp (libdevice) is written with fma: only the selections in float64 have any
        if not (r["constexprs"]["IS_F64"] and r["kernel"] in ("select_kernel", "fused_kernel")):
            assert r["fma"] == 0, r
