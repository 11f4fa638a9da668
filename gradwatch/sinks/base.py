"""The base class of every gradwatch output, and the fan-out the core writes through.

A sink receives what the core sends at each check (statistics, histograms, update ratios) and
each finding once, when it is first reported. Every method of :class:`Sink` does nothing, so a
sink overrides only what it writes: a sink of findings alone is one method.

Example:
    >>> import gradwatch, torch
    >>> from gradwatch.sinks import Sink
    >>> class Printer(Sink):
    ...     def write_finding(self, finding, *, rank=None):
    ...         print(finding.kind.value, finding.param)
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with gradwatch.watch(model, opt, on_finding="record", sinks=[Printer()]):
    ...     for _ in range(2):
    ...         model(torch.ones(4, 3)).sum().backward()  # no zero_grad()
    ...         opt.step()
    missing_zero_grad bias
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from gradwatch._histograms import GradientHistograms
from gradwatch.findings import Finding


class Sink:
    """An output of gradwatch; every method is optional and does nothing here.

    The core calls a sink from the thread that runs the optimizer step (or the framework's
    hook), never from a gradient hook, so a sink may read the host tensors it is given but
    should not synchronise with a device of its own accord. A sink owns its resources:
    :meth:`close` releases them. Every method takes NaN and Inf values and empty name lists.
    After :meth:`close`, every call is a no-op that writes nothing and reopens nothing, and a
    second :meth:`close` is harmless; the contract test in ``tests/test_sinks.py`` checks every
    sink gradwatch ships.

    A sink that raises is reported once (a ``RuntimeWarning``) and switched off for the rest of
    the run; detection and training go on.
    """

    def write_check(
        self, step: int, names: Sequence[str], norms: torch.Tensor, total_norm: float
    ) -> None:
        """Statistics of one check.

        Args:
            step: The optimizer step checked (0 for the first).
            names: The parameters whose gradients were checked (those that had one).
            norms: A CPU tensor (float32; float64 when every checked gradient is float64):
                ``norms[j]`` is the L2 norm of ``names[j]``'s gradient
                (NaN or Inf where the gradient holds such values).
            total_norm: The L2 norm over the finite entries of ``norms`` (NaN when none is).
        """

    def write_histograms(
        self, step: int, names: Sequence[str], histograms: GradientHistograms
    ) -> None:
        """Histograms of the gradients at a histogram step; row ``j`` is ``names[j]``'s."""

    def write_update_ratios(self, step: int, names: Sequence[str], ratios: torch.Tensor) -> None:
        """``lr * |grad| / |weight|`` of each parameter, before the step (NaN where unknown)."""

    def write_finding(self, finding: Finding, *, rank: int | None = None) -> None:
        """A finding, the first time its (kind, parameter) is reported.

        Args:
            finding: What was found.
            rank: The process that found it; ``None`` leaves it to the sink (0, or the rank a
                sink such as ``FindingsLog`` was built with). In a distributed run only rank
                zero's sinks receive findings, those of every rank.
        """

    def flush(self) -> None:
        """Push anything buffered to its destination."""

    def close(self) -> None:
        """Flush and release resources. Idempotent."""


class _Adapted(Sink):
    """A sink written before :class:`Sink` had ``rank``: an object with the four methods
    ``write_check``, ``write_finding(finding)``, ``flush`` and ``close`` (and optionally
    ``write_histograms`` / ``write_update_ratios``)."""

    def __init__(self, target: object) -> None:
        self.target = target

    def write_check(
        self, step: int, names: Sequence[str], norms: torch.Tensor, total_norm: float
    ) -> None:
        self.target.write_check(step, names, norms, total_norm)  # type: ignore[attr-defined]

    def write_histograms(
        self, step: int, names: Sequence[str], histograms: GradientHistograms
    ) -> None:
        write = getattr(self.target, "write_histograms", None)
        if write is not None:
            write(step, names, histograms)

    def write_update_ratios(self, step: int, names: Sequence[str], ratios: torch.Tensor) -> None:
        write = getattr(self.target, "write_update_ratios", None)
        if write is not None:
            write(step, names, ratios)

    def write_finding(self, finding: Finding, *, rank: int | None = None) -> None:
        self.target.write_finding(finding)  # type: ignore[attr-defined]

    def flush(self) -> None:
        self.target.flush()  # type: ignore[attr-defined]

    def close(self) -> None:
        self.target.close()  # type: ignore[attr-defined]


_DUCK_METHODS = ("write_check", "write_finding", "flush", "close")


def as_sink(value: object, *, argument: str = "sinks") -> Sink:
    """``value`` as a :class:`Sink`: itself, or an adapter over an object with the four methods.

    Raises:
        GradWatchTypeError: ``value`` is neither.
    """
    from gradwatch import _checks
    from gradwatch.findings import GradWatchTypeError

    if isinstance(value, Sink):
        return value
    missing = [m for m in _DUCK_METHODS if not callable(getattr(value, m, None))]
    if missing or isinstance(value, type):
        raise GradWatchTypeError(
            f"{argument} must hold objects with the methods {', '.join(_DUCK_METHODS)}; got "
            f"{_checks.received(value)}"
            + (f", which lacks {', '.join(missing)}" if missing else ", a class")
            + " (subclass gradwatch.sinks.Sink, whose methods all do nothing, and pass instances)"
        )
    return _Adapted(value)


class FanOut(Sink):
    """Sends every call on to many sinks; one that fails is reported once, then dropped.

    Args:
        sinks: The sinks, in the order they are called.
        findings: Whether findings go to them; ``False`` for statistics only (a distributed
            front end sends findings itself, once, after the ranks have exchanged them).
    """

    def __init__(self, sinks: Sequence[object] = (), *, findings: bool = True) -> None:
        self._sinks = [as_sink(sink) for sink in sinks]
        self._failed: list[Sink] = []
        self._findings = findings

    def without_findings(self) -> FanOut:
        """A view of the same sinks that passes on everything but findings; a sink that fails
        through either is switched off for both."""
        view = FanOut(findings=False)
        view._sinks = self._sinks
        view._failed = self._failed
        return view

    def __bool__(self) -> bool:
        return bool(self._sinks)

    def __len__(self) -> int:
        return len(self._sinks)

    def add(self, sink: object) -> None:
        self._sinks.append(as_sink(sink))

    def write_check(
        self, step: int, names: Sequence[str], norms: torch.Tensor, total_norm: float
    ) -> None:
        for sink in list(self._sinks):
            self._call(sink, "write_check", step, names, norms, total_norm)

    def write_histograms(
        self, step: int, names: Sequence[str], histograms: GradientHistograms
    ) -> None:
        for sink in list(self._sinks):
            self._call(sink, "write_histograms", step, names, histograms)

    def write_update_ratios(self, step: int, names: Sequence[str], ratios: torch.Tensor) -> None:
        for sink in list(self._sinks):
            self._call(sink, "write_update_ratios", step, names, ratios)

    def write_finding(self, finding: Finding, *, rank: int | None = None) -> None:
        if not self._findings:
            return
        for sink in list(self._sinks):
            self._call(sink, "write_finding", finding, rank=rank)

    def flush(self) -> None:
        for sink in list(self._sinks):
            self._call(sink, "flush")

    def close(self) -> None:
        for sink in list(self._sinks):
            self._call(sink, "close")
        self._sinks.clear()
        failed, self._failed = self._failed, []
        for sink in failed:  # switched off, but it may still hold a file or a thread
            with contextlib.suppress(Exception):
                sink.close()

    def _call(self, sink: Sink, method: str, *args: object, **kwargs: object) -> None:
        try:
            getattr(sink, method)(*args, **kwargs)
        except Exception as error:  # a broken output must never stop training
            self._sinks.remove(sink)
            if method != "close":
                self._failed.append(sink)
            from gradwatch._reporting import warn_user  # imports this module

            name = type(sink.target if isinstance(sink, _Adapted) else sink).__name__
            warn_user(
                f"gradwatch: {name}.{method} failed ({error!r}); that output is switched off "
                f"for the rest of the run, detection goes on",
                RuntimeWarning,
            )


GuardedSinks = FanOut
"""The name this fan-out had before sinks became a public extension point."""
