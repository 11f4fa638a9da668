"""Every private torch import and version gate gradwatch relies on, in one place."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

_TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])

# torch._foreach_norm accepts dtype= from 2.3 on; before that, statistics of low-precision
# gradients are taken on float32 copies, which costs an allocation but keeps them correct.
_FOREACH_NORM_HAS_DTYPE = _TORCH_VERSION >= (2, 3)


def foreach_norm_fp32(tensors: Sequence[torch.Tensor], ord: float = 2.0) -> list[torch.Tensor]:
    """Norms of ``tensors`` (same device and dtype) accumulated in float32 or wider."""
    if tensors[0].dtype in (torch.float32, torch.float64):
        return list(torch._foreach_norm(list(tensors), ord))
    if _FOREACH_NORM_HAS_DTYPE:
        return list(torch._foreach_norm(list(tensors), ord, dtype=torch.float32))
    return list(torch._foreach_norm([t.float() for t in tensors], ord))


def group_by_device_and_dtype(
    tensors: Sequence[torch.Tensor],
) -> dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[int]]]:
    """Split ``tensors`` into foreach-compatible groups, remembering each one's position."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[int]]] = {}
    for position, tensor in enumerate(tensors):
        key = (tensor.device, tensor.dtype)
        group = groups.get(key)
        if group is None:
            group = groups[key] = ([], [])
        group[0].append(tensor)
        group[1].append(position)
    return groups


def backward_pass_id() -> Callable[[], int]:
    """A function that tells backward passes apart from inside gradient hooks.

    It returns a number that stays the same for every hook of one backward pass and differs
    between passes: autograd's graph-task id where torch exposes it (called directly, no Python
    frame in between), otherwise a counter advanced by an end-of-backward callback.
    """
    task_id: Callable[[], int] | None = getattr(torch._C, "_current_graph_task_id", None)
    return task_id if task_id is not None else _PassCounter().current


def at_backward_end(callback: Callable[[], None]) -> bool:
    """Run ``callback`` once the backward pass that is running now ends (from inside one of its
    hooks); ``False`` when this autograd engine takes no such callback (then nothing is run)."""
    try:
        torch.autograd.Variable._execution_engine.queue_callback(callback)
    except (AttributeError, RuntimeError):
        return False
    return True


class _PassCounter:
    def __init__(self) -> None:
        self._passes = 0
        self._armed = False

    def current(self) -> int:
        if not self._armed:
            self._armed = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_pass)
        return self._passes

    def _end_pass(self) -> None:
        self._armed = False
        self._passes += 1


def is_compiling() -> Callable[[], bool]:
    """A function telling whether Dynamo is tracing the code that calls it (torch.compile):
    ``torch.compiler.is_compiling`` from torch 2.3, ``torch._dynamo.is_compiling`` before."""
    compiler = getattr(torch, "compiler", None)
    found: Callable[[], bool] | None = getattr(compiler, "is_compiling", None)
    if found is not None:
        return found
    try:
        from torch import _dynamo
    except ImportError:  # pragma: no cover - every supported torch has Dynamo
        return lambda: False
    dynamo_found: Callable[[], bool] = _dynamo.is_compiling
    return dynamo_found


def clip_functions() -> list[tuple[object, str]]:
    """The places a training loop finds torch's gradient-clipping functions: (module, name).

    ``torch.nn.utils`` re-exports the functions of ``torch.nn.utils.clip_grad`` (the same
    objects); both namespaces are listed so that a loop calling either form is seen.
    ``clip_grads_with_norm_`` exists from torch 2.6.
    """
    from torch.nn import utils
    from torch.nn.utils import clip_grad

    places: list[tuple[object, str]] = []
    for module in (utils, clip_grad):
        for name in ("clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_"):
            if callable(getattr(module, name, None)):
                places.append((module, name))
    return places


def grad_scaler_class() -> type | None:
    """The class whose ``unscale_`` every ``GradScaler`` runs: ``torch.amp.GradScaler`` (which
    ``torch.cuda.amp.GradScaler`` subclasses), ``torch.cuda.amp.GradScaler`` before torch 2.3."""
    try:
        from torch.amp.grad_scaler import GradScaler
    except ImportError:  # pragma: no cover - torch < 2.3
        try:
            from torch.cuda.amp.grad_scaler import GradScaler  # type: ignore[assignment]
        except ImportError:
            return None
    return GradScaler
