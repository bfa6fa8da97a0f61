"""FusedAdam (topn_kernels/models/fused_adam.py) against torch.optim.Adam(fused=True): the same
parameters and state, bit for bit, on its shortcut and on its fallbacks, and interchangeable
state dicts."""

from __future__ import annotations

import copy

import pytest
import torch

from topn_kernels.models.fused_adam import FusedAdam


def _params(dtype=torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def _grads(params, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def _pair(dtype=torch.float32, groups: bool = False, **kwargs):
    a, b = _params(dtype), _params(dtype)
    if groups:  # two groups, the second with its own learning rate
        a = [{"params": a[:2]}, {"params": a[2:], "lr": 3e-2}]
        b = [{"params": b[:2]}, {"params": b[2:], "lr": 3e-2}]
    ref = torch.optim.Adam(a, lr=1e-2, fused=True, **kwargs)
    ours = FusedAdam(b, lr=1e-2, **kwargs)
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
    for p, q in zip(_all(ref), _all(ours), strict=True):
        assert torch.equal(p, q)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(ref.state[p][key], ours.state[q][key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"weight_decay": 0.1, "betas": (0.8, 0.95)}, {"maximize": True, "eps": 1e-3}],
    ids=["default", "decay-betas", "maximize-eps"],
)
def test_steps_match_torch_fused_adam_bit_for_bit(dtype, kwargs):
    ref, ours = _pair(dtype, groups=True, **kwargs)
    for seed in range(5):
        _step_both(ref, ours, seed, scale=[None, 2.5, 1.0, 0.25, None][seed])
        _assert_same(ref, ours)
    assert ours._lists is not None  # the shortcut ran after the first step
    for group in (ref.param_groups[0], ours.param_groups[0]):
        group["lr"] = 1e-3  # a schedule's change is read at every step
    _step_both(ref, ours, 9)
    _assert_same(ref, ours)
    assert float(ours.state[_all(ours)[0]]["step"]) == 6


def test_a_skipped_step_found_inf_and_a_missing_gradient_match_torch():
    ref, ours = _pair()
    _step_both(ref, ours, 0)
    _step_both(ref, ours, 1, scale=2.0, found_inf=1.0)  # GradScaler's skipped step
    _assert_same(ref, ours)
    assert float(ours.state[_all(ours)[0]]["step"]) == 1
    _step_both(ref, ours, 2, skip=(1,))  # falls back to Adam's step, counters shared
    _assert_same(ref, ours)
    _step_both(ref, ours, 3)
    _assert_same(ref, ours)
    assert [float(ours.state[p]["step"]) for p in _all(ours)] == [3, 2, 3, 3]


def test_state_dicts_load_either_way_and_training_goes_on_alike():
    ref, ours = _pair(groups=True)
    for seed in range(3):
        _step_both(ref, ours, seed)
    # ours -> a fresh torch Adam, torch's -> a fresh FusedAdam; both go on as the originals
    fresh_ref, fresh_ours = _pair(groups=True)
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


def test_options_changed_mid_run_match_torch():
    """Group options read at every step: switching decoupled weight decay on, or the learning
    rate to a tensor, after the cache was built, gives Adam's own update."""
    ref, ours = _pair(weight_decay=0.1)
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


def test_a_rollback_and_a_group_added_mid_run_match_torch():
    """load_state_dict and add_param_group after the cache is built (a rollback of the
    optimizer, a new group): both drop the cache, and training goes on as torch's."""
    ref, ours = _pair()
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


def test_changed_state_or_groups_rebuild_the_cache():
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
        ref, ours = _pair()
        for seed in range(2):
            _step_both(ref, ours, seed)
        change(ref)
        change(ours)
        for seed in range(2, 5):
            _step_both(ref, ours, seed)
        _assert_same(ref, ours)
        assert len(ours.state) == len(ref.state) and ours._lists is not None


def test_copies_and_pickles_step_and_hooks_run_once_a_step():
    import pickle

    ref, ours = _pair()
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
