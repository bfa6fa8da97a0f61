"""FusedAdam (topn_kernels/models/fused_adam.py) against torch.optim.Adam(fused=True): with
``native=False`` the same parameters and state bit for bit, on its shortcut and on its fallbacks;
with the native CPU step (csrc/cpu/adam.cpp) the update of its formula bit for bit (written here
in torch ops), the same at any thread count, and torch's up to rounding; interchangeable state
dicts either way."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from topn_kernels import native as native_ext
from topn_kernels.models.fused_adam import FusedAdam

needs_native = pytest.mark.skipif(not native_ext.AVAILABLE, reason="C++ extension not built")
NATIVE = [False, pytest.param(True, marks=needs_native)]


def _params(dtype=torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def _grads(params, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def _pair(dtype=torch.float32, groups: bool = False, native: bool = False, **kwargs):
    a, b = _params(dtype), _params(dtype)
    if groups:  # two groups, the second with its own learning rate
        a = [{"params": a[:2]}, {"params": a[2:], "lr": 3e-2}]
        b = [{"params": b[:2]}, {"params": b[2:], "lr": 3e-2}]
    ref = torch.optim.Adam(a, lr=1e-2, fused=True, **kwargs)
    ours = FusedAdam(b, lr=1e-2, native=native, **kwargs)
    return ref, ours


def _all(optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _step_both(ref, ours, seed: int, scale=None, found_inf=None, skip=()):
    for opt in (ref, ours):
        for i, (p, grad) in enumerate(zip(_all(opt), _grads(_all(opt), seed), strict=True)):
            p.grad = None if i in skip else grad
        if scale is not None:
            opt.grad_scale = torch.tensor(scale)
        if found_inf is not None:
            opt.found_inf = torch.tensor(found_inf)
        opt.step()
        for name in ("grad_scale", "found_inf"):
            if hasattr(opt, name):
                delattr(opt, name)


def _assert_same(ref, ours):
    """Bit for bit where ours runs torch's kernel; up to rounding where it runs the native step
    (torch's kernel rounds the last elements of each thread's share in double); the step counts
    exactly."""
    for p, q in zip(_all(ref), _all(ours), strict=True):
        same = torch.equal if not ours.native else _close
        assert same(p, q)
        assert torch.equal(ref.state[p]["step"], ours.state[q]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert same(ref.state[p][key], ours.state[q][key]), key


def _close(a, b) -> bool:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    return True


def _native_ran(ours) -> bool:
    return ours._lists is not None and all(entry[-1] is not None for entry in ours._lists)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"weight_decay": 0.1, "betas": (0.8, 0.95)}, {"maximize": True, "eps": 1e-3}],
    ids=["default", "decay-betas", "maximize-eps"],
)
@pytest.mark.parametrize("native", NATIVE)
def test_steps_match_torch_fused_adam(dtype, kwargs, native):
    ref, ours = _pair(dtype, groups=True, **kwargs, native=native)
    for seed in range(5):
        _step_both(ref, ours, seed, scale=[None, 2.5, 1.0, 0.25, None][seed])
        _assert_same(ref, ours)
    assert ours._lists is not None  # the shortcut ran after the first step
    assert _native_ran(ours) == native
    for group in (ref.param_groups[0], ours.param_groups[0]):
        group["lr"] = 1e-3  # a schedule's change is read at every step
    _step_both(ref, ours, 9)
    _assert_same(ref, ours)
    assert float(ours.state[_all(ours)[0]]["step"]) == 6


@pytest.mark.parametrize("native", NATIVE)
def test_a_skipped_step_found_inf_and_a_missing_gradient_match_torch(native):
    ref, ours = _pair(native=native)
    _step_both(ref, ours, 0)
    _step_both(ref, ours, 1, scale=2.0, found_inf=1.0)  # GradScaler's skipped step
    _assert_same(ref, ours)
    assert float(ours.state[_all(ours)[0]]["step"]) == 1
    _step_both(ref, ours, 2, skip=(1,))  # falls back to Adam's step, counters shared
    _assert_same(ref, ours)
    _step_both(ref, ours, 3)
    _assert_same(ref, ours)
    assert [float(ours.state[p]["step"]) for p in _all(ours)] == [3, 2, 3, 3]


@pytest.mark.parametrize("native", NATIVE)
def test_state_dicts_load_either_way_and_training_goes_on_alike(native):
    ref, ours = _pair(groups=True, native=native)
    for seed in range(3):
        _step_both(ref, ours, seed)
    # ours -> a fresh torch Adam, torch's -> a fresh FusedAdam; both go on as the originals
    fresh_ref, fresh_ours = _pair(groups=True, native=native)
    for fresh, source in ((fresh_ref, ours), (fresh_ours, ref)):
        with torch.no_grad():
            for p, q in zip(_all(fresh), _all(source), strict=True):
                p.copy_(q)
        fresh.load_state_dict(copy.deepcopy(source.state_dict()))
    for seed in range(3, 6):
        _step_both(ref, fresh_ours, seed)
        _step_both(fresh_ref, ours, seed)
    _assert_same(ref, fresh_ours)
    _assert_same(fresh_ref, ours)
    _assert_same(ref, ours)


def test_rejects_the_options_it_fixes():
    for key in ("fused", "foreach", "capturable", "differentiable"):
        with pytest.raises(TypeError, match=key):
            FusedAdam(_params(), lr=1e-3, **{key: False})


def test_amsgrad_takes_adams_own_step():
    ref, ours = _pair(amsgrad=True)
    for seed in range(3):
        _step_both(ref, ours, seed)
    _assert_same(ref, ours)
    assert ours._lists is None


@pytest.mark.parametrize("native", NATIVE)
def test_options_changed_mid_run_match_torch(native):
    """Group options read at every step: switching decoupled weight decay on, or the learning
    rate to a tensor, after the cache was built, gives Adam's own update."""
    ref, ours = _pair(weight_decay=0.1, native=native)
    for seed in range(2):
        _step_both(ref, ours, seed)
    assert ours._lists is not None
    for opt in (ref, ours):
        opt.param_groups[0]["decoupled_weight_decay"] = True
    for seed in range(2, 4):
        _step_both(ref, ours, seed)
    _assert_same(ref, ours)
    for opt in (ref, ours):
        opt.param_groups[0]["decoupled_weight_decay"] = False
        opt.param_groups[0]["lr"] = torch.tensor(3e-3)
    for seed in range(4, 6):
        _step_both(ref, ours, seed)
    _assert_same(ref, ours)


def test_a_non_fused_state_dict_keeps_adams_non_fused_step():
    """load_state_dict takes ``fused`` from the saved groups: after loading a plain Adam's
    state, FusedAdam steps as torch's Adam then does (the for-loop update), not the kernel."""
    a, b = _params(), _params()
    plain = torch.optim.Adam(a, lr=1e-2)
    for seed in range(2):
        for p, grad in zip(a, _grads(a, seed), strict=True):
            p.grad = grad
        plain.step()
    ref, ours = torch.optim.Adam(_params(), lr=1e-2, fused=True), FusedAdam(b, lr=1e-2)
    for opt in (ref, ours):
        with torch.no_grad():
            for p, q in zip(_all(opt), a, strict=True):
                p.copy_(q)
        opt.load_state_dict(copy.deepcopy(plain.state_dict()))
    for seed in range(2, 4):
        _step_both(ref, ours, seed)
        _assert_same(ref, ours)
    assert ours._lists is None and not ours.param_groups[0]["fused"]


@pytest.mark.parametrize("native", NATIVE)
def test_a_rollback_and_a_group_added_mid_run_match_torch(native):
    """load_state_dict and add_param_group after the cache is built (a rollback of the
    optimizer, a new group): both drop the cache, and training goes on as torch's."""
    ref, ours = _pair(native=native)
    for seed in range(2):
        _step_both(ref, ours, seed)
    saved = [copy.deepcopy(opt.state_dict()) for opt in (ref, ours)]
    for seed in range(2, 4):
        _step_both(ref, ours, seed)
    for opt, state in zip((ref, ours), saved, strict=True):
        opt.load_state_dict(state)
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))], "lr": 0.1})
    for seed in range(4, 7):
        _step_both(ref, ours, seed)
    _assert_same(ref, ours)
    assert [float(ours.state[p]["step"]) for p in _all(ours)] == [5, 5, 5, 5, 3]


@pytest.mark.parametrize("native", NATIVE)
def test_changed_state_or_groups_rebuild_the_cache(native):
    """A state cleared or replaced by hand, a parameter appended to a group, or a group added,
    after the cache is built: the step sees it, as torch's does."""

    def append(opt):
        opt.param_groups[0]["params"].append(torch.nn.Parameter(torch.ones(2)))

    def replace(opt):
        p = opt.param_groups[0]["params"][0]
        opt.state[p]["exp_avg"] = torch.ones_like(p)

    def add_group(opt):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))], "lr": 0.1})

    for change in (lambda opt: opt.state.clear(), replace, append, add_group):
        ref, ours = _pair(native=native)
        for seed in range(2):
            _step_both(ref, ours, seed)
        change(ref)
        change(ours)
        for seed in range(2, 5):
            _step_both(ref, ours, seed)
        _assert_same(ref, ours)
        assert len(ours.state) == len(ref.state) and ours._lists is not None


@pytest.mark.parametrize("native", NATIVE)
def test_copies_and_pickles_step_and_hooks_run_once_a_step(native):
    import pickle

    ref, ours = _pair(native=native)
    torch.optim.Adam([torch.nn.Parameter(torch.ones(1))])  # torch then wraps Adam.step too
    calls = []
    ours.register_step_pre_hook(lambda *a: calls.append("pre"))
    ours.register_step_post_hook(lambda *a: calls.append("post"))
    for seed in range(3):  # the first step falls back to Adam's, the others take the shortcut
        _step_both(ref, ours, seed)
    assert calls == ["pre", "post"] * 3
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        twin = copy.deepcopy(ref)
        for p, q in zip(_all(twin), _all(clone), strict=True):
            p.grad = q.grad = torch.full_like(p, 0.5)
        twin.step()
        clone.step()
        _assert_same(twin, clone)


def _formula_step(p, g, m, v, step, lr, beta1, beta2, weight_decay, eps, maximize, scale):
    """The native step's update of one tensor (csrc/cpu/adam.h) in torch ops, in place: each
    op rounds to the dtype, the divisions by full tensors (ATen multiplies by the reciprocal of
    a scalar divisor), the square root numpy's (correctly rounded, as the kernels' vector
    instructions and PyTorch's fused kernel; torch.sqrt may be 1 ulp off, through MKL)."""
    if scale is not None:
        g.copy_(g / torch.full_like(g, float(scale)))
    g = g * -1.0 if maximize else g
    if weight_decay != 0:
        g = g + p * weight_decay
    bias2_sqrt = (1 - beta2**step) ** 0.5
    m.copy_(m * beta1 + g * (1 - beta1))
    v.copy_(v * beta2 + g * g * (1 - beta2))
    denom = torch.from_numpy(np.sqrt(v.numpy())) / torch.full_like(v, bias2_sqrt) + eps
    p.copy_(p - (lr / (1 - beta1**step)) * m / denom)


# sizes across the vector widths' tails, an empty parameter, and one above the grain (16384
# elements) so that the threads split a tensor
SHAPES = [(7, 5), (5,), (0,), (3, 4, 2), (1,), (20001,), (33,)]


def _native_case(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES]
    return params, gen


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"weight_decay": 0.1, "betas": (0.8, 0.95)}, {"maximize": True, "eps": 1e-3}],
    ids=["default", "decay-betas", "maximize-eps"],
)
def test_native_step_is_its_formula_bit_for_bit(dtype, kwargs):
    params, gen = _native_case(dtype)
    ours = FusedAdam(params, lr=3e-2, **kwargs)
    copies = [p.detach().clone() for p in params]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in copies]
    beta1, beta2 = kwargs.get("betas", (0.9, 0.999))
    for step, scale in enumerate([None, 2.5, None, 0.25, 1.0], start=1):
        grads = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        if scale is not None:
            ours.grad_scale = torch.tensor(scale)
        ours.step()
        ours.__dict__.pop("grad_scale", None)
        assert _native_ran(ours) == (step > 1)  # the first step is Adam's, building the state
        for p, g, (m, v) in zip(copies, grads, moments, strict=True):
            if step == 1:  # Adam's own first step, which the native one continues
                continue
            _formula_step(
                p,
                g,
                m,
                v,
                step,
                3e-2,
                beta1,
                beta2,
                kwargs.get("weight_decay", 0.0),
                kwargs.get("eps", 1e-8),
                kwargs.get("maximize", False),
                scale,
            )
        if step == 1:
            copies = [p.detach().clone() for p in params]
            moments = [
                (ours.state[p]["exp_avg"].clone(), ours.state[p]["exp_avg_sq"].clone())
                for p in params
            ]
            continue
        for p, q, (m, v), g in zip(params, copies, moments, grads, strict=True):
            assert torch.equal(p.detach(), q)
            assert torch.equal(ours.state[p]["exp_avg"], m)
            assert torch.equal(ours.state[p]["exp_avg_sq"], v)
            assert torch.equal(p.grad, g)  # scaled (by _formula_step too), as torch's kernel does
        assert all(float(ours.state[p]["step"]) == step for p in params)


@needs_native
def test_native_step_is_the_same_at_any_thread_count():
    results = []
    threads = torch.get_num_threads()
    for count in (1, 2, 3):
        torch.set_num_threads(count)
        try:
            params, gen = _native_case(torch.float32, seed=1)
            ours = FusedAdam(params, lr=1e-2)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                ours.grad_scale = torch.tensor(1.5)
                ours.step()
                del ours.grad_scale
            assert _native_ran(ours)
            results.append([p.detach() for p in params])
        finally:
            torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


@needs_native
def test_native_step_leaves_gradients_it_cannot_read_in_place_to_torchs_kernel():
    """A non-contiguous gradient: the native step declines before changing anything, and
    torch's fused kernel takes the step, bit for bit torch's. A scale that is not a float32
    CPU tensor is declined too."""
    ref, ours = _pair(native=True)
    _step_both(ref, ours, 0)
    _step_both(ref, ours, 1)  # the native step ran, from ref's state
    assert _native_ran(ours)
    for p, q in zip(_all(ref), _all(ours), strict=True):  # the same start, bit for bit
        with torch.no_grad():
            q.copy_(p)
        for key in ("exp_avg", "exp_avg_sq"):
            ours.state[q][key].copy_(ref.state[p][key])
    for opt in (ref, ours):
        for p, g in zip(_all(opt), _grads(_all(opt), 2), strict=True):
            p.grad = g
        p0 = _all(opt)[0]
        p0.grad = p0.grad.t().contiguous().t()
        assert not p0.grad.is_contiguous()
    state = ours._lists[0][-1]
    assert not state.ready(None)
    for opt in (ref, ours):
        opt.step()
    ours.native = False  # the step above was torch's kernel: compare bit for bit
    _assert_same(ref, ours)
    for p in _all(ours):
        p.grad = torch.zeros_like(p)
    assert state.ready(torch.tensor(2.0))
    assert not state.ready(torch.tensor(2.0, dtype=torch.float64))
    assert not state.ready(torch.tensor([2.0, 2.0]))


@needs_native
def test_adam_state_refuses_lists_of_different_lengths():
    p = torch.zeros(3)
    with pytest.raises(RuntimeError, match="one entry per parameter"):
        torch.classes.topn_kernels.AdamState([p], [p.clone()], [], [torch.zeros(())])


@needs_native
def test_native_step_bumps_versions_as_an_in_place_op():
    """A graph that saved a parameter and runs again after the step raises autograd's error,
    as after torch's in-place kernel, instead of using the new values."""
    ref, ours = _pair(native=True)
    for seed in range(2):
        _step_both(ref, ours, seed)
    assert _native_ran(ours)
    p = _all(ours)[0]
    before = p._version
    loss = (p * p).sum()  # saves p
    for q, g in zip(_all(ours), _grads(_all(ours), 5), strict=True):
        q.grad = g
    ours.step()
    assert p._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@needs_native
def test_swapped_parameters_rebuild_the_cache():
    """torch.utils.swap_tensors exchanges the C++ tensors under the same Python objects (as
    load_state_dict and .to() do with swapping switched on). The native step holds the C++
    tensors: a swap of a parameter that has a gradient accumulator is refused by
    swap_tensors itself (the reference count), and a changed C++ tensor under an unchanged
    Python one (a swap that went through) drops the cache, so that the step updates the
    parameters' tensors of now, as torch's does."""
    ref, ours = _pair(native=True)
    for seed in range(2):
        _step_both(ref, ours, seed)
    assert _native_ran(ours)
    p = _all(ours)[0]
    with pytest.raises(RuntimeError, match="use_count"):
        torch.utils.swap_tensors(p, torch.nn.Parameter(p.detach().clone()))
    ours._lists[0][7][0] = -1  # the address of another C++ tensor than the parameter's now
    assert not ours._current() and ours._lists is None
    for seed in range(2, 4):
        _step_both(ref, ours, seed)
    _assert_same(ref, ours)
    assert _native_ran(ours)


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("max_norm", [0.5, 1e9], ids=["clipping", "not-clipping"])
def test_max_grad_norm_is_the_norm_and_scale_of_train_step_bit_for_bit(native, max_norm):
    """``max_grad_norm`` set: the step equals, bit for bit, the gradient norm, the factor
    ``clamp((norm + 1e-6) / max_norm, min=1)`` given as grad_scale, then the step (native: the
    norm and the factor computed inside AdamState.step_clipped); the gradients left are the
    scaled ones either way; on the first step (no state: Adam's own step) and after."""
    from topn_kernels.models.fused_adam import grad_norm

    _, a = _pair(native=native)
    _, b = _pair(native=native)
    for seed in range(3):
        for opt in (a, b):
            for p, grad in zip(_all(opt), _grads(_all(opt), seed), strict=True):
                p.grad = grad * 3
        a.max_grad_norm = max_norm
        a.step()
        del a.max_grad_norm
        b.grad_scale = torch.clamp((grad_norm([p.grad for p in _all(b)]) + 1e-6) / max_norm, min=1)
        b.step()
        del b.grad_scale
        for p, q in zip(_all(a), _all(b), strict=True):
            assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(a.state[p][key], b.state[q][key]), key
    assert _native_ran(a) == native
    if native:  # the native step takes it: nothing else runs
        a._clipped_step = lambda *args: pytest.fail("the native clipped step did not run")
        a.max_grad_norm = max_norm
        a.step()
    with pytest.raises(ValueError, match="closure"):
        a.max_grad_norm = 1.0
        a.step(lambda: None)


def test_max_grad_norm_clips_float64_and_several_groups_as_clip_grad_norm_does():
    """Where the norm cannot be the fused update's scale (float64 parameters: clip_grad_norm_,
    then the plain step) or the native step cannot take it (two groups, the norm over both: the
    factor computed in Python, as grad_scale), the step clips as clip_grad_norm_ does, up to
    rounding; a max_grad_norm that is not positive is refused, and a copy keeps it."""
    for dtype, groups in ((torch.float64, False), (torch.float32, True)):
        ref, ours = _pair(dtype, groups=groups, native=native_ext.AVAILABLE)
        for seed in range(2):
            for opt in (ref, ours):
                for p, grad in zip(_all(opt), _grads(_all(opt), seed), strict=True):
                    p.grad = grad * 3
            torch.nn.utils.clip_grad_norm_(_all(ref), 0.5)
            ref.step()
            ours.max_grad_norm = 0.5
            ours.step()
            for p, q in zip(_all(ref), _all(ours), strict=True):
                torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7)
    assert copy.deepcopy(ours).max_grad_norm == 0.5
    for bad in (0.0, -1.0, float("nan")):
        ours.max_grad_norm = bad
        with pytest.raises(ValueError, match="max_grad_norm"):
            ours.step()


def test_zero_grad_sets_every_gradient_to_none_or_zero():
    """zero_grad() (set_to_none, its own loop) leaves every gradient None, across groups;
    set_to_none=False zeroes them in place as Optimizer.zero_grad does."""
    _, ours = _pair(groups=True)
    for p, grad in zip(_all(ours), _grads(_all(ours), 0), strict=True):
        p.grad = grad
    kept = [p.grad for p in _all(ours)]
    ours.zero_grad(set_to_none=False)
    assert all(p.grad is g and not p.grad.any() for p, g in zip(_all(ours), kept, strict=True))
    _all(ours)[0].grad = None  # a parameter without a gradient stays without one
    ours.zero_grad()
    assert all(p.grad is None for p in _all(ours))
