"""``set2graph_logits`` (docs/operators.md, set2graph_logits): the Set2Graph edge head.

- the oracle: ``topn_kernels.reference.set2graph_logits`` against ``nn.Sequential(Linear, ReLU,
  Linear)`` applied pair by pair in literal loops;
- the native and Triton kernels against the reference on ragged batches (lengths 0, 1, n and
  between), values and gradients under a random upstream gradient, in every float dtype, on
  shapes that take each path of the kernels (native: the backward of small sets, vectorised
  over hidden units, and of larger ones, vectorised over columns in several chunks of rows;
  class and hidden sizes that leave partial vectors); every CPU build of the native kernels
  (portable, AVX2, AVX-512); the Triton kernels under several tile sizes (tiles that do not
  divide n, partial chunks of hidden units, several chunks of the backward's partial sums,
  with and without tl.dot), and their GPU build (compiled for sm_90 on the CPU);
- padding never read (NaN and inf there change no bit), empty sets, determinism across runs and
  thread counts;
- the op ``topn_kernels::set2graph_logits``: opcheck of the forward and of the backward under
  several output masks (both backends), the fake kernel, torch.compile of a model without a
  graph break;
- dispatch, bad input (a TypeError or ValueError naming the argument), the module.

The Triton kernels run on CUDA where there is a GPU, else in Triton's interpreter on CPU
tensors (tests/conftest.py): their tests keep to small shapes.

Equivalence inputs are small multiples of powers of two (``_grid``): the first layer, sums of
products of such numbers, is then exact in float32 and float64, in every backend and summation
order, so both backends see the same relu pattern. (With arbitrary floats, a pre-activation
within rounding of 0 can take a different side of the relu in two backends, and the gradients
then differ by a whole term, which no tolerance covers.) The second layer and every gradient
are rounded as usual and compared with tolerances.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import topn_kernels as tk
from topn_kernels import reference
from topn_kernels.nn import Set2GraphHead
from topn_kernels.ops import _dispatch

from .helpers import CUDA, POISON, assert_close_scaled, device_for, on_device

OP = torch.ops.topn_kernels.set2graph_logits.default
BACKWARD_OP = torch.ops.topn_kernels.set2graph_logits_backward.default
INPUTS = ("x", "weight1", "bias1", "weight2", "bias2")
META = torch.device("meta")
ROOT = Path(__file__).resolve().parents[1]
TRITON = device_for("triton")  # CUDA on a GPU machine, else the CPU (Triton's interpreter)
BACKENDS = ("native", "triton")

# forward and gradient tolerances (docs/operators.md, set2graph_logits, Dtypes and precision)
RTOL = {
    torch.float32: (1e-5, 1e-4),
    torch.float64: (1e-12, 1e-10),
    torch.bfloat16: (torch.finfo(torch.bfloat16).eps,) * 2,
    torch.float16: (torch.finfo(torch.float16).eps,) * 2,
}

# (B, n, s, h, k, lengths): n = 5 takes the small-set backward on every build, n = 37 the
# column-vectorised one in several chunks of rows; n = 9 one or the other by vector width.
# h and k leave partial vectors and class chunks.
SHAPES = {
    "small": (4, 5, 3, 19, 6, [5, 1, 0, 3]),
    "qm9-like": (6, 9, 8, 16, 4, [9, 1, 4, 0, 9, 7]),
    "large": (3, 37, 5, 33, 9, [37, 1, 20]),
    "one-class": (2, 37, 4, 8, 1, [0, 37]),
}


def _grid(shape: tuple[int, ...], scale: float, g: torch.Generator) -> Tensor:
    """Integers in [-8, 8] times ``scale`` (a power of two), in float64."""
    return torch.randint(-8, 9, shape, generator=g).to(torch.float64) * scale


def _inputs(
    batch: int,
    n: int,
    s: int,
    h: int,
    k: int,
    lengths: list[int],
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    poison: bool = False,
) -> tuple[list[Tensor], Tensor]:
    """[x, weight1, bias1, weight2, bias2] (leaves requiring grad) and lengths int64 (B,).

    The first layer's inputs are on a grid of powers of two (exact first layer, see above);
    ``poison``: padding rows of x hold NaN, inf and -1e30."""
    g = torch.Generator().manual_seed(seed)
    x = _grid((batch, n, s), 0.25, g)
    if poison:
        for b, length in enumerate(lengths):
            for j in range(length, n):
                x[b, j] = POISON[j % len(POISON)]
    weight1, bias1 = _grid((h, 2 * s), 0.125, g), _grid((h,), 0.125, g)
    weight2 = torch.randn(k, h, generator=g, dtype=torch.float64)
    bias2 = torch.randn(k, generator=g, dtype=torch.float64)
    tensors = [t.to(dtype).requires_grad_() for t in (x, weight1, bias1, weight2, bias2)]
    return tensors, torch.tensor(lengths, dtype=torch.int64)


def _run(backend: str, inputs: list[Tensor], lengths: Tensor | None, seed: int = 7):
    """out, and the gradients of ``(out * g).sum()`` for a seeded random g (in out's dtype)
    with respect to the inputs that require them. Triton runs on TRITON; its results come back
    to the CPU."""
    if backend == "triton":
        inputs = on_device(TRITON, inputs)
        lengths = None if lengths is None else lengths.to(TRITON)
    out = tk.set2graph_logits(*inputs, lengths, backend=backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    g = g.to(device=out.device, dtype=out.dtype)
    leaves = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad((out * g).sum(), leaves)
    return out.cpu(), tuple(t.cpu() for t in grads)


# --- the reference -----------------------------------------------------------------------------


def test_reference_is_the_mlp_on_every_pair_of_real_points():
    torch.manual_seed(0)
    batch, n, s, h, k, lengths = 3, 4, 3, 5, 2, [4, 2, 0]
    mlp = nn.Sequential(nn.Linear(2 * s, h), nn.ReLU(), nn.Linear(h, k)).double()
    x = torch.randn(batch, n, s, dtype=torch.float64)
    weights = (mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias)
    out = reference.set2graph_logits(x, *weights, torch.tensor(lengths))
    assert out.shape == (batch, n, n, k) and out.dtype == torch.float64
    for b in range(batch):
        for i in range(n):
            for j in range(n):
                real = i < lengths[b] and j < lengths[b]
                want = mlp(torch.cat([x[b, i], x[b, j]])) if real else torch.zeros(k)
                torch.testing.assert_close(out[b, i, j], want.double(), rtol=1e-14, atol=1e-14)


def test_reference_keeps_the_input_dtype_and_ignores_padding():
    inputs, lengths = _inputs(*SHAPES["small"], dtype=torch.bfloat16, poison=True)
    out, grads = _run("reference", inputs, lengths)
    assert out.dtype == torch.bfloat16 and out.isfinite().all()
    assert all(g.dtype == torch.bfloat16 and g.isfinite().all() for g in grads)


# --- native and Triton against the reference ---------------------------------------------------


def _assert_matches_reference(inputs, lengths, dtype, backend="native"):
    rtol, grad_rtol = RTOL[dtype]
    out, grads = _run(backend, inputs, lengths)
    ref, ref_grads = _run("reference", inputs, lengths)
    assert out.dtype == ref.dtype == dtype
    assert_close_scaled(out, ref, rtol)
    for name, got, want in zip(INPUTS, grads, ref_grads, strict=True):
        assert got.dtype == want.dtype == dtype, name
        assert got.shape == want.shape, name
        assert_close_scaled(got, want, grad_rtol)
    return out, grads


@pytest.mark.parametrize("dtype", RTOL, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, shape, dtype):
    inputs, lengths = _inputs(*shape, dtype=dtype)
    out, grads = _assert_matches_reference(inputs, lengths, dtype, backend)
    for b, length in enumerate(lengths.tolist()):  # zero blocks and rows past each set
        assert (out[b, length:] == 0).all() and (out[b, :, length:] == 0).all()
        assert (grads[0][b, length:] == 0).all()


# (B, n, s, h, k, lengths): one point per set, full sets, a set of 0 points among full ones
EDGE_SHAPES = {
    "n1": (3, 1, 2, 6, 3, [1, 0, 1]),
    "full": (2, 11, 3, 20, 5, [11, 11]),
    "empty-and-full": (3, 6, 4, 17, 2, [6, 0, 6]),
}


@pytest.mark.parametrize("shape", EDGE_SHAPES.values(), ids=EDGE_SHAPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_lengths_match_reference(backend, shape):
    for dtype in (torch.float32, torch.float64):
        _assert_matches_reference(*_inputs(*shape, dtype=dtype), dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_on_unquantized_values(backend):
    """Arbitrary floats: the forward is continuous, so a relu decided differently within
    rounding of 0 changes the value by rounding only."""
    g = torch.Generator().manual_seed(3)
    batch, n, s, h, k = 5, 23, 7, 24, 3
    x = torch.randn(batch, n, s, generator=g)
    weights = [torch.randn(shape, generator=g) for shape in ((h, 2 * s), (h,), (k, h), (k,))]
    lengths = torch.tensor([23, 0, 1, 12, 22])
    device = TRITON if backend == "triton" else torch.device("cpu")
    args = on_device(device, [x, *weights], lengths)
    out = tk.set2graph_logits(*args[0], args[1], backend=backend).cpu()
    assert_close_scaled(out, reference.set2graph_logits(x, *weights, lengths), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lengths_none_means_full_sets(backend):
    inputs, _ = _inputs(2, 9, 3, 5, 2, [9, 9])
    out, grads = _run(backend, inputs, None)
    full, full_grads = _run(backend, inputs, torch.tensor([9, 9]))
    assert torch.equal(out, full)
    assert all(torch.equal(a, b) for a, b in zip(grads, full_grads, strict=True))


@pytest.mark.parametrize("shape", [SHAPES["small"], SHAPES["large"]], ids=["small", "large"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_is_never_read(backend, shape):
    """NaN, inf and -1e30 past each length change no bit of the values or the gradients, and
    padding rows get a zero gradient."""
    clean, lengths = _inputs(*shape)
    poisoned, _ = _inputs(*shape, poison=True)
    assert not poisoned[0].isfinite().all()
    out, grads = _run(backend, poisoned, lengths)
    want, want_grads = _run(backend, clean, lengths)
    assert torch.equal(out, want)
    for got, expected in zip(grads, want_grads, strict=True):
        assert torch.equal(got, expected)
    for b, length in enumerate(lengths.tolist()):
        assert (grads[0][b, length:] == 0).all()
    _assert_matches_reference(poisoned, lengths, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_real_point_gives_nan_in_its_set_only(backend):
    inputs, lengths = _inputs(3, 9, 3, 8, 2, [9, 5, 9])
    x = inputs[0].detach().clone()
    x[1, 2, 0] = float("nan")
    device = TRITON if backend == "triton" else torch.device("cpu")
    args, lengths = on_device(device, [x, *inputs[1:]], lengths)
    out = tk.set2graph_logits(*args, lengths, backend=backend).cpu()
    assert out[1, 2, :5].isnan().all() and out[1, :5, 2].isnan().all()
    assert out[[0, 2]].isfinite().all() and (out[1, 5:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sets_and_empty_shapes(backend):
    inputs, _ = _inputs(2, 6, 3, 5, 2, [0, 0])
    out, grads = _run(backend, inputs, torch.tensor([0, 0]))
    assert (out == 0).all() and (grads[0] == 0).all() and (grads[1] == 0).all()
    assert torch.equal(grads[4], torch.zeros(2))  # no pair: no gradient for bias2
    for shape in [(0, 6, 3, 5, 2, []), (2, 0, 3, 5, 2, [0, 0]), (2, 4, 3, 5, 0, [4, 2])]:
        inputs, lengths = _inputs(*shape)
        out, grads = _run(backend, inputs, lengths)
        ref, ref_grads = _run("reference", inputs, lengths)
        assert out.shape == ref.shape
        for got, want in zip(grads, ref_grads, strict=True):
            assert_close_scaled(got, want, 1e-5)


@pytest.mark.parametrize("n", [7, 40], ids=["small-sets", "large-sets"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_layer_sizes(backend, n):
    """s = 0 (the first layer is its bias), h = 0 (the output is bias2), h = 1 and k = 1,
    k = 0 (an empty output), and a batch of empty sets."""
    shapes = [
        (2, n, 0, 5, 3, [n, 2]),
        (2, n, 3, 0, 3, [n, 2]),
        (2, n, 2, 1, 1, [n, 4]),
        (2, n, 3, 5, 0, [n, 3]),
        (3, n, 3, 5, 2, [0, 0, 0]),
    ]
    for shape in shapes:
        inputs, lengths = _inputs(*shape)
        _assert_matches_reference(inputs, lengths, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_gradients_asked_for_are_computed(backend):
    inputs, lengths = _inputs(*SHAPES["large"])
    _, want = _run("reference", inputs, lengths)
    masks = [
        (True, False, False, False, False),
        (False, True, True, False, False),
        (False, False, False, True, False),
        (False, False, False, False, True),
    ]
    for wanted in masks:
        leaves = [t.detach().requires_grad_(w) for t, w in zip(inputs, wanted, strict=True)]
        _, grads = _run(backend, leaves, lengths)
        expected = [g for g, w in zip(want, wanted, strict=True) if w]
        for got, ref in zip(grads, expected, strict=True):
            assert_close_scaled(got, ref, 1e-4)


def test_native_is_deterministic_across_runs_and_thread_counts():
    """Small sets (many per task) and large ones (chunks of rows, partial sums of grad_v)."""
    sizes = torch.randint(0, 10, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    cases = [_inputs(40, 9, 6, 24, 4, sizes, seed=1), _inputs(3, 70, 6, 40, 5, [70, 33, 64])]
    threads = torch.get_num_threads()
    results = []
    try:
        for num_threads in (threads, threads, 1, 2):
            torch.set_num_threads(num_threads)
            tensors = []
            for inputs, lengths in cases:
                out, grads = _run("native", inputs, lengths)
                tensors += [out, *grads]
            results.append(tensors)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            assert torch.equal(got, want)


def test_triton_is_deterministic():
    """No atomics: the backward's partial sums are added in a fixed order (torch's
    deterministic mode is on in every test, tests/conftest.py)."""
    inputs, lengths = _inputs(*SHAPES["qm9-like"])
    first = _run("triton", inputs, lengths)
    again = _run("triton", inputs, lengths)
    for got, want in zip([again[0], *again[1]], [first[0], *first[1]], strict=True):
        assert torch.equal(got, want)


# Tile sizes forced on the Triton kernels (block_a, block_o, block_h, chunks) at n = 9, h = 20:
# tiles that do not divide n, hidden units in partial chunks, the backward's sums over the
# other points split into 3 chunks (the last one partial), with tl.dot (16 pairs and 16 hidden
# units at least) and without; 3 classes in float32, 17 (a partial tile of 32) in float64.
TRITON_TILES = {
    "no-dot": (4, 4, 8, 3),
    "dot": (4, 4, 16, 3),
    "tall": (8, 4, 16, 4),
}


@pytest.mark.parametrize("tiles", TRITON_TILES.values(), ids=TRITON_TILES.keys())
def test_triton_tile_sizes(monkeypatch, tiles):
    from topn_kernels.triton import set2graph_launch

    block_a, block_o, block_h, chunks = tiles
    forced = set2graph_launch.Tiles(block_a, block_o, block_h, chunks=chunks)
    monkeypatch.setattr(set2graph_launch, "tiles", lambda *args, **kwargs: forced)
    use_dot = block_a * block_o >= 16 and block_h >= 16
    for k, dtype in ((3, torch.float32), (17, torch.float64)):
        args = (2, 9, 20, k, True, True, True, True, dtype == torch.float64, False)
        launch, chunk, used = set2graph_launch.backward_launch(*args)
        assert launch.meta["USE_DOT"] == use_dot
        assert used == 3 and chunk % block_o == 0 and 2 * chunk < 9
        inputs, lengths = _inputs(2, 9, 3, 20, k, [9, 6], dtype=dtype, poison=True)
        _assert_matches_reference(inputs, lengths, dtype, "triton")


CPU_BUILDS = {
    "portable": {"TOPN_KERNELS_PORTABLE": "1"},
    "avx2": {"TOPN_KERNELS_SET2GRAPH_ISA": "avx2"},
    "avx512": {"TOPN_KERNELS_SET2GRAPH_ISA": "avx512"},
}


@pytest.mark.parametrize("setting", CPU_BUILDS.values(), ids=CPU_BUILDS.keys())
def test_every_cpu_build_matches_the_reference(setting):
    """Each build of the vectorised loops (the best one this CPU has is the default; a build
    the CPU lacks falls back to the next one), in a fresh interpreter, on every shape."""
    script = textwrap.dedent(
        """
        import torch
        from tests import test_set2graph_logits as t
        for shape in t.SHAPES.values():
            for dtype in (torch.float32, torch.float64):
                t._assert_matches_reference(*t._inputs(*shape, dtype=dtype), dtype)
        print("ok")
        """
    )
    keys = {k for s in CPU_BUILDS.values() for k in s}
    env = {k: v for k, v in os.environ.items() if k not in keys} | setting
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-4000:]


# (name, B, n, h, k, dtype): the benchmark shapes, bfloat16, float64 and 32 classes
HOPPER_SHAPES = [
    ("qm9", 512, 9, 64, 4, "fp32"),
    ("large", 4, 1024, 128, 4, "fp32"),
    ("large-bf16", 4, 1024, 128, 4, "bf16"),
    ("fp64", 4, 256, 64, 4, "fp64"),
    ("k32", 4, 256, 64, 32, "fp32"),
]
# (rows, want_h, want_w2, want_b2) of the backward's launches: every gradient; only weight2;
# only bias2; the column role
HOPPER_BACKWARDS = [(True, True, True, True), (True, False, True, False)]
HOPPER_BACKWARDS += [(True, False, False, True), (False, True, False, False)]


def _ptxas_report(ptx: str) -> tuple[int, int]:
    """(registers, spill store bytes) that ptxas (shipped with Triton) reports for one kernel."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"
    if not ptxas.exists():
        ptxas = ptxas.with_name("ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        command = [str(ptxas), "-arch=sm_90a", "-v", f"{tmp}/k.ptx", "-o", f"{tmp}/k.cubin"]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    return regs, int(re.search(r"(\d+) bytes spill stores", out).group(1))


def compile_for_hopper() -> None:
    """Compiles the Triton kernels as the host code launches them on a GPU, for sm_90, on the
    CPU (Triton's compiler and ptxas); prints one JSON line per kernel variant. Run without
    TRITON_INTERPRET."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from topn_kernels.triton import set2graph_backward, set2graph_forward
    from topn_kernels.triton import set2graph_launch as launches

    def signature(text: str, meta: dict) -> dict:
        return dict(word.split(":") for word in text.split()) | dict.fromkeys(meta, "constexpr")

    for name, batch, n, h, k, dt in HOPPER_SHAPES:
        io, ct, f64 = f"*{dt}", "*fp64" if dt == "fp64" else "*fp32", dt == "fp64"
        variants = [
            (
                set2graph_forward.pairs_forward_kernel,
                f"u_ptr:{ct} v_ptr:{ct} w2_ptr:{ct} b2_ptr:{ct} lengths_ptr:*i64 "
                f"out_ptr:{io} n:i32 h:i32 k:i32",
                launches.forward_launch(batch, n, h, k, f64, False),
            )
        ]
        for roles in HOPPER_BACKWARDS:
            launch, _, _ = launches.backward_launch(batch, n, h, k, *roles, f64, False)
            text = (
                f"g_ptr:{io} u_ptr:{ct} v_ptr:{ct} w2_ptr:{ct} lengths_ptr:*i64 gh_ptr:{ct} "
                f"gw2_ptr:{ct} gb2_ptr:{ct} stride_gb:i32 stride_gi:i32 stride_gj:i32 "
                "stride_gk:i32 batch:i32 n:i32 h:i32 k:i32 chunk:i32"
            )
            variants.append((set2graph_backward.pairs_backward_kernel, text, launch))
        for kernel, text, launch in variants:
            source = ASTSource(kernel, signature(text, launch.meta), constexprs=launch.meta)
            options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
            options["enable_fp_fusion"] = True
            target = GPUTarget("cuda", 90, 32)
            ptx = triton.compile(source, target=target, options=options).asm["ptx"]
            regs, spills = _ptxas_report(ptx)
            row = {"shape": name, "kernel": kernel.__name__, "constexprs": launch.meta}
            row |= {"num_warps": launch.num_warps, "registers": regs, "spill_bytes": spills}
            row["tf32"] = len(re.findall(r"tf32", ptx))
            print(json.dumps(row), flush=True)


@pytest.mark.slow  # about a minute from a cold Triton cache
@pytest.mark.skipif(CUDA, reason="on a GPU the kernels compile for real in the other tests")
def test_triton_kernels_compile_for_hopper():
    """Every kernel variant the host code launches on a GPU compiles for sm_90, keeps float32
    products in float32 (no TF32 instruction) and spills next to no registers."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = "from tests.test_set2graph_logits import compile_for_hopper; compile_for_hopper()"
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == len(HOPPER_SHAPES) * (1 + len(HOPPER_BACKWARDS))
    for row in rows:
        assert row["spill_bytes"] <= 64 and row["tf32"] == 0, row
        assert row["constexprs"]["USE_DOT"], row


# --- the op: opcheck, fake kernel, torch.compile ------------------------------------------------


def _device_of(backend: str) -> torch.device:
    return TRITON if backend == "triton" else torch.device("cpu")


@pytest.mark.parametrize(
    ("backend", "shape"),
    [
        pytest.param("native", SHAPES["small"], id="native-small"),
        pytest.param("native", SHAPES["large"], id="native-large"),
        pytest.param("triton", SHAPES["small"], id="triton-small"),
    ],
)
def test_opcheck_forward(backend, shape):
    inputs, lengths = on_device(_device_of(backend), *_inputs(*shape))
    torch.library.opcheck(OP, (*inputs, lengths, backend))


OUTPUT_MASKS = [
    (True,) * 5,
    (False, True, False, True, False),
    (True, False, False, False, False),
    (False, False, False, False, True),
    (False, False, True, True, False),
]


@pytest.mark.parametrize(
    ("backend", "wanted"),
    [pytest.param("native", w, id=f"native-{i}") for i, w in enumerate(OUTPUT_MASKS)]
    # the interpreter is slow: two masks, which between them launch every kernel variant
    + [pytest.param("triton", OUTPUT_MASKS[i], id=f"triton-{i}") for i in (0, 4)],
)
def test_opcheck_backward(backend, wanted):
    device = _device_of(backend)
    inputs, lengths = on_device(device, *_inputs(*SHAPES["large"]))
    inputs = [t.detach() for t in inputs]
    g = torch.randn(3, 37, 37, 9, generator=torch.Generator().manual_seed(0)).to(device)
    args = (g, *inputs, lengths, list(wanted), backend)
    grads = BACKWARD_OP(*args)
    assert [t is not None for t in grads] == list(wanted)
    torch.library.opcheck(BACKWARD_OP, args)


def test_triton_reads_the_upstream_gradient_with_its_strides():
    """An expanded gradient (``out.sum()``: stride 0) and a permuted one give the gradients of
    the same values made contiguous."""
    inputs, lengths = on_device(TRITON, *_inputs(*SHAPES["small"]))
    inputs = [t.detach() for t in inputs]
    everything = [True] * 5
    for g in (
        torch.ones((), device=TRITON).expand(4, 5, 5, 6),
        torch.randn(6, 5, 5, 4, device=TRITON).permute(3, 2, 1, 0),
    ):
        got = BACKWARD_OP(g, *inputs, lengths, everything, "triton")
        want = BACKWARD_OP(g.contiguous(), *inputs, lengths, everything, "triton")
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)


def test_the_kernel_checks_lengths_itself():
    """Under torch.compile the public function cannot read the lengths; the kernel does."""
    inputs, _ = _inputs(2, 4, 3, 5, 2, [4, 4])
    for bad in ([1, 5], [-1, 2]):
        with pytest.raises(ValueError, match="lengths must be in"):
            OP(*inputs, torch.tensor(bad), "native")


def test_the_fake_kernel_checks_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    inputs, lengths = _inputs(2, 4, 3, 5, 2, [4, 4])
    inputs = [t.detach() for t in inputs]
    bad = [  # (argument, value, the argument the message names)
        ("weight1", torch.randn(5, 7), "weight1"),
        ("bias1", torch.randn(4), "bias1"),
        ("weight2", torch.randn(2, 6), "weight2"),
        ("bias2", torch.randn(3), "bias2"),
        ("bias2", torch.randn(2, dtype=torch.float64), "bias2"),
        ("x", torch.randn(2, 4, 3, dtype=torch.float64), "weight1"),  # not x's dtype
    ]
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert OP(*inputs, lengths, "native").shape == (2, 4, 4, 2)
        for arg, value, name in bad:
            args = dict(zip(INPUTS, inputs, strict=True)) | {arg: value}
            with pytest.raises(RuntimeError, match=name):
                OP(*args.values(), lengths, "native")
        with pytest.raises(RuntimeError, match="lengths"):
            OP(*inputs, lengths.int(), "native")


@pytest.mark.slow
def test_compiled_model_matches_eager_without_graph_break():
    """fullgraph=True fails on any graph break; values and gradients equal eager."""
    torch.manual_seed(0)
    model = Set2GraphHead(set_dim=6, hidden=24, num_classes=3)
    x = torch.randn(5, 11, 6)
    lengths = torch.tensor([11, 3, 0, 7, 11])
    target = torch.randn(5, 11, 11, 3)

    def step(x, lengths):
        return ((model(x, lengths) - target) ** 2).sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        model.zero_grad()
        loss = fn(x, lengths)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for got, want in zip(*results, strict=True):
        assert_close_scaled(got, want, 1e-5)


# --- dispatch ---------------------------------------------------------------------------------


def test_auto_runs_native_on_cpu():
    inputs, lengths = _inputs(*SHAPES["small"])
    with tk.record_backends() as calls:
        out = tk.set2graph_logits(*inputs, lengths)
    assert calls["set2graph_logits"] == {"native": 1}
    assert torch.equal(out, tk.set2graph_logits(*inputs, lengths, backend="native"))


def test_auto_runs_triton_on_cuda_or_falls_back_when_it_cannot_run(monkeypatch):
    """Whether or not this machine has a GPU: Triton's availability is patched."""
    monkeypatch.setattr(_dispatch, "_warned", set())
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    cuda = torch.device("cuda")
    monkeypatch.setattr(_dispatch.triton_backend, "unavailable", lambda device: None)
    assert _dispatch.resolve("set2graph_logits", "auto", cuda) == "triton"
    assert _dispatch.resolve("set2graph_logits", "auto", torch.device("cpu")) == "native"
    no_gpu = (RuntimeError, "no GPU here")
    monkeypatch.setattr(_dispatch.triton_backend, "unavailable", lambda device: no_gpu)
    with pytest.warns(RuntimeWarning, match="backend 'auto' falls back.*no GPU here"):
        assert _dispatch.resolve("set2graph_logits", "auto", cuda) == "reference"
    with pytest.raises(RuntimeError, match="no GPU here"):
        _dispatch.resolve("set2graph_logits", "triton", cuda)


def test_triton_runs_the_op_with_the_triton_kernels():
    inputs, lengths = on_device(TRITON, *_inputs(*SHAPES["small"]))
    with tk.record_backends() as calls:
        out = tk.set2graph_logits(*inputs, lengths, backend="triton")
        if CUDA:  # auto on CUDA tensors
            assert torch.equal(tk.set2graph_logits(*inputs, lengths), out)
    assert calls["set2graph_logits"] == {"triton": 2 if CUDA else 1}
    assert out.device == TRITON
    assert torch.equal(out, OP(*inputs, lengths, "triton"))


# --- bad input ----------------------------------------------------------------------------------


def _call(**changes):
    """A valid call (B=3, n=6, s=2, h=5, k=4) with some arguments replaced."""
    g = torch.Generator().manual_seed(0)
    kwargs = {
        "x": torch.randn(3, 6, 2, generator=g),
        "weight1": torch.randn(5, 4, generator=g),
        "bias1": torch.randn(5, generator=g),
        "weight2": torch.randn(4, 5, generator=g),
        "bias2": torch.randn(4, generator=g),
        "lengths": torch.tensor([6, 0, 3]),
    }
    kwargs.update(changes)
    return lambda backend: tk.set2graph_logits(**kwargs, backend=backend)


BAD_INPUT = [
    ("x-2d", {"x": torch.randn(6, 2)}, ValueError, "x"),
    ("x-list", {"x": [[1.0, 2.0]]}, TypeError, "x"),
    ("x-int", {"x": torch.ones(3, 6, 2, dtype=torch.int64)}, TypeError, "x"),
    ("weight1-2s", {"weight1": torch.randn(5, 3)}, ValueError, "weight1"),
    ("weight1-3d", {"weight1": torch.randn(5, 4, 1)}, ValueError, "weight1"),
    ("bias1-h", {"bias1": torch.randn(4)}, ValueError, "bias1"),
    ("bias1-2d", {"bias1": torch.randn(5, 1)}, ValueError, "bias1"),
    ("weight2-h", {"weight2": torch.randn(4, 6)}, ValueError, "weight2"),
    ("bias2-k", {"bias2": torch.randn(3)}, ValueError, "bias2"),
    ("weight2-dtype", {"weight2": torch.randn(4, 5, dtype=torch.float64)}, TypeError, "weight2"),
    ("bias1-half", {"bias1": torch.randn(5).half()}, TypeError, "bias1"),
    ("weight1-device", {"weight1": torch.empty(5, 4, device=META)}, ValueError, "weight1"),
    ("bias2-device", {"bias2": torch.empty(4, device=META)}, ValueError, "bias2"),
    ("lengths-negative", {"lengths": torch.tensor([6, -1, 3])}, ValueError, "lengths"),
    ("lengths-above-n", {"lengths": torch.tensor([6, 7, 3])}, ValueError, "lengths"),
    ("lengths-float", {"lengths": torch.tensor([6.0, 1.0, 3.0])}, TypeError, "lengths"),
    ("lengths-bool", {"lengths": torch.tensor([True, False, True])}, TypeError, "lengths"),
    ("lengths-size", {"lengths": torch.tensor([6, 3])}, ValueError, "lengths"),
    ("lengths-2d", {"lengths": torch.ones(3, 1, dtype=torch.int64)}, ValueError, "lengths"),
    ("lengths-list", {"lengths": [6, 0, 3]}, TypeError, "lengths"),
    (
        "lengths-device",
        {"lengths": torch.ones(3, dtype=torch.int64, device=META)},
        ValueError,
        "lengths",
    ),
]


@pytest.mark.parametrize("backend", ["native", "reference", *(() if CUDA else ("triton",))])
@pytest.mark.parametrize(
    ("changes", "error", "name"), [pytest.param(c, e, n, id=i) for i, c, e, n in BAD_INPUT]
)
def test_bad_input_is_rejected_naming_the_argument(backend, changes, error, name):
    with pytest.raises(error, match=name):
        _call(**changes)(backend)


@pytest.mark.parametrize("backend", ["cuda", "keops", "auto ", None])
def test_unknown_backend_is_rejected(backend):
    with pytest.raises(ValueError, match="backend"):
        _call()(backend)


def test_valid_call_and_int32_lengths():
    out = _call(lengths=torch.tensor([6, 0, 3], dtype=torch.int32))("native")
    assert out.shape == (3, 6, 6, 4)
    assert torch.equal(out, _call()("native"))


# --- the module -------------------------------------------------------------------------------


def test_set2graph_head_shapes_and_initialisation():
    torch.manual_seed(0)
    head = Set2GraphHead(set_dim=5, hidden=16, num_classes=3)
    torch.manual_seed(0)
    first, second = nn.Linear(10, 16), nn.Linear(16, 3)
    params = dict(head.named_parameters())
    assert list(params) == ["weight1", "bias1", "weight2", "bias2"]
    for got, want in zip(params.values(), [*first.parameters(), *second.parameters()], strict=True):
        assert torch.equal(got, want)
    x = torch.randn(4, 7, 5)
    out = head(x, torch.tensor([7, 1, 0, 3]))
    assert out.shape == (4, 7, 7, 3) and out.dtype == torch.float32
    assert head(x).shape == (4, 7, 7, 3)
    mlp = nn.Sequential(first, nn.ReLU(), second)
    want = mlp(torch.cat([x[0, 2], x[0, 5]]))
    assert_close_scaled(out[0, 2, 5], want, 1e-5)
    reference_head = Set2GraphHead(5, 16, 3, backend="reference")
    reference_head.load_state_dict(head.state_dict())
    assert_close_scaled(reference_head(x, torch.tensor([7, 1, 0, 3])), out, 1e-5)
