"""``set2graph_logits`` (docs/operators.md, set2graph_logits): the Set2Graph edge head.

- the oracle: ``topn_kernels.reference.set2graph_logits`` against ``nn.Sequential(Linear, ReLU,
  Linear)`` applied pair by pair in literal loops;
- the native kernels against the reference on ragged batches (lengths 0, 1, n and between),
  values and gradients under a random upstream gradient, in every float dtype, on shapes that
  take each path of the kernels (the backward of small sets, vectorised over hidden units, and
  of larger ones, vectorised over columns in several chunks of rows; class and hidden sizes
  that leave partial vectors); every CPU build of the kernels (portable, AVX2, AVX-512);
- padding never read (NaN and inf there change no bit), empty sets, determinism across runs and
  thread counts;
- the op ``topn_kernels::set2graph_logits``: opcheck of the forward and of the backward under
  several output masks, the fake kernel, torch.compile of a model without a graph break;
- dispatch, bad input (a TypeError or ValueError naming the argument), the module.

Equivalence inputs are small multiples of powers of two (``_grid``): the first layer, sums of
products of such numbers, is then exact in float32 and float64, in every backend and summation
order, so both backends see the same relu pattern. (With arbitrary floats, a pre-activation
within rounding of 0 can take a different side of the relu in two backends, and the gradients
then differ by a whole term, which no tolerance covers.) The second layer and every gradient
are rounded as usual and compared with tolerances.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import topn_kernels as tk
from topn_kernels import reference
from topn_kernels.nn import Set2GraphHead
from topn_kernels.ops import _dispatch

from .helpers import POISON, assert_close_scaled

OP = torch.ops.topn_kernels.set2graph_logits.default
BACKWARD_OP = torch.ops.topn_kernels.set2graph_logits_backward.default
INPUTS = ("x", "weight1", "bias1", "weight2", "bias2")
META = torch.device("meta")
ROOT = Path(__file__).resolve().parents[1]

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
    with respect to the inputs that require them."""
    out = tk.set2graph_logits(*inputs, lengths, backend=backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    leaves = [t for t in inputs if t.requires_grad]
    return out, torch.autograd.grad((out * g).sum(), leaves)


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


# --- native against the reference --------------------------------------------------------------


def _assert_matches_reference(inputs, lengths, dtype):
    rtol, grad_rtol = RTOL[dtype]
    out, grads = _run("native", inputs, lengths)
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
def test_native_matches_reference(shape, dtype):
    inputs, lengths = _inputs(*shape, dtype=dtype)
    out, grads = _assert_matches_reference(inputs, lengths, dtype)
    for b, length in enumerate(lengths.tolist()):  # zero blocks and rows past each set
        assert (out[b, length:] == 0).all() and (out[b, :, length:] == 0).all()
        assert (grads[0][b, length:] == 0).all()


def test_native_matches_reference_on_unquantized_values():
    """Arbitrary floats: the forward is continuous, so a relu decided differently within
    rounding of 0 changes the value by rounding only."""
    g = torch.Generator().manual_seed(3)
    batch, n, s, h, k = 5, 23, 7, 24, 3
    x = torch.randn(batch, n, s, generator=g)
    weights = [torch.randn(shape, generator=g) for shape in ((h, 2 * s), (h,), (k, h), (k,))]
    lengths = torch.tensor([23, 0, 1, 12, 22])
    out = tk.set2graph_logits(x, *weights, lengths, backend="native")
    assert_close_scaled(out, reference.set2graph_logits(x, *weights, lengths), 1e-5)


def test_lengths_none_means_full_sets():
    inputs, _ = _inputs(2, 9, 3, 5, 2, [9, 9])
    out, grads = _run("native", inputs, None)
    full, full_grads = _run("native", inputs, torch.tensor([9, 9]))
    assert torch.equal(out, full)
    assert all(torch.equal(a, b) for a, b in zip(grads, full_grads, strict=True))


@pytest.mark.parametrize("shape", [SHAPES["small"], SHAPES["large"]], ids=["small", "large"])
def test_padding_is_never_read(shape):
    """NaN, inf and -1e30 past each length change no bit of the values or the gradients, and
    padding rows get a zero gradient."""
    clean, lengths = _inputs(*shape)
    poisoned, _ = _inputs(*shape, poison=True)
    assert not poisoned[0].isfinite().all()
    out, grads = _run("native", poisoned, lengths)
    want, want_grads = _run("native", clean, lengths)
    assert torch.equal(out, want)
    for got, expected in zip(grads, want_grads, strict=True):
        assert torch.equal(got, expected)
    for b, length in enumerate(lengths.tolist()):
        assert (grads[0][b, length:] == 0).all()
    _assert_matches_reference(poisoned, lengths, torch.float32)


def test_nan_in_a_real_point_gives_nan_in_its_set_only():
    inputs, lengths = _inputs(3, 9, 3, 8, 2, [9, 5, 9])
    x = inputs[0].detach().clone()
    x[1, 2, 0] = float("nan")
    out = tk.set2graph_logits(x, *inputs[1:], lengths, backend="native")
    assert out[1, 2, :5].isnan().all() and out[1, :5, 2].isnan().all()
    assert out[[0, 2]].isfinite().all() and (out[1, 5:] == 0).all()


def test_empty_sets_and_empty_shapes():
    inputs, _ = _inputs(2, 6, 3, 5, 2, [0, 0])
    out, grads = _run("native", inputs, torch.tensor([0, 0]))
    assert (out == 0).all() and (grads[0] == 0).all() and (grads[1] == 0).all()
    assert torch.equal(grads[4], torch.zeros(2))  # no pair: no gradient for bias2
    for shape in [(0, 6, 3, 5, 2, []), (2, 0, 3, 5, 2, [0, 0]), (2, 4, 3, 5, 0, [4, 2])]:
        inputs, lengths = _inputs(*shape)
        out, grads = _run("native", inputs, lengths)
        ref, ref_grads = _run("reference", inputs, lengths)
        assert out.shape == ref.shape
        for got, want in zip(grads, ref_grads, strict=True):
            assert_close_scaled(got, want, 1e-5)


@pytest.mark.parametrize("n", [7, 40], ids=["small-sets", "large-sets"])
def test_degenerate_layer_sizes(n):
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
        _assert_matches_reference(inputs, lengths, torch.float32)


def test_only_the_gradients_asked_for_are_computed():
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
        _, grads = _run("native", leaves, lengths)
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


# --- the op: opcheck, fake kernel, torch.compile ------------------------------------------------


@pytest.mark.parametrize("shape", [SHAPES["small"], SHAPES["large"]], ids=["small", "large"])
def test_opcheck_forward(shape):
    inputs, lengths = _inputs(*shape)
    torch.library.opcheck(OP, (*inputs, lengths, "native"))


@pytest.mark.parametrize(
    "wanted",
    [
        (True,) * 5,
        (False, True, False, True, False),
        (True, False, False, False, False),
        (False, False, False, False, True),
        (False, False, True, True, False),
    ],
)
def test_opcheck_backward(wanted):
    inputs, lengths = _inputs(*SHAPES["large"])
    inputs = [t.detach() for t in inputs]
    g = torch.randn(3, 37, 37, 9, generator=torch.Generator().manual_seed(0))
    args = (g, *inputs, lengths, list(wanted), "native")
    grads = BACKWARD_OP(*args)
    assert [t is not None for t in grads] == list(wanted)
    torch.library.opcheck(BACKWARD_OP, args)


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


def test_triton_is_reported_unavailable_and_auto_on_cuda_falls_back(monkeypatch):
    monkeypatch.setattr(_dispatch, "_warned", set())
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    cuda = torch.device("cuda")
    error, reason = _dispatch._unavailable("triton", cuda, "set2graph_logits")
    assert error is RuntimeError and "not written yet" in reason
    with pytest.warns(RuntimeWarning, match="set2graph_logits: backend 'auto' falls back"):
        assert _dispatch.resolve("set2graph_logits", "auto", cuda) == "reference"
    inputs, lengths = _inputs(*SHAPES["small"])
    with pytest.raises(RuntimeError, match="not written yet"):
        tk.set2graph_logits(*inputs, lengths, backend="triton")
    with pytest.raises(NotImplementedError, match="Triton kernels"):
        OP(*inputs, lengths, "triton")


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


@pytest.mark.parametrize("backend", ["native", "reference"])
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
