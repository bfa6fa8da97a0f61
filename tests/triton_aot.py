"""Compiles every Triton kernel variant of topn_create for a Hopper GPU (sm_90) without one:
Triton's front end, LLVM and the ptxas that ships with Triton run on the CPU.

    python -m tests.triton_aot        # prints one JSON line per variant

Run without ``TRITON_INTERPRET`` (the kernels must be JIT functions, not interpreted ones).
Used by tests/test_topn_create_triton.py. The configurations are the ones the host code
(topn_kernels/triton/topn_create_launch.py) picks for a GPU at a few shapes; each line gives
the kernel, its constexprs, the registers and spill bytes ptxas reports, and the counts of
fused multiply-adds and of approximate divisions and square roots in the PTX.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from topn_kernels.triton import _math, topn_create_backward, topn_create_forward
from topn_kernels.triton import topn_create_launch as L

TARGET = GPUTarget("cuda", 90, 32)

# (name, B, n0, n_max, a, d, dtype): the two GPU targets of bench/topn_create.py, the other
# benchmark shape, a large reference set (chunked selection) and float64
SHAPES = [
    ("target", 4096, 1024, 256, 8, 256, "fp32"),
    ("target_bf16", 4096, 1024, 256, 8, 256, "bf16"),
    ("paper", 512, 70, 35, 3, 64, "fp32"),
    ("point_cloud", 32, 4096, 2048, 8, 128, "fp32"),
    ("large_n0", 64, 16384, 16384, 8, 64, "fp32"),
    ("fp64", 64, 300, 100, 4, 32, "fp64"),
]


def _signature(text: str) -> dict[str, str]:
    """{argument: Triton type}, in the kernel's argument order, from "name:type" words."""
    return dict(word.split(":") for word in text.split())


def _launches(b, n0, n_max, a, d, dt):
    """(kernel, signature, Launch) of every kernel the host code launches for one shape,
    both selection orders, both score norms, atomics or not."""
    io, ct, f64 = f"*{dt}", "*fp64" if dt == "fp64" else "*fp32", dt == "fp64"
    key = "*u64" if f64 else "*u32"
    rows = b * n_max
    sig = _signature(f"angles_ptr:{io} out_ptr:{ct} sq_ptr:{ct} n0:i32 a:i32")
    yield _math.normalize_angles_kernel, sig, L.normalize_launch(n0, f64, False)
    sig = _signature(
        f"query_ptr:{io} an_ptr:{ct} sizes_ptr:*i64 index_ptr:*i64 w_ptr:{ct} ckey_ptr:{key} "
        "cidx_ptr:*i64 n0:i32 a:i32 n_max:i32 cs:i32"
    )
    for sorted_, score_all in ((True, False), (False, True)):
        launch = L.select_launch(b, n0, sorted_, score_all, f64, False)
        yield topn_create_forward.select_kernel, sig, launch
    sig = _signature(
        f"table_ptr:{io} bias_ptr:{io} film_ptr:{io} index_ptr:*i64 w_ptr:{ct} x_ptr:{io} "
        f"mask_ptr:*i1 weight_ptr:{io} rows:i32 n_max:i32 n0:i32 d:i32"
    )
    yield topn_create_forward.film_kernel, sig, L.film_launch(rows, d, io != ct, f64, False)
    sig = _signature(
        f"gx_ptr:{io} gw_ptr:{io} query_ptr:{io} an_ptr:{ct} table_ptr:{io} bias_ptr:{io} "
        f"film_ptr:{io} index_ptr:*i64 sizes_ptr:*i64 gq_ptr:{io} gb_ptr:{io} "
        f"film_part_ptr:{ct} qn_ptr:{ct} m_ptr:{ct} dm_ptr:{ct} ds_ptr:{ct} ds_dense_ptr:{ct} "
        f"gt_acc_ptr:{ct} dan_acc_ptr:{ct} n0:i32 a:i32 d:i32 n_max:i32"
    )
    for score_all, atomic in ((False, True), (True, True), (False, False)):
        launch = L.set_backward_launch(b, n0, a, d, n_max, score_all, atomic, f64, False)
        yield topn_create_backward.set_backward_kernel, sig, launch
    sig = _signature(
        f"gx_ptr:{io} film_ptr:{io} angles_ptr:{io} angles_sq_ptr:{ct} order_ptr:*i64 "
        f"starts_ptr:*i64 m_ptr:{ct} ds_ptr:{ct} qn_ptr:{ct} gt_ptr:{io} ga_ptr:{io} "
        "a:i32 d:i32 n_max:i32"
    )
    launch = L.gather_launch(n0, a, d, rows, True, f64, False)
    yield topn_create_backward.point_gather_kernel, sig, launch
    sig = _signature(
        f"angles_ptr:{io} angles_sq_ptr:{ct} dan_ptr:{ct} ds_dense_ptr:{ct} qn_ptr:{ct} "
        f"ga_ptr:{io} batch:i32 n0:i32 a:i32"
    )
    for dense in (True, False):
        launch = L.finish_launch(n0, a, b, dense, f64, False)
        yield topn_create_backward.angles_finish_kernel, sig, launch


def _ptxas_report(ptx: str) -> tuple[int, int]:
    """(registers, spill store bytes) that ptxas reports for the PTX of one kernel."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"
    if not ptxas.exists():
        ptxas = ptxas.with_name("ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        command = [str(ptxas), "-arch=sm_90a", "-v", str(src), "-o", f"{tmp}/k.cubin"]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", out).group(1))
    return regs, spills


def main() -> None:
    seen = set()
    for name, *shape in SHAPES:
        for kernel, signature, launch in _launches(*shape):
            key = (kernel.__name__, str(signature), str(launch))
            if key in seen:
                continue
            seen.add(key)
            signature = {**signature, **{k: "constexpr" for k in launch.meta}}
            source = ASTSource(fn=kernel, signature=signature, constexprs=launch.meta)
            options = {"num_warps": launch.num_warps, "enable_fp_fusion": launch.fp_fusion}
            ptx = triton.compile(source, target=TARGET, options=options).asm["ptx"]
            regs, spills = _ptxas_report(ptx)
            row = {
                "shape": name,
                "kernel": kernel.__name__,
                "constexprs": launch.meta,
                "num_warps": launch.num_warps,
                "fp_fusion": launch.fp_fusion,
                "registers": regs,
                "spill_bytes": spills,
                "fma": len(re.findall(r"\bfma\.", ptx)),
                "approx_div_sqrt": len(re.findall(r"\b(div|sqrt)\.(full|approx)\.f32", ptx)),
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
