"""Trainable tensors the watched model uses but does not own, seen in its first forward passes.

Layers kept in a plain Python ``list`` or ``dict``, modules or ``nn.Parameter`` objects created
inside ``forward``, a plain tensor attribute with ``requires_grad=True``: ``model.parameters()``
does not list them, so an optimizer built from it never updates them and ``state_dict()``
never saves them. They show in the autograd graph of the model's output: leaves that require a
gradient and are not among the watched parameters.

For the first :data:`FORWARDS` forward passes of the model that build a graph, a hook at the end
of the model's forward walks that graph once (no tensor value is read) and a global module hook
notes which modules outside the model ran inside it and who called them; then every hook is
removed, so later steps cost nothing. Leaves that are inputs of the forward (a tensor given with
``requires_grad=True``, as adversarial training and gradient penalties do) or that a watched
optimizer holds (trained, whoever owns them) are not reported.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.utils.hooks import RemovableHandle

from gradwatch import _compat
from gradwatch._reporting import warn_user

_is_compiling = _compat.is_compiling()

FORWARDS = 2
"""Forward passes with a graph that are looked at; the bug is there from the first."""
LOOKS = 20
"""Forward passes looked at in all (evaluation passes build no graph)."""
GRAPH_NODES = 200_000
"""The most graph nodes one walk visits (a guard for very large graphs)."""


_ORDER = {"list": 0, "dict": 1, "attribute": 2, "module": 3, "tensor": 4}


@dataclasses.dataclass(frozen=True)
class Unregistered:
    """One trainable tensor the model uses but does not own."""

    name: str
    """Where it lives, as far as it can be found: ``'blocks[0].weight'`` (a module in the plain
    list ``model.blocks``), ``'scale'`` (a plain tensor attribute), or ``'<Linear in
    encoder.forward>.weight'`` (a module reached from nowhere in the model, created in
    ``forward``: named after the model's module whose forward called it);
    ``'<tensor (16, 8)>'`` when nothing names it."""
    shape: tuple[int, ...]
    how: str
    """``"list"``, ``"dict"``, ``"attribute"``, ``"module"`` (a module outside the model) or
    ``"tensor"`` (a leaf nothing names)."""


def _tensors(value: object, depth: int = 0) -> Iterator[torch.Tensor]:
    if depth > 6:
        return
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item, depth + 1)


def graph_leaves(outputs: object, limit: int = GRAPH_NODES) -> list[torch.Tensor]:
    """The leaves that require a gradient in the autograd graph of ``outputs``."""
    stack: list[Any] = [t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None]
    seen: set[int] = set()
    leaves: list[torch.Tensor] = []
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            leaves.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


class ForwardProbe:
    """Looks at the first forward passes of ``model`` and tells ``found`` about each tensor it
    uses but does not own (once each); removes its hooks after that, or on :meth:`remove`."""

    def __init__(
        self,
        model: nn.Module,
        watched: Callable[[], set[int]],
        found: Callable[[list[Unregistered]], None],
    ) -> None:
        self._model = weakref.ref(model)
        self._watched = watched
        self._found = found
        self._own = {id(m) for m in model.modules()}
        self._inputs: set[int] = set()
        self._depth = 0
        self._calls: dict[int, tuple[str, str, str]] = {}
        """Parameter ids of modules outside the model that ran inside its forward: the
        module's class, the model's module that called it, the parameter's name."""
        self._running: list[str] = []
        self._names = {id(m): name or type(model).__name__ for name, m in model.named_modules()}
        self._reported: set[str] = set()
        self._graphs = 0
        self._looks = 0
        # The global hooks hold the probe weakly, and go when it does: torch's module-level
        # hook dicts never keep a probe (and through it the monitor) alive.
        me = weakref.ref(self)

        def module_enter(module: nn.Module, args: tuple[Any, ...]) -> None:
            probe = me()
            if probe is not None:
                probe._module_enter(module, args)

        def module_exit(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            probe = me()
            if probe is not None:
                probe._module_exit(module, args, output)

        globals_ = [
            register_module_forward_pre_hook(module_enter),
            register_module_forward_hook(module_exit),
        ]
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._enter, with_kwargs=True),
            model.register_forward_hook(self._exit, with_kwargs=True),
            *globals_,
        ]
        for handle in globals_:
            weakref.finalize(self, handle.remove)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    @property
    def handles(self) -> list[RemovableHandle]:
        """The hooks' handles (for a registry that removes them with its own)."""
        return list(self._handles)

    def remove(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        self._calls.clear()

    def look_at(self, loss: object, inputs: object = ()) -> None:
        """Look at the graph of ``loss`` (a framework's training step, which may not call the
        model's own forward), ``inputs`` excluded; while the probe is active."""
        if not self._handles or self._depth:
            return
        self._inputs = {id(t) for t in _tensors(inputs)}
        self._guarded(loss)

    # ------------------------------------------------------------------ hooks

    def _enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._depth == 0:
            self._inputs = {id(t) for t in _tensors((args, kwargs))}
            self._running = [self._names[id(module)]]  # the global hooks saw it before
        self._depth += 1

    def _module_enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._depth == 0:
            return
        name = self._names.get(id(module))
        if name is not None:
            self._running.append(name)
            return
        caller = self._running[-1] if self._running else ""
        for pname, param in module._parameters.items():
            if param is not None and param.requires_grad:
                self._calls.setdefault(id(param), (type(module).__name__, caller, pname))

    def _module_exit(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._depth and id(module) in self._names and self._running:
            self._running.pop()

    def _exit(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        self._depth -= 1
        if self._depth or _is_compiling():
            return
        self._guarded(output)

    def _guarded(self, output: object) -> None:
        try:
            self._look(output)
        except Exception as error:  # never break the user's forward pass
            self.remove()
            warn_user(
                f"gradwatch: the unregistered_parameter check stopped after an internal error "
                f"({type(error).__name__}: {error}); training goes on unchanged. Please report "
                f"this with the traceback.",
                RuntimeWarning,
            )

    def _look(self, output: object) -> None:
        self._looks += 1
        leaves = graph_leaves(output)
        if leaves:
            self._graphs += 1
        watched = self._watched()
        strays = [
            leaf
            for leaf in leaves
            if leaf.requires_grad and id(leaf) not in watched and id(leaf) not in self._inputs
        ]
        if strays:
            # A module created in every forward gives new tensors each time: one name, once.
            fresh = [u for u in self._describe(strays) if u.name not in self._reported]
            self._reported.update(u.name for u in fresh)
            if fresh:
                self._found(sorted(fresh, key=lambda u: (_ORDER[u.how], u.name)))
        self._inputs = set()
        if self._graphs >= FORWARDS or self._looks >= LOOKS:
            self.remove()

    def _describe(self, strays: list[torch.Tensor]) -> list[Unregistered]:
        model = self._model()
        paths = _unregistered_paths(model) if model is not None else {}
        described = []
        for tensor in strays:
            shape = tuple(tensor.shape)
            if id(tensor) in paths:
                name, how = paths[id(tensor)]
            elif id(tensor) in self._calls:
                cls, caller, pname = self._calls[id(tensor)]
                where = f" in {caller}.forward" if caller else ""
                name, how = f"<{cls}{where}>.{pname}", "module"
            else:
                name, how = f"<tensor {shape}>", "tensor"
            described.append(Unregistered(name, shape, how))
        return described


def _unregistered_paths(model: nn.Module) -> dict[int, tuple[str, str]]:
    """Trainable tensors reachable from the model's modules through plain attributes (lists,
    tuples, dicts, bare tensors) rather than registration: id -> (path, how)."""
    found: dict[int, tuple[str, str]] = {}
    for prefix, module in model.named_modules():
        registered = {*module._parameters, *module._buffers, *module._modules}
        for attr, value in vars(module).items():
            if attr.startswith("_") or attr in registered:
                continue
            path = f"{prefix}.{attr}" if prefix else attr
            if isinstance(value, torch.Tensor):
                if value.requires_grad:
                    found.setdefault(id(value), (path, "attribute"))
                continue
            items: list[tuple[object, object]]
            if isinstance(value, (list, tuple)):
                items, how = list(enumerate(value)), "list"
            elif isinstance(value, dict):
                items, how = list(value.items()), "dict"
            else:
                continue
            for key, item in items[:1024]:
                at = f"{path}[{key!r}]" if how == "dict" else f"{path}[{key}]"
                if isinstance(item, nn.Module):
                    for name, param in item.named_parameters():
                        found.setdefault(id(param), (f"{at}.{name}", how))
                elif isinstance(item, torch.Tensor) and item.requires_grad:
                    found.setdefault(id(item), (at, how))
    return found
