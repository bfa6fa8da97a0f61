"""Walks over a model's modules that run at every step: whether a module's forward would run
hooks (the models' fused paths compute a module's output without calling it, so they step aside
for a module that has any: a user's feature extractor or gradient probe then sees the calls it
expects), and the modules themselves (train_step's buffer snapshot)."""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _module


def walk(module: nn.Module) -> list[nn.Module]:
    """``module`` and its submodules, each once (by identity, so a shared submodule or a cycle
    is visited once): the modules of ``module.modules()``, in about half its time, without its
    generators and name prefixes."""
    out, seen = [module], {id(module)}
    for m in out:  # grows as it goes
        for child in m._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                out.append(child)
    return out


def has_hooks(module: nn.Module) -> bool:
    """True if ``module`` or a submodule has a forward, forward-pre, backward or backward-pre
    hook, or a global module hook is registered."""
    if (
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    ):
        return True
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for m in walk(module)
    )
