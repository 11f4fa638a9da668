"""What happens to a finding once a detector has made it: ignored, tolerated, de-duplicated,
written to the sinks and handed to the policy; and where gradwatch's warnings point.

Every warning gradwatch gives names the first frame outside gradwatch and torch: with
``watch()``, the user's ``optimizer.step()`` (or ``loss.backward()``) line; with a framework
callback, the framework's frame that called it (Lightning's or ``transformers``' own code, since
the user's line is not on the stack there).
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterable, Sequence

import torch

from gradwatch import _options
from gradwatch.findings import Finding, GradientError, GradWatchWarning, Kind
from gradwatch.sinks.base import FanOut

_INTERNAL_PREFIXES: tuple[str, ...] = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep for path in (__file__, torch.__file__)
)
"""Where frames that are not the user's live: gradwatch, and torch (its optimizer step wrapper
and hooks, ``torch.autograd``, ``Tensor.backward``)."""

_SKIP_FILE_PREFIXES = sys.version_info >= (3, 12)
"""Whether ``warnings.warn`` takes ``skip_file_prefixes`` (Python 3.12)."""


def warn_user(message: Warning | str, category: type[Warning] | None = None) -> None:
    """``warnings.warn(message, category)``, pointing at the first frame outside gradwatch and
    torch: the user's line that led here (or a framework's, for the callbacks)."""
    if _SKIP_FILE_PREFIXES:
        warnings.warn(  # type: ignore[call-overload, unused-ignore]
            message, category, stacklevel=2, skip_file_prefixes=_INTERNAL_PREFIXES
        )
        return
    warnings.warn(message, category, stacklevel=_outside_level())


def _outside_level() -> int:
    """The ``stacklevel`` of the first frame outside gradwatch and torch, for a
    ``warnings.warn`` called from the caller of this function."""
    frame = sys._getframe(2)  # the caller of warn_user: stacklevel 2 of its warnings.warn
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_PREFIXES):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level if frame is not None else 2


class Reporter:
    """The reporting stage of a monitor.

    Args:
        ignore: Kinds never reported.
        on_finding: The policy: ``"warn"``, ``"raise"``, ``"record"`` or a callable.
        sinks: Where each new finding is written (before the policy runs, so a raising policy
            loses nothing).
    """

    def __init__(
        self, ignore: frozenset[Kind], on_finding: _options.OnFinding, sinks: FanOut
    ) -> None:
        self._ignore = ignore
        self._on_finding = on_finding
        self._sinks = sinks
        self._lock = threading.RLock()
        self._findings: list[Finding] = []
        self._occurrences: collections.Counter[tuple[Kind, str | None]] = collections.Counter()
        self._tolerated: tuple[tuple[int, frozenset[Kind]], ...] = ()
        """(step, kinds) of recent checks at which those kinds are expected, not findings."""

    @property
    def findings(self) -> list[Finding]:
        with self._lock:
            return list(self._findings)

    @property
    def occurrences(self) -> dict[tuple[Kind, str | None], int]:
        with self._lock:
            return dict(self._occurrences)

    def tolerate(self, step: int, kinds: Sequence[Kind]) -> None:
        """Expect ``kinds`` at ``step`` (replacing what was expected there), not report them."""
        kept = tuple((s, k) for s, k in self._tolerated if s != step)
        if kinds:
            kept = (*kept, (step, frozenset(kinds)))
        self._tolerated = kept[-64:]  # checks still in flight are at most a few steps old

    def is_tolerated(self, finding: Finding) -> bool:
        return any(
            step == finding.step and finding.kind in kinds for step, kinds in self._tolerated
        )

    def report(self, findings: Iterable[Finding], *, raising: bool = True) -> None:
        new: list[Finding] = []
        with self._lock:
            for finding in findings:
                if finding.kind in self._ignore or self.is_tolerated(finding):
                    continue
                key = (finding.kind, finding.param)
                self._occurrences[key] += 1
                if self._occurrences[key] == 1:
                    self._findings.append(finding)
                    new.append(finding)
        for finding in new:
            self._sinks.write_finding(finding)
        for finding in new:
            self._apply_policy(finding, raising=raising)

    def state(self) -> tuple[list[Finding], list[list[object]]]:
        with self._lock:
            occurrences: list[list[object]] = [
                [k.value, p, n] for (k, p), n in self._occurrences.items()
            ]
            return list(self._findings), occurrences

    def load(
        self, findings: list[Finding], occurrences: dict[tuple[Kind, str | None], int]
    ) -> None:
        with self._lock:
            self._findings = list(findings)
            self._occurrences = collections.Counter(occurrences)

    def _apply_policy(self, finding: Finding, *, raising: bool) -> None:
        apply_policy(self._on_finding, finding, raising=raising)


def apply_policy(
    policy: _options.OnFinding,
    finding: Finding,
    *,
    raising: bool,
    announce: bool = True,
    logger: logging.Logger | None = None,
    where: str = "",
) -> None:
    """What ``on_finding`` does with a new finding; the one policy of every front end.

    A warning names the first frame outside gradwatch and torch (see :func:`warn_user`).

    Args:
        raising: Whether ``"raise"`` raises here (not while closing, nor for findings reported
            late from a check still in flight).
        announce: Whether this process speaks: warnings, log lines and the user's callable run
            on rank zero only; ``"raise"`` raises on every rank.
        logger: Where a finding that is not a warning is also logged (the frameworks' loggers).
        where: Appended to ``gradwatch`` in that log line (`` (on rank 1)``).
    """
    if policy == "warn":
        if announce:
            warn_user(GradWatchWarning(finding))
        return
    if logger is not None and announce:
        logger.info("gradwatch%s: %s", where, finding)
    if policy == "raise":
        if raising:
            raise GradientError(finding)
    elif callable(policy) and announce:
        policy(finding)
