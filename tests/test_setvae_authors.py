"""The authors' preset of the set VAE (docs/set_vae.md, "The authors' preset"): its layers and
creation modules against literal formulas, its loss against loops, its batches, and the
training program (``--preset authors``: a run, a stop by --max-minutes, and a bit-for-bit
resume)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from topn_kernels import native
from topn_kernels.data import collate_sets, generate_sets
from topn_kernels.models import (
    AuthorsConfig,
    AuthorsLossConfig,
    AuthorsSetVAE,
    VAEOutput,
    authors_loss,
)
from topn_kernels.models.authors import (
    AuthorsMLP,
    PNAPooling,
    TopN,
    iterate_batches,
    size_grouped_batches,
)

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def test_mlp_follows_the_released_formula():
    torch.manual_seed(0)
    mlp = AuthorsMLP(16, 8, 16, 3, cond_dim=5, modulation="film").double()
    x, y = torch.randn(4, 7, 16, dtype=F64), torch.randn(4, 1, 5, dtype=F64)
    h = mlp.lin1(x) * torch.sigmoid(mlp.lin2(y)) + mlp.lin3(y)
    h = torch.relu(h) + x  # dim_in == width
    h = h + mlp.hidden[0](torch.relu(h))
    expected = mlp.lin_final(torch.relu(h))  # dim_out != width: no residual
    torch.testing.assert_close(mlp(x, y), expected, rtol=0, atol=0)

    plus = AuthorsMLP(3, 6, 6, 2, cond_dim=4).double()
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 4, dtype=F64)
    h = torch.relu(plus.lin1(x) + plus.lin2(y))
    torch.testing.assert_close(plus(x, y), plus.lin_final(torch.relu(h)) + h, rtol=0, atol=0)

    # no residual at either end (the encoder's and decoder's first MLPs): the released code's
    # relu(relu(h) + 0) and "+ 0", which the module skips; values and gradients bit for bit
    stem = AuthorsMLP(3, 6, 8, 2, cond_dim=4).double()
    x = torch.randn(5, 3, dtype=F64)
    y = torch.randn(5, 4, dtype=F64, requires_grad=True)
    h = torch.relu(stem.lin1(x) + stem.lin2(y)) + 0.0
    released = stem.lin_final(torch.relu(h)) + 0.0
    ours = stem(x, y)
    torch.testing.assert_close(ours, released, rtol=0, atol=0)
    upstream = torch.randn_like(ours)
    grads = torch.autograd.grad(ours, [y, *stem.parameters()], upstream)
    expected = torch.autograd.grad(released, [y, *stem.parameters()], upstream)
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pna_pooling_literal():
    torch.manual_seed(1)
    x = torch.randn(3, 5, 2, dtype=F64)
    out = PNAPooling(average_n=9).forward(x)
    amplify = math.log(6) / math.log(10)
    for b, c in itertools.product(range(3), range(2)):
        col = x[b, :, c]
        for s, scale in enumerate((1.0, amplify, 1 / amplify)):
            v = col * scale
            reductions = (v.sum(), v.max(), v.mean(), v.std())
            for r, expected in enumerate(reductions):
                torch.testing.assert_close(out[b, c * 12 + r * 3 + s], expected)
    with pytest.raises(ValueError, match="at least 2"):
        PNAPooling()(x[:, :1])


def test_pna_pooling_keeps_its_scalers_per_size_dtype_and_device():
    pool = PNAPooling(average_n=9)
    x5, x7 = torch.zeros(2, 5, 3, dtype=F64), torch.zeros(2, 7, 3)
    first = pool.scales(5, x5)
    assert pool.scales(5, x5) is first  # kept
    amplify = math.log(6) / math.log(10)
    torch.testing.assert_close(first, torch.tensor([1.0, amplify, 1 / amplify], dtype=F64))
    other = pool.scales(7, x7)
    assert other.dtype == torch.float32 and other is not first
    torch.testing.assert_close(other[1], torch.tensor(math.log(8) / math.log(10)))
    assert pool.scales(5, x5.float()) is not first  # another dtype: its own
    pool = PNAPooling(average_n=9)
    with torch.inference_mode():  # an inference tensor is not kept: training may follow
        pool(torch.randn(2, 5, 3))
    assert not pool._scales
    x = torch.randn(2, 5, 3, requires_grad=True)
    pool(x).sum().backward()
    assert x.grad is not None and len(pool._scales) == 1
    pool = PNAPooling(average_n=9)
    pool.scales(5, x5)
    pool.log_average = math.log(5.0)  # a changed average is part of the key
    torch.testing.assert_close(
        pool.scales(5, x5)[1], torch.tensor(math.log(6) / math.log(5), dtype=F64)
    )


@pytest.mark.skipif(not native.AVAILABLE, reason=str(native.UNAVAILABLE_REASON))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("sets", "n", "channels"), [(1, 2, 1), (7, 5, 6), (3, 35, 64)])
def test_pna_pooling_native_matches_the_plain_pooling(dtype, sets, n, channels):
    """The native op against the module's tensor ops: values and gradients, with a tie at the
    maximum (the max's gradient split between the tied points, as amax's backward does) and a
    constant channel (zero deviation: the 1e-12 floor keeps its gradient finite)."""
    from topn_kernels.native.pna_pooling import pna_pool, supports

    g = torch.Generator().manual_seed(n)
    x = torch.randn(sets, n, channels, generator=g, dtype=dtype)
    x[0, :, 0] = 0.5  # constant channel
    if channels > 1:
        x[-1, 0, 1] = x[-1, 1, 1] = x[-1, :, 1].max() + 1  # tie
    x.requires_grad_(True)
    upstream = torch.randn(sets, 12 * channels, generator=g, dtype=dtype)
    plain, fast = PNAPooling(), PNAPooling()
    fast.native = True
    expected, got = plain(x), fast(x)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == F64 else {"rtol": 2e-6, "atol": 2e-6}
    torch.testing.assert_close(got, expected, **tol)
    (want,) = torch.autograd.grad(expected, x, upstream)
    (ours,) = torch.autograd.grad(got, x, upstream)
    torch.testing.assert_close(ours, want, **tol)
    assert got.grad_fn is not None and "PnaPool" in got.grad_fn.name()  # the op's C++ node ran
    assert not supports(x[:, :1]) and not supports(x.half()) and not supports(x[0])
    with pytest.raises(ValueError, match="n >= 2"):
        pna_pool(x[:, :1], torch.ones(3, dtype=dtype))
    if dtype == F64 and n <= 5:  # away from ties and constant channels, where it is smooth
        scales = torch.tensor([1.0, 1.3, 1 / 1.3], dtype=F64)
        smooth = torch.randn(sets, n, channels, generator=g, dtype=F64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: pna_pool(t, scales), (smooth,))


@pytest.mark.skipif(not native.AVAILABLE, reason=str(native.UNAVAILABLE_REASON))
def test_pna_pooling_native_op_checks_and_fake_kernels():
    x, scales = torch.randn(3, 4, 5, dtype=F64), torch.ones(3, dtype=F64)
    torch.library.opcheck(
        torch.ops.topn_kernels.pna_pool.default,
        (x, scales),
        test_utils=("test_schema", "test_faketensor"),
    )
    out = torch.ops.topn_kernels.pna_pool(x, scales)
    torch.library.opcheck(
        torch.ops.topn_kernels.pna_pool_backward.default,
        (torch.randn_like(out), x, out, scales),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.topn_kernels.pna_pool_autograd.default,
        (x.clone().requires_grad_(True), scales),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    y = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(
            torch.ops.topn_kernels.pna_pool_autograd(y, scales).sum(), y, create_graph=True
        )
    with torch.inference_mode():  # below autograd: the values
        torch.testing.assert_close(
            torch.ops.topn_kernels.pna_pool_autograd(x, scales),
            torch.ops.topn_kernels.pna_pool(x, scales),
        )
    with pytest.raises(RuntimeError, match="scales must be"):
        torch.ops.topn_kernels.pna_pool(x, scales[:2])
    with pytest.raises(RuntimeError, match="grad_out and out must be"):
        torch.ops.topn_kernels.pna_pool_backward(out[:, :4], x, out, scales)


def test_authors_loss_runs_the_matched_distance_on_a_backend_it_has():
    """The losses' backend picks the matched distance's: "reference" and "native" as given,
    "auto" (and "keops", which it does not have) its "auto"."""
    import topn_kernels
    from topn_kernels.metrics import matched_backend

    assert [matched_backend(b) for b in ("auto", "reference", "native", "keops")] == [
        "auto",
        "reference",
        "native",
        "auto",
    ]
    data = generate_sets(6, seed=4)
    points, lengths = collate_sets([data[i] for i in range(6)])
    model = AuthorsSetVAE(AuthorsConfig(), native=False)
    out = model(points, lengths)
    for backend, expected in (("reference", "reference"), ("auto", "auto")):
        with topn_kernels.record_backends() as calls:
            authors_loss(out, points, lengths, AuthorsLossConfig(backend=backend))
        ran = set(calls["matched_distance"])
        if expected == "reference":
            assert ran == {"reference"}
        else:
            assert ran == {"native" if native.AVAILABLE else "reference"}


def test_topn_creation_literal():
    torch.manual_seed(2)
    cfg = AuthorsConfig(n_ref=9, size_cap=8, set_channels=4)
    topn = TopN(cfg).double()
    with torch.no_grad():
        topn.angles.mul_(torch.rand(9, 1, dtype=F64) + 0.5)  # trained angles leave the sphere
    z = torch.randn(6, cfg.latent_dim, dtype=F64)
    n = 5
    x = topn(z, n)
    for b in range(6):
        q = topn.angle_mlp(z[b])
        q = q / (q.norm() + 1e-5)
        probs = torch.softmax(topn.angles @ q, dim=0)
        order = sorted(range(9), key=lambda i: -float(probs[i].detach()))[:n]
        for slot, i in enumerate(order):
            m = n * probs[i]
            gamma = topn.gamma.weight[:, 0] * m + topn.gamma.bias
            beta = topn.beta.weight[:, 0] * m + topn.beta.bias
            torch.testing.assert_close(x[b, slot], gamma * topn.points[i] + beta)


def test_size_grouped_batches():
    lengths = torch.tensor([3, 5, 3, 3, 2, 5, 3, 2, 3])
    batches = size_grouped_batches(lengths, 3)
    assert [b.tolist() for b in batches] == [[4, 7], [0, 2, 3], [6, 8], [1, 5]]
    points = torch.randn(9, 6, 3)
    for (x, n), index in zip(iterate_batches(points, lengths, batches), batches, strict=True):
        assert x.shape == (len(index), int(lengths[index[0]]), 3) and (n == n[0]).all()
        torch.testing.assert_close(x, points[index, : int(n[0])])
    with pytest.raises(ValueError, match="batch_size"):
        size_grouped_batches(lengths, 0)
    with pytest.raises(TypeError, match="batch_size"):
        size_grouped_batches(lengths, 2.5)
    with pytest.raises(TypeError, match="lengths"):  # float sizes were grouped as distinct
        size_grouped_batches(torch.tensor([2.5, 2.7, 3.0]), 2)


def test_iterate_batches_refuses_batches_of_several_sizes():
    # a batch of sizes [3, 5] was cut to its first set's size 3, the 5-set's lengths still 5
    lengths = torch.tensor([3, 5, 3, 3, 2, 5])
    points = torch.randn(6, 6, 3)
    good = [torch.tensor([0, 2]), torch.tensor([1, 5])]
    with pytest.raises(ValueError, match=r"batches\[2\] holds sets of sizes \[2, 3\]"):
        iterate_batches(points, lengths, [*good, torch.tensor([3, 4])])  # at the call
    with pytest.raises(ValueError, match=r"batches\[0\] is empty"):
        iterate_batches(points, lengths, [torch.tensor([], dtype=torch.int64)])
    with pytest.raises(TypeError, match=r"batches\[0\] must be a 1-D integer tensor"):
        iterate_batches(points, lengths, [torch.tensor([0.0, 2.0])])
    with pytest.raises(ValueError, match=r"batches\[1\] holds index 6: indices must be in"):
        iterate_batches(points, lengths, [good[0], torch.tensor([1, 6])])
    with pytest.raises(ValueError, match=r"batches\[0\] holds index -1"):
        iterate_batches(points, lengths, [torch.tensor([-1])])
    with pytest.raises(TypeError, match="lengths must be an integer tensor"):
        iterate_batches(points, lengths.float(), good)
    got = [(x.shape, n.tolist()) for x, n in iterate_batches(points, lengths, good)]
    assert got == [((2, 3, 3), [3, 3]), ((2, 5, 3), [5, 5])]


def _pair_sum(x: torch.Tensor, f) -> torch.Tensor:
    n = x.shape[0]
    return sum(f((x[i] - x[j]).norm()) for i in range(n) for j in range(n) if i != j)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_loss_is_the_released_sum_over_the_batch(backend):
    """Each term against loops over the sets ("auto": on CPU, the point terms as one native
    op, authors._native_point_terms)."""
    torch.manual_seed(3)
    b, n = 3, 5
    points = torch.randn(b, n, 3, dtype=F64) * 2
    recon = torch.randn(b, n, 3, dtype=F64) * 2
    mu, log_var = torch.randn(b, 30, dtype=F64), torch.randn(b, 30, dtype=F64) * 0.1
    out = VAEOutput(recon, torch.ones(b, n, dtype=torch.bool), mu, log_var)
    lengths = torch.full((b,), n)
    cfg = AuthorsLossConfig(backend=backend)
    terms = authors_loss(out, points, lengths, cfg)

    rec = 0.0
    for k in range(b):
        rec += min(
            sum((recon[k, i] - points[k, p[i]]).norm() for i in range(n)) / n
            for p in itertools.permutations(range(n))
        )
    kl = -0.5 * (1 + log_var - mu**2 - log_var.exp()).sum()
    rep = sum(_pair_sum(recon[k], lambda d: torch.relu(1.0 - d)) for k in range(b))
    val = 0.0
    for k in range(b):
        dist = torch.cdist(recon[k], recon[k])
        s = dist.sort(dim=1).values[:, 1:]  # without the point itself
        val += torch.relu(s[:, 0] - 2.0).sum() + torch.relu(2.0 - s[:, 4:]).sum()
    torch.testing.assert_close(terms["reconstruction"], torch.as_tensor(rec, dtype=F64))
    torch.testing.assert_close(terms["kl"], kl)
    torch.testing.assert_close(terms["repulsion"], torch.as_tensor(rep, dtype=F64))
    torch.testing.assert_close(terms["valency"], torch.as_tensor(val, dtype=F64))
    total = rec + 0.003 * kl + 200 * rep + 200 * val
    torch.testing.assert_close(terms["loss"], torch.as_tensor(total, dtype=F64))


def _loss_and_grads(model, points, lengths, noise, cfg):
    model.zero_grad()
    terms = authors_loss(model(points, lengths, noise), points, lengths, cfg)
    terms["loss"].backward()
    return terms, [p.grad.clone() for p in model.parameters()]


@pytest.mark.skipif(not native.AVAILABLE, reason=str(native.UNAVAILABLE_REASON))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_native_point_terms_match_the_three_functions(dtype, monkeypatch):
    """On CPU with "auto", the matched distance, repulsion and valency sums run as one op with
    one C++ autograd node: the same values and gradients as the three functions (the same
    kernels), on sets of several sizes; a points tensor that takes a gradient, and the
    reference backend, keep the three functions."""
    from topn_kernels.models import authors

    torch.manual_seed(5)
    model = AuthorsSetVAE(AuthorsConfig(), native=False).to(dtype)
    points = torch.randn(6, 8, 3, dtype=dtype) * 2
    lengths, noise = torch.tensor([8, 8, 5, 5, 3, 3]), torch.randn(6, 30, dtype=dtype)
    cfg = AuthorsLossConfig(backend="auto")
    fused, fused_grads = _loss_and_grads(model, points, lengths, noise, cfg)
    assert "AuthorsPointTerms" in fused["valency"].grad_fn.name()
    monkeypatch.setattr(authors, "_native_point_terms", lambda *args: None)
    plain, plain_grads = _loss_and_grads(model, points, lengths, noise, cfg)
    monkeypatch.undo()
    assert "AuthorsPointTerms" not in plain["valency"].grad_fn.name()
    for name in fused:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-6, atol=0, msg=name)
    for got, expected in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    out = model(points, lengths, noise)
    recon = out.recon.detach().requires_grad_(True)
    taken = authors._native_point_terms(recon, points, lengths, cfg)
    assert taken is not None
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(taken[0], recon, create_graph=True)
    assert authors._native_point_terms(recon, points.requires_grad_(), lengths, cfg) is None
    ref = AuthorsLossConfig(backend="reference")
    assert authors._native_point_terms(recon, points.detach(), lengths, ref) is None
    with torch.inference_mode():
        values = authors._native_point_terms(recon.detach(), points.detach(), lengths, cfg)
    for got, name in zip(values, ("reconstruction", "repulsion", "valency"), strict=True):
        torch.testing.assert_close(got, fused[name].detach().new_tensor(got.item()))


@pytest.mark.skipif(not native.AVAILABLE, reason=str(native.UNAVAILABLE_REASON))
def test_native_point_terms_op_fake_kernels():
    x, y = torch.randn(4, 6, 3, dtype=F64), torch.randn(4, 6, 3, dtype=F64)
    lengths = torch.tensor([6, 6, 4, 2])
    for with_grad in (True, False):
        torch.library.opcheck(
            torch.ops.topn_kernels.authors_point_terms.default,
            (x, y, lengths, 1.0, 2.0, 4, with_grad),
            test_utils=("test_schema", "test_faketensor"),
        )


@pytest.mark.skipif(not native.AVAILABLE, reason=str(native.UNAVAILABLE_REASON))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_native_kl_and_total_match_the_loss_formula(dtype):
    """After the native point terms, the KL term and the weighted total run as one op with one
    C++ autograd node: the formula's values (the KL summed in float64: within rounding) and its
    gradients with respect to mu, log_var (here strided views, as the encoder's chunks are) and
    the three point terms, for gradients through the total, the KL, or both."""
    torch.manual_seed(6)
    head = torch.randn(5, 2 * 7, dtype=dtype)
    weights = (0.003, 200.0, 200.0)

    def inputs():
        h = head.clone().requires_grad_(True)
        terms = [torch.rand((), dtype=dtype).requires_grad_(True) for _ in range(3)]
        return h, terms

    def formula(mu, log_var, rec, rep, val):
        kl = -0.5 * (1 + log_var - mu**2 - log_var.exp()).sum()
        return rec + weights[0] * kl + weights[1] * rep + weights[2] * val, kl

    def native_op(mu, log_var, rec, rep, val):
        return torch.ops.topn_kernels.authors_kl_total_autograd(
            mu, log_var, rec, rep, val, *weights
        )

    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 0}
    for upstream in ((1.0, None), (None, 1.0), (0.7, -1.3)):  # None: that output unused
        results = []
        for fn in (formula, native_op):
            torch.manual_seed(7)
            h, terms = inputs()
            total, kl = fn(*h.chunk(2, dim=-1), *terms)
            used = [w * t for w, t in zip(upstream, (total, kl), strict=True) if w is not None]
            sum(used).backward()
            results.append([total, kl, h.grad, *(t.grad for t in terms)])
        for expected, got in zip(*results, strict=True):
            torch.testing.assert_close(got, expected, **tol)
    mu, log_var = head.chunk(2, dim=-1)
    args = (mu, log_var, *(torch.rand((), dtype=dtype) for _ in range(3)), *weights)
    torch.library.opcheck(
        torch.ops.topn_kernels.authors_kl_total.default,
        args,
        test_utils=("test_schema", "test_faketensor"),
    )
    h, terms = inputs()
    total, _ = native_op(*h.chunk(2, dim=-1), *terms)
    assert "AuthorsKlTotal" in total.grad_fn.name()
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(total, h, create_graph=True)
    model = AuthorsSetVAE(AuthorsConfig(), native=True).to(dtype)
    points, lengths = torch.randn(4, 6, 3, dtype=dtype), torch.tensor([6, 6, 6, 6])
    loss = authors_loss(model(points, lengths), points, lengths, AuthorsLossConfig())["loss"]
    assert "AuthorsKlTotal" in loss.grad_fn.name()


@pytest.mark.parametrize("creation", ["topn", "firstn", "iid", "mlp"])
def test_mixed_sizes_run_each_size_alone(creation):
    """In eval, a batch of several sizes gives each set what a batch of its size alone gives,
    trimmed to its size or padded; the output is zero past each length, and every parameter
    gets a gradient in training."""
    torch.manual_seed(4)
    data = generate_sets(10, seed=4)
    points, lengths = collate_sets([data[i] for i in range(10)])
    model = AuthorsSetVAE(AuthorsConfig(creation=creation)).double().eval()
    points = points.double()
    sizes = torch.unique(lengths).tolist()
    with torch.no_grad():
        torch.manual_seed(0)
        rec = model.reconstruct(points, lengths)
        for n in sizes[:1] if creation == "iid" else sizes:  # i.i.d. draws anew at every call
            idx = (lengths == n).nonzero().squeeze(1)
            torch.manual_seed(0)
            alone = model.reconstruct(points[idx, :n], lengths[idx])
            torch.testing.assert_close(rec[idx, :n], alone)
            torch.manual_seed(0)
            padded = model.reconstruct(points[idx], lengths[idx])  # one size, wider padding
            assert torch.equal(padded[:, :n], alone)  # float64: the same products, bit for bit
            assert padded.shape[1] == points.shape[1] and (padded[:, n:] == 0).all()
        assert all((rec[lengths == n, n:] == 0).all() for n in sizes)
    model.train()
    batch = size_grouped_batches(lengths, 128)[-1]
    x, n = points[batch, : int(lengths[batch[0]])], lengths[batch]
    torch.manual_seed(5)
    terms = authors_loss(model(x, n), x, n, AuthorsLossConfig(backend="reference"))
    terms["loss"].backward()
    missing = [k for k, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_generation_sizes_and_extrapolation_clamp():
    torch.manual_seed(6)
    model = AuthorsSetVAE().eval()
    model.set_size_distribution(torch.tensor([30, 31, 33, 2, 2]))
    sizes = model.sample_sizes(200, shift=10, generator=torch.Generator().manual_seed(0))
    assert sizes.min() >= 12 and sizes.max() == 34  # 30 + 10 and up, capped at 34
    x, mask = model.generate(torch.tensor([2, 7, 34]))
    assert x.shape == (3, 34, 3) and mask.sum(1).tolist() == [2, 7, 34]
    assert (x[~mask] == 0).all()
    with pytest.raises(ValueError, match="size_cap"):
        model.generate(torch.tensor([35]))


def _train(args: list[str], out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [
        "--preset",
        "authors",
        "--n-train",
        "48",
        "--n-test",
        "16",
        "--n-generated",
        "24",
        "--n-pairs",
        "16",
        "--batch-size",
        "16",
        "--backend",
        "reference",
        "--no-plots",
        "--out",
        str(out),
    ]
    result = subprocess.run(
        [sys.executable, "python/train_setvae.py", *common, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_program_trains_stops_on_time_and_resumes_bit_for_bit(tmp_path):
    straight, chunked = tmp_path / "straight", tmp_path / "chunked"
    _train(["--creation", "iid", "--epochs", "2"], straight)
    metrics = json.loads((straight / "metrics.json").read_text())
    for key in ("train_w2", "test_w2", "train_matched", "test_matched", "extrap_valency_loss"):
        assert math.isfinite(metrics[key]), key
    assert metrics["preset"] == "authors" and metrics["epochs"] == 2
    printed = metrics["as_the_authors_print"]
    assert printed["test_matched"] == pytest.approx(metrics["test_matched"] * 16 / 48)
    history = json.loads((straight / "history.json").read_text())
    assert printed["train_matched"] == history[-1]["reconstruction"]

    result = _train(["--creation", "iid", "--epochs", "2", "--max-minutes", "0"], chunked)
    assert "--max-minutes 0 reached after 1 epochs" in result.stdout
    assert not (chunked / "metrics.json").exists()
    _train(["--creation", "iid", "--epochs", "2", "--resume"], chunked)
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(chunked / "checkpoint.pt", weights_only=False)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["history"][-1]["loss"] == b["history"][-1]["loss"]


@pytest.mark.parametrize("clip", [4.0, 1e12], ids=["clipping", "not-clipping"])
def test_train_step_clips_inside_the_fused_update_as_clip_grad_norm_does(clip):
    """train_step with fused Adam folds the clipping into the update (its grad_scale): the
    gradients it leaves, the parameters and Adam's moments after the step are those of
    clip_grad_norm_ followed by the plain fused step, up to float32 rounding. (One step: over
    several, this loss's float32 trajectory amplifies rounding; see test_setvae.py.)"""
    from topn_kernels.models import make_adam, train_step

    data = generate_sets(16, seed=2)
    points, lengths = collate_sets([data[i] for i in range(16)])
    cfg = AuthorsLossConfig(backend="reference")
    noise = torch.randn(16, 30, generator=torch.Generator().manual_seed(1))
    models, optimizers = [], []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(AuthorsSetVAE(AuthorsConfig(), native=False))
        optimizers.append(make_adam(models[-1].parameters(), 1e-3))

    def forward(p, n):
        return models[0](p, n, noise=noise)

    train_step(forward, optimizers[0], points, lengths, cfg, clip=clip, loss=authors_loss)
    assert not hasattr(optimizers[0], "grad_scale")
    # the folded path ran (clip_grad_norm_'s needs a module) and left no max_grad_norm behind
    assert "max_grad_norm" not in optimizers[0].__dict__
    authors_loss(models[1](points, lengths, noise=noise), points, lengths, cfg)["loss"].backward()
    norm = torch.nn.utils.clip_grad_norm_(models[1].parameters(), clip)
    optimizers[1].step()
    assert (norm > clip) == (clip < 1e6)  # the case clips, or does not
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        scale = b.grad.abs().max()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(optimizers[0].state.values(), optimizers[1].state.values(), strict=True):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-5, atol=1e-14)


def test_train_step_leaves_no_scale_behind_and_refuses_a_bad_clip():
    from topn_kernels.models import make_adam, train_step

    data = generate_sets(8, seed=3)
    points, lengths = collate_sets([data[i] for i in range(8)])
    cfg = AuthorsLossConfig(backend="reference")
    torch.manual_seed(0)
    model = AuthorsSetVAE(AuthorsConfig(), native=False)
    optimizer = make_adam(model.parameters(), 1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    for clip in (0.0, -1.0):
        with pytest.raises(ValueError, match="clip"):
            train_step(model, optimizer, points, lengths, cfg, clip=clip, loss=authors_loss)

    def failing_step():
        raise RuntimeError("update failed")

    optimizer.step = failing_step
    with pytest.raises(RuntimeError, match="update failed"):
        train_step(model, optimizer, points, lengths, cfg, loss=authors_loss)
    assert not hasattr(optimizer, "grad_scale")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_train_step_with_a_non_finite_loss_leaves_the_model_as_it_was():
    """The FloatingPointError comes before the update, and the batch norms' running statistics
    that the forward wrote (NaN from a NaN point) are restored."""
    from topn_kernels.models import make_adam, train_step

    data = generate_sets(8, seed=3)
    points, lengths = collate_sets([data[i] for i in range(8)])
    points[0, 0, 0] = float("nan")
    torch.manual_seed(0)
    model = AuthorsSetVAE(AuthorsConfig())
    optimizer = make_adam(model.parameters(), 1e-3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        cfg = AuthorsLossConfig(backend="reference")
        train_step(model, optimizer, points, lengths, cfg, loss=authors_loss)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_noise_and_size_draws_are_checked():
    model = AuthorsSetVAE(AuthorsConfig())
    points, lengths = torch.randn(2, 5, 3), torch.tensor([5, 5])
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 30\)"):
        model(points, lengths, noise=torch.randn(30))  # broadcast to every set before
    with pytest.raises(TypeError, match="shift"):
        model.sample_sizes(4, shift=0.5)
    with pytest.raises(ValueError, match="num"):
        model.sample_sizes(-1)
    assert model.sample_sizes(100, shift=-40).eq(2).all()  # clamped to [2, size_cap]


def test_inputs_and_config_the_model_cannot_take():
    """Sets larger than the creation module makes, an empty batch and configs without heads or
    with a non-positive PNA degree are errors naming the argument (kernel errors, a division
    by zero or NaN outputs before)."""
    cfg = AuthorsConfig(creation="topn", n_ref=5, size_cap=4)
    with pytest.raises(ValueError, match="lengths must be <= n_ref=5"):
        AuthorsSetVAE(cfg)(torch.randn(2, 7, 3), torch.tensor([7, 7]))
    with pytest.raises(ValueError, match="at least one set"):
        AuthorsSetVAE(AuthorsConfig())(torch.randn(0, 5, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="heads"):
        AuthorsConfig(heads=0)
    with pytest.raises(ValueError, match="pna_average_n"):
        AuthorsConfig(pna_average_n=0.0)


def test_losses_refuse_lengths_other_than_the_outputs():
    """A loss of an output made at other sizes was a silently wrong number."""
    from topn_kernels.models import LossConfig, SetVAE, setvae_loss

    torch.manual_seed(0)
    points = torch.randn(2, 5, 3)
    model = AuthorsSetVAE(AuthorsConfig())
    out = model(points, torch.tensor([5, 5]))
    cfg = AuthorsLossConfig(backend="reference")
    with pytest.raises(ValueError, match="lengths must be the sizes"):
        authors_loss(out, points, torch.tensor([3, 5]), cfg)
    authors_loss(out, points, torch.tensor([5, 5]), cfg)
    plain = SetVAE()
    out = plain(points, torch.tensor([5, 4]))
    with pytest.raises(ValueError, match="lengths must be the sizes"):
        setvae_loss(out, points, torch.tensor([5, 5]), LossConfig(backend="reference"))
    with pytest.raises(TypeError, match="lengths"):
        model.set_size_distribution(torch.tensor([2.9, 3.9]))


def test_module_walks_find_every_buffer_and_hook_once_through_shared_and_cyclic_modules():
    """train_step's buffer list and the fused paths' hook check walk the submodules themselves:
    the same buffers as ``buffers()``, a hook found at any depth, and a module graph with a
    shared submodule and a cycle walked once."""
    from topn_kernels.models._hooks import has_hooks
    from topn_kernels.models.training import _buffers

    model = AuthorsSetVAE(AuthorsConfig())
    shared = model.encoder.blocks[1].norm
    model.decoder.extra = shared  # one module in two places
    model.encoder.blocks[0].parent = model.encoder  # a cycle
    found = _buffers(model)
    assert len(found) == len({id(b) for b in found}) == len(list(model.buffers()))
    assert {id(b) for b in found} == {id(b) for b in model.buffers()}
    block = model.decoder.blocks[2]
    assert not has_hooks(model) and not has_hooks(block)
    handle = block.attn.self_attn.out_proj.register_forward_pre_hook(lambda *a: None)
    assert has_hooks(block) and has_hooks(model) and not has_hooks(model.decoder.blocks[1])
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    assert has_hooks(model.decoder.blocks[1])
    handle.remove()
    assert not has_hooks(model)
