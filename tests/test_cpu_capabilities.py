"""The native and reference equivalence cases under the CPU code paths of the machines that occur.

torch's own kernels (``ATEN_CPU_CAPABILITY``: default, AVX2, AVX-512), MKL's
(``MKL_ENABLE_INSTRUCTIONS``) and oneDNN's (``ONEDNN_MAX_CPU_ISA``) round differently, and so do the
native kernels' portable and AVX2 builds (``TOPN_KERNELS_PORTABLE=1``: the portable Sinkhorn
softmin, the portable topn_create scoring loop, the portable attention of the transformer layer and
Set2Graph build, the portable Adam loop). The equivalence tests must pass on every CPU
(docs/operators.md, Ranking). Each library picks its code path from the CPU it finds, so a machine
runs them all at one level; the settings here are those machines, emulated on this one: a CPU with
AVX2 and no AVX-512 (the Intel machines of CI) and a CPU without AVX2 (every library at its SSE
level, the native kernels' portable builds). The main run covers this machine's own level (an
AVX-512 machine: the AMD ones of CI). Each setting runs the tests in a fresh interpreter, which is
when torch reads these variables, with its own ``TORCHINDUCTOR_CACHE_DIR``: inductor's cache does
not key on the capability, and code compiled for AVX-512 fails to build under the default one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# the equivalence tests of the native kernels and of the reference itself; Triton and KeOps
# do not depend on these variables (and are slow in the interpreter), the int32-overflow
# shapes only test indexing, and the Set2Graph builds already have their own subprocess test
FILES = [
    "tests/test_topn_create.py",
    "tests/test_topn_create_native.py",
    "tests/test_sinkhorn.py",
    "tests/test_set2graph_logits.py",
    "tests/test_set_transformer.py",
    "tests/test_fused_adam.py",
]
SELECT = "not triton and not keops and not geomloss and not past_int32 and not every_cpu_build"

NATIVE_CAPABILITY = torch.backends.cpu.get_cpu_capability()  # the best this CPU has

SETTINGS = {
    "avx2-cpu": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    },
    "no-avx2-cpu": {
        "ATEN_CPU_CAPABILITY": "default",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "TOPN_KERNELS_PORTABLE": "1",
    },
}
EXPECTED_CAPABILITY = {"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}


def _params():
    for name, setting in SETTINGS.items():
        marks = [pytest.mark.slow]
        if NATIVE_CAPABILITY == "DEFAULT" and setting.get("ATEN_CPU_CAPABILITY") == "avx2":
            marks.append(pytest.mark.skip(reason="this CPU has no AVX2"))
        if NATIVE_CAPABILITY == "AVX2" and name == "avx2-cpu":
            marks.append(pytest.mark.skip(reason="this CPU is one: the main run covers it"))
        yield pytest.param(setting, id=name, marks=marks)


def _env(setting: dict[str, str], tmp_path: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in {k for s in SETTINGS.values() for k in s}
    }
    env.update(setting)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    return env


@pytest.mark.parametrize("setting", list(_params()))
def test_equivalence_under_cpu_setting(setting, tmp_path):
    env = _env(setting, tmp_path)
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    capability = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    if "ATEN_CPU_CAPABILITY" in setting:  # the variable took effect
        assert capability == EXPECTED_CAPABILITY[setting["ATEN_CPU_CAPABILITY"]]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu"]
    select = SELECT
    if capability == NATIVE_CAPABILITY:
        # inductor generates code for this capability in the main run already; what else the
        # setting changes (MKL, oneDNN, the native builds) reaches eager and compiled alike
        select += " and not compiled_model_matches_eager"
    result = subprocess.run(
        [*command, "-k", select, *FILES], cwd=ROOT, env=env, capture_output=True, text=True
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, f"{setting} ({capability}):\n{result.stdout[-6000:]}"
    assert " passed" in summary and "failed" not in summary, summary
