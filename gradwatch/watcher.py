"""``watch()`` and :class:`Watcher`: the plain-PyTorch front end.

It validates the arguments and opens a session through the front-end layer
(:mod:`gradwatch._frontend`), which wires hooks into the core (:class:`gradwatch._monitor.Monitor`):
one post-accumulate-grad hook per parameter feeds the tracker, and hooks around
``optimizer.step()`` run a check before each step (after it when the step takes a closure, which
computes the gradients inside ``step()``) and record the gradients each step used. What is left
here is what only ``watch()`` has: one open watcher per model, and the ``with`` block.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn

from gradwatch import _checks, _frontend, _options
from gradwatch._frontend import RATIO_EVERY as RATIO_EVERY
from gradwatch._frontend import Settings
from gradwatch._wrapped import unwrap_model
from gradwatch.findings import Finding, GradWatchTypeError, GradWatchValueError, Kind
from gradwatch.sinks import Sink

_open_watchers: weakref.WeakKeyDictionary[nn.Module, Watcher] = weakref.WeakKeyDictionary()
_open_watchers_lock = threading.Lock()


def _world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    *,
    log_dir: Any = None,
    histogram_every: int = 100,
    accumulation_steps: int = 1,
    on_finding: _options.OnFinding = "warn",
    on_nonfinite: _options.OnNonFinite = "report",
    sinks: Sequence[Sink] = (),
    **detector_options: Any,
) -> Watcher:
    """Watch the gradients of ``model`` and report gradient bugs as they happen.

    Args:
        model: The module whose trainable parameters to watch.
        optimizer: One optimizer, a list of them, or ``None`` to follow whichever optimizers step
            the model's parameters (through torch's global optimizer step hooks).
        log_dir: Directory for TensorBoard event files and the findings log, or ``None`` for
            none; or a ``torch.utils.tensorboard.SummaryWriter`` of yours, which gradwatch
            writes to and flushes but never closes (the findings log goes to its directory).
        histogram_every: Optimizer steps between gradient histograms in TensorBoard, at steps
            that are multiples of it (0 turns them off).
        accumulation_steps: Backward passes you mean to accumulate per optimizer step.
        on_finding: ``"warn"`` (a :class:`GradWatchWarning`, once per kind and parameter),
            ``"raise"`` (a :class:`GradientError`), ``"record"`` (only kept in
            :attr:`Watcher.findings`), or a callable that receives each :class:`Finding`
            (it must accept one argument).
        on_nonfinite: ``"report"`` (default): NaN/Inf gradients are reported and the optimizer
            steps with them. ``"skip"``: they are reported, and that optimizer step is skipped:
            gradwatch sets ``.grad = None`` on every parameter of the optimizer before it runs,
            so weights and optimizer state (momentum, Adam moments and step counts) stay exactly
            as they were, and a ``skipped_step`` finding records it. Applies to steps whose
            gradients exist before ``optimizer.step()`` (not to ``step(closure)``). On CUDA this
            costs one host-device synchronisation per step (the answer must be on the host before
            the optimizer runs); on CPU nothing more. ``on_finding`` still decides what happens to
            the findings; with ``"raise"`` the gradients are cleared before the error is raised.
        sinks: Outputs of your own, each a :class:`gradwatch.sinks.Sink` (see the README's
            "Writing a sink"); they receive every check's statistics and every finding, and
            are closed with the watcher.
        **detector_options: Thresholds; see the README for each one's meaning and default:
            ``no_grad_after``, ``explode_factor``, ``max_grad_norm``, ``warmup_steps``,
            ``history``, ``vanish_ratio``, ``vanish_steps``, ``no_step_after``, ``ignore``.

    Returns:
        An open :class:`Watcher`; use it as a context manager or call :meth:`Watcher.close`.

    Raises:
        GradWatchTypeError: An argument has the wrong type.
        GradWatchValueError: An argument has a value that is not allowed, ``model`` is already
            watched or has no parameters gradwatch can watch (none trainable, complex or on the
            meta device), or ``log_dir`` cannot be created (the ``OSError`` is the cause).

    Example:
        >>> import torch, gradwatch
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with gradwatch.watch(model, opt, on_finding="record") as watcher:
        ...     for _ in range(3):
        ...         model(torch.ones(4, 3)).sum().backward()  # no zero_grad()
        ...         opt.step()
        >>> [f.kind.value for f in watcher.findings]
        ['missing_zero_grad']

        Skipping steps whose gradients are not finite:

        >>> with gradwatch.watch(model, opt, on_finding="record", on_nonfinite="skip") as watcher:
        ...     opt.zero_grad()
        ...     (model(torch.ones(4, 3)) * float("nan")).sum().backward()
        ...     opt.step()  # skipped: the weights stay finite
        >>> [f.kind.value for f in watcher.findings], bool(model.weight.isfinite().all())
        (['nan', 'skipped_step'], True)
    """
    return Watcher(
        model,
        optimizer,
        log_dir=log_dir,
        histogram_every=histogram_every,
        accumulation_steps=accumulation_steps,
        on_finding=on_finding,
        on_nonfinite=on_nonfinite,
        sinks=sinks,
        **detector_options,
    )


class Watcher:
    """Watches one model's gradients; created by :func:`watch`, which documents the arguments.

    Attributes are read-only views; the watcher writes nothing onto the model, its parameters or
    the optimizers, and :meth:`close` removes every hook it added. A watcher serves one
    with-block; once closed, it still answers but watches nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        *,
        log_dir: Any = None,
        histogram_every: int = 100,
        accumulation_steps: int = 1,
        on_finding: _options.OnFinding = "warn",
        on_nonfinite: _options.OnNonFinite = "report",
        sinks: Sequence[Sink] = (),
        **detector_options: Any,
    ) -> None:
        settings = Settings.validate(
            "watch()",
            log_dir=log_dir,
            histogram_every=histogram_every,
            accumulation_steps=accumulation_steps,
            on_finding=on_finding,
            on_nonfinite=on_nonfinite,
            sinks=sinks,
            detector_options=detector_options,
        )
        if not isinstance(model, nn.Module):
            raise GradWatchTypeError(
                f"model must be a torch.nn.Module, got {_checks.received(model)}"
            )
        model = unwrap_model(model)  # Fabric's wrapper: watch the module it holds
        optimizers = _frontend.check_optimizers(optimizer, settings.entry)
        assert settings.accumulation_steps is not None
        self.accumulation_steps: int = settings.accumulation_steps
        self.histogram_every = settings.histogram_every
        self._on_finding = settings.on_finding
        self.on_nonfinite = settings.on_nonfinite
        self.log_dir = settings.log_dir or None
        self.options = settings.options
        named = _frontend.eligible_parameters(model, settings.entry)
        watched = {id(p) for _, p in named}
        for number, opt in enumerate(optimizers):
            if not any(id(p) in watched for g in opt.param_groups for p in g["params"]):
                raise GradWatchValueError(
                    f"optimizer {number} ({type(opt).__name__}) updates none of the model's "
                    f"trainable parameters; pass the optimizers of this model, or none to follow "
                    f"whichever optimizer steps its parameters"
                )

        self._model = weakref.ref(model)
        self._closed = False
        with _open_watchers_lock:
            if model in _open_watchers:
                raise GradWatchValueError(
                    f"model ({type(model).__name__}) is already watched by an open Watcher; "
                    f"close that one first (or use it instead)"
                )
            _open_watchers[model] = self
        outputs: list[Sink] = []
        try:
            if self.log_dir is not None:
                outputs = _frontend.open_outputs(
                    self.log_dir,
                    settings.writer,
                    settings.entry,
                    param_names=[name for name, _ in named],
                )
            self._session = _frontend.Session(
                settings,
                named,
                optimizers,
                accumulation_steps=self.accumulation_steps,
                sinks=[*outputs, *settings.sinks],
                on_finding=settings.on_finding,
                step_hooks=True,
                model=model,
                replicas=_frontend.replica_reduction(model, _world_size()),
            )
        except BaseException:
            with _open_watchers_lock:
                _open_watchers.pop(model, None)
            for sink in settings.sinks:
                sink.close()
            raise
        self._monitor = self._session.monitor
        self._registry = self._session.registry

    # ------------------------------------------------------------------ public API

    @property
    def findings(self) -> list[Finding]:
        """The first occurrence of each (kind, parameter), in the order found."""
        return self._monitor.findings

    @property
    def occurrences(self) -> dict[tuple[Kind, str | None], int]:
        """How many checks showed each (kind, parameter) so far."""
        return self._monitor.occurrences

    @property
    def step(self) -> int:
        """Optimizer steps of the watched parameters so far, whichever optimizer took them (the
        most steps any watched parameter has taken)."""
        return self._monitor.step

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def param_names(self) -> list[str]:
        """Qualified names of the watched parameters."""
        return self._monitor.param_names

    def summary(self) -> str:
        """A readable report of every finding so far."""
        return self._monitor.summary()

    def mark_step(self) -> bool:
        """Mark a step of a loop that updates the weights by hand, with no ``torch.optim``
        optimizer: call it where ``optimizer.step()`` would be, after ``backward()`` and before
        the update. Every watched parameter's gradient is checked then, as before an optimizer
        step, and the step is counted, so every detector works for such loops.

        Returns:
            ``False`` when ``on_nonfinite="skip"`` found NaN/Inf and cleared the gradients
            (``.grad`` is ``None``): skip this update. ``True`` otherwise.

        Raises:
            GradWatchValueError: The watcher is closed.
            GradientError: With ``on_finding="raise"``, for a finding of this check.

        Example:
            >>> import torch, gradwatch
            >>> model = torch.nn.Linear(3, 1)
            >>> with gradwatch.watch(model, on_finding="record") as watcher:
            ...     for _ in range(3):
            ...         model.zero_grad()
            ...         model(torch.ones(4, 3)).sum().backward()
            ...         if watcher.mark_step():
            ...             with torch.no_grad():
            ...                 for p in model.parameters():
            ...                     _ = p.add_(p.grad, alpha=-0.1)
            >>> watcher.step, watcher.findings
            (3, [])
        """
        if self._closed:
            raise GradWatchValueError(
                "this Watcher is closed (its hooks are removed), so mark_step() would check "
                "nothing; call gradwatch.watch() again for a new one"
            )
        return self._monitor.mark_step()

    def state_dict(self) -> dict[str, Any]:
        """Step counts, detector history and findings, for resuming a run."""
        return self._monitor.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, for the same model.

        Raises:
            GradWatchTypeError: ``state`` is not a dict.
            GradWatchValueError: ``state`` was saved by another version, for another model or
                with other detector options; the watcher is then left as it was.
        """
        self._monitor.load_state_dict(state)

    def close(self) -> None:
        """Remove every hook, report what is still in flight, flush and close the outputs.

        Idempotent. Findings still in flight are recorded and written but not raised.
        """
        if self._closed:
            return
        self._closed = True
        self._registry.remove()
        try:
            self._monitor.close()
        finally:
            model = self._model()
            with _open_watchers_lock:
                if model is not None and _open_watchers.get(model) is self:
                    del _open_watchers[model]

    def __enter__(self) -> Watcher:
        """The watcher itself; a closed one raises :class:`GradWatchValueError`."""
        if self._closed:
            raise GradWatchValueError(
                "this Watcher is closed (its hooks are removed), so a with-block over it would "
                "watch nothing; call gradwatch.watch() again for a new one"
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        # The with-block is already failing: close anyway, but let its exception propagate as is.
        try:
            self.close()
        except Exception as error:
            warnings.warn(
                f"gradwatch: closing the watcher while the with-block raised "
                f"{type(exc).__name__} failed too ({error!r})",
                RuntimeWarning,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"Watcher({state}, params={len(self.param_names)}, step={self.step}, "
            f"findings={len(self.findings)})"
        )


__all__ = ["Watcher", "watch"]
