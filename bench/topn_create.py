"""topn_create cases: named shapes x providers x directions (docs/operators.md, section
"topn_create"; the oracle is topn_kernels/reference.py), and the GPU targets of the Triton
kernels, checked against the rows of a run by ``check_targets``.

Providers: ``eager`` (the reference), ``compile`` (torch.compile of it), ``compile_plain``
(torch.compile of :func:`plain_topn_create`, what a user with one set size writes; where n is
uniform), on CPU ``native_op`` (the custom op called directly, without the public function's
validation and dispatch: the kernel's own time) and, on a GPU,
``compile_ro`` (torch.compile(mode="reduce-overhead"): CUDA graphs, a second baseline; not
for accum4, where gradients accumulated across replays are overwritten);
``native`` on CPU; on a GPU ``triton`` (the paths "auto" picks) and one provider per forced
Triton path (``TRITON_PATHS``: radix or sort selection, split, fused or single-launch writer).
Directions: ``fwd`` under no_grad; ``fwd+bwd``, the forward and ``torch.autograd.grad`` from
fixed upstream gradients; ``step``, a training step: the forward, the backward from those
upstream gradients accumulating into the inputs' ``.grad`` (``loss.backward()`` of a loss
whose gradient at the outputs they are, without the loss's own cost), then the grads set to
None; ``accum4``, four
forwards and backwards accumulating into the grads, then set to None (the gradient
accumulation pattern; ``native_nocache`` shows the output pool's part). The ``tiny`` shape
(B=1) times the fixed cost of a call: ``native`` minus ``native_op`` is the validation and
dispatch overhead (:func:`cpu_targets`).

A Triton provider's case first runs once and compares its index with the eager reference's:
the rows' params get ``index_mismatch_sets`` (sets whose index differs: 0, or a few sets with
scores closer than the ranking tolerance, docs/operators.md "Ranking"). The environment
variable ``TOPN_BENCH_PROVIDERS`` (comma-separated names or prefixes, e.g. ``triton,eager``)
keeps only some providers (bench/gpu_check.sh times the baselines in steps of their own).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import astuple, dataclass

import torch
import torch.nn.functional as F

import topn_kernels as tk
from topn_kernels import reference
from topn_kernels.ops.topn_create_op import topn_create as topn_create_op

from .cases import DIRECTIONS, Case, fresh_compile


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    n0: int
    n: int | tuple[int, int]  # fixed size, or per-set sizes uniform in [low, high]
    a: int
    d: int


SHAPES = [
    Shape("paper", 512, 70, (2, 35), 3, 64),
    Shape("paper_n35", 512, 70, 35, 3, 64),
    Shape("point_cloud", 32, 4096, 2048, 8, 128),
    Shape("large_batch", 2048, 128, 64, 8, 256),
]
TINY = Shape("tiny", 1, 8, 2, 3, 4)  # the fixed cost of a call (CPU, forward)
TRAINING = ("step", "accum4")
# GPU only, forward only: the shape of the bandwidth target, in float32 and bfloat16
TARGET = Shape("target", 4096, 1024, 256, 8, 256)
GPU_SHAPES = [(TARGET, torch.float32), (Shape("target_bf16", *astuple(TARGET)[1:]), torch.bfloat16)]


def _native(*args, **kwargs):
    return tk.topn_create(*args, backend="native", **kwargs)


def plain_topn_create(query, angles, table, bias, n: int, film, *, n_max: int):
    """Top-n creation as a user with one set size ``n`` writes it in plain PyTorch: cosine
    scores, ``topk``, softmax of the selected scores, gather, bias and FiLM. Returns (x, None,
    index, weight) like ``topn_create`` (no mask: every slot is real)."""
    scores = F.normalize(query, dim=-1) @ F.normalize(angles, dim=-1).T
    top = scores.topk(n, dim=1)
    weight = top.values.softmax(dim=-1)
    h = table[top.indices] + bias[:, None, :]
    m = weight[..., None]
    x = h * (m * film[0] + film[1]) + (m * film[2] + film[3])
    return x, None, top.indices, weight


def _native_op(query, angles, table, bias, n, film, *, n_max):
    """The native custom op alone, its arguments prepared outside the public function (the
    sizes tensor of an int ``n`` is made once, at the first call)."""
    sizes = _native_op_sizes(n, query.shape[0])
    args = (query, angles, table, bias, sizes, film, n_max, "selected", True, "native", -1)
    return topn_create_op(*args)  # as the public function calls it


@functools.cache
def _native_op_sizes(n: int, batch: int) -> torch.Tensor:
    return torch.full((batch,), n, dtype=torch.int64)


def _triton(*args, **kwargs):
    return tk.topn_create(*args, backend="triton", **kwargs)


@contextlib.contextmanager
def _no_output_cache():
    """The native op without its pool of output blocks: fresh pages at every call."""
    previous = tk.native.set_cache_limit(0)
    try:
        yield
    finally:
        tk.native.set_cache_limit(previous)


# Triton providers forcing one path each (topn_kernels/triton/topn_create_launch.py, paths)
TRITON_PATHS = {
    "triton_radix": {"select": "radix"},
    "triton_sort": {"select": "sort"},
    "triton_split": {"forward": "split", "backward": "split"},
    "triton_fused": {"forward": "fused"},
    "triton_single": {"forward": "single", "backward": "single"},
}
PROVIDERS_VAR = "TOPN_BENCH_PROVIDERS"


def _paths(**choice: str) -> contextlib.AbstractContextManager:
    from topn_kernels.triton import topn_create_launch

    return topn_create_launch.paths(**choice)


def _wanted(name: str) -> bool:
    wanted = [w.strip() for w in os.environ.get(PROVIDERS_VAR, "").split(",") if w.strip()]
    return not wanted or any(name == w or name.startswith(w) for w in wanted)


def providers(device: torch.device, shape: Shape) -> dict[str, tuple[Callable, Callable]]:
    """name -> (topn_create-like callable, context to time it in)."""
    out = {
        "eager": (reference.topn_create, contextlib.nullcontext),
        "compile": (torch.compile(reference.topn_create, dynamic=False), contextlib.nullcontext),
    }
    if isinstance(shape.n, int):
        plain = torch.compile(plain_topn_create, dynamic=False)
        out["compile_plain"] = (plain, contextlib.nullcontext)
    if device.type == "cuda":
        ro = torch.compile(reference.topn_create, dynamic=False, mode="reduce-overhead")
        out["compile_ro"] = (ro, contextlib.nullcontext)
    if device.type == "cpu" and tk.native.AVAILABLE:
        out["native"] = (_native, contextlib.nullcontext)
        out["native_nocache"] = (_native, _no_output_cache)
        if isinstance(shape.n, int):
            out["native_op"] = (_native_op, contextlib.nullcontext)
    if device.type == "cuda" and tk.triton.unavailable(device) is None:
        out["triton"] = (_triton, contextlib.nullcontext)
        for name, choice in TRITON_PATHS.items():
            out[name] = (_triton, functools.partial(_paths, **choice))
    return {name: value for name, value in out.items() if _wanted(name)}


def index_mismatch_sets(fn: Callable, context: Callable, inputs, n, n_max: int) -> int:
    """Sets whose index from ``fn`` (run under ``context``) differs from the eager
    reference's."""
    query, angles, table, bias, film = inputs
    with torch.no_grad():
        with context():
            got = fn(query, angles, table, bias, n, film, n_max=n_max)[2]
        want = reference.topn_create(query, angles, table, bias, n, film, n_max=n_max)[2]
    return int((got != want).any(1).sum())


def _sizes(shape: Shape) -> tuple[torch.Tensor, int]:
    """The seeded set sizes (B,) of a shape and its n_max."""
    if isinstance(shape.n, tuple):
        g = torch.Generator().manual_seed(0)
        return torch.randint(shape.n[0], shape.n[1] + 1, (shape.batch,), generator=g), shape.n[1]
    return torch.full((shape.batch,), shape.n), shape.n


def forward_bytes(shape: Shape, element_size: int = 4) -> int:
    """Bytes a forward must move at least (element_size: bytes of the input dtype).

    Written: x, mask (bool), index (int64) and weight, every slot of (B, n_max). Read once
    each: the table, the angles, the query, the bias, film and a tensor n. The table rows are
    gathered once per selected slot, but the table (1 MB at the target shape) stays in the
    GPU's L2 cache: counting a row per slot would credit the kernel with traffic that never
    reaches memory. %peak is then the fraction of copy bandwidth spent on real bytes.
    """
    _, n_max = _sizes(shape)
    b, n0, a, d = shape.batch, shape.n0, shape.a, shape.d
    written = b * n_max * (d * element_size + 1 + 8 + element_size)  # x, mask, index, weight
    read = (n0 * (d + a) + b * (a + d) + 4 * d) * element_size  # table, angles, query, bias, film
    if isinstance(shape.n, tuple):
        read += 8 * b  # the set sizes
    return written + read


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype = torch.float32):
    """[query, angles, table, bias, film] (requiring grad), n (int or (B,)) and n_max."""
    g = torch.Generator().manual_seed(1)
    b, n0, a, d = shape.batch, shape.n0, shape.a, shape.d
    dims = [(b, a), (n0, a), (n0, d), (b, d), (4, d)]
    inputs = [torch.randn(s, generator=g).to(device, dtype).requires_grad_() for s in dims]
    sizes, n_max = _sizes(shape)
    n = sizes.to(device) if isinstance(shape.n, tuple) else shape.n
    return inputs, n, n_max


def timed_call(fn: Callable, inputs, n, n_max: int, direction: str) -> Callable[[], object]:
    """The timed closure of a direction (module docstring): forward under no_grad; forward
    and ``autograd.grad``; a training step; four accumulated steps."""
    query, angles, table, bias, film = inputs

    def forward():
        return fn(query, angles, table, bias, n, film, n_max=n_max)

    if direction == "fwd":

        def forward_only():
            with torch.no_grad():
                return forward()

        return forward_only
    out = forward()
    g = torch.Generator().manual_seed(2)
    grad_x = torch.randn(out[0].shape, generator=g).to(out[0])
    grad_w = torch.randn(out[3].shape, generator=g).to(out[3])

    def forward_backward():
        x, _, _, weight = forward()
        return torch.autograd.grad((x, weight), inputs, (grad_x, grad_w))

    def backward():  # loss.backward() of a loss whose gradients at (x, weight) are fixed
        x, _, _, weight = forward()
        torch.autograd.backward((x, weight), (grad_x, grad_w))

    def step():
        backward()
        for t in inputs:
            t.grad = None

    def accumulate():
        for _ in range(4):
            backward()
        for t in inputs:
            t.grad = None

    return {"fwd+bwd": forward_backward, "step": step, "accum4": accumulate}[direction]


def cases(device: torch.device) -> Iterator[Case]:
    runs = [(shape, torch.float32, (*DIRECTIONS, *TRAINING)) for shape in SHAPES]
    if device.type == "cuda":
        runs += [(shape, dtype, ("fwd",)) for shape, dtype in GPU_SHAPES]
    else:
        runs.append((TINY, torch.float32, ("fwd",)))
    for shape, dtype, directions in runs:
        params = {"B": shape.batch, "n0": shape.n0, "n": shape.n, "a": shape.a, "d": shape.d}
        params["dtype"] = str(dtype).removeprefix("torch.")
        for direction in directions:
            nbytes = forward_bytes(shape, dtype.itemsize) if direction == "fwd" else None
            for name, (fn, context) in providers(device, shape).items():
                if name == "native_nocache" and direction not in ("fwd", "accum4"):
                    continue  # the pool matters where outputs are made and kept
                if name == "compile_ro" and direction == "accum4":
                    # a gradient accumulated into .grad lives in CUDA-graph memory that the
                    # next replay overwrites: an error on an H200 (pytorch/pytorch#169545)
                    continue
                case_params = dict(params)  # a Triton case adds its index check

                def build(
                    fn=fn,
                    context=context,
                    shape=shape,
                    dtype=dtype,
                    direction=direction,
                    name=name,
                    case_params=case_params,
                ):
                    fresh_compile(name)
                    inputs, n, n_max = make_inputs(shape, device, dtype)
                    if name.startswith("triton"):
                        mismatch = index_mismatch_sets(fn, context, inputs, n, n_max)
                        case_params["index_mismatch_sets"] = mismatch
                    return timed_call(fn, inputs, n, n_max, direction)

                yield Case(
                    "topn_create", shape.name, direction, name, case_params, nbytes, build, context
                )


def check_targets(rows: list[dict]) -> list[dict]:
    """The GPU targets of the Triton kernels, from the benchmark rows of one run on a GPU:
    the forward at the target shape moves >= 80% of the copy bandwidth in real bytes (float32,
    bfloat16); at the paper shape the forward is >= 3x faster than torch.compile of the
    reference; forward+backward is >= 2x faster than it at every shape measured in both
    directions. The paper shape's two are also checked against
    torch.compile(mode="reduce-overhead"), the second baseline. Each entry: target, shape,
    measured (None if a row is missing), met."""
    by_key = {
        (r["shape"], r["direction"], r["provider"]): r for r in rows if r["op"] == "topn_create"
    }

    def speedup(shape, direction, baseline="compile"):
        base = by_key.get((shape, direction, baseline))
        ours = by_key.get((shape, direction, "triton"))
        return None if base is None or ours is None else base["ms"] / ours["ms"]

    def target(text, shape, measured, bound):
        met = measured is not None and measured >= bound
        return {"target": text, "shape": shape, "measured": measured, "met": met}

    out = []
    for shape, _ in GPU_SHAPES:
        row = by_key.get((shape.name, "fwd", "triton"))
        pct = None if row is None else row["pct_peak"]
        out.append(target("fwd >= 80% of copy bandwidth", shape.name, pct, 80))
    compiled = "torch.compile(reference)"
    out.append(target(f"fwd >= 3x {compiled}", "paper", speedup("paper", "fwd"), 3))
    for shape in SHAPES:
        x = speedup(shape.name, "fwd+bwd")
        out.append(target(f"fwd+bwd >= 2x {compiled}", shape.name, x, 2))
    ro = 'torch.compile(reference, mode="reduce-overhead")'
    out.append(target(f"fwd >= 3x {ro}", "paper", speedup("paper", "fwd", "compile_ro"), 3))
    x = speedup("paper", "fwd+bwd", "compile_ro")
    out.append(target(f"fwd+bwd >= 2x {ro}", "paper", x, 2))
    return out


BASELINE_PROVIDERS = ("eager", "compile", "compile_plain")


def cpu_targets(rows: list[dict]) -> list[dict]:
    """The CPU targets of the native op, from the rows of one run: against the fastest
    baseline of ``BASELINE_PROVIDERS`` at each shape with one set size (paper_n35,
    point_cloud, large_batch), the forward >= 3x and the training step >= 2x; gradient
    accumulation (accum4) with the output pool never slower than without it (>= 1x); the
    validation and dispatch overhead (tiny shape: ``native`` - ``native_op``) <= 10 us.
    Each entry: target, shape, measured (None if a row is missing), met."""
    by_key = {
        (r["shape"], r["direction"], r["provider"]): r["ms"]
        for r in rows
        if r["op"] == "topn_create"
    }

    def best_baseline(shape, direction):
        found = [
            by_key[(shape, direction, b)]
            for b in BASELINE_PROVIDERS
            if (shape, direction, b) in by_key
        ]
        return min(found) if found else None

    def entry(text, shape, measured, met):
        return {"target": text, "shape": shape, "measured": measured, "met": met}

    out = []
    for shape in (s.name for s in SHAPES if isinstance(s.n, int)):
        for direction, bound in (("fwd", 3.0), ("step", 2.0)):
            base, ours = best_baseline(shape, direction), by_key.get((shape, direction, "native"))
            x = None if base is None or ours is None else base / ours
            text = f"{direction}: native >= {bound:g}x the fastest baseline"
            out.append(entry(text, shape, x, x is not None and x >= bound))
        pool = by_key.get((shape, "accum4", "native"))
        fresh = by_key.get((shape, "accum4", "native_nocache"))
        x = None if pool is None or fresh is None else fresh / pool
        out.append(entry("accum4: with the pool >= 1x without", shape, x, x is not None and x >= 1))
    call, kernel = (
        by_key.get((TINY.name, "fwd", "native")),
        by_key.get((TINY.name, "fwd", "native_op")),
    )
    us = None if call is None or kernel is None else 1e3 * (call - kernel)
    out.append(
        entry("validation + dispatch overhead <= 10 us", TINY.name, us, us is not None and us <= 10)
    )
    return out
