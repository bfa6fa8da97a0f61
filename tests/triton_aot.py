"""Compiles every Triton kernel variant of topn_create for a Hopper GPU (sm_90) without one:
Triton's front end, LLVM and the ptxas that ships with Triton run on the CPU.

    python -m tests.triton_aot                  # the table of registers and spills
    python -m tests.triton_aot --json rows.jsonl  # and one JSON line per variant

Run without ``TRITON_INTERPRET`` (the kernels must be JIT functions, not interpreted ones).
tests/test_triton_aot.py runs it inside the test suite.

The variants are the host code's own: the forward and backward of
``topn_kernels/triton/topn_create_launch.py`` run on meta tensors (no memory, no device) at a
set of shapes, with every option and every path the launcher can be told to take
(``topn_create_launch.PATH_CHOICES``), and each kernel launch is recorded instead of run. A
launch is then specialised as Triton's launcher would specialise it: pointers aligned to 16
bytes and integers divisible by 16 get ``tt.divisibility=16``, integers equal to 1 become
constants; one shape passes unaligned pointers and sizes that no power of two divides, so
that the unspecialised variants compile too.

Each variant is compiled once (several at a time), and its PTX run through ptxas for sm_90a
as Triton runs it.
A row gives the kernel, the shapes that launch it, its constexprs, the registers and spill
bytes ptxas reports, and the counts of fused multiply-adds and of approximate divisions and
square roots in the PTX. The exit status is 1 when any variant spills.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource

from topn_kernels.triton import topn_create_launch as L

TARGET = GPUTarget("cuda", 90, 32)
META = torch.device("meta")


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    n0: int
    n: int | tuple[int, int]  # one size for every set (an int n), or a tensor n up to n[1]
    a: int
    d: int
    dtype: torch.dtype = torch.float32
    aligned: bool = True  # False: every pointer off a 16-byte boundary


# The benchmark's shapes (bench/topn_create.py) and its GPU targets, n an int or a tensor; a
# reference set larger than one selection block (chunked); every input dtype; integers equal to
# 1; and float16 with unaligned pointers and sizes that no power of two divides.
SHAPES = [
    Shape("target", 4096, 1024, 256, 8, 256),
    Shape("target_bf16", 4096, 1024, 256, 8, 256, torch.bfloat16),
    Shape("paper", 512, 70, (2, 35), 3, 64),
    Shape("paper_fixed_n", 512, 70, 35, 3, 64),
    Shape("large_batch", 2048, 128, 64, 8, 256),
    Shape("point_cloud", 32, 4096, (1, 2048), 8, 128),
    Shape("large_n0", 64, 16384, (1, 16384), 8, 64),
    Shape("fp64", 64, 300, (1, 100), 4, 32, torch.float64),
    Shape("ones", 1, 1, 1, 1, 1),
    Shape("odd", 3, 1001, (1, 333), 5, 250, torch.float16, aligned=False),
]


def _inputs(shape: Shape):
    """Meta tensors: query, angles, table, bias, n (int64 (B,)), film."""
    b, n0, a, d = shape.batch, shape.n0, shape.a, shape.d
    dims = [(b, a), (n0, a), (n0, d), (b, d), (4, d)]
    query, angles, table, bias, film = (
        torch.empty(s, dtype=shape.dtype, device=META) for s in dims
    )
    n = torch.empty((b,), dtype=torch.int64, device=META)
    return query, angles, table, bias, n, film


def _n_max(shape: Shape) -> int:
    return shape.n[1] if isinstance(shape.n, tuple) else shape.n


@contextlib.contextmanager
def _recorded():
    """Launch.__call__ records (kernel, args, launch) instead of launching."""
    launches: list = []

    def record(launch, kernel, *args):
        launches.append((kernel, args, launch))

    with mock.patch.object(L.Launch, "__call__", record):
        yield launches


def _host_runs(shape: Shape):
    """Every (kernel, args, launch) the host code issues for ``shape``: both orders, both
    score norms, with and without atomics, under every path choice."""
    query, angles, table, bias, n, film = _inputs(shape)
    n_max = _n_max(shape)
    fixed = None if isinstance(shape.n, tuple) else shape.n
    for choice in L.PATH_CHOICES:
        with L.paths(**choice), _recorded() as launches:
            for sorted_, score_norm in itertools.product((True, False), ("selected", "all")):
                args = (query, angles, table, bias, n, film, n_max, score_norm, sorted_)
                L.forward(*args, n_fixed=fixed)
                index = torch.empty((shape.batch, n_max), dtype=torch.int64, device=META)
                grad_x = torch.empty((shape.batch, n_max, shape.d), dtype=shape.dtype, device=META)
                grad_w = torch.empty((shape.batch, n_max), dtype=shape.dtype, device=META)
                for deterministic in (True, False):
                    L.backward(
                        grad_x,
                        grad_w,
                        query,
                        angles,
                        table,
                        bias,
                        n,
                        film,
                        index,
                        score_norm,
                        (True,) * 5,
                        deterministic,
                        n_fixed=fixed,
                    )
        yield from launches


@dataclass
class Job:
    """One variant to compile: what ``kernel[grid](*args, **meta)`` would compile."""

    module: str
    kernel: str
    signature: dict[str, str]
    constexprs: dict[tuple[int, ...], object]
    attrs: dict[tuple[int, ...], list]
    num_warps: int
    fp_fusion: bool
    meta: dict
    ones: list[str]  # integer arguments specialised as the constant 1
    shapes: list[str] = field(default_factory=list)

    def key(self) -> str:
        return repr(
            (
                self.kernel,
                self.signature,
                sorted(self.constexprs.items()),
                sorted(self.attrs.items()),
                self.num_warps,
                self.fp_fusion,
            )
        )


def specialise(kernel, args, launch, aligned: bool = True) -> Job:
    """The variant that launching ``kernel`` with ``args`` compiles (as Triton's launcher
    specialises it, jit.py: create_function_from_signature and _pack_args)."""
    params = [p for p in kernel.params if not p.is_constexpr]
    assert len(params) == len(args), (kernel.__name__, len(params), len(args))
    values = dict(zip((p.name for p in params), args, strict=True))
    signature, constexprs, attrs, ones = {}, {}, {}, []
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = launch.meta[p.name]
            continue
        value = values[p.name]
        align = not p.do_not_specialize_on_alignment and (aligned or not torch.is_tensor(value))
        specialize = not p.do_not_specialize
        ty, attr = native_specialize_impl(BaseBackend, value, p.is_const, specialize, align)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = value
            ones.append(p.name)
        elif isinstance(attr, str):
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    fn = kernel.fn
    return Job(
        fn.__module__,
        fn.__name__,
        signature,
        constexprs,
        attrs,
        launch.num_warps,
        launch.fp_fusion,
        dict(launch.meta),
        ones,
    )


def jobs(shapes=SHAPES) -> list[Job]:
    """The distinct variants of every shape, in order of first appearance."""
    found: dict[str, Job] = {}
    for shape in shapes:
        for kernel, args, launch in _host_runs(shape):
            job = specialise(kernel, args, launch, shape.aligned)
            job = found.setdefault(job.key(), job)
            if shape.name not in job.shapes:
                job.shapes.append(shape.name)
    return list(found.values())


def _ptxas_report(ptx: str, fp_fusion: bool) -> tuple[int, int]:
    """(registers, spill store bytes) that ptxas reports for the PTX of one kernel, run as
    Triton runs it for sm_90 (nvidia/compiler.py, make_cubin: the same ptxas and options).
    Kept in Triton's cache directory, by PTX and options: a later run compiles nothing."""
    ptxas = get_ptxas(TARGET.arch).path
    fmad = [] if fp_fusion else ["--fmad=false"]
    arch = sm_arch_from_capability(TARGET.arch)
    options = ["-lineinfo", *fmad, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}"]
    key = hashlib.sha256("\0".join([ptxas, *options, ptx]).encode()).hexdigest()
    cached = Path(triton.knobs.cache.dir) / "topn_kernels_aot" / f"{key}.json"
    if cached.exists():
        return tuple(json.loads(cached.read_text()))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        command = [ptxas, *options, str(src), "-o", f"{tmp}/k.cubin"]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", out).group(1))
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps([regs, spills]))
    return regs, spills


def compile_job(job: Job) -> dict:
    """Compiles one variant for sm_90; its row of the report."""
    kernel = getattr(importlib.import_module(job.module), job.kernel)
    source = ASTSource(
        fn=kernel, signature=job.signature, constexprs=job.constexprs, attrs=job.attrs
    )
    options = {"num_warps": job.num_warps, "enable_fp_fusion": job.fp_fusion}
    ptx = triton.compile(source, target=TARGET, options=options).asm["ptx"]
    regs, spills = _ptxas_report(ptx, job.fp_fusion)
    return {
        "kernel": job.kernel,
        "shapes": job.shapes,
        "constexprs": job.meta,
        "ones": job.ones,
        "aligned": sum(1 for a in job.attrs.values() if a),
        "num_warps": job.num_warps,
        "fp_fusion": job.fp_fusion,
        "registers": regs,
        "spill_bytes": spills,
        "fma": len(re.findall(r"\bfma\.", ptx)),
        "approx_div_sqrt": len(re.findall(r"\b(div|sqrt)\.(full|approx)\.f32", ptx)),
    }


def table(rows: list[dict]) -> str:
    """One line per variant: kernel, registers, spills, warps, first shape, constexprs."""
    lines = [("kernel", "regs", "spill", "warps", "shape", "constexprs")]
    for r in rows:
        meta = " ".join(
            f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in r["constexprs"].items()
        )
        if r["ones"]:
            meta += " ones=" + ",".join(r["ones"])
        shapes = r["shapes"][0] + (f" +{len(r['shapes']) - 1}" if len(r["shapes"]) > 1 else "")
        lines.append(
            (
                r["kernel"],
                str(r["registers"]),
                str(r["spill_bytes"]),
                str(r["num_warps"]),
                shapes,
                meta,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, [*widths, 0], strict=True)).rstrip()
        for line in lines
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.triton_aot", description=__doc__)
    parser.add_argument("--json", type=Path, help="also write one JSON line per variant here")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--shape", action="append", help="only these shapes (repeatable)")
    parser.add_argument("--kernel", action="append", help="only these kernels (repeatable)")
    args = parser.parse_args(argv)
    if L.interpreting():
        parser.error("TRITON_INTERPRET is set: run without it (the kernels must be compiled)")
    todo = jobs([s for s in SHAPES if args.shape is None or s.name in args.shape])
    todo = [j for j in todo if args.kernel is None or j.kernel in args.kernel]
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        rows = list(pool.map(compile_job, todo))
    print(table(rows), flush=True)
    if args.json is not None:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spilled = [r for r in rows if r["spill_bytes"]]
    print(f"{len(rows)} variants compiled for sm_90, {len(spilled)} spill", flush=True)
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
