"""The one small interface every output of gradwatch implements."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from typing import Protocol

import torch

from gradwatch._histograms import GradientHistograms
from gradwatch.findings import Finding


class Sink(Protocol):
    """Receives each check's statistics and each finding; owns its own resources."""

    def write_check(
        self, step: int, names: Sequence[str], norms: torch.Tensor, total_norm: float
    ) -> None:
        """Statistics of one check: ``norms[j]`` is the gradient norm of ``names[j]``."""

    def write_finding(self, finding: Finding) -> None: ...

    def write_histograms(
        self, step: int, names: Sequence[str], histograms: GradientHistograms
    ) -> None:
        """Histograms of the gradients at a histogram step; row ``j`` is ``names[j]``'s.

        Optional: sinks without this method are not sent histograms.
        """

    def write_update_ratios(self, step: int, names: Sequence[str], ratios: torch.Tensor) -> None:
        """``lr * |grad| / |weight|`` of each parameter, before the step (NaN where unknown).

        Optional: sinks without this method are not sent ratios.
        """

    def flush(self) -> None: ...

    def close(self) -> None: ...


class GuardedSinks:
    """Fans out to sinks; a sink that fails is reported once, then dropped, and training goes on."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self._sinks = list(sinks)
        self._failed: list[Sink] = []

    def __bool__(self) -> bool:
        return bool(self._sinks)

    def write_check(
        self, step: int, names: Sequence[str], norms: torch.Tensor, total_norm: float
    ) -> None:
        for sink in list(self._sinks):
            self._call(sink, "write_check", step, names, norms, total_norm)

    def write_finding(self, finding: Finding) -> None:
        for sink in list(self._sinks):
            self._call(sink, "write_finding", finding)

    def write_histograms(
        self, step: int, names: Sequence[str], histograms: GradientHistograms
    ) -> None:
        for sink in list(self._sinks):
            if hasattr(sink, "write_histograms"):
                self._call(sink, "write_histograms", step, names, histograms)

    def write_update_ratios(self, step: int, names: Sequence[str], ratios: torch.Tensor) -> None:
        for sink in list(self._sinks):
            if hasattr(sink, "write_update_ratios"):
                self._call(sink, "write_update_ratios", step, names, ratios)

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

    def _call(self, sink: Sink, method: str, *args: object) -> None:
        try:
            getattr(sink, method)(*args)
        except Exception as error:  # a broken output must never stop training
            self._sinks.remove(sink)
            if method != "close":
                self._failed.append(sink)
            warnings.warn(
                f"gradwatch: {type(sink).__name__}.{method} failed ({error!r}); that output is "
                f"switched off for the rest of the run, detection goes on",
                RuntimeWarning,
                stacklevel=2,
            )
