"""Where a training loop clips its gradients, and when a ``GradScaler`` unscales them.

While at least one monitor listens, torch's gradient-clipping functions (``clip_grad_norm_``,
``clip_grad_value_``, ``clip_grads_with_norm_``, in ``torch.nn.utils`` and
``torch.nn.utils.clip_grad``) and ``GradScaler.unscale_`` are replaced by wrappers that tell the
listeners what is clipped or unscaled, then run the original unchanged (same arguments, same
result, same errors). When the last listener stops, the originals are put back, so torch is left
exactly as it was. A wrapper someone else installed over ours is left in place (removing it
would break theirs); ours then only calls the original.

The wrappers read no tensor values: what a listener records is host bookkeeping (which
parameters, the clip's threshold when it is a host number), so nothing synchronises. Inside a
function Dynamo compiles, and within a clip function called by another (``clip_grad_norm_``
calls the internal ``clip_grads_with_norm_``), the wrappers only call the original.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from gradwatch import _compat
from gradwatch._reporting import warn_user
from gradwatch.findings import GradientError

_is_compiling = _compat.is_compiling()


class ClipListener(Protocol):
    """What a listener implements; both run on the thread that called torch."""

    def clipping(
        self, tensors: list[torch.Tensor], threshold: float | None
    ) -> Callable[[], None] | None:
        """Before a clip of ``tensors`` runs (their ``.grad`` not yet changed): a function to
        call once it has run, or ``None``."""

    def unscaled(self, optimizer: torch.optim.Optimizer) -> None:
        """After a ``GradScaler`` unscaled ``optimizer``'s gradients."""


@dataclasses.dataclass(eq=False)
class _Patch:
    owner: Any
    name: str
    original: Any
    wrapper: Any
    is_class: bool


_lock = threading.RLock()
_listeners: weakref.WeakSet[Any] = weakref.WeakSet()
_patches: list[_Patch] = []
_local = threading.local()


def _live() -> list[ClipListener]:
    return list(_listeners)


class ListenHandle:
    """Stops one listener (:meth:`remove`); the originals return once none is left. Also done
    when the listener is garbage-collected without having been removed."""

    def __init__(self, listener: ClipListener) -> None:
        self._listener = weakref.ref(listener)
        self._finalizer = weakref.finalize(listener, _release)

    def remove(self) -> None:
        listener = self._listener()
        self._finalizer.detach()
        with _lock:
            if listener is not None:
                _listeners.discard(listener)
            _release()

    def __enter__(self) -> ListenHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def listen(listener: ClipListener) -> ListenHandle:
    """Tell ``listener`` about every clip and unscale from now on, until the handle is removed."""
    with _lock:
        _listeners.add(listener)
        if not _patches:
            _install()
    return ListenHandle(listener)


def installed() -> bool:
    """Whether the wrappers are in place (some listener is live)."""
    return bool(_patches)


def _release() -> None:
    with _lock:
        if not _live():
            _uninstall()


def _install() -> None:
    wrappers: dict[int, Any] = {}  # the same function in two namespaces gets one wrapper
    for module, name in _compat.clip_functions():
        original = getattr(module, name)
        wrapper = wrappers.get(id(original))
        if wrapper is None:
            wrapper = wrappers[id(original)] = _clip_wrapper(original, name)
        _patches.append(_Patch(module, name, original, wrapper, is_class=False))
        setattr(module, name, wrapper)
    scaler = _compat.grad_scaler_class()
    if scaler is not None and callable(vars(scaler).get("unscale_")):
        original = vars(scaler)["unscale_"]
        wrapper = _unscale_wrapper(original)
        _patches.append(_Patch(scaler, "unscale_", original, wrapper, is_class=True))
        scaler.unscale_ = wrapper  # type: ignore[attr-defined]


def _uninstall() -> None:
    for patch in reversed(_patches):
        current = vars(patch.owner).get(patch.name) if patch.is_class else None
        if not patch.is_class:
            current = getattr(patch.owner, patch.name, None)
        if current is patch.wrapper:
            setattr(patch.owner, patch.name, patch.original)
    _patches.clear()


def _depth() -> int:
    depth: int = getattr(_local, "depth", 0)
    return depth


_MISSING = object()


def _threshold(args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> object:
    keyword = "clip_value" if name == "clip_grad_value_" else "max_norm"
    return args[1] if len(args) > 1 else kwargs.get(keyword, _MISSING)


def _host_threshold(value: object) -> float | None:
    """The clip's threshold as a host number; ``None`` for a tensor (not read: no sync)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _clip_wrapper(original: Callable[..., Any], name: str) -> Callable[..., Any]:
    @functools.wraps(original)
    def clip(*args: Any, **kwargs: Any) -> Any:
        if _depth() or not _listeners or _is_compiling():
            return original(*args, **kwargs)
        parameters = args[0] if args else kwargs.get("parameters", _MISSING)
        if parameters is _MISSING:
            return original(*args, **kwargs)  # torch's own error for the missing argument
        if isinstance(parameters, torch.Tensor):
            tensors = [parameters]
        else:
            try:
                tensors = list(parameters)
            except TypeError:
                return original(*args, **kwargs)  # not iterable: torch's own error
            # A generator is consumed once: torch gets the list made of it.
            if args:
                args = (tensors, *args[1:])
            else:
                kwargs = {**kwargs, "parameters": tensors}
        threshold = _host_threshold(_threshold(args, kwargs, name))
        done: list[tuple[ClipListener, Callable[[], None]]] = []
        if threshold is None or not math.isinf(threshold):  # max_norm=inf: a norm, for logging
            watched = [t for t in tensors if isinstance(t, torch.Tensor)]
            for listener in _live():
                after = _guarded(listener, functools.partial(listener.clipping, watched, threshold))
                if after is not None:
                    done.append((listener, after))
        _local.depth = _depth() + 1
        try:
            result = original(*args, **kwargs)
        finally:
            _local.depth = _depth() - 1
        for listener, after in done:
            _guarded(listener, after)
        return result

    return clip


def _unscale_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def unscale_(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if not _listeners or _is_compiling():
            return result
        optimizer = args[1] if len(args) > 1 else kwargs.get("optimizer")
        if isinstance(optimizer, torch.optim.Optimizer):
            for listener in _live():
                _guarded(listener, functools.partial(listener.unscaled, optimizer))
        return result

    return unscale_


def _guarded(listener: ClipListener, call: Callable[[], Any]) -> Any:
    """``call()``; an error of gradwatch's own (not a finding raised by ``on_finding="raise"``)
    stops this listener with one warning instead of breaking the user's training step."""
    try:
        return call()
    except GradientError:  # the user asked for on_finding='raise'
        raise
    except Exception as error:
        with _lock:
            _listeners.discard(listener)
            _release()
        warn_user(
            f"gradwatch: the clip_order check stopped after an internal error and no longer "
            f"watches where gradients are clipped ({type(error).__name__}: {error}); training "
            f"goes on unchanged. Please report this with the traceback.",
            RuntimeWarning,
        )
        return None


def patched() -> Iterator[tuple[Any, str]]:
    """(owner, name) of each wrapper in place, for tests."""
    for patch in _patches:
        yield patch.owner, patch.name
