"""Adam with a fused kernel and the per-step Python bookkeeping taken out: the training
programs' optimizer (:func:`.training.make_adam`).

``torch.optim.Adam(fused=True)`` runs one kernel over all parameters, but before it, at every step,
Python walks every parameter to gather its gradient and state, groups the lists by device and
dtype, and adds 1 to each parameter's step counter (one tensor op per parameter). For the set VAE's
120 small parameters that made a step 1.3 ms long. :class:`FusedAdam` gathers the state lists once
and keeps the step counters of a parameter group as views into one tensor; a step is a check that
this cache is current and one native call per group:

- on CPU, where the C++ extension is built (and ``native=True``, the default), this library's
  multi-tensor Adam (``torch.classes.topn_kernels.AdamState``, csrc/cpu/adam.cpp): it holds the
  group's parameters and states, reads the gradients from the parameters, and updates all
  elements of all tensors as one range split between the threads. PyTorch's fused kernel, called
  with five lists of 120 tensors, spends more on unpacking them and on splitting each small
  tensor between the threads than on its arithmetic: about 300 us a step for the set VAE against
  about 145 us here. The update is PyTorch's fused formula, each operation rounded to the
  parameters' dtype in the same order (csrc/cpu/adam.h), the same at any thread count and vector
  width; PyTorch's kernel computes the last few elements of each thread's share in double, so
  the two agree up to the last bit of those elements (tests/test_fused_adam.py);
  The native step bumps the tensors' version counters as an in-place op would. It holds
  references to the parameters, so ``torch.utils.swap_tensors`` (``load_state_dict`` or
  ``.to()`` with module swapping switched on) refuses to swap a parameter that has a gradient
  accumulator: convert the model before making the optimizer, or use ``native=False``;
- elsewhere (CUDA, or ``native=False``), ``torch._fused_adam_`` with the cached lists and one
  ``add_`` on the counters: bit for bit ``torch.optim.Adam(fused=True)``.

The state dict has Adam's layout either way, so checkpoints load into either optimizer.

Anything the shortcut does not cover takes ``torch.optim.Adam.step`` unchanged: a closure, a
parameter without a gradient, the first step (no state yet), ``amsgrad``, tensor betas, sparse
gradients, parameters of several devices or dtypes in one group, or a group that a loaded state
dict of a non-fused Adam turned non-fused (``load_state_dict`` takes the groups' options from
the state dict, ``fused`` among them). The groups' options are read at every step, so one
changed between steps (``decoupled_weight_decay`` switched on, a tensor learning rate) takes
Adam's step from then on. A GradScaler's skipped step (``found_inf``) and gradients the native
step cannot read in place (non-contiguous) take the ``torch._fused_adam_`` call.

Clipping: with ``max_grad_norm`` set (as :func:`.training.train_step` sets it for its step), the
step first clips the gradients' total 2-norm to it, as ``clip_grad_norm_`` would: on the native
CPU step of one group of float32 parameters, inside the native call
(``AdamState.step_clipped``: the sums of squares of :func:`grad_norm`'s native op, in its order,
then the factor ``max((norm + 1e-6) / max_grad_norm, 1)`` by the same tensor ops, then the step
with it as the gradient scale: bit for bit that sequence, without its Python and calls, about
0.1 ms a step of the set VAE); elsewhere, with float32 parameters and fused groups, the same
factor computed in Python and given as ``grad_scale``; otherwise ``clip_grad_norm_`` and the
plain step.
"""

from __future__ import annotations

from operator import attrgetter, is_, itemgetter

import torch
from torch import Tensor

from .. import native

__all__ = ["FusedAdam", "clip_scale", "grad_norm", "scalable_grads"]


class FusedAdam(torch.optim.Adam):
    """``torch.optim.Adam(params, lr, fused=True, ...)`` with a shorter step (module docstring).

    Takes Adam's arguments except ``fused``, ``foreach``, ``capturable`` and ``differentiable``.
    ``native=False`` keeps PyTorch's fused kernel on CPU too (bit for bit
    ``torch.optim.Adam(fused=True)``). A ``grad_scale`` or ``found_inf`` attribute set on the
    optimizer (as ``torch.amp.GradScaler`` does) is honoured as by Adam.

    ``max_grad_norm`` (None by default; :func:`.training.train_step` sets it for its step):
    when set, ``step()`` first clips the gradients as ``clip_grad_norm_(params, max_grad_norm)``
    would, folded into the update where it can (module docstring, "Clipping").
    """

    max_grad_norm: float | None = None

    def __init__(self, params, lr: float | Tensor = 1e-3, *, native: bool = True, **kwargs) -> None:
        for key in ("fused", "foreach", "capturable", "differentiable"):
            if key in kwargs:
                raise TypeError(f"FusedAdam does not take {key!r}")
        if not isinstance(native, bool):
            raise TypeError(f"native must be a bool, got {type(native).__name__}")
        self.native = native
        self._lists: list[tuple] | None = None
        self._groups: tuple[dict, ...] = ()  # the param_groups the cache was built from
        self._state_items: tuple[tuple, tuple] = ((), ())  # the state dict's keys and values
        super().__init__(params, lr=lr, fused=True, **kwargs)

    def __getstate__(self) -> dict:
        state = {**super().__getstate__(), "native": self.native}
        if "max_grad_norm" in self.__dict__:
            state["max_grad_norm"] = self.max_grad_norm
        return state

    def __setstate__(self, state: dict) -> None:  # copies and pickles keep no cache
        super().__setstate__(state)
        self.__dict__.setdefault("native", True)
        self._lists = None

    @torch.no_grad()
    def step(self, closure=None):
        max_norm = self.max_grad_norm
        if max_norm is None:
            return self._step(closure)
        if not max_norm > 0:
            raise ValueError(f"FusedAdam: max_grad_norm must be > 0 or None, got {max_norm}")
        if closure is not None:
            raise ValueError("FusedAdam: a closure cannot be clipped (max_grad_norm is set)")
        if self._native_clipped_step(max_norm):
            return None
        return self._clipped_step(max_norm)

    def _native_clipped_step(self, max_norm: float) -> bool:
        """The native step with the norm and the clipping factor computed inside
        (``AdamState.step_clipped``), where it applies: a current cache of one group with a
        native state, options the shortcut implements, no scale set by anyone else, float32
        parameters that all have gradients. Returns whether it ran (nothing changed if not)."""
        if not self._current() or not self._gather():
            return False
        assert self._lists is not None
        if len(self._lists) != 1:  # the norm is over every group's gradients
            return False
        group, *_, state = self._lists[0]
        if (
            state is None
            or not _options_allow(group)
            or getattr(self, "grad_scale", None) is not None
            or getattr(self, "found_inf", None) is not None
        ):
            return False
        return state.step_clipped(*_hyperparameters(group), float(max_norm))

    def _clipped_step(self, max_norm: float):
        """The clipping elsewhere: as the update's gradient scale (:func:`clip_scale`) where
        :func:`scalable_grads` allows it, else ``clip_grad_norm_`` first."""
        if grads := scalable_grads(self):
            self.grad_scale = clip_scale(grads, max_norm)
            try:
                return self._step(None)
            finally:
                del self.grad_scale
        params = [p for g in self.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return self._step(None)

    def _step(self, closure):
        """The step without clipping."""
        if closure is not None or not self._current() or not self._gather():
            return self._adam_step(closure)
        assert self._lists is not None
        if not all(_options_allow(entry[0]) for entry in self._lists):  # changed since gathered
            return self._adam_step(None)
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        states = [entry[-1] for entry in self._lists]
        # every group's native step or none: a step checks its group itself (ready()) and
        # declines without a change, so one group needs no check first, several do
        if (
            found_inf is None
            and all(s is not None for s in states)
            and (len(states) == 1 or all(s.ready(grad_scale) for s in states))
        ):
            for (group, *_), state in zip(self._lists, states, strict=True):
                stepped = state.step(*_hyperparameters(group), grad_scale)
                if not stepped:  # one group, not ready: nothing changed, torch's kernel steps
                    assert len(states) == 1  # several were checked, and nothing ran since
                    break
            else:
                return None
        all_grads = [[p.grad for p in entry[1]] for entry in self._lists]
        if any(g is None or g.is_sparse for grads in all_grads for g in grads):
            return self._adam_step(None)  # the cached lists stay valid
        for (group, params, exp_avgs, exp_avg_sqs, steps, counters, *_), grads in zip(
            self._lists, all_grads, strict=True
        ):
            device = params[0].device
            scale = None if grad_scale is None else grad_scale.to(device, non_blocking=True)
            inf = None if found_inf is None else found_inf.to(device, non_blocking=True)
            counters.add_(1)
            beta1, beta2 = group["betas"]
            torch._fused_adam_(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                amsgrad=False,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
                grad_scale=scale,
                found_inf=inf,
            )
            if inf is not None:
                counters.sub_(inf)
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``Optimizer.zero_grad``; with ``set_to_none`` (the default) every parameter's gradient
        set to None in one loop, without the profiler label and the per-device grouping that
        only the zeroing path needs."""
        if not set_to_none:
            return super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None
        return None

    def _adam_step(self, closure):
        """``torch.optim.Adam.step`` without the step hooks, which this class's own (wrapped)
        ``step`` has already run: torch wraps ``Adam.step`` too once a plain Adam exists."""
        step = torch.optim.Adam.step
        if getattr(step, "hooked", False):
            step = step.__wrapped__
        return step(self, closure)

    def _current(self) -> bool:
        """False, and the cache dropped, if the groups, their parameter lists or the state
        entries changed since the cache was built (a state dict loaded, a group added, a
        parameter appended to a group or swapped by ``torch.utils.swap_tensors``, a state
        replaced or cleared); True otherwise, or with no cache."""
        if self._lists is None:
            return True
        groups = self.param_groups  # load_state_dict and add_param_group change these
        if len(groups) != len(self._groups) or not all(map(is_, groups, self._groups)):
            self._lists = None
            return False
        # the state dict's keys and values, the same objects in the same order: pointer
        # comparisons mapped in C, without hashing a tensor (a Python call) per parameter
        state, (keys, values) = self.state, self._state_items
        if not (
            len(state) == len(keys)
            and all(map(is_, state.keys(), keys))
            and all(map(is_, state.values(), values))
        ):
            self._lists = None
            return False
        for group, params, exp_avgs, exp_avg_sqs, steps, _, states, impls, _ in self._lists:
            now = group["params"]
            # identity checks mapped in C: this runs at every step; the C++ tensors too, which
            # torch.utils.swap_tensors exchanges under unchanged Python objects (the native
            # step holds the C++ tensors)
            same = (
                len(now) == len(params)
                and all(map(is_, now, params))
                and list(map(_impl, params)) == impls
                and all(map(is_, map(itemgetter("exp_avg"), states), exp_avgs))
                and all(map(is_, map(itemgetter("exp_avg_sq"), states), exp_avg_sqs))
                and all(map(is_, map(itemgetter("step"), states), steps))
            )
            if not same:
                self._lists = None
                return False
        return True

    def _gather(self) -> bool:
        """Builds the cached state lists if the shortcut applies; returns whether it does."""
        if self._lists is not None:
            return True
        lists = []
        for group in self.param_groups:
            params = list(group["params"])
            if not params:
                continue
            if (
                not _options_allow(group)
                or len({(p.device, p.dtype) for p in params}) != 1
                or params[0].is_complex()
                or any(len(self.state.get(p, {})) == 0 for p in params)
            ):
                return False
            states = [self.state[p] for p in params]
            counters = torch.stack([s["step"] for s in states]).to(torch.float32)
            for i, s in enumerate(states):
                s["step"] = counters[i]  # a view: one add_ steps them all
            exp_avgs = [s["exp_avg"] for s in states]
            exp_avg_sqs = [s["exp_avg_sq"] for s in states]
            steps = [s["step"] for s in states]
            lists.append(
                (
                    group,
                    params,
                    exp_avgs,
                    exp_avg_sqs,
                    steps,
                    counters,
                    states,
                    list(map(_impl, params)),
                    self._native_state(params, exp_avgs, exp_avg_sqs, steps),
                )
            )
        self._lists, self._groups = lists, tuple(self.param_groups)
        self._state_items = (tuple(self.state.keys()), tuple(self.state.values()))
        return True

    def _native_state(self, params, exp_avgs, exp_avg_sqs, steps):
        """The native step's holder of one group's parameters and states (csrc/cpu/adam.cpp),
        or None where it does not apply (``native=False``, no extension, not CPU)."""
        if not (self.native and native.AVAILABLE and params[0].is_cpu):
            return None
        return torch.classes.topn_kernels.AdamState(params, exp_avgs, exp_avg_sqs, steps)


_impl = attrgetter("_cdata")  # the address of a tensor's C++ object


def grad_norm(grads: list[Tensor]) -> Tensor:
    """The 2-norm of all of ``grads`` together, the norm ``clip_grad_norm_`` clips by: on CPU
    one native call (csrc/cpu/total_norm.cpp, sums of squares in float64; about 60 us for the
    set VAE's 120 gradients against 290 us for ``get_total_norm``'s norm per tensor), else
    ``get_total_norm``'s. The two agree up to float32 rounding."""
    if native.AVAILABLE and all(g.is_cpu and g.layout == torch.strided for g in grads):
        return native.total_norm.total_norm(grads)
    return torch.nn.utils.get_total_norm(grads, foreach=True)


def scalable_grads(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The gradients of ``optimizer``'s parameters when it can take the clipping as its
    gradient scale, else []: a fused Adam (every parameter group fused; ``torch.optim.Adam``,
    ``AdamW`` or :class:`FusedAdam` itself) over float32 parameters (the fused kernels take a
    float32 scale; float64 keeps clip_grad_norm_'s float64 factor), with no scale set by anyone
    else (a GradScaler), and some gradient."""
    groups = optimizer.param_groups
    if (
        type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW, FusedAdam)
        or not all(g.get("fused") for g in groups)
        or getattr(optimizer, "grad_scale", None) is not None
        or getattr(optimizer, "found_inf", None) is not None
        or any(p.dtype != torch.float32 for g in groups for p in g["params"])
    ):
        return []
    return [p.grad for g in groups for p in g["params"] if p.grad is not None]


def clip_scale(grads: list[Tensor], max_norm: float) -> Tensor:
    """``clip_grad_norm_``'s clipping as a fused update's gradient scale (it divides by it):
    ``max((norm + 1e-6) / max_norm, 1)``, ``norm`` the :func:`grad_norm` of ``grads``."""
    return torch.clamp((grad_norm(grads) + 1e-6) / max_norm, min=1.0)


def _hyperparameters(group: dict) -> tuple:
    """The native step's arguments from a group: lr, beta1, beta2, weight_decay, eps,
    maximize."""
    beta1, beta2 = group["betas"]
    return group["lr"], beta1, beta2, group["weight_decay"], group["eps"], group["maximize"]


def _options_allow(group: dict) -> bool:
    """Whether a parameter group's options are those the shortcut implements (checked at every
    step: a user may change them between steps)."""
    return (
        bool(group.get("fused"))  # False: a state dict of a non-fused Adam was loaded
        and not group["amsgrad"]
        and not group.get("decoupled_weight_decay", False)
        and not isinstance(group["lr"], Tensor)
        and not any(isinstance(b, Tensor) for b in group["betas"])
    )
