"""The hook registry: every hook gradwatch adds goes through it; ``remove()`` takes all back."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils.hooks import RemovableHandle

StepHook = Callable[[torch.optim.Optimizer, tuple[Any, ...], dict[str, Any]], None]


class HookRegistry:
    """Owns the handle of every registration and removes exactly those, once.

    Usable as a context manager. Nothing is written onto the user's modules, parameters or
    optimizers beyond the entries torch's own ``register_*`` methods create.
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._handles)

    def add_param_hooks(
        self, params: Iterable[torch.Tensor], hook: Callable[[int, torch.Tensor], None]
    ) -> None:
        """Call ``hook(position, param)`` right after autograd accumulates into ``param.grad``.

        The hook is bound to its position with ``functools.partial``, which adds no Python frame
        to a call made once per parameter per backward pass, and holds no tensor.
        """
        for position, param in enumerate(params):
            handle = param.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]
                functools.partial(hook, position)
            )
            self._keep(handle)

    def add_step_hooks(
        self, optimizer: torch.optim.Optimizer | None, before: StepHook, after: StepHook
    ) -> None:
        """Hooks around ``optimizer.step()``; with ``None``, around every optimizer's step."""
        if optimizer is None:
            self._keep(register_optimizer_step_pre_hook(before))
            self._keep(register_optimizer_step_post_hook(after))
        else:
            self._keep(optimizer.register_step_pre_hook(before))
            self._keep(optimizer.register_step_post_hook(after))

    def add_step_pre_hook(self, optimizer: torch.optim.Optimizer, hook: StepHook) -> None:
        """A hook before each ``optimizer.step()`` (not one a GradScaler skips)."""
        self._keep(optimizer.register_step_pre_hook(hook))

    def add_step_post_hook(self, optimizer: torch.optim.Optimizer, hook: StepHook) -> None:
        """A hook after each ``optimizer.step()`` that really runs (not one GradScaler skips)."""
        self._keep(optimizer.register_step_post_hook(hook))

    def adopt(self, handles: Iterable[RemovableHandle]) -> None:
        """Handles of hooks registered elsewhere (the forward probe's), removed with the rest;
        removing one twice is harmless."""
        for handle in handles:
            self._keep(handle)

    def remove(self) -> None:
        with self._lock:
            handles, self._handles = self._handles, []
        for handle in reversed(handles):
            handle.remove()

    def __enter__(self) -> HookRegistry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def _keep(self, handle: RemovableHandle) -> None:
        with self._lock:
            self._handles.append(handle)
