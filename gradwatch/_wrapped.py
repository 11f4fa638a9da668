"""Optimizers and modules that training frameworks wrap, followed to the torch objects they hold.

accelerate (``Accelerator.prepare``, and so ``transformers.Trainer``), Lightning Fabric
(``Fabric.setup``) and Lightning (``LightningOptimizer``) hand the training loop wrappers around the
user's optimizer. Each of them passes ``isinstance(wrapper, torch.optim.Optimizer)`` without being
one: accelerate's never runs ``Optimizer.__init__`` (so it has no step-hook tables), Fabric's and
Lightning's pose as a subclass of the wrapped class and forward attribute reads to it. Step hooks
must sit on the optimizer whose ``step()`` really runs, so gradwatch follows each known wrapper to
the optimizer it holds and refuses anything else that is not an initialised optimizer.

The wrappers are told by the module and name of a class in their type's MRO, so neither accelerate
nor Lightning is ever imported here; an object of theirs can only exist once its framework is.
"""

from __future__ import annotations

import torch
from torch import nn

from gradwatch._checks import one_line_repr
from gradwatch.findings import GradWatchTypeError

MAX_DEPTH = 8
"""How many wrappers deep :func:`unwrap_optimizer` and :func:`unwrap_model` follow at most."""

# (module, qualified class name) -> the attribute holding the wrapped object. The classes match
# anywhere in the type's MRO: Fabric and Lightning build a subclass per optimizer class
# (``FabricSGD``, ``LightningAdam``) at run time, and accelerate's DeepSpeed wrapper derives
# from ``AcceleratedOptimizer``.
_OPTIMIZER_WRAPPERS: dict[tuple[str, str], str] = {
    ("accelerate.optimizer", "AcceleratedOptimizer"): "optimizer",
    # ``optimizer`` is the documented property; it returns ``_optimizer``.
    ("lightning.fabric.wrappers", "_FabricOptimizer"): "optimizer",
    ("lightning_fabric.wrappers", "_FabricOptimizer"): "optimizer",
    ("lightning.pytorch.core.optimizer", "LightningOptimizer"): "_optimizer",
    ("pytorch_lightning.core.optimizer", "LightningOptimizer"): "_optimizer",
}

# ``_FabricModule.module`` is the module given to ``Fabric.setup``, before any DDP/FSDP wrapper
# or ``torch.compile``: its ``named_parameters()`` are the names the user knows.
_MODULE_WRAPPERS: dict[tuple[str, str], str] = {
    ("lightning.fabric.wrappers", "_FabricModule"): "module",
    ("lightning_fabric.wrappers", "_FabricModule"): "module",
}

_WRAPPERS_HELP = (
    "accelerate's AcceleratedOptimizer, Lightning Fabric's optimizer (from fabric.setup) and "
    "Lightning's LightningOptimizer are unwrapped to the optimizer they hold, other wrappers "
    "are not: pass the torch.optim.Optimizer itself"
)


def unwrap_optimizer(
    value: object,
    *,
    argument: str = "optimizer",
    entry: str = "watch()",
    allowed: str = "a torch.optim.Optimizer,",
) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` that ``value`` is, or that the framework wrapper holds.

    Follows accelerate's ``AcceleratedOptimizer`` (``.optimizer``), Lightning Fabric's
    ``_FabricOptimizer`` (``.optimizer``) and Lightning's ``LightningOptimizer``
    (``._optimizer``), nested up to :data:`MAX_DEPTH` deep, without importing either framework.
    The step hooks gradwatch adds then sit on the optimizer whose ``step()`` runs: accelerate
    calls it only on the steps that synchronise gradients (so accumulation steps are not
    optimizer steps) and through its ``GradScaler`` with fp16, which skips steps that overflow.

    Args:
        value: An optimizer or one of the wrappers above.
        argument: The argument's name, for the error message (``"optimizer[1]"`` for an item).
        entry: The entry point that received it, for the error message.
        allowed: What the argument may be, as the error message says it.

    Returns:
        The optimizer itself, never a wrapper: ``value`` when it is one already.

    Raises:
        GradWatchTypeError: ``value`` is no optimizer, a wrapper of something that is none, an
            optimizer subclass that never ran ``Optimizer.__init__`` (an unknown wrapper), or
            wrappers nested more than :data:`MAX_DEPTH` deep.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> unwrap_optimizer(opt) is opt
        True
        >>> unwrap_optimizer("sgd")
        Traceback (most recent call last):
        ...
        gradwatch.findings.GradWatchTypeError: watch(): optimizer must be a torch.optim.Optimizer,
        got str 'sgd'; ...
    """
    chain = [value]
    current = value
    for _ in range(MAX_DEPTH):
        attribute = _wrapped_attribute(current, _OPTIMIZER_WRAPPERS)
        if attribute is None:
            break
        inner = getattr(current, attribute, None)
        if inner is None:
            raise GradWatchTypeError(
                f"{entry}: {argument} must be {allowed} got "
                f"{_describe(chain, with_repr=False)} whose .{attribute} is not set; "
                f"{_WRAPPERS_HELP}"
            )
        chain.append(inner)
        current = inner
    else:
        if _wrapped_attribute(current, _OPTIMIZER_WRAPPERS) is not None:
            raise GradWatchTypeError(
                f"{entry}: {argument} must be {allowed} got optimizer wrappers "
                f"nested more than {MAX_DEPTH} deep ({_describe(chain, with_repr=False)}); pass "
                f"the torch.optim.Optimizer itself"
            )
    if isinstance(current, torch.optim.Optimizer):
        if _has_step_hooks(current):
            return current
        raise GradWatchTypeError(
            f"{entry}: {argument} must be {allowed} got {_describe(chain)}, an "
            f"Optimizer subclass that never ran Optimizer.__init__ (a wrapper gradwatch does not "
            f"know, without step hooks of its own); {_WRAPPERS_HELP}"
        )
    raise GradWatchTypeError(
        f"{entry}: {argument} must be {allowed} got {_describe(chain)}; {_WRAPPERS_HELP}"
    )


def unwrap_model(module: nn.Module) -> nn.Module:
    """The module given to ``Fabric.setup``, when ``module`` is what it returned; else ``module``.

    ``Fabric.setup`` returns a ``_FabricModule`` whose parameters are named
    ``_forward_module.<name>`` (``_forward_module.module.<name>`` under DDP,
    ``_forward_module._orig_mod.<name>`` when compiled); the module it holds names them as
    ``model.named_parameters()`` does, and they are the same tensors. accelerate's ``prepare``
    returns the model itself in one process, and ``DistributedDataParallel`` or a compiled
    module around it otherwise; those are left as they are (their names carry ``module.`` or
    ``_orig_mod.``, as when watching such a module directly): ``accelerator.unwrap_model``
    removes them.

    Args:
        module: A module, or Lightning Fabric's wrapper of one (nested up to :data:`MAX_DEPTH`).

    Returns:
        The innermost module the Fabric wrappers hold, or ``module`` itself.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> unwrap_model(model) is model
        True
    """
    current = module
    for _ in range(MAX_DEPTH):
        attribute = _wrapped_attribute(current, _MODULE_WRAPPERS)
        if attribute is None:
            break
        inner = getattr(current, attribute, None)
        if not isinstance(inner, nn.Module):
            break
        current = inner
    return current


def _wrapped_attribute(value: object, table: dict[tuple[str, str], str]) -> str | None:
    """The attribute holding what ``value`` wraps, when its type is a known wrapper."""
    for cls in type(value).__mro__:
        attribute = table.get((cls.__module__, cls.__qualname__))
        if attribute is not None:
            return attribute
    return None


def _has_step_hooks(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``Optimizer.__init__`` (or ``__setstate__``) gave ``optimizer`` its own hook tables.

    Read from the instance's ``__dict__``: an unknown wrapper that forwards attribute reads to the
    optimizer it holds would otherwise pass, and its hooks would land on the inner optimizer,
    which then reports steps gradwatch does not recognise as this argument's.
    """
    own = getattr(optimizer, "__dict__", {})
    return isinstance(own.get("_optimizer_step_pre_hooks"), dict) and isinstance(
        own.get("_optimizer_step_post_hooks"), dict
    )


def _describe(chain: list[object], *, with_repr: bool = True) -> str:
    """``AcceleratedOptimizer wrapping StepOnly <repr>``: the types from outside in.

    The innermost object's repr follows on one line, cut at 80 characters; not for an optimizer,
    whose repr lists every parameter group over many lines.
    """
    names = " wrapping ".join(type(item).__name__ for item in chain)
    last = chain[-1]
    if not with_repr or isinstance(last, torch.optim.Optimizer):
        return names
    return f"{names} {one_line_repr(last)}"
