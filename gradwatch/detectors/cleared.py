"""Gradients cleared between ``backward()`` and the optimizer step that should use them.

``optimizer.zero_grad()`` placed after ``loss.backward()`` throws away the gradients that pass
produced: the optimizer steps with nothing, step after step, and the model never learns. Reads
the accumulated ``.grad`` the optimizer is about to use, through bookkeeping the monitor takes
at the check (which parameters this step's backward passes reached, which ``.grad`` is
``None``, which was changed in place since it was accumulated) and, for the in-place form, the
check's norms.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from gradwatch import _state
from gradwatch.detectors.base import CheckContext, Detector, Phase, Setup, by_arrival
from gradwatch.findings import Finding, Kind, _fmt_int, _names

CHECKS_IN_A_ROW = 2
"""Consecutive checks of one optimizer at which every gradient it was given was cleared before
a finding is made: one such step is possible in a healthy run (a batch whose gradient is exactly
zero everywhere, then clipped or unscaled in place); a loop that clears them repeats it."""


def _cleared_before_step(f: Finding) -> str:
    repeated = "" if f.value is None else f", at {_fmt_int(f.value)} steps in a row"
    return (
        f"zero_grad() was called between backward() and step(): the gradients backward() gave "
        f"{_names(f)} were discarded (set_to_none=True) or zeroed in place "
        f"(set_to_none=False) before optimizer.step() read them{repeated}, so the optimizer "
        f"updated nothing. Move optimizer.zero_grad() before loss.backward() (or to the start "
        f"of the loop)."
    )


class ClearedDetector(Detector):
    """Reports ``cleared_before_step``.

    At each check of an optimizer, the parameters it updates that a backward pass reached since
    its previous step (:attr:`CheckContext.reached`) are judged: one is cleared when its
    ``.grad`` is ``None`` (``zero_grad()``, ``set_to_none=True``), or when its ``.grad`` is the
    tensor that pass accumulated into, changed in place since (:attr:`CheckContext.rewritten`)
    and of norm exactly 0 (``zero_grad(set_to_none=False)``). The finding is made when every
    such parameter is cleared, at :data:`CHECKS_IN_A_ROW` consecutive checks of that optimizer.

    Healthy look-alikes stay silent: a parameter no backward pass reached this step (an idle
    head, the other network of a GAN) is not judged; ``zero_grad()`` before ``backward()``
    leaves the gradient as accumulated; clipping and unscaling change it in place but leave
    its norm above 0; a gradient that is exactly zero but untouched since it was accumulated
    (a dead ReLU) is not cleared; one parameter zeroed on purpose leaves the others.
    """

    name = "cleared"
    kinds = MappingProxyType({Kind.CLEARED_BEFORE_STEP: _cleared_before_step})
    phase = Phase.STATISTICS

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        self._streak: dict[int, int] = {}

    def check(self, ctx: CheckContext) -> list[Finding]:
        cleared = self._cleared(ctx)
        streak = self._streak.get(ctx.group, 0) + 1 if cleared else 0
        self._streak[ctx.group] = streak
        if streak < CHECKS_IN_A_ROW:
            return []
        names = tuple(ctx.table.names[i] for i in by_arrival(ctx, cleared))
        return [
            Finding(Kind.CLEARED_BEFORE_STEP, ctx.step, names[0], value=float(streak), params=names)
        ]

    @staticmethod
    def _cleared(ctx: CheckContext) -> list[int]:
        """Every reached position when all of them were cleared, else an empty list."""
        if not ctx.reached:
            return []
        missing = set(ctx.missing)
        if not ctx.reached - missing <= ctx.rewritten:
            return []  # a reached gradient is there as accumulated: no norm needed
        norms = ctx.host_norms()
        for j, i in enumerate(ctx.indices):
            if i in ctx.rewritten and float(norms[j]) != 0.0:
                return []
        return sorted(ctx.reached)

    def state_dict(self) -> dict[str, Any]:
        return {"streak": dict(self._streak)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the count of consecutive cleared checks per optimizer group.

        Raises:
            GradWatchTypeError: A field has the wrong type (the message names it).
            GradWatchValueError: A key is missing or unknown, or a count is negative.
        """
        fields = _state.fields(state, ("streak",))
        streak = {
            group: _state.integer(f"streak[{group}]", count)
            for group, count in _state.by_group("streak", fields["streak"]).items()
        }
        self._streak = streak
