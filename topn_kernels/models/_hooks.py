"""Whether a module's forward would run hooks: the models' fused paths compute a module's output
without calling it, so they step aside for a module that has any (a user's feature extractor or
gradient probe then sees the calls it expects)."""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _module


def has_hooks(module: nn.Module) -> bool:
    """True if ``module`` or a submodule has a forward, forward-pre, backward or backward-pre
    hook, or a global module hook is registered.

    Walks the submodules itself (each once, by identity) instead of through ``modules()``,
    whose generators and name prefixes cost about twice as much: the models ask this of every
    fused block at every call."""
    if (
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    ):
        return True
    stack, seen = [module], {id(module)}
    while stack:
        m = stack.pop()
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return True
        for child in m._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                stack.append(child)
    return False
